"""Stage `eval`: a draft's measured acceptance length with real speculative decoding, and a lossless check.

For each turn of each question (stages/data/prompts.py: a conversation up to its first user turn, or a benchmark
question of one or more turns, in file order; later turns follow the target's own earlier answers), rendered with
the chat template and the generation prompt, the target generates greedily twice: with its own `generate()` (the
reference output and the baseline speed) and with greedy chain speculative decoding driven by the exported
draft (stages/evaluate/speculative.py). The two outputs must be equal token for token; any difference is an error naming
the prompt. Acceptance length = tokens produced per target forward in the decode phase, bonus token included
(= 1 + the sum of the per-position acceptance rates), pooled over all, per category and per turn.
"""
from __future__ import annotations

import json as jsonlib
from collections import Counter
from pathlib import Path

import click

from stages.errors import StageError

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


# ------------------------------------------------------------------------------------------------ prompts
def render_prompt(tokenizer, messages: list[dict], where: str) -> list[int]:
    """Token ids of a conversation rendered with the chat template and the generation prompt."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    except Exception as e:  # a template that rejects the conversation: bad input, named
        raise StageError(f"{where}: chat template failed: {e}") from None
    return list(ids)


def load_prompts(sources, tokenizer, num_prompts: int | None) -> tuple[list, list]:
    """([Question], [Skipped]): the first `num_prompts` usable questions (stages/data/prompts.py), the skips.

    Turn 1 of every question is rendered here, so a template that rejects one fails before any generation.
    """
    from stages.data.prompts import read_questions

    questions, skips = read_questions(sources, num_prompts)
    for q in questions:
        render_prompt(tokenizer, q.conversation([]), q.where)
    return questions, skips


# ------------------------------------------------------------------------------------------------ models
def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {device}: CUDA is not available")
    return device


def resolve_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise StageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids from generation_config (int or list), else the model config, else the tokenizer."""
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    raise StageError("the target has no end-of-sequence token (generation_config.eos_token_id)")


