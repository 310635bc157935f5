"""Loss masks on every real chat template in shared/real, against a reference computed here without the masker.

The rule (docs/data.md, "The loss mask"): an assistant turn's supervised text runs from the end of the generation
prompt to the end of the turn's end-of-turn token. The reference finds both ends from the renderings alone,
with every message's content a unique sentence:

* start: when the conversation's text starts with the rendering of the earlier turns plus the generation
  prompt, where that rendering ends. Otherwise (the prompt moves the system text, as Mistral v3 does) the
  earlier rendering's text after the previous message's content is followed in the conversation's text, from
  the same content, as far as the two agree.
* end: the end-of-turn tokens right after the answer (whitespace between allowed), from the explicit
  END_OF_TURN list below; the last turn keeps as many as it has when a user turn follows (Phi-3's closing
  `<|endoftext|>` is not the turn's). Templates that write none end the turn at the answer (listed in
  NO_END_OF_TURN with what they write instead).

Independently of the spans, no user/system text may be supervised and every answer must be, entirely.
Also: SpecForge's golden Qwen ids reproduced exactly (masks up to its two documented convention
differences), and FastChat's ShareGPT records (3 assistant turns included) masked, not skipped.

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
from stages.data.chat_masks import ChatMasker, TemplateError

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
    # Templates that build their tokens at render time ('<｜hy_eos{}｜>'.format(...)): take them from renderings.
    rendered = set()
    for messages in CONVERSATIONS.values():
        try:
            rendered.update(SPECIAL_SHAPES.findall(render(tok, messages, True)))
        except Exception:  # a refused conversation; checked in the test
            pass
    tok.add_tokens(sorted(rendered - set(tok.get_vocab())), special_tokens=True)
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
               "<|assistant_end|>", "<｜hy_eos:opensource｜>"]
END_OF_TURN_TOKEN = re.compile(r"\s*(?:" + "|".join(map(re.escape, END_OF_TURN)) + ")")
# Templates that end an assistant turn with no end-of-turn token: the turn ends with its answer.
NO_END_OF_TURN = {
    **dict.fromkeys([
        "templates/chujiezheng_chat_templates/amberchat.jinja", "templates/chujiezheng_chat_templates/chatqa.jinja",
        "templates/chujiezheng_chat_templates/falcon-instruct.jinja",
        "templates/chujiezheng_chat_templates/solar-instruct.jinja", "templates/llama.cpp/llama-cpp-rwkv-world.jinja",
        "templates/ollama_golden/templates.jsonl:24:granite-instruct",
        "templates/ollama_golden/templates.jsonl:31:chatqa",
        "templates/ollama_golden/templates.jsonl:32:falcon-instruct",
        "templates/ollama_golden/templates.jsonl:33:falcon-instruct",
        "templates/ollama_golden/templates.jsonl:34:solar-instruct",
    ], "plain-text roles: the next turn starts after blank lines"),
    **dict.fromkeys(["templates/llama.cpp/GLM-4.6.jinja", "templates/llama.cpp/GLM-4.7-Flash.jinja"],
                    "the next turn's header <|user|> follows the answer directly; it is the user's header"),
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

    The last turn keeps as many end-of-turn tokens as it has when a user turn follows: what follows is the
    template's closing text (Phi-3's `<|endoftext|>`), not the turn's.
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
        # the answer's last occurrence before the next message (a reasoning text may quote it)
        limit = full.find(messages[i + 1]["content"], start) if i + 1 < len(messages) else len(full)
        answer_end = full.rfind(answer_of(message), start, limit) + len(answer_of(message))
        runs.append(end_of_turn_run(full, answer_end) or [answer_end])
        spans.append((start, answer_end))
    if runs and messages[-1]["role"] == "assistant":
        # the last turn keeps as many end-of-turn tokens as it has when a user turn follows it
        followed = render(tok, [*messages, {"role": "user", "content": "Userask next."}], False)
        answer = answer_of(messages[-1])
        kept = end_of_turn_run(followed, followed.rfind(answer, 0, followed.rfind("Userask next.")) + len(answer))
        runs[-1] = runs[-1][:max(len(kept), 1)]
    return [(start, run[-1]) for (start, _), run in zip(spans, runs)]


# ---------------------------------------------------------------------------------------------- the checks
# Templates that refuse a conversation for a reason of their own: {name: {conversation: (error text, why)}}.
NEEDS_TOOLS = ("'NoneType' object is not iterable", "a tool-use template: renders only with tools=[...]")
REFUSALS = {
    "tokenizers/gemma-2b-it/tokenizer_config.json": {
        c: ("System role not supported", "Gemma-2 has no system role") for c in ("system", "reasoning")},
    "templates/llama.cpp/CohereForAI-c4ai-command-r-plus-tool_use.jinja": dict.fromkeys(CONVERSATIONS, NEEDS_TOOLS),
    "templates/llama.cpp/NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": dict.fromkeys(
        CONVERSATIONS, NEEDS_TOOLS),
    "templates/llama.cpp/fireworks-ai-llama-3-firefunction-v2.jinja": dict.fromkeys(
        CONVERSATIONS, ("'functions' is undefined", "a function-calling template: renders only with functions")),
    **{f"templates/ollama_golden/templates.jsonl:{n}:mistral-instruct": {
        c: ("Conversation roles must alternate", "an old Mistral template without a system role")
        for c in ("system", "reasoning")} for n in (11, 15)},
    **{f"templates/ollama_golden/templates.jsonl:{n}:{name}": {
        c: ("System messages are not allowed", "no system role") for c in ("system", "reasoning")}
       for n, name in ((12, "starcoder2-instruct"), (25, "magicoder"))},
}

# Templates that silently leave the system message out (nothing of it to leak).
SYSTEM_NOT_RENDERED = {
    "tokenizers/phi-3-mini-128k-instruct/tokenizer_config.json",
    "templates/llama.cpp/mistralai-Mistral-Nemo-Instruct-2407.jinja",  # only into a last user turn
    "templates/ollama_golden/templates.jsonl:10:zephyr", "templates/ollama_golden/templates.jsonl:28:phi-3",
    "templates/ollama_golden/templates.jsonl:31:chatqa",
}


def supervised_mask(offsets, spans) -> list[int]:
    return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]


def check_template(tok, template: RealTemplate, conversation: str) -> str:
    """Assert the masker's mask on one conversation is the rule's; returns what happened ("refused" / "masked")."""
    messages = CONVERSATIONS[conversation]
    refusal = REFUSALS.get(template.name, {}).get(conversation)
    if refusal is not None:
        with pytest.raises(Exception, match=re.escape(refusal[0])):
            render(tok, messages, False)
        with pytest.raises(TemplateError, match=re.escape(refusal[0])):
            ChatMasker(tok).encode(messages)
        return "refused"
    full = render(tok, messages, False)
    ids, mask = ChatMasker(tok).encode(messages)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == enc["input_ids"]
    spans = reference_spans(tok, messages)
    assert mask == supervised_mask(enc["offset_mapping"], spans), [
        tok.decode([t for t, m in zip(ids, mask) if m]), [full[s:e] for s, e in spans]]
    # Independently of the spans: no user/system text is supervised, every answer is, entirely.
    for message in messages:
        text = answer_of(message) if message["role"] == "assistant" else message["content"]
        at = full.find(text)
        if at < 0 and message["role"] == "system" and template.name in SYSTEM_NOT_RENDERED:
            continue
        assert at >= 0, f"{message['role']} text not rendered"
        covered = supervised_mask(enc["offset_mapping"], [(at, at + len(text))])
        touched = [m for m, c in zip(mask, covered) if c]
        assert all(touched) if message["role"] == "assistant" else not any(touched), message
    has_end_of_turn = all(end_of_turn_run(full, full.find(answer_of(m)) + len(answer_of(m)))
                          for m in messages[:-1] if m["role"] == "assistant")
    assert has_end_of_turn != (template.name in NO_END_OF_TURN)
    return "masked"


TEMPLATES = real_templates()
TEMPLATE_IDS = [t.name for t in TEMPLATES]


@pytest.mark.parametrize("template", TEMPLATES or [None], ids=TEMPLATE_IDS or ["absent"])
def test_mask_on_every_real_template(template):
    if template is None:
        real_path("templates")  # skips: shared/real is not there
    outcomes = {c: check_template(small_tokenizer(template), template, c) for c in CONVERSATIONS}
    assert set(REFUSALS.get(template.name, {})) == {c for c, o in outcomes.items() if o == "refused"}


def test_every_template_is_found_and_the_lists_name_real_ones():
    real_path("templates")
    names = set(TEMPLATE_IDS)
    assert len(TEMPLATES) >= 130
    assert set(REFUSALS) <= names and set(NO_END_OF_TURN) <= names
    for path in ("templates/llama.cpp", "templates/chujiezheng_chat_templates"):
        on_disk = {str(p.relative_to(real_root())) for p in real_path(path).glob("*.jinja")}
        texts = {t.text for t in TEMPLATES}
        assert all(p.read_text() in texts for p in real_path(path).glob("*.jinja")), on_disk - names


# ---------------------------------------------------------------------------------------------- real tokenizers
@functools.cache
def family_tokenizer(folder: str):
    """The real tokenizer of a tokenizers/<model> folder: Qwen's vocab.json + merges.txt with its
    tokenizer_config.json, or a complete tokenizer.json (Phi-3)."""
    from transformers import AutoTokenizer

    path = real_path(folder)
    if (path / "tokenizer.json").is_file():
        config = folder_config(folder)
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path / "tokenizer.json")),
                                       **{k: _token_str(config[k]) for k in ("bos_token", "eos_token", "unk_token")
                                          if config.get(k)})
    return AutoTokenizer.from_pretrained(str(path))


REAL_TOKENIZER_FOLDERS = ["tokenizers/qwen3", "tokenizers/qwen2.5-instruct", "tokenizers/phi-3-mini-4k-instruct",
                          "tokenizers/phi-3-mini-128k-instruct"]
# Templates kept elsewhere whose family's vocabulary is here: {template: tokenizer folder}.
FAMILY_OF = {
    **dict.fromkeys(["templates/llama.cpp/Qwen-QwQ-32B.jinja", "templates/llama.cpp/Qwen3-Coder.jinja", "templates/chujiezheng_chat_templates/qwen2.5-instruct.jinja",
                     "templates/chujiezheng_chat_templates/chatml.jinja"], "tokenizers/qwen3"),
    "templates/chujiezheng_chat_templates/phi-3.jinja": "tokenizers/phi-3-mini-128k-instruct",
    # Llama-2's SentencePiece vocabulary, as Phi-3's tokenizer.json ships it (llama-2-7b's own tokenizer.json has
    # merges the tokenizers library rejects)
    **dict.fromkeys(["templates/chujiezheng_chat_templates/llama-2-chat.jinja",
                     "templates/chujiezheng_chat_templates/mistral-instruct.jinja",
                     "templates/chujiezheng_chat_templates/zephyr.jinja"], "tokenizers/phi-3-mini-4k-instruct"),
}


def family_folder(template: RealTemplate) -> str | None:
    return FAMILY_OF.get(template.name, template.folder if template.folder in REAL_TOKENIZER_FOLDERS else None)


REAL_TOKENIZER_TEMPLATES = [t for t in TEMPLATES if family_folder(t) is not None]


@pytest.mark.parametrize("template", REAL_TOKENIZER_TEMPLATES or [None],
                         ids=[t.name for t in REAL_TOKENIZER_TEMPLATES] or ["absent"])
def test_mask_with_the_real_tokenizer(template):
    if template is None:
        real_path("tokenizers")
    tok = family_tokenizer(family_folder(template))
    tok.chat_template = template.text
    for conversation in CONVERSATIONS:
        check_template(tok, template, conversation)


def test_real_tokenizers_are_covered():
    real_path("tokenizers")
    assert {family_folder(t) for t in REAL_TOKENIZER_TEMPLATES} == set(REAL_TOKENIZER_FOLDERS)
    assert set(FAMILY_OF) <= set(TEMPLATE_IDS)
    qwen = family_tokenizer("tokenizers/qwen3")
    config = folder_config("tokenizers/qwen3")["added_tokens_decoder"]
    assert all(qwen.convert_tokens_to_ids(t["content"]) == int(i) for i, t in config.items())


# ---------------------------------------------------------------------------------------------- golden ids/masks
SPECFORGE_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}  # SpecForge adds it
# (reference file, tokenizer folder, template file): SpecForge's Qwen references that a template here renders.
SPECFORGE_GOLDEN = [
    ("qwen3-instruct_standard", "tokenizers/qwen3", "tokenizer_config.json"),
    ("qwen3-thinking_standard", "tokenizers/qwen3", "tokenizer_config.json"),
    ("qwen_standard", "tokenizers/qwen2.5-instruct", "tokenizer_config.json"),  # plain ChatML, no think block
    ("qwen3-thinking_reasoning-multi-turn", "tokenizers/qwen3", "tokenizer_config.json"),  # reasoning_content
]
# Not reproduced: the other references need a tokenizer shared/real does not have (DeepSeek, Kimi, Ling), tool
# messages (records here carry system/user/assistant text only), or a template it does not have (Qwen3-Next,
# Qwen3.5); gpt-oss's is SpecForge's own harmony rendering (a fixed "Current date: 2025-06-28", "Reasoning: low",
# `<|end|>` on the last turn), which the official template does not produce.


def specforge_case(name: str, folder: str, template_file: str):
    table = json.loads(real_path("data/specforge/test_parsers_messages.json").read_text())
    golden = json.loads(real_path(f"data/specforge/test_references/{name}_ref.json").read_text())
    label = name.split("_", 1)[1]
    (messages,) = table["message_sets"][{v: k for k, v in table["label_of_message_set"].items()}[label]]
    tok = family_tokenizer(folder)
    tok.chat_template = _templates_in(real_path(folder, template_file), "")[0][1]
    return tok, [SPECFORGE_SYSTEM, *messages], golden


def specforge_to_rule(tok, ids: list[int], golden_mask: list[int]) -> list[int]:
    """SpecForge's mask in this repository's convention, the two differences made explicit:

    * SpecForge also supervises the newline the template writes after `<|im_end|>`; the rule does not.
    * SpecForge's instruct parser starts a turn at its answer, after the think block the template writes
      (`<think>\\n\\n</think>\\n\\n`); the rule starts it at the end of the generation prompt `...assistant\\n`.
    """
    mask = list(golden_mask)
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    for k in range(1, len(ids)):
        if ids[k - 1] == im_end and tok.decode([ids[k]]) == "\n":
            mask[k] = 0
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for k in range(len(ids) - len(header)):
        if ids[k:k + len(header)] == header:
            turn = range(k + len(header), next((j for j in range(k + 1, len(ids)) if ids[j] == im_start), len(ids)))
            first = next((j for j in turn if mask[j]), None)
            for j in range(turn.start, first if first is not None else turn.start):
                mask[j] = 1
    return mask


@pytest.mark.parametrize("name,folder,template_file", SPECFORGE_GOLDEN, ids=[g[0] for g in SPECFORGE_GOLDEN])
def test_specforge_golden_ids_and_masks(name, folder, template_file):
    tok, messages, golden = specforge_case(name, folder, template_file)
    ids, mask = ChatMasker(tok).encode(messages)
    assert ids == golden["input_ids"]
    assert mask == specforge_to_rule(tok, ids, golden["loss_mask"])



# ---------------------------------------------------------------------------------------------- real chat data
SHAREGPT_TEMPLATES = ["tokenizers/phi-3-mini-4k-instruct/tokenizer_config.json",
                      "tokenizers/gpt-oss-20b/chat_template.llama.cpp_gpt-oss-120b.jinja",
                      "tokenizers/mistral-7b-instruct-v0.3/mistral_common_chat_templates/v3.jinja"]


@pytest.mark.parametrize("name", SHAREGPT_TEMPLATES)
def test_sharegpt_records_with_three_turns_are_masked_not_skipped(name):
    """FastChat's ShareGPT sample (1-3 assistant turns per record) through tokenize_records: no record is
    skipped, and each mask is the rule's (records whose texts repeat inside the record are checked for their
    answers being supervised only, as the reference finds texts by search)."""
    from stages.data.records import Example, parse_record, tokenize_records

    source = real_path("data/fastchat/dummy_conversation.json")
    (template,) = [t for t in TEMPLATES if t.name == name]
    tok = family_tokenizer(family_folder(template)) if family_folder(template) else small_tokenizer(template)
    tok.chat_template = template.text
    records = json.loads(source.read_text())[:40]
    examples = list(tokenize_records([str(source)], tok, max_seq_len=100_000, select=lambda i: i < 40))
    assert len(examples) == 40 and all(isinstance(e, Example) for e in examples)
    exact = 0
    for example, record in zip(examples, records):
        _, messages = parse_record(record)
        full = render(tok, messages, False)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        assert example.input_ids == enc["input_ids"]
        contents = [m["content"] for m in messages]
        if all(full.count(c) == 1 for c in contents):
            exact += 1
            assert example.loss_mask == supervised_mask(enc["offset_mapping"], reference_spans(tok, messages))
        for m in messages:
            at = full.find(m["content"])
            covered = supervised_mask(enc["offset_mapping"], [(at, at + len(m["content"]))])
            touched = [s for s, c in zip(example.loss_mask, covered) if c]
            assert all(touched) if m["role"] == "assistant" else not any(touched) or full.count(m["content"]) > 1
    assert exact >= 25
    assert sum(1 for r in records if sum(t["from"] == "gpt" for t in r["conversations"]) == 3) >= 10
