"""Vocabulary map: d2t/t2d consistency, frequency ranking, deterministic ties, full-vocab case, shard counts."""
from __future__ import annotations

import pytest
import torch

from eagle.vocab import build_vocab_map, count_tokens_from_shards, draft_to_target_ids, target_to_draft_index


def check_consistent(d2t, t2d, V, Vd):
    assert d2t.dtype == torch.int64 and d2t.shape == (Vd,)
    assert t2d.dtype == torch.bool and t2d.shape == (V,)
    target_ids = torch.arange(Vd) + d2t
    assert target_ids.unique().numel() == Vd
    assert int(target_ids.min()) >= 0 and int(target_ids.max()) < V
    assert torch.equal(torch.nonzero(t2d).flatten(), target_ids.sort().values)
    assert int(t2d.sum()) == Vd
    assert torch.all(target_ids[1:] > target_ids[:-1])  # draft ids follow ascending target id
    return target_ids


def test_keeps_most_frequent_ids():
    g = torch.Generator().manual_seed(0)
    V, Vd = 200, 37
    counts = torch.randperm(V, generator=g).to(torch.int64) * 3  # distinct counts
    d2t, t2d = build_vocab_map(counts, Vd)
    target_ids = check_consistent(d2t, t2d, V, Vd)
    # independent reference: python sort by (-count, id)
    expected = sorted(sorted(range(V), key=lambda i: (-int(counts[i]), i))[:Vd])
    assert target_ids.tolist() == expected


def test_ties_broken_by_lower_id_and_deterministic():
    counts = torch.tensor([5, 1, 3, 3, 3, 0, 5, 3, 0, 0], dtype=torch.int64)
    d2t, t2d = build_vocab_map(counts, 4)
    target_ids = check_consistent(d2t, t2d, 10, 4)
    assert target_ids.tolist() == [0, 2, 3, 6]  # both 5s, then the two lowest ids among the 3s
    for _ in range(3):
        d2t_again, t2d_again = build_vocab_map(counts.clone(), 4)
        assert torch.equal(d2t, d2t_again) and torch.equal(t2d, t2d_again)
    # unseen tokens fill up by ascending id
    d2t, t2d = build_vocab_map(counts, 8)
    assert check_consistent(d2t, t2d, 10, 8).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_all_zero_counts_take_lowest_ids():
    d2t, t2d = build_vocab_map(torch.zeros(12, dtype=torch.int64), 5)
    assert check_consistent(d2t, t2d, 12, 5).tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(d2t, torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("Vd", [50, 51, 10_000])
def test_full_vocab_when_draft_vocab_not_smaller(Vd):
    counts = torch.randint(0, 9, (50,), generator=torch.Generator().manual_seed(1))
    d2t, t2d = build_vocab_map(counts, Vd)
    check_consistent(d2t, t2d, 50, 50)
    assert torch.equal(d2t, torch.zeros(50, dtype=torch.int64)) and bool(t2d.all())


def test_target_to_draft_index_inverts_d2t():
    counts = torch.randint(0, 100, (300,), generator=torch.Generator().manual_seed(2))
    d2t, t2d = build_vocab_map(counts, 64)
    index = target_to_draft_index(t2d)
    assert index.dtype == torch.int64 and index.shape == (300,)
    target_ids = draft_to_target_ids(d2t)
    assert torch.equal(index[target_ids], torch.arange(64))
    outside = [i for i in range(300) if i not in set(target_ids.tolist())]
    assert all(int(index[i]) == -1 for i in outside)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, 2.0]), "integer"),
    (torch.zeros(2, 3, dtype=torch.int64), "1-D"),
    (torch.tensor([1, -1]), "non-negative"),
])
def test_bad_counts_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        build_vocab_map(bad, 1)


def test_bad_draft_vocab_size_rejected():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_vocab_map(torch.ones(4, dtype=torch.int64), 0)


def test_count_tokens_from_shards_sums_sparse_counts():
    records = [
        {"shard_index": 0, "token_counts": {"ids": [1, 4, 7], "counts": [2, 1, 5]}},
        {"shard_index": 1, "token_counts": {"ids": [0, 4], "counts": [3, 6]}},
        {"shard_index": 2, "token_counts": {"ids": [], "counts": []}},
    ]
    total = count_tokens_from_shards(records, 8)
    expected = [0] * 8
    for r in records:
        for i, c in zip(r["token_counts"]["ids"], r["token_counts"]["counts"]):
            expected[i] += c
    assert total.dtype == torch.int64 and total.tolist() == expected


@pytest.mark.parametrize("record, match", [
    ({"shard_index": 3}, "shard 3: missing 'token_counts'"),
    ({"shard_index": 3, "token_counts": {"ids": [1, 2], "counts": [1]}}, "2 ids but 1 counts"),
    ({"shard_index": 3, "token_counts": {"ids": [9], "counts": [1]}}, "token id 9 is outside"),
    ({"shard_index": 3, "token_counts": {"ids": [1], "counts": [-2]}}, "negative"),
])
def test_count_tokens_bad_record_named(record, match):
    with pytest.raises(ValueError, match=match):
        count_tokens_from_shards([{"token_counts": {"ids": [0], "counts": [1]}}, record], 8)
