"""Export layout: every rule of docs/checkpoint-format.md, export -> load -> identical logits,
and a plain float64 re-implementation of the engine forward that reads only the exported files."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eagle.config import DRAFT_ARCHS, DraftConfig
from eagle.export import export_draft, load_draft
from eagle.inference import DraftCache, draft_step
from eagle.model import Eagle3Draft
from eagle.vocab import build_vocab_map

V, VD, N_LAYERS = 300, 120, 12
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
             "beta_slow": 1.0, "truncate": False}

EXPECTED_TENSORS = {  # name -> shape builder from (H, Ht, nH*hd, nKV*hd, I)
    "fc.weight": lambda H, Ht, Q, KV, I: (H, 3 * Ht),
    "midlayer.self_attn.q_proj.weight": lambda H, Ht, Q, KV, I: (Q, 2 * H),
    "midlayer.self_attn.k_proj.weight": lambda H, Ht, Q, KV, I: (KV, 2 * H),
    "midlayer.self_attn.v_proj.weight": lambda H, Ht, Q, KV, I: (KV, 2 * H),
    "midlayer.self_attn.o_proj.weight": lambda H, Ht, Q, KV, I: (H, Q),
    "midlayer.mlp.gate_proj.weight": lambda H, Ht, Q, KV, I: (I, H),
    "midlayer.mlp.up_proj.weight": lambda H, Ht, Q, KV, I: (I, H),
    "midlayer.mlp.down_proj.weight": lambda H, Ht, Q, KV, I: (H, I),
    "midlayer.input_layernorm.weight": lambda H, Ht, Q, KV, I: (H,),
    "midlayer.hidden_norm.weight": lambda H, Ht, Q, KV, I: (H,),
    "midlayer.post_attention_layernorm.weight": lambda H, Ht, Q, KV, I: (H,),
    "norm.weight": lambda H, Ht, Q, KV, I: (H,),
    "lm_head.weight": lambda H, Ht, Q, KV, I: (VD, H),
    "d2t": lambda H, Ht, Q, KV, I: (VD,),
    "t2d": lambda H, Ht, Q, KV, I: (V,),
}


def make_model(rope_scaling=None, seed=0, draft_arch="eagle3"):
    from transformers import LlamaConfig

    rope = {"rope_theta": 5000.0, **(rope_scaling or {"rope_type": "default"})}
    target = LlamaConfig(hidden_size=48, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=80, vocab_size=V, max_position_embeddings=256, rms_norm_eps=1e-5,
                         rope_parameters=rope).to_dict()
    cfg = DraftConfig.from_target_config(target, draft_vocab_size=VD, ttt_steps=3, draft_arch=draft_arch)
    g = torch.Generator().manual_seed(seed)
    model = Eagle3Draft(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 2 else 0.5) + (1.0 if p.dim() == 1 else 0))
    d2t, t2d = build_vocab_map(torch.randint(0, 50, (V,), generator=g), VD)
    embed = torch.randn(V, 48, generator=g)
    model.init_from_target({"embed_tokens.weight": embed}, d2t, t2d, init_lm_head=False)
    return model, embed


def run_draft(model, tokens, feats, steps=3):
    """Prefill + step 0 over the context, then `steps - 1` fused steps: all logits, concatenated."""
    cache = DraftCache(model.cfg, 1, tokens.shape[1] + steps)
    T = tokens.shape[1]
    logits, out = draft_step(model, cache, tokens, feats, torch.arange(T)[None], fused=False)
    collected = [logits]
    h, pos = out[:, -1:], T
    for _ in range(steps - 1):
        d = model.draft_to_target(logits[:, -1:].argmax(-1))
        logits, h = draft_step(model, cache, d, h, torch.tensor([[pos]]), fused=True)
        collected.append(logits)
        pos += 1
    return torch.cat(collected, dim=1)


@pytest.fixture(params=[None, LLAMA3_ROPE, YARN_ROPE], ids=["default_rope", "llama3_rope", "yarn_rope"])
def exported(request, tmp_path):
    model, embed = make_model(request.param)
    return model, embed, export_draft(model, tmp_path / "draft")


def test_config_json_follows_every_rule(exported):
    model, _, out = exported
    cfg = model.cfg
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLMEagle3"]
    assert c["model_type"] == "llama"
    assert c["num_hidden_layers"] == 1
    assert c["hidden_size"] == 48
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 12)
    assert c["intermediate_size"] == 80 and c["rms_norm_eps"] == 1e-5 and c["hidden_act"] == "silu"
    assert c["vocab_size"] == V and c["draft_vocab_size"] == VD
    assert c["tie_word_embeddings"] is False
    assert type(c["target_hidden_size"]) is int and c["target_hidden_size"] == 48
    assert c["rope_theta"] == 5000.0  # explicit, not only inside rope_parameters
    assert c["rope_scaling"] == cfg.rope_scaling and "rope_scaling" in c
    assert c["max_position_embeddings"] == 256
    assert c["attention_bias"] is False and c["mlp_bias"] is False
    for flag in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
        assert not c.get(flag, False)
    assert c["eagle_aux_hidden_state_layer_ids"] == [2, 6, 9] == [2, N_LAYERS // 2, N_LAYERS - 3]
    assert c["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 5, 8]
    assert c["torch_dtype"] == "float32"


def test_config_json_loads_in_transformers(exported):
    from transformers import AutoConfig

    model, _, out = exported
    hf = AutoConfig.from_pretrained(out)
    assert hf.num_hidden_layers == 1 and hf.hidden_size == 48 and hf.vocab_size == V
    params = hf.rope_parameters
    assert params["rope_theta"] == 5000.0
    assert params["rope_type"] == (model.cfg.rope_scaling or {"rope_type": "default"})["rope_type"]
    if model.cfg.rope_scaling:
        assert {k: params[k] for k in model.cfg.rope_scaling} == model.cfg.rope_scaling


def test_exported_rope_is_what_transformers_builds_from_config_json(exported):
    """The engines build their rotary embedding from config.json's rope fields (transformers' config object):
    transformers' own Llama RoPE from the exported file equals the loaded draft's cos/sin."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, embed, out = exported
    hf_rope = LlamaRotaryEmbedding(AutoConfig.from_pretrained(out))
    loaded = load_draft(out, embed_weight=embed)
    assert torch.equal(loaded.rope.inv_freq, hf_rope.inv_freq)
    assert loaded.rope.attention_scaling == hf_rope.attention_scaling
    positions = torch.arange(0, 256, 5)[None]
    hf_cos, hf_sin = hf_rope(torch.zeros(1), positions)
    cos, sin = loaded.rope(positions)
    torch.testing.assert_close(cos[:, 0], hf_cos, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[:, 0], hf_sin, rtol=0, atol=2e-6)


