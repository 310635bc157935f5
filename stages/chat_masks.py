"""Render a conversation with the tokenizer's chat template and mark the tokens the draft is trained on.

The loss mask is exactly the assistant turns' tokens, each turn's end-of-turn token included; the assistant
header (the generation prompt) and whatever the template writes after the end-of-turn token (ChatML's "\\n")
are not supervised.

Two ways to find those tokens, which give the same mask on the same rendered text:

* templates with `{% generation %}` tags: transformers' `return_assistant_tokens_mask=True`;
* every other template (most real ones) — the prefix method: render growing prefixes of the conversation as
  strings. Assistant turn i starts where the rendering of messages[:i] *with* the generation prompt ends, and
  ends after the last special/added token of its rendered increment (its end-of-turn marker; the whole
  increment when it has none). The full rendering is tokenized once with offsets, and a token is supervised
  when it overlaps one of those character spans (the same overlap rule transformers uses for generation tags).
  Templates whose renderings are not prefixes of each other (a generation prompt unlike the history header,
  or past turns rewritten once later turns follow, as Qwen3 drops past reasoning) are located in the full
  text instead: the turn starts where the prefix rendering and the full text part, and ends at its
  end-of-turn marker's next occurrence.
"""
from __future__ import annotations

import re

import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from stages.errors import StageError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The chat template could not render this conversation (raised per record, becomes a skip)."""


def chat_template_of(tokenizer) -> str:
    """The tokenizer's chat template string; StageError when it has none."""
    if not tokenizer.chat_template:
        raise StageError("the tokenizer has no chat template; chat records (messages/conversations) need one")
    try:
        return tokenizer.get_chat_template()
    except ValueError as exc:
        raise StageError(f"tokenizer chat template: {exc}") from None


def has_generation_tags(template: str) -> bool:
    return GENERATION_TAG.search(template) is not None


class ChatMasker:
    """Tokenizes conversations with one tokenizer's chat template and builds their loss masks."""

    def __init__(self, tokenizer, *, use_generation_tags: bool | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise StageError("a fast (Rust) tokenizer is needed for character offsets; got a slow tokenizer")
        self.tokenizer = tokenizer
        self.template = chat_template_of(tokenizer)
        tagged = has_generation_tags(self.template)
        self.use_generation_tags = tagged if use_generation_tags is None else use_generation_tags and tagged
        self._special = self._special_token_pattern(tokenizer)

    @staticmethod
    def _special_token_pattern(tokenizer) -> re.Pattern | None:
        strings = {t.content for t in tokenizer.added_tokens_decoder.values() if t.content}
        strings.update(s for s in tokenizer.all_special_tokens if s)
        if not strings:
            return None
        return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for `messages` (empty prefixes allowed), as `apply_chat_template` renders it.

        Calls transformers' renderer directly: `apply_chat_template` refuses an empty conversation and its
        per-call message normalisation (a no-op for our plain {role, content} dicts) costs more than the render.
        """
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=self.template,
                add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map)
            return rendered[0]
        except Exception as exc:  # jinja raise_exception(...) and friends: the record's fault, not ours
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None

    def assistant_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of each assistant turn's supervised text in `full`."""
        spans = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1], add_generation_prompt=False)
            if after.startswith(before) and full.startswith(after):
                start = len(before)
                marker = self._last_special(after[start:])
                end = start + (marker.end() if marker else len(after) - start)
            else:
                start, end = self._locate_unstable_turn(i, before, after, full, cursor)
            if end > start:
                spans.append((start, end))
            cursor = max(cursor, end)
        return spans

    def _locate_unstable_turn(self, i: int, before: str, after: str, full: str, cursor: int) -> tuple[int, int]:
        """Span of turn i when the renderings are not prefixes of each other.

        Either the generation prompt differs from the header history turns get (e.g. an empty think block), or
        the template renders a turn differently once later turns follow (e.g. Qwen3 drops past reasoning). The
        turn starts where `before` and `full` part (not before the previous turn's end) and ends at the first
        end-of-turn marker after that — the marker being the last special token of the turn's own rendering.
        """
        start = max(cursor, _common_prefix_len(before, full))
        increment = after[_common_prefix_len(before, after):]
        marker = self._last_special(increment)
        if marker is not None:
            pos = full.find(marker.group(0), start)
            if pos >= 0:
                return start, pos + len(marker.group(0))
        elif increment and full.startswith(increment, start):
            return start, start + len(increment)
        raise TemplateError(
            f"cannot locate assistant turn {i} in the rendered conversation (the template renders it differently "
            "once later turns follow); use a template with {% generation %} tags")

    def _last_special(self, text: str) -> re.Match | None:
        """The last special/added token in `text` (an assistant turn's end-of-turn marker), if any."""
        last = None
        if self._special is not None:
            for last in self._special.finditer(text):
                pass
        return last

    # ------------------------------------------------------------------ tokenizing
    def encode(self, messages: list[dict], loss_on: str = "assistant") -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask) of the whole conversation."""
        if self.use_generation_tags and loss_on == "assistant":
            return self._encode_with_generation_tags(messages)
        full = self.render(messages, add_generation_prompt=False)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            return ids, [1] * len(ids)
        spans = self.assistant_spans(messages, full)
        return ids, mask_from_spans(enc["offset_mapping"], spans)

    def _encode_with_generation_tags(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        try:
            out = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        except Exception as exc:
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
        return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


def mask_from_spans(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose character range [a, b) overlaps a span [s, e): a < e and b > s.

    The same rule transformers applies to `{% generation %}` spans.
    """
    if not len(offsets):
        return []
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2)
    mask = np.zeros(len(offs), dtype=bool)
    for s, e in spans:
        mask |= (offs[:, 0] < e) & (offs[:, 1] > s)
    return mask.astype(np.int64).tolist()


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
