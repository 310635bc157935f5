"""Draft model: parameter layout of the serving checkpoint, the engines' forward (vs a float64 reference written
here with transformers' RoPE), RoPE vs transformers for default/linear/llama3/yarn, target initialisation."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from draft_testing import random_draft, rel_err, tiny_cfg
from eagle.config import DRAFT_ARCHS
from eagle.inference import DraftCache, draft_step
from eagle.model import Eagle3Draft
from eagle.rope import RotaryEmbedding, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parameter_names_shapes_and_dtypes_follow_the_serving_layout():
    cfg = tiny_cfg()
    model = Eagle3Draft(cfg)
    H, Ht, nH, nKV, D, I, V, Vd = 32, 24, 4, 2, 8, 48, 50, 40
    expected = {
        "fc.weight": (H, 3 * Ht),
        "midlayer.self_attn.q_proj.weight": (nH * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": (nKV * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (nKV * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, nH * D),
        "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "norm.weight": (H,),
        "lm_head.weight": (Vd, H),
        "d2t": (Vd,),
        "t2d": (V,),
        "embed_tokens.weight": (V, H),
    }
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected  # no rope buffer, no `model.` prefix
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(expected) - {"d2t", "t2d", "embed_tokens.weight"}
    # default vocab map is the identity onto the first Vd ids
    assert torch.equal(model.draft_to_target(torch.arange(Vd)), torch.arange(Vd))
    assert int(model.t2d.sum()) == Vd


def test_eagle31_adds_one_trainable_norm_per_aux_state_and_nothing_else():
    cfg = tiny_cfg(fc_norm=True, norm_output=True)
    plain = {k: tuple(v.shape) for k, v in Eagle3Draft(tiny_cfg()).state_dict().items()}
    model = Eagle3Draft(cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == plain | {f"fc_norm.{i}.weight": (24,) for i in range(3)}  # RMSNorm(Ht), Ht = 24 != H = 32
    assert all(torch.equal(model.state_dict()[f"fc_norm.{i}.weight"], torch.ones(24)) for i in range(3))
    assert all(model.get_parameter(f"fc_norm.{i}.weight").requires_grad for i in range(3))
    assert model.fc_norm[0].eps == cfg.rms_norm_eps


def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def reference_fuse(p, cfg, aux):
    """Float64 fc input: with fc_norm, each aux state (chunk of width Ht) RMS-normalised by its own weight."""
    aux, Ht = aux.double(), cfg.target_hidden_size
    if cfg.fc_norm:
        aux = torch.cat([rms(aux[..., i * Ht:(i + 1) * Ht], p[f"fc_norm.{i}.weight"], cfg.rms_norm_eps)
                         for i in range(3)], -1)
    return aux @ p["fc.weight"].T


def reference_prefill(model, cfg, aux, ids, positions):
    """Float64 step-0 forward over one sequence with causal attention, written from the reference text.
    Returns (logits, the state the next step receives: out, or norm(out) with norm_output)."""
    p = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    eps = cfg.rms_norm_eps
    g = reference_fuse(p, cfg, aux)  # (1, T, H)
    e = p["embed_tokens.weight"][ids]
    x = torch.cat([rms(e, p["midlayer.input_layernorm.weight"], eps), rms(g, p["midlayer.hidden_norm.weight"], eps)],
                  -1)
    T, nH, nKV, D = ids.shape[1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ p["midlayer.self_attn.q_proj.weight"].T).view(1, T, nH, D).transpose(1, 2)
    k = (x @ p["midlayer.self_attn.k_proj.weight"].T).view(1, T, nKV, D).transpose(1, 2)
    v = (x @ p["midlayer.self_attn.v_proj.weight"].T).view(1, T, nKV, D).transpose(1, 2)
    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=nH, head_dim=D,
                     rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    cos, sin = LlamaRotaryEmbedding(hf)(q, positions)
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    k, v = k.repeat_interleave(nH // nKV, dim=1), v.repeat_interleave(nH // nKV, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, nH * D)
    out = g + a @ p["midlayer.self_attn.o_proj.weight"].T  # residual is the (un-normalised) hidden stream
    h = rms(out, p["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(h @ p["midlayer.mlp.gate_proj.weight"].T) * (h @ p["midlayer.mlp.up_proj.weight"].T))
    out = out + mlp @ p["midlayer.mlp.down_proj.weight"].T
    normed = rms(out, p["norm.weight"], eps)
    return normed @ p["lm_head.weight"].T, (normed if cfg.norm_output else out)


@pytest.mark.parametrize("kv_heads, arch", [(1, "eagle3"), (2, "eagle3"), (4, "eagle3"), (2, "eagle3.1"),
                                            (4, "eagle3.1")])
def test_forward_matches_float64_reference(kv_heads, arch):
    cfg = tiny_cfg(num_key_value_heads=kv_heads, **DRAFT_ARCHS[arch])
    model = random_draft(cfg, seed=3)
    T = 11
    aux = torch.randn(1, T, 3 * cfg.target_hidden_size)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    positions = torch.arange(5, 5 + T)[None]  # not starting at 0: RoPE is relative, but the rows are not
    ref_logits, ref_out = reference_prefill(model, cfg, aux, ids, positions)
    logits, out = draft_step(model, DraftCache(cfg, 1, T), ids, aux, positions, fused=False)
    assert rel_err(logits.double(), ref_logits) <= 1e-5
    assert rel_err(out.double(), ref_out) <= 1e-5


def test_fc_norm_matches_float64_on_massive_activations():
    """fc_norm on aux states of very different scales (a real target's: |x| from ~1 to ~2.5e4): each state is
    normalised on its own, so the fused state matches float64 and ignores each state's scale."""
    cfg = tiny_cfg(fc_norm=True, norm_output=True)
    model = random_draft(cfg, seed=5)
    p = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(6)
    aux = torch.randn(2, 7, 3 * 24, generator=g)
    scales = torch.tensor([1.0] * 24 + [300.0] * 24 + [25000.0] * 24)
    aux[0, 3, 50] = 60.0  # one massive entry in the top state
    with torch.no_grad():
        fused = model.fuse(aux * scales)
        rescaled = model.fuse(aux * scales.flip(0))
    assert rel_err(fused.double(), reference_fuse(p, cfg, aux * scales)) <= 1e-6
    assert rel_err(rescaled, fused) <= 1e-5  # per-state scales do not reach fc
    plain = Eagle3Draft(tiny_cfg())
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc_norm")})
    with torch.no_grad():
        assert rel_err(plain.fuse(aux * scales.flip(0)), plain.fuse(aux * scales)) > 0.5  # eagle3 feels them


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
LLAMA4_SCOUT = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192}  # equal factors: a hard step, no blend
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": False}


