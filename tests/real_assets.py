"""Third-party files in `shared/real/` (real chat templates, vocabularies, configs, data; see its README).

They are never committed here. `.ci/run` points `EAGLE_PIPE_REAL` at the folder; a user's clone has none, so
tests that need it skip with that reason. Everything else in the suite keeps testing on files the tests make.

Besides the path helpers, this module builds, offline and from those files only:
  - each family's REAL fast tokenizer where its vocabulary is there (Qwen vocab.json + merges.txt; Meta's
    Llama-3 / Llama-4 and OpenAI's o200k tiktoken rank files converted to a byte-level BPE; Mistral's
    SentencePiece models read with a small protobuf reader, since sentencepiece/protobuf are not installed;
    Phi-3's complete tokenizer.json), with the family's REAL chat template. Where the vocabulary is missing
    (Gemma-2/3, DeepSeek-V3) a small byte-level BPE is trained here and given the family's real special tokens
    and real chat template: `FamilySpec.tokenizer_note` says which.
  - tiny random-weight targets from each family's real config.json, shrunk (4 heads, hidden 32, few experts,
    `layers` layers) but keeping the architecture class, RoPE type, sliding window / layer types, MoE and MLA.
    Sliding windows (and Llama-4's attention chunks) are shrunk to `window` tokens so a test passes them cheaply.
"""
from __future__ import annotations

import base64
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ENV_VAR = "EAGLE_PIPE_REAL"


def real_root() -> Path | None:
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    return path if path.is_dir() else None


def real_path(*parts: str) -> Path:
    """A path under shared/real, skipping the calling test when the folder (or that file) is absent."""
    root = real_root()
    if root is None:
        pytest.skip(f"{ENV_VAR} is not set to the shared/real folder (set by .ci/run)")
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not in {ENV_VAR}")
    return path


needs_real = pytest.mark.skipif(real_root() is None,
                                reason=f"{ENV_VAR} is not set to the shared/real folder (set by .ci/run)")


# ---- tokenizers ------------------------------------------------------------------------------------------------

# the pre-tokenizer splits of Meta's Llama-3 tokenizer.py and of o200k (Llama-4's tokenizer.py, gpt-oss, Phi-4)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                 r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama4_special_tokens() -> list[str]:
    """Ids 200000..202047 of Llama-4's tokenizer, in the order of Meta's llama4/tokenizer.py."""
    def reserved(name, count, start=0):
        return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = (["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
            + reserved("text_post_train", 8) + ["<|finetune_right_pad|>"] + reserved("text_post_train", 61, 8))
    vision = (["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
               "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
              + reserved("vision", 4, 2) + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
              + reserved("vision", 1041, 7))
    reasoning = reserved("reasoning", 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `base64(token bytes) rank` per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_backend(path: Path, pattern: str):
    """tiktoken ranks -> a `tokenizers` byte-level BPE, with transformers' own TikTokenConverter (merges rebuilt
    from the ranks); only the rank-file reader is ours, as tiktoken is not installed."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_converted_tiktoken(str(path), pattern))


@functools.lru_cache(maxsize=2)
def _converted_tiktoken(path: str, pattern: str) -> str:
    """The conversion as JSON, kept: rebuilding the merges of 200k ranks takes seconds, and two families share
    each rank file (Llama-3 / SmolLM3, gpt-oss / Phi-4-mini)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):
            return read_tiktoken_ranks(Path(tiktoken_url))

    return RanksConverter(vocab_file=path, pattern=pattern).converted().to_str()


def with_special_tokens(backend, specials: dict[int, str]):
    """Add special tokens at their real ids; the gaps between the base vocabulary and them (and between them)
    are filled with `<|unused_ID|>` so every id lands where the real tokenizer has it."""
    from tokenizers import AddedToken

    next_id = backend.get_vocab_size(with_added_tokens=True)
    for token_id in sorted(specials):
        if token_id < next_id:
            raise ValueError(f"special token id {token_id} is inside the base vocabulary ({next_id})")
        fill = [f"<|unused_{i}|>" for i in range(next_id, token_id)] + [specials[token_id]]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in fill])
        next_id = token_id + 1
    return backend


def added_tokens(tokenizer_config: Path) -> dict[int, str]:
    return {int(k): v["content"] for k, v in json.loads(tokenizer_config.read_text())["added_tokens_decoder"].items()}


