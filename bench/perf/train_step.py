"""Benchmark: milliseconds per optimizer step of `eagle-pipe train`'s own step (stages.train.stage.optimizer_step:
compiled TTT forward + loss + metrics, backward, clip, fused AdamW) on synthetic packed batches of a given shape.

    python -m bench.perf.train_step --hidden 256 --heads 8 --kv-heads 4 --intermediate 688 --vocab 8192 \
        --draft-vocab 4096 --seq-len 512 --batch 4 --ttt-steps 3 [--no-compile] [--steps 10] \
        [--modelopt-python .venv-modelopt/bin/python] [--speculators-python .venv-speculators/bin/python]

Prints one JSON object: median ms per step (the compile and warm-up steps excluded), tokens/s, and on CUDA the
model FLOP rate and its fraction of the bf16 peak. With --modelopt-python / --speculators-python, runs
bench/peers/modelopt/step.py / bench/peers/speculators/step.py (same shape flags) in that interpreter in the same
run, after ours, and adds each one's result and the ratio theirs/ours of median ms (`speedup_vs_modelopt`,
`speedup_vs_speculators`; > 1 means ours is faster). `median_cpu_ms` is the median of the process's CPU time per
step (time.process_time, all its threads): on a CPU shared with other jobs it follows the work done rather than
the neighbours' load, so `cpu_speedup_vs_*` (the same ratio of CPU times) is the steadier figure there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from bench.common import REPO, Stopwatch, add_save_flag, last_json, save_result
from bench.peers.shapes import SHAPE_FLAGS, add_shape_flags
from eagle.config import DraftConfig
from eagle.model import Eagle3Draft
from eagle.vocab import build_vocab_map
from stages.train.stage import make_step_fn, optimizer_step
from stages.train.setup import DistInfo, GradSync, make_optimizer, resolve_precision


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_flags(p)
    p.add_argument("--top-k", type=int, default=64, help="teacher top-k stored per position")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile happens here)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="auto", choices=["auto", "dense", "flex"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="the step's matmuls, as `train --precision` (auto: bf16 on CUDA and AMX CPUs); the peers "
                        "get bf16 autocast exactly when ours resolves to bf16")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for the MFU figure (H100 SXM)")
    p.add_argument("--modelopt-python", default=None, help="interpreter of the Model-Optimizer benchmark venv")
    p.add_argument("--speculators-python", default=None, help="interpreter of the speculators benchmark venv")
    p.add_argument("--seed", type=int, default=0)
    add_save_flag(p, "train-step")
    return p.parse_args(argv)


def synthetic_batch(args, device: torch.device, aux_dtype: torch.dtype) -> dict:
    """Packed rows of documents of random lengths (positions restart per document), a top-k teacher."""
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.seq_len
    pos, doc = torch.zeros(B, T, dtype=torch.int64), torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        o, d = 0, 0
        while o < T:
            n = min(int(torch.randint(T // 8, T // 2 + 1, (1,), generator=g)), T - o)
            pos[b, o:o + n], doc[b, o:o + n] = torch.arange(n), d
            o, d = o + n, d + 1
    logits = torch.randn(B, T, args.top_k, generator=g)
    top = torch.log_softmax(logits, -1).sort(-1, descending=True)
    batch = {
        "aux_hidden_states": torch.randn(B, T, 3 * args.hidden, generator=g).to(aux_dtype),
        "input_ids": torch.randint(0, args.vocab, (B, T), generator=g),
        "position_ids": pos, "document_ids": doc,
        "loss_mask": torch.rand(B, T, generator=g) < 0.8,
        "teacher_topk_ids": torch.randint(0, args.vocab, (B, T, args.top_k), generator=g),
        "teacher_topk_logprobs": top.values - 2.0,
    }
    return {k: v.to(device) for k, v in batch.items()}


def model_flops_per_step(args) -> float:
    """Matmul FLOPs of one optimizer step (forward x3 for forward + backward; the frozen embedding excluded)."""
    H, hd = args.hidden, args.hidden // args.heads
    per_token = (2 * H * args.heads * hd + 2 * 2 * H * args.kv_heads * hd + args.heads * hd * H  # q, k, v, o
                 + 3 * H * args.intermediate + H * args.draft_vocab)                             # mlp, lm_head
    attn = 2 * args.heads * hd * (args.seq_len / 2 + args.ttt_steps)  # QK^T and PV over ~T/2 causal keys, per token
    tokens = args.batch * args.seq_len
    fwd = 2 * tokens * (args.ttt_steps * (per_token + attn) + 3 * H * H)  # + fc once
    return 3.0 * fwd


def run_ours(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    target = {"hidden_size": args.hidden, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
              "intermediate_size": args.intermediate, "num_hidden_layers": 16, "vocab_size": args.vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072}
    cfg = DraftConfig.from_target_config(target, draft_vocab_size=args.draft_vocab, ttt_steps=args.ttt_steps)
    model = Eagle3Draft(cfg)
    d2t, t2d = build_vocab_map(torch.randint(0, 1000, (args.vocab,)), args.draft_vocab)
    model.init_from_target({"embed_tokens.weight": torch.randn(args.vocab, args.hidden) * 0.02,
                            "lm_head.weight": torch.randn(args.vocab, args.hidden) * 0.02}, d2t, t2d)
    model.to(device).train()
    opt, params, _ = make_optimizer(model, 1e-4, 0.0, device)
    step_fn = make_step_fn(args.ttt_steps, "topk", 0.8, args.attention, device, not args.no_compile, args.precision)
    aux_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = synthetic_batch(args, device, aux_dtype)
    valid = batch["loss_mask"] & (batch["position_ids"] >= 0)
    normalizer = torch.stack([(valid & (batch["position_ids"] >= j)).sum() for j in range(args.ttt_steps)]).float()
    sync = GradSync(params, DistInfo(device=device))

    def one() -> tuple[float, float]:
        """(wall s, this process's CPU s) of one step."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        with Stopwatch() as watch:
            loss, bad = optimizer_step(model, opt, params, step_fn, [batch], normalizer, sync, 1.0, 1e-4)
            if device.type == "cuda":
                torch.cuda.synchronize()
            else:
                loss.item()
        return watch.wall, watch.cpu

    t0 = time.perf_counter()
    first = one()[0]
    for _ in range(args.warmup - 1):
        one()
    warm_s = time.perf_counter() - t0
    timed = [one() for _ in range(args.steps)]
    times = [w for w, _ in timed]
    med = statistics.median(times)
    out = {"impl": "eagle-pipe", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "compile": not args.no_compile, "precision": resolve_precision(args.precision, device)[0], "shapes": {k: getattr(args, k) for k in SHAPE_FLAGS},
           "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
           "median_cpu_ms": statistics.median(c for _, c in timed) * 1e3,
           "tokens_per_s": args.batch * args.seq_len / med, "first_step_s": first, "warmup_s": warm_s,
           "steps_timed": args.steps, "torch_threads": torch.get_num_threads(), "finite": bool(torch.isfinite(
               torch.stack([p.detach().float().abs().max() for p in params])).all())}
    if device.type == "cuda":
        tflops = model_flops_per_step(args) / med / 1e12
        out |= {"model_tflops": tflops, "mfu": tflops / args.peak_tflops, "peak_tflops": args.peak_tflops,
                "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return out


PEERS = {"modelopt": "bench.peers.modelopt.step", "speculators": "bench.peers.speculators.step"}


def run_peer(args, name: str, python: str) -> dict:
    """A peer's step (bench/<peer>_step.py) at our shapes in its own venv; its JSON, or the error tail."""
    flags = []
    for k in SHAPE_FLAGS:
        flags += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    flags += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--json", "--device", args.device,
              "--threads", str(torch.get_num_threads())]
    bf16 = resolve_precision(args.precision, torch.device(args.device))[0] == "bf16"
    flags += (["--no-compile"] if args.no_compile else []) + (["--bf16-autocast"] if bf16 else [])
    res = subprocess.run([python, "-m", PEERS[name], *flags], capture_output=True, text=True, cwd=REPO)
    result = last_json(res.stdout)
    if res.returncode != 0 or result is None:
        return {"error": (res.stderr or res.stdout)[-2000:]}
    return result


def main(argv=None):
    args = parse_args(argv)
    result = run_ours(args)
    for name, python in (("modelopt", args.modelopt_python), ("speculators", args.speculators_python)):
        if python:
            peer = run_peer(args, name, python)
            result[name] = peer
            if "median_ms" in peer:
                result[f"speedup_vs_{name}"] = peer["median_ms"] / result["median_ms"]
            if "median_cpu_ms" in peer:
                result[f"cpu_speedup_vs_{name}"] = peer["median_cpu_ms"] / result["median_cpu_ms"]
    print(json.dumps(result))
    if args.save:
        save_result(args.save, result)
    return result


if __name__ == "__main__":
    main()
