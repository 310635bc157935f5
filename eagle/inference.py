"""The draft run exactly as vLLM/SGLang run it: a KV cache, step 0 from target features, later steps from the
draft's own pre-norm hidden state. Used by `eagle-pipe eval` and by the train/serve equality tests.

OWNER: eagle-model helper. API:

    class DraftCache:
        def __init__(self, cfg, batch_size: int, max_len: int, device=None, dtype=torch.float32)
        length: int                     # number of filled positions
        def crop(self, length: int)     # discard entries at positions >= length
    @torch.no_grad()
    def draft_step(model, cache, input_ids, hidden, positions, fused: bool) -> tuple[Tensor, Tensor]
        # input_ids int64 [B, T] tokens at cache positions cache.length..+T (the positions given in `positions`)
        # hidden: [B, T, 3*Ht] target aux features if fused is False (fc is applied), else [B, T, H] draft state
        # writes K/V at those positions, attends causally to everything cached; returns
        # (logits [B, T, Vd] over the draft vocab, out [B, T, H] pre-norm output = next step's hidden)
"""
