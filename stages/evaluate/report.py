"""The report `eagle-pipe eval` writes, whichever engine decoded: acceptance length overall, per draft position,
per category and per turn, lossless, speeds; its table form; and the training-time estimate it is compared with.

Acceptance length = tokens produced per target verification forward in the decode phase, bonus token included
(= 1 + the sum of the per-position acceptance rates), pooled over all the turns of a group (as Spec-Bench
averages a category).
"""
from __future__ import annotations

import json as jsonlib
from collections import Counter
from pathlib import Path

from stages.errors import StageError


def simulated_acceptance_from_run(run_dir: str, draft_tokens: int) -> float:
    """The training-time simulated acceptance length at K draft tokens: 1 + sum_k prod_{j<=k} acc_j, from the
    per-step accuracies `train_step_accuracies` reads."""
    value, running = 1.0, 1.0
    for a in train_step_accuracies(run_dir)[:draft_tokens]:
        running *= float(a)
        value += running
    return value


def train_step_accuracies(run_dir: str) -> list[float]:
    """The per-TTT-step accuracies `eagle-pipe train` writes (stages/train/stage.py): in RUN/train_summary.json
    the held-out `final_eval.eval_acc`, else the training `final_metrics.acc`; before the summary exists (a run
    still training), the last RUN/metrics.jsonl line's `eval_acc` (a held-out line) or `acc` (a training line).
    Anything else is refused in one line."""
    run = Path(run_dir)
    summary, metrics = run / "train_summary.json", run / "metrics.jsonl"
    if summary.is_file():
        obj = _json_object(summary.read_text(), summary)
        acc = _accuracies((obj.get("final_eval") or {}).get("eval_acc")) or \
            _accuracies((obj.get("final_metrics") or {}).get("acc"))
        if acc:
            return acc
        raise StageError(f"{summary}: no final_eval.eval_acc or final_metrics.acc (not written by this eagle-pipe "
                         "train?); re-run train, or eval without --run-dir")
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            last = _json_object(lines[-1], metrics)
            acc = _accuracies(last.get("eval_acc")) or _accuracies(last.get("acc"))
            if acc:
                return acc
        raise StageError(f"{metrics}: its last line has no eval_acc or acc (not written by this eagle-pipe "
                         "train?); re-run train, or eval without --run-dir")
    raise StageError(f"{run_dir}: no train_summary.json or metrics.jsonl (is this a train run directory?)")


