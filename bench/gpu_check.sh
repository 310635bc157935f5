#!/usr/bin/env bash
# One script for a lent GPU (budget: ~9 minutes, every step under its own timeout): the CUDA-only tests (flex
# attention, bf16, compile, CUDA training), the demo pipeline end to end on the GPU (bf16 dump, compiled train,
# eval), then the training benchmarks at Llama-3.2-1B shapes, the loader and the writer, then a table.
#
#   bash bench/gpu_check.sh                 # PYTHON=... to pick the interpreter, OUT=... for the JSON files
#   MODELOPT_PYTHON=.venv-modelopt/bin/python bash bench/gpu_check.sh   # adds the Model-Optimizer ratio
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/eagle-gpu-check}
mkdir -p "$OUT"
MO=${MODELOPT_PYTHON:-}
if [[ -z "$MO" && -x .venv-modelopt/bin/python ]]; then MO=.venv-modelopt/bin/python; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== CUDA tests (pytest -m cuda)"
timeout 170 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -n 25 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== demo pipeline on the GPU: bf16 dump, compiled train, eval (pipeline.yaml with those two switches)"
sed -e 's/^  dtype: float32/  dtype: bfloat16/' -e 's/^  compile: false.*/  compile: true/' \
    -e "s#work/demo#$OUT/demo#" pipeline.yaml > "$OUT/demo.yaml"
timeout 150 "$PY" -m stages.cli run "$OUT/demo.yaml" --json > "$OUT/demo.txt" 2>&1
demo_rc=$?
tail -n 5 "$OUT/demo.txt"

# Llama-3.2-1B shapes: hidden 2048, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, draft vocab 32000
SHAPES=(--hidden 2048 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --draft-vocab 32000
        --seq-len 2048 --batch 16 --ttt-steps 3)
echo "== train step, compiled"
mo_flag=()
if [[ -n "$MO" ]]; then mo_flag=(--modelopt-python "$MO"); fi
timeout 120 "$PY" -m bench.perf.train_step "${SHAPES[@]}" --steps 10 "${mo_flag[@]}" > "$OUT/train_compiled.json" \
    2> "$OUT/train_compiled.err" || tail -n 20 "$OUT/train_compiled.err"
echo "== train step, eager"
timeout 50 "$PY" -m bench.perf.train_step "${SHAPES[@]}" --steps 5 --no-compile > "$OUT/train_eager.json" \
    2> "$OUT/train_eager.err" || tail -n 20 "$OUT/train_eager.err"
trainer_rate=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['tokens_per_s'])" \
    "$OUT/train_compiled.json" 2>/dev/null || echo 0)
echo "== loader, warm and cold synthetic shards at hidden 2048, 1 and 4 workers"
rate_flag=()
if [[ "$trainer_rate" != "0" ]]; then rate_flag=(--trainer-tokens-per-s "$trainer_rate"); fi
timeout 50 "$PY" -m bench.perf.loader --shape 1b --tokens 262144 --workers 1,4 --repeat 2 "${rate_flag[@]}" \
    > "$OUT/loader.json" 2> "$OUT/loader.err" || tail -n 20 "$OUT/loader.err"
echo "== dump part writer alone on 2 cores (8B feature sizes, 411 MB parts)"
timeout 40 taskset -c 0,1 "$PY" -m bench.perf.dump --writer-only --hidden 4096 --dtype bfloat16 --batch-tokens 8192 \
    --part-tokens 16384 --writer-parts 4 > "$OUT/writer.json" 2> "$OUT/writer.err" || tail -n 20 "$OUT/writer.err"

"$PY" - "$OUT" "$tests_rc" "$demo_rc" <<'PY'
import json, sys
from pathlib import Path
out, tests_rc, demo_rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def load(name):
    try:
        text = (out / name).read_text().strip()
        return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"error": f"{name}: {e}"}
def demo_acceptance():
    try:
        summary = json.loads((out / "demo.txt").read_text().strip().splitlines()[-1])
        return (f"acceptance {summary['acceptance_length']:.2f} at K={summary['draft_tokens']}, lossless "
                f"{summary['lossless']}, {summary['seconds']:.0f} s")
    except Exception as e:  # noqa: BLE001
        return f"FAILED (rc {demo_rc}): {e}, see demo.txt"
c, e, l = load("train_compiled.json"), load("train_eager.json"), load("loader.json")
w = load("writer.json")
mo = c.get("modelopt", {})
rows = [
    ("GPU", (out / "gpu.txt").read_text().strip()),
    ("CUDA tests (pytest -m cuda)", "passed" if tests_rc == "0" else f"FAILED (rc {tests_rc}), see tests.txt"),
    ("demo pipeline on the GPU (bf16, compiled)", demo_acceptance()),
    ("train step compiled, ms", f"{c.get('median_ms', float('nan')):.1f}"),
    ("train step eager, ms", f"{e.get('median_ms', float('nan')):.1f}"),
    ("compile speedup", f"{e.get('median_ms', float('nan')) / c.get('median_ms', float('nan')):.2f}x"),
    ("tokens/s compiled", f"{c.get('tokens_per_s', 0):,.0f}"),
    ("model TFLOP/s, MFU", f"{c.get('model_tflops', float('nan')):.0f}, {100 * c.get('mfu', float('nan')):.1f}% "
                           f"of {c.get('peak_tflops', 'n/a')}"),
    ("peak GPU memory GiB", f"{c.get('max_memory_gib', float('nan')):.1f}"),
    ("Model-Optimizer compiled, ms", f"{mo.get('median_ms', float('nan')):.1f}" if mo else "not run"),
    ("speedup vs Model-Optimizer", f"{c['speedup_vs_modelopt']:.2f}x" if "speedup_vs_modelopt" in c else "n/a"),
    *((f"loader tokens/s ({r['mode']}, {r['workers']} workers)", f"{r['tokens_per_s']:,.0f}")
      for r in l.get("runs", [])),
    ("loader workers needed (cold, wall)", f"{l.get('workers_needed_wall', {}).get('cold', float('nan')):.2f}"),
    ("part writer MB/s (wall, per CPU s)", f"{w.get('writer_MBps', float('nan')):,.0f}, "
                                          f"{w.get('writer_MBps_per_cpu_second', float('nan')):,.0f}"),
    ("writer: producer blocked at 500 MB/s", f"{100 * w.get('producer_blocked_fraction', float('nan')):.2f}%"),
]
width = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{width}}  {v}")
for d in (c, e, l, w):
    if "error" in d:
        print(d["error"])
PY
