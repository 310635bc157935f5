"""Attention kernels for the draft: the training-time-test (TTT) pattern, two ways, and cached inference.

TTT step j at row position t (see eagle/ttt.py) attends to
  * step-0 keys at positions s <= t - j of the same document (a causal block shifted by j), and
  * step-i keys, 1 <= i <= j, at the single position t - j + i (one diagonal per earlier step; i = j is the
    query's own key), if that position is in the same document.
Every query can see at least its own key, so no softmax row is empty (no NaN, even at padding).

Two implementations of the same function, neither materialising anything of size T*T*K:
  * `DenseTTTAttention`: per step one [T, T] masked score block plus j diagonal score vectors, one softmax over
    their concatenation. Plain tensor ops: runs forward and backward anywhere (the CPU path).
  * `FlexTTTAttention`: FlexAttention over the concatenated keys [k_0; ...; k_j] of length (j+1)*T with a
    BlockMask expressing the rule above; only the causal block and j diagonal blocks are computed (GPU path).
Both are callables `attend(q, k, v) -> out` for `Eagle3Draft.layer`; call them once per step, in step order.
`cached_attention` serves `eagle/inference.py`; `ragged_mask` + `masked_attention` serve its batched variant
(rows with holes in a shared cache) and eval's batched target forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_KINDS = ("auto", "dense", "flex")
QUERY_CHUNKS = 4  # dense path: causal blocks skipped = (QUERY_CHUNKS - 1) / (2 * QUERY_CHUNKS) of T*T
MASKED_QUERY_CHUNK = 128  # masked_attention: queries per score block (a 40-row, 700-token prefill: 100 MB, not 700)


def resolve_attention(kind: str, device: torch.device) -> str:
    """"auto" -> "flex" on CUDA, "dense" elsewhere."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    if kind == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return kind


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, nKV, L, D) -> (B, n_heads, L, D); query head h uses kv head h // (n_heads // nKV), as in HF."""
    b, n_kv, length, d = x.shape
    if n_kv == n_heads:
        return x
    return x[:, :, None].expand(b, n_kv, n_heads // n_kv, length, d).reshape(b, n_heads, length, d)


def shift_rows(x: torch.Tensor, s: int) -> torch.Tensor:
    """y[..., t, :] = x[..., t - s, :] along dim -2, zeros for t < s."""
    if s == 0:
        return x
    return F.pad(x, (0, 0, s, 0))[..., : x.shape[-2], :]


class DenseTTTAttention:
    """TTT attention from a dense [T, T] block for step-0 keys plus one diagonal per later step."""

    def __init__(self, document_ids: torch.Tensor):
        doc = document_ids  # (B, T)
        self.T = doc.shape[1]
        idx = torch.arange(self.T, device=doc.device)
        self.same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
        self.offset = idx[:, None] - idx[None, :]  # (T, T) query index - key index
        self.doc, self.idx = doc, idx
        self.back_ok: list[torch.Tensor] = []  # back_ok[s][b, t]: row t - s exists and is in t's document
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def _back_ok(self, s: int) -> torch.Tensor:
        while len(self.back_ok) <= s:
            n = len(self.back_ok)
            self.back_ok.append((self.idx >= n) & (self.doc == torch.roll(self.doc, n, dims=1)))
        return self.back_ok[s]  # (B, T)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, nH, T, D), k/v (B, nKV, T, D) of the current step -> (B, nH, T, D)."""
        j = len(self.keys)
        self.keys.append(k)
        self.values.append(v)
        n_heads = q.shape[1]
        q = q * q.shape[-1] ** -0.5  # scale the (B, nH, T, D) queries, not the T/D times larger scores
        k0, v0 = repeat_kv(self.keys[0], n_heads), repeat_kv(self.values[0], n_heads)
        diag_k = [shift_rows(repeat_kv(self.keys[i], n_heads), j - i) for i in range(1, j + 1)]  # (B, nH, T, D)
        diag_v = [shift_rows(repeat_kv(self.values[i], n_heads), j - i) for i in range(1, j + 1)]
        # query rows in chunks: rows < r1 see only step-0 keys < r1, so the all-masked upper blocks are skipped
        chunk = self.T // QUERY_CHUNKS if self.T % QUERY_CHUNKS == 0 else self.T
        outs = []
        for r0 in range(0, self.T, chunk):
            r1 = r0 + chunk
            rows = slice(r0, r1)
            qc = q[:, :, rows]  # (B, nH, C, D)
            s0 = qc @ k0[:, :, :r1].transpose(-1, -2)  # (B, nH, C, r1)
            mask0 = self.same_doc[:, rows, :r1] & (self.offset[rows, :r1] >= j)  # (B, C, r1)
            s0 = s0.masked_fill(~mask0[:, None], float("-inf"))
            diag_s = []
            for i in range(1, j + 1):  # step-i key of the query's own chain sits j - i rows back
                si = (qc * diag_k[i - 1][:, :, rows]).sum(-1)  # (B, nH, C)
                diag_s.append(si.masked_fill(~self._back_ok(j - i)[:, None, rows], float("-inf")))
            scores = torch.cat([s0] + [s[..., None] for s in diag_s], dim=-1)  # (B, nH, C, r1 + j)
            p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = p[..., :r1] @ v0[:, :, :r1]  # (B, nH, C, D)
            for i, vi in enumerate(diag_v):
                out = out + p[..., r1 + i, None] * vi[:, :, rows]
            outs.append(out)
        return torch.cat(outs, dim=2)  # (B, nH, T, D)


_compiled_flex = None
_compiled_block_mask = None


def _flex_fns(device: torch.device):
    """flex_attention and create_block_mask, compiled when called outside torch.compile (eager flex is unfused)."""
    global _compiled_flex, _compiled_block_mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device.type != "cuda":  # CPU flex (torch 2.13) has no backward and miscompiles these masks
        raise ValueError(f"attention='flex' needs a CUDA device, got {device.type!r}; use attention='dense'")
    if torch.compiler.is_compiling():
        return flex_attention, create_block_mask
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
        _compiled_block_mask = torch.compile(create_block_mask, dynamic=False)
    return _compiled_flex, _compiled_block_mask


def ttt_mask_mod(document_ids: torch.Tensor, T: int, j: int):
    """The TTT rule as a FlexAttention mask_mod over keys [k_0; ...; k_j] (key index = step * T + position)."""

    def mask_mod(b, h, q_idx, kv_idx):
        step = kv_idx // T
        s = kv_idx - step * T
        # kernels may evaluate indices past the end (lengths not a multiple of the block): clamp the lookups
        in_range = (q_idx < T) & (kv_idx < (j + 1) * T)
        same = document_ids[b, q_idx.clamp(max=T - 1)] == document_ids[b, s.clamp(max=T - 1)]
        causal0 = (step == 0) & (s <= q_idx - j)
        diag = (step > 0) & (step <= j) & (s == q_idx - j + step)
        return in_range & same & (causal0 | diag)

    return mask_mod


class FlexTTTAttention:
    """TTT attention with FlexAttention over the concatenated keys of all steps so far (block-sparse)."""

    def __init__(self, document_ids: torch.Tensor):
        self.doc = document_ids  # (B, T)
        self.B, self.T = document_ids.shape
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        j = len(self.keys)
        self.keys.append(k)
        self.values.append(v)
        flex_attention, create_block_mask = _flex_fns(q.device)
        T = self.T
        block_mask = create_block_mask(ttt_mask_mod(self.doc, T, j), self.B, None, T, (j + 1) * T,
                                       device=q.device)
        keys = torch.cat(self.keys, dim=2)  # (B, nKV, (j+1)*T, D)
        values = torch.cat(self.values, dim=2)
        return flex_attention(q, keys, values, block_mask=block_mask, scale=q.shape[-1] ** -0.5,
                              enable_gqa=q.shape[1] != k.shape[1])


def make_ttt_attention(kind: str, document_ids: torch.Tensor):
    """A fresh per-batch TTT attention state ("dense" or "flex"; "auto" resolved by device)."""
    kind = resolve_attention(kind, document_ids.device)
    return FlexTTTAttention(document_ids) if kind == "flex" else DenseTTTAttention(document_ids)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries at cache slots start..start+T-1 over cache slots 0..start+T-1.

    q (B, nH, T, D); k/v (B, nKV, start+T, D) -> (B, nH, T, D). Softmax in at least float32, like the TTT paths.
    """
    n_heads, T, length = q.shape[1], q.shape[2], k.shape[2]
    k, v = repeat_kv(k.to(q.dtype), n_heads), repeat_kv(v.to(q.dtype), n_heads)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, nH, T, L)
    slot = torch.arange(length, device=q.device)
    query_slot = start + torch.arange(T, device=q.device)
    scores = scores.masked_fill(slot[None, :] > query_slot[:, None], float("-inf"))
    return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype) @ v


def ragged_mask(kept: torch.Tensor, start: int) -> torch.Tensor:
    """Which cache slots each new query attends, for rows that share slots but not what they keep.

    kept (B, L) bool: the slots each row keeps (a rejected draft or left padding is a hole); the new queries sit
    at slots start..L-1. -> allowed (B, 1, L - start, L): kept slots at or before the query's slot, and always
    the query's own slot (so a query at a hole still has one key: no empty softmax row, no NaN).
    """
    length = kept.shape[1]
    slot = torch.arange(length, device=kept.device)
    query_slot = torch.arange(start, length, device=kept.device)[:, None]  # (T, 1)
    allowed = kept[:, None, :] & (slot <= query_slot)[None]  # (B, T, L)
    return (allowed | (slot == query_slot)[None])[:, None]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, nH, T, D) over k/v (B, nKV, L, D) where allowed (B, 1, T, L) -> (B, nH, T, D).

    Grouped-query heads read their kv head in place (query head h uses kv head h // (nH / nKV), as repeat_kv):
    repeating a batch's whole cache per layer and forward cost more than the matmuls on a CPU. Softmax in at
    least float32, like the other paths.
    """
    b, n_heads, t, d = q.shape
    if t > MASKED_QUERY_CHUNK:  # a long prefill: bound the (B, nH, T, L) scores held at once
        return torch.cat([masked_attention(q[:, :, i:i + MASKED_QUERY_CHUNK], k, v,
                                           allowed[:, :, i:i + MASKED_QUERY_CHUNK], scale)
                          for i in range(0, t, MASKED_QUERY_CHUNK)], dim=2)
    n_kv, length = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    scale = d ** -0.5 if scale is None else scale
    scores = (q.reshape(b, n_kv, groups * t, d) @ k.to(q.dtype).transpose(-1, -2)) * scale  # (B, nKV, g*T, L)
    scores = scores.view(b, n_kv, groups, t, length).masked_fill(~allowed[:, :, None], float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # at least float32 (float64 stays)
    probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(v.dtype).view(b, n_kv, groups * t, length)
    return (probs @ v.to(probs.dtype)).view(b, n_heads, t, v.shape[-1]).to(q.dtype)
