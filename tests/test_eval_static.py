"""`eagle-pipe eval` on static KV caches: the static target against a plain HF forward (through rejected drafts
and crops, sliding windows included), the compiled verification step against the eager one, several K sharing
one greedy reference, and the fallbacks (a cache that outgrows its bound, a cache that cannot be cropped)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_evaluate import make_random_draft, prompts_file, run_eval, write_jsonl  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def target(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def random_draft(tiny_llama, tmp_path_factory) -> Path:
    return make_random_draft(tiny_llama, tmp_path_factory.mktemp("random_draft") / "export")


def reference_logits_and_aux(model, ids, layers):
    """One plain HF forward over the whole sequence, no cache: logits and hidden_states[k] for the aux layers."""
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    return ref.logits, torch.cat([ref.hidden_states[k] for k in sorted(layers)], dim=-1)


def run_with_rejections(wrapped, ids, compiled_len: int):
    """Prefill 12 tokens, verify 3 wrong ones (rejected: cropped away), then the true rest in chunks of
    `compiled_len`: what speculative decoding does to the cache. Returns the logits and aux of the kept tokens."""
    cache = wrapped.new_cache(ids.shape[1] + 8)
    logits, aux = [], []
    out = wrapped.forward(ids[:, :12], cache)
    logits.append(out[0]), aux.append(out[1])
    wrapped.forward((ids[:, 12:12 + compiled_len] + 1) % 50, cache)  # a rejected draft
    wrapped.crop(cache, 12)
    for start in range(12, ids.shape[1], compiled_len):
        out = wrapped.forward(ids[:, start:start + compiled_len], cache)
        logits.append(out[0]), aux.append(out[1])
    return torch.cat(logits, 1), torch.cat(aux, 1)


def test_static_target_equals_a_plain_forward_through_rejected_drafts(target):
    from stages.evaluate.static_target import StaticTarget

    ids = torch.randint(0, target.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    layers = (1, 4, 6)
    ref_logits, ref_aux = reference_logits_and_aux(target, ids, layers)
    wrapped = StaticTarget(target, layers, max_len=64)  # eager
    try:
        logits, aux = run_with_rejections(wrapped, ids, 4)
        # reused for a second prompt: the old entries are masked until overwritten
        logits2, aux2 = run_with_rejections(wrapped, ids, 4)
    finally:
        wrapped.remove()
    for got_logits, got_aux in ((logits, aux), (logits2, aux2)):
        torch.testing.assert_close(got_aux, ref_aux, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="static cache has 64"):
        StaticTarget(target, layers, max_len=64).new_cache(65)


def test_static_target_on_a_sliding_window_model_keeps_the_window():
    """Every layer sliding (window 6 < sequence): the static cache holds all positions (so it can be cropped),
    the mask still applies the window, so the outputs equal a plain forward."""
    from transformers import MistralConfig, MistralForCausalLM

    from stages.evaluate.static_target import StaticTarget, static_full_cache

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                             max_position_embeddings=128)).eval()
    from transformers.cache_utils import StaticLayer

    assert all(type(layer) is StaticLayer for layer in static_full_cache(model.config, 32).layers)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_aux = reference_logits_and_aux(model, ids, (0, 1, 2))
    windowless = MistralForCausalLM(MistralConfig(**{**model.config.to_dict(), "sliding_window": None})).eval()
    windowless.load_state_dict(model.state_dict())
    assert not torch.allclose(windowless(ids).logits, ref_logits, atol=1e-3)  # the window matters here
    wrapped = StaticTarget(model, (0, 1, 2), max_len=48)
    try:
        logits, aux = run_with_rejections(wrapped, ids, 4)
    finally:
        wrapped.remove()
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_verification_step_equals_the_plain_forward_and_never_recompiles(target, random_draft):
    """The compiled K+1 step (fullgraph, fixed shapes) gives the plain forward's logits and aux through rejected
    drafts, and speculative decoding with it drafts and accepts exactly what the eager static path does, over
    prompts of different lengths, with one graph."""
    import torch._dynamo.utils as dynamo_utils

    from eagle.export import load_draft
    from stages.evaluate.speculative import TargetWithAux, speculative_generate
    from stages.evaluate.static_target import StaticTarget

    torch._dynamo.reset()
    ids = torch.randint(0, target.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    layers = (1, 4, 6)
    ref_logits, ref_aux = reference_logits_and_aux(target, ids, layers)
    compiled = StaticTarget(target, layers, max_len=64, compiled_tokens=[4])
    try:
        logits, aux = run_with_rejections(compiled, ids, 4)
    finally:
        compiled.remove()
    torch.testing.assert_close(aux, ref_aux, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)

    draft = load_draft(random_draft, embed_weight=target.get_input_embeddings().weight.detach())
    prompts = [list(range(5, 5 + n)) for n in (7, 19, 12)]
    results, graphs = {}, []
    for name in ("dynamic", "compiled"):
        wrapped = (TargetWithAux(target, draft.cfg.aux_layer_ids) if name == "dynamic" else
                   StaticTarget(target, draft.cfg.aux_layer_ids, max_len=64, compiled_tokens=[4]))
        results[name] = []
        try:
            for p in prompts:
                results[name].append(speculative_generate(wrapped, draft, p, max_new_tokens=20, draft_tokens=3,
                                                          eos_ids=[-1]))
                graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
        finally:
            wrapped.remove()
    assert [r.tokens for r in results["compiled"]] == [r.tokens for r in results["dynamic"]]
    assert [r.accepted for r in results["compiled"]] == [r.accepted for r in results["dynamic"]]
    assert graphs[-1] == graphs[-len(prompts)]  # prompts of other lengths: no new graph


# ----------------------------------------------------------------------------------------------- the command
def _without_times(report: dict) -> dict:
    drop = {"seconds", "baseline_seconds", "tokens_per_s", "baseline_tokens_per_s", "speedup", "timing"}
    if isinstance(report, dict):
        return {k: _without_times(v) for k, v in report.items() if k not in drop}
    if isinstance(report, list):
        return [_without_times(v) for v in report]
    return report


def test_several_k_share_one_greedy_reference_per_turn(tiny_llama, random_draft, prompts_file, monkeypatch):
    import stages.evaluate.speculative as spec

    common = ["--target", tiny_llama, "--draft", random_draft, "--data", prompts_file, "--max-new-tokens", 12,
              "--no-compile", "--json"]
    single = {}
    for k in (2, 3):
        code, output, single[k] = run_eval(*common, "--draft-tokens", k)
        assert code == 0, output
    calls = []
    real_greedy = spec.greedy_generate
    monkeypatch.setattr(spec, "greedy_generate", lambda *a, **kw: calls.append(1) or real_greedy(*a, **kw))
    code, output, both = run_eval(*common, "--draft-tokens", "2,3")
    assert code == 0, output
    assert len(calls) == 1 + both["num_turns"]  # the warm-up, then one reference per turn for both K
    assert both["draft_tokens_list"] == [2, 3] and both["lossless"] is True
    assert set(single[2]) <= set(both)  # the first K's report, with today's keys
    for k in (2, 3):
        assert _without_times(both["by_draft_tokens"][str(k)]) == _without_times(single[k])
    assert _without_times({k: v for k, v in both.items() if k in single[2]}) == _without_times(single[2])
    code, output, _ = run_eval(*common[:-1], "--draft-tokens", "3,3")
    assert code == 2 and "no K twice" in output
    code, output, _ = run_eval(*common[:-1], "--draft-tokens", "0")
    assert code == 2 and "at least 1" in output
    code, output, _ = run_eval(*common[:-1], "--draft-tokens", "2,3")
    assert code == 0 and "== K = 2" in output and "== K = 3" in output and "ms per target forward" in output


def test_a_turn_longer_than_the_cache_bound_gets_a_larger_cache(tiny_llama, random_draft, prompts_file, monkeypatch):
    import stages.evaluate.stage as stage
    import stages.static_cache as static_cache

    monkeypatch.setattr(static_cache, "CACHE_BUCKET", 16)
    monkeypatch.setattr(stage, "cache_length_bound", lambda *a, **kw: 1)  # every prompt outgrows it
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 12, "--no-compile", "--json")
    assert code == 0, output
    assert report["lossless"] is True and report["timing"]["static_cache"] is True
    assert report["timing"]["cache_length"] > 16


def test_a_cache_that_cannot_be_cropped_falls_back_to_the_dynamic_cache(tiny_llama, random_draft, prompts_file,
                                                                        monkeypatch):
    import stages.evaluate.static_target as static_target

    def refuse(config, max_len):
        raise static_target.UncroppableCache("a layer that cannot be cropped")

    monkeypatch.setattr(static_target, "static_full_cache", refuse)
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 12, "--no-compile", "--json")
    assert code == 0, output
    assert report["lossless"] is True and report["timing"]["static_cache"] is False


def test_draft_tokens_parse_one_k_or_a_list():
    from stages.evaluate.stage import parse_draft_tokens

    assert parse_draft_tokens(3) == [3] and parse_draft_tokens("3, 5") == [3, 5] and parse_draft_tokens([5, 3]) == [5, 3]
    with pytest.raises(Exception, match="comma-separated"):
        parse_draft_tokens("three")


def test_more_compiled_shapes_than_dynamos_default_limit_never_fail(target, monkeypatch):
    """Every StaticTarget shares one code object (`_step`), so dynamo counts each K, each cache length and each
    model of the process against one recompile limit; with fullgraph=True hitting it is a hard error (it was, on
    the 9th model family of one test run). Each StaticTarget compiles its own copy of the step and raises the
    limit: here the limit starts at 2 and three cache lengths compile and run."""
    import stages.evaluate.static_target as static_target

    monkeypatch.setattr(static_target, "RECOMPILE_LIMIT", 4)
    ids = torch.randint(0, target.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    with torch._dynamo.config.patch(recompile_limit=2):  # restored on exit (monkeypatch would delete the key)
        for max_len in (32, 48, 64):
            wrapped = static_target.StaticTarget(target, (1, 4, 6), max_len=max_len, compiled_tokens=(4,))
            try:
                cache = wrapped.new_cache(8)
                wrapped.forward(ids, cache)  # the compiled K+1 step
            finally:
                wrapped.remove()
        assert torch._dynamo.config.recompile_limit == 4
