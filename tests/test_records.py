"""Tests for stages/data/records.py (+ chat_masks.py, record_sources.py): sources, formats, loss masks, bad input.

The reference loss masks are built without the chat template: the test writes each template's text by hand as
segments (header, content + end-of-turn token, trailer), tokenizes every segment on its own and marks the
assistant segments. The implementation's ids must equal the concatenation, and its mask the marked segments.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

import stages.data.sources as record_sources
from conftest import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE, CONVERSATIONS
from stages.errors import StageError
from stages.data.records import (
    BadRecord, Example, Skipped, count_records, format_skip_report, read_records, summarize_skips,
    tokenize_records,
)

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Define a class."},
    {"role": "assistant", "content": "Use the class statement."},
    {"role": "user", "content": "And a function?"},
    {"role": "assistant", "content": " Use def, then a name.\nThen the body."},
]


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def qwen_tok(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def qwen_gen_tok(tiny_qwen3):
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    tok.chat_template = CHATML_GENERATION_TEMPLATE
    return tok


def llama3_segments(messages):
    segs = [("<|begin_of_text|>", 0)]
    for m in messages:
        sup = int(m["role"] == "assistant")
        segs += [(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0), (m["content"] + "<|eot_id|>", sup)]
    return segs


def chatml_segments(messages):
    segs = []
    for m in messages:
        sup = int(m["role"] == "assistant")
        segs += [(f"<|im_start|>{m['role']}\n", 0), (m["content"] + "<|im_end|>", sup), ("\n", 0)]
    return segs


def reference(tok, segments):
    ids, mask = [], []
    for text, sup in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [sup] * len(piece)
    return ids, mask


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def supervised_runs(tok, ids, mask):
    """Decoded text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("which", ["llama", "chatml"])
@pytest.mark.parametrize("messages", [CONVERSATIONS[0]["messages"], CONVERSATIONS[1]["messages"], MULTI_TURN])
def test_masks_equal_hand_built_assistant_spans(which, messages, llama_tok, qwen_tok, tmp_path):
    tok, segments, eot = ((llama_tok, llama3_segments, "<|eot_id|>") if which == "llama"
                          else (qwen_tok, chatml_segments, "<|im_end|>"))
    ref_ids, ref_mask = reference(tok, segments(messages))
    (ex,) = tokenize_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tok, max_seq_len=4096)
    assert ex.input_ids == ref_ids
    assert ex.loss_mask == ref_mask
    assert supervised_runs(tok, ex.input_ids, ex.loss_mask) == [
        m["content"] + eot for m in messages if m["role"] == "assistant"]


