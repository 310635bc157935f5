"""Test helper for the train-stage tests: a small synthetic teacher dump written with plain safetensors.

The aux features encode where each token came from (column 0 = sample_index, column 1 = position in its
document), so a test can check every batch position against a plain per-document reference.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from stages.shards import SCHEMA_VERSION, part_name, sha256_file, shard_dir


def make_documents(lengths: list[int], vocab: int, kind: str = "topk", k: int = 4, aux_width: int = 6,
                   seed: int = 0) -> list[dict]:
    """One dict of per-token tensors per document (what a dump would hold for it)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for s, n in enumerate(lengths):
        aux = torch.randn(n, aux_width, generator=g)
        aux[:, 0] = s
        aux[:, 1] = torch.arange(n)
        doc = {"sample_index": s, "input_ids": torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32),
               "loss_mask": (torch.rand(n, generator=g) < 0.7).to(torch.uint8), "aux_hidden_states": aux}
        logits = torch.randn(n, vocab, generator=g) * 3
        if kind == "topk":
            lp = torch.log_softmax(logits, -1)
            top = lp.topk(k, -1)
            doc["teacher_topk_ids"] = top.indices.to(torch.int32)
            doc["teacher_topk_logprobs"] = top.values.float()
        elif kind == "argmax":
            doc["teacher_argmax"] = logits.argmax(-1).to(torch.int32)
        else:
            doc["teacher_probs"] = torch.softmax(logits, -1)
        docs.append(doc)
    return docs


def write_dump(root: Path, docs: list[dict], vocab: int, kind: str = "topk", k: int = 4, num_shards: int = 2,
               seqs_per_part: int = 3) -> Path:
    """Write docs round-robin over shards, a few sequences per part, with manifest and done.json files."""
    root = Path(root)
    manifest = {"schema_version": SCHEMA_VERSION, "num_shards": num_shards, "teacher": {"kind": kind, "k": k},
                "target": {"vocab_size": vocab, "config_sha256": "x", "tokenizer_sha256": "y"},
                "aux_layer_ids": [1, 2, 3]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for i in range(num_shards):
        mine = docs[i::num_shards]
        sdir = shard_dir(root, i, num_shards)
        sdir.mkdir(parents=True, exist_ok=True)
        parts = []
        counts: dict[int, int] = {}
        for p, first in enumerate(range(0, len(mine), seqs_per_part)):
            group = mine[first:first + seqs_per_part]
            tensors = {key: torch.cat([d[key] for d in group]) for key in group[0] if key != "sample_index"}
            lens = torch.tensor([len(d["input_ids"]) for d in group])
            tensors["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
            tensors["sample_index"] = torch.tensor([d["sample_index"] for d in group], dtype=torch.int64)
            path = sdir / part_name(p)
            save_file({k_: v.contiguous() for k_, v in tensors.items()}, str(path),
                      metadata={"format": "eagle-pipe-part"})
            parts.append({"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                          "num_tokens": int(lens.sum()), "num_sequences": len(group)})
            for d in group:
                for t in d["input_ids"][d["loss_mask"].bool()].tolist():
                    counts[t] = counts.get(t, 0) + 1
        ids = sorted(counts)
        done = {"shard_index": i, "num_shards": num_shards, "parts": parts,
                "token_counts": {"ids": ids, "counts": [counts[t] for t in ids]}}
        (sdir / "done.json").write_text(json.dumps(done))
    return root


def kill_at_first_checkpoint(cmd: list[str], run: Path, env: dict) -> Path | None:
    """Start a training subprocess and SIGKILL it as soon as RUN has a checkpoint (a crash mid-run); that one."""
    from stages.train import checkpoint as ckpt

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(run / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return ckpt.latest_checkpoint(run / "checkpoints")


def train_command(dump, run, *flags) -> list[str]:
    """`eagle-pipe train --teacher-dir DUMP --out RUN FLAGS...` as a subprocess command line."""
    return [sys.executable, "-m", "stages.cli", "train", "--teacher-dir", str(dump), "--out", str(run),
            *map(str, flags)]


def straight_and_resumed(dump, root: Path, *flags, max_steps: int) -> tuple[Path, Path]:
    """The same `max_steps` training run on DUMP twice, one thread each: ROOT/straight straight through, and
    ROOT/killed SIGKILLed at its first checkpoint (before the last step, no train_summary.json yet) then finished
    with --resume. Returns the two run directories."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = root / "straight", root / "killed"
    subprocess.run(train_command(dump, straight, *flags, "--max-steps", max_steps), check=True, env=env,
                   capture_output=True)
    at_kill = kill_at_first_checkpoint(train_command(dump, killed, *flags, "--max-steps", max_steps), killed, env)
    assert at_kill is not None and not (killed / "train_summary.json").exists(), "killed before the end"
    assert int(at_kill.name.split("-")[1]) < max_steps
    subprocess.run(train_command(dump, killed, *flags, "--max-steps", max_steps, "--resume"), check=True, env=env,
                   capture_output=True)
    return straight, killed
