"""Stage `eval`: a draft's measured acceptance length with real speculative decoding, and a lossless check.

For each prompt (a conversation up to and including its first user turn, rendered with the chat template and
the generation prompt, in file order) the target generates greedily twice: with its own `generate()` (the
reference output and the baseline speed) and with greedy chain speculative decoding driven by the exported
draft (stages/speculative.py). The two outputs must be equal token for token; any difference is an error naming
the prompt. Acceptance length = tokens produced per target forward in the decode phase, bonus token included
(= 1 + the sum of the per-position acceptance rates).
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
def first_user_turn(messages: list[dict]) -> list[dict] | None:
    """The conversation up to and including its first user turn (leading system turns kept), or None."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return messages[: i + 1]
    return None


def load_prompts(sources, tokenizer, num_prompts: int | None) -> tuple[list[tuple[str, list[int]]], Counter]:
    """[(where, prompt token ids)] for the first `num_prompts` usable records, and skip counts by reason."""
    from stages.records import RecordError, parse_record, read_records

    prompts, skipped = [], Counter()
    for _, where, record in read_records(list(sources)):
        if num_prompts is not None and len(prompts) >= num_prompts:
            break
        try:
            kind, payload = parse_record(record)
        except RecordError as e:
            skipped[e.reason] += 1
            continue
        turns = first_user_turn(payload) if kind == "chat" else None
        if turns is None:
            skipped["no_user_turn"] += 1
            continue
        try:
            ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        except Exception as e:  # a template that rejects the conversation: bad input, named
            raise StageError(f"{where}: chat template failed: {e}") from None
        prompts.append((where, list(ids)))
    return prompts, skipped


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
    try:
        draft = load_draft(draft_dir, embed_weight=embed, device=device)
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