@pytest.mark.parametrize("theta, scaling, head_dim", [
    (10000.0, None, 128),
    (1e6, {"rope_type": "default"}, 128),
    (10000.0, {"rope_type": "linear", "factor": 4.0}, 128),
    (10000.0, {"type": "linear", "factor": 2.0}, 128),  # legacy key
    (500000.0, LLAMA3, 128),
    (500000.0, LLAMA4_SCOUT, 128),
    (150000.0, GPT_OSS_YARN, 64),
    (10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 128),  # defaults
    (1e6, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16384, "beta_fast": 16.0,
           "beta_slow": 2.0}, 96),
    (10000.0, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
               "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, 64),  # DeepSeek-V2-Lite
    (10000.0, {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
               "mscale_all_dim": 0.5}, 64),
    (10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192,
               "attention_factor": 1.25}, 128),
])
def test_rope_matches_transformers(theta, scaling, head_dim):
    """inv_freq bit-identical and cos/sin (incl. YaRN's attention factor) equal to transformers' Llama RoPE."""
    params = {"rope_theta": theta, "rope_type": "default"}
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"})
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    max_pos = int(scaling["factor"] * scaling["original_max_position_embeddings"]) \
        if scaling and "original_max_position_embeddings" in scaling else 131072
    hf = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_parameters=params,
                     max_position_embeddings=max_pos)
    hf_rope = LlamaRotaryEmbedding(hf)
    ours = RotaryEmbedding(head_dim, theta, scaling)
    assert torch.equal(ours.inv_freq, hf_rope.inv_freq)
    assert ours.attention_scaling == hf_rope.attention_scaling
    positions = torch.tensor([[0, 1, 7, 100, 4095, 8191, 8192, 20000, 65535, 131071]])
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = ours(positions)
    torch.testing.assert_close(cos[:, 0], hf_cos, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[:, 0], hf_sin, rtol=0, atol=2e-6)


