"""Test helper: small real teacher dumps made by `eagle-pipe dump-teacher` on the conftest tiny models.

Dumps are cached under pytest's session base temp dir, so test files in one session build each dump once.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from conftest import corpus_text


def text_records(path: Path, n: int, words: int = 30, offset: int = 0) -> Path:
    """n plain-text records of `words` words from the Python help topics."""
    text = " ".join(corpus_text(200_000)).split()
    with open(path, "w") as f:
        for i in range(n):
            start = (offset + i) * words
            f.write(json.dumps({"text": " ".join(text[start:start + words])}) + "\n")
    return path


def cached_dump(tmp_path_factory, name: str, target: Path, records: int, extra: list[str] = ()) -> Path:
    """A dump of `records` text records through `target` (supervising every token, top-8 teacher)."""
    from stages.cli import main

    base = tmp_path_factory.getbasetemp() / "train-dumps"
    out = base / name
    if (out / "manifest.json").exists() and list(out.glob("shards/*/done.json")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    data = text_records(base / f"{name}.jsonl", records)
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(target), "--data", str(data), "--out",
                                       str(out), "--loss-on", "all", "--top-k", "8", "--num-shards", "1",
                                       "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return out


def short_questions(n: int) -> list[str]:
    """n six-word questions from the Python help topics (the i-th: words 7i .. 7i+5)."""
    words = " ".join(corpus_text(20_000)).split()
    return [" ".join(words[7 * i: 7 * i + 6]) for i in range(n)]


def greedy_answer_dump(target: Path, root: Path, questions: list[str], new_tokens: int) -> Path:
    """ROOT/dump: dump-teacher (top-8) over the target's own greedy answers (float32, up to `new_tokens` each) to
    `questions`, supervising the answers: data a draft trained briefly accepts well on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.cli import main

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    with open(root / "train.jsonl", "w") as f:
        for question in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0].tolist()
            f.write(json.dumps({"input_ids": out, "loss_mask": [0] * len(ids) + [1] * (len(out) - len(ids))}) + "\n")
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(target), "--data", str(root / "train.jsonl"),
                                       "--out", str(root / "dump"), "--top-k", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "dump"


def mt_bench_questions(path: Path, questions: list[str]) -> Path:
    """An MT-bench question.jsonl: every odd question gets a second turn ("And why?"), which follows the target's
    own first answer."""
    with open(path, "w") as f:
        for i, question in enumerate(questions):
            f.write(json.dumps({"question_id": i, "category": "two-turn" if i % 2 else "single",
                                "turns": [question] + (["And why?"] if i % 2 else [])}) + "\n")
    return path
