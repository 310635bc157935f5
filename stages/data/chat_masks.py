"""Render a conversation with the tokenizer's chat template and mark the tokens the draft is trained on.

The rule: the supervised text of an assistant turn is exactly what the model generates for it — everything
after the generation prompt (what `add_generation_prompt=True` renders after the earlier turns) up to and
including the turn's end-of-turn token. Model-written markup inside the turn (Qwen3's `<think>` block,
gpt-oss's `<|channel|>final<|message|>`) is supervised; system, user and header text never is, nor whatever
the template writes after the end-of-turn token (ChatML's newline, Phi-3's closing `<|endoftext|>`).

Why probes: real templates do not render a conversation as a concatenation of its prefixes. They append text
at the very end (Phi-3), end the last turn differently (gpt-oss: `<|return|>`, `<|end|>` before), move the
system prompt into the last user turn (Mistral v3), or drop earlier reasoning (Qwen3). So each assistant turn
is located in the full rendering itself, with renderings in which a sentinel is appended to a message's
content (appended, not substituted, so templates that parse the content — `<think>` splitting — render it
the same way):

* end of the content: where the sentinel stands in the full conversation rendered with it on turn i;
* start: the prompt (messages[:i] plus the generation prompt) is rendered with the sentinel on the previous
  message; what it writes after that sentinel (the previous message's ending and the generation prompt) is
  followed in the full text from the previous message's end, as far as the two agree. This is the
  generation prompt's end even when the prompt's text before it differs from the full rendering;
* end-of-turn: the special tokens written after the content both when the turn is last and when a user turn
  follows (`_turn_end`).

The full rendering is tokenized once with offsets, and a token is supervised when it overlaps one of the
character spans. A record is a `TemplateError` only when the template itself raises.
"""
from __future__ import annotations

import re

import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from stages.errors import StageError

# Stands in for a turn's content in probe renderings: private-use characters no template writes itself.
SENTINEL = "\ue000eagle-pipe-turn\ue001"
SENTINEL_OTHER = "\ue002eagle-pipe-other\ue003"  # a neighbour: the message before the turn, or a user turn after it


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


