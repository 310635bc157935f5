"""Batched speculative decoding (`eagle-pipe eval --batch-size N`): where a batch's time goes; prints JSON.

    python -m bench.perf.eval_batch --target work/smollm2/target --draft work/smollm2/run/export \\
        --data mt_bench_question.jsonl --batch-size 40 --arms stay,leave

The first N questions' first turns, rendered with the chat template, decoded together by
`stages.evaluate.batched.speculative_generate_batch` (greedy, K draft tokens, up to --max-new-tokens), once per
arm, all in one process: `stay` keeps finished rows in the batch to its end (one kept token per round), `leave`
(eval's default, `FINISHED_ROWS_LEAVE`) drops each row after the round it finishes. Every arm decodes the same
tokens (checked). Per arm: `seconds`, `rounds` (verification forwards), `row_rounds` (rows
computed, summed over rounds) and `row_rounds_used` (rounds of rows that were still decoding). And the
`prefill_s` of the batch, timed once as a run of one new token: its rows, sorted by length, go through the
target `prefill_rows` at a time, each group padded to its own longest prompt (`prefill_positions` computed for
`prompt_tokens` real ones; `padded_prompt_tokens` is what padding the whole batch would compute).
"""
from __future__ import annotations

import argparse
import json
import time

from bench.common import add_save_flag, save_result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HF directory of the target")
    p.add_argument("--draft", required=True, help="exported draft directory")
    p.add_argument("--data", required=True, help="question file (MT-bench question.jsonl or any eval format)")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft-tokens", type=int, default=3)
    p.add_argument("--arms", default="stay,leave", help="comma-separated: stay, leave (each may repeat)")
    add_save_flag(p, "eval-batch")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    import stages.evaluate.batched as batched
    from stages.evaluate.stage import eos_token_ids, load_draft_for, load_prompts, load_target, render_prompt

    model, tokenizer = load_target(args.target, torch.float32, "cpu", trust_remote_code=False)
    draft = load_draft_for(model, args.draft, "cpu")
    questions, _ = load_prompts([args.data], tokenizer, args.batch_size)
    prompts = [render_prompt(tokenizer, q.conversation([]), q.where) for q in questions]
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    target = batched.BatchedTarget(model, draft.cfg.aux_layer_ids)

    def decode(prompts, new_tokens):
        return batched.speculative_generate_batch(target, draft, prompts, max_new_tokens=new_tokens,
                                                  draft_tokens=args.draft_tokens, eos_ids=eos, pad_id=pad)

    rows_per_round = []
    keep_first = target.keep_first
    target.keep_first = lambda counts: (rows_per_round.append(len(counts)), keep_first(counts))
    decode(prompts[:2], 2)  # warm-up
    _, prefill_s = decode(prompts, 1)
    lengths = sorted(map(len, prompts))
    groups = [lengths[i:i + batched.PREFILL_ROWS] for i in range(0, len(lengths), batched.PREFILL_ROWS)]
    report = {"batch_size": len(prompts), "max_new_tokens": args.max_new_tokens, "draft_tokens": args.draft_tokens,
              "prompt_tokens": sum(lengths), "padded_prompt_tokens": len(lengths) * lengths[-1],
              "prefill_positions": sum(len(g) * g[-1] for g in groups), "prefill_rows": batched.PREFILL_ROWS,
              "prefill_s": round(prefill_s, 3), "arms": []}
    arms = args.arms.split(",")
    if not set(arms) <= {"stay", "leave"}:
        raise SystemExit(f"--arms {args.arms}: the arms are stay and leave")
    tokens = None
    try:
        for arm in arms:
            batched.FINISHED_ROWS_LEAVE = arm == "leave"
            rows_per_round.clear()
            start = time.process_time()
            results, seconds = decode(prompts, args.max_new_tokens)
            got = [r.tokens for r in results]
            if tokens is not None and got != tokens:
                raise SystemExit(f"arm {arm} decoded other tokens than the first arm")
            tokens = got
            report["arms"].append({"arm": arm, "seconds": round(seconds, 3),
                                   "cpu_s": round(time.process_time() - start, 3), "rounds": len(rows_per_round),
                                   "row_rounds": sum(rows_per_round),
                                   "row_rounds_used": sum(len(r.accepted) for r in results),
                                   "new_tokens": sum(map(len, got))})
    finally:
        batched.FINISHED_ROWS_LEAVE = True
        target.remove()
    for arm in report["arms"]:
        arm["speedup_vs_first"] = round(report["arms"][0]["seconds"] / arm["seconds"], 3)
    print(json.dumps(report))
    if args.save:
        save_result(args.save, report)
    return report


if __name__ == "__main__":
    main()
