"""Benchmark dump-teacher: its tokens/s against a bare target forward over the same batches, and its bytes/token
against the formula 3*H*dtype_bytes + k*(4+4) + small.

Builds a random Llama of the requested size in a temp dir (WordLevel tokenizer, pre-tokenized random records),
runs the real `dump_teacher` on it, then times `model(input_ids, attention_mask).logits` (what any consumer of the
target would run) on exactly the batches the dump planned. Prints one JSON object. Goal: overhead <= 1.15.

Both sides are timed warm: the dump's rate (its own timer: from the first batch to the last part on disk, so
including the writer's sha256/fsync, excluding model load, tokenization and the one-off self-check probe) is the
best of `--dump-runs` full dumps into fresh directories; the bare forward is the best of 2 passes after a
one-sequence warm-up.

With `--writer-only` no model runs: the part writer alone (`stages.dump.writer.PartWriter`: assembling, serialize,
sha256 while writing, fsync, rename) is fed synthetic batch outputs of the given shape, first as fast as it takes
them (`writer_MBps`: part bytes per second from the first submit to the last part on disk; `writer_MBps_per_cpu
_second` per CPU second of the process), then paced like a GPU producing `--produce-MBps` (default 500, an H100
dumping an 8B target), where `producer_blocked_fraction` is the share of the producing time the producer waited
in submit() (0: the GPU never waited for the disk) and `paced_drain_seconds` the wait in close() for the last
parts. `sha256_MBps` (one hashlib stream) and `write_fsync_MBps` (the same bytes written + fsynced without
hashing) are this machine's ceilings, measured in the same run.

    python -m bench.perf.dump                       # CPU defaults, well under 2 minutes
    python -m bench.perf.dump --writer-only --hidden 4096 --dtype bfloat16 --batch-tokens 16384 --part-tokens 32768
    python -m bench.perf.dump --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 128256 \
        --records 512 --batch-tokens 16384

With `--engines` a real target and real records (`--target`, `--data`, `--limit`) go through three runs, each in
its own process (its peak host memory is that process tree's summed RSS, sampled every 0.1 s): `dump-teacher
--engine hf`, `dump-teacher --engine vllm`, and vLLM's bare prefill of the same token ids (no speculative config,
no connector, prefix caching off, max_tokens 1, all prompts in one `generate`). Dump rates are the dump's own
timer (first batch to last part on disk; model load and engine start excluded, reported apart as wall time).
Goals: vLLM dump >= 0.8x the bare prefill and not slower than the HF dump. Then the two dumps are compared
(tests/vllm_dump_helpers.py: per aux layer max |diff| and over max |value|, argmax agreement, top-k log-probs).

    python -m bench.perf.dump --engines --target SMOLLM2_TARGET --data A.json --data B.json \
        --limit 300 --dtype float32 --keep DIR --save dump-engines-smollm2

`--save [NAME]` also writes the result to bench/results/DATE-NAME.json (bench/common.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_save_flag, save_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_target(directory: Path, args) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(args.vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1", bos_token="t2")
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      intermediate_size=args.intermediate,
                      max_position_embeddings=max(2048, args.max_len), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def write_records(path: Path, args) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(args.records):
            n = rng.randint(args.min_len, args.max_len)
            f.write(json.dumps({"input_ids": [rng.randrange(3, args.vocab) for _ in range(n)]}) + "\n")


def bare_forward_seconds(model_dir: Path, out: Path, args, dtype, device: str) -> tuple[float, float, int]:
    """Seconds for a plain forward over the dump's own batches, best of 2 passes each: (full CausalLM forward
    with logits at every position, decoder only without lm_head (a lower bound for any dump), tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages import shards
    from stages.dump.plan import Sequence, pad_batch, plan_parts

    seqs = []
    for path in shards.iter_parts(out):
        t = shards.load_part(path, ["input_ids", "loss_mask", "cu_seqlens", "sample_index"])
        cu = t["cu_seqlens"].tolist()
        for s, idx in enumerate(t["sample_index"].tolist()):
            seqs.append(Sequence(idx, t["input_ids"][cu[s]:cu[s + 1]].numpy(), t["loss_mask"][cu[s]:cu[s + 1]].numpy()))
    parts = plan_parts(seqs, args.part_tokens, args.batch_tokens)
    batches = [pad_batch(p.sequences[lo:hi], 0) for p in parts for lo, hi in p.batches]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {"full": [], "decoder": []}
    with torch.inference_mode():
        model(input_ids=batches[0][0][:1].to(device), attention_mask=batches[0][1][:1].to(device))  # warm-up
        for _ in range(2):
            for kind, fn in (("full", model), ("decoder", model.get_decoder())):
                sync()
                start = time.perf_counter()
                for ids, mask, _, _ in batches:
                    fn(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                sync()
                times[kind].append(time.perf_counter() - start)
    return min(times["full"]), min(times["decoder"]), sum(len(s) for s in seqs)


def synthetic_parts(args, n_parts: int):
    """Planned parts of 1024-token sequences and one reusable set of batch outputs per batch size."""
    import numpy as np

    from stages.dump.plan import PartPlan, Sequence

    rng = np.random.default_rng(0)
    seq_len = min(1024, args.batch_tokens)
    per_batch = max(1, args.batch_tokens // seq_len)
    per_part = max(1, args.part_tokens // seq_len)
    parts = []
    for i in range(n_parts):
        seqs = [Sequence(i * per_part + j, rng.integers(0, args.vocab, seq_len).astype(np.int32),
                         np.ones(seq_len, dtype=np.uint8)) for j in range(per_part)]
        parts.append(PartPlan(i, seqs, [(lo, min(lo + per_batch, per_part)) for lo in range(0, per_part, per_batch)]))
    return parts, seq_len


def writer_only(args) -> dict:
    import hashlib

    import torch

    from stages.dump.writer import PartWriter
    from stages.shards import BUFFERED_ENV

    dtype = getattr(torch, args.dtype or "bfloat16")
    specs = {"aux_hidden_states": ((3 * args.hidden,), dtype), "teacher_topk_ids": ((args.top_k,), torch.int32),
             "teacher_topk_logprobs": ((args.top_k,), torch.float32)}
    parts, seq_len = synthetic_parts(args, args.writer_parts)
    rows = (parts[0].batches[0][1] - parts[0].batches[0][0]) * seq_len
    g = torch.Generator().manual_seed(0)
    outputs = {"aux_hidden_states": torch.randn(rows, 3 * args.hidden, generator=g).to(dtype),
               "teacher_topk_ids": torch.randint(0, args.vocab, (rows, args.top_k), generator=g, dtype=torch.int32),
               "teacher_topk_logprobs": -torch.rand(rows, args.top_k, generator=g) * 10}
    batch_bytes = sum(t.numel() * t.element_size() for t in outputs.values())

    def run(directory: Path, pace_s: float) -> tuple[float, float, float, float, int]:
        """(seconds, CPU seconds, seconds blocked in submit, seconds in close, part bytes) of one run."""
        directory.mkdir(parents=True)
        writer = PartWriter(directory, specs, rows, torch.device("cpu"), {"format_note": "bench"})
        blocked, t0, c0 = 0.0, time.perf_counter(), time.process_time()
        for part in parts:
            offset = 0
            for b, (lo, hi) in enumerate(part.batches):
                n = (hi - lo) * seq_len
                if pace_s:
                    time.sleep(pace_s * n / rows)  # the GPU's forward: no host CPU
                s0 = time.perf_counter()
                writer.submit(part, offset, {k: v[:n] for k, v in outputs.items()}, last=b == len(part.batches) - 1)
                blocked += time.perf_counter() - s0
                offset += n
        c_start = time.perf_counter()
        written = writer.close()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return seconds, cpu, blocked, time.perf_counter() - c_start, sum(w.bytes for w in written)

    with tempfile.TemporaryDirectory(prefix="eagle-writer-bench-", dir=args.keep) as tmp:
        fast = [run(Path(tmp) / f"fast{i}", 0.0) for i in range(args.dump_runs)]
        paced = run(Path(tmp) / "paced", batch_bytes / (args.produce_mbps * 1e6))
        part0 = Path(tmp) / "fast0" / sorted(p.name for p in (Path(tmp) / "fast0").glob("part-*"))[0]
        data = part0.read_bytes()
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        sha_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open(Path(tmp) / "plain", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t0
    best = min(fast, key=lambda r: r[0])
    nbytes = best[4]
    return {"mode": "writer-only", "dtype": str(dtype).removeprefix("torch."), "hidden": args.hidden,
            "top_k": args.top_k, "batch_tokens": rows, "part_tokens": parts[0].num_tokens, "parts": len(parts),
            "part_bytes": nbytes // len(parts), "cpu_count": os.cpu_count(),
            "direct_io": os.environ.get(BUFFERED_ENV) != "1",
            "writer_MBps": nbytes / best[0] / 1e6, "writer_MBps_runs": [r[4] / r[0] / 1e6 for r in fast],
            "writer_MBps_per_cpu_second": nbytes / best[1] / 1e6,
            "writer_MBps_per_cpu_second_runs": [r[4] / r[1] / 1e6 for r in fast],
            "sha256_MBps": len(data) / sha_s / 1e6, "write_fsync_MBps": len(data) / write_s / 1e6,
            "produce_MBps": args.produce_mbps, "paced_seconds": paced[0], "paced_drain_seconds": paced[3],
            "producer_blocked_fraction": paced[2] / (paced[0] - paced[3])}


ENGINE_RUNS = ("hf", "vllm", "bare")


def engine_phase(args) -> dict:
    """One run of --engines, in this process (the parent measures its memory): a dump, or the bare prefill."""
    root = Path(args.keep)
    if args.phase in ("hf", "vllm"):
        from stages.dump.stage import dump_teacher

        return dump_teacher(target=args.target, data=args.data, out=str(root / args.phase), engine=args.phase,
                            dtype=args.dtype, limit=args.limit, batch_tokens=args.batch_tokens,
                            part_tokens=args.part_tokens, max_seq_len=args.max_len, top_k=args.top_k, overwrite=True)
    from safetensors import safe_open

    from stages.vllm_runtime import VllmOptions, open_llm
    from stages.dump.engines import default_max_model_len
    from transformers import AutoConfig

    prompts = []
    for part in sorted((root / "vllm").glob("shards/*/part-*.safetensors")):  # the dump's own token ids
        with safe_open(part, "pt") as f:
            ids, cu = f.get_tensor("input_ids"), f.get_tensor("cu_seqlens").tolist()
        prompts += [{"prompt_token_ids": ids[cu[i]:cu[i + 1]].tolist()} for i in range(len(cu) - 1)]
    import vllm

    dtype = args.dtype or "float32"
    start = time.perf_counter()
    llm = open_llm(VllmOptions(dtype=dtype), args.target, enable_prefix_caching=False, skip_tokenizer_init=True,
                   max_model_len=default_max_model_len(AutoConfig.from_pretrained(args.target), args.max_len))
    started = time.perf_counter() - start
    sampling = vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    llm.generate(prompts[:2], sampling, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "engine_start_s": started}


def run_measured(argv: list[str]) -> tuple[dict, float, float]:
    """Run this script with argv in a child process (stdout dropped: vLLM logs there): (its JSON result, wall seconds, peak summed tree RSS GiB)."""
    import subprocess

    import psutil

    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bench.perf.dump", *argv], stdout=subprocess.DEVNULL,
                             cwd=Path(__file__).resolve().parents[2])
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.1)
    if child.returncode != 0:
        raise SystemExit(f"{argv}: exit code {child.returncode}")
    result = Path(argv[argv.index("--keep") + 1]) / f"{argv[argv.index('--phase') + 1]}.json"
    return json.loads(result.read_text()), time.perf_counter() - start, peak / 2**30


def engines(args) -> dict:
    from tests.vllm_dump_helpers import compare_dumps

    root = Path(args.keep)
    root.mkdir(parents=True, exist_ok=True)
    common = ["--target", args.target, *sum((["--data", d] for d in args.data), []), "--keep", args.keep,
              "--batch-tokens", args.batch_tokens, "--part-tokens", args.part_tokens, "--max-len", args.max_len,
              "--top-k", args.top_k, *(["--limit", args.limit] if args.limit is not None else []),
              *(["--dtype", args.dtype] if args.dtype else [])]
    runs = {}
    for phase in ENGINE_RUNS:
        result, wall, peak = run_measured(["--engines", "--phase", phase, *map(str, common)])
        runs[phase] = {**result, "wall_s": round(wall, 1), "peak_rss_GiB": round(peak, 2)}
    hf, vl, bare = runs["hf"], runs["vllm"], runs["bare"]
    assert hf["tokens"] == vl["tokens"] == bare["tokens"], (hf["tokens"], vl["tokens"], bare["tokens"])
    return {
        "target": args.target, "data": args.data, "limit": args.limit, "dtype": args.dtype or "float32",
        "top_k": args.top_k,
        "cpu_count": os.cpu_count(), "vllm_cpu_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")},
        "sequences": hf["sequences"], "tokens": hf["tokens"],
        "hf_dump_tokens_per_s": round(hf["tokens_per_s"], 1), "vllm_dump_tokens_per_s": round(vl["tokens_per_s"], 1),
        "vllm_bare_prefill_tokens_per_s": round(bare["tokens_per_s"], 1),
        "vllm_dump_vs_bare_prefill": round(vl["tokens_per_s"] / bare["tokens_per_s"], 3), "goal_vs_bare": 0.8,
        "vllm_dump_vs_hf_dump": round(vl["tokens_per_s"] / hf["tokens_per_s"], 3), "goal_vs_hf": 1.0,
        "bytes_hf": hf["bytes"], "bytes_vllm": vl["bytes"],
        "wall_s": {k: r["wall_s"] for k, r in runs.items()},
        "peak_rss_GiB": {k: r["peak_rss_GiB"] for k, r in runs.items()},
        "vllm_engine_start_s": round(bare["engine_start_s"], 1),
        "equality": compare_dumps(root / "hf", root / "vllm"),
    }