def fast_tokenizer(backend, template: str, **special):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tok.chat_template = template
    return tok


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    import struct

    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not handled")
        yield number, wire, value


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a SentencePiece ModelProto (field 1: pieces {1 piece, 2 score, 3 type})."""
    pieces = []
    for number, _, value in _proto_fields(path.read_bytes()):
        if number == 1:
            piece, score, kind = "", 0.0, 1
            for n, _, v in _proto_fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = v
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
    return pieces


def sentencepiece_tokenizer(path: Path, template: str):
    """A Mistral/Llama-2 style SentencePiece BPE as transformers' LlamaTokenizer (Metaspace, byte fallback);
    merges ordered by piece score as transformers' own converter does. Control pieces become special tokens."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    pieces = read_sentencepiece(path)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {p: s for p, s, kind in pieces if kind == 1})
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         add_prefix_space=True, legacy=False)
    control = [p for p, _, kind in pieces if kind in (2, 3)]  # UNKNOWN, CONTROL
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(p, normalized=False, special=True)
                                                          for p in control]})
    tok.chat_template = template
    return tok


def trained_bpe(special: list[str], template: str, vocab_size: int = 1024, **roles):
    """Stand-in where the family's vocabulary is not in shared/real: a byte-level BPE trained on pydoc text,
    with the family's real special tokens (ids from 0, in the given order) and its real chat template."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([topics[k] for k in sorted(topics)[:200]], trainer=trainer)
    return fast_tokenizer(backend, template, **roles)


def read_template(path: Path) -> str:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data["chat_template"]
    return path.read_text()


T = "tokenizers"


def tok_llama3(root: Path):
    base = tiktoken_backend(root / T / "llama-3.1-8b-instruct/original/tokenizer.model", LLAMA3_PATTERN)
    specials = added_tokens(root / T / "llama-3.1-8b-instruct/tokenizer_config.finetune_llama-duo.json")
    return fast_tokenizer(with_special_tokens(base, specials),
                          read_template(root / T / "llama-3.1-8b-instruct/chat_template.jinja"),
                          bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                          pad_token="<|finetune_right_pad_id|>")


# Meta's Llama-4 prompt format (original/llama4_prompt_format.md) written as a template: shared/real has no
# Llama-4 tokenizer_config.json, so there is no real Llama-4 jinja template to use.
LLAMA4_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|header_start|>{{ m['role'] }}<|header_end|>\n\n{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}")


def tok_llama4(root: Path):
    real_path(T, "llama-4-scout-17b-16e-instruct/original/llama4_prompt_format.md")
    base = tiktoken_backend(root / T / "llama-4-scout-17b-16e-instruct/original/tokenizer.model", O200K_PATTERN)
    specials = dict(enumerate(llama4_special_tokens(), start=200000))
    return fast_tokenizer(with_special_tokens(base, specials), LLAMA4_TEMPLATE, bos_token="<|begin_of_text|>",
                          eos_token="<|eot|>", pad_token="<|finetune_right_pad|>")


def tok_gpt_oss(root: Path):
    base = tiktoken_backend(root / T / "gpt-oss-20b/o200k_base.tiktoken", O200K_PATTERN)
    specials = added_tokens(root / T / "gpt-oss-20b/tokenizer_config.json")
    return fast_tokenizer(with_special_tokens(base, specials), read_template(root / T / "gpt-oss-20b/chat_template.jinja"),
                          bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>")


def tok_phi4(root: Path):
    base = tiktoken_backend(root / T / "gpt-oss-20b/o200k_base.tiktoken", O200K_PATTERN)
    config = root / T / "phi-4-mini-instruct/tokenizer_config.json"
    return fast_tokenizer(with_special_tokens(base, added_tokens(config)),
                          json.loads(config.read_text())["chat_template"],
                          bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tok_smollm3(root: Path):
    base = tiktoken_backend(root / T / "llama-3.1-8b-instruct/original/tokenizer.model", LLAMA3_PATTERN)
    specials = added_tokens(root / T / "smollm3-3b/tokenizer_config.json")
    return fast_tokenizer(with_special_tokens(base, specials), read_template(root / T / "smollm3-3b/chat_template.jinja"),
                          eos_token="<|im_end|>", pad_token="<|im_end|>")


def tok_qwen(folder: str):
    """Qwen2Tokenizer from the folder's vocab.json + merges.txt and its official tokenizer_config.json."""
    def build(root: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(root / T / folder))
    return build


def tok_phi3(root: Path):
    from transformers import PreTrainedTokenizerFast

    folder = root / T / "phi-3-mini-128k-instruct"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = read_template(folder / "chat_template.llama.cpp_Phi-3.5-mini-instruct.jinja")
    return tok


def tok_mistral(model_file: str, template: str):
    def build(root: Path):
        folder = root / T / "mistral-7b-instruct-v0.3"
        return sentencepiece_tokenizer(folder / model_file, read_template(folder / "mistral_common_chat_templates"
                                                                          / template))
    return build


def tok_gemma(template: Path, extra: list[str]):
    def build(root: Path):
        special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] + extra
        return trained_bpe(special, read_template(root / template), bos_token="<bos>", eos_token="<eos>",
                           pad_token="<pad>", unk_token="<unk>")
    return build


