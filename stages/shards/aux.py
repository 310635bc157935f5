"""How a dump stores the aux hidden states: a plain dtype, or FP8 (e4m3) with one float32 scale per token and
aux layer. The aux states are most of a dump's bytes (3·H per token against k·8 for the teacher), so FP8 halves
a bf16 dump; the loader and the host->device copy move the stored bytes only, and the training step
dequantizes on the device (`dequantize_batch`, inside the compiled step).

FP8 rule (the format's definition; stages/shards/__init__.py points here): for token n and aux layer l, with x the
layer's H values upcast to float32,

    scale[n, l] = float32(absmax(x) / 448)                 448 = the largest finite float8_e4m3fn
    q[n, l*H:(l+1)*H] = e4m3(clamp(float32(x / scale), -448, 448))   round to nearest, ties to even
    x ~= float32(q) * scale

An all-zero row gets scale 0 and stores zeros (the division uses 1 instead of 0), which dequantize to exact
zeros without NaN. Relative error is at most 2^-4 for |x/scale| >= 2^-6 (normal e4m3) and absolute error at most
2^-10·scale below that (subnormals). A non-finite value makes its row non-finite (NaN; e4m3fn has no inf), so a
broken target shows up as skipped training steps rather than silently.
"""
from __future__ import annotations

import torch

from stages.dtypes import torch_dtype

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AUX_KEYS = ("aux_hidden_states", "aux_scales")  # what a part / batch holds for the aux states (scales: FP8 only)


def storage_dtype(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    """The stored aux dtype for `--aux-dtype` model|bf16|fp16|fp32|fp8 (`model`: the target's dtype, as schema 1
    always stored)."""
    return model_dtype if choice == "model" else torch_dtype(choice)


def quantize_fp8(aux: torch.Tensor, num_layers: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L*H] any float dtype -> (q float8_e4m3fn [n, L*H], scales float32 [n, L]), on aux's device."""
    x = aux.unflatten(-1, (num_layers, -1))                               # (n, L, H), stored dtype
    scale = x.abs().amax(-1, keepdim=True).float() / FP8_MAX              # (n, L, 1); absmax is exact in any dtype
    # x / float32 scale promotes to float32: the one full-size temporary (a bf16 batch is not copied first)
    q = (x / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2), scale.squeeze(-1)


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """float32 values of e4m3 data held as float8_e4m3fn or as its uint8 bits. Compiled, it decodes the bits with
    integer ops: Triton handles e4m3 only on compute capability >= 8.9 (an fp8 kernel argument or cast fails to
    compile on A100 and older, pytorch#167082), so the training step receives the bits (`device_view`). Eager
    mode uses torch's own conversion. Both give the same values (tested for all 256 bytes)."""
    if not torch.compiler.is_compiling():
        return q.view(FP8).float()
    b = q.view(torch.uint8).to(torch.int32)
    e, m = (b >> 3) & 15, b & 7
    normal = ((e + 120) << 23 | m << 20).view(torch.float32)                  # 2^(e-7) * (1 + m/8)
    magnitude = torch.where(e == 0, m.to(torch.float32) * 2.0 ** -9, normal)  # subnormals: m * 2^-9
    value = magnitude * (1 - 2 * (b >> 7)).to(torch.float32)
    return torch.where((b & 0x7F) == 0x7F, torch.full_like(value, float("nan")), value)


def device_view(t: torch.Tensor) -> torch.Tensor:
    """What the step is handed for a stored tensor: FP8 as its uint8 bits (a free view; see fp8_to_float32)."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., L*H], scales [..., L]) -> [..., L*H] in `dtype`: float32(q) * scale."""
    L = scales.shape[-1]
    return (fp8_to_float32(q).unflatten(-1, (L, -1)) * scales.float().unsqueeze(-1)).flatten(-2).to(dtype)


def encode_aux(aux: torch.Tensor, dtype: torch.dtype, num_layers: int = 3) -> dict[str, torch.Tensor]:
    """The part tensors for [n, L*H] aux states stored as `dtype` (computed where aux is, i.e. on the device)."""
    if dtype == FP8:
        q, scales = quantize_fp8(aux, num_layers)
        return {"aux_hidden_states": q, "aux_scales": scales}
    return {"aux_hidden_states": aux.to(dtype)}


def aux_specs(hidden_size: int, dtype: torch.dtype, num_layers: int = 3) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-row shape and dtype of each aux tensor of a part (what encode_aux returns) for `num_layers` aux layers
    (EAGLE-3 fuses 3; a DFlash draft reads any number)."""
    specs = {"aux_hidden_states": ((num_layers * hidden_size,), dtype)}
    if dtype == FP8:
        specs["aux_scales"] = ((num_layers,), torch.float32)
    return specs


def dequantize_batch(batch: dict) -> dict:
    """A batch whose aux states are float (FP8 ones, as float8_e4m3fn or its uint8 bits, dequantized by their
    scales); other batches unchanged. Pure tensor code with a branch on the batch's keys only, so it compiles
    into the step without a sync."""
    if "aux_scales" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "aux_scales"}
    out["aux_hidden_states"] = dequantize_fp8(batch["aux_hidden_states"], batch["aux_scales"])
    return out
