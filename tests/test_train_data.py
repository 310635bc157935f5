"""The training data path: packing, the one-position shift, splitting/truncation, rank partition, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.errors import StageError
from stages.train.loader import (DumpIndex, PackedLoader, PartFile, PartReader, _prefetched, epoch_rows, make_chunks,
                               valid_counts)
from train_helpers import make_documents, write_dump

V = 40
LENGTHS = [5, 17, 2, 9, 30, 1, 12, 8, 3, 21, 7, 15, 4, 11]


def make_loader(root, seq_len=8, batch_size=2, long_sequences="split", kind="topk", eval_fraction=0.0, **kw):
    index = DumpIndex(root)
    train_ids, held_ids = index.split(eval_fraction, seed=3)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[: V // 2] = True
    loader = PackedLoader(index, train_ids, seq_len=seq_len, batch_size=batch_size, steps=3, t2d=t2d, seed=3,
                          long_sequences=long_sequences, **kw)
    return index, loader, held_ids


def all_batches(loader):
    return [mb for step in loader for mb in step]


def check_against_reference(batches, docs, seq_len, kind):
    """Every non-padding position equals the per-document reference; returns the set of (doc, t) seen."""
    seen = []
    by_sample = {d["sample_index"]: d for d in docs}
    for batch, counts in batches:
        B, T = batch["input_ids"].shape
        for b in range(B):
            doc_ids = batch["document_ids"][b]
            for seg in torch.unique(doc_ids).tolist():
                where = (doc_ids == seg).nonzero().flatten()
                assert torch.equal(where, torch.arange(where[0], where[-1] + 1)), "segments are contiguous"
                aux = batch["aux_hidden_states"][b, where]
                pos_ids = batch["position_ids"][b, where]
                assert torch.equal(pos_ids, torch.arange(len(where))), "positions restart per segment"
                if aux[0, 0] == 0 and aux[0, 1] == 0 and aux.abs().sum() == 0:   # the padding document
                    assert not batch["loss_mask"][b, where].any()
                    continue
                doc = by_sample[int(aux[0, 0])]
                n = len(doc["input_ids"])
                ts = aux[:, 1].long()
                assert int(ts[0]) % seq_len == 0 and torch.equal(ts, ts[0] + pos_ids)
                for i, t in zip(where.tolist(), ts.tolist()):
                    assert torch.equal(batch["aux_hidden_states"][b, i], doc["aux_hidden_states"][t])
                    assert batch["input_ids"][b, i] == doc["input_ids"][t + 1]
                    want_mask = bool(doc["loss_mask"][t + 2]) if t + 2 < n else False
                    assert bool(batch["loss_mask"][b, i]) == want_mask
                    if kind == "topk":
                        assert torch.equal(batch["teacher_topk_ids"][b, i], doc["teacher_topk_ids"][t + 1].long())
                        assert torch.equal(batch["teacher_topk_logprobs"][b, i], doc["teacher_topk_logprobs"][t + 1])
                    elif kind == "argmax":
                        assert batch["teacher_argmax"][b, i] == doc["teacher_argmax"][t + 1]
                    else:
                        assert torch.equal(batch["teacher_probs"][b, i], doc["teacher_probs"][t + 1])
                    seen.append((doc["sample_index"], t))
    return seen


@pytest.mark.parametrize("kind", ["topk", "argmax", "softmax"])
def test_packed_batches_match_plain_per_document_reference(tmp_path, kind):
    docs = make_documents(LENGTHS, V, kind=kind)
    root = write_dump(tmp_path / "dump", docs, V, kind=kind)
    _, loader, _ = make_loader(root, kind=kind, drop_last=False)
    batches = all_batches(loader)
    assert all(b["input_ids"].shape == (2, 8) for b, _ in batches)
    seen = check_against_reference(batches, docs, 8, kind)
    expected = [(d["sample_index"], t) for d in docs for t in range(len(d["input_ids"]) - 1)]
    assert sorted(seen) == sorted(expected), "every position of every document exactly once"
    assert loader.chunks.short_documents == 1 and loader.chunks.split_documents == sum(n - 1 > 8 for n in LENGTHS)


def test_truncate_keeps_first_positions_and_reports_drops(tmp_path):
    docs = make_documents(LENGTHS, V)
    root = write_dump(tmp_path / "dump", docs, V)
    _, loader, _ = make_loader(root, long_sequences="truncate", drop_last=False)
    seen = check_against_reference(all_batches(loader), docs, 8, "topk")
    expected = [(d["sample_index"], t) for d in docs for t in range(min(len(d["input_ids"]) - 1, 8))]
    assert sorted(seen) == sorted(expected)
    report = loader.chunks.report()
    assert report["truncated_documents"] == sum(n - 1 > 8 for n in LENGTHS)
    assert report["dropped_positions"] == sum(max(n - 1 - 8, 0) for n in LENGTHS)


def test_valid_counts_follow_mask_teacher_and_depth(tmp_path):
    docs = make_documents(LENGTHS, V)
    root = write_dump(tmp_path / "dump", docs, V)
    _, loader, _ = make_loader(root, drop_last=False)
    for batch, counts in all_batches(loader):
        t2d = loader.t2d
        for j in range(3):
            want = 0
            for b in range(batch["input_ids"].shape[0]):
                for i in range(batch["input_ids"].shape[1]):
                    ids = batch["teacher_topk_ids"][b, i].tolist()
                    inside = any(t2d[x] for x in ids)
                    want += bool(batch["loss_mask"][b, i]) and inside and int(batch["position_ids"][b, i]) >= j
            assert counts[j] == want


def test_plan_is_deterministic_per_seed_and_epoch(tmp_path):
    root = write_dump(tmp_path / "dump", make_documents(LENGTHS, V), V)
    index = DumpIndex(root)
    chunks = make_chunks(index, np.arange(index.num_documents), 8)
    assert epoch_rows(chunks, 8, 1, 0) == epoch_rows(chunks, 8, 1, 0)
    assert epoch_rows(chunks, 8, 1, 0) != epoch_rows(chunks, 8, 1, 1)
    for rows in (epoch_rows(chunks, 8, 1, 0), epoch_rows(chunks, 8, 2, 5)):
        assert all(sum(chunks.count[c] for c in row) <= 8 for row in rows)
        assert sorted(c for row in rows for c in row) == list(range(len(chunks.doc)))


def test_ranks_and_accumulation_cover_the_same_rows_as_one_big_batch(tmp_path):
    root = write_dump(tmp_path / "dump", make_documents(LENGTHS * 3, V), V)
    _, single, _ = make_loader(root, batch_size=4)
    rows = single.rows(0)
    for step in range(single.steps_per_epoch()):
        want = sorted(map(tuple, single.micro_rows(rows, step, 0)))
        got = []
        for rank in range(2):
            _, part, _ = make_loader(root, batch_size=1, world_size=2, rank=rank, grad_accum=2)
            assert part.steps_per_epoch() == single.steps_per_epoch()
            for m in range(2):
                got += list(map(tuple, part.micro_rows(part.rows(0), step, m)))
        assert sorted(got) == want


def test_resume_from_saved_position_gives_the_same_batches(tmp_path):
    root = write_dump(tmp_path / "dump", make_documents(LENGTHS * 2, V), V)
    _, full, _ = make_loader(root)
    reference = [mb[0][0]["aux_hidden_states"].clone() for mb in full]
    _, first, _ = make_loader(root)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 0, "step": 3}
    _, resumed, _ = make_loader(root, num_workers=2)
    resumed.load_state_dict(state)
    rest = [mb[0][0]["aux_hidden_states"] for mb in resumed]
    assert len(rest) == len(reference) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[3:]))
    assert resumed.state_dict() == {"epoch": 1, "step": 0}
    next_epoch = [mb[0][0]["aux_hidden_states"] for mb in resumed]
    assert len(next_epoch) == len(reference) and not all(torch.equal(a, b) for a, b in zip(next_epoch, reference))


def test_held_out_split_is_by_document_and_stable(tmp_path):
    root = write_dump(tmp_path / "dump", make_documents(LENGTHS * 3, V), V)
    index = DumpIndex(root)
    train, held = index.split(0.25, seed=3)
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == index.num_documents
    assert 0 < len(held) < index.num_documents
    again = DumpIndex(write_dump(tmp_path / "dump2", make_documents(LENGTHS * 3, V), V, num_shards=3))
    assert sorted(index.sample_index[held]) == sorted(again.sample_index[again.split(0.25, seed=3)[1]])


def test_worker_errors_reach_the_consumer():
    def produce(i, key):
        if key == 3:
            raise RuntimeError("bad part")
        return key

    got = []
    with pytest.raises(RuntimeError, match="bad part"):
        for key, value in _prefetched(list(range(6)), produce, 2, 1):
            got.append(value)
    assert got == [0, 1, 2]


def test_reused_buffers_give_the_same_batches(tmp_path):
    root = write_dump(tmp_path / "dump", make_documents(LENGTHS * 3, V), V)
    _, fresh, _ = make_loader(root, drop_last=False)
    _, pooled, _ = make_loader(root, drop_last=False, reuse_buffers=True, num_workers=2, grad_accum=2)
    want = [{k: v.clone() for k, v in b.items()} for b, _ in all_batches(fresh)]
    got = []
    for step in pooled:  # a consumer that is done with a step before asking for the next, like the trainer
        got += [{k: v.clone() for k, v in b.items()} for b, _ in step]
    assert len(pooled._buffers) > 1 and len(got) >= len(want) - 1
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind,aux_dtype", [("topk", torch.bfloat16), ("argmax", torch.float16),
                                            ("softmax", torch.float32)])
def test_workers_give_the_batches_of_one_worker_and_the_reference(tmp_path, kind, aux_dtype):
    """Batches built by 1, 2 or 3 threads (reads in file order, stored bytes of any element size) are identical,
    and equal the plain per-document reference."""
    docs = make_documents(LENGTHS * 2, V, kind=kind)
    for d in docs:
        d["aux_hidden_states"] = d["aux_hidden_states"].to(aux_dtype)
    root = write_dump(tmp_path / "dump", docs, V, kind=kind)
    runs = []
    for workers in (1, 2, 3):
        _, loader, _ = make_loader(root, kind=kind, drop_last=False, num_workers=workers, batch_size=3)
        runs.append([({k: v.clone() for k, v in b.items()}, c.clone()) for b, c in all_batches(loader)])
    assert runs[0][0][0]["aux_hidden_states"].dtype == aux_dtype
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for (a, ca), (b, cb) in zip(runs[0], other):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ca, cb)
    seen = check_against_reference(runs[2], docs, 8, kind)
    assert sorted(seen) == sorted((d["sample_index"], t) for d in docs for t in range(len(d["input_ids"]) - 1))


def test_truncated_part_is_reported_with_its_path(tmp_path):
    root = write_dump(tmp_path / "dump", make_documents(LENGTHS, V), V)
    index = DumpIndex(root)
    path = index.parts[0]
    f = PartFile(path)
    n = index.length[0]
    out = torch.empty(n, *f.shape("aux_hidden_states")[1:], dtype=f.dtype("aux_hidden_states"))
    f.read_rows("aux_hidden_states", 0, n, out, PartReader(index).scratch)
    assert torch.equal(out[:, 0], torch.zeros(n)) and torch.equal(out[:, 1], torch.arange(n, dtype=out.dtype))
    f.close()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 16])   # the last tensor loses its tail
    f = PartFile(path)
    last = max(f._tensors, key=lambda name: f._tensors[name][2])
    rows = f.shape(last)[0]
    with pytest.raises(StageError, match=f"{path.name}: ends at byte .* inside {last}"):
        f.read_rows(last, 0, rows, torch.empty(f.shape(last), dtype=f.dtype(last)), PartReader(index).scratch)
    path.write_bytes(data[:5])
    with pytest.raises(StageError, match=path.name):
        PartFile(path)