def test_generation_tags_do_not_change_the_rule(qwen_tok, qwen_gen_tok, tmp_path):
    """`{% generation %}` spans are not used (SmolLM3's wrap the header and the newline after <|im_end|>): a tagged
    template is masked by the same rule as any other."""
    convs = [CONVERSATIONS[0]["messages"], CONVERSATIONS[1]["messages"], MULTI_TURN]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs] + [CONVERSATIONS[2]])
    # (HF renders with trim_blocks, so the conftest tagged template drops the "\n" after an assistant turn's
    # <|im_end|>; its text differs from CHATML_TEMPLATE there.)
    tagged = list(tokenize_records(src, qwen_gen_tok, max_seq_len=4096))
    for ex, msgs in zip(tagged, convs):
        assert supervised_runs(qwen_gen_tok, ex.input_ids, ex.loss_mask) == [
            m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    # Tags that wrap more than the rule (the header, the trailing newline) are ignored too.
    wide = AutoTokenizer.from_pretrained(qwen_tok.name_or_path)
    wide.chat_template = CHATML_TEMPLATE.replace(
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n",
        "{% if m['role'] == 'assistant' %}{% generation %}<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n"
        "{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}")
    assert wide.apply_chat_template(MULTI_TURN, tokenize=False) == qwen_tok.apply_chat_template(
        MULTI_TURN, tokenize=False)
    assert list(tokenize_records(src, wide, max_seq_len=4096)) == list(
        tokenize_records(src, qwen_tok, max_seq_len=4096))


# Shapes of real templates that render a conversation differently from the concatenation of its prefixes
# (tests/test_chat_masks_real.py checks the real ones): Phi-3 closes the text with the EOS token, gpt-oss ends
# the last assistant turn with <|return|> and the others with <|end|>, Mistral v3 moves the system text into
# the last user turn.
PHI3_LIKE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
GPT_OSS_LIKE = ("{% for m in messages %}<|start|>{{ m['role'] }}"
                "{% if m['role'] == 'assistant' %}<|channel|>final{% endif %}<|message|>{{ m['content'] }}"
                "{% if m['role'] == 'assistant' and loop.last and not add_generation_prompt %}<|return|>"
                "{% else %}<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")
MISTRAL_LIKE = ("{{ bos_token }}{% set ns = namespace(last=-1, sys='') %}"
                "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}"
                "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% endif %}{% endfor %}"
                "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{% if loop.index0 == ns.last and ns.sys %}{{ ns.sys }}\n\n{% endif %}{{ m['content'] }}[/INST]"
                "{% elif m['role'] == 'assistant' %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


def phi3_segments(tok, messages):
    segs = []
    for m in messages:
        segs += [(f"<|{m['role']}|>\n", 0), (m["content"] + "<|end|>", int(m["role"] == "assistant")), ("\n", 0)]
    return segs + [(tok.eos_token, 0)]


def gpt_oss_segments(tok, messages):
    segs = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            end = "<|return|>" if k == len(messages) - 1 else "<|end|>"
            segs += [("<|start|>assistant", 0), ("<|channel|>final<|message|>" + m["content"] + end, 1)]
        else:
            segs += [(f"<|start|>{m['role']}", 0), ("<|message|>" + m["content"] + "<|end|>", 0)]
    return segs


def mistral_segments(tok, messages):
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    last_user = max(k for k, m in enumerate(messages) if m["role"] == "user")
    segs = [(tok.bos_token, 0)]
    for k, m in enumerate(messages):
        if m["role"] == "user":
            moved = f"{system}\n\n" if k == last_user and system else ""
            segs.append((f"[INST] {moved}{m['content']}[/INST]", 0))
        elif m["role"] == "assistant":
            segs.append((f" {m['content']}</s>", 1))
    return segs


THREE_TURNS = MULTI_TURN + [{"role": "user", "content": "And a module?"},
                            {"role": "assistant", "content": "A file of definitions."}]


@pytest.mark.parametrize("template,segments", [(PHI3_LIKE, phi3_segments), (GPT_OSS_LIKE, gpt_oss_segments),
                                               (MISTRAL_LIKE, mistral_segments)], ids=["phi3", "gpt-oss", "mistral"])
@pytest.mark.parametrize("messages", [MULTI_TURN, THREE_TURNS, THREE_TURNS[:-1]], ids=["2", "3", "ends-in-user"])
def test_templates_that_are_not_prefix_stable(template, segments, messages, qwen_tok, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen_tok.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|start|>", "<|channel|>", "<|message|>",
        "<|return|>", "[INST]", "[/INST]", "</s>"]})
    tok.chat_template = template
    (ex,) = tokenize_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tok, max_seq_len=4096)
    assert (ex.input_ids, ex.loss_mask) == reference(tok, segments(tok, messages))


def test_template_whose_generation_prompt_differs_from_history(qwen_tok, tmp_path):
    """Qwen3-style: the generation prompt opens an empty think block that history turns do not have."""
    tok = AutoTokenizer.from_pretrained(qwen_tok.name_or_path)
    tok.chat_template = CHATML_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")
    (ex,) = tokenize_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI_TURN}]), tok, max_seq_len=4096)
    assert (ex.input_ids, ex.loss_mask) == reference(qwen_tok, chatml_segments(MULTI_TURN))


