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
from pathlib import Path

import click

from stages.errors import StageError
from stages.evaluate.questions import cache_length_bound, load_prompts, render_prompt, require_questions
from stages.evaluate.report import (acceptance_stats, build_report, format_report, group_stats,
                                    simulated_acceptance_from_run, skip_examples, write_report)
from stages.vllm_runtime import vllm_options

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


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
    from stages.evaluate.dflash_decoding import is_dflash_draft, load_dflash_for

    if not (Path(draft_dir) / "config.json").is_file():
        raise StageError(f"{draft_dir}: not an exported draft (no config.json)")
    if is_dflash_draft(draft_dir):
        return load_dflash_for(target_model, draft_dir, device)
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


def evaluate(target: str, draft: str, data, *, num_prompts=32, max_new_tokens=128, draft_tokens=None, dtype=None,
             device=None, run_dir=None, trust_remote_code=False, compile=True, batch_size=1, engine="hf",
             vllm=None) -> dict:
    """Speculative vs plain greedy decoding over the questions' turns; returns the report dict (see `command`).

    `draft_tokens` may be a list of K: every turn then has one greedy reference, shared by the speculative runs
    at each K, and the report is the first K's (today's keys) plus `by_draft_tokens` {K: report}.
    `batch_size` > 1 decodes that many questions at a time, references and speculative runs (see `command`).
    `engine` "vllm" measures the draft in vLLM instead (stages/evaluate/vllm_engine.py; `vllm`: its VllmOptions,
    `batch_size`: vLLM's max_num_seqs, None = vLLM's default)."""
    import time

    from tqdm import tqdm

    from stages.data.prompts import answer_text
    from stages.data.records import summarize_skips
    from stages.evaluate.batched import BatchedTarget, Unbatchable, speculative_generate_batch
    from stages.evaluate.speculative import (TargetWithAux, greedy_generate, greedy_generate_batch,
                                             speculative_generate)
    from stages.evaluate.static_target import StaticTarget, UncroppableCache
    from stages.static_cache import bucket, supports_static_cache

    from stages.evaluate.dflash_decoding import dflash_draft_tokens, is_dflash_draft

    dflash = is_dflash_draft(draft)  # a DFlash draft drafts its block's K (stages/evaluate/dflash_decoding.py)
    ks = dflash_draft_tokens(draft, draft_tokens) if dflash else \
        parse_draft_tokens(3 if draft_tokens is None else draft_tokens)
    if batch_size is not None and batch_size < 1:
        raise StageError(f"--batch-size {batch_size}: must be at least 1")
    if max_new_tokens < 1:
        raise StageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not data:
        raise StageError("eval needs --data (a file with conversations or benchmark questions)")
    if engine == "vllm":
        from stages.evaluate.vllm_engine import evaluate_vllm

        return evaluate_vllm(target, draft, data, ks=ks, num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                             dtype=dtype, device=device, run_dir=run_dir, trust_remote_code=trust_remote_code,
                             batch_size=batch_size, vllm=vllm)
    if engine != "hf":
        raise StageError(f"--engine {engine!r}: expected hf or vllm")
    batch_size = batch_size or 1
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model, tokenizer = load_target(target, torch_dtype, device, trust_remote_code)
    drafter = load_draft_for(model, draft, device)
    if dflash:  # its own block drafting, one turn at a time
        if batch_size > 1:
            raise StageError(f"--batch-size {batch_size}: the HF engine decodes a DFlash draft one turn at a time "
                             "(--batch-size 1), or serve it batched with --engine vllm")
        from stages.evaluate.dflash_decoding import dflash_speculative_generate as speculative_generate
    questions, skips = load_prompts(data, tokenizer, num_prompts)
    require_questions(data, questions, skips)
    skipped = summarize_skips(skips)
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
    # and slower batched (docs/regenerate.md, "Measured")
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
                                        "baseline_seconds": seconds, "output_tokens": spec.tokens})
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
              "num_prompts": len(questions), "skipped_records": skipped, "skipped_examples": skip_examples(skips),
              "max_new_tokens": max_new_tokens, "device": device, "dtype": str(torch_dtype).replace("torch.", ""),
              "engine": engine, "warmup_seconds": warmup_seconds, "batch_size": batch_size,
              "reference_seconds": totals["reference_seconds"], "reference_tokens": totals["reference_tokens"],
              **({"references": {"rerun_alone": totals["rerun_alone"]}} if batch_size > 1 else {"references": {}})}
    reports = {k: {**build_report(common, runs[k], mismatches[k], k, simulated[k], totals["speculative_seconds"][k]),
                   "engine": "hf"} for k in ks}
    report = reports[ks[0]]
    if len(ks) > 1:
        report = {**report, "lossless": all(r["lossless"] for r in reports.values()),
                  "draft_tokens_list": ks, "by_draft_tokens": {str(k): r for k, r in reports.items()}}
    return report



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
@click.option("--draft-tokens", type=DraftTokensType(), default=None,
              help="K: draft tokens per target forward; several (3,5) share one greedy reference per turn "
                   "[default: 3; a DFlash draft: its block size - 1, the only K it takes].")
@click.option("--dtype", default="auto", help="Target dtype: bfloat16|float16|float32 (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--device", default="auto", help="cuda / cpu (auto: cuda if available).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Train run directory: also report the simulated acceptance length from its metrics.")
@click.option("--json", "json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Also write the full JSON report to this file (written before a failed lossless check exits).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the target's own modelling code (only if you trust it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Decode N questions at a time: the greedy references (one batched generate() per turn) and the "
                   "speculative runs (one batched verification per round). A turn whose batched outputs differ is "
                   "decided alone, as at 1. Speeds then compare both at batch N (measured: docs/eval.md#batched). "
                   "[default: 1; with --engine vllm: vLLM's max_num_seqs, default vLLM's own]")
@click.option("--engine", type=click.Choice(["hf", "vllm"]), default="hf",
              help="hf: eagle-pipe's own speculative decoding in transformers; vllm: the draft served in vLLM's "
                   "speculative decoding (served acceptance from vLLM's spec-decode counters; lossless against "
                   "vLLM's greedy decode without the draft). Both see the same prompt token ids.")
@click.option("--compile/--no-compile", default=True,
              help="Compile the batch-1 speculative run's K+1-token verification step on its static KV cache "
                   "(once per K; same tokens). The greedy reference is always transformers' plain generate().")
@vllm_options
def command(target, draft, data, num_prompts, max_new_tokens, draft_tokens, dtype, device, run_dir, json,
            report, trust_remote_code, batch_size, engine, compile, **vllm_params):
    """Measure acceptance length with real speculative decoding; check it is lossless against generate()."""
    from stages.vllm_runtime import VllmOptions

    if engine == "hf":
        batch_size = batch_size or 1
    result = evaluate(target, draft, list(data), num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                      draft_tokens=draft_tokens, dtype=dtype, device=device, run_dir=run_dir,
                      trust_remote_code=trust_remote_code, compile=compile, batch_size=batch_size, engine=engine,
                      vllm=VllmOptions.from_params(vllm_params) if engine == "vllm" else None)
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