def tok_deepseek(root: Path):
    special = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
               "<think>", "</think>"]
    return trained_bpe(special, read_template(root / "templates/llama.cpp/deepseek-ai-DeepSeek-V3.1.jinja"),
                       bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                       pad_token="<｜▁pad▁｜>")


# ---- tiny targets from real configs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilySpec:
    name: str
    config: str | None            # path under shared/real, None: transformers' config-class defaults
    tokenizer: object             # root -> tokenizer
    tokenizer_note: str           # "real" or what stands in for it
    model_type: str | None = None  # when config is None, or to take a nested text_config
    window: bool = False          # the shrunk target has a sliding window / attention chunks
    overrides: dict = field(default_factory=dict)
    multimodal: str | None = None  # save the text model inside this *ForConditionalGeneration (tiny vision)


FAMILIES = [
    FamilySpec("llama3", "configs/Llama-3.1-8B.json", tok_llama3, "real (Meta tiktoken + llama-duo specials)"),
    # the real Scout checkpoint is a Llama4ForConditionalGeneration; AutoModelForCausalLM loads its text model as
    # Llama4ForCausalLM (the class whose get_decoder() returns itself)
    FamilySpec("llama4", "configs/Llama-4-Scout-17B-16E-Instruct.json", tok_llama4,
               "real vocabulary; template written from Meta's prompt-format doc", model_type="llama4_text",
               window=True, multimodal="llama4"),
    FamilySpec("qwen2.5", "configs/mlc_preset/Qwen2.5-3B-Instruct.json", tok_qwen("qwen2.5-instruct"), "real"),
    FamilySpec("qwen3", "configs/Qwen3-8B.json", tok_qwen("qwen3"), "real"),
    FamilySpec("qwen3-moe", "configs/Qwen3-30B-A3B.json", tok_qwen("qwen3"), "real"),
    FamilySpec("gpt-oss", "configs/gpt-oss-20b.json", tok_gpt_oss, "real (o200k + harmony specials)", window=True),
    FamilySpec("mistral", "configs/Mistral-7B-Instruct-v0.3.json",
               tok_mistral("mistral_instruct_tokenizer_240323.model.v3", "v3_spm.jinja"),
               "real (SentencePiece v3, mistral-common v3_spm template)", window=True,
               overrides={"sliding_window": 16}),
    FamilySpec("mixtral", "configs/Mixtral-8x7B-v0.1.json",
               tok_mistral("tokenizer.model.v1", "v1_spm.jinja"), "real (SentencePiece v1, v1_spm template)"),
    FamilySpec("gemma2", "configs/mlc_preset/gemma-2-2b.json",
               tok_gemma(Path(T, "gemma-2b-it/chat_template.llama.cpp_gemma-2-2b-it.jinja"), []),
               "trained BPE stand-in (no Gemma vocabulary in shared/real), real template", window=True),
    FamilySpec("gemma3", "configs/mlc_preset/gemma-3-1b-it.json",
               tok_gemma(Path(T, "gemma-3-it/chat_template.json"), []),
               "trained BPE stand-in (no Gemma vocabulary in shared/real), real template", window=True),
    FamilySpec("gemma3-multimodal", "configs/mlc_preset/gemma-3-1b-it.json",
               tok_gemma(Path(T, "gemma-3-it/chat_template.json"), []),
               "trained BPE stand-in, real template; the 1B text config inside Gemma3ForConditionalGeneration",
               window=True, multimodal="gemma3"),
    FamilySpec("phi3.5", "configs/mlc_preset/Phi-3.5-mini-instruct.json", tok_phi3, "real (Phi-3 tokenizer.json)"),
    FamilySpec("phi4-mini", "tokenizers/phi-4-mini-instruct/config.json", tok_phi4,
               "real (o200k + Phi-4-mini specials)"),
    FamilySpec("deepseek-v3", "configs/DeepSeek-V3.json", tok_deepseek,
               "trained BPE stand-in (no DeepSeek-V3 vocabulary in shared/real), real V3.1 template"),
    FamilySpec("smollm3", None, tok_smollm3, "real (Llama-3 tiktoken + SmolLM3 specials)", model_type="smollm3"),
]
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 32, 4, 2, 8, 64


