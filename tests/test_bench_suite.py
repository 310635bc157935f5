"""bench/ as a suite: every script is a module of the `bench` package that imports and answers `--help` (peer
drivers included: they import their peer package only when they run), none edits sys.path, and bench/common.py
runs a command under the lock, reads its JSON and files results by date."""
from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import pytest

from bench import common

BENCH = Path(common.__file__).resolve().parent


def bench_modules() -> list[str]:
    files = sorted(BENCH.rglob("*.py"))
    return [".".join(("bench", *p.relative_to(BENCH).with_suffix("").parts)).removesuffix(".__init__") for p in files]


def test_no_bench_file_edits_sys_path():
    for path in BENCH.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{path}: uses sys.path (bench is a package: run it as python -m bench.x.y)")


@pytest.mark.parametrize("name", bench_modules())
def test_every_module_imports_and_every_script_answers_help(name, capsys):
    module = importlib.import_module(name)
    if not hasattr(module, "main"):
        return  # a library module (common, shapes) or a package
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_run_json_reads_the_last_json_object_and_takes_the_lock(tmp_path):
    script = "import json; print('progress'); print(json.dumps({'a': 1})); print('[1, 2]'); print('done')"
    rc, result = common.run_json([sys.executable, "-c", script], tmp_path / "logs" / "x.log",
                                 lock=str(tmp_path / "heavy.lock"))
    assert rc == 0 and result == {"a": 1} and (tmp_path / "heavy.lock").exists()
    assert common.locked(["x"], None) == ["x"] and common.locked(["x"], "/l") == ["flock", "/l", "x"]
    rc, result = common.run_json([sys.executable, "-c", "import sys; print('no json'); sys.exit(3)"],
                                 tmp_path / "y.log")
    assert (rc, result) == (3, None)
    with pytest.raises(SystemExit, match=r"eagle-pipe no-such-stage failed \(exit 2\); see .*z.log"):
        common.eagle_pipe("no-such-stage", log=tmp_path / "z.log")


def test_results_are_dated_files_that_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_PIPE_BENCH_RESULTS", str(tmp_path / "results"))
    first = common.save_result("loader", {"tokens_per_s": 1.0}, argv=["--shape", "cpu"])
    second = common.save_result("loader", {"tokens_per_s": 2.0}, argv=[])
    assert first.parent == tmp_path / "results" and first.name.endswith("-loader.json")
    assert second.name == first.name.replace(".json", "-2.json")
    record = json.loads(first.read_text())
    assert record["result"] == {"tokens_per_s": 1.0} and record["command"][-2:] == ["--shape", "cpu"]
    assert record["measured_at"][:10] == first.name[:10] and record["machine"]["cpu_count"] >= 1


def test_stopwatch_counts_wall_and_cpu_seconds():
    with common.Stopwatch() as watch:
        sum(i * i for i in range(200_000))
    assert watch.wall > 0 and watch.cpu > 0
