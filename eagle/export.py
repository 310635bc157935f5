"""Export a draft in the serving layout vLLM and SGLang load as-is, and load it back.

OWNER: eagle-config helper. Layout: ../shared/reference/eagle3-checkpoint.md. API:

    def export_draft(model, out_dir) -> Path     # config.json + model.safetensors (metadata {"format": "pt"})
    def load_draft(path, embed_weight: Tensor | None = None, device="cpu") -> Eagle3Draft
        # embed_weight: the target's embedding [V, H] (exports omit it; engines use the target's)
"""