def _shrink_rope_factors(rope: dict | None, rotary_dim: int) -> dict | None:
    """LongRoPE's per-frequency factor lists have one entry per rotary pair: keep the first rotary_dim/2."""
    if not rope:
        return rope
    rope = dict(rope)
    for key in ("long_factor", "short_factor"):
        if isinstance(rope.get(key), list):
            rope[key] = rope[key][: rotary_dim // 2]
    return rope


def shrunk_config(spec: FamilySpec, root: Path, vocab_size: int, layers: int, window: int) -> dict:
    """The family's real config.json with the sizes made tiny and the structure kept."""
    d = json.loads((root / spec.config).read_text()) if spec.config else {"model_type": spec.model_type}
    if "text_config" in d:          # a *ForConditionalGeneration checkpoint: its text model
        d = dict(d["text_config"])
    for key in ("quantization_config", "auto_map", "_name_or_path", "torch_dtype", "dtype",
                "transformers_version", "architectures", "attention_sink_size", "prefill_chunk_size"):
        d.pop(key, None)
    heads = d.get("num_attention_heads")
    d.update(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
             num_key_value_heads=HEADS if d.get("num_key_value_heads") in (None, heads)
             else min(KV_HEADS, d["num_key_value_heads"]),  # multi-head (and MLA) stays multi-head
             vocab_size=vocab_size)
    if "head_dim" in d or d.get("model_type") in ("gemma2", "gemma3_text", "gpt_oss", "qwen3", "qwen3_moe",
                                                 "llama4_text", "smollm3"):
        d["head_dim"] = HEAD_DIM
    if "query_pre_attn_scalar" in d:
        d["query_pre_attn_scalar"] = HEAD_DIM
    if d.get("sliding_window") and d.get("use_sliding_window", True) and (
            d["sliding_window"] < d.get("max_position_embeddings", 0)):  # a window the real model applies
        d["sliding_window"] = window
    if "layer_types" in d:
        d["layer_types"] = d["layer_types"][:layers]
    if d.get("attention_chunk_size"):
        d["attention_chunk_size"] = window
    for experts in ("num_local_experts", "num_experts", "n_routed_experts"):
        if d.get(experts):
            d[experts] = 4
    for per_token in ("num_experts_per_tok", "experts_per_token"):
        if d.get(per_token):
            d[per_token] = 2
    for key, value in (("moe_intermediate_size", 32), ("intermediate_size_mlp", INTERMEDIATE),
                       ("first_k_dense_replace", 1), ("n_group", 1), ("topk_group", 1),
                       ("q_lora_rank", 32), ("kv_lora_rank", 16), ("qk_rope_head_dim", 8),
                       ("qk_nope_head_dim", 8), ("v_head_dim", 16), ("max_window_layers", layers)):
        if key in d and d[key] is not None:
            d[key] = value
    if "mlp_only_layers" in d:
        d["mlp_only_layers"] = [i for i in d["mlp_only_layers"] if i < layers]
    rotary = int(HEAD_DIM * d.get("partial_rotary_factor", 1.0))
    if "rope_scaling" in d:
        d["rope_scaling"] = _shrink_rope_factors(d["rope_scaling"], rotary)
    d.update(spec.overrides)
    return d


def build_family_target(spec: FamilySpec, out_dir: Path, *, layers: int = 8, window: int = 16,
                        seed: int = 0) -> Path:
    """Tokenizer + tiny random model of one family, saved with save_pretrained into out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = real_root()
    if root is None:
        pytest.skip(f"{ENV_VAR} is not set to the shared/real folder (set by .ci/run)")
    if spec.config:
        real_path(spec.config)
    tokenizer = spec.tokenizer(root)
    d = shrunk_config(spec, root, len(tokenizer), layers, window)
    model_type = d.pop("model_type")
    for role in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{role}_token", None)
        if token is not None:  # the real ids of this tokenizer (a stand-in's differ from the config's)
            d[f"{role}_token_id"] = tokenizer.convert_tokens_to_ids(token)
    torch.manual_seed(seed)
    if spec.multimodal:
        model = multimodal_model(spec.multimodal, model_type, d)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d))
    with torch.no_grad():  # larger-than-default init so the random model's distributions are not flat
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:  # norm weights away from their init, so a wrongly read norm shows
                p.add_(torch.randn_like(p) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# a tiny vision tower for the *ForConditionalGeneration checkpoints (text-only data never runs it)
TINY_VISION = {
    "llama4": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                   patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
    "gemma3": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                   patch_size=14),
}


def multimodal_model(kind: str, text_type: str, text: dict):
    from transformers import AutoConfig, Gemma3ForConditionalGeneration, Llama4ForConditionalGeneration

    text_config = AutoConfig.for_model(text_type, **text).to_dict()
    if kind == "gemma3":
        config = AutoConfig.for_model("gemma3", text_config=text_config, vision_config=TINY_VISION[kind],
                                      mm_tokens_per_image=4, eos_token_id=text["eos_token_id"],
                                      pad_token_id=text.get("pad_token_id"), bos_token_id=text.get("bos_token_id"))
        return Gemma3ForConditionalGeneration(config)
    config = AutoConfig.for_model("llama4", text_config=text_config, vision_config=TINY_VISION[kind])
    return Llama4ForConditionalGeneration(config)
