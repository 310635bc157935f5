"""Benchmark: MB/s and tokens/s per worker thread of the training data path (stages.train.loader.PackedLoader:
part files -> packed fixed-shape host batches + host valid counts), from warm page cache and from cold files,
for each `--workers` count, next to the machine's memory-copy speed measured in the same run.

    python -m bench.perf.loader --shape cpu                        # the CPU benchmark shapes (H 256, fp32)
    python -m bench.perf.loader --shape 8b --tokens 131072         # Llama-3.1-8B feature sizes (H 4096, bf16)
    python -m bench.perf.loader --shape 8b --dtype float8_e4m3fn   # the same with --aux-dtype fp8 parts
    python -m bench.perf.loader --teacher-dir DUMP --seq-len 2048 --batch 4
    ... [--workers 1,2,4] [--modes warm,cold] [--repeat 3] [--trainer-tokens-per-s 69000]

A synthetic dump is written with the real part writer (random contents, documents of 64..1500 tokens, 32768-token
parts). "warm": the parts were read once before timing (and one untimed epoch allocated the reused host buffers
first); "cold": every part is evicted from the page cache first (fsync + posix_fadvise DONTNEED on each file,
which needs no root and leaves other processes' cache alone). `read_MBps` counts the stored bytes a batch needs
(aux states, teacher, ids, mask of its non-padding positions) per wall second; `read_MBps_per_cpu_second` per
CPU second of the whole process (user + system, all threads): what one worker with a core of its own moves,
and the figure that survives a loaded machine. `memcpy_MBps_per_cpu_second` (torch copy of a pre-faulted
buffer) and `pread_warm_MBps_per_cpu_second` (preadv of a whole cached part) are one thread's ceilings. With
`--trainer-tokens-per-s`, `cores_needed_warm` is the trainer's byte rate over one warm worker's per-CPU rate and
`workers_needed_wall` the same over the measured wall rates. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Stopwatch, add_save_flag, save_result
from stages.shards import SCHEMA_VERSION, part_name, shard_dir, write_part
from stages.train.loader import SAFETENSORS_DTYPES, DumpIndex, PackedLoader

SHAPES = {  # hidden, stored aux dtype, vocab, seq_len, batch
    "cpu": (256, "float32", 8192, 512, 4),
    "1b": (2048, "bfloat16", 128256, 2048, 4),
    "8b": (4096, "bfloat16", 128256, 2048, 4),
}


def write_synthetic_dump(root: Path, tokens: int, hidden: int, top_k: int, vocab: int, dtype: torch.dtype,
                         part_tokens: int = 32768, seed: int = 0) -> Path:
    """A dump-shaped directory (manifest, one shard, parts) of realistic sizes and layout. Random aux rows of one
    part are reused for the others: the loader only copies bytes, and generating GBs of randn costs minutes."""
    g = torch.Generator().manual_seed(seed)
    sdir = shard_dir(root, 0, 1)
    sdir.mkdir(parents=True, exist_ok=True)
    aux = torch.randn(min(part_tokens, tokens), 3 * hidden, generator=g).to(dtype)
    scales = torch.rand(len(aux), 3, generator=g) if dtype == torch.float8_e4m3fn else None  # FP8: + per-layer scales
    parts, sample, written = [], 0, 0
    while written < tokens:
        n = min(part_tokens, tokens - written)
        lens = []
        while sum(lens) < n:
            lens.append(min(int(torch.randint(64, 1500, (1,), generator=g)), n - sum(lens)))
        t = {"input_ids": torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32),
             "loss_mask": torch.ones(n, dtype=torch.uint8),
             "cu_seqlens": torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int64),
             "sample_index": torch.arange(sample, sample + len(lens), dtype=torch.int64),
             "aux_hidden_states": aux[:n], **({"aux_scales": scales[:n]} if scales is not None else {}),
             "teacher_topk_ids": torch.randint(0, vocab, (n, top_k), generator=g, dtype=torch.int32),
             "teacher_topk_logprobs": -torch.rand(n, top_k, generator=g) * 10}
        path = sdir / part_name(len(parts))
        sha, size = write_part(path, t, {"part_index": str(len(parts))})
        parts.append({"file": path.name, "sha256": sha, "bytes": size, "num_tokens": n, "num_sequences": len(lens)})
        sample, written = sample + len(lens), written + n
    (sdir / "done.json").write_text(json.dumps({"shard_index": 0, "num_shards": 1, "parts": parts,
                                                "token_counts": {"ids": [], "counts": []}}))
    (root / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "num_shards": 1,
                                                    "aux_dtype": str(dtype).removeprefix("torch."),
                                                    "teacher": {"kind": "topk", "k": top_k},
                                                    "target": {"vocab_size": vocab, "hidden_size": hidden}}))
    return root


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def stored_bytes_per_position(index: DumpIndex) -> int:
    """Bytes a training position reads: one row of every per-token tensor of the part."""
    from safetensors import safe_open

    with safe_open(str(index.parts[0]), framework="pt") as f:
        n = f.get_slice("input_ids").get_shape()[0]
        total = 0
        for name in f.keys():
            if name in ("cu_seqlens", "sample_index"):
                continue
            sl = f.get_slice(name)
            shape = sl.get_shape()
            itemsize = SAFETENSORS_DTYPES[sl.get_dtype()].itemsize
            total += int(np.prod(shape[1:], dtype=np.int64)) * itemsize
            assert shape[0] == n
    return total


def ceilings(part: Path) -> dict:
    """One thread's memory-copy and page-cache-read speeds per CPU second (robust on a loaded machine), on a
    part-sized buffer."""
    size = part.stat().st_size
    src, dst = torch.ones(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
    view = memoryview(dst.numpy())
    fd = os.open(part, os.O_RDONLY)
    best = {"memcpy": 1e9, "pread": 1e9}
    try:
        for _ in range(3):
            t0 = time.process_time()
            dst.copy_(src)
            best["memcpy"] = min(best["memcpy"], time.process_time() - t0)
            t0 = time.process_time()
            os.preadv(fd, [view], 0)
            best["pread"] = min(best["pread"], time.process_time() - t0)
    finally:
        os.close(fd)
    return {"memcpy_MBps_per_cpu_second": size / best["memcpy"] / 1e6,
            "pread_warm_MBps_per_cpu_second": size / best["pread"] / 1e6}


def make_loader(index, args, workers: int) -> PackedLoader:
    vocab = int(index.manifest["target"]["vocab_size"])
    return PackedLoader(index, np.arange(index.num_documents), seq_len=args.seq_len, batch_size=args.batch,
                        steps=args.ttt_steps, t2d=torch.ones(vocab, dtype=torch.bool), num_workers=workers,
                        pin=torch.cuda.is_available(), reuse_buffers=True)


def time_epoch(loader: PackedLoader, cold: bool, max_batches: int | None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (all threads) and non-padding positions of the loader's next epoch (or of its
    first max_batches micro-batches)."""
    if cold:
        evict(loader.index.parts)
    else:
        read_all(loader.index.parts)
    epoch, n_batches = loader.epoch, 0
    with Stopwatch() as watch:
        for micro in loader:
            n_batches += len(micro)
            if max_batches and n_batches >= max_batches:
                break
    loader.load_state_dict({"epoch": epoch + 1, "step": 0})
    rows = loader.rows(epoch)[:n_batches * loader.batch_size]  # one rank: batches take consecutive rows
    return watch.wall, watch.cpu, int(sum(loader.chunks.count[c] for row in rows for c in row))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher-dir", default=None, help="a real dump instead of a synthetic one")
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "float8_e4m3fn"],
                   help="stored aux dtype (float8_e4m3fn: the --aux-dtype fp8 layout, with aux_scales)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--tokens", type=int, default=131072, help="synthetic dump size")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="comma-separated worker-thread counts")
    p.add_argument("--modes", default="warm,cold")
    p.add_argument("--repeat", type=int, default=3, help="epochs per (mode, workers); the best is reported")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--trainer-tokens-per-s", type=float, default=None)
    add_save_flag(p, "loader")
    args = p.parse_args(argv)
    hidden, dtype, vocab, seq_len, batch = SHAPES[args.shape]
    args.hidden, args.dtype, args.vocab = args.hidden or hidden, args.dtype or dtype, args.vocab or vocab
    args.seq_len, args.batch = args.seq_len or seq_len, args.batch or batch

    with tempfile.TemporaryDirectory(prefix="eagle-loader-bench-") as tmp:
        root = Path(args.teacher_dir) if args.teacher_dir else write_synthetic_dump(
            Path(tmp), args.tokens, args.hidden, args.top_k, args.vocab, getattr(torch, args.dtype))
        index = DumpIndex(root)
        row_bytes = stored_bytes_per_position(index)
        out = {"dump": str(root) if args.teacher_dir else "synthetic",
               "shape": args.shape if not args.teacher_dir else None, "hidden": args.hidden, "dtype": args.dtype,
               "top_k": args.top_k, "seq_len": args.seq_len, "batch": args.batch,
               "tokens": int(index.length.sum()), "dump_bytes": sum(p.stat().st_size for p in index.parts),
               "stored_bytes_per_position": row_bytes, "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), **ceilings(index.parts[0]), "runs": []}
        for workers in map(int, args.workers.split(",")):
            loader = make_loader(index, args, workers)
            time_epoch(loader, False, args.max_batches)  # allocates the reused host buffers (first-touch faults)
            for mode in args.modes.split(","):
                runs = [time_epoch(loader, mode == "cold", args.max_batches) for _ in range(args.repeat)]
                rates = [n / t for t, _, n in runs]
                per_cpu = [n / c for _, c, n in runs]
                best = max(rates)
                out["runs"].append({
                    "mode": mode, "workers": workers, "seconds": [t for t, _, _ in runs],
                    "cpu_seconds": [c for _, c, _ in runs], "positions": runs[0][2],
                    "tokens_per_s": best, "read_MBps": best * row_bytes / 1e6,
                    "read_MBps_per_worker": best * row_bytes / 1e6 / workers,
                    "read_MBps_per_cpu_second": max(per_cpu) * row_bytes / 1e6,
                    "wall_spread": best / min(rates), "cpu_spread": max(per_cpu) / min(per_cpu)})
        one = {r["mode"]: r for r in out["runs"] if r["workers"] == 1}
        if "warm" in one:
            out["warm_per_cpu_vs_memcpy"] = one["warm"]["read_MBps_per_cpu_second"] / out["memcpy_MBps_per_cpu_second"]
        if args.trainer_tokens_per_s:
            out["trainer_tokens_per_s"] = args.trainer_tokens_per_s
            out["trainer_MBps"] = args.trainer_tokens_per_s * row_bytes / 1e6
            out["cores_needed_warm"] = out["trainer_MBps"] / one["warm"]["read_MBps_per_cpu_second"] \
                if "warm" in one else None
            out["workers_needed_wall"] = {m: out["trainer_MBps"] / r["read_MBps"] for m, r in one.items()}
    print(json.dumps(out))
    if args.save:
        save_result(args.save, out)
    return out


if __name__ == "__main__":
    main()
