"""How predictable are the demo target's greedy answers? An n-gram "draft" as a cheap yardstick.

Fits a token n-gram model (trigram, backing off to bigram) on the assistant turns of `data/train.jsonl` —
which are the target's own greedy continuations — and simulates greedy chain speculative decoding with K draft
tokens on the assistant turns of `data/eval.jsonl`: each step drafts K tokens from the n-gram model, accepts
the prefix that matches what the target wrote, and gains one more token from the target. It prints JSON with
the simulated acceptance length (tokens per target forward) and next-token accuracy.

An EAGLE-3 head also sees the target's hidden states, so it should do at least as well as this; a high
n-gram number says the demo's acceptance-length goal is within reach, a low one would warn that it is not.

    python examples/demo/draftability.py [--draft-tokens 3]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
START = -1  # context marker for "beginning of the answer"


def answers(path: Path, tok) -> list[list[int]]:
    """Token ids of each record's assistant turn."""
    out = []
    with path.open() as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            out.append(tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"])
    return out


class NGram:
    """Most frequent next token after the last two tokens, else after the last one, else overall."""

    def __init__(self, seqs: list[list[int]]):
        self.tri, self.bi, self.uni = defaultdict(Counter), defaultdict(Counter), Counter()
        for s in seqs:
            s = [START, START] + s
            for a, b, c in zip(s, s[1:], s[2:]):
                self.tri[(a, b)][c] += 1
                self.bi[b][c] += 1
                self.uni[c] += 1

    def next(self, ctx: list[int]) -> int:
        a, b = ([START, START] + ctx)[-2:]
        for table in (self.tri.get((a, b)), self.bi.get(b), self.uni):
            if table:
                return table.most_common(1)[0][0]
        return 0


def simulate(model: NGram, seqs: list[list[int]], k: int) -> dict:
    tokens = steps = hits = tries = 0
    per_pos = [0] * k
    for s in seqs:
        i = 0
        while i < len(s):
            ctx, accepted = list(s[:i]), 0
            for j in range(k):
                d = model.next(ctx)
                if i + j < len(s) and d == s[i + j]:
                    accepted += 1
                    per_pos[j] += 1
                    ctx.append(d)
                else:
                    break
            gained = min(accepted + 1, len(s) - i)
            tokens, steps, i = tokens + gained, steps + 1, i + gained
        for i in range(len(s)):
            tries, hits = tries + 1, hits + (model.next(s[:i]) == s[i])
    return {"draft_tokens": k, "acceptance_length": tokens / steps, "next_token_accuracy": hits / tries,
            "per_position_acceptance": [c / steps for c in per_pos], "eval_tokens": tokens}


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=DEMO_DIR)
    ap.add_argument("--draft-tokens", type=int, default=3)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.demo / "target", local_files_only=True)
    model = NGram(answers(args.demo / "data" / "train.jsonl", tok))
    result = {"eval": simulate(model, answers(args.demo / "data" / "eval.jsonl", tok), args.draft_tokens)}
    result["train_self"] = simulate(model, answers(args.demo / "data" / "train.jsonl", tok), args.draft_tokens)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
