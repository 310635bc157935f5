"""The committed demo (examples/demo/): target model, tokenizer and conversations load offline and make sense.

These guard what `eagle-pipe run` on the default pipeline.yaml relies on: the target loads with plain
transformers, its depth gives three distinct default aux layers, the data files are well-formed `messages`
records whose eval prompts are held out of train, and the target writes real text (the data's assistant turns
are its own greedy continuations).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
TARGET = DEMO / "target"
DATA = DEMO / "data"


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def user_prompt(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TARGET, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TARGET, local_files_only=True, dtype=torch.float32).eval()


def test_target_files_are_small_and_safe():
    names = {p.name for p in TARGET.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names), names
    assert (TARGET / "model.safetensors").stat().st_size < 12 * 2**20


def test_config_gives_distinct_default_aux_layers():
    from eagle.config import default_aux_layer_ids

    cfg = json.loads((TARGET / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    plain = (2, n // 2, n - 3)  # the EAGLE-3 default, written out
    assert len(set(plain)) == 3 and all(0 < k < n for k in plain)
    assert tuple(default_aux_layer_ids(n)) == plain
    assert cfg["model_type"] == "llama"


def test_tokenizer_chat_template_and_eos(tokenizer, model):
    msgs = [{"role": "user", "content": "Explain the \"for\" statement in Python."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nExplain the \"for\" statement in Python.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == eos and model.generation_config.eos_token_id == eos
    assert len(tokenizer) == model.config.vocab_size
    # byte-level BPE round-trips arbitrary text
    sample = "def f(x):\n    return x ** 2  # ünïcode"
    assert tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample


@pytest.mark.parametrize("name", ["train", "eval"])
def test_data_are_messages_records(name):
    records = read_jsonl(DATA / f"{name}.jsonl")
    assert len(records) >= (200 if name == "train" else 20)
    for i, rec in enumerate(records):
        roles = [m["role"] for m in rec["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"]), (name, i, roles)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in rec["messages"]), (name, i)


def test_eval_prompts_are_held_out():
    train = {user_prompt(r) for r in read_jsonl(DATA / "train.jsonl")}
    evals = [user_prompt(r) for r in read_jsonl(DATA / "eval.jsonl")]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)
    # the phrasings differ too: no eval prompt's opening words start any train prompt
    train_openings = {" ".join(p.split()[:3]) for p in train}
    assert not {" ".join(p.split()[:3]) for p in evals} & train_openings


def test_target_generation_is_real_text_and_matches_the_data(tokenizer, model):
    record = read_jsonl(DATA / "eval.jsonl")[0]
    prompt = record["messages"][:-1]
    ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=128,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new)
    assert len(new) > 10
    assert len(set(new)) >= len(new) // 3, text  # not a loop of a few tokens
    assert len(set(text.split())) >= 8, text     # several distinct words
    # the committed assistant turn is the target's own greedy continuation
    assert text == record["messages"][-1]["content"]