def _json_object(text: str, where: Path) -> dict:
    try:
        obj = jsonlib.loads(text)
    except ValueError as e:
        raise StageError(f"{where}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StageError(f"{where}: expected a JSON object")
    return obj


def _accuracies(value) -> list[float] | None:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return value
    return None


def acceptance_stats(accepted: list[int], draft_tokens: int) -> dict:
    """From accepted-draft counts per target forward: acceptance length and per-position rates."""
    rounds = len(accepted)
    if rounds == 0:
        return {"acceptance_length": None, "per_position_acceptance": [None] * draft_tokens,
                "per_position_conditional": [None] * draft_tokens, "target_forwards": 0}
    reached = [sum(a >= i for a in accepted) for i in range(draft_tokens + 1)]  # reached[i]: >= i accepted
    return {
        "acceptance_length": sum(a + 1 for a in accepted) / rounds,
        "per_position_acceptance": [reached[i] / rounds for i in range(1, draft_tokens + 1)],
        "per_position_conditional": [reached[i] / reached[i - 1] if reached[i - 1] else None
                                     for i in range(1, draft_tokens + 1)],
        "target_forwards": rounds,
    }


def group_stats(runs: list[dict], key) -> dict[str, dict]:
    """Per group (first-appearance order): questions, turns, target forwards, acceptance length over all the
    group's target forwards pooled (as Spec-Bench averages a category), and the group's speedup."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(str(key(run)), []).append(run)
    return {name: _group_summary(group) for name, group in groups.items()}


def _total(values):
    """The sum, or None when any value is None (turns that were not timed alone: batched)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _group_summary(runs: list[dict]) -> dict:
    accepted = [a for run in runs for a in run["accepted"]]
    spec_s, base_s = _total(r["seconds"] for r in runs), _total(r["baseline_seconds"] for r in runs)
    spec_rate = sum(r["new_tokens"] for r in runs) / spec_s if spec_s else None
    base_rate = sum(r["baseline_new_tokens"] for r in runs) / base_s if base_s else None
    return {"questions": len({r["question"] for r in runs}), "turns": len(runs), "target_forwards": len(accepted),
            "acceptance_length": sum(a + 1 for a in accepted) / len(accepted) if accepted else None,
            "speedup": spec_rate / base_rate if spec_rate and base_rate else None}



def build_report(common: dict, runs: list[dict], mismatches: list[dict], k: int, simulated,
            spec_seconds: float) -> dict:
    """The report of one K: acceptance, per category and turn, lossless, speeds and times. Speeds compare the
    speculative runs with the references at the same batch size (`batch_size` turns decoded together)."""
    spec_tokens, base_tokens = sum(r["new_tokens"] for r in runs), sum(r["baseline_new_tokens"] for r in runs)
    base_seconds = common["reference_seconds"]
    report = {
        **{key: common[key] for key in ("target", "draft", "draft_format", "data", "num_prompts")},
        "num_turns": len(runs),
        **{key: common[key] for key in ("skipped_records", "skipped_examples")}, "draft_tokens": k,
        **{key: common[key] for key in ("max_new_tokens", "device", "dtype", "batch_size")},
        **acceptance_stats([a for r in runs for a in r["accepted"]], k),
        "per_category": group_stats(runs, lambda r: r["category"]),
        "per_turn": group_stats(runs, lambda r: r["turn"]),
        "simulated_acceptance_length": simulated,
        "lossless": not mismatches, "mismatches": mismatches,
        "new_tokens": spec_tokens, "baseline_new_tokens": base_tokens,
        "tokens_per_s": spec_tokens / spec_seconds if spec_seconds else None,
        "baseline_tokens_per_s": common["reference_tokens"] / base_seconds if base_seconds else None,
        "per_prompt": runs,
    }
    report["speedup"] = (report["tokens_per_s"] / report["baseline_tokens_per_s"]
                         if report["tokens_per_s"] and report["baseline_tokens_per_s"] else None)
    forwards = report["target_forwards"] + len(runs)  # decode-phase forwards plus one prefill per turn
    alone = common["batch_size"] == 1
    report["timing"] = {
        "seconds": spec_seconds, "baseline_seconds": base_seconds,
        "seconds_per_turn": spec_seconds / len(runs) if runs else None,
        "baseline_seconds_per_turn": base_seconds / len(runs) if runs else None,
        # per forward only at batch 1: batched, one forward serves several turns
        "seconds_per_target_forward": spec_seconds / forwards if forwards and alone else None,
        "baseline_seconds_per_token": base_seconds / base_tokens if base_tokens and alone else None,
        "warmup_seconds": common["warmup_seconds"], **common["engine"], **common["references"],
    }
    return report


def combine_reports(reports: dict, draft_token_counts: list[int]) -> dict:
    """One report for the K measured: the first K's, plus (several K) `by_draft_tokens` {K: report}, lossless only
    when every K is."""
    report = reports[draft_token_counts[0]]
    if len(draft_token_counts) > 1:
        report = {**report, "lossless": all(r["lossless"] for r in reports.values()),
                  "draft_tokens_list": draft_token_counts,
                  "by_draft_tokens": {str(k): r for k, r in reports.items()}}
    return report


def skip_examples(skips, per_reason: int = 3) -> list[dict]:
    """The first few skipped records of each reason, with their location."""
    shown: Counter = Counter()
    examples = []
    for skip in skips:
        if shown[skip.reason] < per_reason:
            shown[skip.reason] += 1
            examples.append({"where": skip.where, "reason": skip.reason, "message": skip.message})
    return examples


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def _speedup(value) -> str:
    return _fmt(value, ".2f") + "x" if value else "-"


def format_report(report: dict) -> str:
    """The readable report `eagle-pipe eval` prints: totals, then acceptance length per category and per turn
    (one such block per K when several were measured)."""
    if "by_draft_tokens" in report:
        return "\n\n".join(f"== K = {k}\n" + _format_one(sub) for k, sub in report["by_draft_tokens"].items())
    return _format_one(report)


def _format_one(report: dict) -> str:
    k, timing, turns = report["draft_tokens"], report["timing"], report["num_turns"]
    prompts = f"{report['num_prompts']}" + (f" ({turns} turns)" if turns != report["num_prompts"] else "")
    skipped = report["skipped_records"]
    per_position = report["per_position_acceptance"], report["per_position_conditional"]
    to_ms = {name: timing[name] and 1e3 * timing[name]
             for name in ("seconds_per_target_forward", "baseline_seconds_per_token")}
    rows = [
        ("draft format", report["draft_format"]),
        ("prompts", prompts + (f" (skipped: {skipped})" if skipped else "")),
        ("draft tokens K", str(k)),
        ("batch size", str(report["batch_size"]) + (f" ({timing['rerun_alone']} turn(s) decided alone)"
                                                     if timing.get("rerun_alone") else "")),
        ("target forwards (decode)", str(report["target_forwards"])),
        ("acceptance length", _fmt(report["acceptance_length"])),
        ("  per draft position", "  ".join(f"{i + 1}: {_fmt(a)}" for i, a in enumerate(per_position[0]))),
        ("  conditional", "  ".join(f"{i + 1}: {_fmt(a)}" for i, a in enumerate(per_position[1]))),
        ("simulated (training)", _fmt(report["simulated_acceptance_length"])),
        ("tokens/s speculative", _fmt(report["tokens_per_s"], ".1f")),
        ("tokens/s target alone", _fmt(report["baseline_tokens_per_s"], ".1f")),
        ("speedup", _speedup(report["speedup"])),
        ("seconds per turn", f"{_fmt(timing['seconds_per_turn'], '.2f')} speculative, "
                             f"{_fmt(timing['baseline_seconds_per_turn'], '.2f')} target alone"),
        *([("ms per target forward", f"{_fmt(to_ms['seconds_per_target_forward'], '.1f')} speculative, "
                                     f"{_fmt(to_ms['baseline_seconds_per_token'], '.1f')} target alone")]
          if report["batch_size"] == 1 else []),  # batched, one forward serves several turns
        ("warm-up (compile)", f"{timing['warmup_seconds']:.1f} s"),
        ("lossless", "yes" if report["lossless"] else f"NO ({len(report['mismatches'])} prompt(s) differ)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    overall = {"questions": report["num_prompts"], "turns": turns, "target_forwards": report["target_forwards"],
               "acceptance_length": report["acceptance_length"], "speedup": report["speedup"]}
    lines += ["", *_group_table("category", {**report["per_category"], "overall": overall})]
    if len(report["per_turn"]) > 1:
        lines += ["", *_group_table("turn", {**report["per_turn"], "overall": overall})]
    for skip in report["skipped_examples"]:
        lines.append(f"skipped {skip['where']}: {skip['reason']}: {skip['message']}")
    return "\n".join(lines)


def _group_table(title: str, groups: dict[str, dict]) -> list[str]:
    header = (title, "questions", "turns", "forwards", "acceptance length", "speedup")
    rows = [(name, str(g["questions"]), str(g["turns"]), str(g["target_forwards"]), _fmt(g["acceptance_length"]),
             _speedup(g["speedup"])) for name, g in groups.items()]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    return ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
            for row in [header, *rows]]


def write_report(report: dict, path: Path) -> None:
    """The JSON report, written whole or not at all (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(jsonlib.dumps(report, indent=1) + "\n")
    partial.replace(path)

