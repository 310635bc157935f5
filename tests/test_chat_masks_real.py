"""Loss masks on every real chat template in shared/real, against a reference computed here without the masker.

The rule (README, "The loss mask"): an assistant turn's supervised text runs from the end of the generation
prompt to the end of the turn's end-of-turn token. The reference finds both ends from the renderings alone,
with every message's content a unique sentence:

* start: when the conversation's text starts with the rendering of the earlier turns plus the generation
  prompt, where that rendering ends. Otherwise (the prompt moves the system text, as Mistral v3 does) the
  earlier rendering's text after the previous message's content is followed in the conversation's text, from
  the same content, as far as the two agree.
* end: the end-of-turn token right after the answer, from the explicit END_OF_TURN list below; templates
  that write none end the turn at the answer (listed in NO_END_OF_TURN with what they write instead).

Every template is checked with a small offline tokenizer that has the template's special tokens added, and
the templates that ship next to a real vocabulary (Qwen, Phi-3) also with that tokenizer. Templates that
refuse a conversation for a reason of their own are listed in REFUSALS with the reason; the masker must then
raise TemplateError, never mask silently.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from real_assets import real_path, real_root
from stages.chat_masks import ChatMasker, TemplateError

# ---------------------------------------------------------------------------------------------- conversations
SYSTEM = "Sysnote alpha: reply in plain English."
TURNS = [("Userask one: what is a list?", "Botreply one: a mutable sequence."),
         ("Userask two: and a tuple?", "Botreply two: an immutable one."),
         ("Userask three: which is faster?", "Botreply three: tuples, slightly.")]


def conversation(system: bool, reasoning: bool) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for k, (question, answer) in enumerate(TURNS):
        thought = f"<think>\nBotthought {k}: recall the docs.\n</think>\n\n" if reasoning else ""
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": thought + answer}]
    return msgs


CONVERSATIONS = {"system": conversation(True, False), "reasoning": conversation(True, True),
                 "no_system": conversation(False, False)}


def answer_of(message: dict) -> str:
    return message["content"].split("</think>\n\n")[-1]


# ---------------------------------------------------------------------------------------------- the templates
@dataclass(frozen=True)
class RealTemplate:
    name: str                 # path under shared/real (":key" for an entry of a JSON/JSONL file)
    text: str
    folder: str | None        # the tokenizers/<model> folder the template ships in


def _templates_in(path: Path, rel: str) -> list[tuple[str, str]]:
    if path.suffix == ".jinja":
        return [(rel, path.read_text())]
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for key, text in json.loads(line).items():
                out.append((f"{rel}:{n}:{key}", text))
        return out
    data = json.loads(path.read_text())
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, str):
        return [(rel, value)]
    if isinstance(value, list):
        return [(f"{rel}:{t['name']}", t["template"]) for t in value]
    return []


@functools.cache
def real_templates() -> tuple[RealTemplate, ...]:
    """Every distinct chat template under shared/real (the first place it was found names it)."""
    root = real_root()
    if root is None:
        return ()
    paths = sorted(root.glob("tokenizers/**/*.json")) + sorted(root.glob("tokenizers/**/*.jinja"))
    paths += sorted(root.glob("templates/**/*.jinja")) + [root / "templates/ollama_golden/templates.jsonl"]
    seen, out = set(), []
    for path in paths:
        rel = str(path.relative_to(root))
        folder = "/".join(rel.split("/")[:2]) if rel.startswith("tokenizers/") else None
        for name, text in _templates_in(path, rel):
            if text not in seen:
                seen.add(text)
                out.append(RealTemplate(name, text, folder))
    return tuple(out)


# ---------------------------------------------------------------------------------------------- tokenizers
# Special-token shapes real templates write; a template's own strings of these shapes become added tokens of
# the small tokenizer, as the real vocabularies have them.
SPECIAL_SHAPES = re.compile("|".join([
    r"<\|[A-Za-z0-9_./:=-]{1,40}\|>", r"<｜[^｜'\"]{1,40}｜>", r"\[/?[A-Z][A-Z_]{1,30}\]",
    r"</?[A-Za-z][A-Za-z0-9_:.-]{0,30}>", r"<\|turn>", r"<turn\|>", r"\]~!?b[\[\]]", r"\[e~\[",
]))
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]  # Phi-3/Zephyr build these as '<|' + role + '|>'


def folder_config(folder: str | None) -> dict:
    """The tokenizer_config.json next to a template (bos/eos and added tokens), {} when there is none."""
    if folder is None:
        return {}
    path = real_root() / folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


@functools.cache
def small_backend() -> str:
    """A byte-level BPE trained offline (the conftest one), serialized once."""
    import tempfile

    from conftest import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_tokenizer(Path(tmp), "").backend_tokenizer.to_str()


def special_strings(template: RealTemplate) -> tuple[list[str], str, str]:
    """(added tokens, bos, eos) for a template: its tokenizer_config's, else what the template writes."""
    config = folder_config(template.folder)
    added = [t["content"] for _, t in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))]
    bos = _token_str(config.get("bos_token")) if config else "<s>"
    eos = _token_str(config.get("eos_token")) if config else "</s>"
    found = sorted(set(SPECIAL_SHAPES.findall(template.text)) | set(ROLE_TOKENS))
    return added + [s for s in found if s not in added], bos or "", eos or ""


