"""stages/dtypes.py, the one dtype table: its safetensors names are the ones the safetensors library writes, and
the option choices resolve to the torch dtypes they promise."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from stages import dtypes


@pytest.mark.parametrize("name", list(dtypes.SAFETENSORS))
def test_safetensors_names_are_the_librarys(tmp_path, name):
    """The reference is safetensors' own writer: the header it writes for a tensor of each dtype."""
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.zeros(2, dtype=getattr(torch, name))}, str(path))
    blob = path.read_bytes()
    header = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])
    assert header["t"]["dtype"] == dtypes.SAFETENSORS[name] == dtypes.safetensors_name(getattr(torch, name))
    assert dtypes.from_safetensors(header["t"]["dtype"]) == getattr(torch, name)
    assert dtypes.dtype_name(getattr(torch, name)) == name


def test_choices_and_aliases_resolve():
    assert [dtypes.torch_dtype(c) for c in dtypes.DTYPE_CHOICES] == [torch.bfloat16, torch.float16, torch.float32] * 2
    assert dtypes.torch_dtype("FP8") == torch.float8_e4m3fn and dtypes.torch_dtype("half") == torch.float16
    assert all(dtypes.torch_dtype(c) for c in dtypes.AUX_DTYPE_CHOICES if c != "model")
    assert dtypes.safetensors_name("bf16") == "BF16"
    with pytest.raises(KeyError):
        dtypes.torch_dtype("float128")
