"""Reading chat datasets and turning records into (input_ids, loss_mask) with the tokenizer's chat template.

API:

    @dataclass
    class Example:
        sample_index: int          # global index of the record over all sources, in order
        input_ids: list[int]
        loss_mask: list[int]       # 1 = supervised token
        truncated: bool

    @dataclass
    class Skipped:
        sample_index: int
        reason: str                # e.g. "malformed_json", "unknown_role", "empty_content", "missing_field",
                                   # "bad_encoding", "no_supervised_tokens", ...
        where: str                 # "file.jsonl:LINE" (or "dataset[idx]")
        message: str

    class BadRecord(Exception)     # raised instead of Skipped under strict=True, message names file:line

    def read_records(sources: list[str]) -> Iterator[tuple[int, str, dict | Exception]]
        # JSONL / JSON / Parquet files, a datasets dir saved with save_to_disk, or a dataset name;
        # yields (sample_index, where, record-or-parse-error) in a deterministic order
    def tokenize_records(sources, tokenizer, *, max_seq_len: int, loss_on="assistant", strict=False,
                         select=None) -> Iterator[Example | Skipped]
        # select: optional callable(sample_index) -> bool, to tokenize only one shard's records

Additions beyond the skeleton: `read_records(..., select=None)` (unselected records are counted but never
decoded), `count_records(sources)`, `summarize_skips(skips)`, `format_skip_report(skips)`, and `BadRecord` is a
`StageError` (one line, exit code 2).

Record formats, detected per record in this order: OpenAI `messages` [{role, content}] (roles system, user,
assistant), ShareGPT `conversations` [{from, value}] (from: human|gpt|system, or user|assistant), Alpaca
`instruction` (+ optional `input`, `output`, `system`, `history`; read as LLaMA-Factory reads it), preference
records of either chat kind or Alpaca (LLaMA-Factory's ranking format: `chosen` answers the last user turn,
`rejected` is not read), pre-tokenized
`input_ids` (+ optional `loss_mask`), plain `text`. How the loss mask is found: see `stages/data/chat_masks.py`.

Skip reasons: bad_encoding, malformed_json, missing_field, unknown_role, empty_content, non_string_content,
bad_input_ids, bad_loss_mask, template_error (all bad input: `strict=True` raises BadRecord on the first) and
no_supervised_tokens (no assistant turn, or none left after truncation: a skip even under strict).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from numbers import Integral
from typing import Callable, Iterable, Iterator

from stages.data.chat_masks import ChatMasker, TemplateError
from stages.errors import StageError
from stages.data.sources import RecordError, expand_source, iter_source

__all__ = [
    "Example", "Skipped", "BadRecord", "RecordError", "read_records", "count_records", "tokenize_records",
    "parse_record", "summarize_skips", "format_skip_report",
]

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
LOSS_ON = ("assistant", "all")


@dataclass
class Example:
    sample_index: int
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool


@dataclass
class Skipped:
    sample_index: int
    reason: str
    where: str
    message: str


class BadRecord(StageError):
    """A bad record under strict mode: the message names file:line (or source[row]) and the reason."""


# ---------------------------------------------------------------------------------------------- reading
def _as_list(sources) -> list[str]:
    return [sources] if isinstance(sources, (str, bytes)) or hasattr(sources, "__fspath__") else list(sources)


def _read_all(sources, select) -> Iterator:
    total = 0
    for source in _as_list(sources):
        for kind, target in expand_source(str(source)):
            total += yield from iter_source(kind, target, total, select)
    return total


def read_records(sources, *, select: Callable[[int], bool] | None = None) -> Iterator[tuple[int, str, object]]:
    """Yield (sample_index, where, record | RecordError) over all sources in order (only selected indices).

    `select(sample_index)` is called exactly once per record, in order, and a selected record is yielded before
    `select` sees the next index; unselected records are counted but not decoded.
    """
    yield from _read_all(sources, select)


def count_records(sources) -> int:
    """How many records the sources hold (JSONL lines are counted, not parsed)."""
    gen = _read_all(sources, lambda _: False)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ---------------------------------------------------------------------------------------------- formats
def parse_record(record) -> tuple[str, object]:
    """Detect a record's format: ("chat", messages) | ("tokens", (ids, mask|None)) | ("text", str).

    Raises RecordError for anything unusable.
    """
    if isinstance(record, RecordError):
        raise record
    if not isinstance(record, dict):
        raise RecordError("missing_field", f"record is a JSON {type(record).__name__}, not an object")
    if record.get("messages") is not None:
        turns = _chat_turns(record["messages"], "messages", "role", "content", None)
        return "chat", _with_chosen(turns, record, "role", "content", None)
    if record.get("conversations") is not None:
        turns = _chat_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        return "chat", _with_chosen(turns, record, "from", "value", SHAREGPT_ROLES)
    if record.get("instruction") is not None:
        return "chat", _alpaca_turns(record)
    if record.get("input_ids") is not None:
        return "tokens", (record["input_ids"], record.get("loss_mask"))
    if record.get("text") is not None:
        return "text", _content(record["text"], "text")
    keys = ", ".join(sorted(record)) or "none"
    raise RecordError("missing_field",
                      f"no 'messages', 'conversations', 'instruction', 'input_ids' or 'text' field (keys: {keys})")


def _chat_turns(turns, field: str, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("missing_field", f"'{field}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) is None:
            raise RecordError("missing_field", f"{field}[{i}] has no '{role_key}'")
        role = turn[role_key]
        mapped = role_map.get(role) if role_map is not None else (role if role in CHAT_ROLES else None)
        if not isinstance(role, str) or mapped is None:
            allowed = sorted(role_map) if role_map is not None else list(CHAT_ROLES)
            raise RecordError("unknown_role", f"{field}[{i}] has role {role!r} (expected one of {allowed})")
        if content_key not in turn or turn[content_key] is None:
            raise RecordError("missing_field", f"{field}[{i}] has no '{content_key}'")
        out.append({"role": mapped, "content": _content(turn[content_key], f"{field}[{i}].{content_key}")})
    return out


def _with_chosen(turns: list[dict], record: dict, role_key: str, content_key: str,
                 role_map: dict | None) -> list[dict]:
    """A preference record (LLaMA-Factory's ranking format: the conversation ends with a user turn, `chosen` is
    one {from, value} / {role, content} answer, `rejected` another) as the conversation answered by `chosen`.
    `rejected` is never read; a conversation that does not end with a user turn keeps its own last answer."""
    chosen = record.get("chosen")
    if chosen is None or turns[-1]["role"] != "user":
        return turns
    if not isinstance(chosen, dict):
        raise RecordError("missing_field", f"'chosen' must be one {{{role_key}, {content_key}}} turn")
    (answer,) = _chat_turns([chosen], "chosen", role_key, content_key, role_map)
    if answer["role"] != "assistant":
        raise RecordError("unknown_role", f"chosen has role {chosen.get(role_key)!r}, not an assistant role")
    return turns + [answer]


def _alpaca_turns(record: dict) -> list[dict]:
    """Alpaca (`instruction`, optional `input`, `output`, `system`, `history` [[user, assistant], ...]) as chat
    turns, the way LLaMA-Factory reads it: the user turn is instruction and input joined by a newline; an
    empty or missing `output` leaves a prompt-only conversation (regenerate answers it)."""
    turns = []
    if record.get("system") is not None and (not isinstance(record["system"], str) or record["system"].strip()):
        turns.append({"role": "system", "content": _content(record["system"], "system")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("missing_field", "'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise RecordError("missing_field", f"history[{i}] is not a [user, assistant] pair")
        turns.append({"role": "user", "content": _content(pair[0], f"history[{i}][0]")})
        turns.append({"role": "assistant", "content": _content(pair[1], f"history[{i}][1]")})
    query = [_content(record["instruction"], "instruction")]
    if record.get("input") is not None and (not isinstance(record["input"], str) or record["input"].strip()):
        query.append(_content(record["input"], "input"))
    turns.append({"role": "user", "content": "\n".join(query)})
    output = record.get("output")
    if output is None and isinstance(record.get("chosen"), str):  # LLaMA-Factory's Alpaca ranking format
        output = record["chosen"]
    if output is not None and (not isinstance(output, str) or output.strip()):
        turns.append({"role": "assistant", "content": _content(output, "output")})
    return turns


def _content(value, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{name} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise RecordError("empty_content", f"{name} is empty")
    return value


def _check_tokens(ids, mask, vocab_size: int) -> tuple[list[int], list[int] | None]:
    if not isinstance(ids, list) or not ids:
        raise RecordError("bad_input_ids", "input_ids must be a non-empty list of integers")
    for i, t in enumerate(ids):
        if not isinstance(t, Integral) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise RecordError("bad_input_ids", f"input_ids[{i}] = {t!r} is not a token id in [0, {vocab_size})")
    if mask is None:
        return [int(t) for t in ids], None
    if not isinstance(mask, list) or len(mask) != len(ids):
        got = len(mask) if isinstance(mask, list) else type(mask).__name__
        raise RecordError("bad_loss_mask", f"loss_mask must be a list as long as input_ids ({len(ids)}), got {got}")
    for i, m in enumerate(mask):
        if not isinstance(m, Integral) or m not in (0, 1):
            raise RecordError("bad_loss_mask", f"loss_mask[{i}] = {m!r} is not 0 or 1")
    return [int(t) for t in ids], [int(m) for m in mask]


# ---------------------------------------------------------------------------------------------- tokenizing
class _Encoder:
    """Turns a parsed record into (input_ids, loss_mask) with one tokenizer; the chat masker is built lazily."""

    def __init__(self, tokenizer, loss_on: str):
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.vocab_size = len(tokenizer)
        self._masker = None

    def encode(self, kind: str, payload) -> tuple[list[int], list[int]]:
        if kind == "chat":
            if self.loss_on == "assistant" and not any(m["role"] == "assistant" for m in payload):
                return [], []
            if self._masker is None:
                self._masker = ChatMasker(self.tokenizer)
            try:
                return self._masker.encode(payload, self.loss_on)
            except TemplateError as exc:
                raise RecordError("template_error", str(exc)) from None
        if kind == "tokens":
            ids, mask = _check_tokens(*payload, self.vocab_size)
            if mask is None or self.loss_on == "all":
                mask = [1] * len(ids)
            return ids, mask
        ids = list(self.tokenizer(payload, add_special_tokens=True)["input_ids"])
        return ids, [1] * len(ids)


def tokenize_records(sources, tokenizer, *, max_seq_len: int, loss_on: str = "assistant", strict: bool = False,
                     select: Callable[[int], bool] | None = None) -> Iterator[Example | Skipped]:
    """Yield an Example or a Skipped for every (selected) record, in sample_index order."""
    if loss_on not in LOSS_ON:
        raise StageError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise StageError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    encoder = _Encoder(tokenizer, loss_on)
    for index, where, record in read_records(sources, select=select):
        try:
            ids, mask = encoder.encode(*parse_record(record))
        except RecordError as exc:
            if strict:
                raise BadRecord(f"{where}: {exc.reason}: {exc.message} (without --strict it would be skipped)") \
                    from None
            yield Skipped(index, exc.reason, where, exc.message)
            continue
        if not ids:
            yield Skipped(index, "no_supervised_tokens", where, "the conversation has no assistant turn")
            continue
        truncated = len(ids) > max_seq_len
        if truncated:
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            why = f"no supervised token in the first {max_seq_len} tokens" if truncated else "no supervised token"
            yield Skipped(index, "no_supervised_tokens", where, why)
            continue
        yield Example(index, ids, mask, truncated)


# ---------------------------------------------------------------------------------------------- reporting
def summarize_skips(skips: Iterable[Skipped]) -> dict[str, int]:
    """{reason: count}, reasons sorted by name."""
    counts = Counter(s.reason for s in skips)
    return dict(sorted(counts.items()))


def format_skip_report(skips: Iterable[Skipped], examples: int = 3) -> str:
    """A short human report: per reason its count and the first few records (where: message)."""
    counts: Counter = Counter()
    first: dict[str, list[Skipped]] = {}
    for s in skips:
        counts[s.reason] += 1
        if len(first.setdefault(s.reason, [])) < examples:
            first[s.reason].append(s)
    if not counts:
        return "skipped 0 records"
    lines = [f"skipped {sum(counts.values())} records:"]
    for reason in sorted(counts):
        lines.append(f"  {reason}: {counts[reason]}")
        lines.extend(f"    {s.where}: {s.message}" for s in first[reason])
        if counts[reason] > len(first[reason]):
            lines.append(f"    ... and {counts[reason] - len(first[reason])} more")
    return "\n".join(lines)
