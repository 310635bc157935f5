"""torch.compile: the whole TTT forward + loss + metrics is one graph (fullgraph, zero breaks), is not recompiled
for a second batch of the same shape, and computes the same loss, metrics and gradients as eager."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from draft_testing import packed_batch, random_draft, rel_err, tiny_cfg
from eagle.config import DRAFT_ARCHS
from eagle.ttt import ttt_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3


def small_cfg(arch="eagle3"):
    return tiny_cfg(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=24,
                    vocab_size=40, draft_vocab_size=30, target_hidden_size=8, **DRAFT_ARCHS[arch])


def with_teachers(batch, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    batch["teacher_argmax"] = batch["teacher_topk_ids"][..., 0]
    batch["teacher_probs"] = torch.softmax(2 * torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=g), -1)
    return batch


def train_step(model, batch, normalizer, teacher_kind="topk"):
    return ttt_loss(model, batch, STEPS, normalizer, teacher_kind, decay=0.8, attention="dense")


@pytest.mark.parametrize("teacher_kind, arch", [("topk", "eagle3"), ("argmax", "eagle3"), ("softmax", "eagle3"),
                                                ("topk", "eagle3.1")])
def test_ttt_loss_traces_as_one_graph(teacher_kind, arch):
    cfg = small_cfg(arch)
    model = random_draft(cfg)
    batch = with_teachers(packed_batch(cfg, [5, 7, 3], T=16, seed=1), cfg, 1)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(train_step)(model, batch, torch.full((STEPS,), 9.0), teacher_kind)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # inductor compiles forward + backward: ~1.5 min of CPU on 2 cores
@pytest.mark.parametrize("arch", list(DRAFT_ARCHS))
def test_compiled_ttt_matches_eager_without_recompiling(arch):
    cfg = small_cfg(arch)
    model = random_draft(cfg, seed=2)
    normalizer = torch.full((STEPS,), 9.0)
    batches = [packed_batch(cfg, [5, 7, 3], T=16, rows=2, seed=3), packed_batch(cfg, [9, 6], T=16, rows=2, seed=4)]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, backend=counter, fullgraph=True)

    def run(fn, batch):
        model.zero_grad(set_to_none=True)
        loss, metrics = fn(model, batch, normalizer)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), metrics, grads

    for batch in batches:
        eager_loss, eager_metrics, eager_grads = run(train_step, batch)
        loss, metrics, grads = run(compiled, batch)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for key in ("ce_sum", "correct", "valid"):
            torch.testing.assert_close(metrics[key], eager_metrics[key], rtol=1e-5, atol=1e-5)
        # every trainable tensor got a gradient (EAGLE-3.1: also the three fc_norm weights)
        assert grads.keys() == eager_grads.keys() and len(grads) == 13 + 3 * cfg.fc_norm
        for name, grad in grads.items():
            assert rel_err(grad, eager_grads[name]) <= 1e-4, name
    assert counter.frame_count == 1  # the second batch of the same shape reused the first compilation
    assert eager_metrics["valid"][0] > 0 and torch.isfinite(eager_loss)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", list(DRAFT_ARCHS))
def test_compiled_flex_ttt_matches_eager_dense_on_cuda(arch):
    """The GPU training path (FlexAttention inside one fullgraph compile) equals the eager dense path."""
    cfg = tiny_cfg(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **DRAFT_ARCHS[arch])
    model = random_draft(cfg, seed=5).cuda()
    normalizer = torch.full((STEPS,), 50.0, device="cuda")
    batches = [{k: v.cuda() for k, v in packed_batch(cfg, lengths, T=192, rows=2, seed=seed).items()}
               for seed, lengths in ((6, [100, 50, 30]), (7, [64, 64, 60]))]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda m, b, n: ttt_loss(m, b, STEPS, n, "topk", attention="flex"),
                             backend=counter, fullgraph=True)
    for batch in batches:
        results = []
        for fn in (compiled, lambda m, b, n: ttt_loss(m, b, STEPS, n, "topk", attention="dense")):
            model.zero_grad(set_to_none=True)
            loss, metrics = fn(model, batch, normalizer)
            loss.backward()
            results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.requires_grad}))
        (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(metrics["valid"], ref_metrics["valid"])
        for name in ref_grads:
            assert rel_err(grads[name], ref_grads[name]) <= 1e-3, name
    assert counter.frame_count == 1


def fp8_batch(cfg, seed):
    """A packed batch whose aux states are stored FP8 + per-token scales, as the loader hands them over."""
    from stages.shards.aux import quantize_fp8

    batch = packed_batch(cfg, [5, 7, 3], T=16, rows=2, seed=seed)
    aux = batch["aux_hidden_states"]
    q, scales = quantize_fp8(aux.flatten(0, 1))
    batch["aux_hidden_states"], batch["aux_scales"] = q.view(aux.shape), scales.view(*aux.shape[:2], 3)
    return batch


def test_step_with_fp8_input_traces_as_one_graph_and_equals_the_dequantized_batch():
    """The dequantization is part of the step's graph (no break, no host sync) and feeds the same loss as
    dequantizing the batch first."""
    from stages.shards.aux import dequantize_batch
    from stages.train.stage import make_step_fn, to_device

    cfg = small_cfg()
    model = random_draft(cfg, seed=3)
    batch, normalizer = fp8_batch(cfg, 8), torch.full((STEPS,), 9.0)
    batch = to_device(batch, torch.device("cpu"), torch.float32)  # as training hands it over: uint8 bits
    step_fn = make_step_fn(STEPS, "topk", 0.8, "dense", torch.device("cpu"), compile_=False, precision="fp32")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step_fn)(model, batch, normalizer)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    loss, metrics = step_fn(model, batch, normalizer)
    want_loss, want_metrics = train_step(model, dequantize_batch(batch), normalizer)
    assert torch.equal(loss, want_loss) and torch.equal(metrics["ce_sum"], want_metrics["ce_sum"])


def test_compiled_dequantization_equals_eager():
    """On what training hands the step (to_device: FP8 as uint8 bits), compiled equals eager bitwise."""
    from stages.shards.aux import dequantize_batch
    from stages.train.stage import to_device

    batch = fp8_batch(small_cfg(), 9)
    on_device = to_device(batch, torch.device("cpu"), torch.float32)
    assert on_device["aux_hidden_states"].dtype == torch.uint8
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(dequantize_batch, backend=counter, fullgraph=True)
    got, want = compiled(on_device), dequantize_batch(batch)
    assert torch.equal(got["aux_hidden_states"], want["aux_hidden_states"]) and "aux_scales" not in got
    assert counter.frame_count == 1


def test_bf16_step_on_cpu_tracks_the_fp32_step():
    """--precision bf16 (the default on CPUs with AMX): the same loss, metrics and gradients as the fp32 step up to
    bf16 rounding; the fp32 step is the reference."""
    from stages.train.stage import make_step_fn

    cfg = small_cfg()
    batch, normalizer = packed_batch(cfg, [5, 7, 3], T=16, rows=2, seed=4), torch.full((STEPS,), 9.0)
    results = {}
    for precision in ("fp32", "bf16"):
        model = random_draft(cfg, seed=3)
        step_fn = make_step_fn(STEPS, "topk", 0.8, "dense", torch.device("cpu"), compile_=False, precision=precision)
        loss, metrics = step_fn(model, batch, normalizer)
        loss.backward()
        results[precision] = loss.detach(), metrics, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (ref, ref_m, ref_g), (got, got_m, got_g) = results["fp32"], results["bf16"]
    assert not torch.equal(got, ref)  # bf16 really ran
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    assert torch.equal(got_m["valid"], ref_m["valid"])
    for name in ref_g:
        assert rel_err(got_g[name], ref_g[name]) < 5e-2, name


def test_precision_auto_resolves_by_device(monkeypatch):
    from stages.errors import StageError
    from stages.train.setup import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", cpu)[0] == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu)[0] == "fp32"
    assert resolve_precision("auto", torch.device("cuda"))[0] == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == ("fp32", "--precision")
    with pytest.raises(StageError, match="--precision 'fp16'"):
        resolve_precision("fp16", cpu)
