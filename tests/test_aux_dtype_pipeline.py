"""`--aux-dtype fp8` end to end on a real tiny target: the dump stores exactly the quantization of the
full-precision dump's aux states, verifies, trains (the loader moves FP8 bytes + scales, the step dequantizes),
resumes bitwise after kill -9, and its draft evaluates losslessly; verify catches missing or mis-shaped scales;
a train dump and an eval dump of different aux dtypes train together; and a schema-1 dump (the previous release's
format) is refused by verify and train in one line saying to re-run dump-teacher."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stages import shards
from stages.shards.aux import FP8, dequantize_fp8, quantize_fp8
from stages.cli import main
from stages.shards.verify import verify_dump
from train_dumps import cached_dump
from train_helpers import straight_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDS = 60
BASE = ["--seq-len", "128", "--batch-size", "2", "--ttt-steps", "3", "--draft-vocab-size", "256",
        "--warmup-steps", "3", "--no-compile", "--num-workers", "1", "--eval-fraction", "0.1", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_llama):
    return cached_dump(tmp_path_factory, f"llama-{RECORDS}", tiny_llama, records=RECORDS)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, tiny_llama):
    return cached_dump(tmp_path_factory, f"llama-{RECORDS}-fp8", tiny_llama, records=RECORDS,
                       extra=["--aux-dtype", "fp8"])


def parts(dump: Path) -> list[dict]:
    return [shards.load_part(p) for p in shards.iter_parts(dump)]


def train(args: list[str], expect_ok: bool = True):
    result = CliRunner().invoke(main, ["train", *BASE, *args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_fp8_dump_stores_the_quantized_full_precision_aux_states(full, fp8):
    assert verify_dump(fp8) == []
    manifest = shards.read_json(fp8 / "manifest.json")
    assert manifest["schema_version"] == 2 and manifest["aux_dtype"] == "float8_e4m3fn"
    assert shards.read_json(full / "manifest.json")["aux_dtype"] == "float32"
    a, b = parts(full), parts(fp8)
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert pb["aux_hidden_states"].dtype == FP8 and pb["aux_scales"].dtype == torch.float32
        assert "aux_scales" not in pa
        q, s = quantize_fp8(pa["aux_hidden_states"])  # same batches on the same CPU: the same float32 states
        assert torch.equal(pb["aux_hidden_states"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(pb["aux_scales"], s)
        for name in pa:  # everything else is the same bytes
            if name != "aux_hidden_states":
                assert torch.equal(pa[name], pb[name]), name
        back = dequantize_fp8(pb["aux_hidden_states"], pb["aux_scales"])
        x = pa["aux_hidden_states"].double()
        assert ((back.double() - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * s.double().repeat_interleave(
            x.shape[1] // 3, -1) + 1e-7 * x.abs()).all()
    bytes_full = sum(p.stat().st_size for p in shards.iter_parts(full))
    bytes_fp8 = sum(p.stat().st_size for p in shards.iter_parts(fp8))
    assert bytes_fp8 < 0.5 * bytes_full  # float32 target: aux states shrink 4x


def _rewrite_part(dump: Path, change) -> Path:
    """Rewrite the first part with `change(tensors)` applied and fix its size and sha256 in done.json, so only
    the tensor layout check can object."""
    path = next(shards.iter_parts(dump))
    tensors = {k: v.clone() for k, v in shards.load_part(path).items()}  # not views of the file we rewrite
    header = shards.part_header(path)
    change(tensors)
    shards.write_safetensors(path, tensors, header["metadata"])
    done_path = path.parent / "done.json"
    done = shards.read_json(done_path)
    entry = next(e for e in done["parts"] if e["file"] == path.name)
    entry["sha256"], entry["bytes"] = shards.sha256_file(path), path.stat().st_size
    done_path.write_text(json.dumps(done))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("aux_scales"), "tensor aux_scales missing"),
    (lambda t: t.update(aux_scales=t["aux_scales"][:, :2].contiguous()), "aux_scales is F32"),
    (lambda t: t.update(aux_scales=t["aux_scales"].double()), "aux_scales is F64"),
    (lambda t: t.update(aux_hidden_states=t["aux_hidden_states"].float()), "aux_hidden_states is F32"),
])
def test_verify_catches_missing_or_misshaped_scales(fp8, tmp_path, change, message):
    bad = Path(shutil.copytree(fp8, tmp_path / "bad"))
    path = _rewrite_part(bad, change)
    problems = verify_dump(bad)
    assert len(problems) == 1 and str(path) in problems[0] and message in problems[0], problems
    result = train(["--teacher-dir", str(bad), "--out", str(tmp_path / "run")], expect_ok=False)
    assert result.exit_code == 2 and path.name in result.output


@pytest.mark.slow  # three short training runs in subprocesses and a speculative eval: ~40 s on 2 cores
def test_fp8_dump_trains_resumes_bitwise_after_kill_9_and_evaluates_losslessly(fp8, tiny_llama, tmp_path):
    straight, killed = straight_and_resumed(fp8, tmp_path, *BASE, "--save-every", 6, "--log-every", 4,
                                            "--eval-every", 12, max_steps=24)
    logs = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert sum(losses[-2:]) / 2 < 0.92 * losses[0], losses  # learned (mean of the last two log intervals)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = (straight / "checkpoints" / "step-00000024" / name).read_bytes()
        assert a == (killed / "checkpoints" / "step-00000024" / name).read_bytes(), name
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in ("What does a for loop do?", "Explain the with statement.")))
    result = CliRunner().invoke(main, ["eval", "--target", str(tiny_llama), "--draft", str(straight / "export"),
                                       "--data", str(prompts), "--max-new-tokens", "16", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lossless"] is True and report["mismatches"] == [] and report["acceptance_length"] >= 1.0


def test_train_and_eval_dumps_of_different_aux_dtypes_train_together(full, fp8, tmp_path):
    """Handled, not refused: each loader keeps its dump's layout and the step dequantizes per batch. Training
    only reads --teacher-dir, so the weights are bitwise the same; the held-out numbers differ by FP8 only."""
    common = ["--teacher-dir", str(full), "--max-steps", "12", "--eval-every", "12", "--log-every", "4"]
    train([*common, "--eval-teacher-dir", str(full), "--out", str(tmp_path / "a")])
    train([*common, "--eval-teacher-dir", str(fp8), "--out", str(tmp_path / "b")])
    a = (tmp_path / "a" / "checkpoints" / "step-00000012" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "checkpoints" / "step-00000012" / "model.safetensors").read_bytes()
    ea, eb = (json.loads((tmp_path / r / "train_summary.json").read_text())["final_eval"] for r in "ab")
    assert ea["eval_positions"] == eb["eval_positions"] > 0
    for x, y in zip(ea["eval_acc"], eb["eval_acc"]):
        assert abs(x - y) <= 0.03, (ea, eb)
    assert ea["eval_ce"] != eb["eval_ce"]  # the FP8 dump really was read as FP8


def as_schema_1(src: Path, dst: Path) -> Path:
    """The same dump in the previous release's format (schema 1): no aux_dtype in the manifest or its settings,
    parts tagged schema_version "1" under the new manifest hash. Only for dumps whose aux dtype is the target's
    (schema 1 could store nothing else)."""
    shutil.copytree(src, dst)
    manifest = shards.read_json(dst / "manifest.json")
    assert manifest.pop("aux_dtype") == manifest["target"]["dtype"]
    manifest["settings"].pop("aux_dtype")
    manifest["schema_version"] = 1
    shards.atomic_write_json(dst / "manifest.json", manifest)
    msha = shards.manifest_sha256(manifest)
    for done_path in dst.glob("shards/*/done.json"):
        done = shards.read_json(done_path)
        done["manifest_sha256"] = msha
        for entry in done["parts"]:
            path = done_path.parent / entry["file"]
            meta = shards.part_header(path)["metadata"] | {"schema_version": "1", "manifest_sha256": msha}
            tensors = {k: v.clone() for k, v in shards.load_part(path).items()}
            shards.write_safetensors(path, tensors, meta)
            entry["sha256"], entry["bytes"] = shards.sha256_file(path), path.stat().st_size
        shards.atomic_write_json(done_path, done)
    return dst


def test_a_schema_1_dump_is_refused_in_one_line(full, tmp_path):
    old = as_schema_1(full, tmp_path / "schema1")
    line = (f"{old / 'manifest.json'}: schema_version 1, this eagle-pipe reads dumps of schema 2: re-run "
            "dump-teacher with this version (into a new --out) to rewrite it")
    assert verify_dump(old) == [line]
    from stages.errors import StageError
    from stages.train.loader import DumpIndex

    with pytest.raises(StageError) as refused:  # the loader itself, for what reads a dump without verify (bench)
        DumpIndex(old)
    assert str(refused.value) == line
    result = train(["--teacher-dir", str(old), "--out", str(tmp_path / "run"), "--max-steps", "2"], expect_ok=False)
    assert result.exit_code != 0 and f"refusing to train on {old}: {line}" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    result = train(["--teacher-dir", str(full), "--eval-teacher-dir", str(old), "--out", str(tmp_path / "mixed"),
                    "--max-steps", "2"], expect_ok=False)  # as an eval dump too
    assert result.exit_code != 0 and f"refusing to train on {old}: {line}" in result.output


def test_loader_moves_the_stored_fp8_bytes_and_scales_position_by_position(tmp_path):
    """Second code path: the same documents as a float32 dump and as an FP8 dump give the same plan, and every
    position of every FP8 batch (padding included) holds exactly quantize_fp8 of the float32 batch's row."""
    from stages.train.loader import DumpIndex, PackedLoader
    from train_helpers import make_documents, write_dump

    docs = make_documents([5, 17, 2, 9, 30, 1, 12, 8, 3, 21], vocab=40, aux_width=3 * 8)
    docs8 = []
    for d in docs:
        q, s = quantize_fp8(d["aux_hidden_states"])
        docs8.append(d | {"aux_hidden_states": q, "aux_scales": s})
    loaders = []
    for name, ds in (("f32", docs), ("fp8", docs8)):
        index = DumpIndex(write_dump(tmp_path / name, ds, vocab=40))
        t2d = torch.ones(40, dtype=torch.bool)
        loaders.append(PackedLoader(index, np.arange(index.num_documents), seq_len=16, batch_size=2, steps=3,
                                    t2d=t2d, seed=1, drop_last=False))
    n = 0
    for (full_step, fp8_step) in zip(*loaders):
        for (full, c_full), (b8, c8) in zip(full_step, fp8_step):
            assert b8["aux_hidden_states"].dtype == FP8 and b8["aux_scales"].shape == (2, 16, 3)
            q, s = quantize_fp8(full["aux_hidden_states"].flatten(0, 1))
            assert torch.equal(b8["aux_hidden_states"].flatten(0, 1).view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(b8["aux_scales"].flatten(0, 1), s)
            assert torch.equal(c_full, c8)
            for key in full:
                if key != "aux_hidden_states":
                    assert torch.equal(full[key], b8[key]), key
            n += 1
    assert n >= 4


@pytest.mark.parametrize("aux", ["model", "fp8"])
def test_eagle_pipe_run_expects_the_settings_the_dump_recorded(full, fp8, aux):
    """`eagle-pipe run` skips a finished dump only if it predicts its settings; aux_dtype is one of them."""
    from stages.dump.stage import command
    from stages.run import expected_dump_settings

    dump = fp8 if aux == "fp8" else full
    manifest = shards.read_json(dump / "manifest.json")
    args = ["--target", manifest["target"]["source"], "--data", manifest["data"]["sources"][0], "--out", str(dump),
            "--loss-on", "all", "--top-k", "8", "--num-shards", "1", "--device", "cpu", "--aux-dtype", aux]
    options = command.make_context("dump-teacher", args).params
    assert expected_dump_settings(options, manifest["target"]["num_layers"]) == manifest["settings"]


def test_unknown_aux_dtype_is_refused_in_one_line(tiny_llama, tmp_path):
    from stages.dump.stage import dump_teacher
    from stages.errors import StageError

    with pytest.raises(StageError, match="--aux-dtype 'fp4'"):
        dump_teacher(target=str(tiny_llama), data=["x.jsonl"], out=str(tmp_path / "out"), aux_dtype="fp4")
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(tiny_llama), "--data", "x.jsonl", "--out",
                                       str(tmp_path / "out"), "--aux-dtype", "fp4"])
    assert result.exit_code == 2 and "fp4" in result.output
