"""A target as every stage sees it: the device and dtype it runs in (one rule: `resolve_device`, `resolve_dtype`),
how it is opened (`load_target`: the HF causal LM and its chat-template tokenizer; `load_tokenizer` and
`eos_token_ids` for an engine that loads the model itself, such as vLLM), and where a Hugging Face causal LM
keeps its text decoder (decoder layers, final norm). Used by regenerate, dump-teacher, eval and run.

Most causal LMs keep it at `model.model` with `.layers` and `.norm`, which `get_decoder()` returns. Not all:
`Llama4ForCausalLM.get_decoder()` returns the model itself, and multimodal `*ForConditionalGeneration`
checkpoints (Gemma-3, Llama-4, Mistral-3, ...) keep their language model at `model.model.language_model`;
text-only data runs through that text model alone. So look for the module instead of trusting one accessor.
Refused (one line): models without such a text decoder, e.g. encoder-decoder models.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.dtypes import ALIASES, TARGET_DTYPES, dtype_name, torch_dtype  # noqa: F401 (stages import dtype_name here)
from stages.errors import StageError

# what --dtype takes (stages/dtypes.py: a target dtype or its alias) -> torch dtype
DTYPES = {name: torch_dtype(name) for name in [*TARGET_DTYPES, *(a for a, n in ALIASES.items() if n in TARGET_DTYPES)]}


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """--dtype: bfloat16 / float16 / float32 (or bf16, fp16, half, fp32, float); unset or auto: bfloat16 on a
    GPU, float32 on a CPU."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name.lower() not in DTYPES:
        raise StageError(f"--dtype {name!r}: expected bfloat16, float16 or float32 (or bf16/fp16/fp32)")
    return DTYPES[name.lower()]


def resolve_device(device: str | None) -> str:
    """--device: as given (a CUDA device must exist); unset or auto: this process's GPU (cuda:LOCAL_RANK, for
    torchrun) when there is one, else cpu."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {device}: CUDA is not available")
    return device


CHILD_NAMES = ("model", "language_model", "text_model", "decoder", "transformer")
LAYER_NAMES = ("layers", "h")
NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


@dataclass
class DecoderParts:
    base: torch.nn.Module           # forward(input_ids, attention_mask, ...) -> last_hidden_state (final-normed)
    layers: torch.nn.ModuleList
    norm: torch.nn.Module


def _parts_of(module) -> DecoderParts | None:
    layers = next((getattr(module, n) for n in LAYER_NAMES
                   if isinstance(getattr(module, n, None), torch.nn.ModuleList)), None)
    norm = next((getattr(module, n) for n in NORM_NAMES if isinstance(getattr(module, n, None), torch.nn.Module)),
                None)
    if layers is None or len(layers) == 0 or norm is None:
        return None
    return DecoderParts(module, layers, norm)


def decoder_parts(model) -> DecoderParts:
    """The text decoder of `model`: breadth-first over get_decoder() and the usual wrapper attributes."""
    queue = [model]
    if hasattr(model, "get_decoder"):
        queue.insert(0, model.get_decoder())
    seen: set[int] = set()
    while queue:
        module = queue.pop(0)
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        parts = _parts_of(module)
        if parts is not None:
            return parts
        queue += [getattr(module, n, None) for n in CHILD_NAMES]
    raise ValueError(f"unsupported architecture {type(model).__name__}: no text decoder with decoder layers "
                     f"({'/'.join(LAYER_NAMES)}) and a final norm ({'/'.join(NORM_NAMES)}) under "
                     f"{'/'.join(CHILD_NAMES)}")


@torch.no_grad()
def effective_norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    """The per-channel scale `norm` really applies, as a plain (Llama) RMSNorm weight: x / rms(x) * w.

    Gemma's RMSNorm multiplies by (1 + weight), so its stored weight (~0) would zero a draft norm initialised
    from it. The scale is read off the module's own output on a constant input (rms 1, so the output is the
    scale up to eps) and used only when the module is such a norm (checked on a random input); otherwise the
    stored weight is returned unchanged.
    """
    weight = norm.weight.detach()
    H = weight.shape[-1]
    eps = float(next((getattr(norm, n) for n in ("variance_epsilon", "eps") if hasattr(norm, n)), 0.0))
    probe = torch.ones(1, H, dtype=weight.dtype, device=weight.device)
    scale = norm(probe).float() * (1.0 + eps) ** 0.5
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    xf = x.float()
    plain = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    if not torch.allclose(norm(x).float(), plain, atol=tol, rtol=tol):
        return weight
    return scale[0].to(weight.dtype)


# ------------------------------------------------------------------------------------------------ opening a target
def read_target_config(target) -> dict:
    """The target's config.json as a dict (what the peer draft readers and vLLM's defaults need: its layer count),
    without building the model; a missing or unreadable file is refused in one line."""
    path = Path(target) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise StageError(f"{path}: cannot read the target's config ({e.strerror or e})") from None
    except ValueError as e:
        raise StageError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise StageError(f"{path}: expected a JSON object")
    return config


def load_tokenizer(target: str, trust_remote_code: bool = False):
    """The target's tokenizer, which must have a chat template (every stage renders conversations with it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise StageError(f"{target}: cannot load the target's tokenizer: {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        raise StageError(f"{target}: the tokenizer has no chat template")
    return tokenizer


def load_target(target: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False, device_map=None):
    """(model, tokenizer): the target as a Hugging Face causal LM in `dtype`, on `device` (or spread by
    `device_map`), in eval mode, with its tokenizer (chat template required). Errors name the target in one line."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(target, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **({"device_map": device_map} if device_map else {}))
    except Exception as e:  # config, architecture, weights: this target cannot be opened as asked
        raise StageError(f"{target}: cannot load the target model: {str(e).splitlines()[0]}") from None
    return (model if device_map else model.to(device)).eval(), tokenizer


def eos_token_ids(model, tokenizer, target: str | None = None) -> list[int]:
    """End-of-sequence ids from the generation config (int or list), else the model config, else the tokenizer.

    From a loaded HF `model`, or, with model None (an engine that loads the target itself), from the files in
    `target`: generation_config.json, else config.json, which is what transformers builds its generation config
    from."""
    sources = [getattr(model, "generation_config", None), model.config] if model is not None \
        else list(target_generation_sources(target))
    for source in (*sources, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    raise StageError("the target has no end-of-sequence token (generation_config.eos_token_id)")


def target_generation_sources(target: str):
    """(generation config or None, model config) of a target directory, as a loaded model would hold them."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(target)
    except OSError:  # no generation_config.json: transformers builds it from config.json
        generation = None
    return generation, AutoConfig.from_pretrained(target)
