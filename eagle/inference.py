"""The draft run exactly as vLLM/SGLang run it: a KV cache, step 0 from target features, later steps from the
draft's own hidden state (pre-norm out; norm(out) for EAGLE-3.1's norm_output). Used by `eagle-pipe eval` and by
the train/serve equality tests.

Chain drafting with verified tokens x_1..x_n and bonus x_{n+1} (docs/checkpoint-format.md, "How the engines draft"):
    cache = DraftCache(cfg, 1, max_len)
    logits, out = draft_step(model, cache, x[1..n+1], f[0..n], positions 0..n, fused=False)   # prefill + step 0
    d = argmax(logits[:, -1]) mapped through d2t; h = out[:, -1:]
    for j in 1..K-1: logits, h = draft_step(model, cache, d, h, position n+j, fused=True); d = argmax ...
    after verification: cache.crop(number of verified positions), then prefill the newly verified ones.
Cache slot i holds the K/V of the i-th token fed since the last crop point; queries attend causally to slots.
`RaggedDraftCache` does the same for a batch whose rows keep different numbers of tokens per round (eval's
batched speculative decoding): every row writes the same slots, and the entries a row does not keep are holes.

API:

    class DraftCache:
        def __init__(self, cfg, batch_size: int, max_len: int, device=None, dtype=torch.float32)
        length: int                     # number of filled positions
        def crop(self, length: int)     # discard entries at positions >= length
        def keep_rows(self, rows)       # keep only these batch rows (eval drops finished turns)
    @torch.no_grad()
    def draft_step(model, cache, input_ids, hidden, positions, fused: bool) -> tuple[Tensor, Tensor]
        # input_ids int64 [B, T] tokens at cache positions cache.length..+T (the positions given in `positions`)
        # hidden: [B, T, 3*Ht] target aux features if fused is False (fc is applied), else [B, T, H] draft state
        # writes K/V at those positions, attends causally to everything cached; returns
        # (logits [B, T, Vd] over the draft vocab, h [B, T, H] = the next step's hidden: the pre-norm out,
        #  or norm(out) when cfg.norm_output)
"""
from __future__ import annotations

import torch

from eagle.attention import cached_attention, masked_attention, ragged_mask


class DraftCache:
    """Preallocated draft K/V [B, nKV, max_len, D], written by index; `length` slots are filled."""

    def __init__(self, cfg, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def crop(self, length: int) -> None:
        """Discard entries at positions >= length (they are overwritten by the next writes)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a draft cache of length {self.length} to {length}")
        self.length = length

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the batch), in this order."""
        self.k, self.v = self.k[rows], self.v[rows]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write k/v (B, nKV, T, D) at slots length..length+T-1; returns the first of them."""
        start, t = self.length, k.shape[2]
        if start + t > self.max_len:
            raise ValueError(f"draft cache overflow: {start} + {t} tokens > max_len {self.max_len}")
        self.k[:, :, start:start + t] = k
        self.v[:, :, start:start + t] = v
        self.length = start + t
        return start

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k/v at the next slots, attend causally to all filled slots."""
        start = self.write(k, v)
        return cached_attention(q, self.k[:, :, :self.length], self.v[:, :, :self.length], start)


class RaggedDraftCache(DraftCache):
    """A DraftCache whose rows keep different entries of the same slots.

    `keep_next(kept)` says which of the next written entries each row keeps (default: all); a slot a row does not
    keep (left padding, a position past what that row verified) is a hole that the row's later queries never
    attend. RoPE positions are per row (the caller's `positions`), so holes shift nothing.
    """

    def __init__(self, cfg, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(cfg, batch_size, max_len, device=device, dtype=dtype)
        self.kept = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self._next_kept = None

    def keep_next(self, kept: torch.Tensor) -> None:
        """kept (B, T) bool: which entries of the next write of T tokens each row keeps."""
        self._next_kept = kept

    def keep_rows(self, rows: torch.Tensor) -> None:
        super().keep_rows(rows)
        self.kept = self.kept[rows]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start = self.write(k, v)
        self.kept[:, start:self.length] = True if self._next_kept is None else self._next_kept
        self._next_kept = None
        allowed = ragged_mask(self.kept[:, :self.length], start)
        return masked_attention(q, self.k[:, :, :self.length], self.v[:, :, :self.length], allowed)


@torch.no_grad()
def draft_step(model, cache: DraftCache, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
               fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft forward over T new tokens; returns (logits [B, T, Vd], next step's hidden [B, T, H])."""
    g = hidden if fused else model.fuse(hidden)  # (B, T, H)
    out = model.layer(model.embed(input_ids), g, positions, cache.attend)  # (B, T, H) pre-norm
    return model.head(out)