QWEN3_LIKE_TEMPLATE = (  # drops the reasoning of assistant turns that precede the last user turn, like Qwen3's
    "{% set ns = namespace(last_user=0) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_that_rewrites_earlier_turns(qwen_tok, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen_tok.name_or_path)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    msgs = [{"role": "user", "content": "Define a class."},
            {"role": "assistant", "content": "<think>\nrecall syntax\n</think>\n\nUse the class statement."},
            {"role": "user", "content": "And a function?"},
            {"role": "assistant", "content": "<think>\nsame idea\n</think>\n\nUse def."}]
    as_rendered = [dict(m) for m in msgs]
    as_rendered[1]["content"] = "Use the class statement."
    assert tok.apply_chat_template(msgs, tokenize=False) == "".join(t for t, _ in chatml_segments(as_rendered))
    (ex,) = tokenize_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, max_seq_len=4096)
    assert (ex.input_ids, ex.loss_mask) == reference(tok, chatml_segments(as_rendered))


def test_template_without_end_of_turn_token_supervises_the_content(qwen_tok, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen_tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:\n{% endif %}")
    msgs = CONVERSATIONS[1]["messages"]
    (ex,) = tokenize_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, max_seq_len=4096)
    segs = []
    for m in msgs:
        segs += [(f"{m['role']}:\n", 0), (m["content"], int(m["role"] == "assistant")), ("\n", 0)]
    assert (ex.input_ids, ex.loss_mask) == reference(tok, segs)


def test_assistant_first_and_extra_message_keys(llama_tok, qwen_tok, tmp_path):
    msgs = [{"role": "assistant", "content": "Hello, ask me.", "name": "bot", "weight": 1},
            {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."}]
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs, "id": "x1"}])
    (ex,) = tokenize_records(src, llama_tok, max_seq_len=4096)
    assert (ex.input_ids, ex.loss_mask) == reference(llama_tok, llama3_segments(clean))
    (ex,) = tokenize_records(src, qwen_tok, max_seq_len=4096)
    assert (ex.input_ids, ex.loss_mask) == reference(qwen_tok, chatml_segments(clean))


def test_template_errors_and_missing_template(qwen_tok, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen_tok.name_or_path)
    tok.chat_template = CHATML_TEMPLATE.replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}")
    twice = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}
    src = write_jsonl(tmp_path / "c.jsonl", [twice, CONVERSATIONS[0]])
    skip, ok = tokenize_records(src, tok, max_seq_len=512)
    assert skip.reason == "template_error" and "roles must alternate" in skip.message and isinstance(ok, Example)
    with pytest.raises(BadRecord, match=r"c\.jsonl:1: template_error"):
        list(tokenize_records(src, tok, max_seq_len=512, strict=True))
    tok.chat_template = None  # text and pre-tokenized records need no template; chat records do
    text_only = write_jsonl(tmp_path / "t.jsonl", [CONVERSATIONS[3], {"input_ids": [1, 2]}])
    assert all(isinstance(e, Example) for e in tokenize_records(text_only, tok, max_seq_len=512))
    with pytest.raises(StageError, match="no chat template"):
        list(tokenize_records(src, tok, max_seq_len=512))


def test_loss_on_all_and_sharegpt_and_text(llama_tok, tmp_path):
    msgs = CONVERSATIONS[0]["messages"]
    share = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                "value": m["content"]} for m in msgs]}
    share_plain = {"conversations": [{"from": m["role"], "value": m["content"]} for m in msgs]}
    text = CONVERSATIONS[3]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, share, share_plain, text])
    chat, sg, sg_plain, txt = tokenize_records(src, llama_tok, max_seq_len=4096)
    assert (sg.input_ids, sg.loss_mask) == (chat.input_ids, chat.loss_mask)
    assert (sg_plain.input_ids, sg_plain.loss_mask) == (chat.input_ids, chat.loss_mask)
    assert [e.sample_index for e in (chat, sg, sg_plain, txt)] == [0, 1, 2, 3]
    assert txt.input_ids == llama_tok(text["text"])["input_ids"] and all(txt.loss_mask)
    all_chat = next(iter(tokenize_records(src, llama_tok, max_seq_len=4096, loss_on="all")))
    assert all_chat.input_ids == chat.input_ids and all_chat.loss_mask == [1] * len(chat.input_ids)
    assert 0 < sum(chat.loss_mask) < len(chat.loss_mask)
    with pytest.raises(StageError, match="loss_on"):
        list(tokenize_records(src, llama_tok, max_seq_len=16, loss_on="assistants"))


