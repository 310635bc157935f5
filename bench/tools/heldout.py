"""Held-out simulated acceptance of any EAGLE-3 draft on a teacher dump: a cheap, low-noise second judge.

    python -m bench.tools.heldout --dump HELDOUT_DUMP --draft RUN/export --draft modelopt/export ... [--ttt-steps 3]

For each draft (any format `eagle-pipe eval` loads: eagle-pipe, Model-Optimizer, speculators, llama-eagle3), it
runs the training-time test forward (eagle/ttt.py, the same unrolled chain drafting the engines run, tested equal
to it) over every position of the dump and prints one JSON object: per TTT step the accuracy against the
teacher's argmax (the target's greedy token), the simulated acceptance length (eagle/loss.py), the soft cross
entropy, the number of positions, and the draft vocabulary's coverage (the share of supervised tokens whose
greedy target token is in the draft vocabulary: a ceiling on step 1's accuracy). No target forward: the dump holds the target's aux states and outputs, so
a draft costs seconds, and ~20k held-out positions tell drafts apart that 16 MT-bench questions cannot.

The draft's embedding is the target's (exports omit it); it is read from the dump's `target/` directory
(eagle.config.load_target_dir), as train reads it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import add_save_flag, save_result
from eagle.config import load_target_dir
from eagle.export import load_draft
from stages.shards import iter_parts, load_part, read_json
from stages.train.loader import DumpIndex, PackedLoader
from stages.train.setup import DistInfo
from stages.train.stage import evaluate, make_step_fn


TEACHER_TENSOR = {"topk": "teacher_topk_ids", "argmax": "teacher_argmax", "softmax": "teacher_probs"}


def greedy_tokens(part: dict) -> torch.Tensor:
    """The target's greedy next token at every position of a part, whatever the teacher kind."""
    if "teacher_topk_ids" in part:
        return part["teacher_topk_ids"][:, 0].long()
    if "teacher_argmax" in part:
        return part["teacher_argmax"].long()
    return part["teacher_probs"].argmax(-1)


def vocab_coverage(dump: Path, t2d: torch.Tensor) -> float:
    """Share of the dump's supervised tokens (not a sequence's first) whose greedy target token, the teacher at
    the position before, is in the draft vocabulary (t2d: a bool mask over the target vocabulary)."""
    teacher = TEACHER_TENSOR[read_json(dump / "manifest.json")["teacher"]["kind"]]
    covered = total = 0
    for path in iter_parts(dump):  # only the ids, masks and teacher: the aux states stay on disk
        part = load_part(path, ["loss_mask", "cu_seqlens", teacher])
        first = torch.zeros(part["loss_mask"].numel(), dtype=torch.bool)
        first[part["cu_seqlens"][:-1]] = True
        scored = part["loss_mask"].bool()[1:] & ~first[1:]
        greedy = greedy_tokens(part)[:-1][scored]
        covered += int(t2d.cpu()[greedy].sum())
        total += greedy.numel()
    return covered / total


def score(draft_dir: str, dump: Path, ttt_steps: int, seq_len: int, batch_size: int) -> dict:
    target_config, weights = load_target_dir(dump / "target")
    draft = load_draft(draft_dir, embed_weight=weights["embed_tokens.weight"].float(),
                       target_config=target_config.get("text_config", target_config)).float()
    index = DumpIndex(dump)
    loader = PackedLoader(index, np.arange(index.num_documents), seq_len=seq_len, batch_size=batch_size,
                          steps=ttt_steps, t2d=draft.t2d.cpu(), shuffle=False, drop_last=False)
    step_fn = make_step_fn(ttt_steps, index.teacher_kind, 1.0, "dense", torch.device("cpu"), False, "fp32")
    r = evaluate(draft, loader, step_fn, DistInfo(), torch.float32)
    return {"draft": draft_dir, "format": getattr(draft, "draft_format", None), "ttt_steps": ttt_steps,
            "accuracy": [round(a, 4) for a in r["eval_acc"]], "simulated_acceptance_length":
            round(r["eval_acceptance_length"], 4), "soft_ce": [round(c, 4) for c in r["eval_ce"]],
            "positions": r["eval_positions"], "vocab_coverage": round(vocab_coverage(dump, draft.t2d.bool()), 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dump", required=True, type=Path, help="held-out teacher dump (eagle-pipe dump-teacher)")
    p.add_argument("--draft", required=True, action="append", help="draft directory (repeat for several)")
    p.add_argument("--ttt-steps", type=int, default=3, help="draft steps scored (K)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    add_save_flag(p, "heldout")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with torch.enable_grad():  # evaluate() runs the training step's graph (no backward)
        rows = [score(d, args.dump, args.ttt_steps, args.seq_len, args.batch_size) for d in args.draft]
    report = {"dump": str(args.dump), "drafts": rows}
    print(json.dumps(report, indent=1))
    if args.save:
        save_result(args.save, report)


if __name__ == "__main__":
    main()
