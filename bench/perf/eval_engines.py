"""The HF and vLLM engines side by side, on the same inputs, in one run; prints JSON.

    python -m bench.perf.eval_engines regenerate --target T --data D [--records 40] [--max-new-tokens 128]
    python -m bench.perf.eval_engines eval --target T --draft RUN/export --data Q [--num-prompts 80] [--hf-batch-size 40]
        [--hf-report REPORT]

`regenerate`: `regenerate`'s two in-process engines (stages/regenerate/engines.py: HFEngine, VllmEngine) answer
the first user turn of the first `--records` records of `--data` (the same rendered prompts, greedy): engine start
and generation seconds (after a warm-up on two requests), generated tokens and tokens/s of each, and which
answers differ (the first differing
character and both texts' lengths). Engines run one after the other, the first freed before the second starts.

`eval`: `eagle-pipe eval --engine hf` and `--engine vllm` (subprocesses, reports kept under --out) on the same
questions, then what differs: acceptance length, per-position acceptance and counts, per category; per turn
whether the outputs are identical and, where not, the first differing token and its position, and whether the
verification steps agree up to there.

`eval --lock FILE` takes the heavy-job lock (flock) around each eval; run `regenerate` (in-process engines) under
it: `flock /tmp/eagle-heavy.lock python -m bench.perf.eval_engines regenerate ...`.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from bench.common import add_save_flag, log_line, run_json, save_result


# ------------------------------------------------------------------------------------------------ regenerate
def first_turn_requests(data: str, count: int):
    """Requests for the first user turn (with any system turn) of the first `count` chat records of `data`."""
    from stages.data.records import RecordError, parse_record, read_records
    from stages.regenerate.engines import Request
    from stages.regenerate.stage import prompt_segments

    requests = []
    for index, _, record in read_records([data]):
        try:
            kind, payload = parse_record(record)
        except RecordError:
            continue
        segments = prompt_segments(payload) if kind == "chat" else []
        if segments:
            requests.append(Request(segments[0], seed=index))
        if len(requests) >= count:
            break
    return requests


def timed_engine(make, requests) -> tuple[dict, dict]:
    """Start an engine, answer every request once; (its numbers, {position: Response})."""
    started = time.perf_counter()
    engine = make()
    start = time.perf_counter() - started
    list(engine.generate(requests[:2]))  # warm-up outside the timing (first-call allocations, lazy inits)
    t0 = time.perf_counter()
    out = dict(engine.generate(requests))
    seconds = time.perf_counter() - t0
    tokens = sum(r.num_tokens for r in out.values())
    result = {"engine": engine.describe(), "start_seconds": start, "seconds": seconds, "generated_tokens": tokens,
              "tokens_per_s": tokens / seconds,
              "finish_reasons": {k: sum(r.finish_reason == k for r in out.values()) for k in ("stop", "length")}}
    log_line(f"{result['engine']['kind']}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s), "
             f"start {start:.1f} s")
    if hasattr(engine, "llm"):  # vLLM: shut its processes down before anything else runs
        try:
            engine.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
    del engine
    gc.collect()
    return result, out


def compare_texts(args: dict, b: dict) -> list[dict]:
    """Where two engines' answers differ: position, first differing character, the lengths."""
    diffs = []
    for i in sorted(args):
        x, y = args[i].text, b[i].text
        if x != y:
            at = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            diffs.append({"request": i, "first_different_char": at, "hf_chars": len(x), "vllm_chars": len(y),
                          "hf_tokens": args[i].num_tokens, "vllm_tokens": b[i].num_tokens,
                          "hf_after": x[max(0, at - 20):at + 40], "vllm_after": y[max(0, at - 20):at + 40]})
    return diffs


def bench_regenerate(args) -> dict:
    from stages.regenerate.engines import Decoding, HFEngine, VllmEngine
    from stages.vllm_runtime import VllmOptions

    requests = first_turn_requests(args.data, args.records)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    hf, hf_out = timed_engine(lambda: HFEngine(args.target, decoding, dtype=args.dtype, batch_size=args.hf_batch_size),
                              requests)
    options = VllmOptions(gpu_memory_utilization=args.gpu_memory_utilization)
    served, vllm_out = timed_engine(lambda: VllmEngine(args.target, decoding, dtype=args.dtype, vllm=options), requests)
    diffs = compare_texts(hf_out, vllm_out)
    return {"target": args.target, "data": args.data, "records": len(requests), "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype, "hf": hf, "vllm": served, "vllm_over_hf_tokens_per_s":
            served["tokens_per_s"] / hf["tokens_per_s"], "identical_answers": len(requests) - len(diffs),
            "differences": diffs}


