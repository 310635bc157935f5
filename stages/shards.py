"""The teacher-shard format: the public contract between `dump-teacher` (writer) and `train` (reader).

Layout of a dump directory OUT::

    OUT/manifest.json                 schema_version; target provenance (path/id, config_sha256,
                                      tokenizer_sha256, num_layers, hidden_size, vocab_size, dtype);
                                      aux_layer_ids; teacher {kind, k, logprob_dtype}; max_seq_len;
                                      loss_on; data {sources, fingerprint, num_records}; num_shards
    OUT/target/                       what stage two needs instead of the target: config.json, tokenizer
                                      files, weights.safetensors {embed_tokens.weight, lm_head.weight,
                                      norm.weight} (lm_head written even when tied)
    OUT/shards/shard-IIIII-of-NNNNN/part-PPPPP.safetensors   packed sequences
    OUT/shards/shard-IIIII-of-NNNNN/done.json                written last: the shard is complete

Tensors in a part (N tokens, S sequences), safetensors metadata {"format": "eagle-pipe-part", ...}:
    input_ids             int32  [N]
    loss_mask             uint8  [N]      1 = token is supervised (assistant turn tokens incl. end-of-turn)
    cu_seqlens            int64  [S+1]    sequence s is tokens cu_seqlens[s]:cu_seqlens[s+1]
    sample_index          int64  [S]      index of the record in the input (global, over all sources)
    aux_hidden_states     target dtype [N, 3*H]   layers in ascending order
    teacher_topk_ids      int32  [N, k]   (topk) ids sorted by probability; column 0 is the argmax
    teacher_topk_logprobs float32 [N, k]  (topk) log-probabilities normalised over the full vocabulary
    teacher_argmax        int32  [N]      (argmax)
    teacher_probs         target dtype [N, V]   (softmax)
Position i's teacher is the target's distribution for token i+1 (the logits at position i).

done.json: {"shard_index", "num_shards", "parts": [{"file", "sha256", "bytes", "num_tokens",
"num_sequences"}], "records": {"assigned", "written", "skipped": {reason: count}}, "written_sample_indices"
(sorted list) , "skipped_sample_indices" {reason: [..]}, "num_tokens", "num_supervised_tokens",
"token_counts" {"ids": [...], "counts": [...]} over supervised tokens (sparse, ascending ids)}.

Writes are atomic: write to a temporary name in the same directory, fsync, rename, fsync the directory.

OWNER: dump-teacher helper (extend freely, keep the contract; the train stage imports this module).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SCHEMA_VERSION = 1
TEACHER_KINDS = ("topk", "argmax", "softmax")


def shard_dir(out: Path, shard_index: int, num_shards: int) -> Path:
    return Path(out) / "shards" / f"shard-{shard_index:05d}-of-{num_shards:05d}"


def part_name(part_index: int) -> str:
    return f"part-{part_index:05d}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 (constant memory, whatever the part size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
