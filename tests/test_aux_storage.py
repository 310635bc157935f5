"""FP8 aux storage (stages/shards/aux.py) against a float64 reference quantizer written here: stored values and
scales are bitwise the reference's, dequantized values stay within the e4m3 error bound, and zero rows, zeros,
outliers and exactly representable rows come back exact where the format says they must."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.shards.aux import FP8, dequantize_batch, dequantize_fp8, device_view, encode_aux, quantize_fp8

H = 32  # hidden size per aux layer (3 layers per token)


def e4m3_round(y: np.ndarray) -> np.ndarray:
    """Round float64 values in [-448, 448] to the nearest float8_e4m3fn value, ties to even (3 mantissa bits,
    exponent bias 7, subnormal step 2^-9), computed with exact float64 arithmetic on powers of two."""
    a = np.abs(y)
    exp = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    step = np.exp2(np.maximum(exp, -6.0) - 3.0)          # spacing of e4m3 values around |y|
    return np.sign(y) * np.round(a / step) * step        # np.round: half to even; a/step is exact


def reference_quantize(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The format's rule in float64: scale = f32(absmax/448); q = e4m3(clamp(f32(x/scale)))."""
    x64 = x.double().numpy().reshape(x.shape[0], 3, -1)
    scale = (np.abs(x64).max(-1, keepdims=True) / 448.0).astype(np.float32).astype(np.float64)
    y = (x64 / np.where(scale > 0, scale, 1.0)).astype(np.float32).astype(np.float64)  # the float32 quotient
    q = e4m3_round(np.clip(y, -448.0, 448.0))
    return q.reshape(x.shape[0], -1), scale[..., 0]


