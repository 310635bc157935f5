"""How fast `eagle-pipe regenerate --engine hf` decodes; prints JSON. (What regenerating buys in acceptance is the
recipe plan bench/ablations/plans/regenerate-demo.yaml.)

    python -m bench.perf.regenerate --data mt_bench_question.jsonl [--target examples/demo/target] [--save]

`--engine hf` tokens/s over the first user turns of `--data` (any file eval reads, e.g. MT-bench's
question.jsonl), in three modes: `dynamic` (transformers' generate() on a dynamic cache: the engine before the
static cache), `static` (a static KV cache, eager) and `compiled` (static cache + compiled decode step, the
default; its first pass compiles and is reported apart), against the bare batched-decode bound: a compiled
static-cache decode step of the engine's first batch (same rows, same cache-length bucket) with no generation
bookkeeping. Also checks that the greedy texts agree across modes (and with one-at-a-time generate() under
`--single`). `--dtype bfloat16` times the target in bf16 (on CPUs with AMX, about 2.5x fp32 here: decode reads the
weights once per step for the whole batch, in half the bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import REPO, add_save_flag, save_result


def bench_prompts(data: str, count: int) -> list[list[dict]]:
    """The first user turn (with any system turn before it) of the first `count` distinct questions."""
    from stages.data.prompts import read_questions

    seen, prompts = set(), []
    for q in read_questions([data])[0]:
        turns = q.conversation([])
        key = json.dumps(turns)
        if key not in seen:
            seen.add(key)
            prompts.append(turns)
        if len(prompts) >= count:
            break
    return prompts


def engine_run(engine, requests, label: str) -> dict:
    """One timed pass of the engine over all requests: tokens/s, and the batches' row utilization."""
    t0 = time.perf_counter()
    out = dict(engine.generate(requests))
    seconds = time.perf_counter() - t0
    tokens = sum(r.num_tokens for r in out.values())
    print(f"{label}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s)", file=sys.stderr)
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "finish_reasons": {k: sum(r.finish_reason == k for r in out.values()) for k in ("stop", "length")},
            "texts": [out[i].text for i in range(len(requests))]}


def decode_bound(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, steps: int) -> dict:
    """The bare batched-decode bound: the same rows, left-padded and prefilled into a static cache of the engine's
    length bucket, then `steps` one-token steps of a compiled forward (fullgraph, fixed shapes) with the argmax fed
    back: no logits processors, stopping checks, input_ids bookkeeping or early-finished rows."""
    import torch
    from transformers import StaticCache

    from stages.static_cache import bucket

    rows, width = len(prompts), max(len(p) for p in prompts)
    length = bucket(width + max_new_tokens)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1  # the prompt and every position after it
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=length)

    def step(token, position):
        out = model(input_ids=token, position_ids=position, attention_mask=mask, cache=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
        token, position = out.logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:] + 1
        t0 = time.perf_counter()
        token = compiled(token, position)  # compiles
        compile_seconds = time.perf_counter() - t0
        steps = min(steps, length - width - 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            position = position + 1
            token = compiled(token, position)
        seconds = time.perf_counter() - t0
    return {"rows": rows, "cache_length": length, "steps": steps, "step_ms": 1e3 * seconds / steps,
            "tokens_per_s": rows * steps / seconds, "compile_seconds": compile_seconds}


def throughput(args) -> dict:
    """`--engine hf` tokens/s before (dynamic cache), with a static cache (eager) and compiled, against the bare
    batched-decode bound at the same batch; greedy texts compared across the three (and one prompt at a time)."""
    import torch

    from stages.regenerate.engines import Decoding, HFEngine, Request
    from stages.static_cache import bucket

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = bench_prompts(args.data, args.prompts)
    engine = HFEngine(args.target, Decoding(max_new_tokens=args.max_new_tokens), device="cpu", dtype=args.dtype,
                      batch_size=args.batch_size)
    requests = [Request(p, 0) for p in prompts]
    ids = [engine.render(p) for p in prompts]
    result = {"bench": "regenerate-throughput", "target": args.target, "data": args.data, "prompts": len(prompts),
              "prompt_tokens": sum(map(len, ids)), "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "load_before": open("/proc/loadavg").read().split()[:3],
              "engine": {}}
    modes = {"dynamic": (False, False), "static": (True, False), "compiled": (True, True)}
    texts = {}
    for name in args.modes.split(","):
        engine.static_cache, engine.compile = modes[name]
        if name == "compiled":  # first pass compiles (once per rows x cache bucket); the second is timed
            first = engine_run(engine, requests, "compiled, first pass")
        else:
            list(engine.generate(requests[:2]))  # warm-up
            first = None
        run = engine_run(engine, requests, name)
        texts[name] = run.pop("texts")
        if first is not None:
            run["first_pass_seconds"] = first["seconds"]
            run["compile_seconds_estimate"] = first["seconds"] - run["seconds"]
        result["engine"][name] = run

    model = engine.model
    batch = sorted(ids, key=len)[: args.batch_size]  # the engine's first batch: the shortest prompts
    result["bound"] = decode_bound(model, batch, engine.pad_id, args.max_new_tokens, args.bound_steps)
    for name, run in result["engine"].items():
        run["fraction_of_bound"] = run["tokens_per_s"] / result["bound"]["tokens_per_s"]
    names = list(texts)
    result["greedy_texts_identical"] = {f"{x}=={y}": f"{sum(p == q for p, q in zip(texts[x], texts[y]))}/{len(prompts)}"
                                        for x, y in zip(names, names[1:])}
    if args.single:
        t0, single = time.perf_counter(), []
        for p in ids:
            with torch.inference_mode():
                new = model.generate(torch.tensor([p]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                     eos_token_id=engine.stop_ids, pad_token_id=engine.pad_id)[0, len(p):].tolist()
            stop = bool(new) and new[-1] in engine.stop_ids
            single.append(engine.tokenizer.decode(new[:-1] if stop else new, skip_special_tokens=False))
        result["one_at_a_time_seconds"] = time.perf_counter() - t0
        result["greedy_texts_identical"].update({f"{x}==one_at_a_time": f"{sum(p == q for p, q in zip(texts[x], single))}/{len(prompts)}"
                                                 for x in names})
    result["cache_length_buckets"] = sorted({bucket(len(p) + args.max_new_tokens) for p in ids})
    result["load_after"] = open("/proc/loadavg").read().split()[:3]
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--target", default=str(REPO / "examples" / "demo" / "target"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the target's dtype")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, the cores)")
    p.add_argument("--modes", default="dynamic,static,compiled",
                     help="engine modes to time: dynamic (before: HF generate on a dynamic cache), static, compiled")
    p.add_argument("--bound-steps", type=int, default=64, help="decode steps timed for the bound")
    p.add_argument("--single", action="store_true", help="also generate one prompt at a time (slow) and compare")
    add_save_flag(p, "regenerate-throughput")
    args = p.parse_args(argv)
    result = throughput(args)
    print(json.dumps(result, indent=1))
    if args.save:
        save_result(args.save, result)
    return result


if __name__ == "__main__":
    main()
