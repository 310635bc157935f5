"""Massive activations in a dump's aux states, and what FP8 storage does to them; prints JSON.

    python -m bench.ablations.aux_outliers DUMP [--max-tokens 200000]

Reads the aux states of a full-precision dump (fp32 or bf16) and reports, per aux layer: the distribution of
per-token RMS and absmax, how often a token carries a massive entry (absmax > 20 x its RMS), which channels and
which input tokens carry them, and, for FP8 with the dump's per-token absmax scale (stages/shards/aux.py), the
relative error of the whole token vector and of its ordinary entries (all but the token's largest 4), split
by whether the token carries a massive entry. Every FP8 figure is computed by quantize_fp8/dequantize_fp8, the
functions the dump and the trainer use. `--alt` adds an alternative scaling for comparison (see ALTERNATIVES).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch


MASSIVE = 20.0  # a token is "massive" in a layer when its absmax exceeds this multiple of its RMS
ORDINARY_SKIP = 4  # the token's largest entries excluded from the "ordinary entries" error


def load_aux(dump: Path, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    from stages import shards

    manifest = shards.read_json(dump / "manifest.json")
    if manifest["aux_dtype"] == "float8_e4m3fn":
        raise SystemExit(f"{dump}: an FP8 dump; analyse a full-precision one")
    aux, ids, n = [], [], 0
    for part in shards.iter_parts(dump):
        t = shards.load_part(part, names=["aux_hidden_states", "input_ids"])
        aux.append(t["aux_hidden_states"].float())
        ids.append(t["input_ids"].long())
        n += len(ids[-1])
        if n >= max_tokens:
            break
    return torch.cat(aux)[:max_tokens], torch.cat(ids)[:max_tokens], int(manifest["target"]["hidden_size"])


def quantiles(x: torch.Tensor, qs=(0.5, 0.9, 0.99, 1.0)) -> dict:
    x = x.double()
    return {f"p{int(q * 100)}": float(torch.quantile(x, q)) if len(x) <= 16_000_000 else None for q in qs}


def relative_errors(x: torch.Tensor, xh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: ||x - xh|| / ||x|| over all entries, and over all but the token's ORDINARY_SKIP largest."""
    err = (x - xh)
    whole = err.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
    top = x.abs().topk(ORDINARY_SKIP, dim=-1).indices
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(-1, top, False)
    ordinary = (err * keep).norm(dim=-1) / (x * keep).norm(dim=-1).clamp_min(1e-30)
    return whole, ordinary


def analyse(aux: torch.Tensor, ids: torch.Tensor, H: int, tokenizer=None) -> dict:
    from stages.shards.aux import dequantize_fp8, quantize_fp8

    q, scales = quantize_fp8(aux)
    xh = dequantize_fp8(q, scales)
    layers = []
    for layer in range(3):
        x = aux[:, layer * H:(layer + 1) * H]
        rms = x.pow(2).mean(-1).sqrt()
        absmax, argmax = x.abs().max(-1)
        massive = absmax > MASSIVE * rms
        whole, ordinary = relative_errors(x, xh[:, layer * H:(layer + 1) * H])
        channels = Counter(argmax[massive].tolist()).most_common(5)
        tokens = Counter(ids[massive].tolist()).most_common(8)
        layers.append({
            "layer": layer, "tokens": len(x), "rms": quantiles(rms), "absmax": quantiles(absmax),
            "absmax_over_rms": quantiles(absmax / rms), "massive_tokens": int(massive.sum()),
            "massive_fraction": float(massive.float().mean()),
            "massive_channels": [{"channel": c, "tokens": n} for c, n in channels],
            "massive_input_tokens": [{"id": t, "text": tokenizer.decode([t]) if tokenizer else None, "tokens": n}
                                     for t, n in tokens],
            "fp8_rel_error_whole": {"massive": quantiles(whole[massive]) if massive.any() else None,
                                    "other": quantiles(whole[~massive]) if (~massive).any() else None},
            "fp8_rel_error_ordinary_entries": {
                "massive": quantiles(ordinary[massive]) if massive.any() else None,
                "other": quantiles(ordinary[~massive]) if (~massive).any() else None},
        })
    return {"layers": layers}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dump", type=Path)
    p.add_argument("--max-tokens", type=int, default=200_000)
    args = p.parse_args(argv)
    aux, ids, H = load_aux(args.dump, args.max_tokens)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.dump / "target")
    except Exception:  # the ids are reported either way
        tokenizer = None
    print(json.dumps({"dump": str(args.dump), "tokens": len(ids), "hidden_size": H, "massive_threshold": MASSIVE}
                     | analyse(aux, ids, H, tokenizer), indent=1))


if __name__ == "__main__":
    main()
