"""User prompts written by the target itself (Magpie-style): more distinct training data when public data runs out.

    python -m bench.tools.selfgen_prompts --target work/smollm2/target --num 4000 --out prompts.jsonl \
        [--exclude mt_bench_question.jsonl] [--temperature 1.0 --top-p 0.95 --max-new-tokens 96]
    eagle-pipe regenerate --target work/smollm2/target --data prompts.jsonl --out regen/ --dtype bfloat16

An instruct model, given its chat template up to the start of a user turn, writes a plausible user request
(Magpie, Xu et al. 2024). The target samples `--num` of them (the template's system prompt, if it adds one by
default, is kept, as the target sees it at serving time); `regenerate` then answers them greedily. Prompts that
hit the token limit, are empty, repeat an earlier one, or share an 8-gram with an `--exclude` file (the
benchmark you judge on) are dropped and resampled. Writes one `{"messages": [{"role": "user", ...}]}` record
per line and prints a JSON summary. The draft-quality bench used it to ask whether more distinct data moves
acceptance past what the public files give (docs/quality.md, "More distinct data").
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def excluded_ngrams(paths: list[str]) -> set:
    """Every 8-gram of every user turn in `paths`, read as eval reads them (MT-bench `turns`, chat records...)."""
    from stages.data.prompts import read_questions

    questions, _ = read_questions(paths)
    if paths and not questions:
        sys.exit(f"selfgen_prompts: no questions in --exclude {' '.join(paths)}")
    return {g for q in questions for turn in q.user_turns for g in ngrams(turn)}


DROP_REASONS = ("length", "empty", "duplicate", "excluded")


def screen(text: str | None, seen: set[str], banned: set) -> str | None:
    """Why a sampled prompt (stripped) is dropped (one of DROP_REASONS), or None to keep it. `text` is None when the
    sample hit the token limit before ending its turn; `seen` holds the kept prompts, lower-cased."""
    if text is None:
        return "length"
    if not text:
        return "empty"
    if text.lower() in seen:
        return "duplicate"
    if ngrams(text) & banned:
        return "excluded"
    return None


def collect(sample_rows, decode, stop, num: int, banned: set, max_sampled_ratio: float, progress=None):
    """Sample batches of token rows (the tokens after the user-turn prefix) until `num` prompts are kept:
    (kept prompts, drop counts by reason, rows sampled). A row's prompt is its tokens up to the first stop id;
    a row with none hit the token limit. Exits with a message after `max_sampled_ratio * num` rows."""
    seen, kept, dropped, sampled = set(), [], dict.fromkeys(DROP_REASONS, 0), 0
    while len(kept) < num:
        if sampled >= max_sampled_ratio * num:
            sys.exit(f"selfgen_prompts: kept {len(kept)} of {sampled} sampled prompts (dropped: {dropped}); "
                     "the target rarely ends a user turn within --max-new-tokens: is it an instruct model?")
        for row in sample_rows():
            sampled += 1
            end = next((i for i, t in enumerate(row) if t in stop), None)
            text = None if end is None else decode(row[:end]).strip()
            reason = screen(text, seen, banned)
            if reason:
                dropped[reason] += 1
            else:
                seen.add(text.lower())
                kept.append(text)
        if progress:
            progress(len(kept))
    return kept[:num], dropped, sampled


def user_turn_prefix(tokenizer) -> str:
    """The rendered template up to where a user turn's text starts."""
    marker = "\u2063MARK\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[:text.index(marker)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sampled-ratio", type=float, default=20.0,
                   help="give up after sampling this many times --num prompts")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.regenerate.engines import stop_token_ids

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.dtype)).eval()
    stop = stop_token_ids(model, tokenizer, {})
    prefix = tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False, return_tensors="pt")["input_ids"]
    banned = excluded_ngrams(args.exclude)

    def sample_rows() -> list[list[int]]:
        rows = prefix.repeat(args.batch_size, 1)
        with torch.inference_mode():
            out = model.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True,
                                 temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                 eos_token_id=stop, pad_token_id=stop[0])
        return out[:, prefix.shape[1]:].tolist()

    start = time.time()
    kept, dropped, sampled = collect(sample_rows, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                     stop, args.num, banned, args.max_sampled_ratio,
                                     progress=lambda n: print(f"{n}/{args.num} prompts, {time.time() - start:.0f} s",
                                                              file=sys.stderr))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}, ensure_ascii=False)
                                   + "\n" for t in kept))
    print(json.dumps({"prompts": len(kept), "sampled": sampled, "dropped": dropped,
                      "mean_words": round(sum(len(t.split()) for t in kept) / len(kept), 1),
                      "seconds": round(time.time() - start, 1), "out": args.out}))


if __name__ == "__main__":
    main()
