"""Draft configuration, derived from the target's `config.json` (a plain dict) — no target model is loaded.

OWNER: eagle-config helper. API (others code against this; keep it):

    @dataclass(frozen=True)
    class DraftConfig:
        hidden_size: int                # H (= target hidden size; the draft layer works at H)
        num_attention_heads: int
        num_key_value_heads: int
        head_dim: int
        intermediate_size: int
        rms_norm_eps: float
        rope_theta: float
        rope_scaling: dict | None       # HF rope_scaling dict (rope_type "default", "linear", "llama3"), or None
        max_position_embeddings: int
        vocab_size: int                 # V, target vocab
        draft_vocab_size: int           # Vd <= V
        target_hidden_size: int         # width of each aux hidden state (fc input is 3 * this)
        num_target_layers: int          # N, for validating aux ids
        aux_layer_ids: tuple[int, int, int]  # vLLM convention: k = residual stream entering layer k (HF hidden_states[k])
        ttt_steps: int = 7

        @classmethod
        def from_target_config(cls, target: dict, *, draft_vocab_size=32000, ttt_steps=7, aux_layer_ids=None,
                               **overrides) -> "DraftConfig"
            # default aux ids (2, N//2, N-3); draft vocab capped at V; validates everything with clear ValueErrors
        def to_dict(self) -> dict; @classmethod from_dict(cls, d) -> DraftConfig

    def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]
    def load_target_dir(path) -> tuple[dict, dict[str, Tensor]]
        # reads OUT/target/config.json and OUT/target/weights.safetensors
        # (embed_tokens.weight, lm_head.weight, norm.weight); clear error naming the missing file/field.
"""
