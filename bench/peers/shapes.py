"""The draft-shape flags that bench/perf/train_step.py, bench/peers/modelopt/step.py and bench/peers/speculators/step.py share.

train_step.py passes its own values of these flags to the two peer scripts (run in the peers' venvs), so all
three time the same draft shape; one definition keeps their names and defaults from drifting apart. Plain
argparse only: the peers' interpreters import it from this folder.
"""
from __future__ import annotations

import argparse

SHAPE_FLAGS = ("hidden", "heads", "kv_heads", "intermediate", "vocab", "draft_vocab", "seq_len", "batch",
               "ttt_steps")


def add_shape_flags(p: argparse.ArgumentParser) -> None:
    """The draft and batch shape: hidden size, heads, MLP width, vocabularies, sequence length, rows, TTT depth."""
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--draft-vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ttt-steps", type=int, default=3)
