"""draft_cross_entropy against a float64 reference written plainly (explicit loops), for every teacher kind.

The teacher deliberately puts mass outside the draft vocabulary, and some positions keep no mass at all
(they must drop out). Gradients are compared too, and the function must compile with fullgraph=True.
"""
from __future__ import annotations

import math

import pytest
import torch

from eagle.loss import draft_cross_entropy, simulated_acceptance_length
from eagle.vocab import build_vocab_map, target_to_draft_index

B, T, V, VD, K = 2, 6, 40, 16, 4


def make_vocab():
    counts = torch.randint(0, 1000, (V,), generator=torch.Generator().manual_seed(0))
    d2t, t2d = build_vocab_map(counts, VD)
    return d2t, t2d, target_to_draft_index(t2d)


def make_teacher(t2d, seed=1):
    """Full teacher distribution [B,T,V] float64 with forced cases: position (0,1) has all its top-k outside
    the draft vocab, position (1,2) has its argmax outside but other kept mass."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.5
    logits[..., t2d] += 1.5  # the draft vocab holds the frequent tokens: the teacher favours them
    outside = torch.nonzero(~t2d).flatten()
    inside = torch.nonzero(t2d).flatten()
    logits[0, 1, outside[:K]] = 30.0 + torch.arange(K, dtype=torch.float64)  # top-k entirely outside
    logits[1, 2, outside[K]] = 12.0                                          # argmax outside
    logits[1, 2, inside[3]] = 11.0
    probs = torch.softmax(logits, dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = torch.topk(logprobs, K, dim=-1)
    return probs, top_ids, top_lp


def make_batch(t2d, seed=1):
    probs, top_ids, top_lp = make_teacher(t2d, seed)
    return {
        "teacher_topk_ids": top_ids.to(torch.int32),             # stored as int32 in shards
        "teacher_topk_logprobs": top_lp.float(),
        "teacher_argmax": probs.argmax(-1),
        "teacher_probs": probs.float(),
    }


def make_valid():
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 4] = False
    valid[1, 0] = False
    return valid


def reference(logits, batch, valid, d2t, t2d, kind):
    """Plain float64 loops: returns (ce_sum, correct, count)."""
    draft_targets = [i + int(d2t[i]) for i in range(VD)]        # draft id -> target id
    ce_sum = torch.zeros((), dtype=torch.float64)
    correct = count = 0
    for b in range(B):
        for t in range(T):
            if not valid[b, t]:
                continue
            row = logits[b, t].double()
            lse = torch.log(sum(torch.exp(row[i]) for i in range(VD)))
            if kind == "topk":
                pairs = [(int(batch["teacher_topk_ids"][b, t, j]), math.exp(float(batch["teacher_topk_logprobs"][b, t, j])))
                         for j in range(K)]
                teacher_argmax = pairs[0][0]
            elif kind == "argmax":
                teacher_argmax = int(batch["teacher_argmax"][b, t])
                pairs = [(teacher_argmax, 1.0)]
            else:
                p = batch["teacher_probs"][b, t].double()
                pairs = [(i, float(p[i])) for i in range(V)]
                teacher_argmax = max(range(V), key=lambda i: (float(p[i]), -i))
            kept = [(draft_targets.index(tid), p) for tid, p in pairs if tid in draft_targets]
            mass = sum(p for _, p in kept)
            if mass <= 0:
                continue
            count += 1
            for did, p in kept:
                ce_sum = ce_sum - (p / mass) * (row[did] - lse)
            best = max(range(VD), key=lambda i: (float(row[i].detach()), -i))
            correct += int(draft_targets[best] == teacher_argmax)
    return ce_sum, correct, count


@pytest.mark.parametrize("kind", ["topk", "argmax", "softmax"])
def test_matches_float64_reference_with_gradients(kind):
    d2t, t2d, t2d_index = make_vocab()
    batch, valid = make_batch(t2d), make_valid()
    logits = torch.randn(B, T, VD, generator=torch.Generator().manual_seed(3)) * 2
    logits_impl = logits.clone().requires_grad_(True)
    ce, correct, count = draft_cross_entropy(logits_impl, batch, valid, t2d_index, d2t, kind)
    logits_ref = logits.double().requires_grad_(True)
    ce_ref, correct_ref, count_ref = reference(logits_ref, batch, valid, d2t, t2d, kind)

    if kind == "softmax":
        assert count_ref == int(valid.sum())  # the full distribution always keeps some mass
    else:
        assert count_ref < int(valid.sum())  # (0,1) keeps no mass (topk) / has its argmax outside (argmax)
    if kind == "topk":  # the fixture must exercise partial kept mass, not just all-or-nothing
        kept = t2d[batch["teacher_topk_ids"].long()]
        assert bool((kept.any(-1) & ~kept.all(-1) & valid).any())
    assert ce.dtype == correct.dtype == count.dtype == torch.float32
    assert ce.shape == correct.shape == count.shape == ()
    torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=1e-5, atol=1e-5)
    assert int(count) == count_ref and int(correct) == correct_ref
    ce.backward()
    ce_ref.backward()
    torch.testing.assert_close(logits_impl.grad.double(), logits_ref.grad, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_matches_with_planted_predictions():
    """Make the draft predict the teacher argmax at chosen positions: correct counts exactly those."""
    d2t, t2d, t2d_index = make_vocab()
    batch, valid = make_batch(t2d), make_valid()
    logits = torch.zeros(B, T, VD)
    planted = [(0, 2), (1, 1), (1, 5)]
    for b, t in planted:
        did = int(t2d_index[int(batch["teacher_topk_ids"][b, t, 0])])
        assert did >= 0, "fixture: planted positions must have their argmax inside the draft vocab"
        logits[b, t, did] = 5.0
    for b in range(B):  # elsewhere: the draft prefers some id that is not the teacher argmax
        for t in range(T):
            if (b, t) not in planted:
                wrong = next(i for i in range(VD) if i + int(d2t[i]) != int(batch["teacher_topk_ids"][b, t, 0]))
                logits[b, t, wrong] = 5.0
    for kind in ("topk", "argmax", "softmax"):
        _, correct, _ = draft_cross_entropy(logits, batch, valid, t2d_index, d2t, kind)
        assert int(correct) == len(planted)


def test_zero_kept_mass_positions_drop_out_and_stay_finite():
    d2t, t2d, t2d_index = make_vocab()
    batch = make_batch(t2d)
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[0, 1] = True  # the position whose whole top-k lies outside the draft vocab
    logits = torch.randn(B, T, VD, requires_grad=True)
    for kind in ("topk", "argmax"):
        ce, correct, count = draft_cross_entropy(logits, batch, valid, t2d_index, d2t, kind)
        assert float(ce.detach()) == 0.0 and int(count) == 0 and int(correct) == 0
        ce.backward()
        assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0
        logits.grad = None


def test_padding_garbage_does_not_leak():
    """Invalid positions may hold NaN / -inf teacher values (padding): the result must not change."""
    d2t, t2d, t2d_index = make_vocab()
    batch, valid = make_batch(t2d), make_valid()
    logits = torch.randn(B, T, VD)
    dirty = {k: v.clone() for k, v in batch.items()}
    dirty["teacher_topk_logprobs"][0, 4] = float("nan")
    dirty["teacher_topk_logprobs"][1, 0] = float("-inf")
    dirty["teacher_probs"][0, 4] = float("nan")
    for kind in ("topk", "argmax", "softmax"):
        clean_out = draft_cross_entropy(logits, batch, valid, t2d_index, d2t, kind)
        dirty_out = draft_cross_entropy(logits, dirty, valid, t2d_index, d2t, kind)
        for a, b in zip(clean_out, dirty_out):
            assert torch.isfinite(b) and torch.equal(a, b)


def test_low_precision_inputs_computed_in_float32():
    d2t, t2d, t2d_index = make_vocab()
    batch, valid = make_batch(t2d), make_valid()
    batch["teacher_probs"] = batch["teacher_probs"].bfloat16()
    logits = (torch.randn(B, T, VD) * 2).bfloat16()
    for kind in ("topk", "argmax", "softmax"):
        ce, _, _ = draft_cross_entropy(logits, batch, valid, t2d_index, d2t, kind)
        ref_batch = dict(batch, teacher_probs=batch["teacher_probs"].double())
        ce_ref, _, _ = reference(logits.double(), ref_batch, valid, d2t, t2d, kind)
        assert ce.dtype == torch.float32
        torch.testing.assert_close(ce.double(), ce_ref, rtol=1e-5, atol=1e-4)


def test_unknown_teacher_kind():
    d2t, t2d, t2d_index = make_vocab()
    with pytest.raises(ValueError, match="teacher_kind"):
        draft_cross_entropy(torch.zeros(B, T, VD), {}, make_valid(), t2d_index, d2t, "logits")


@pytest.mark.parametrize("kind", ["topk", "argmax", "softmax"])
def test_compiles_fullgraph_without_recompiling(kind):
    import torch._dynamo

    torch._dynamo.reset()
    d2t, t2d, t2d_index = make_vocab()
    valid = make_valid()
    fn = torch.compile(draft_cross_entropy, fullgraph=True, backend="aot_eager", dynamic=False)
    for seed in (1, 2):  # a second batch of the same shape must reuse the graph
        batch = make_batch(t2d, seed)
        logits = torch.randn(B, T, VD, generator=torch.Generator().manual_seed(seed))
        with torch._dynamo.config.patch(error_on_recompile=seed == 2):
            out = fn(logits, batch, valid, t2d_index, d2t, kind)
        eager = draft_cross_entropy(logits, batch, valid, t2d_index, d2t, kind)
        for a, b in zip(out, eager):
            torch.testing.assert_close(a, b)


def test_simulated_acceptance_length():
    acc = torch.tensor([0.8, 0.5, 0.25, 0.0, 0.9])
    expected, running = 1.0, 1.0
    for a in acc.tolist():
        running *= a
        expected += running
    got = simulated_acceptance_length(acc)
    assert got.shape == () and abs(float(got) - expected) < 1e-6
    assert float(simulated_acceptance_length(torch.ones(7))) == 8.0
    assert float(simulated_acceptance_length(torch.zeros(7))) == 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["topk", "argmax", "softmax"])
def test_inductor_on_cuda_matches_reference(kind):
    """The inductor-compiled loss on GPU computes the same function (value, counts, gradient) as the reference."""
    import torch._dynamo

    torch._dynamo.reset()
    d2t, t2d, t2d_index = make_vocab()
    batch, valid = make_batch(t2d), make_valid()
    logits = torch.randn(B, T, VD, generator=torch.Generator().manual_seed(3)) * 2
    ce_ref, correct_ref, count_ref = reference(logits.double().requires_grad_(True), batch, valid, d2t, t2d, kind)
    dev = torch.device("cuda")
    fn = torch.compile(draft_cross_entropy, fullgraph=True)
    x = logits.to(dev).requires_grad_(True)
    ce, correct, count = fn(x, {k: v.to(dev) for k, v in batch.items()}, valid.to(dev), t2d_index.to(dev),
                            d2t.to(dev), kind)
    torch.testing.assert_close(ce.double().cpu(), ce_ref.detach(), rtol=1e-5, atol=1e-5)
    assert int(correct) == correct_ref and int(count) == count_ref
    ce.backward()
    x_eager = logits.to(dev).requires_grad_(True)
    draft_cross_entropy(x_eager, {k: v.to(dev) for k, v in batch.items()}, valid.to(dev), t2d_index.to(dev),
                        d2t.to(dev), kind)[0].backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-6)
