"""`eagle-pipe run`: the whole pipeline from one pipeline.yaml on a shrunken demo, and skipping finished stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": f"What does statement number {i} do?"},
                  {"role": "assistant", "content": f"It runs the block {i} times, then returns to the caller."}]}
    for i in range(12)
]
EVAL = [{"messages": [{"role": "user", "content": "What is a decorator?"}]},
        {"messages": [{"role": "user", "content": "Explain the with statement."}]}]


@pytest.fixture()
def demo(tmp_path, tiny_llama, monkeypatch) -> Path:
    """A shrunken demo: a tiny target, a few conversations, a few training steps; relative paths like the demo."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    config = {
        "dump-teacher": {"target": str(tiny_llama), "data": "data/train.jsonl", "out": "work/teacher",
                         "top_k": 4, "max_seq_len": 128, "device": "cpu"},
        "train": {"out": "work/run", "seq_len": 128, "batch_size": 2, "max_steps": 4, "ttt_steps": 2,
                  "lr": "1e-3", "warmup_steps": 1, "eval_fraction": 0.2, "eval_every": 2, "save_every": 2,
                  "log_every": 1, "compile": False, "num_workers": 1, "device": "cpu"},
        "eval": {"data": ["data/eval.jsonl"], "max_new_tokens": 8, "draft_tokens": 2, "device": "cpu"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args) -> tuple[int, str, dict | None]:
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return result.exit_code, result.output, summary


def test_run_completes_end_to_end_then_skips_finished_stages(demo):
    code, output, summary = run(demo, "--json")  # "1e-3" and a bare data path are converted as the CLI does
    assert code == 0, output
    assert summary["stages"]["dump-teacher"].startswith("ran") and summary["stages"]["train"].startswith("ran")
    assert summary["lossless"] is True and summary["acceptance_length"] >= 1.0
    assert summary["sequences"] == len(TRAIN) and summary["tokens"] > 0 and summary["teacher_bytes_per_token"] > 0
    assert summary["training_steps"] == 4 and summary["training_seconds"] > 0
    assert summary["draft"] == "work/run/export" and (Path("work/run/export") / "model.safetensors").is_file()
    assert summary["simulated_acceptance_length"] is not None
    # what a recipe table needs from one run: eval per category and turn, each stage's seconds
    assert set(summary["per_category"]) == {"chat"} and summary["num_prompts"] == len(EVAL)
    assert summary["per_category"]["chat"]["acceptance_length"] == pytest.approx(summary["acceptance_length"])
    assert set(summary["stage_seconds"]) == {"dump-teacher", "train", "eval"}
    assert summary["final_eval"]["eval_acceptance_length"] >= 1.0
    report = json.loads(Path(summary["eval_report"]).read_text())  # eval's whole report, beside the run
    assert summary["eval_report"] == "work/run/eval_report.json"
    assert report["acceptance_length"] == summary["acceptance_length"] and len(report["per_prompt"]) == len(EVAL)
    assert "acceptance length" in output and "lossless" in output  # the readable summary precedes the JSON

    weights = (Path("work/run/export") / "model.safetensors").read_bytes()
    code, output, second = run(demo, "--json")
    assert code == 0, output
    assert second["stages"]["dump-teacher"] == "skipped" and second["stages"]["train"] == "skipped"
    assert second["stages"]["eval"].startswith("ran") and set(second["stage_seconds"]) == {"eval"}
    assert (Path("work/run/export") / "model.safetensors").read_bytes() == weights
    assert second["acceptance_length"] == summary["acceptance_length"]  # same draft, same greedy decoding


def test_changed_settings_are_not_skipped(demo):
    from stages.run import dump_is_complete, load_sections, resolve_options, train_is_complete

    code, output, _ = run(demo)
    assert code == 0, output
    sections = load_sections(str(demo))
    dump = resolve_options(str(demo), "dump-teacher", sections["dump-teacher"])
    train = resolve_options(str(demo), "train", sections["train"])
    assert dump_is_complete(dump) == (True, "complete") and train_is_complete(train) == (True, "complete")
    assert dump_is_complete(dump | {"top_k": 5}) == (False, "settings changed")
    assert train_is_complete(train | {"lr": 2e-3}) == (False, "settings changed: lr")
    assert train_is_complete(train | {"num_workers": 2})[0]  # does not change the draft
    summary_path = Path("work/run/train_summary.json")  # a run recorded before an option existed
    recorded = json.loads(summary_path.read_text())
    del recorded["settings"]["draft_rope"], recorded["settings"]["draft_arch"]
    summary_path.write_text(json.dumps(recorded))
    assert train_is_complete(train) == (True, "complete")  # the missing option counts as its default
    assert train_is_complete(train | {"draft_rope": "default"}) == (False, "settings changed: draft_rope")
    assert train_is_complete(train | {"draft_arch": "eagle3.1"}) == (False, "settings changed: draft_arch")
    part = next(Path("work/teacher/shards").rglob("part-*.safetensors"))
    part.write_bytes(part.read_bytes()[:-8])  # a truncated part: verify must catch it
    complete, why = dump_is_complete(dump)
    assert not complete and why.startswith("verify:")


def test_bad_pipeline_files_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pipeline.yaml"
    path.write_text("dump-teacher: {target: x, data: [a], out: o, top_kk: 3}\ntrain: {out: r}\neval: {}\n")
    code, output, _ = run(path)
    assert code == 2 and "unknown key(s) in section 'dump-teacher': top_kk" in output and str(path) in output
    path.write_text("dump-teacher: {target: x, data: [a], out: o}\neval: {}\n")
    code, output, _ = run(path)
    assert code == 2 and "missing section(s) train" in output
    path.write_text("dump-teacher: {target: x, data: [a], out: o}\ntrain: {out: r}\neval: {}\n")
    code, output, _ = run(path)  # eval has no data: caught before any stage runs
    assert code == 2 and "section 'eval'" in output and "--data" in output
    code, output, _ = run(tmp_path / "nope.yaml")
    assert code == 2 and "config file not found" in output
