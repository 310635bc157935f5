"""Eval prompts: conversations and published benchmark question files, read as questions of one or more turns.

Records come from `stages.data.records.read_records` (JSONL, `.jsonl.gz`, JSON, Parquet, datasets), and each is
recognised by its fields, in this order:

- `messages` / `conversations` / `instruction` (OpenAI / ShareGPT / Alpaca chat data): the first user turn,
  earlier system turns kept; category `chat`.
- `turns` (+ `question_id`, `category`): MT-bench, Spec-Bench, EAGLE and Vicuna-bench `question.jsonl`; every
  turn, in order; category from the record (`uncategorized` when empty).
- `question`: GSM8K `test.jsonl`; category `gsm8k`.
- `prompt` + `entry_point`: HumanEval `HumanEval.jsonl.gz`, asked as "Complete the code I provided." + prompt
  (EAGLE's humaneval_question.jsonl wording, so numbers compare); category `humaneval`.
- `prompt`: any other prompt file, asked as is; category `prompt`.

A question with several turns is run the MT-bench way (as FastChat's and EAGLE's MT-bench answer scripts do):
turn k's prompt is the conversation so far with the target's own answers to the earlier turns as assistant
turns, rendered with the chat template and the generation prompt. Records with none of these fields (plain
`text`, `input_ids`) have no user turn and are skipped, counted by reason with their location.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from stages.data.records import RecordError, Skipped, parse_record, read_records

RECOGNISED_FIELDS = ("messages", "conversations", "instruction", "turns", "question", "prompt", "text",
                     "input_ids")
HUMANEVAL_INSTRUCTION = "Complete the code I provided."  # EAGLE's humaneval_question.jsonl = this + prompt


@dataclass
class Question:
    where: str                      # file:line (or source[row]) of the record
    category: str
    question_id: object             # the file's question_id / task_id, or None
    user_turns: list[str]
    context: list[dict] = field(default_factory=list)  # turns before the first user turn (a system message)

    def conversation(self, answers: list[str]) -> list[dict]:
        """The messages that prompt user turn len(answers)+1: each earlier user turn followed by its answer."""
        messages = list(self.context)
        for user, answer in zip(self.user_turns, answers):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": self.user_turns[len(answers)]})
        return messages


def parse_question(record, where: str) -> Question:
    """One record as a Question; RecordError (reason, message) when it has no usable user turn."""
    if isinstance(record, dict) and all(record.get(k) is None for k in ("messages", "conversations", "instruction")):
        if record.get("turns") is not None:
            turns = record["turns"]
            if not isinstance(turns, list) or not turns:
                raise RecordError("missing_field", "'turns' must be a non-empty list of strings")
            category = record.get("category")
            return Question(where, category if isinstance(category, str) and category else "uncategorized",
                            record.get("question_id"), [_text(t, f"turns[{i}]") for i, t in enumerate(turns)])
        if record.get("question") is not None:
            return Question(where, "gsm8k", record.get("question_id"), [_text(record["question"], "question")])
        if record.get("prompt") is not None:
            prompt = _text(record["prompt"], "prompt")
            if "entry_point" in record:
                return Question(where, "humaneval", record.get("task_id"), [HUMANEVAL_INSTRUCTION + prompt])
            return Question(where, "prompt", record.get("question_id"), [prompt])
    if isinstance(record, dict) and not any(record.get(k) is not None for k in RECOGNISED_FIELDS):
        keys = ", ".join(sorted(record)) or "none"
        raise RecordError("missing_field", f"none of the fields {', '.join(RECOGNISED_FIELDS)} (keys: {keys})")
    kind, payload = parse_record(record)
    first_user = next((i for i, m in enumerate(payload) if m["role"] == "user"), None) if kind == "chat" else None
    if first_user is None:
        raise RecordError("no_user_turn", f"a {kind} record has no user turn to use as a prompt")
    return Question(where, "chat", record.get("question_id"), [payload[first_user]["content"]],
                    context=payload[:first_user])


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{name} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise RecordError("empty_content", f"{name} is empty")
    return value


def read_questions(sources, limit: int | None = None) -> tuple[list[Question], list[Skipped]]:
    """The first `limit` usable questions in source order (a multi-turn question counts once), and the skips
    among the records read until then."""
    questions, skips = [], []
    if limit is not None and limit < 1:
        return questions, skips
    for index, where, record in read_records(list(sources)):
        try:
            questions.append(parse_question(record, where))
        except RecordError as e:
            skips.append(Skipped(index, e.reason, where, e.message))
            continue
        if limit is not None and len(questions) >= limit:
            break
    return questions, skips


def answer_text(tokenizer, tokens: list[int], eos_ids) -> str:
    """A generated answer as the assistant turn of the next prompt: cut at the first end-of-sequence token,
    decoded without special tokens, stripped (what FastChat and EAGLE append for MT-bench turn 2)."""
    eos = set(eos_ids)
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
