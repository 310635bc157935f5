"""Which shard of a job's records this process owns: explicit options, else the batch scheduler's variables.

Records are split by `sample_index % num_shards`, so a SLURM array task, a torchrun rank or an explicit
`--shard-index/--num-shards` pair each own a fixed, disjoint subset. Used by every stage that writes a sharded
output from data (regenerate, dump-teacher) and by `run`, which predicts their outputs.
"""
from __future__ import annotations

import os

from stages.errors import StageError


def shard_from_env(shard_index: int | None, num_shards: int | None, env=os.environ) -> tuple[int, int]:
    """Explicit options win; else a SLURM array task; else torchrun's RANK/WORLD_SIZE; else shard 0 of 1."""
    if num_shards is None:
        if "SLURM_ARRAY_TASK_COUNT" in env:
            num_shards = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "WORLD_SIZE" in env:
            num_shards = int(env["WORLD_SIZE"])
        else:
            num_shards = 1
    if shard_index is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            shard_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        elif "RANK" in env:
            shard_index = int(env["RANK"])
        else:
            shard_index = 0
    if num_shards < 1:
        raise StageError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise StageError(f"--shard-index {shard_index} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    return shard_index, num_shards


def in_shard(sample_index: int, shard_index: int, num_shards: int) -> bool:
    return sample_index % num_shards == shard_index
