"""Every dtype eagle-pipe names, in one table: torch's name (what manifest.json and config.json record), the
name a safetensors header gives it, and the short aliases the options take (bf16, fp16, fp32, fp8).

The option choices (`--dtype`, `--aux-dtype`), the target's dtype (stages/target.py), the aux storage dtype
(stages/shards/aux.py), the safetensors writer (stages/shards), the dump's checker (stages/shards/verify.py) and
the part reader (stages/train/loader.py) all read it. torch is imported only when a torch dtype is asked for, so
building the command line (`--help`) stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch's name -> the safetensors header's name
SAFETENSORS = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e4m3fn": "F8_E4M3",
               "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
           "fp8": "float8_e4m3fn"}
TARGET_DTYPES = ("bfloat16", "float16", "float32")   # what a target runs in
DTYPE_CHOICES = [*TARGET_DTYPES, "bf16", "fp16", "fp32"]   # --dtype (resolve_dtype also takes half and float)
AUX_DTYPE_CHOICES = ["model", "bf16", "fp16", "fp32", "fp8"]  # --aux-dtype: the target's dtype, a cast, or FP8


def canonical_name(name: str) -> str:
    """torch's name for a name or an alias (any case): "BF16" -> "bfloat16". Unknown names are returned lowered."""
    name = name.lower()
    return ALIASES.get(name, name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name or alias in the table; KeyError for any other name."""
    import torch

    name = canonical_name(name)
    if name not in SAFETENSORS:
        raise KeyError(name)
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the name manifests record)."""
    return str(dtype).removeprefix("torch.")


def safetensors_name(dtype) -> str:
    """The safetensors header's name of a torch dtype or of a name in the table: "bfloat16" -> "BF16"."""
    return SAFETENSORS[canonical_name(dtype if isinstance(dtype, str) else dtype_name(dtype))]


def from_safetensors(name: str) -> torch.dtype:
    """The torch dtype of a safetensors header's name: "BF16" -> torch.bfloat16; KeyError for another name."""
    return torch_dtype(_BY_SAFETENSORS[name])


_BY_SAFETENSORS = {st: name for name, st in SAFETENSORS.items()}
