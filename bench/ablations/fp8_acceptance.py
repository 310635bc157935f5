"""Benchmark `--aux-dtype fp8` against full-precision aux states: bytes per token (measured against the formula)
and the acceptance length of drafts trained from each dump of the same data with the same training.

For each case, both arms run dump-teacher -> train -> eval through the real CLI with the case's pipeline.yaml
(only `--aux-dtype` differs between the arms), one after the other in this run. Cases:
  demo        pipeline.yaml as shipped (the demo target in float32: fp8 stores the aux states in 1/4)
  demo-bf16   the same target and data dumped and evaluated in bfloat16 (fp8 vs bf16: the real-world halving)
  demo-half   another data set: only the first half (336) of the demo's training records, float32 (on request)
Prints one JSON object: per case and arm the bytes per token (measured, formula), acceptance length, lossless;
per case the fp8/full ratios (goal: acceptance >= 0.99).

    python -m bench.ablations.fp8_acceptance                     # demo, demo-bf16 (CPU: ~45 min on 2 loaded cores)
    python -m bench.ablations.fp8_acceptance --cases demo-half
    python -m bench.ablations.fp8_acceptance --cases demo --max-steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = {"demo": {"dump": [], "eval": []},
         "demo-bf16": {"dump": ["--dtype", "bfloat16"], "eval": ["--dtype", "bfloat16"]},
         "demo-half": {"dump": ["--limit", "336"], "eval": []}}


def cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "stages.cli", "-c", str(ROOT / "pipeline.yaml"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eagle-pipe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def formula_bytes_per_token(manifest: dict, tokens: int, sequences: int) -> float:
    """3*H*aux_bytes (+ 3*4 scales for fp8) + k*(4+4) + 4 (input id) + 1 (loss mask) + 16 per sequence."""
    H, k = manifest["target"]["hidden_size"], manifest["teacher"]["k"] or 0
    aux = {"float8_e4m3fn": 1, "bfloat16": 2, "float16": 2, "float32": 4}[manifest["aux_dtype"]]
    scales = 12 if manifest["aux_dtype"] == "float8_e4m3fn" else 0
    return 3 * H * aux + scales + 8 * k + 5 + 16 * sequences / tokens


def measure_dump(out: Path) -> dict:
    from stages import shards

    manifest = shards.read_json(out / "manifest.json")
    dones = [shards.read_done(out, i, manifest["num_shards"]) for i in range(manifest["num_shards"])]
    tokens = sum(d["num_tokens"] for d in dones)
    sequences = sum(d["records"]["written"] for d in dones)
    part_bytes = sum(p["bytes"] for d in dones for p in d["parts"])
    return {"aux_dtype": manifest["aux_dtype"], "tokens": tokens, "bytes": part_bytes,
            "bytes_per_token": part_bytes / tokens,
            "formula_bytes_per_token": formula_bytes_per_token(manifest, tokens, sequences)}


def run_arm(work: Path, case: str, aux_dtype: str, max_steps: int | None) -> dict:
    teacher, run = work / case / aux_dtype / "teacher", work / case / aux_dtype / "run"
    cli("dump-teacher", "--out", str(teacher), "--aux-dtype", aux_dtype, *CASES[case]["dump"])
    steps = ["--max-steps", str(max_steps)] if max_steps else []
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (a finished dump is reused as it is)
    cli("train", "--teacher-dir", str(teacher), "--out", str(run), *steps)
    report = json.loads(cli("eval", "--draft", str(run / "export"), "--run-dir", str(run), "--json",
                            *CASES[case]["eval"]).strip().splitlines()[-1])
    summary = json.loads((run / "train_summary.json").read_text())
    return measure_dump(teacher) | {
        "acceptance_length": report["acceptance_length"], "lossless": report["lossless"],
        "simulated_acceptance_length": report.get("simulated_acceptance_length"),
        "held_out_acc": summary["final_eval"].get("eval_acc"), "final_loss": summary["final_metrics"].get("loss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["demo", "demo-bf16"], choices=list(CASES))
    p.add_argument("--max-steps", type=int, default=None, help="Override the train section's max_steps.")
    p.add_argument("--work", default=str(ROOT / "work" / "bench-fp8"), help="Where dumps and runs go.")
    a = p.parse_args()
    out = {"note": "both arms of a case ran one after the other in this process; absolute numbers depend on the "
                   "machine, ratios are the result", "cases": {}}
    for case in a.cases:
        arms = {arm: run_arm(Path(a.work), case, arm, a.max_steps) for arm in ("model", "fp8")}
        full, fp8 = arms["model"], arms["fp8"]
        out["cases"][case] = {**arms, "fp8_over_full": {
            "bytes_per_token": fp8["bytes_per_token"] / full["bytes_per_token"],
            "acceptance_length": fp8["acceptance_length"] / full["acceptance_length"],
            "simulated_acceptance_length": (fp8["simulated_acceptance_length"] / full["simulated_acceptance_length"]
                                            if full["simulated_acceptance_length"] else None)}}
        print(json.dumps({case: out["cases"][case]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