def test_alpaca_records_read_as_the_chat_they_stand_for(llama_tok, tmp_path):
    """Alpaca fields become the conversation LLaMA-Factory builds from them; its ids and mask are those of that
    conversation written as `messages` by hand."""
    alpaca = [
        {"instruction": "Sort the list.", "input": "3, 1, 2", "output": "1, 2, 3"},
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "And a fruit?", "output": "Apple.", "system": "You are terse.",
         "history": [["Name a colour.", "Red."]]},
    ]
    by_hand = [
        {"messages": [{"role": "user", "content": "Sort the list.\n3, 1, 2"}, {"role": "assistant", "content": "1, 2, 3"}]},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And a fruit?"},
                      {"role": "assistant", "content": "Apple."}]},
    ]
    got = list(tokenize_records(write_jsonl(tmp_path / "a.jsonl", alpaca), llama_tok, max_seq_len=4096))
    want = list(tokenize_records(write_jsonl(tmp_path / "m.jsonl", by_hand), llama_tok, max_seq_len=4096))
    assert all(isinstance(e, Example) for e in got)
    assert [(e.input_ids, e.loss_mask) for e in got] == [(e.input_ids, e.loss_mask) for e in want]


def test_alpaca_prompt_only_and_bad_records(llama_tok, tmp_path):
    from stages.data.records import parse_record
    from stages.regenerate.stage import prompt_segments

    prompt_only = {"instruction": "Write a haiku.", "input": "", "output": ""}
    kind, turns = parse_record(prompt_only)
    assert (kind, turns) == ("chat", [{"role": "user", "content": "Write a haiku."}])
    assert prompt_segments(turns) == [turns]          # regenerate answers it
    bad = [prompt_only, {"instruction": 7, "output": "x"}, {"instruction": "Hi.", "history": [["only one"]]},
           {"instruction": "  ", "output": "x"}, {"instruction": "Hi.", "output": ["a"]}]
    out = list(tokenize_records(write_jsonl(tmp_path / "b.jsonl", bad), llama_tok, max_seq_len=256))
    assert [(o.reason, o.where.rsplit(":", 1)[1]) for o in out] == [
        ("no_supervised_tokens", "1"), ("non_string_content", "2"), ("missing_field", "3"), ("empty_content", "4"),
        ("non_string_content", "5")]
    assert "history[0]" in out[2].message and "instruction" in out[1].message and "output" in out[4].message


def test_preference_records_read_as_the_chosen_conversation(llama_tok, tmp_path):
    """LLaMA-Factory's ranking format (ShareGPT, OpenAI and Alpaca kinds): the conversation answered by `chosen`,
    token for token the one written by hand; `rejected` never reaches the ids."""
    from stages.data.records import Skipped

    chosen_chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                   {"role": "user", "content": "And a fruit?"}, {"role": "assistant", "content": "Apple."}]
    sharegpt = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."},
                                  {"from": "human", "value": "And a fruit?"}],
                "chosen": {"from": "gpt", "value": "Apple."}, "rejected": {"from": "gpt", "value": "Rocket."}}
    openai = {"messages": chosen_chat[:3], "chosen": {"role": "assistant", "content": "Apple."},
              "rejected": {"role": "assistant", "content": "Rocket."}}
    alpaca = {"instruction": "And a fruit?", "history": [["Name a colour.", "Red."]], "chosen": "Apple.",
              "rejected": "Rocket."}
    answered = dict(sharegpt, conversations=sharegpt["conversations"] + [{"from": "gpt", "value": "Pear."}])
    bad = [dict(sharegpt, chosen="Apple."), dict(sharegpt, chosen={"from": "human", "value": "Apple."}),
           dict(sharegpt, chosen={"from": "gpt", "value": " "})]
    got = list(tokenize_records(write_jsonl(tmp_path / "p.jsonl", [sharegpt, openai, alpaca, answered, *bad]),
                                llama_tok, max_seq_len=4096))
    want = next(iter(tokenize_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": chosen_chat}]), llama_tok,
                                      max_seq_len=4096)))
    for e in got[:3]:
        assert (e.input_ids, e.loss_mask) == (want.input_ids, want.loss_mask)
        assert "Rocket" not in llama_tok.decode(e.input_ids)
    supervised = llama_tok.decode([t for t, m in zip(want.input_ids, want.loss_mask) if m])
    assert "Apple." in supervised and "Red." in supervised
    # a conversation that already ends with an answer keeps it
    assert "Pear." in llama_tok.decode(got[3].input_ids) and "Apple." not in llama_tok.decode(got[3].input_ids)
    assert all(isinstance(o, Skipped) for o in got[4:])
    assert [o.reason for o in got[4:]] == ["missing_field", "unknown_role", "empty_content"]
    assert "chosen" in got[4].message and "chosen" in got[5].message and "chosen" in got[6].message