def test_yarn_attention_factor_and_frequency_blend():
    """YaRN by its definition: top frequencies kept, bottom ones divided by the factor, cos/sin scaled by
    0.1 ln(factor) + 1 (mscale == mscale_all_dim cancels it)."""
    plain = rope_inv_freq(64, 150000.0)
    yarn = RotaryEmbedding(64, 150000.0, GPT_OSS_YARN)
    assert torch.equal(yarn.inv_freq[:4], plain[:4])
    torch.testing.assert_close(yarn.inv_freq[-4:], plain[-4:] / 32.0)
    assert yarn.attention_scaling == pytest.approx(0.1 * math.log(32.0) + 1.0)
    cos, sin = yarn(torch.tensor([[3]]))
    assert (cos ** 2 + sin ** 2).sqrt().flatten() == pytest.approx([yarn.attention_scaling] * 64)
    deepseek = dict(GPT_OSS_YARN, mscale=1.0, mscale_all_dim=1.0)
    assert RotaryEmbedding(64, 150000.0, deepseek).attention_scaling == 1.0


def test_llama3_scaling_changes_low_frequencies_only():
    plain, scaled = rope_inv_freq(128, 500000.0), rope_inv_freq(128, 500000.0, LLAMA3)
    assert torch.equal(plain[:8], scaled[:8])  # high frequencies kept
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # lowest frequency divided by the factor


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "longrope", "factor": 4.0}, "unsupported rope type 'longrope'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope type 'dynamic'"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    (dict(LLAMA3, high_freq_factor=0.5), "high_freq_factor >= low_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    (dict(GPT_OSS_YARN, beta_fast=0), "positive 'beta_fast'"),
    (dict(GPT_OSS_YARN, truncate="no"), "boolean 'truncate'"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_rope_fails_at_construction(scaling, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(8, 10000.0, scaling)


def test_model_rejects_rope_it_cannot_reproduce():
    """The model validates its rope at construction even if handed a config object that did not."""
    import dataclasses

    cfg = tiny_cfg()
    bad = type("Cfg", (), {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})()
    bad.rope_scaling = {"rope_type": "longrope"}
    with pytest.raises(ValueError, match="longrope"):
        Eagle3Draft(bad)


def test_init_from_target_copies_embedding_vocab_map_and_lm_head_rows():
    cfg = tiny_cfg()
    model = Eagle3Draft(cfg)
    V, H, Vd = cfg.vocab_size, cfg.hidden_size, cfg.draft_vocab_size
    weights = {"embed_tokens.weight": torch.randn(V, H), "lm_head.weight": torch.randn(V, H),
               "norm.weight": torch.rand(H) + 0.5}
    kept = torch.sort(torch.randperm(V)[:Vd]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[kept] = True
    model.init_from_target(weights, kept - torch.arange(Vd), t2d)
    assert torch.equal(model.embed_tokens.weight, weights["embed_tokens.weight"])
    assert not model.embed_tokens.weight.requires_grad
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"][kept])
    assert torch.equal(model.norm.weight, weights["norm.weight"])
    assert torch.equal(model.draft_to_target(torch.arange(Vd)), kept)
    assert torch.equal(model.t2d, t2d)
    # tied target (no lm_head): rows of the embedding; init_lm_head=False leaves lm_head alone
    tied = Eagle3Draft(cfg)
    tied.init_from_target({"embed_tokens.weight": weights["embed_tokens.weight"]}, kept - torch.arange(Vd), t2d)
    assert torch.equal(tied.lm_head.weight, weights["embed_tokens.weight"][kept])
    untouched = Eagle3Draft(cfg)
    before = untouched.lm_head.weight.clone()
    untouched.init_from_target(weights, kept - torch.arange(Vd), t2d, init_lm_head=False)
    assert torch.equal(untouched.lm_head.weight, before)


def test_init_from_target_rejects_mismatched_shapes():
    cfg = tiny_cfg()
    model = Eagle3Draft(cfg)
    good_map = (torch.zeros(cfg.draft_vocab_size, dtype=torch.int64), torch.zeros(cfg.vocab_size, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        model.init_from_target({"embed_tokens.weight": torch.randn(cfg.vocab_size + 1, cfg.hidden_size)}, *good_map)
    with pytest.raises(ValueError, match="vocab map"):
        model.init_from_target({"embed_tokens.weight": torch.randn(cfg.vocab_size, cfg.hidden_size)},
                               torch.zeros(3, dtype=torch.int64), good_map[1])
