"""The turn loop of `eagle-pipe eval`, whichever engine decodes: questions in groups, turn by turn, each turn's
prompt rendered after the target's own answers to the earlier turns, one record per turn.

    for record in decoded_turns(questions, tokenizer, decode, group_size=N, eos_ids=...): ...

`decode(prompts) -> [Decoded]` (stages/evaluate/hf_engine.py, vllm_engine.py) answers a group's active turns together; a turn's
answer for the next prompt is its reference output (the target's own greedy decode; equal to the speculative
one when lossless), cut at the first end-of-sequence token, as FastChat and EAGLE append it for MT-bench turn 2.
`turn_runs` turns the records of one K into the report's per-prompt rows and mismatches (stages/evaluate/report.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass
class Decoded:
    reference: list[int]                 # the target's own greedy new tokens
    reference_seconds: float | None      # this turn's own reference time (None: decoded in a batch)
    specs: dict = field(default_factory=dict)   # K -> a result with .tokens, .accepted, .seconds


@dataclass
class TurnRecord:
    question: int                # index into the questions
    turn: int                    # 1-based
    prompt: list[int]            # the rendered prompt's token ids
    decoded: object              # Decoded: reference, reference_seconds, specs {K: result}


def decoded_turns(questions, tokenizer, decode: Callable, *, group_size: int, eos_ids,
                  progress=None) -> Iterator[TurnRecord]:
    """Records of every turn of every question: groups of `group_size` questions in file order, turn by turn."""
    from stages.data.prompts import answer_text
    from stages.evaluate.questions import render_prompt

    for first in range(0, len(questions), group_size):
        group = range(first, min(first + group_size, len(questions)))
        answers = {i: [] for i in group}  # the target's own answers to the turns so far
        for turn in range(1, max(len(questions[i].user_turns) for i in group) + 1):
            active = [i for i in group if len(questions[i].user_turns) >= turn]
            prompts = [render_prompt(tokenizer, questions[i].conversation(answers[i]), questions[i].where)
                       for i in active]
            for i, ids, decoded in zip(active, prompts, decode(prompts)):
                yield TurnRecord(i, turn, ids, decoded)
                answers[i].append(answer_text(tokenizer, decoded.reference, eos_ids))
            if progress is not None:
                progress.update(len(active))  # a whole group's turns at once (so the bar's rate is right)


def turn_runs(records: list[TurnRecord], questions, k: int) -> tuple[list[dict], list[dict]]:
    """The per-prompt rows and the lossless mismatches of K, in question then turn order."""
    runs, mismatches = [], []
    for record in sorted(records, key=lambda r: (r.question, r.turn)):
        question, decoded = questions[record.question], record.decoded
        spec, reference = decoded.specs[k], decoded.reference
        timed = decoded.reference_seconds is not None  # decoded alone: per-turn seconds mean something
        runs.append({"question": record.question, "where": question.where, "question_id": question.question_id,
                     "category": question.category, "turn": record.turn, "prompt_tokens": len(record.prompt),
                     "accepted": spec.accepted, "new_tokens": len(spec.tokens),
                     "baseline_new_tokens": len(reference), "seconds": spec.seconds if timed else None,
                     "baseline_seconds": decoded.reference_seconds, "output_tokens": spec.tokens})
        if spec.tokens != reference:
            diff = next((j for j, (a, b) in enumerate(zip(spec.tokens, reference)) if a != b),
                        min(len(spec.tokens), len(reference)))
            mismatches.append({"prompt": record.question, "turn": record.turn, "where": question.where,
                               "first_difference": diff, "speculative_len": len(spec.tokens),
                               "reference_len": len(reference)})
    return runs, mismatches