def sample_rows(dtype=torch.float32) -> torch.Tensor:
    """Rows over many magnitudes, an all-zero row, zeros inside rows, outliers, and subnormal-range values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3 * H, generator=g) * torch.logspace(-4, 4, 48)[:, None]
    x[3] = 0                                   # all-zero token
    x[5, H:2 * H] = 0                          # one all-zero aux layer of a token
    x[7, ::5] = 0                              # zeros inside a row
    x[9, 3] = 1e5                              # outlier: the rest of its layer falls into e4m3 subnormals
    x[10, 2 * H + 1] = -3e4                    # negative outlier in the last layer
    x[11] = torch.randn(3 * H, generator=g) * 1e-30  # tiny, still float32-normal
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_values_and_scales_equal_the_float64_reference(dtype):
    x = sample_rows(dtype) if dtype != torch.float16 else sample_rows().clamp(-6e4, 6e4).to(dtype)
    q, scales = quantize_fp8(x)
    assert q.dtype == FP8 and q.shape == x.shape and scales.dtype == torch.float32 and scales.shape == (48, 3)
    want_q, want_scale = reference_quantize(x)
    assert np.array_equal(scales.double().numpy(), want_scale)
    assert np.array_equal(q.double().numpy(), want_q)
    assert torch.isfinite(q.float()).all()


def test_dequantized_values_are_within_the_e4m3_bound():
    x = sample_rows()
    q, scales = quantize_fp8(x)
    back = dequantize_fp8(q, scales)
    assert back.dtype == torch.float32 and torch.isfinite(back).all()
    err = (back.double() - x.double()).abs()
    s = scales.double().repeat_interleave(H, -1)
    # half an e4m3 ulp: 2^-4 relative for normals, 2^-10 * scale for subnormals; plus float32 rounding
    bound = (2.0 ** -4 * x.double().abs() + 2.0 ** -10 * s) * (1 + 1e-6) + 1e-7 * x.double().abs()
    assert (err <= bound).all(), (err - bound).max()
    # and the bound is not vacuous: typical rows use a good part of it
    assert (err / x.double().abs().clamp_min(1e-300))[20:30].max() > 2.0 ** -6


def test_zero_rows_zeros_and_outliers_are_exact_where_they_must_be():
    x = sample_rows()
    q, scales = quantize_fp8(x)
    back = dequantize_fp8(q, scales)
    assert torch.equal(scales[3], torch.zeros(3)) and torch.equal(back[3], torch.zeros(3 * H))  # no NaN
    assert scales[5, 1] == 0 and torch.equal(back[5, H:2 * H], torch.zeros(H))
    assert torch.equal(back[7, ::5], torch.zeros_like(back[7, ::5]))
    # the outlier itself maps to +-448 and comes back to float32 rounding of the original
    assert q[9, 3].float() == 448 and q[10, 2 * H + 1].float() == -448
    assert math.isclose(back[9, 3].item(), 1e5, rel_tol=2 ** -23)
    assert math.isclose(back[10, 2 * H + 1].item(), -3e4, rel_tol=2 ** -23)
    # scales are per token and per aux layer: an outlier changes nothing outside its own (token, layer)
    for row in (9, 10):
        for layer in range(3):
            alone = x[row].clone()
            alone[[i for i in range(3 * H) if i // H != layer]] = 0
            qa, sa = quantize_fp8(alone[None])
            sl = slice(layer * H, (layer + 1) * H)
            assert torch.equal(qa[0, sl].view(torch.uint8), q[row, sl].view(torch.uint8))
            assert sa[0, layer] == scales[row, layer]
    for row in range(48):
        qa, sa = quantize_fp8(x[row:row + 1])
        assert torch.equal(qa.view(torch.uint8), q[row:row + 1].view(torch.uint8))
        assert torch.equal(sa, scales[row:row + 1])
    # a row that is e4m3 values times a power of two (absmax 448 * 2^k) is stored exactly
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)]
    exact = grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(1))[:3 * H]]
    exact[[0, H, 2 * H]] = torch.tensor([448.0, -448.0, 448.0])
    exact = exact[None] * 2.0 ** -12
    qe, se = quantize_fp8(exact)
    assert torch.equal(dequantize_fp8(qe, se), exact)


def test_non_finite_input_makes_its_row_non_finite_not_others():
    x = sample_rows()
    x[20, 4] = float("inf")
    back = dequantize_fp8(*quantize_fp8(x))
    assert not torch.isfinite(back[20, :H]).all()
    assert torch.isfinite(back[torch.arange(48) != 20]).all() and torch.isfinite(back[20, H:]).all()


def test_encode_aux_casts_or_quantizes_and_dequantize_batch_restores_float():
    x = sample_rows()
    assert encode_aux(x, torch.bfloat16).keys() == {"aux_hidden_states"}
    assert torch.equal(encode_aux(x, torch.bfloat16)["aux_hidden_states"], x.to(torch.bfloat16))
    enc = encode_aux(x, FP8)
    batch = {"aux_hidden_states": enc["aux_hidden_states"].view(4, 12, 3 * H),
             "aux_scales": enc["aux_scales"].view(4, 12, 3), "input_ids": torch.zeros(4, 12, dtype=torch.int64)}
    out = dequantize_batch(batch)
    assert out.keys() == {"aux_hidden_states", "input_ids"}
    want = dequantize_fp8(enc["aux_hidden_states"], enc["aux_scales"]).view(4, 12, -1)
    assert torch.equal(out["aux_hidden_states"], want)
    plain = {"aux_hidden_states": x}
    assert dequantize_batch(plain) is plain


def test_compiled_bit_decoding_equals_torchs_conversion_for_every_byte():
    """The compiled path decodes e4m3 from its bits (any GPU generation); it must equal torch's own cast."""
    from stages.shards.aux import fp8_to_float32

    from torch._inductor.utils import run_and_get_code

    every = torch.arange(256, dtype=torch.uint8).view(FP8)
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(fp8_to_float32, fullgraph=True), device_view(every))
    assert not any("float8" in c.lower() or "e4m3" in c.lower() for c in code)  # no fp8 type in the kernel
    want = every.float()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).sum() == 2
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # also the sign of zero