# ------------------------------------------------------------------------------------------------ the run
def evaluate(target: str, draft: str, data, *, num_prompts=32, max_new_tokens=128, draft_tokens=3, dtype=None,
             device=None, run_dir=None, trust_remote_code=False) -> dict:
    """Speculative vs plain greedy decoding over the prompts; returns the report dict (see `command`)."""
    import torch
    from tqdm import tqdm

    from stages.speculative import TargetWithAux, greedy_generate, speculative_generate

    if draft_tokens < 1:
        raise StageError(f"--draft-tokens {draft_tokens}: must be at least 1")
    if max_new_tokens < 1:
        raise StageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not data:
        raise StageError("eval needs --data (a file with conversations)")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model, tokenizer = load_target(target, torch_dtype, device, trust_remote_code)
    drafter = load_draft_for(model, draft, device)
    prompts, skipped = load_prompts(data, tokenizer, num_prompts)
    if not prompts:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "no records"
        raise StageError(f"{', '.join(map(str, data))}: no record with a user turn to use as a prompt "
                         f"(skipped: {why})")
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    simulated = simulated_acceptance_from_run(run_dir, draft_tokens) if run_dir else None

    try:
        target_aux = TargetWithAux(model, drafter.cfg.aux_layer_ids)
    except ValueError as e:  # no text decoder found, or aux ids outside it: one line naming the target
        raise StageError(f"{target}: {e}") from None
    try:
        # warm-up outside the timings (first-call allocations, lazy inits)
        greedy_generate(model, prompts[0][1], max_new_tokens=2, eos_ids=eos_ids, pad_id=pad_id, device=device)
        speculative_generate(target_aux, drafter, prompts[0][1], max_new_tokens=2, draft_tokens=draft_tokens,
                             eos_ids=eos_ids, device=device)
        accepted, mismatches = [], []
        spec_tokens = spec_seconds = base_tokens = base_seconds = 0
        for i, (where, ids) in enumerate(tqdm(prompts, desc="eval", unit="prompt", dynamic_ncols=True)):
            reference, seconds = greedy_generate(model, ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                                 pad_id=pad_id, device=device)
            base_tokens += len(reference)
            base_seconds += seconds
            spec = speculative_generate(target_aux, drafter, ids, max_new_tokens=max_new_tokens,
                                        draft_tokens=draft_tokens, eos_ids=eos_ids, device=device)
            spec_tokens += len(spec.tokens)
            spec_seconds += spec.seconds
            accepted += spec.accepted
            if spec.tokens != reference:
                first = next((j for j, (a, b) in enumerate(zip(spec.tokens, reference)) if a != b),
                             min(len(spec.tokens), len(reference)))
                mismatches.append({"prompt": i, "where": where, "first_difference": first,
                                   "speculative_len": len(spec.tokens), "reference_len": len(reference)})
    finally:
        target_aux.remove()

    report = {
        "target": str(target), "draft": str(draft), "data": [str(d) for d in data],
        "num_prompts": len(prompts), "skipped_records": dict(skipped), "draft_tokens": draft_tokens,
        "max_new_tokens": max_new_tokens, "device": device, "dtype": str(torch_dtype).replace("torch.", ""),
        **acceptance_stats(accepted, draft_tokens),
        "simulated_acceptance_length": simulated,
        "lossless": not mismatches, "mismatches": mismatches,
        "new_tokens": spec_tokens, "baseline_new_tokens": base_tokens,
        "tokens_per_s": spec_tokens / spec_seconds if spec_seconds else None,
        "baseline_tokens_per_s": base_tokens / base_seconds if base_seconds else None,
    }
    report["speedup"] = (report["tokens_per_s"] / report["baseline_tokens_per_s"]
                         if report["tokens_per_s"] and report["baseline_tokens_per_s"] else None)
    return report


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(r: dict) -> str:
    """The readable table `eagle-pipe eval` prints."""
    k = r["draft_tokens"]
    rows = [
        ("prompts", f"{r['num_prompts']}" + (f" (skipped: {r['skipped_records']})" if r["skipped_records"] else "")),
        ("draft tokens K", str(k)),
        ("target forwards (decode)", str(r["target_forwards"])),
        ("acceptance length", _fmt(r["acceptance_length"])),
        ("  per draft position", "  ".join(f"{i + 1}: {_fmt(a)}" for i, a in enumerate(r["per_position_acceptance"]))),
        ("  conditional", "  ".join(f"{i + 1}: {_fmt(a)}" for i, a in enumerate(r["per_position_conditional"]))),
        ("simulated (training)", _fmt(r["simulated_acceptance_length"])),
        ("tokens/s speculative", _fmt(r["tokens_per_s"], ".1f")),
        ("tokens/s target alone", _fmt(r["baseline_tokens_per_s"], ".1f")),
        ("speedup", _fmt(r["speedup"], ".2f") + "x" if r["speedup"] else "-"),
        ("lossless", "yes" if r["lossless"] else f"NO ({len(r['mismatches'])} prompt(s) differ)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@click.command("eval")
@click.option("--target", required=True, help="Target model: a local Hugging Face directory or hub id.")
@click.option("--draft", required=True, type=click.Path(file_okay=False),
              help="Exported draft directory (config.json + model.safetensors), e.g. RUN/export.")
@click.option("--data", multiple=True, required=True,
              help="Conversations (JSONL/JSON/Parquet/datasets); each gives the prompt up to its first user turn.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=32, help="Prompts to evaluate, in file order.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, help="New tokens per prompt at most.")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=3, help="K: draft tokens per target forward.")
@click.option("--dtype", default="auto", help="Target dtype: bfloat16|float16|float32 (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--device", default="auto", help="cuda / cpu (auto: cuda if available).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Train run directory: also report the simulated acceptance length from its metrics.")
@click.option("--json", "json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the target's own modelling code (only if you trust it).")
def command(target, draft, data, num_prompts, max_new_tokens, draft_tokens, dtype, device, run_dir, json,
            trust_remote_code):
    """Measure acceptance length with real speculative decoding; check it is lossless against generate()."""
    report = evaluate(target, draft, list(data), num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                      draft_tokens=draft_tokens, dtype=dtype, device=device, run_dir=run_dir,
                      trust_remote_code=trust_remote_code)
    click.echo(jsonlib.dumps(report) if json else format_report(report))
    if not report["lossless"]:
        first = report["mismatches"][0]
        raise StageError(
            f"lossless check failed on {len(report['mismatches'])} prompt(s): prompt {first['prompt']} "
            f"({first['where']}) differs from the target's greedy generate() at new token "
            f"{first['first_difference']}")
    return report
