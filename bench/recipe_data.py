"""Data for recipe ablations (bench/recipe.py), made from files the pipeline already reads; prints JSON.

    python bench/recipe_data.py heldout vicuna_bench_question.jsonl --exclude mt_bench_question.jsonl --out held.jsonl
    python bench/recipe_data.py mix REGEN_DIR [REGEN_DIR ...] --out mix.jsonl [--seed 0]

`heldout`: benchmark question files (MT-bench / Vicuna-bench / EAGLE `question.jsonl`: {"turns": [...]}) ->
prompt-only chat records ({"messages": [{"role": "user", ...}]}) that `eagle-pipe regenerate` answers: a
held-out set for screening recipes by the simulated acceptance length `train --eval-teacher-dir` reports. Only
each question's first turn is kept (later turns refer to an answer). A question whose text equals (case- and
whitespace-insensitively) any turn of an `--exclude` file is dropped (Vicuna-bench shares two questions with
MT-bench, the judge, which must never be trained or screened on); the count is printed.

`mix`: the conversations of one or more `eagle-pipe regenerate` outputs (read by the pipeline's own reader),
shuffled with a fixed seed into one messages JSONL, so that `dump-teacher --limit N` takes N conversations of
the same composition for every N (the data-size arms).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def mix(regen_dirs: list[Path], seed: int) -> list[dict]:
    from stages.data.records import parse_record, read_records

    records = []
    for d in regen_dirs:
        for _, where, raw in read_records([str(d)]):
            kind, messages = parse_record(raw)
            if kind != "chat":
                raise SystemExit(f"{where}: not a conversation ({kind})")
            records.append({"messages": messages})
    random.Random(seed).shuffle(records)
    return records


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
    m.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    if a.cmd == "heldout":
        records, dropped = heldout(a.sources, a.exclude)
        write_jsonl(a.out, records)
        print(json.dumps({"out": str(a.out), "records": len(records), "dropped_as_excluded": dropped}))
    else:
        records = mix(a.regen_dirs, a.seed)
        write_jsonl(a.out, records)
        print(json.dumps({"out": str(a.out), "records": len(records)}))


if __name__ == "__main__":
    main()
