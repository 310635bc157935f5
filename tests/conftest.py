"""Shared test fixtures: tiny *real* Hugging Face models and tokenizers, built offline.

Nothing is ever downloaded. Tokenizers are trained with the `tokenizers` library on text that ships with
Python (`pydoc_data.topics`); models are random-initialised Llama / Qwen3 configs saved with
`save_pretrained`. Every fixture is session-scoped and cached under pytest's tmp dir, so the suite builds each
once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama-3 style template: header tokens, <|eot_id|> ends every turn. No generation tags.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# ChatML / Qwen3 style: <|im_start|>role\n ... <|im_end|>\n. No generation tags.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML with {% generation %} tags around what the assistant is trained on.
CHATML_GENERATION_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|im_start|>", "<|im_end|>",
]


def corpus_text(max_chars: int = 200_000) -> list[str]:
    """Training text that ships with Python: the pydoc topic help pages."""
    from pydoc_data.topics import topics

    out, n = [], 0
    for key in sorted(topics):
        out.append(topics[key])
        n += len(topics[key])
        if n > max_chars:
            break
    return out


def build_tokenizer(out_dir: Path, chat_template: str, vocab_size: int = 512, eos: str = "<|eot_id|>"):
    """Train a byte-level BPE offline and save it as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token=eos, pad_token="<|pad|>",
    )
    fast.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, arch: str, tokenizer, chat_template: str | None = None, *, layers: int = 8,
                hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                tie: bool = False, seed: int = 0) -> Path:
    """A random-initialised tiny causal LM saved with save_pretrained next to its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=1024,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen3":
        cfg = Qwen3Config(head_dim=hidden // heads, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger-than-default init so the random model's distributions are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spin-waiting on a busy 2-core box makes them several
    times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Tiny Llama (8 layers, hidden 64, untied) with a Llama-3 style chat template."""
    root = tmp_path_factory.mktemp("tiny_llama")
    tok = build_tokenizer(root / "tok", LLAMA3_TEMPLATE, eos="<|eot_id|>")
    return build_model(root / "model", "llama", tok)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """Tiny Qwen3 (8 layers, hidden 64, tied embeddings) with a ChatML template."""
    root = tmp_path_factory.mktemp("tiny_qwen3")
    tok = build_tokenizer(root / "tok", CHATML_TEMPLATE, eos="<|im_end|>")
    return build_model(root / "model", "qwen3", tok, tie=True, seed=1)


CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What does a for loop do?"},
                  {"role": "assistant", "content": "It iterates over the items of a sequence."}]},
    {"messages": [{"role": "user", "content": "Define a class."},
                  {"role": "assistant", "content": "Use the class statement."},
                  {"role": "user", "content": "And a function?"},
                  {"role": "assistant", "content": "Use def, then a name and parameters."}]},
    {"conversations": [{"from": "human", "value": "What is a tuple?"},
                       {"from": "gpt", "value": "An immutable sequence of objects."}]},
    {"text": "The with statement wraps a block with methods defined by a context manager."},
]


@pytest.fixture()
def chat_jsonl(tmp_path) -> Path:
    """A small JSONL dataset mixing the supported record formats."""
    path = tmp_path / "chat.jsonl"
    with path.open("w") as f:
        for rec in CONVERSATIONS:
            f.write(json.dumps(rec) + "\n")
    return path