def small_tokenizer(template: RealTemplate) -> PreTrainedTokenizerFast:
    added, bos, eos = special_strings(template)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(small_backend()),
                                  bos_token=bos or None, eos_token=eos or None)
    tok.add_special_tokens({"additional_special_tokens": [s for s in added if s not in (bos, eos)]})
    tok.chat_template = template.text
    return tok


def real_tokenizer(template: RealTemplate) -> PreTrainedTokenizerFast | None:
    """The family's real tokenizer when its vocabulary ships next to the template (Qwen, Phi-3), else None."""
    if template.folder is None:
        return None
    folder = real_root() / template.folder
    config = folder_config(template.folder)
    if (folder / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file():
        from transformers import Qwen2TokenizerFast

        tok = Qwen2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
        for _, t in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            tok.add_tokens([AddedToken(t["content"], special=t["special"], normalized=False)])
    else:
        return None
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = _token_str(config.get(key))
        if value:
            setattr(tok, key, value)
    tok.chat_template = template.text
    return tok


# ---------------------------------------------------------------------------------------------- the reference
END_OF_TURN = ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "</s>", "<end_of_turn>",
               "<|END_OF_TURN_TOKEN|>", "<|END_TEXT|>", "<|END_RESPONSE|>", "<｜end▁of▁sentence｜>", "<|endoftext|>",
               "<|end_of_text|>", "<eos>", "<|end_of_turn|>", "<seed:eos>", "<|message_sep|>", "<sep>", "<turn|>",
               "</assistant>", "[e~[", "<SPECIAL_12>", "<step>", "<|EOT|>", "<end_message>",
               "<|assistant_end|>"]
END_OF_TURN_TOKEN = re.compile(r"\s*(?:" + "|".join(map(re.escape, END_OF_TURN)) + ")")
# Templates that end an assistant turn with no end-of-turn token: the turn ends with its answer.
NO_END_OF_TURN = {
    "templates/llama.cpp/llama-cpp-rwkv-world.jinja": "turns are separated by blank lines only",
}


def end_of_turn_run(text: str, at: int) -> list[int]:
    """Ends of the end-of-turn tokens that follow position `at` back to back (whitespace between allowed)."""
    ends = []
    while (marker := END_OF_TURN_TOKEN.match(text, at)) is not None:
        at = marker.end()
        ends.append(at)
    return ends


def render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def reference_spans(tok, messages: list[dict]) -> list[tuple[int, int]]:
    """Each assistant turn's [start, end) in the conversation's text, by the rule (module docstring).

    The last turn keeps as many end-of-turn tokens as the earlier ones have: what follows is the template's
    closing text (Phi-3's `<|endoftext|>`), not the turn's.
    """
    full = render(tok, messages, False)
    spans, runs = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tok, messages[:i], True)
        if full.startswith(prompt):
            start = len(prompt)
        else:
            previous = messages[i - 1]["content"]
            anchor = prompt[prompt.rfind(previous) + len(previous):]
            after_previous = full.find(previous) + len(previous)
            start = after_previous
            while start - after_previous < len(anchor) and full[start] == anchor[start - after_previous]:
                start += 1
        answer_end = full.find(answer_of(message)) + len(answer_of(message))
        runs.append(end_of_turn_run(full, answer_end) or [answer_end])
        spans.append((start, answer_end))
    if len(runs) > 1:
        runs[-1] = runs[-1][:len(runs[0])]
    return [(start, run[-1]) for (start, _), run in zip(spans, runs)]
