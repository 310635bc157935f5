"""The EAGLE-3 draft head: fc + one decoder layer over cat(embed, hidden) + norm + lm_head.

OWNER: eagle-model helper. Parameter names are the export layout of ../shared/reference/eagle3-checkpoint.md
(no `model.` prefix): fc, midlayer.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
hidden_norm, post_attention_layernorm}, norm, lm_head; buffers d2t [Vd] int64, t2d [V] bool; the frozen
embedding `embed_tokens.weight` [V, H] (requires_grad=False, never exported).

API:
    class Eagle3Draft(nn.Module):
        def __init__(self, cfg: DraftConfig)
        cfg: DraftConfig
        def init_from_target(self, weights: dict[str, Tensor], d2t: Tensor, t2d: Tensor, init_lm_head=True)
            # copies embed_tokens (frozen), sets d2t/t2d, optionally lm_head = target lm_head rows of the draft vocab
        def fuse(self, aux_hidden_states)  -> Tensor   # fc: (.., 3*Ht) -> (.., H)
        def embed(self, input_ids) -> Tensor
        def layer(self, embeds, hidden, positions, attend) -> Tensor  # pre-norm output `out` (next step's g)
        def logits(self, out) -> Tensor                # lm_head(norm(out)) over the draft vocab (.., Vd)
        def draft_to_target(self, draft_ids) -> Tensor # draft_ids + d2t[draft_ids]
"""
