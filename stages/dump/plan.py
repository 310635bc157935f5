"""The deterministic work plan of one dump shard: which records, which parts, which batches.

Records are partitioned across shards by stages/sharding.py. A shard's sequences are sorted by
(length, sample_index) and cut into parts of about `part_tokens` tokens; each part is cut into batches whose
*padded* size (sequences x longest length) stays within `batch_tokens`. Batches never cross parts, so a part's
bytes depend only on its own sequences and batches: a rerun after a crash recomputes exactly the missing
parts and produces the same bytes as an uninterrupted run (same hardware and software).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sequence:
    sample_index: int
    input_ids: np.ndarray   # int32 [T]
    loss_mask: np.ndarray   # uint8 [T]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PartPlan:
    index: int
    sequences: list[Sequence]
    batches: list[tuple[int, int]] = field(default_factory=list)  # [start, end) into sequences

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def padded_tokens(self) -> int:
        return sum((end - start) * len(self.sequences[end - 1]) for start, end in self.batches)

    def sample_indices(self) -> list[int]:
        return [s.sample_index for s in self.sequences]


def plan_parts(sequences: list[Sequence], part_tokens: int, batch_tokens: int) -> list[PartPlan]:
    """Sort by (length, sample_index), cut into parts, cut each part into padded-size-bounded batches."""
    ordered = sorted(sequences, key=lambda s: (len(s), s.sample_index))
    parts: list[PartPlan] = []
    current: list[Sequence] = []
    tokens = 0
    for seq in ordered:
        if current and tokens + len(seq) > part_tokens:
            parts.append(PartPlan(len(parts), current))
            current, tokens = [], 0
        current.append(seq)
        tokens += len(seq)
    if current:
        parts.append(PartPlan(len(parts), current))
    for part in parts:
        part.batches = plan_batches([len(s) for s in part.sequences], batch_tokens)
    return parts


def plan_batches(lengths: list[int], batch_tokens: int) -> list[tuple[int, int]]:
    """Greedy over ascending lengths: a batch grows while (count + 1) * next_length fits the budget.

    A single sequence longer than the budget forms its own batch.
    """
    batches = []
    start = 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * length > batch_tokens:
            batches.append((start, i))
            start = i
    if start < len(lengths):
        batches.append((start, len(lengths)))
    return batches


def pad_batch(seqs: list[Sequence], pad_id: int):
    """Right-padded (input_ids [B, T] int64, attention_mask [B, T] int64, real_index [n] int64, cu_seqlens [B+1]).

    `real_index` addresses the real tokens in the flattened [B*T] batch, in sequence order; right padding keeps
    every real token's position id equal to its index in its sequence.
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    real = []
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s.input_ids
        mask[b, : len(s)] = 1
        real.append(np.arange(len(s), dtype=np.int64) + b * width)
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    cu[1:] = np.cumsum([len(s) for s in seqs])
    return (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(np.concatenate(real)),
            torch.from_numpy(cu))


def token_counts(sequences: list[Sequence]) -> dict:
    """Frequencies of supervised token ids (input_ids where loss_mask is 1): {"ids": [...], "counts": [...]}."""
    if not sequences:
        return {"ids": [], "counts": []}
    ids = np.concatenate([s.input_ids[s.loss_mask.astype(bool)] for s in sequences])
    uniq, counts = np.unique(ids, return_counts=True)
    return {"ids": uniq.tolist(), "counts": counts.tolist()}