def load_target(target: str, dtype, device: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise StageError(f"{target}: cannot load the target model: {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        raise StageError(f"{target}: the tokenizer has no chat template")
    return model.to(device).eval(), tokenizer


def load_draft_for(target_model, draft_dir: str, device: str):
    from eagle.export import load_draft

    if not (Path(draft_dir) / "config.json").is_file():
        raise StageError(f"{draft_dir}: not an exported draft (no config.json)")
    embed = target_model.get_input_embeddings().weight.detach()
    try:  # an eagle-pipe, llama-eagle3, Model-Optimizer or speculators export (eagle/draft_formats.py)
        draft = load_draft(draft_dir, embed_weight=embed, device=device,
                           target_config=target_model.config.get_text_config().to_dict())
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{draft_dir}: cannot load the draft: {e}") from None
    draft = draft.float()  # the draft is small: run it in float32 whatever the export dtype
    cfg, tcfg = draft.cfg, target_model.config.get_text_config()  # a multimodal checkpoint: its text model
    if cfg.vocab_size != embed.shape[0] or cfg.target_hidden_size != tcfg.hidden_size:
        raise StageError(f"{draft_dir}: draft was made for another target (vocab {cfg.vocab_size}, hidden "
                         f"{cfg.target_hidden_size}; target has {embed.shape[0]}, {tcfg.hidden_size})")
    return draft.eval()


# ------------------------------------------------------------------------------------------------ metrics
def simulated_acceptance_from_run(run_dir: str, draft_tokens: int) -> float | None:
    """The training-time simulated acceptance length at K draft tokens: 1 + sum_k prod_{j<=k} acc_j.

    Reads the per-step accuracies from RUN/train_summary.json (held-out if present), else the last
    RUN/metrics.jsonl line that has them.
    """
    run = Path(run_dir)
    candidates = []
    summary = run / "train_summary.json"
    if summary.is_file():
        candidates.append(jsonlib.loads(summary.read_text()))
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        candidates += [jsonlib.loads(ln) for ln in reversed(lines)]
    if not candidates:
        raise StageError(f"{run_dir}: no train_summary.json or metrics.jsonl (is this a train run directory?)")
    for obj in candidates:
        acc = _find_step_accuracies(obj)
        if acc:
            value, running = 1.0, 1.0
            for a in acc[:draft_tokens]:
                running *= float(a)
                value += running
            return value
    return None


def _find_step_accuracies(obj) -> list[float] | None:
    """Per-step accuracies in a metrics dict: held-out ones first, then training ones."""
    if not isinstance(obj, dict):
        return None
    for section in ("final_eval", "heldout", "eval", "final_metrics", "final", "metrics", "train"):
        found = _find_step_accuracies(obj.get(section)) if isinstance(obj.get(section), dict) else None
        if found:
            return found
    for key in ("eval_acc", "heldout_acc", "acc", "accuracy", "step_accuracy"):
        value = obj.get(key)
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


# ------------------------------------------------------------------------------------------------ the run
def parse_draft_tokens(value) -> list[int]:
    """--draft-tokens: one K (3) or several (3,5 / [3, 5]); each >= 1, in the order given, no repeats."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        ks = [int(str(k).strip()) for k in items]
    except ValueError:
        raise StageError(f"--draft-tokens {value}: expected an integer or a comma-separated list (3,5)") from None
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise StageError(f"--draft-tokens {value}: each K must be at least 1, no K twice")
    return ks


class DraftTokensType(click.ParamType):
    name = "K[,K...]"

    def convert(self, value, param, ctx):
        try:
            return parse_draft_tokens(value)
        except StageError as e:
            self.fail(str(e), param, ctx)


def cache_length_bound(questions, tokenizer, max_new_tokens: int, max_k: int) -> int:
    """Positions the longest turn can reach: the question rendered with every user turn and empty answers, plus
    each earlier answer (at most max_new_tokens, + slack for its re-tokenized text), plus this turn's new
    tokens and one verification's K+1. The static caches are sized from it once, so nothing recompiles."""
    longest = 0
    for q in questions:
        earlier = len(q.user_turns) - 1
        try:
            base = len(render_prompt(tokenizer, q.conversation([""] * earlier), q.where))
        except StageError:  # a template that refuses empty answers: the first turn, and grow later if needed
            base = len(render_prompt(tokenizer, q.conversation([]), q.where))
        longest = max(longest, base + earlier * (max_new_tokens + 16))
    return longest + max_new_tokens + max_k + 1


def evaluate(target: str, draft: str, data, *, num_prompts=32, max_new_tokens=128, draft_tokens=3, dtype=None,
             device=None, run_dir=None, trust_remote_code=False, compile=True, batch_size=1) -> dict:
    """Speculative vs plain greedy decoding over the questions' turns; returns the report dict (see `command`).

    `draft_tokens` may be a list of K: every turn then has one greedy reference, shared by the speculative runs
    at each K, and the report is the first K's (today's keys) plus `by_draft_tokens` {K: report}.
    `batch_size` > 1 decodes that many questions at a time, references and speculative runs (see `command`)."""
    import time

    from tqdm import tqdm

    from stages.data.prompts import answer_text
    from stages.data.records import summarize_skips
    from stages.evaluate.batched import BatchedTarget, Unbatchable, speculative_generate_batch
    from stages.evaluate.speculative import (TargetWithAux, greedy_generate, greedy_generate_batch,
                                             speculative_generate)
    from stages.evaluate.static_target import StaticTarget, UncroppableCache
    from stages.static_cache import bucket, supports_static_cache

    ks = parse_draft_tokens(draft_tokens)
    if batch_size < 1:
        raise StageError(f"--batch-size {batch_size}: must be at least 1")
    if max_new_tokens < 1:
        raise StageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not data:
        raise StageError("eval needs --data (a file with conversations or benchmark questions)")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model, tokenizer = load_target(target, torch_dtype, device, trust_remote_code)
    drafter = load_draft_for(model, draft, device)
    questions, skips = load_prompts(data, tokenizer, num_prompts)
    skipped = summarize_skips(skips)
    if not questions:
        why = ", ".join(f"{reason} {n}" for reason, n in skipped.items()) or "no records"
        first = f"; first: {skips[0].where}: {skips[0].message}" if skips else ""
        raise StageError(f"{', '.join(map(str, data))}: no record with a user turn to use as a prompt "
                         f"(skipped: {why}{first})")
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

    static = supports_static_cache(model)
    cache_len = bucket(cache_length_bound(questions, tokenizer, max_new_tokens, max(ks)))

    simulated = {k: simulated_acceptance_from_run(run_dir, k) if run_dir else None for k in ks}

    def make_target(length: int):
        if static:
            try:
                return StaticTarget(model, drafter.cfg.aux_layer_ids, length,
                                    compiled_tokens=[k + 1 for k in ks] if one_at_a_time_compiled else ())
            except UncroppableCache:  # e.g. linear-attention layers: the dynamic cache, cropped per round
                pass
        return TargetWithAux(model, drafter.cfg.aux_layer_ids)

    try:
        batched_target = None
        if batch_size > 1:
            try:
                batched_target = BatchedTarget(model, drafter.cfg.aux_layer_ids)
            except Unbatchable:  # sliding windows, softcapping...: the speculative runs go one turn at a time
                pass
        # batched, the batch-1 path only decides the rare turns whose batched outputs differ: not worth a compile
        one_at_a_time_compiled = bool(compile and static and batched_target is None)
        target_aux = make_target(cache_len)
    except ValueError as e:  # no text decoder found, or aux ids outside it: one line naming the target
        raise StageError(f"{target}: {e}") from None
    # the greedy reference is transformers' own generate() on its default dynamic cache: the most independent
    # reference, and on the CPUs measured a static cache with a compiled decode step was no faster at batch 1
    # and slower batched (README, regenerate's Measured)
    engine = {"static_cache": isinstance(target_aux, StaticTarget), "compile": one_at_a_time_compiled,
              "cache_length": cache_len if static else None, "batch_size": batch_size,
              "batched_speculative": batched_target is not None}

    def fit(ids: list[int]) -> None:
        """A larger static cache (and new compiles) for a turn longer than the bound (re-tokenized answers)."""
        nonlocal target_aux
        needed = len(ids) + max_new_tokens + max(ks) + 1
        if isinstance(target_aux, StaticTarget) and needed > target_aux.max_len:
            target_aux.remove()
            engine["cache_length"] = bucket(needed)
            target_aux = make_target(engine["cache_length"])

    def alone(ids: list[int], new_tokens: int = max_new_tokens):
        """One turn by itself: the reference (seconds) and the speculative run of each K (batch 1)."""
        fit(ids)
        reference = greedy_generate(model, ids, max_new_tokens=new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                                    device=device)
        return reference, {k: speculative_generate(target_aux, drafter, ids, max_new_tokens=new_tokens,
                                                   draft_tokens=k, eos_ids=eos_ids, device=device) for k in ks}

    def together(prompts: list[list[int]], new_tokens: int = max_new_tokens):
        """Several turns at once: batched references, and batched speculative runs (one turn at a time for a
        target that cannot batch them). Per turn (reference, None) and {K: result}; the seconds of each part."""
        rows, ref_seconds = greedy_generate_batch(model, prompts, max_new_tokens=new_tokens, eos_ids=eos_ids,
                                                  pad_id=pad_id, device=device)
        specs, spec_seconds = {}, {}
        for k in ks:
            if batched_target is not None:
                specs[k], spec_seconds[k] = speculative_generate_batch(
                    batched_target, drafter, prompts, max_new_tokens=new_tokens, draft_tokens=k,
                    eos_ids=eos_ids, pad_id=pad_id, device=device)
            else:
                for ids in prompts:
                    fit(ids)
                specs[k] = [speculative_generate(target_aux, drafter, ids, max_new_tokens=new_tokens,
                                                 draft_tokens=k, eos_ids=eos_ids, device=device) for ids in prompts]
                spec_seconds[k] = sum(spec.seconds for spec in specs[k])
        turns = [((row, None), {k: specs[k][n] for k in ks}) for n, row in enumerate(rows)]
        return turns, ref_seconds, spec_seconds

    try:
        # warm-up outside the timings (first-call allocations, lazy inits, and the compiles)
        started = time.perf_counter()
        warm = render_prompt(tokenizer, questions[0].conversation([]), questions[0].where)
        alone(warm, new_tokens=2)
        if batch_size > 1:
            together([warm] * min(batch_size, len(questions)), new_tokens=2)
        warmup_seconds = time.perf_counter() - started
        runs = {k: [] for k in ks}
        mismatches = {k: [] for k in ks}
        totals = {"reference_seconds": 0.0, "reference_tokens": 0, "rerun_alone": 0,
                  "speculative_seconds": {k: 0.0 for k in ks}}
        progress = tqdm(total=sum(len(q.user_turns) for q in questions), desc="eval", unit="turn",
                        dynamic_ncols=True)
        for first_question in range(0, len(questions), batch_size):
            group = range(first_question, min(first_question + batch_size, len(questions)))
            answers = {i: [] for i in group}  # the target's own answers to the turns so far
            for turn in range(1, max(len(questions[i].user_turns) for i in group) + 1):
                active = [i for i in group if len(questions[i].user_turns) >= turn]
                prompts = {i: render_prompt(tokenizer, questions[i].conversation(answers[i]), questions[i].where)
                           for i in active}
                if batch_size == 1:
                    results = {i: alone(prompts[i]) for i in active}
                else:
                    turns, ref_seconds, spec_seconds = together([prompts[i] for i in active])
                    results = dict(zip(active, turns))
                    totals["reference_seconds"] += ref_seconds
                    totals["reference_tokens"] += sum(len(ref) for (ref, _), _ in turns)
                    for k in ks:
                        totals["speculative_seconds"][k] += spec_seconds[k]
                for i in active:
                    q, ids = questions[i], prompts[i]
                    (reference, seconds), specs = results[i]
                    if seconds is None and any(spec.tokens != reference for spec in specs.values()):
                        # batched rows are another float rounding of the same greedy decodes: where they differ,
                        # the turn is decided alone, exactly as --batch-size 1 decides it
                        (reference, seconds), specs = alone(ids)
                        totals["rerun_alone"] += 1
                        totals["reference_seconds"] += seconds
                        totals["reference_tokens"] += len(reference)
                        for k in ks:
                            totals["speculative_seconds"][k] += specs[k].seconds
                        seconds = None  # not a batch-1 baseline of the whole run
                    for k, spec in specs.items():
                        runs[k].append({"question": i, "where": q.where, "question_id": q.question_id,
                                        "category": q.category, "turn": turn, "prompt_tokens": len(ids),
                                        "accepted": spec.accepted, "new_tokens": len(spec.tokens),
                                        "baseline_new_tokens": len(reference),
                                        "seconds": spec.seconds if batch_size == 1 else None,
                                        "baseline_seconds": seconds})
                        if batch_size == 1:
                            totals["speculative_seconds"][k] += spec.seconds
                        if spec.tokens != reference:
                            diff = next((j for j, (a, b) in enumerate(zip(spec.tokens, reference)) if a != b),
                                        min(len(spec.tokens), len(reference)))
                            mismatches[k].append({"prompt": i, "turn": turn, "where": q.where,
                                                  "first_difference": diff, "speculative_len": len(spec.tokens),
                                                  "reference_len": len(reference)})
                    if batch_size == 1:
                        totals["reference_seconds"] += seconds
                        totals["reference_tokens"] += len(reference)
                    # the next turn follows the target's own answer (equal to the speculative one when lossless)
                    answers[i].append(answer_text(tokenizer, reference, eos_ids))
                progress.update(len(active))  # batched, a whole group's turns at once (so the bar's rate is right)
        for k in ks:  # question order, then turn order, whatever the batching
            runs[k].sort(key=lambda r: (r["question"], r["turn"]))
            mismatches[k].sort(key=lambda m: (m["prompt"], m["turn"]))
        progress.close()
    finally:
        target_aux.remove()
        if batched_target is not None:
            batched_target.remove()

    common = {"target": str(target), "draft": str(draft), "draft_format": drafter.draft_format,
              "data": [str(d) for d in data],
              "num_prompts": len(questions), "skipped_records": skipped, "skipped_examples": _skip_examples(skips),
              "max_new_tokens": max_new_tokens, "device": device, "dtype": str(torch_dtype).replace("torch.", ""),
              "engine": engine, "warmup_seconds": warmup_seconds, "batch_size": batch_size,
              "reference_seconds": totals["reference_seconds"], "reference_tokens": totals["reference_tokens"],
              **({"references": {"rerun_alone": totals["rerun_alone"]}} if batch_size > 1 else {"references": {}})}
    reports = {k: _report(common, runs[k], mismatches[k], k, simulated[k], totals["speculative_seconds"][k])
               for k in ks}
    report = reports[ks[0]]
    if len(ks) > 1:
        report = {**report, "lossless": all(r["lossless"] for r in reports.values()),
                  "draft_tokens_list": ks, "by_draft_tokens": {str(k): r for k, r in reports.items()}}
    return report


def _report(common: dict, runs: list[dict], mismatches: list[dict], k: int, simulated,
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


def _skip_examples(skips, per_reason: int = 3) -> list[dict]:
    """The first few skipped records of each reason, with their location."""
    shown: Counter = Counter()
    out = []
    for s in skips:
        if shown[s.reason] < per_reason:
            shown[s.reason] += 1
            out.append({"where": s.where, "reason": s.reason, "message": s.message})
    return out


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def _speedup(value) -> str:
    return _fmt(value, ".2f") + "x" if value else "-"


def format_report(r: dict) -> str:
    """The readable report `eagle-pipe eval` prints: totals, then acceptance length per category and per turn
    (one such block per K when several were measured)."""
    if "by_draft_tokens" in r:
        return "\n\n".join(f"== K = {k}\n" + _format_one(sub) for k, sub in r["by_draft_tokens"].items())
    return _format_one(r)


def _format_one(r: dict) -> str:
    k = r["draft_tokens"]
    t = r["timing"]
    prompts = f"{r['num_prompts']}" + (f" ({r['num_turns']} turns)" if r["num_turns"] != r["num_prompts"] else "")
    rows = [
        ("draft format", r["draft_format"]),
        ("prompts", prompts + (f" (skipped: {r['skipped_records']})" if r["skipped_records"] else "")),
        ("draft tokens K", str(k)),
        ("batch size", str(r["batch_size"]) + (f" ({t['rerun_alone']} turn(s) decided alone)"
                                                if t.get("rerun_alone") else "")),
        ("target forwards (decode)", str(r["target_forwards"])),
        ("acceptance length", _fmt(r["acceptance_length"])),
        ("  per draft position", "  ".join(f"{i + 1}: {_fmt(a)}" for i, a in enumerate(r["per_position_acceptance"]))),
        ("  conditional", "  ".join(f"{i + 1}: {_fmt(a)}" for i, a in enumerate(r["per_position_conditional"]))),
        ("simulated (training)", _fmt(r["simulated_acceptance_length"])),
        ("tokens/s speculative", _fmt(r["tokens_per_s"], ".1f")),
        ("tokens/s target alone", _fmt(r["baseline_tokens_per_s"], ".1f")),
        ("speedup", _speedup(r["speedup"])),
        ("seconds per turn", f"{_fmt(t['seconds_per_turn'], '.2f')} speculative, "
                             f"{_fmt(t['baseline_seconds_per_turn'], '.2f')} target alone"),
        *([("ms per target forward",
             f"{_fmt(t['seconds_per_target_forward'] and 1e3 * t['seconds_per_target_forward'], '.1f')} speculative, "
             f"{_fmt(t['baseline_seconds_per_token'] and 1e3 * t['baseline_seconds_per_token'], '.1f')} target alone")]
          if r["batch_size"] == 1 else []),  # batched, one forward serves several turns
        ("warm-up (compile)", f"{t['warmup_seconds']:.1f} s"),
        ("lossless", "yes" if r["lossless"] else f"NO ({len(r['mismatches'])} prompt(s) differ)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    overall = {"questions": r["num_prompts"], "turns": r["num_turns"], "target_forwards": r["target_forwards"],
               "acceptance_length": r["acceptance_length"], "speedup": r["speedup"]}
    lines += ["", *_group_table("category", {**r["per_category"], "overall": overall})]
    if len(r["per_turn"]) > 1:
        lines += ["", *_group_table("turn", {**r["per_turn"], "overall": overall})]
    for s in r["skipped_examples"]:
        lines.append(f"skipped {s['where']}: {s['reason']}: {s['message']}")
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


@click.command("eval")
@click.option("--target", required=True, help="Target model: a local Hugging Face directory or hub id.")
@click.option("--draft", required=True, type=click.Path(file_okay=False),
              help="Draft directory (config.json + model.safetensors), e.g. RUN/export, or a Model-Optimizer, "
                   "speculators or LlamaForCausalLMEagle3 export.")
@click.option("--data", multiple=True, required=True,
              help="Conversations (prompt: up to the first user turn) or benchmark questions: MT-bench / Spec-Bench / "
                   "EAGLE question.jsonl (every turn), GSM8K, HumanEval (JSONL/JSON/Parquet/datasets).")
@click.option("--num-prompts", type=click.IntRange(min=1), default=32,
              help="Questions to evaluate, in file order; a multi-turn question counts once, all its turns run.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, help="New tokens per prompt at most.")
@click.option("--draft-tokens", type=DraftTokensType(), default="3",
              help="K: draft tokens per target forward; several (3,5) share one greedy reference per turn.")
@click.option("--dtype", default="auto", help="Target dtype: bfloat16|float16|float32 (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--device", default="auto", help="cuda / cpu (auto: cuda if available).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Train run directory: also report the simulated acceptance length from its metrics.")
@click.option("--json", "json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Also write the full JSON report to this file (written before a failed lossless check exits).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the target's own modelling code (only if you trust it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1,
              help="Decode N questions at a time: the greedy references (one batched generate() per turn) and the "
                   "speculative runs (one batched verification per round). A turn whose batched outputs differ is "
                   "decided alone, as at 1. Speeds then compare both at batch N. On a 2-core CPU, 40 ran all 80 "
                   "MT-bench questions with SmolLM2-135M in 427 s, against 1042 s one speculative run at a time.")
@click.option("--reference-batch", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated: --batch-size (which now batches the speculative runs too).")
@click.option("--compile/--no-compile", default=True,
              help="Compile the batch-1 speculative run's K+1-token verification step on its static KV cache "
                   "(once per K; same tokens). The greedy reference is always transformers' plain generate().")
def command(target, draft, data, num_prompts, max_new_tokens, draft_tokens, dtype, device, run_dir, json,
            report, trust_remote_code, batch_size, reference_batch, compile):
    """Measure acceptance length with real speculative decoding; check it is lossless against generate()."""
    if reference_batch is not None:
        click.echo("eval: --reference-batch / reference_batch is deprecated; it now means --batch-size "
                   "(the speculative runs are batched too)", err=True)
        batch_size = reference_batch
    result = evaluate(target, draft, list(data), num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                      draft_tokens=draft_tokens, dtype=dtype, device=device, run_dir=run_dir,
                      trust_remote_code=trust_remote_code, compile=compile, batch_size=batch_size)
    if report:
        write_report(result, Path(report))
    click.echo(jsonlib.dumps(result) if json else format_report(result))
    if not result["lossless"]:
        failing = next(r for r in result.get("by_draft_tokens", {"": result}).values() if not r["lossless"])
        first = failing["mismatches"][0]
        turn = "" if first["turn"] == 1 else f", turn {first['turn']}"
        raise StageError(
            f"lossless check failed on {len(failing['mismatches'])} prompt(s) at K={failing['draft_tokens']}: "
            f"prompt {first['prompt']} "
            f"({first['where']}{turn}) differs from the target's greedy generate() at new token "
            f"{first['first_difference']}")
    return result