def test_load_refuses_rope_fields_edited_away_from_the_trained_draft(tmp_path):
    model, _ = make_model(YARN_ROPE)
    out = export_draft(model, tmp_path / "draft")
    config = json.loads((out / "config.json").read_text())
    config["rope_scaling"]["truncate"] = True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope fields .* differ from the trained draft's"):
        load_draft(out)


def test_tensors_follow_every_rule(exported):
    model, _, out = exported
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    assert names == set(EXPECTED_TENSORS)
    assert not [n for n in names if n.startswith("model.") or "layers." in n or "embed_tokens" in n]
    tensors = load_file(str(out / "model.safetensors"))
    for name, shape in EXPECTED_TENSORS.items():
        assert tuple(tensors[name].shape) == shape(48, 48, 48, 24, 80), name
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert all(tensors[n].dtype == torch.float32 for n in names - {"d2t", "t2d"})
    state = model.state_dict()
    for name in names:
        assert torch.equal(tensors[name], state[name]), name
    target_ids = torch.arange(VD) + tensors["d2t"]
    assert torch.equal(torch.nonzero(tensors["t2d"]).flatten(), target_ids)


def test_export_load_identical_logits(exported):
    model, embed, out = exported
    loaded = load_draft(out, embed_weight=embed)
    assert loaded.cfg == model.cfg and not loaded.training
    assert not loaded.embed_tokens.weight.requires_grad
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (1, 9), generator=g)
    feats = torch.randn(1, 9, 3 * 48, generator=g)
    with torch.no_grad():
        a, b = run_draft(model.eval(), tokens, feats), run_draft(loaded, tokens, feats)
    assert a.shape == (1, 11, VD)
    assert torch.equal(a, b)


