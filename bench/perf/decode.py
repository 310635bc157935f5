"""The target's plain greedy decode speed: Hugging Face `generate()` with its default dynamic KV cache, at batch 1
and batched, on the first user turns of a question file; prints JSON. The baseline that a faster `regenerate`
(static cache, compiled decode step) and a faster `eval` (its greedy reference is this batch-1 decode) are
measured against.

    python -m bench.perf.decode --target work/smollm2/target --data mt_bench_question.jsonl --batch-sizes 1,32

Per batch size B: the first B questions' first turns, rendered with the chat template and the generation prompt,
left-padded into one batch; one warm-up generate (8 new tokens), then `--repeats` timed greedy generates of up
to `--max-new-tokens`. A row stops counting at its end-of-sequence token, but generate keeps stepping the whole
batch until every row is done, so three rates are reported: `tokens_per_s` (the rows' own tokens up to and
including their EOS, what regenerate keeps), `row_steps_per_s` (B x decode steps / s, the work done) and
`steps_per_s`. `prefill_s` is one forward over the padded prompts (last-position logits only, as generate's
prefill), timed on its own (included in the generate time). `cpu_s` is the process's CPU time for the generate (it tracks the work where wall time tracks the
neighbours' load on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.common import Stopwatch, add_save_flag, save_result


def first_turns(data: list[str], count: int) -> list[list[dict]]:
    from stages.data.prompts import read_questions

    questions, _ = read_questions(data, limit=count)
    if len(questions) < count:
        raise SystemExit(f"{data}: only {len(questions)} questions, {count} needed")
    return [q.conversation([]) for q in questions]


def measure(model, tokenizer, conversations, max_new_tokens: int, repeats: int) -> dict:
    import torch

    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=8, **greedy)  # warm-up
        t0 = time.perf_counter()
        model(**batch, logits_to_keep=1)  # as generate's prefill: the last position's logits only
        prefill_s = time.perf_counter() - t0
        runs = []
        for _ in range(repeats):
            with Stopwatch() as watch:
                out = model.generate(**batch, max_new_tokens=max_new_tokens, **greedy)
            seconds, cpu = watch.wall, watch.cpu
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            kept = [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in new]
            steps = len(new[0])
            runs.append({"seconds": seconds, "cpu_s": cpu, "steps": steps, "tokens": sum(kept),
                         "rows_at_limit": sum(k == max_new_tokens and new[r][-1] not in eos
                                              for r, k in enumerate(kept))})
    best = min(runs, key=lambda r: r["seconds"])
    return {"batch": len(conversations), "prompt_tokens": int(batch["attention_mask"].sum()),
            "padded_prompt_len": batch["input_ids"].shape[1], "max_new_tokens": max_new_tokens,
            "decode_steps": best["steps"], "tokens": best["tokens"], "rows_at_limit": best["rows_at_limit"],
            "seconds": round(best["seconds"], 2), "seconds_all": [round(r["seconds"], 2) for r in runs],
            "cpu_s": round(best["cpu_s"], 2), "prefill_s": round(prefill_s, 3),
            "tokens_per_s": round(best["tokens"] / best["seconds"], 1),
            "row_steps_per_s": round(len(conversations) * best["steps"] / best["seconds"], 1),
            "steps_per_s": round(best["steps"] / best["seconds"], 2),
            "median_seconds": round(statistics.median(r["seconds"] for r in runs), 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--data", action="append", required=True, help="question file(s) (MT-bench question.jsonl)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_save_flag(parser, "decode")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.dtype)).eval()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    conversations = first_turns(args.data, max(sizes))
    results = [measure(model, tokenizer, conversations[:b], args.max_new_tokens, args.repeats) for b in sizes]
    report = {"target": args.target, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
              "cache": "dynamic (generate's default)", "results": results}
    print(json.dumps(report, indent=1))
    if args.save:
        save_result(args.save, report)
    return report


if __name__ == "__main__":
    main()
