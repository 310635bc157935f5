"""Benchmark: tokens/s that the training data path (stages.train_data.PackedLoader: memory-mapped parts ->
packed fixed-shape host batches + host valid counts) delivers from cold shards, against the trainer's rate.

    python bench/loader.py --teacher-dir DUMP [--seq-len 2048 --batch 16 --num-workers 2]
    python bench/loader.py --synthetic-tokens 2000000 --hidden 2048 --top-k 64 [--dtype bfloat16]
    ... [--trainer-tokens-per-s 120000]    (e.g. tokens_per_s from bench/train_step.py)

"Cold": every part file is evicted from the page cache first (posix_fadvise DONTNEED), so the reads hit the
disk. Prints one JSON object; `ratio_vs_trainer` >= 10 means the loader is never the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.shards import part_name, sha256_file, shard_dir  # noqa: E402
from stages.train_data import DumpIndex, PackedLoader  # noqa: E402


def write_synthetic_dump(root: Path, tokens: int, hidden: int, top_k: int, vocab: int, dtype: torch.dtype,
                         part_tokens: int = 1 << 16, seed: int = 0) -> Path:
    """A dump-shaped directory (manifest, one shard, parts) with random contents of realistic sizes."""
    g = torch.Generator().manual_seed(seed)
    sdir = shard_dir(root, 0, 1)
    sdir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

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
             "aux_hidden_states": torch.randn(n, 3 * hidden, generator=g).to(dtype),
             "teacher_topk_ids": torch.randint(0, vocab, (n, top_k), generator=g, dtype=torch.int32),
             "teacher_topk_logprobs": -torch.rand(n, top_k, generator=g) * 10}
        path = sdir / part_name(len(parts))
        save_file(t, str(path), metadata={"format": "eagle-pipe-part"})
        parts.append({"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                      "num_tokens": n, "num_sequences": len(lens)})
        sample, written = sample + len(lens), written + n
    (sdir / "done.json").write_text(json.dumps({"shard_index": 0, "num_shards": 1, "parts": parts,
                                                "token_counts": {"ids": [], "counts": []}}))
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "num_shards": 1,
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher-dir", default=None)
    p.add_argument("--synthetic-tokens", type=int, default=1_000_000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--trainer-tokens-per-s", type=float, default=None)
    p.add_argument("--warm", action="store_true", help="do not evict the parts from the page cache")
    a = p.parse_args(argv)

    tmp = None
    if a.teacher_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="eagle-loader-bench-")
        root = write_synthetic_dump(Path(tmp.name), a.synthetic_tokens, a.hidden, a.top_k, a.vocab,
                                    getattr(torch, a.dtype))
    else:
        root = Path(a.teacher_dir)
    t0 = time.perf_counter()
    index = DumpIndex(root)
    vocab = int(index.manifest["target"]["vocab_size"])
    t2d = torch.ones(vocab, dtype=torch.bool)
    loader = PackedLoader(index, np.arange(index.num_documents), seq_len=a.seq_len, batch_size=a.batch,
                          steps=a.ttt_steps, t2d=t2d, num_workers=a.num_workers, pin=torch.cuda.is_available(),
                          reuse_buffers=True)
    plan_s = time.perf_counter() - t0
    if not a.warm:
        evict(index.parts)
    n_batches, t0 = 0, time.perf_counter()
    for micro in loader:
        n_batches += len(micro)
        if a.max_batches and n_batches >= a.max_batches:
            break
    dt = time.perf_counter() - t0
    positions = n_batches * a.batch * a.seq_len
    bytes_total = sum(p.stat().st_size for p in index.parts)
    out = {"dump": str(root) if a.teacher_dir else "synthetic", "cold": not a.warm, "batches": n_batches,
           "seq_len": a.seq_len, "batch": a.batch, "num_workers": a.num_workers, "index_and_plan_s": plan_s,
           "seconds": dt, "tokens_per_s": positions / dt, "dump_bytes": bytes_total,
           "padding_fraction": 1 - loader.chunks.count.sum() / max(len(loader.rows(0)) * a.seq_len, 1)}
    if a.trainer_tokens_per_s:
        out["trainer_tokens_per_s"] = a.trainer_tokens_per_s
        out["ratio_vs_trainer"] = out["tokens_per_s"] / a.trainer_tokens_per_s
    print(json.dumps(out))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