def dump_vs_bare_forward(args) -> dict:
    """The HF dump of a random tiny target against the bare forward of the same batches (the default mode)."""
    import torch

    from stages.dump.stage import dump_teacher
    from stages.target import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_dir, data = root / "target", root / "records.jsonl"
        build_target(model_dir, args)
        write_records(data, args)
        summaries = []
        for run in range(args.dump_runs):  # fresh OUT each time: every run computes every part
            summaries.append(dump_teacher(
                target=str(model_dir), data=[str(data)], out=str(root / f"dump{run}"), dtype=args.dtype,
                device=device, aux_layers=f"1,{args.layers // 2},{args.layers - 1}", teacher=args.teacher,
                top_k=args.top_k,
                batch_tokens=args.batch_tokens, part_tokens=args.part_tokens, max_seq_len=args.max_len, loss_on="all",
                overwrite=True))
        summary = max(summaries, key=lambda s: s["tokens_per_s"])
        out = root / f"dump{summaries.index(summary)}"
        bare_s, decoder_s, tokens = bare_forward_seconds(model_dir, out, args, dtype, device)
    assert tokens == summary["tokens"]
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    per_token = {"topk": args.top_k * (4 + 4), "argmax": 4, "softmax": args.vocab * dtype_bytes}[args.teacher]
    formula = 3 * args.hidden * dtype_bytes + per_token
    result = {
        "device": device, "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")},
        "teacher": args.teacher, "top_k": args.top_k, "records": args.records, "tokens": tokens,
        "padding_fraction": round(summary["padding_fraction"], 4),
        "dump_tokens_per_s": round(summary["tokens_per_s"], 1),
        "dump_tokens_per_s_runs": [round(s["tokens_per_s"], 1) for s in summaries],
        "bare_forward_tokens_per_s": round(tokens / bare_s, 1),
        "overhead_ratio": round(tokens / bare_s / summary["tokens_per_s"], 3),
        "overhead_goal": 1.15,
        "decoder_only_tokens_per_s": round(tokens / decoder_s, 1),
        "ratio_vs_decoder_only": round(tokens / decoder_s / summary["tokens_per_s"], 3),
        "bytes_per_token": round(summary["bytes_per_token"], 1),
        "formula_bytes_per_token": formula,
        "small_bytes_per_token": round(summary["bytes_per_token"] - formula, 1),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--part-tokens", type=int, default=8192)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--teacher", default="topk", choices=["topk", "argmax", "softmax"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dump-runs", type=int, default=2,
                   help="Full dumps to run (fresh OUT each); the fastest is reported, as the bare forward's best "
                        "pass is (default 2: both sides get one warm-up-like first pass).")
    p.add_argument("--keep", help="Directory to build in and keep (default: a temp dir, removed).")
    p.add_argument("--writer-only", action="store_true", help="Time the part writer alone (no model).")
    p.add_argument("--writer-parts", type=int, default=3, help="Parts per --writer-only run.")
    p.add_argument("--produce-mbps", type=float, default=500.0,
                   help="--writer-only: the paced producer's rate in MB/s of batch outputs (H100, 8B target).")
    p.add_argument("--engines", action="store_true", help="HF dump vs vLLM dump vs vLLM's bare prefill (real target).")
    p.add_argument("--target", help="--engines: the target directory.")
    p.add_argument("--data", action="append", help="--engines: a data file (repeatable).")
    p.add_argument("--limit", type=int, default=None, help="--engines: the first N records only.")
    p.add_argument("--phase", choices=ENGINE_RUNS, help=argparse.SUPPRESS)
    add_save_flag(p, "dump")
    args = p.parse_args(argv)
    if args.engines and args.phase:  # a measured child: vLLM logs to stdout, so the result goes to a file
        (Path(args.keep) / f"{args.phase}.json").write_text(json.dumps(engine_phase(args)))
        return
    result = engines(args) if args.engines else writer_only(args) if args.writer_only else dump_vs_bare_forward(args)
    print(json.dumps(result, indent=1))
    if args.save:
        save_result(args.save, result)


if __name__ == "__main__":
    main()
