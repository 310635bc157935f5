"""Helpers for the `dump-teacher --engine vllm` tests and bench: tiny targets vLLM's CPU backend runs, and a
comparison of two dumps of the same records (the vLLM one against the HF one).

vLLM's CPU attention refuses head_dim 16, so these targets use head_dim 64 (hidden 128, 2 heads). Each family is
built from the transformers config class with save_pretrained, random weights (std 0.08 so the distributions are
not flat), fp32, next to a BPE tokenizer trained here (tests/conftest.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llama", "qwen3", "qwen3_moe", "mistral", "gemma3")


def family_config(family: str, tokenizer, layers: int = 6):
    """A tiny config of the family: 6 layers, hidden 128, head_dim 64, 2 query heads, 1 KV head."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=256, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=64, tie_word_embeddings=True, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                 decoder_sparse_step=1, norm_topk_prob=True, **common)
    if family == "mistral":
        return tf.MistralConfig(head_dim=64, sliding_window=None, **common)
    if family == "gemma3":  # Gemma-3 text: (1 + w) norms, scaled embeddings, sliding + global layers, softcap off
        return tf.Gemma3TextConfig(head_dim=64, query_pre_attn_scalar=64, sliding_window=32,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                                   final_logit_softcapping=30.0, **common)
    raise ValueError(family)


def build_family(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Tokenizer + tiny random model of `family`, saved with save_pretrained into out_dir."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import CHATML_TEMPLATE, LLAMA3_TEMPLATE, build_tokenizer

    chatml = family.startswith("qwen")
    tok = build_tokenizer(out_dir, CHATML_TEMPLATE if chatml else LLAMA3_TEMPLATE,
                          eos="<|im_end|>" if chatml else "<|eot_id|>")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tok))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------ compare
def read_dump(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    """sample_index -> that sequence's tensors (aux_hidden_states, teacher_*), over every shard and part."""
    from safetensors.torch import load_file

    rows = {}
    for part in sorted(Path(out).glob("shards/*/part-*.safetensors")):
        t = load_file(part)
        cu = t["cu_seqlens"].tolist()
        for s, index in enumerate(t["sample_index"].tolist()):
            lo, hi = cu[s], cu[s + 1]
            rows[index] = {name: v[lo:hi] for name, v in t.items()
                           if name not in ("cu_seqlens", "sample_index")}
    return rows


def compare_dumps(reference: Path, other: Path, near_tie: float = 1e-4) -> dict:
    """How far `other` (vLLM) is from `reference` (HF) on the same records.

    per layer: max |a - b| and that over max |a| (the layer's scale: per-element ratios blow up near zero);
    argmax: positions whose top-1 ids differ, and the largest reference top-1/top-2 log-prob gap among them (a
    disagreement at a gap below `near_tie` is a near-tie, not an error); top-k: max |a - b| of the sorted log-probs
    (comparable even where two tied ids swap places) and of the log-prob of the reference's argmax.
    """
    a, b = read_dump(reference), read_dump(other)
    if sorted(a) != sorted(b):
        raise AssertionError(f"the dumps hold different records: {sorted(set(a) ^ set(b))[:10]}")
    manifest = json.loads((Path(reference) / "manifest.json").read_text())
    layers = manifest["aux_layer_ids"]
    H = manifest["target"]["hidden_size"]
    diff = np.zeros(len(layers))
    scale = np.zeros(len(layers))
    tokens = disagree = 0
    worst_gap = 0.0
    gaps = []
    lp_sorted = lp_top = 0.0
    for index in sorted(a):
        x, y = a[index], b[index]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
        xa = x["aux_hidden_states"].float().view(-1, len(layers), H)
        ya = y["aux_hidden_states"].float().view(-1, len(layers), H)
        diff = np.maximum(diff, (xa - ya).abs().amax((0, 2)).numpy())
        scale = np.maximum(scale, xa.abs().amax((0, 2)).numpy())
        tokens += xa.shape[0]
        if "teacher_topk_ids" in x:
            xi, yi = x["teacher_topk_ids"], y["teacher_topk_ids"]
            xl, yl = x["teacher_topk_logprobs"], y["teacher_topk_logprobs"]
            miss = xi[:, 0] != yi[:, 0]
            disagree += int(miss.sum())
            if miss.any():
                gap = (xl[miss, 0] - xl[miss, 1]).abs()
                gaps += gap.tolist()
                worst_gap = max(worst_gap, float(gap.max()))
            lp_sorted = max(lp_sorted, float((xl - yl).abs().max()))
            same = ~miss
            lp_top = max(lp_top, float((xl[same, 0] - yl[same, 0]).abs().max()) if same.any() else 0.0)
    return {"records": len(a), "tokens": tokens, "aux_layers": layers,
            "aux_max_abs": [float(v) for v in diff],
            "aux_max_rel": [float(d / s) if s else 0.0 for d, s in zip(diff, scale)],
            "argmax_disagree": disagree, "argmax_disagree_max_gap": worst_gap,
            "argmax_disagree_near_ties": sum(g < near_tie for g in gaps),
            "topk_logprob_max_abs": lp_sorted, "top1_logprob_max_abs": lp_top}
