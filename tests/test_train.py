"""`eagle-pipe train` end to end on a real tiny dump: learning, export, resume after kill -9, NaN handling,
and refusing bad dumps before the first step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from stages.train import checkpoint as ckpt
from stages.cli import main
from train_dumps import cached_dump
from train_helpers import straight_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VD = 256
BASE = ["--seq-len", "128", "--batch-size", "2", "--ttt-steps", "3", "--draft-vocab-size", str(VD),
        "--warmup-steps", "3", "--no-compile", "--num-workers", "1", "--eval-fraction", "0.1"]


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tiny_llama):
    return cached_dump(tmp_path_factory, "llama-100", tiny_llama, records=100)


def train(args: list[str], expect_ok: bool = True):
    result = CliRunner().invoke(main, ["train", *BASE, *args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_held_out_accuracy_beats_chance(dump, tmp_path):
    run = tmp_path / "run"
    train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "24", "--lr", "3e-3", "--log-every", "4",
           "--eval-every", "12", "--save-every", "12"])
    logs = [r for r in records(run) if "loss" in r]
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"], [r["loss"] for r in logs]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 24 and summary["final_metrics"]["skipped_steps"] == 0
    assert summary["final_eval"]["eval_acc"][0] > 10.0 / VD, summary["final_eval"]
    # the completion marker is written after everything else
    newest_other = max(p.stat().st_mtime for p in run.rglob("*") if p.is_file() and p.name != "train_summary.json")
    assert (run / "train_summary.json").stat().st_mtime >= newest_other
    # the export is the final checkpoint's weights, loadable by the serving-layout loader
    from eagle.export import load_draft

    final = ckpt.latest_checkpoint(run / "checkpoints")
    assert final.name == "step-00000024" and (run / "checkpoints" / "best").is_dir()
    exported = load_draft(run / "export")
    saved = load_file(str(final / "model.safetensors"))
    for name, tensor in exported.state_dict().items():
        if name in saved:
            assert torch.equal(tensor.float(), saved[name].float()), name
    # `eagle-pipe export CKPT OUT` gives the same files as the run's own export
    result = CliRunner().invoke(main, ["export", str(final), str(tmp_path / "exp2")])
    assert result.exit_code == 0, result.output
    a, b = load_file(str(run / "export" / "model.safetensors")), load_file(str(tmp_path / "exp2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_host_normalizer_equals_the_losss_valid_counts(dump):
    from stages.train.loader import DumpIndex, PackedLoader
    from stages.train.setup import build_draft, token_counts
    from eagle.ttt import ttt_loss

    index = DumpIndex(dump)
    model = build_draft(dump, index.manifest, token_counts(index), draft_vocab_size=64, ttt_steps=3,
                        init_lm_head=True, seed=0)
    loader = PackedLoader(index, np.arange(index.num_documents), seq_len=64, batch_size=2, steps=3, t2d=model.t2d,
                          drop_last=False)
    total = 0
    for micro in loader:
        for batch, counts in micro:
            _, m = ttt_loss(model, batch, 3, counts, index.teacher_kind)
            assert torch.equal(m["valid"].float(), counts)
            total += 1
        if total >= 4:
            break
    assert counts[0] > 0


def test_kill_9_then_resume_gives_bitwise_the_same_weights(dump, tmp_path):
    straight, killed = straight_and_resumed(dump, tmp_path, *BASE, "--save-every", 8, "--log-every", 4,
                                            "--eval-every", 16, "--lr", "2e-3", max_steps=40)
    a = (straight / "checkpoints" / "step-00000040" / "model.safetensors").read_bytes()
    b = (killed / "checkpoints" / "step-00000040" / "model.safetensors").read_bytes()
    assert a == b
    a = (straight / "checkpoints" / "step-00000040" / "optimizer.safetensors").read_bytes()
    assert a == (killed / "checkpoints" / "step-00000040" / "optimizer.safetensors").read_bytes()
    assert (straight / "export" / "model.safetensors").read_bytes() == (killed / "export" / "model.safetensors").read_bytes()
    steps = [r["step"] for r in records(killed) if "loss" in r]
    assert steps == sorted(set(steps)), "metrics past the checkpoint are not duplicated"


def _nan_at(monkeypatch, bad_calls):
    import stages.train.drafters as train_mod  # the EAGLE-3 drafter's loss (stages/train/drafters.py)

    real, calls = train_mod.ttt_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(train_mod, "ttt_loss", poisoned)


def test_non_finite_loss_skips_the_update(dump, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3})  # the third training forward = optimizer step 3 (no eval before it)
    run = tmp_path / "run"
    train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "5", "--log-every", "1", "--save-every",
           "1", "--keep-checkpoints", "10", "--eval-every", "0"])
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["final_metrics"]["skipped_steps"] == 1
    s2, s3, s4 = (load_file(str(run / "checkpoints" / f"step-0000000{i}" / "model.safetensors")) for i in (2, 3, 4))
    assert all(torch.equal(s2[k], s3[k]) for k in s2), "step 3 left the weights untouched"
    assert not all(torch.equal(s3[k], s4[k]) for k in s3), "step 4 trained again"
    opt3 = load_file(str(run / "checkpoints" / "step-00000003" / "optimizer.safetensors"))
    assert all(v.item() == 2 for k, v in opt3.items() if k.endswith(".step"))


def test_many_non_finite_steps_in_a_row_stop_with_a_usable_checkpoint(dump, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    result = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "20", "--log-every", "1",
                    "--save-every", "2", "--max-bad-steps", "3", "--eval-every", "0", "--keep-checkpoints", "10"], expect_ok=False)
    assert result.exit_code == 2 and "in a row" in result.output
    last = ckpt.latest_checkpoint(run / "checkpoints")
    weights = load_file(str(last / "model.safetensors"))
    good = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert all(torch.equal(weights[k], good[k]) for k in good)
    assert not (run / "train_summary.json").exists()


def test_existing_run_needs_resume_and_same_settings(dump, tmp_path):
    run = tmp_path / "run"
    train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "2", "--eval-every", "0"])
    again = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "2"], expect_ok=False)
    assert again.exit_code == 2 and "--resume" in again.output
    changed = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "4", "--resume", "--seed", "5"],
                    expect_ok=False)
    assert changed.exit_code == 2 and "seed" in changed.output


def test_draft_rope_is_announced_taken_and_fixed_on_resume(dump, tmp_path):
    """A target with linear RoPE: auto takes it (said at start, exported), default trains plain RoPE, and a
    resume with another --draft-rope is refused because the same weights would rotate differently."""
    linear = _copy(dump, tmp_path)
    config_path = linear / "target" / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config_path.write_text(json.dumps(config))
    run, plain = tmp_path / "run", tmp_path / "plain"
    result = train(["--teacher-dir", str(linear), "--out", str(run), "--max-steps", "2", "--eval-every", "0"])
    assert "train: draft RoPE: the target's RoPE: linear, rope_theta 10000, factor 2.0" in result.output
    exported = json.loads((run / "export" / "config.json").read_text())
    assert exported["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and exported["rope_theta"] == 10000.0
    result = train(["--teacher-dir", str(linear), "--out", str(plain), "--max-steps", "2", "--eval-every", "0",
                    "--draft-rope", "default"])
    assert "train: draft RoPE: plain RoPE, rope_theta 10000 (draft_rope=default" in result.output
    assert json.loads((plain / "export" / "config.json").read_text())["rope_scaling"] is None
    (run / "train_summary.json").unlink()  # an interrupted run
    changed = train(["--teacher-dir", str(linear), "--out", str(run), "--max-steps", "4", "--resume",
                     "--eval-every", "0", "--draft-rope", "default"], expect_ok=False)
    assert changed.exit_code == 2 and "was trained as a different draft (rope_scaling=" in changed.output


def test_draft_arch_is_announced_exported_and_fixed_on_resume(dump, tmp_path):
    """--draft-arch eagle3.1 trains the fc_norm weights and exports the two switches; resuming a run with
    another --draft-arch is refused in one line, before any weight is loaded."""
    from eagle.export import load_draft

    run = tmp_path / "run"
    result = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "3", "--eval-every", "0",
                    "--lr", "3e-3", "--draft-arch", "eagle3.1"])
    assert "train: draft architecture: eagle3.1 (fc_norm:" in result.output
    from eagle.config import DRAFT_ARCHS
    from stages.train.stage import command

    assert list(next(p for p in command.params if p.name == "draft_arch").type.choices) == [*DRAFT_ARCHS, "dflash"]
    exported = json.loads((run / "export" / "config.json").read_text())
    assert exported["fc_norm"] is True and exported["norm_output"] is True
    assert json.loads((run / "train_summary.json").read_text())["settings"]["draft_arch"] == "eagle3.1"
    draft = load_draft(run / "export")
    assert draft.cfg.draft_arch == "eagle3.1"
    assert not torch.equal(draft.fc_norm[2].weight, torch.ones_like(draft.fc_norm[2].weight))  # trained
    (run / "train_summary.json").unlink()  # an interrupted run
    changed = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "4", "--resume",
                     "--eval-every", "0"], expect_ok=False)
    assert changed.exit_code == 2
    assert changed.output.strip().splitlines()[-1] == (
        f"Error: {run / 'checkpoints' / 'step-00000003'}: was trained with draft_arch='eagle3.1', now 'eagle3'; "
        "resume with the same value or start a new --out")
    assert "Traceback" not in changed.output
    train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "4", "--resume", "--eval-every", "0",
           "--draft-arch", "eagle3.1"])


def test_checkpoints_from_before_draft_arch_are_refused_in_one_line(dump, tmp_path):
    run = tmp_path / "run"
    train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "2", "--eval-every", "0"])
    (run / "train_summary.json").unlink()
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    meta = json.loads((latest / "meta.json").read_text())
    del meta["settings"]["draft_arch"]  # written before the option existed
    (latest / "meta.json").write_text(json.dumps(meta))
    refused = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "3", "--resume",
                     "--eval-every", "0"], expect_ok=False)
    assert refused.exit_code == 2 and refused.output.strip().splitlines()[-1] == (
        f"Error: {latest}: written by an older eagle-pipe (no draft_arch in its settings); retrain with this "
        "version, or export it with the eagle-pipe that trained it")


def _copy(dump, tmp_path, name="copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(dump, dst)
    return dst


def test_corrupt_part_is_refused_naming_the_file(dump, tmp_path):
    bad = _copy(dump, tmp_path)
    part = sorted(bad.glob("shards/*/part-*.safetensors"))[0]
    data = bytearray(part.read_bytes())
    data[-100] ^= 0xFF
    part.write_bytes(bytes(data))
    result = train(["--teacher-dir", str(bad), "--out", str(tmp_path / "run")], expect_ok=False)
    assert result.exit_code == 2 and part.name in result.output and "sha256" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_shard_is_refused_naming_it(dump, tmp_path):
    bad = _copy(dump, tmp_path)
    shard = next(bad.glob("shards/shard-*"))
    (shard / "done.json").unlink()
    result = train(["--teacher-dir", str(bad), "--out", str(tmp_path / "run")], expect_ok=False)
    assert result.exit_code == 2 and shard.name in result.output


def test_done_json_that_disagrees_with_the_manifest_is_refused(dump, tmp_path):
    bad = _copy(dump, tmp_path)
    done_path = next(bad.glob("shards/*/done.json"))
    done = json.loads(done_path.read_text())
    done["manifest_sha256"] = "0" * 64
    done_path.write_text(json.dumps(done))
    result = train(["--teacher-dir", str(bad), "--out", str(tmp_path / "run")], expect_ok=False)
    assert result.exit_code == 2 and "done.json" in result.output


def test_dumps_of_different_targets_are_refused_together(dump, tmp_path_factory, tiny_qwen3, tmp_path):
    other = cached_dump(tmp_path_factory, "qwen3-12", tiny_qwen3, records=12)
    result = train(["--teacher-dir", str(dump), "--eval-teacher-dir", str(other), "--out", str(tmp_path / "run")],
                   expect_ok=False)
    assert result.exit_code == 2 and str(other / "manifest.json") in result.output
    assert "config_sha256" in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_bf16_training_on_cuda_matches_eager_and_learns(dump, tmp_path):
    """The GPU path: bf16 autocast, FlexAttention, torch.compile(fullgraph=True), pinned prefetch, fused AdamW."""
    args = [a for a in BASE if a != "--no-compile"] + ["--teacher-dir", str(dump), "--device", "cuda",
                                                        "--max-steps", "16", "--lr", "3e-3", "--log-every", "1",
                                                        "--eval-every", "8"]
    train([*args, "--out", str(tmp_path / "compiled"), "--compile"])
    train([*args, "--out", str(tmp_path / "eager"), "--no-compile"])
    compiled = [r for r in records(tmp_path / "compiled") if "loss" in r]
    eager = [r for r in records(tmp_path / "eager") if "loss" in r]
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=2e-2)
    assert compiled[-1]["loss"] < 0.9 * compiled[0]["loss"]
    summary = json.loads((tmp_path / "compiled" / "train_summary.json").read_text())
    assert summary["final_eval"]["eval_acc"][0] > 10.0 / VD and summary["final_metrics"]["skipped_steps"] == 0


def test_held_out_evaluation_reuses_the_compiled_training_graph(dump, tmp_path, monkeypatch):
    """Evaluation runs the step that training compiled, in the same grad mode: one graph for the whole run.
    (A `torch.no_grad()` evaluation made dynamo trace and compile a second, inference graph: one more
    compilation per run, and on an H200 with torch 2.11 that graph's autotuning hit an illegal memory access.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    import stages.train.stage as train_mod

    counter = CompileCounterWithBackend("eager")
    real_compile = torch.compile
    monkeypatch.setattr(train_mod.torch, "compile",
                        lambda fn, **kw: real_compile(fn, **(kw | {"backend": counter})))
    torch._dynamo.reset()
    run = tmp_path / "run"
    args = [a for a in BASE if a != "--no-compile"]
    result = CliRunner().invoke(main, ["train", *args, "--compile", "--teacher-dir", str(dump), "--out", str(run),
                                       "--max-steps", "6", "--eval-every", "2", "--log-every", "2"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    evals = [r for r in records(run) if "eval_acc" in r]
    assert len(evals) == 3 and all(e["eval_positions"] > 0 for e in evals)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled; evaluation should reuse training's"


@pytest.mark.parametrize("steps, warmup, positions, params, short", [
    (5, 100, 82_000, 10_000_000, True),      # issue 14: SmolLM2 with the defaults (batch 8 x 2048, 1 epoch)
    (54, 100, 221_000, 10_000_000, True),    # issue 14: --batch-size 4 --seq-len 1024 --epochs 3
    (300, 20, 614_000, 328_000, False),      # the built-in demo (AL 3.8)
    (199, 20, 10_000_000, 328_000, True),    # plenty of data, too few updates
    (1000, 600, 10_000_000, 328_000, True),  # mostly warmup
    (1000, 100, 100_000, 328_000, True),     # many steps over far too little data
])
def test_run_length_warning(steps, warmup, positions, params, short):
    from stages.train.setup import run_length_warning

    warning = run_length_warning(steps, warmup, positions, params)
    assert (warning is not None) == short, warning
    if short:
        assert "\n" not in warning and "--batch-size" in warning and "--epochs" in warning


def test_a_short_run_warns_in_one_line_with_its_own_numbers(dump, tmp_path):
    """The CLI prints the warning once, computed from this run's steps, warmup, positions and parameters."""
    from unittest import mock

    import stages.train.stage as train_mod

    run = tmp_path / "short"
    with mock.patch.object(train_mod, "run_length_warning", wraps=train_mod.run_length_warning) as spy:
        short = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "4"])
    lines = [ln for ln in short.output.splitlines() if "too short" in ln]
    assert len(lines) == 1 and "4 optimizer steps" in lines[0] and "--warmup-steps" in lines[0]
    steps, warmup, positions, params = spy.call_args.args
    assert (steps, warmup) == (4, 3) and 0 < positions <= 4 * 2 * 128  # at most 4 steps x 2 rows x 128
    exported = load_file(run / "export" / "model.safetensors")
    assert params == sum(t.numel() for name, t in exported.items() if name not in ("d2t", "t2d"))