def test_load_without_embedding_is_loud(exported):
    _, _, out = exported
    loaded = load_draft(out)
    assert torch.isnan(loaded.embed_tokens.weight).all()
    with pytest.raises(ValueError, match="embed_weight has shape"):
        load_draft(out, embed_weight=torch.zeros(V, 47))


def test_bfloat16_export_keeps_index_dtypes(tmp_path):
    model, embed = make_model()
    out = export_draft(model, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16 and tensors["d2t"].dtype == torch.int64
    assert tensors["t2d"].dtype == torch.bool
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_draft(out, embed_weight=embed.bfloat16())
    assert loaded.fc.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rotate(x, pos, theta):
    d = x.shape[-1]
    inv = [1.0 / theta ** (2 * i / d) for i in range(d // 2)]
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        for i in range(d // 2):
            c, s = math.cos(pos[t] * inv[i]), math.sin(pos[t] * inv[i])
            a, b = x[t, ..., i], x[t, ..., i + d // 2]
            out[t, ..., i] = a * c - b * s
            out[t, ..., i + d // 2] = b * c + a * s
    return out


def engine_fuse_from_files(c, w, feats):
    """fc input as the engines build it: with config.json's fc_norm, `fc_norm.{i}.weight` normalises aux state i
    (the chunk of width target_hidden_size) on its own."""
    x, Ht = feats.double(), c["target_hidden_size"]
    if c.get("fc_norm"):
        x = torch.cat([rms(x[..., i * Ht:(i + 1) * Ht], w[f"fc_norm.{i}.weight"], c["rms_norm_eps"])
                       for i in range(3)], -1)
    return x @ w["fc.weight"].T


def engine_layer_from_files(c, w, embed, tokens, g, positions):
    """The draft layer over rows (token, hidden g, RoPE position), each attending causally to the rows before it
    (what the engines' KV cache holds). Returns the pre-norm out (T, H)."""
    H, nH, nKV, hd, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], \
        c["rms_norm_eps"]
    T = tokens.shape[0]
    x = torch.cat([rms(embed.double()[tokens], w["midlayer.input_layernorm.weight"], eps),
                   rms(g, w["midlayer.hidden_norm.weight"], eps)], dim=-1)           # (T, 2H)
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(T, nH, hd)
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(T, nKV, hd)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(T, nKV, hd)
    q, k = rotate(q, positions, c["rope_theta"]), rotate(k, positions, c["rope_theta"])
    attn = torch.zeros(T, nH, hd, dtype=torch.float64)
    for h in range(nH):
        kv = h // (nH // nKV)
        for t in range(T):
            scores = torch.stack([q[t, h] @ k[s, kv] / math.sqrt(hd) for s in range(t + 1)])
            p = torch.softmax(scores, 0)
            attn[t, h] = sum(p[s] * v[s, kv] for s in range(t + 1))
    h1 = g + attn.reshape(T, nH * hd) @ w["midlayer.self_attn.o_proj.weight"].T
    m = rms(h1, w["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T
    return h1 + mlp


def engine_forward_from_files(out, embed, tokens, feats):
    """Step 0 as the engines run it (reference, "The forward both engines run"), from the files alone."""
    c = json.loads((out / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(out / "model.safetensors")).items()}
    out_ = engine_layer_from_files(c, w, embed, tokens, engine_fuse_from_files(c, w, feats),
                                   list(range(tokens.shape[0])))
    logits = rms(out_, w["norm.weight"], c["rms_norm_eps"]) @ w["lm_head.weight"].T  # (T, Vd)
    target_ids = logits.argmax(-1) + w["d2t"].long()[logits.argmax(-1)]
    return logits, target_ids


def engine_chain_from_files(out, embed, tokens, feats, steps):
    """Chain drafting from the files alone: step 0 over the T verified positions, then steps 1.. at positions T..,
    each fed its own proposal and the previous step's state, pre-norm out or, with config.json's norm_output,
    norm(out) (reference, "EAGLE-3.1 switches"). Returns the last row's logits (Vd,) of every step."""
    c = json.loads((out / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(out / "model.safetensors")).items()}
    g, positions, result = engine_fuse_from_files(c, w, feats), list(range(tokens.shape[0])), []
    for _ in range(steps):
        out_ = engine_layer_from_files(c, w, embed, tokens, g, positions)
        normed = rms(out_[-1], w["norm.weight"], c["rms_norm_eps"])
        logits = normed @ w["lm_head.weight"].T
        result.append(logits)
        d = logits.argmax()
        tokens = torch.cat([tokens, (d + w["d2t"].long()[d]).reshape(1)])
        g = torch.cat([g, (normed if c.get("norm_output") else out_[-1])[None]])
        positions.append(positions[-1] + 1)
    return result


def test_exported_files_implement_the_engine_forward(tmp_path):
    model, embed = make_model(None, seed=3)
    out = export_draft(model, tmp_path / "draft")
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (7,), generator=g)
    feats = torch.randn(7, 3 * 48, generator=g)
    ref_logits, ref_targets = engine_forward_from_files(out, embed, tokens, feats)
    loaded = load_draft(out, embed_weight=embed)
    cache = DraftCache(loaded.cfg, 1, 7)
    logits, _ = draft_step(loaded, cache, tokens[None], feats[None], torch.arange(7)[None], fused=False)
    torch.testing.assert_close(logits[0].double(), ref_logits, rtol=1e-5, atol=1e-4)
    assert torch.equal(loaded.draft_to_target(logits[0].argmax(-1)), ref_targets)


def test_reexport_replaces_and_foreign_dirs_are_refused(tmp_path):
    model, embed = make_model()
    out = export_draft(model, tmp_path / "draft")
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    export_draft(torch.compile(model, backend="eager"), out)  # a compiled wrapper exports the plain names
    assert torch.equal(load_file(str(out / "model.safetensors"))["lm_head.weight"], model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        export_draft(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_load_errors_name_the_problem(tmp_path):
    model, embed = make_model()
    out = export_draft(model, tmp_path / "draft")
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())

    save_file({**tensors, "model.fc.weight": tensors["fc.weight"].clone()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unknown \['model.fc.weight'\]"):
        load_draft(out)
    save_file({k: t for k, t in tensors.items() if k != "d2t"}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['d2t'\]"):
        load_draft(out)
    save_file({**tensors, "d2t": tensors["d2t"].int()}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="'d2t' is torch.int32"):
        load_draft(out)
    save_file(tensors, str(out / "model.safetensors"))

    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eagle_pipe"}))
    with pytest.raises(ValueError, match="eagle_pipe.draft_config"):
        load_draft(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        load_draft(out)


# ----------------------------------------------------------------------------------------------- EAGLE-3.1
def test_eagle31_config_json_adds_exactly_the_two_switches_both_engines_run(tmp_path):
    plain, _ = make_model(seed=2)
    v31, _ = make_model(seed=2, draft_arch="eagle3.1")
    c3 = json.loads((export_draft(plain, tmp_path / "e3") / "config.json").read_text())
    c31 = json.loads((export_draft(v31, tmp_path / "e31") / "config.json").read_text())
    assert c31.pop("fc_norm") is True and c31.pop("norm_output") is True
    assert "norm_before_fc" not in c31 and "norm_before_residual" not in c31  # one engine only: never written
    assert c31.pop("eagle_pipe")["draft_config"] == c3.pop("eagle_pipe")["draft_config"] | {
        "fc_norm": True, "norm_output": True}
    assert c31 == c3  # nothing else differs from the EAGLE-3 export


def test_eagle31_switches_are_what_a_published_eagle31_draft_adds(tmp_path):
    """SpecForge's published Qwen3-30B-A3B drafts: its EAGLE-3.1 config.json differs from its EAGLE-3 one by
    exactly the keys (and values) ours does."""
    from real_assets import real_path

    def added(new: dict, old: dict) -> dict:
        return {k: v for k, v in new.items() if old.get(k) != v}

    root = ("configs", "drafts", "specforge")
    real31 = json.loads(real_path(*root, "qwen3-30B-A3B-eagle3.1.json").read_text())
    real3 = json.loads(real_path(*root, "qwen3-30B-A3B-eagle3.json").read_text())
    ours = [json.loads((export_draft(make_model(seed=2, draft_arch=arch)[0], tmp_path / arch) / "config.json")
                       .read_text()) for arch in ("eagle3", "eagle3.1")]
    ours = [{k: v for k, v in c.items() if k != "eagle_pipe"} for c in ours]
    assert added(ours[1], ours[0]) == added(real31, real3) == {"fc_norm": True, "norm_output": True}


def test_eagle31_tensors_are_named_as_both_engines_load_them(tmp_path):
    model, _ = make_model(seed=2, draft_arch="eagle3.1")
    with torch.no_grad():
        for i, n in enumerate(model.fc_norm):
            n.weight.copy_(torch.linspace(0.5, 2.0, 48) * (i + 1))
    tensors = load_file(str(export_draft(model, tmp_path / "draft") / "model.safetensors"))
    fc_norms = {f"fc_norm.{i}.weight" for i in range(3)}  # vLLM: "model." + name; SGLang: name or "model." + name
    assert set(tensors) == set(EXPECTED_TENSORS) | fc_norms
    for i in range(3):
        t = tensors[f"fc_norm.{i}.weight"]
        assert t.shape == (48,) and t.dtype == torch.float32  # RMSNorm(target_hidden_size)
        assert torch.equal(t, torch.linspace(0.5, 2.0, 48) * (i + 1))


@pytest.mark.parametrize("arch", list(DRAFT_ARCHS))
def test_export_load_chain_drafting_equals_the_engine_forward_from_files(tmp_path, arch):
    """Export -> load_draft gives bit-identical chain-drafted logits, and both equal a float64 engine run that
    reads only the exported files (fc_norm and the feedback state taken from config.json's switches)."""
    model, embed = make_model(None, seed=4, draft_arch=arch)
    out = export_draft(model, tmp_path / "draft")
    loaded = load_draft(out, embed_weight=embed)
    assert loaded.cfg == model.cfg and loaded.cfg.draft_arch == arch
    g = torch.Generator().manual_seed(8)
    tokens, feats = torch.randint(0, V, (6,), generator=g), torch.randn(6, 3 * 48, generator=g)
    feats[:, 96:] *= 500.0  # a top aux state far larger than the others, as in real targets
    with torch.no_grad():
        a, b = run_draft(model.eval(), tokens[None], feats[None], 4), run_draft(loaded, tokens[None], feats[None], 4)
    assert torch.equal(a, b)
    reference = engine_chain_from_files(out, embed, tokens, feats, 4)
    ours = [a[0, 5]] + [a[0, 5 + j] for j in range(1, 4)]  # step 0's last row, then one row per step
    for j, (x, y) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-4, msg=f"step {j}")


def test_load_refuses_switches_edited_away_from_the_trained_draft(tmp_path):
    model, _ = make_model(draft_arch="eagle3.1")
    out = export_draft(model, tmp_path / "draft")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "norm_output"}))
    with pytest.raises(ValueError, match=r"the engines' norm_output=None differs from the trained draft's "
                                         r"norm_output=True \(eagle3.1\)"):
        load_draft(out)


def test_whole_vocab_draft_exports_no_vocab_map(tmp_path):
    """Vd == V: no d2t / t2d in the export (vLLM 0.32 has no d2t parameter then and refuses the draft); loading
    it back gives the identity map and the same drafts as the model that was exported."""
    from transformers import LlamaConfig

    target = LlamaConfig(hidden_size=48, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=80, vocab_size=V, max_position_embeddings=256, rms_norm_eps=1e-5).to_dict()
    cfg = DraftConfig.from_target_config(target, draft_vocab_size=32000, ttt_steps=3)  # capped at V
    assert cfg.draft_vocab_size == V
    g = torch.Generator().manual_seed(3)
    model = Eagle3Draft(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0))
    d2t, t2d = build_vocab_map(torch.randint(0, 50, (V,), generator=g), V)
    assert not d2t.any() and t2d.all()
    embed = torch.randn(V, 48, generator=g)
    model.init_from_target({"embed_tokens.weight": embed}, d2t, t2d, init_lm_head=False)

    out = export_draft(model, tmp_path / "draft")
    names = set(load_file(str(out / "model.safetensors")))
    assert not names & {"d2t", "t2d"} and "lm_head.weight" in names
    loaded = load_draft(out, embed_weight=embed)
    assert torch.equal(loaded.d2t, d2t) and torch.equal(loaded.t2d, t2d)
    tokens = torch.randint(0, V, (1, 7), generator=g)
    feats = torch.randn(1, 7, 3 * 48, generator=g)
    with torch.no_grad():
        assert torch.equal(run_draft(model.eval(), tokens, feats), run_draft(loaded, tokens, feats))
