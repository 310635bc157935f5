"""Training-time test: TTT logits equal the engines' chain drafting; packing isolation; attention paths agree."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from draft_testing import (documents, engine_chain_logits, packed_batch, random_draft, rel_err,
                           tiny_cfg)
from eagle.config import DRAFT_ARCHS
from eagle.model import Eagle3Draft
from eagle.ttt import ttt_forward, ttt_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def compare_with_engine(model, cfg, batch, steps, position_shift=0, engine_model=None) -> float:
    """Worst relative error between TTT logits at (j, t) and the engine's step j with n = t - j (the engine runs
    `engine_model`, default `model`)."""
    with torch.no_grad():
        ttt = ttt_forward(model, batch, steps, attention="dense")  # steps x (B, T, Vd)
    engine_model = engine_model or model
    worst, compared = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        for start, length in documents(batch, row):
            aux = batch["aux_hidden_states"][row:row + 1, start:start + length]
            ids = batch["input_ids"][row:row + 1, start:start + length]
            for n in range(length):  # one engine run per n covers (j, t = n + j) for every j
                engine = engine_chain_logits(engine_model, engine_model.cfg, aux, ids, n, steps, position_shift)
                for j, logits in enumerate(engine):
                    worst = max(worst, rel_err(ttt[j][row, start + n + j], logits))
                    compared += 1
    expected = sum(min(steps, length - n) for row in range(batch["input_ids"].shape[0])
                   for _, length in documents(batch, row) for n in range(length))
    assert compared == expected  # every valid (j, t) was checked
    return worst


# one case per RoPE the draft can take: (rope_theta, rope_scaling), scaled so that positions < 34 feel it
ROPES = {
    "default": (10000.0, None),
    "linear": (100.0, {"rope_type": "linear", "factor": 2.0}),
    "llama3": (100.0, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}),
    "yarn": (100.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
                     "beta_slow": 1.0, "truncate": False}),
}


def test_every_rope_type_has_a_train_serve_case():
    from eagle.rope import SUPPORTED_ROPE_TYPES, RotaryEmbedding

    assert set(ROPES) == set(SUPPORTED_ROPE_TYPES)
    positions = torch.arange(34)[None]
    for kind, (theta, scaling) in ROPES.items():
        if scaling is not None:  # the case rotates differently from plain RoPE with its theta
            plain, scaled = RotaryEmbedding(8, theta)(positions), RotaryEmbedding(8, theta, scaling)(positions)
            assert (plain[0] - scaled[0]).abs().max() > 0.1, kind


@pytest.mark.parametrize("arch", list(DRAFT_ARCHS))
@pytest.mark.parametrize("kv_heads, rope", [(2, "default"), (4, "default"), (2, "linear"), (2, "llama3"),
                                            (4, "yarn")])
def test_ttt_logits_equal_engine_chain_drafting(kv_heads, rope, arch):
    theta, scaling = ROPES[rope]
    cfg = tiny_cfg(num_key_value_heads=kv_heads, rope_theta=theta, rope_scaling=scaling, **DRAFT_ARCHS[arch])
    model = random_draft(cfg, seed=1)
    batch = packed_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=2)  # 29 positions + padding per row
    assert compare_with_engine(model, cfg, batch, steps=4) <= 1e-5


def test_engine_comparison_detects_the_wrong_feedback_state():
    """EAGLE-3.1 trained with post-norm feedback but drafted with the pre-norm state (the train/serve mismatch one
    public trainer shipped) fails the equality check, at every step after the first and only there."""
    cfg = tiny_cfg(**DRAFT_ARCHS["eagle3.1"])
    model = random_draft(cfg, seed=1)
    pre_norm = Eagle3Draft(dataclasses.replace(cfg, norm_output=False))
    pre_norm.load_state_dict(model.state_dict())
    batch = packed_batch(cfg, [9, 7], T=16, seed=3)
    assert compare_with_engine(model, cfg, batch, steps=1, engine_model=pre_norm) <= 1e-5
    assert compare_with_engine(model, cfg, batch, steps=3, engine_model=pre_norm) > 1e-3


def test_engine_comparison_detects_a_position_off_by_one():
    """The equality check is sensitive: RoPE positions off by one at steps >= 1 (a known trainer bug) fail it."""
    cfg = tiny_cfg()
    model = random_draft(cfg, seed=1)
    batch = packed_batch(cfg, [9, 7], T=16, seed=3)
    assert compare_with_engine(model, cfg, batch, steps=3, position_shift=-1) > 1e-3


def test_ttt_steps_differ_and_depend_on_previous_hidden():
    """Step j really uses out^{j-1}: logits change across steps at the same position."""
    cfg = tiny_cfg()
    model = random_draft(cfg)
    batch = packed_batch(cfg, [12], T=12)
    with torch.no_grad():
        logits = ttt_forward(model, batch, 3, attention="dense")
    assert rel_err(logits[1][0, 5:], logits[0][0, 5:]) > 1e-2
    assert rel_err(logits[2][0, 5:], logits[1][0, 5:]) > 1e-2


def alone(batch: dict, row: int, start: int, length: int, T: int) -> dict:
    """The document [start, start+length) of `row` moved to the front of a fresh padded row of length T."""
    out = {}
    for key, value in batch.items():
        piece = value[row:row + 1, start:start + length]
        fill = {"document_ids": 1000, "position_ids": 0, "loss_mask": False}.get(key, 0)
        pad = torch.full((1, T - length) + tuple(value.shape[2:]), fill, dtype=value.dtype)
        out[key] = torch.cat([piece, pad], dim=1)
    return out


@pytest.mark.parametrize("arch", list(DRAFT_ARCHS))
def test_packing_does_not_change_a_documents_outputs_or_loss(arch):
    cfg = tiny_cfg(**DRAFT_ARCHS[arch])
    model = random_draft(cfg, seed=4)
    steps, T = 4, 30
    batch = packed_batch(cfg, [6, 11, 8], T=T, seed=5)
    (start, length) = documents(batch)[1]  # the middle document, preceded and followed by others
    single = alone(batch, 0, start, length, T)
    only_doc = dict(batch, loss_mask=batch["loss_mask"] & (batch["document_ids"] == batch["document_ids"][0, start]))
    normalizer = torch.full((steps,), 7.0)
    with torch.no_grad():
        packed_logits = ttt_forward(model, batch, steps, attention="dense")
        single_logits = ttt_forward(model, single, steps, attention="dense")
        packed_loss, packed_metrics = ttt_loss(model, only_doc, steps, normalizer, "topk", attention="dense")
        single_loss, single_metrics = ttt_loss(model, single, steps, normalizer, "topk", attention="dense")
    for j in range(steps):  # every position of the document, valid or not, ignores its neighbours
        torch.testing.assert_close(packed_logits[j][0, start:start + length], single_logits[j][0, :length],
                                   rtol=1e-5, atol=1e-5)
    assert single_metrics["valid"].sum() > 0
    torch.testing.assert_close(packed_loss, single_loss, rtol=1e-5, atol=1e-6)
    for key in ("ce_sum", "correct", "valid"):
        torch.testing.assert_close(packed_metrics[key], single_metrics[key], rtol=1e-5, atol=1e-5)


def test_loss_is_the_decayed_sum_of_per_step_cross_entropy():
    """ttt_loss = sum_j decay**j ce_sum_j / normalizer_j, with validity loss_mask & position >= j."""
    cfg = tiny_cfg()
    model = random_draft(cfg, seed=6)
    steps = 3
    batch = packed_batch(cfg, [5, 9, 2], T=18, rows=2, seed=7)
    target_ids = batch["teacher_topk_ids"][..., 0]
    batch["teacher_argmax"] = target_ids
    normalizer = torch.tensor([11.0, 9.0, 0.0])  # a zero normalizer must not produce inf/NaN
    with torch.no_grad():
        loss, metrics = ttt_loss(model, batch, steps, normalizer, "argmax", decay=0.5, attention="dense")
        logits = ttt_forward(model, batch, steps, attention="dense")
    # plain float64 recomputation: hard CE on the teacher argmax, mapped into the draft vocab (dropped outside)
    draft_of = {int(t): d for d, t in enumerate((torch.arange(cfg.draft_vocab_size) + model.d2t).tolist())}
    expected, pos = 0.0, batch["position_ids"]
    for j in range(steps):
        ce, valid_count, correct = 0.0, 0, 0
        logp = torch.log_softmax(logits[j].double(), -1)
        for b in range(2):
            for t in range(18):
                tid = int(target_ids[b, t])
                if not (batch["loss_mask"][b, t] and pos[b, t] >= j and tid in draft_of):
                    continue
                ce -= float(logp[b, t, draft_of[tid]])
                valid_count += 1
                correct += int(model.draft_to_target(logits[j][b, t].argmax()) == tid)
        assert metrics["valid"][j].item() == valid_count
        assert metrics["correct"][j].item() == correct
        assert metrics["ce_sum"][j].item() == pytest.approx(ce, rel=1e-5)
        expected += 0.5 ** j * ce / max(float(normalizer[j]), 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["valid"][1] < metrics["valid"][0]  # position >= j removes document starts at later steps


def test_flex_mask_matches_dense_path_on_cpu():
    """The FlexAttention path (mask_mod + BlockMask, unfused reference kernel on CPU) equals the dense path.

    The fused, compiled flex kernel is checked against the dense path on CUDA (forward and backward) below;
    compiled CPU flex takes minutes per shape on a small CPU, so it is not part of the CPU suite.
    """
    import eagle.attention as attention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cfg = tiny_cfg()
    model = random_draft(cfg, seed=8)
    batch = packed_batch(cfg, [7, 10, 4], T=24, rows=2, seed=9)
    saved = attention._flex_fns
    attention._flex_fns = lambda device: (flex_attention, create_block_mask)  # unfused eager kernels
    try:
        with torch.no_grad(), pytest.warns(UserWarning):
            flex = ttt_forward(model, batch, 3, attention="flex")
    finally:
        attention._flex_fns = saved
    with torch.no_grad():
        dense = ttt_forward(model, batch, 3, attention="dense")
    for j in range(3):
        assert rel_err(flex[j], dense[j]) <= 1e-5


def test_invalid_settings_raise():
    cfg = tiny_cfg()
    model = random_draft(cfg)
    batch = packed_batch(cfg, [5], T=6)
    with pytest.raises(ValueError, match="steps"):
        ttt_forward(model, batch, 0, attention="dense")
    with pytest.raises(ValueError, match="attention"):
        ttt_forward(model, batch, 2, attention="triangular")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            ttt_forward(model, batch, 2, attention="flex")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_flex_matches_dense_forward_and_backward_on_cuda(kv_heads):
    cfg = tiny_cfg(num_key_value_heads=kv_heads, hidden_size=64, num_attention_heads=4, head_dim=16)
    steps = 4
    batch = {k: v.cuda() for k, v in packed_batch(cfg, [70, 130, 33, 20], T=256, rows=2, seed=10).items()}
    normalizer = torch.full((steps,), 100.0, device="cuda")
    results = {}
    for kind in ("dense", "flex"):
        model = random_draft(cfg, seed=11).cuda()
        loss, metrics = ttt_loss(model, batch, steps, normalizer, "topk", attention=kind)
        loss.backward()
        logits = ttt_forward(model, batch, steps, attention=kind)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kind] = (loss.detach(), [x.detach() for x in logits], grads, metrics)
    (l_d, lg_d, g_d, m_d), (l_f, lg_f, g_f, m_f) = results["dense"], results["flex"]
    torch.testing.assert_close(l_f, l_d, rtol=1e-4, atol=1e-5)
    for a, b in zip(lg_f, lg_d):
        assert rel_err(a, b) <= 1e-4
    assert g_f.keys() == g_d.keys() and len(g_d) > 0
    for name in g_d:
        assert rel_err(g_f[name], g_d[name]) <= 1e-3, name
    torch.testing.assert_close(m_f["valid"], m_d["valid"])