# ------------------------------------------------------------------------------------------------ eval
def compare_reports(hf: dict, served: dict) -> dict:
    """What differs between the two eval reports of the same questions (see the module docstring)."""
    turns = []
    for x, y in zip(hf["per_prompt"], served["per_prompt"]):
        assert (x["question"], x["turn"]) == (y["question"], y["turn"])
        a, b = x["output_tokens"], y["output_tokens"]
        if a == b:
            same_steps = x["accepted"] == y["accepted"]
            turns.append({"question": x["question"], "turn": x["turn"], "identical": True,
                          "same_steps": same_steps})
            continue
        at = next((j for j, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))

        def steps_to(accepted):  # verification steps that produced the first `at` new tokens
            made, n = 1, 0
            for n, acc in enumerate(accepted, 1):
                if made >= at:
                    return accepted[:n - 1]
                made += acc + 1
            return accepted

        turns.append({"question": x["question"], "turn": x["turn"], "identical": False,
                      "first_difference": at, "hf_token": a[at] if at < len(a) else None,
                      "vllm_token": b[at] if at < len(b) else None,
                      "steps_agree_before": steps_to(x["accepted"]) == steps_to(y["accepted"])})
    keys = ("acceptance_length", "per_position_acceptance", "per_position_conditional", "target_forwards",
            "tokens_per_s", "baseline_tokens_per_s", "speedup", "lossless")
    return {"hf": {k: hf[k] for k in keys}, "vllm": {k: served[k] for k in keys},
            "vllm_counters": served["vllm"]["counters"],
            "acceptance_length_gap": served["acceptance_length"] / hf["acceptance_length"] - 1,
            "per_category": {c: {"hf": hf["per_category"][c]["acceptance_length"],
                                 "vllm": served["per_category"].get(c, {}).get("acceptance_length")}
                             for c in hf["per_category"]},
            "turns": len(turns), "identical_outputs": sum(t["identical"] for t in turns),
            "identical_with_same_steps": sum(t["identical"] and t["same_steps"] for t in turns),
            "different": [t for t in turns if not t["identical"]]}


def bench_eval(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["eval", "--target", args.target, "--draft", args.draft, "--data", args.data,
              "--num-prompts", args.num_prompts, "--max-new-tokens", args.max_new_tokens,
              "--draft-tokens", args.draft_tokens, "--dtype", args.dtype, "--json"]
    reports = {"hf": json.loads(Path(args.hf_report).read_text())} if args.hf_report else {}
    for engine, extra in (("hf", ["--batch-size", args.hf_batch_size]),
                          ("vllm", ["--gpu-memory-utilization", args.gpu_memory_utilization])):
        if engine in reports:
            continue
        path = out / f"eval_{engine}.json"
        started = time.perf_counter()
        rc, _ = run_json([sys.executable, "-m", "stages.cli", *map(str, common), "--engine", engine,
                          *map(str, extra), "--report", str(path)], out / f"eval_{engine}.log", lock=args.lock)
        if rc not in (0, 2) or not path.is_file():  # 2: a failed lossless check, whose report is still written
            raise SystemExit(f"eval --engine {engine} failed (exit {rc}); see {out / f'eval_{engine}.log'}")
        log_line(f"eval --engine {engine}: {time.perf_counter() - started:.0f} s")
        reports[engine] = json.loads(path.read_text())
    return {"target": args.target, "draft": args.draft, "data": args.data, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "draft_tokens": args.draft_tokens, "dtype": args.dtype,
            "hf_batch_size": args.hf_batch_size,
            "reports": {e: args.hf_report if e == "hf" and args.hf_report else str(out / f"eval_{e}.json")
                        for e in reports},
            **compare_reports(reports["hf"], reports["vllm"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("regenerate", "eval"):
        s = sub.add_parser(name)
        s.add_argument("--target", required=True)
        s.add_argument("--data", required=True)
        s.add_argument("--max-new-tokens", type=int, default=128)
        s.add_argument("--dtype", default="float32")
        s.add_argument("--hf-batch-size", type=int, default=40)
        s.add_argument("--gpu-memory-utilization", type=float, default=0.2)
        add_save_flag(s, f"engines-{name}")
    r = sub.choices["regenerate"]
    r.add_argument("--records", type=int, default=40)
    e = sub.choices["eval"]
    e.add_argument("--draft", required=True)
    e.add_argument("--num-prompts", type=int, default=80)
    e.add_argument("--draft-tokens", type=int, default=3)
    e.add_argument("--out", required=True, help="folder for the two reports and logs")
    e.add_argument("--hf-report", default=None,
                   help="an `eval --engine hf` report to compare against instead of running hf (the same draft, "
                        "e.g. before `eagle-pipe export --target` rewrote its layout)")
    e.add_argument("--lock", default=None, help="heavy-job lock file (flock) around each eval, e.g. "
                                                 "/tmp/eagle-heavy.lock")
    args = p.parse_args(argv)
    result = bench_regenerate(args) if args.what == "regenerate" else bench_eval(args)
    print(json.dumps(result))
    if args.save:
        save_result(args.save, result)
    return result


if __name__ == "__main__":
    main()
