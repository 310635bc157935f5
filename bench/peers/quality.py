"""Draft quality at equal budget: eagle-pipe vs Model-Optimizer 0.47 vs speculators 0.9, one data set, one judge.

    python -m bench.peers.quality --target DIR --dump DUMP --work WORK --steps N --batch B --seq-len S --ttt-steps K \\
        --draft-vocab-size V --lr LR --warmup-steps W --bench mt_bench.jsonl --bench2 gsm8k.jsonl \\
        --num-prompts 80 --num-prompts2 80 --max-new-tokens 128 \\
        --modelopt-python .venv-modelopt/bin/python --speculators-python .venv-speculators/bin/python

Run it under the heavy-job lock: it trains three drafts and evaluates each on two benchmarks.

1. Data. eagle-pipe trains from DUMP (made by `eagle-pipe dump-teacher` from the regenerated conversations).
   bench/peers/quality_data.py writes the peers' input from the same dump: its token ids and loss masks (shifted into
   the peers' mask convention so that the three supervise the same positions), target states from a plain HF
   forward of TARGET (the dump's aux layers; the last hidden state before/after the final norm), and eagle-pipe's
   draft vocabulary (d2t from the dump's supervised-token counts), which both peers load instead of building
   their own. Nothing is held out (`--eval-fraction 0`; speculators' mandatory validation row is a copy).
2. Budget. The same optimizer steps N; positions per step: eagle-pipe B rows x S packed positions, speculators one
   packed row of B*S tokens, Model-Optimizer round(B*S / mean conversation length) conversations per step,
   each padded to the longest conversation (its collator pads; it does not pack). The same K (TTT steps), the
   same draft vocabulary (the same d2t), the same draft shape (Model-Optimizer's default layer shape is
   overridden with the target's, as speculators and eagle-pipe derive it), the same peak LR and the same
   schedule: W linear warmup steps then cosine to 0 over N steps (eagle-pipe `--min-lr-ratio 0`, HF
   `cosine`, speculators `cosine`). All fp32 on CPU, no compile (`--compile` compiles eagle-pipe's and
   Model-Optimizer's steps; speculators compiles only on CUDA). What stays each trainer's own (its recipe):
   loss (eagle-pipe: soft CE to the dump's top-k teacher, step weights 0.8^j; Model-Optimizer: soft CE to the
   full teacher softmax over the draft vocab, 0.9^j; speculators: KL to the draft-vocab teacher, 1.0^j), the
   optimizer (AdamW 0.9/0.95 clip 0.5; AdamW 0.9/0.999 clip 1.0; Muon + AdamW, clip 1.0), initialisation
   (eagle-pipe and Model-Optimizer: random lm_head; speculators starts it from the target's rows and keeps it
   frozen), and their
   export (Model-Optimizer writes a YaRN x32 rope_scaling at export by default; speculators saves bf16).
   The JSON's `budget` and `not_equal` sections record all of it.
3. Judge. `eagle-pipe eval` (real greedy chain speculative decoding against the target, lossless check) on both
   benchmarks with the same settings for all three drafts, called on each trainer's own export directory (eval
   reads the peers' layouts: eagle/draft_formats.py).

Prints one JSON object: per trainer, AL per benchmark (overall and per category), lossless, train wall time and
seconds per step, training-time accuracies; plus the budget and what could not be made equal.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.common import REPO, add_save_flag, log_line, offline_env, run_json, save_result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HF directory of the target (the one the dump was made with)")
    p.add_argument("--dump", required=True, help="eagle-pipe dump-teacher output")
    p.add_argument("--work", required=True, help="everything the bench writes (peer data, runs, exports)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps, every trainer")
    p.add_argument("--batch", type=int, default=4, help="eagle-pipe rows per step (positions/step = batch*seq-len)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--bench", required=True, help="first benchmark file (MT-bench question.jsonl)")
    p.add_argument("--bench2", default=None, help="second benchmark file (GSM8K test.jsonl, HumanEval, ...)")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--num-prompts2", type=int, default=None, help="default: --num-prompts")
    p.add_argument("--per-category", type=int, default=None,
                   help="judge on the first N questions of every category of --bench (MT-bench is ordered by "
                        "category, so --num-prompts alone would keep only its first categories)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft-tokens", type=int, default=None, help="eval K (default: --ttt-steps)")
    p.add_argument("--eval-batch-size", type=int, default=40,
                   help="turns eval decodes together (`eval --batch-size`; the accepted counts equal batch 1's)")
    p.add_argument("--trainers", default="eagle-pipe,modelopt,speculators")
    p.add_argument("--modelopt-python", default=str(REPO / ".venv-modelopt/bin/python"))
    p.add_argument("--speculators-python", default=str(REPO / ".venv-speculators/bin/python"))
    p.add_argument("--speculators-arch", choices=["plain", "default"], default="plain",
                   help="plain EAGLE-3 (what eval and SGLang run) or speculators' EAGLE-3.1 defaults")
    p.add_argument("--speculators-optimizer", choices=["muon", "adamw"], default="muon")
    p.add_argument("--modelopt-export-rope-scaling", choices=["recipe", "none"], default="recipe")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads per trainer (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--lock", default=None,
                   help="run every heavy step (data, each training, each eval) under `flock LOCK`, one at a time")
    p.add_argument("--out-json", default=None, help="also write the JSON here")
    add_save_flag(p, "quality")
    return p.parse_args(argv)


def train_eagle_pipe(args, work: Path) -> dict:
    run = work / "eagle-pipe"
    summary_path = run / "train_summary.json"
    if not summary_path.is_file():
        cmd = [sys.executable, "-m", "stages.cli", "train", "--teacher-dir", args.dump, "--out", str(run),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch), "--max-steps", str(args.steps),
               "--lr", repr(args.lr), "--warmup-steps", str(args.warmup_steps), "--min-lr-ratio", "0",
               "--ttt-steps", str(args.ttt_steps), "--draft-vocab-size", str(args.draft_vocab_size),
               "--eval-fraction", "0", "--eval-every", "0", "--save-every", str(max(1, args.steps // 4)),
               "--log-every", str(max(1, args.steps // 20)), "--num-workers", "1", "--seed", str(args.seed),
               "--precision", "fp32", "--compile" if args.compile else "--no-compile"]
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
            cmd.append("--resume")   # an interrupted bench run: continue from the newest checkpoint
        rc, _ = run_json(cmd, work / "logs" / "eagle-pipe-train.log", lock=args.lock, env=offline_env(args.threads))
        if rc:
            raise SystemExit(f"eagle-pipe train failed (exit {rc}); see {work / 'logs' / 'eagle-pipe-train.log'}")
    summary = json.loads(summary_path.read_text())
    final = summary.get("final_metrics") or {}
    every = max(1, args.steps // 20)   # each metrics record: the mean step of its log interval (data included)
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    steps_s = [args.batch * args.seq_len / r["tokens_per_s"] for r in records
               if r.get("tokens_per_s") and "eval_acceptance_length" not in r]
    return {"trainer": "eagle-pipe", "export_dir": summary["export_dir"], "steps": summary["steps"],
            "wall_s": round(summary["wall_time_s"], 2), "log_every": every,
            "median_step_s": round(statistics.median(steps_s[1:] or steps_s), 4) if steps_s else None,
            "train_acc_last": final.get("acc"), "train_loss_last": final.get("loss")}


def modelopt_batch(meta: dict, args) -> tuple[int, int]:
    """(conversations per step, train_len) giving Model-Optimizer about B*S real positions per step."""
    mean_len = meta["tokens"] / meta["conversations"]
    return max(1, round(args.batch * args.seq_len / mean_len)), int(meta["max_conversation_tokens"])


def train_peer(name: str, args, work: Path, peer_data: Path, meta: dict) -> dict:
    result_path = work / f"{name}.train.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    common = ["--peer-data", str(peer_data), "--target", args.target, "--work", str(work / name),
              "--steps", str(args.steps), "--ttt-steps", str(args.ttt_steps), "--lr", repr(args.lr),
              "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), "--json"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if name == "modelopt":
        b, train_len = modelopt_batch(meta, args)
        cmd = [args.modelopt_python, "-m", "bench.peers.modelopt.train", *common, "--batch", str(b),
               "--train-len", str(train_len), "--schedule", "cosine",
               "--export-rope-scaling", args.modelopt_export_rope_scaling] + (["--compile"] if args.compile else [])
    else:
        cmd = [args.speculators_python, "-m", "bench.peers.speculators.train", *common,
               "--total-seq-len", str(args.batch * args.seq_len), "--schedule", "cosine",
               "--arch", args.speculators_arch, "--optimizer", args.speculators_optimizer]
    rc, result = run_json(cmd, work / "logs" / f"{name}-train.log", lock=args.lock)
    if rc or result is None:
        raise SystemExit(f"{name} training failed (exit {rc}); see {work / 'logs' / (name + '-train.log')}")
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def bench_label(path: str) -> str:
    """mt_bench_question.jsonl -> mt_bench_question; gsm8k/test.jsonl -> gsm8k."""
    p = Path(path)
    stem = p.name.split(".")[0]
    return p.parent.name if stem in ("test", "question", "eval", "train") else stem


def eval_draft(args, work: Path, name: str, draft_dir: str, bench: str, num_prompts: int) -> dict:
    """`eagle-pipe eval` of one draft on one benchmark, cached in WORK/eval."""
    k = args.draft_tokens or args.ttt_steps
    tag = bench_label(bench)
    cache = work / "eval" / f"{name}.{tag}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cmd = [sys.executable, "-m", "stages.cli", "eval", "--target", args.target, "--draft", draft_dir, "--data", bench,
           "--num-prompts", str(num_prompts), "--max-new-tokens", str(args.max_new_tokens), "--draft-tokens", str(k),
           "--dtype", "float32", "--batch-size", str(args.eval_batch_size), "--json"]
    rc, report = run_json(cmd, work / "logs" / f"eval-{name}-{tag}.log", lock=args.lock, env=offline_env(args.threads))
    if report is None:
        logfile = work / "logs" / f"eval-{name}-{tag}.log"
        errors = [ln for ln in logfile.read_text().splitlines() if ln.startswith("Error")]
        return {"error": f"eval exit {rc}: {errors[-1] if errors else 'see ' + str(logfile)}"}
    out = {"acceptance_length": report.get("acceptance_length"), "lossless": report.get("lossless"),
           "num_prompts": report.get("num_prompts"), "num_turns": report.get("num_turns"),
           "per_position_conditional": report.get("per_position_conditional"),
           "per_category": {c: g.get("acceptance_length") for c, g in (report.get("per_category") or {}).items()},
           "speedup_cpu": report.get("speedup"), "eval_exit": rc}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1) + "\n")
    return out


def per_category_subset(path: str, n: int, work: Path) -> tuple[str, int]:
    """The first n records of each `category` of a question file, in file order; (new path, record count)."""
    kept, seen = [], {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            cat = json.loads(line).get("category", "uncategorized")
            if seen.get(cat, 0) < n:
                seen[cat] = seen.get(cat, 0) + 1
                kept.append(line)
    out = work / f"{bench_label(path)}.first{n}per-category.jsonl"
    out.write_text("\n".join(kept) + "\n")
    return str(out), len(kept)


def judge(args, work: Path, name: str, export_dir: str) -> dict:
    """Eval on the trainer's own export, on each benchmark."""
    benches = [(args.bench, args.num_prompts)] + \
        ([(args.bench2, args.num_prompts2 or args.num_prompts)] if args.bench2 else [])
    return {"draft_dir": export_dir,
            **{bench_label(b): eval_draft(args, work, name, export_dir, b, n) for b, n in benches}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.per_category:
        args.bench, args.num_prompts = per_category_subset(args.bench, args.per_category, work)
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    peer_data = work / "peer-data"
    meta = {}
    if set(trainers) - {"eagle-pipe"}:
        log_line("writing the peers' input from the dump (plain HF forward of the target)")
        rc, meta = run_json([sys.executable, "-m", "bench.peers.quality_data", "--target", args.target, "--dump",
                             args.dump, "--out", str(peer_data), "--draft-vocab-size", str(args.draft_vocab_size)],
                            work / "logs" / "peer-data.log", lock=args.lock, env=offline_env(args.threads))
        if rc or meta is None:
            raise SystemExit(f"writing the peers' input failed (exit {rc}); see {work / 'logs' / 'peer-data.log'}")
    results = {}
    for name in trainers:
        log_line(f"training {name}")
        results[name] = train_eagle_pipe(args, work) if name == "eagle-pipe" else \
            train_peer(name, args, work, peer_data, meta)
    if "eagle-pipe" in results and meta:   # one vocabulary: eagle-pipe's exported d2t is the peers' d2t
        from safetensors.torch import load_file
        ours = load_file(str(Path(results["eagle-pipe"]["export_dir"]) / "model.safetensors"))["d2t"]
        theirs = load_file(str(peer_data / "vocab.safetensors"))["d2t"]
        results["eagle-pipe"]["same_d2t_as_peers"] = bool(ours.shape == theirs.shape and (ours == theirs).all())
    if not args.skip_eval:
        for name, trained in results.items():
            log_line(f"judging {name}")
            trained["eval"] = judge(args, work, name, trained["export_dir"])
    table = {}
    for name, trained in results.items():
        evals = trained.get("eval") or {}
        table[name] = {bench: {"AL": report.get("acceptance_length"), "lossless": report.get("lossless"),
                               "per_category": report.get("per_category")}
                       for bench, report in evals.items() if isinstance(report, dict)}
        table[name]["train_wall_s"] = trained.get("wall_s")
        table[name]["median_step_s"] = trained.get("median_step_s")
        table[name]["train_acc_last"] = trained.get("train_acc_last") or trained.get("train_acc_last10pct") or \
            trained.get("train_acc_last_log")
    if meta:
        conversations, padded_to = modelopt_batch(meta, args)
        mean_tokens = meta.get("tokens", 0) / max(1, meta.get("conversations", 1))
        modelopt_positions = f"{conversations} conversations (mean {mean_tokens:.0f} tokens) padded to {padded_to}"
    else:
        modelopt_positions = None
    out = {
        "table": table,
        "budget": {"optimizer_steps": args.steps, "ttt_steps": args.ttt_steps,
                   "draft_vocab_size": args.draft_vocab_size,
                   "lr": args.lr, "schedule": f"linear warmup {args.warmup_steps} steps, cosine to 0 over {args.steps}",
                   "positions_per_step": {"eagle-pipe": args.batch * args.seq_len,
                                          "speculators": args.batch * args.seq_len,
                                          "modelopt": modelopt_positions},
                   "data": {k: meta.get(k) for k in ("conversations", "tokens", "supervised_positions",
                                                      "aux_layer_ids", "aux_max_rel_error_vs_dump")},
                   "eval": {"bench": args.bench, "bench2": args.bench2, "max_new_tokens": args.max_new_tokens,
                            "draft_tokens": args.draft_tokens or args.ttt_steps,
                            "num_prompts": args.num_prompts, "num_prompts2": args.num_prompts2 or args.num_prompts,
                            "dtype": "float32"},
                   "compile": args.compile},
        "not_equal": {
            "teacher": "eagle-pipe: the dump's top-k; Model-Optimizer and speculators: the full softmax over the "
                       "draft vocab, recomputed from the last hidden state every step",
            "loss": "eagle-pipe soft CE x 0.8^j; Model-Optimizer soft CE x 0.9^j; speculators KL x 1.0^j",
            "optimizer": "eagle-pipe AdamW(0.9, 0.95) clip 0.5; Model-Optimizer HF AdamW(0.9, 0.999) clip 1.0; "
                         f"speculators {args.speculators_optimizer} (+AdamW) wd 0.01 clip 1.0",
            "init": "eagle-pipe and Model-Optimizer: random lm_head; speculators: lm_head from the target, frozen",
            "positions_per_step": "Model-Optimizer does not pack: whole conversations per step, padded",
            "export": {"modelopt_rope_scaling": args.modelopt_export_rope_scaling,
                       "speculators_arch": args.speculators_arch,
                       "speculators_dtype": "bfloat16 (its save_pretrained)"},
        },
        "trainers": results,
    }
    text = json.dumps(out, indent=1)
    if args.out_json:
        Path(args.out_json).write_text(text + "\n")
    if args.save:
        save_result(args.save, out)
    print(text)
    return out


if __name__ == "__main__":
    main()