class ChatMasker:
    """Tokenizes conversations with one tokenizer's chat template and builds their loss masks."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise StageError("a fast (Rust) tokenizer is needed for character offsets; got a slow tokenizer")
        self.tokenizer = tokenizer
        self.template = chat_template_of(tokenizer)
        self._special = self._special_token_pattern(tokenizer)

    @staticmethod
    def _special_token_pattern(tokenizer) -> re.Pattern | None:
        # Added tokens that are pure whitespace (Gemma's "\n" runs) are text, not turn markers.
        strings = {t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip()}
        strings.update(s for s in tokenizer.all_special_tokens if s.strip())
        if not strings:
            return None
        return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for `messages` (empty prefixes allowed), as `apply_chat_template` renders it.

        Calls transformers' renderer directly: `apply_chat_template` refuses an empty conversation and its
        per-call message normalisation (a no-op for our plain {role, content} dicts) costs more than the render.
        `{% generation %}` tags render as nothing: the mask follows the one rule below, not the tags.
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
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                span = self._turn_span(messages, i, full)
                if span is not None and span[1] > span[0]:
                    spans.append(span)
        return spans

    def _turn_span(self, messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
        """Turn i's span in `full`; None when the template does not render that turn's content."""
        turn = {**messages[i], "content": messages[i]["content"] + SENTINEL}
        if i == 0:
            probe = self.render([turn] + messages[1:], add_generation_prompt=False)
            if SENTINEL not in probe:
                return None
            content_end = _shared_prefix_end(full, probe[:probe.find(SENTINEL)])
            start = _common_prefix_len(self.render([], add_generation_prompt=True), full[:content_end])
        else:
            previous = {**messages[i - 1], "content": messages[i - 1]["content"] + SENTINEL_OTHER}
            probe = self.render(messages[:i - 1] + [previous, turn] + messages[i + 1:], add_generation_prompt=False)
            if SENTINEL not in probe:
                return None
            at = probe.find(SENTINEL)
            content_end = _shared_prefix_end(full, probe[:at].replace(SENTINEL_OTHER, "", 1))
            start = self._turn_start(messages, i, full, probe[:at], content_end)
        return min(start, content_end), self._turn_end(messages, i, full, content_end)

    def _turn_start(self, messages: list[dict], i: int, full: str, probe_head: str, content_end: int) -> int:
        """Where the generation prompt ends, in `full`.

        The prompt is rendered after messages[:i] alone, so its text before the previous message may differ
        from the full rendering (Mistral moves the system text into the last user turn; Qwen3-style templates
        keep only the last turn's reasoning). What it writes after the previous message's content — that
        message's ending plus the generation prompt — is followed in `full` from the same point, as far as
        both agree.
        """
        previous = {**messages[i - 1], "content": messages[i - 1]["content"] + SENTINEL_OTHER}
        prompt = self.render(messages[:i - 1] + [previous], add_generation_prompt=True)
        at_prompt, at_probe = prompt.find(SENTINEL_OTHER), probe_head.find(SENTINEL_OTHER)
        if at_prompt < 0 or at_probe < 0 or not full.startswith(probe_head[:at_probe]):
            # the previous message is not rendered in place (e.g. a system text moved elsewhere)
            return _common_prefix_len(self.render(messages[:i], add_generation_prompt=True), full)
        anchor = prompt[at_prompt + len(SENTINEL_OTHER):]
        return at_probe + _common_prefix_len(anchor, full[at_probe:content_end])

    def _turn_end(self, messages: list[dict], i: int, full: str, content_end: int) -> int:
        """After the turn's end-of-turn token(s) in `full`; the content's end when the template writes none.

        The turn's ending is the special tokens the template writes after the content both when the turn is
        the last message and when a user turn follows (Phi-3: `<|end|>` without the closing `<|endoftext|>`;
        Cohere: `<|END_TEXT|><|END_OF_TURN_TOKEN|>`) — less a last one right where the two part, which opens
        the next header (a template that always appends a generation prompt). When they share none (gpt-oss
        ends the last turn with `<|return|>` and the others with `<|end|>`), it is the special token right
        after the content (whitespace between allowed) when what follows it is another special token or the
        end (so GLM's next-turn header `<|user|>`, followed by the user's text, is not).
        """
        if self._special is None:
            return content_end
        turn = [*messages[:i], {**messages[i], "content": messages[i]["content"] + SENTINEL}]
        as_last = self.render(turn, add_generation_prompt=False)
        if i + 1 < len(messages):
            ending_last, ending_followed = _after(as_last, SENTINEL), full[content_end:]
        else:
            followed = self.render(turn + [{"role": "user", "content": SENTINEL_OTHER}], add_generation_prompt=False)
            ending_last, ending_followed = full[content_end:], _after(followed, SENTINEL)
        shared = _common_prefix_len(ending_last, ending_followed)
        ends = [m.end() for m in self._special.finditer(ending_last, 0, shared)]
        if len(ends) > 1 and self._parts_right_after(ends[-1], shared, ending_last, ending_followed):
            ends.pop()
        if ends:
            return content_end + ends[-1]
        first = self._special.match(full, content_end + _leading_space(full, content_end))
        if first is not None:
            rest = full[first.end():].lstrip()
            if not rest or self._special.match(rest):
                return first.end()
        return content_end

    def _parts_right_after(self, at: int, shared: int, *endings: str) -> bool:
        """Whether both endings go on past `at` and part in the token that starts there (a header opener)."""
        if any(at >= len(e) for e in endings):
            return False
        if at == shared:
            return True
        return any((m := self._special.match(e, at)) is not None and m.end() > shared for e in endings)

    # ------------------------------------------------------------------ tokenizing
    def encode(self, messages: list[dict], loss_on: str = "assistant") -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask) of the whole conversation."""
        full = self.render(messages, add_generation_prompt=False)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            return ids, [1] * len(ids)
        spans = self.assistant_spans(messages, full)
        return ids, mask_from_spans(enc["offset_mapping"], spans)


def _after(text: str, sentinel: str) -> str:
    return text[text.find(sentinel) + len(sentinel):]


def _shared_prefix_end(full: str, probe_head: str) -> int:
    """Where the real content ends: the probe's text up to its sentinel is `full`'s up to there, unless the
    real content changed the template's text (trailing spaces a template strips): then as far as they agree."""
    return len(probe_head) if full.startswith(probe_head) else _common_prefix_len(full, probe_head)


def _leading_space(text: str, at: int) -> int:
    return len(text) - at - len(text[at:].lstrip())


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
    """Length of the longest common prefix (binary search on slices: C-speed on long renderings)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

