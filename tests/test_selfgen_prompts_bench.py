"""bench/tools/selfgen_prompts.py: which sampled prompts it keeps, what it reads as the benchmark to avoid, where the
user turn starts in the template, and that it stops with a message on a model that never ends a user turn."""
from __future__ import annotations

import json

import pytest

from bench.tools import selfgen_prompts as selfgen

pytestmark = pytest.mark.usefixtures("one_torch_thread")


STOP = 0
WORDS = ["<stop>"] + "what What is the capital of france and why do people like paris so much".split()


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def decode(row: list[int]) -> str:
    return " ".join(WORDS[i] for i in row)


def test_collect_keeps_new_prompts_and_counts_each_drop_reason():
    banned = selfgen.ngrams("tell me: and why do people like paris so much, today")  # shares one 8-gram
    batches = iter([
        [ids("what is the capital of france") + [STOP, 5, 5],  # kept; tokens after the stop are ignored
         ids("what is the capital") + [STOP],                   # kept
         ids("What is the capital of france") + [STOP],         # duplicate (case-insensitive)
         ids("paris paris paris paris"),                        # no stop: hit the token limit
         [STOP]],                                               # empty
        [ids("and why do people like paris so much") + [STOP],  # 8-gram of the excluded benchmark
         ids("paris") + [STOP],                                 # kept: the third
         ids("france") + [STOP]],                               # kept, then cut at num
    ])
    calls = []
    kept, dropped, sampled = selfgen.collect(lambda: next(batches), decode, {STOP}, 3, banned, 20.0,
                                             progress=calls.append)
    assert kept == ["what is the capital of france", "what is the capital", "paris"]
    assert dropped == {"length": 1, "empty": 1, "duplicate": 1, "excluded": 1}
    assert sampled == 8 and calls == [2, 4]


def test_collect_gives_up_with_a_message_when_nothing_ends_its_turn():
    with pytest.raises(SystemExit, match="kept 0 of 8 sampled prompts"):
        selfgen.collect(lambda: [ids("paris so much")] * 4, decode, {STOP}, 2, set(), 4.0)


def test_excluded_ngrams_read_every_turn_of_an_mt_bench_question_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": [
        "Compose an engaging travel blog post about a recent trip to Hawaii.",
        "Rewrite your previous response. Start every sentence with the letter A."]}) + "\n")
    grams = selfgen.excluded_ngrams([str(path)])
    assert ("compose", "an", "engaging", "travel", "blog", "post", "about", "a") in grams
    assert ("rewrite", "your", "previous", "response", "start", "every", "sentence", "with") in grams
    assert selfgen.screen("Please rewrite your previous response. Start every sentence with A", set(),
                          grams) == "excluded"
    assert selfgen.screen("Write a travel blog post about Hawaii", set(), grams) is None


def test_user_turn_prefix_is_what_every_user_turn_is_rendered_after(tiny_qwen3):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    prefix = selfgen.user_turn_prefix(tokenizer)
    for text in ("hello there", "a different question?"):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        assert rendered.startswith(prefix + text)
    assert prefix.endswith("<|im_start|>user\n")


def test_main_stops_with_a_message_on_a_random_model(tiny_llama, tmp_path):
    """A random-weight model almost never writes its end-of-turn token within 3 tokens."""
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(SystemExit, match="rarely ends a user turn"):
        selfgen.main(["--target", str(tiny_llama), "--num", "2", "--out", str(out), "--batch-size", "4",
                      "--max-new-tokens", "3", "--max-sampled-ratio", "2", "--dtype", "float32"])
    assert not out.exists()  # nothing half-written
