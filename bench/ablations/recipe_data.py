"""Data for recipe ablations (bench/ablations/recipe.py), made from files the pipeline already reads; prints JSON.

    python -m bench.ablations.recipe_data heldout vicuna_bench_question.jsonl --exclude mt_bench_question.jsonl \
        --out held.jsonl
    python -m bench.ablations.recipe_data mix REGEN_DIR [REGEN_DIR ...] --out mix.jsonl [--seed 0]
    python -m bench.ablations.recipe_data split dummy_conversation.json --out DIR   # DIR/original.jsonl, eval.jsonl

`heldout`: benchmark question files (MT-bench / Vicuna-bench / EAGLE `question.jsonl`: {"turns": [...]}) ->
prompt-only chat records ({"messages": [{"role": "user", ...}]}) that `eagle-pipe regenerate` answers: a
held-out set for screening recipes by the simulated acceptance length `train --eval-teacher-dir` reports. Only
each question's first turn is kept (later turns refer to an answer). A question whose text equals (case- and
whitespace-insensitively) any turn of an `--exclude` file is dropped (Vicuna-bench shares two questions with
MT-bench, the judge, which must never be trained or screened on); the count is printed.

`mix`: the conversations of one or more `eagle-pipe regenerate` outputs (read by the pipeline's own reader),
shuffled with a fixed seed into one messages JSONL, so that `dump-teacher --limit N` takes N conversations of
the same composition for every N (the data-size arms). `--answers original` writes the same conversations (same
system and user turns, same order after the shuffle) with the data's own answers instead of the target's, read
from the sources named in each regenerate manifest: Alpaca `output`; ShareGPT/OpenAI assistant turns in order,
then a DPO record's `chosen` answer. A conversation whose answer count differs is dropped (and counted).

`split`: a chat corpus (any file the pipeline reads) -> DIR/eval.jsonl, held-out user prompts (user texts, any
turn, seen at most `--max-prompt-count` times, whose sha256 falls in `--eval-fraction`), and DIR/original.jsonl,
the first `--train-records` conversations containing none of them: the data of plans/regenerate-demo.yaml.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def read_questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def heldout(sources: list[Path], exclude: list[Path]) -> tuple[list[dict], int]:
    banned = {normal(t) for p in exclude for q in read_questions(p) for t in q["turns"]}
    records, dropped = [], 0
    for path in sources:
        for q in read_questions(path):
            first = q["turns"][0]
            if normal(first) in banned:
                dropped += 1
                continue
            records.append({"messages": [{"role": "user", "content": first}]})
    return records, dropped


def original_answers(raw) -> list[str]:
    """The data's own assistant answers of a source record, in order (Alpaca, ShareGPT(+DPO chosen), OpenAI)."""
    if "output" in raw and "instruction" in raw:
        return [raw["output"]]
    if raw.get("messages") is not None:
        return [m["content"] for m in raw["messages"] if m.get("role") == "assistant"]
    answers = [t["value"] for t in raw.get("conversations") or [] if t.get("from") in ("gpt", "assistant")]
    chosen = raw.get("chosen")
    if isinstance(chosen, dict) and chosen.get("value"):
        answers.append(chosen["value"])
    return answers


def mix(regen_dirs: list[Path], seed: int, answers: str = "regenerated") -> tuple[list[dict], int]:
    """(shuffled conversations, dropped): the regenerated conversations, or the same with the original answers."""
    from stages import shards
    from stages.data.records import parse_record, read_records

    records, dropped = [], 0
    for d in regen_dirs:
        originals = {}
        if answers == "original":
            sources = shards.read_json(Path(d) / "manifest.json")["settings"]["data"]
            originals = {index: raw for index, _, raw in read_records(sources)}
        for _, where, raw in read_records([str(d)]):
            kind, messages = parse_record(raw)
            if kind != "chat":
                raise SystemExit(f"{where}: not a conversation ({kind})")
            if answers == "original":
                own = original_answers(originals[int(raw["source"]["sample_index"])])
                turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
                if len(own) != len(turns) or not all(isinstance(a, str) and a.strip() for a in own):
                    dropped += 1
                    records.append(None)  # keeps the shuffle's permutation equal to the regenerated mix's
                    continue
                messages = [dict(m) for m in messages]
                for i, answer in zip(turns, own):
                    messages[i]["content"] = answer
            records.append({"messages": messages})
    random.Random(seed).shuffle(records)
    return [r for r in records if r is not None], dropped


def load_chats(path: Path) -> list[list[dict]]:
    """The chat records of a file, as the pipeline reads them (other kinds and unreadable records skipped)."""
    from stages.data.records import parse_record, read_records

    chats = []
    for _, _, record in read_records([str(path)]):
        try:
            kind, messages = parse_record(record)
        except Exception:
            continue
        if kind == "chat":
            chats.append(messages)
    return chats


def split(chats: list[list[dict]], eval_fraction: float, max_count: int) -> tuple[list[list[dict]], list[str]]:
    """(training conversations, held-out prompts): a user text is held out when it is seen at most `max_count`
    times and its hash falls in the eval fraction; a conversation is kept for training when it has none."""
    counts = Counter(m["content"] for c in chats for m in c if m["role"] == "user")

    def held(text):
        h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
        return counts[text] <= max_count and h < eval_fraction

    held_out = sorted({t for t in counts if held(t)})
    train = [c for c in chats if not any(m["role"] == "user" and held(m["content"]) for m in c)]
    return train, held_out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("heldout")
    h.add_argument("sources", nargs="+", type=Path)
    h.add_argument("--exclude", action="append", type=Path, default=[])
    h.add_argument("--out", required=True, type=Path)
    m = sub.add_parser("mix")
    m.add_argument("regen_dirs", nargs="+", type=Path)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--answers", choices=["regenerated", "original"], default="regenerated")
    m.add_argument("--out", required=True, type=Path)
    sp = sub.add_parser("split")
    sp.add_argument("data", type=Path)
    sp.add_argument("--out", required=True, type=Path, help="folder for original.jsonl and eval.jsonl")
    sp.add_argument("--train-records", type=int, default=400)
    sp.add_argument("--eval-fraction", type=float, default=0.25)
    sp.add_argument("--max-prompt-count", type=int, default=20)
    args = p.parse_args(argv)
    if args.cmd == "heldout":
        records, dropped = heldout(args.sources, args.exclude)
        write_jsonl(args.out, records)
        print(json.dumps({"out": str(args.out), "records": len(records), "dropped_as_excluded": dropped}))
    elif args.cmd == "split":
        train, held_out = split(load_chats(args.data), args.eval_fraction, args.max_prompt_count)
        train = train[: args.train_records]
        write_jsonl(args.out / "original.jsonl", [{"messages": c} for c in train])
        write_jsonl(args.out / "eval.jsonl", [{"messages": [{"role": "user", "content": t}]} for t in held_out])
        print(json.dumps({"out": str(args.out), "train_records": len(train), "held_out_prompts": len(held_out)}))
    else:
        records, dropped = mix(args.regen_dirs, args.seed, args.answers)
        write_jsonl(args.out, records)
        print(json.dumps({"out": str(args.out), "records": len(records), "dropped": dropped}))


if __name__ == "__main__":
    main()