def test_real_dpo_file_trains_on_the_chosen_answers(llama_tok):
    """LLaMA-Factory's dpo_en_demo.json: every record reads, each with its `chosen` answer as the supervised last
    turn and without its `rejected` one."""
    from real_assets import real_path

    path = real_path("data", "llamafactory", "dpo_en_demo.json")
    records = json.loads(path.read_text())
    examples = list(tokenize_records(str(path), llama_tok, max_seq_len=1 << 16))
    assert len(examples) == len(records) and all(isinstance(e, Example) for e in examples)
    for record, e in list(zip(records, examples))[:20]:
        supervised = llama_tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])
        assert record["chosen"]["value"].strip()[:40] in supervised
        assert record["rejected"]["value"].strip()[:40] not in llama_tok.decode(e.input_ids)


def test_real_alpaca_file_reads_every_record(llama_tok):
    from real_assets import real_path

    path = real_path("data", "llamafactory", "alpaca_en_demo.json")
    records = json.loads(path.read_text())
    examples = list(tokenize_records(str(path), llama_tok, max_seq_len=1 << 16))
    assert len(examples) == len(records) and all(isinstance(e, Example) for e in examples)
    first = next(r for r in records if r["input"])
    turn = llama_tok.decode(examples[records.index(first)].input_ids)
    assert first["instruction"] + "\n" + first["input"] in turn and first["output"] in turn


