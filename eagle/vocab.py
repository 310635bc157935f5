"""Draft vocabulary map from supervised-token frequencies.

The draft predicts over the Vd most frequent supervised target tokens. Two maps tie the vocabularies together,
in the layout both serving engines read:
  d2t int64 [Vd]  offsets: target_id = draft_id + d2t[draft_id]   (exported)
  t2d bool  [V]   True for target ids inside the draft vocabulary (exported, engines skip it)
Draft ids follow ascending target id, so d2t is non-decreasing and the map is a pure function of the counts.

API:

    def build_vocab_map(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]
        # token_counts int64 [V] (summed over shards' done.json frequencies)
        # -> d2t int64 [Vd] (target_id = draft_id + d2t[draft_id]), t2d bool [V]
        # Keeps the Vd most frequent ids, ties broken by lower id; draft ids ordered by target id (ascending).
        # Vd >= V -> full vocab (d2t all zeros).
    def target_to_draft_index(t2d: Tensor) -> Tensor   # int64 [V], draft id or -1
    def count_tokens_from_shards(done_records: list[dict], vocab_size: int) -> Tensor   # int64 [V]
        # sums done.json "token_counts" {"ids": [...], "counts": [...]} over shards
"""
from __future__ import annotations

import torch
from torch import Tensor


def build_vocab_map(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """(d2t int64 [Vd], t2d bool [V]) keeping the Vd most frequent ids; Vd is capped at V."""
    if not isinstance(token_counts, Tensor) or token_counts.dim() != 1 or token_counts.numel() == 0:
        raise ValueError("token_counts must be a non-empty 1-D tensor [V]")
    if token_counts.dtype.is_floating_point or token_counts.dtype == torch.bool:
        raise ValueError(f"token_counts must be an integer tensor, got {token_counts.dtype}")
    if not isinstance(draft_vocab_size, int) or isinstance(draft_vocab_size, bool) or draft_vocab_size < 1:
        raise ValueError(f"draft_vocab_size must be an integer >= 1, got {draft_vocab_size!r}")
    counts = token_counts.detach().to("cpu", torch.int64)
    if bool((counts < 0).any()):
        raise ValueError("token_counts must be non-negative")
    V = counts.numel()
    Vd = min(draft_vocab_size, V)
    # Stable descending sort: equal counts keep ascending id order, so ties go to the lower id.
    order = torch.sort(counts, descending=True, stable=True).indices
    kept = torch.sort(order[:Vd]).values                         # (Vd,) target ids, ascending
    d2t = kept - torch.arange(Vd, dtype=torch.int64)             # (Vd,)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[kept] = True
    return d2t, t2d


def target_to_draft_index(t2d: Tensor) -> Tensor:
    """int64 [V]: the draft id of each target id, or -1 where the id is outside the draft vocab."""
    if t2d.dtype != torch.bool or t2d.dim() != 1:
        raise ValueError(f"t2d must be a 1-D bool tensor [V], got {t2d.dtype} {list(t2d.shape)}")
    rank = torch.cumsum(t2d.to(torch.int64), 0) - 1               # draft id = number of kept ids before it
    return torch.where(t2d, rank, torch.full_like(rank, -1))


def draft_to_target_ids(d2t: Tensor) -> Tensor:
    """int64 [Vd]: the target id of every draft id (arange + d2t)."""
    return torch.arange(d2t.numel(), dtype=torch.int64, device=d2t.device) + d2t.to(torch.int64)


def count_tokens_from_shards(done_records: list[dict], vocab_size: int) -> Tensor:
    """Sum the sparse supervised-token counts of every shard's done.json into int64 [V].

    Each record holds "token_counts": {"ids": [...], "counts": [...]}; a malformed record raises
    ValueError naming its shard_index (or its position in the list).
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    total = torch.zeros(vocab_size, dtype=torch.int64)
    for n, record in enumerate(done_records):
        where = f"done.json of shard {record.get('shard_index', n)}" if isinstance(record, dict) else f"record {n}"
        tc = record.get("token_counts") if isinstance(record, dict) else None
        if not isinstance(tc, dict) or not isinstance(tc.get("ids"), list) or not isinstance(tc.get("counts"), list):
            raise ValueError(f"{where}: missing 'token_counts' {{'ids': [...], 'counts': [...]}}")
        ids, counts = tc["ids"], tc["counts"]
        if len(ids) != len(counts):
            raise ValueError(f"{where}: token_counts has {len(ids)} ids but {len(counts)} counts")
        if not ids:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids + counts):
            raise ValueError(f"{where}: token_counts ids and counts must be integers")
        ids_t = torch.tensor(ids, dtype=torch.int64)
        counts_t = torch.tensor(counts, dtype=torch.int64)
        if bool((ids_t < 0).any()) or bool((ids_t >= vocab_size).any()):
            bad = ids_t[(ids_t < 0) | (ids_t >= vocab_size)][0].item()
            raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size - 1}]")
        if bool((counts_t < 0).any()):
            raise ValueError(f"{where}: token_counts holds a negative count")
        total.index_add_(0, ids_t, counts_t)
    return total