def test_pretokenized_records(llama_tok, tmp_path):
    v = len(llama_tok)
    recs = [{"input_ids": [1, 2, 3, v - 1]}, {"input_ids": [5, 6, 7], "loss_mask": [0, 1, True]},
            {"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]}]
    a, b, c = tokenize_records(write_jsonl(tmp_path / "t.jsonl", recs), llama_tok, max_seq_len=64)
    assert (a.input_ids, a.loss_mask) == ([1, 2, 3, v - 1], [1, 1, 1, 1])
    assert (b.input_ids, b.loss_mask) == ([5, 6, 7], [0, 1, 1])
    assert isinstance(c, Skipped) and c.reason == "no_supervised_tokens"
    c_all = list(tokenize_records(write_jsonl(tmp_path / "t.jsonl", recs), llama_tok, max_seq_len=64,
                                  loss_on="all"))[2]
    assert c_all.loss_mask == [1, 1, 1]


def test_truncation(llama_tok, tmp_path):
    long_answer = {"messages": [{"role": "user", "content": "Hi."},
                                {"role": "assistant", "content": "word " * 50}]}
    late_answer = {"messages": [{"role": "user", "content": "many words " * 40},
                                {"role": "assistant", "content": "Short."}]}
    src = write_jsonl(tmp_path / "c.jsonl", [long_answer, late_answer, CONVERSATIONS[3]])
    full = list(tokenize_records(src, llama_tok, max_seq_len=10_000))
    out = list(tokenize_records(src, llama_tok, max_seq_len=24))
    assert not any(e.truncated for e in full)
    assert out[0].truncated and out[0].input_ids == full[0].input_ids[:24]
    assert out[0].loss_mask == full[0].loss_mask[:24]
    assert isinstance(out[1], Skipped) and out[1].reason == "no_supervised_tokens" and "24" in out[1].message
    assert sum(isinstance(e, Example) and e.truncated for e in out) == 1 + (len(full[2].input_ids) > 24)


# ---------------------------------------------------------------------------------------------- sources
def _columns(records):
    keys = sorted({k for r in records for k in r})
    return {k: [r.get(k) for r in records] for k in keys}


def test_every_file_type_gives_the_same_examples(qwen_tok, tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = CONVERSATIONS + [{"input_ids": [3, 4, 5], "loss_mask": [0, 1, 1]}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", recs)
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(recs))
    as_data = tmp_path / "b.json"
    as_data.write_text(json.dumps({"data": recs, "version": 1}))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pydict(_columns(recs)), parquet, row_group_size=2)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(_columns(recs)).save_to_disk(str(saved))
    monkeypatch.setattr(record_sources, "PARQUET_BATCH_ROWS", 2)  # several batches

    def key(items):
        return [(e.input_ids, e.loss_mask) for e in items]

    expected = list(tokenize_records(jsonl, qwen_tok, max_seq_len=512))
    assert len(expected) == len(recs) and all(isinstance(e, Example) for e in expected)
    for src in (gz, as_list, as_data, parquet, saved):
        got = list(tokenize_records([str(src)], qwen_tok, max_seq_len=512))
        assert key(got) == key(expected), src
    # several sources: one global numbering in the given order
    both = list(tokenize_records([str(parquet), str(jsonl)], qwen_tok, max_seq_len=512))
    assert [e.sample_index for e in both] == list(range(2 * len(recs)))
    assert key(both) == key(expected) * 2
    assert count_records([parquet, jsonl, saved]) == 3 * len(recs)
    wheres = [w for _, w, _ in read_records([str(as_list), str(parquet), str(saved)])]
    assert wheres[0] == f"{as_list}[0]" and wheres[len(recs)] == f"{parquet}[0]" and wheres[-1].endswith("[4]")


def test_json_variants_and_directory_of_files(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.json", [{"text": "b0"}, {"text": "b1"}])  # JSON Lines under a .json name
    (d / "a.json").write_text(json.dumps({"text": "a0"}))        # a single object: one record
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "c0"}\n\n{"text": "c1"}\n'))
    (d / "notes.txt").write_text("ignored")
    got = [(i, w.replace(str(d), "D"), r["text"]) for i, w, r in read_records([str(d)])]
    assert got == [(0, "D/a.json[0]", "a0"), (1, "D/b.json:1", "b0"), (2, "D/b.json:2", "b1"),
                   (3, "D/c.jsonl.gz:1", "c0"), (4, "D/c.jsonl.gz:3", "c1")]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    with pytest.raises(StageError, match="broken.jsonl.gz: cannot read"):
        list(read_records([str(broken)]))


def test_missing_source_and_unloadable_dataset_name(tmp_path):
    with pytest.raises(StageError, match="not found"):
        list(read_records([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(StageError, match="could not be loaded"):  # hub is offline in tests (conftest)
        list(read_records(["no-such-org/no-such-dataset:test"]))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},\n {"text": ')
    with pytest.raises(StageError, match=r"bad\.json:2"):
        list(read_records([str(bad)]))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_select_called_once_per_record_in_order(kind, tmp_path, monkeypatch):
    """dump-teacher's --limit stops by raising from select: every record selected before it must come out."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"text": f"record {i}"} for i in range(7)]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    if kind == "parquet":
        src = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(recs), src)
        monkeypatch.setattr(record_sources, "PARQUET_BATCH_ROWS", 4)
    elif kind == "saved":
        src = tmp_path / "saved"
        datasets.Dataset.from_list(recs).save_to_disk(str(src))
    seen, got = [], []

    def select(i):
        seen.append(i)
        if i == 5:
            raise _Stop
        return i % 2 == 0

    with pytest.raises(_Stop):
        for index, _, rec in read_records([str(src)], select=select):
            got.append((index, rec["text"]))
    assert seen == [0, 1, 2, 3, 4, 5]
    assert got == [(0, "record 0"), (2, "record 2"), (4, "record 4")]


def test_select_parses_only_selected_lines(qwen_tok, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS * 3)
    full = list(tokenize_records(src, qwen_tok, max_seq_len=512))
    parsed = []
    real = record_sources.parse_json_line
    monkeypatch.setattr(record_sources, "parse_json_line", lambda raw: parsed.append(raw) or real(raw))
    mine = list(tokenize_records(src, qwen_tok, max_seq_len=512, select=lambda i: i % 3 == 1))
    assert [e.sample_index for e in mine] == [1, 4, 7, 10]
    assert mine == [full[i] for i in (1, 4, 7, 10)]
    assert len(parsed) == 4


# ---------------------------------------------------------------------------------------------- bad input
BAD_LINES = [
    json.dumps(CONVERSATIONS[0]).encode(),                                                  # 1 good
    b'{"messages": [{"role": "user", "content": "hi"}',                                     # 2 malformed_json
    b"",                                                                                    # 3 blank: ignored
    json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),                  # 4 unknown_role
    json.dumps({"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "  "}]}).encode(),            # 5 empty_content
    json.dumps({"messages": [{"role": "user", "content": ["q"]}]}).encode(),                # 6 non_string_content
    json.dumps({"prompt": "x", "completion": "y"}).encode(),                               # 7 missing_field
    b'{"text": "caf\xe9 au lait"}',                                                         # 8 bad_encoding
    json.dumps({"input_ids": [1, 2, 10 ** 6]}).encode(),                                    # 9 bad_input_ids
    json.dumps({"input_ids": [1, 2], "loss_mask": [1]}).encode(),                           # 10 bad_loss_mask
    json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),                  # 11 no_supervised_tokens
    json.dumps({"conversations": [{"from": "bot", "value": "x"}]}).encode(),                # 12 unknown_role
    b"   ",                                                                                 # 13 blank: ignored
    json.dumps(CONVERSATIONS[3]).encode(),                                                  # 14 good
    b"[1, 2]",                                                                              # 15 missing_field
    json.dumps({"messages": [{"content": "no role"}]}).encode(),                            # 16 missing_field
]
BAD_COUNTS = {"bad_encoding": 1, "bad_input_ids": 1, "bad_loss_mask": 1, "empty_content": 1, "malformed_json": 1,
              "missing_field": 3, "no_supervised_tokens": 1, "non_string_content": 1, "unknown_role": 2}


@pytest.fixture()
def bad_corpus(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    return path


def test_bad_input_corpus_counts_and_locations(qwen_tok, bad_corpus):
    out = list(tokenize_records([str(bad_corpus)], qwen_tok, max_seq_len=512))
    assert len(out) == len(BAD_LINES) - 2 == count_records(bad_corpus)
    assert [o.sample_index for o in out] == list(range(len(out)))
    good = [o for o in out if isinstance(o, Example)]
    skips = [o for o in out if isinstance(o, Skipped)]
    assert [g.sample_index for g in good] == [0, 11]
    assert summarize_skips(skips) == BAD_COUNTS
    by_line = {int(s.where.rsplit(":", 1)[1]): s.reason for s in skips}
    assert by_line == {2: "malformed_json", 4: "unknown_role", 5: "empty_content", 6: "non_string_content",
                       7: "missing_field", 8: "bad_encoding", 9: "bad_input_ids", 10: "bad_loss_mask",
                       11: "no_supervised_tokens", 12: "unknown_role", 15: "missing_field", 16: "missing_field"}
    assert all(s.where.startswith(f"{bad_corpus}:") for s in skips)
    report = format_skip_report(skips, examples=1)
    assert report.startswith("skipped 12 records:") and f"{bad_corpus}:8: not valid UTF-8" in report
    assert "missing_field: 3" in report and "... and 2 more" in report and "Traceback" not in report


def test_strict_raises_naming_file_and_line(qwen_tok, bad_corpus, tmp_path):
    with pytest.raises(BadRecord, match=rf"{bad_corpus}:2: malformed_json"):
        list(tokenize_records([str(bad_corpus)], qwen_tok, max_seq_len=512, strict=True))
    # no assistant turn is not bad input: still a skip under strict
    only_user = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    (s,) = tokenize_records(only_user, qwen_tok, max_seq_len=512, strict=True)
    assert s.reason == "no_supervised_tokens"

    @click.command()
    def cmd():
        list(tokenize_records([str(bad_corpus)], qwen_tok, max_seq_len=512, strict=True))

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 2 and BadRecord.exit_code == 2
    assert f"{bad_corpus}:2" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
