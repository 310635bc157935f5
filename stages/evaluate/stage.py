"""Stage `eval`: a draft's measured acceptance length with real speculative decoding, and a lossless check.

For each turn of each question (stages/data/prompts.py: a conversation up to its first user turn, or a benchmark
question of one or more turns, in file order; later turns follow the target's own earlier answers), rendered with
the chat template and the generation prompt, the target generates greedily twice: with its own `generate()` (the
reference output and the baseline speed) and with greedy chain speculative decoding driven by the exported
draft (stages/evaluate/speculative.py). The two outputs must be equal token for token; any difference is an error naming
the prompt. Acceptance length = tokens produced per target forward in the decode phase, bonus token included
(= 1 + the sum of the per-position acceptance rates), pooled over all, per category and per turn.

`--engine hf` (default) decodes in transformers (stages/evaluate/hf_engine.py); `--engine vllm` serves the draft
in vLLM's speculative decoding on the same prompt token ids, lossless against vLLM's own greedy decode, acceptance
from vLLM's spec-decode counters (stages/evaluate/vllm_engine.py). Both go through the same turn loop
(turns.py) and report (report.py).
"""
from __future__ import annotations

import json as jsonlib
from pathlib import Path

import click

from stages.errors import StageError
from stages.evaluate.options import EvalOptions, parse_draft_tokens
from stages.evaluate.questions import cache_length_bound, load_prompts, render_prompt, require_questions
from stages.evaluate.report import (build_report, combine_reports, format_report, simulated_acceptance_from_run,
                                    skip_examples, write_report)
from stages.options import click_options, split_options
from stages.target import eos_token_ids, load_target, resolve_device, resolve_dtype
from stages.vllm_runtime import VllmOptions, vllm_options


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
    draft_config = draft.cfg
    target_config = target_model.config.get_text_config()  # a multimodal checkpoint: its text model
    if draft_config.vocab_size != embed.shape[0] or draft_config.target_hidden_size != target_config.hidden_size:
        raise StageError(f"{draft_dir}: draft was made for another target (vocab {draft_config.vocab_size}, hidden "
                         f"{draft_config.target_hidden_size}; target has {embed.shape[0]}, "
                         f"{target_config.hidden_size})")
    return draft.eval()


# ------------------------------------------------------------------------------------------------ the run
def evaluate(options: EvalOptions, vllm: VllmOptions | None = None) -> dict:
    """Speculative vs plain greedy decoding over the questions' turns; returns the report dict (see `command`).

    `options` are eval's own (EvalOptions: their defaults are the command's); `vllm` the shared vLLM flags for
    `engine` "vllm", which measures the draft in vLLM instead (stages/evaluate/vllm_engine.py). Several
    `draft_tokens` K share one greedy reference per turn; the report is then the first K's (today's keys) plus
    `by_draft_tokens` {K: report}. `batch_size` > 1 decodes that many questions at a time, references and
    speculative runs (with vLLM: its max_num_seqs, None = vLLM's default)."""
    import time

    from tqdm import tqdm

    from stages.data.records import summarize_skips
    from stages.evaluate.dflash_decoding import dflash_draft_tokens, is_dflash_draft
    from stages.evaluate.hf_engine import HFDecoder
    from stages.evaluate.turns import decoded_turns, turn_runs
    from stages.static_cache import bucket

    dflash = is_dflash_draft(options.draft)  # a DFlash draft drafts its block's K (dflash_decoding.py)
    draft_token_counts = dflash_draft_tokens(options.draft, options.draft_tokens) if dflash else \
        parse_draft_tokens(3 if options.draft_tokens is None else options.draft_tokens)
    if options.batch_size is not None and options.batch_size < 1:
        raise StageError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.max_new_tokens < 1:
        raise StageError(f"--max-new-tokens {options.max_new_tokens}: must be at least 1")
    if not options.data:
        raise StageError("eval needs --data (a file with conversations or benchmark questions)")
    if options.engine == "vllm":
        from stages.evaluate.vllm_engine import evaluate_vllm

        return evaluate_vllm(options, draft_token_counts, vllm)
    if options.engine != "hf":
        raise StageError(f"--engine {options.engine!r}: expected hf or vllm")
    target, draft, data = options.target, options.draft, list(options.data)
    batch_size, max_new_tokens = options.batch_size or 1, options.max_new_tokens
    device = resolve_device(options.device)
    torch_dtype = resolve_dtype(options.dtype, device)
    model, tokenizer = load_target(target, torch_dtype, device, options.trust_remote_code)
    drafter = load_draft_for(model, draft, device)
    generate = None
    if dflash:  # its own block drafting, one turn at a time
        if batch_size > 1:
            raise StageError(f"--batch-size {batch_size}: the HF engine decodes a DFlash draft one turn at a time "
                             "(--batch-size 1), or serve it batched with --engine vllm")
        from stages.evaluate.dflash_decoding import dflash_speculative_generate as generate
    questions, skips = load_prompts(data, tokenizer, options.num_prompts)
    require_questions(data, questions, skips)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    simulated = {k: simulated_acceptance_from_run(options.run_dir, k) if options.run_dir else None
                 for k in draft_token_counts}

    cache_len = bucket(cache_length_bound(questions, tokenizer, max_new_tokens, max(draft_token_counts)))
    decoder = HFDecoder(model, drafter, draft_token_counts, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                        pad_id=pad_id, device=device, batch_size=batch_size, compile=options.compile,
                        where=str(target), cache_len=cache_len, speculative_generate=generate)
    try:
        # warm-up outside the timings (first-call allocations, lazy inits, and the compiles)
        started = time.perf_counter()
        decoder.warm_up(render_prompt(tokenizer, questions[0].conversation([]), questions[0].where), len(questions))
        warmup_seconds = time.perf_counter() - started
        progress = tqdm(total=sum(len(q.user_turns) for q in questions), desc="eval", unit="turn",
                        dynamic_ncols=True)
        records = list(decoded_turns(questions, tokenizer, decoder.decode, group_size=batch_size, eos_ids=eos_ids,
                                     progress=progress))
        progress.close()
    finally:
        decoder.close()

    totals = decoder.totals
    common = {"target": str(target), "draft": str(draft), "draft_format": drafter.draft_format,
              "data": [str(d) for d in data],
              "num_prompts": len(questions), "skipped_records": summarize_skips(skips),
              "skipped_examples": skip_examples(skips),
              "max_new_tokens": max_new_tokens, "device": device, "dtype": str(torch_dtype).replace("torch.", ""),
              "engine": decoder.describe(), "warmup_seconds": warmup_seconds, "batch_size": batch_size,
              "reference_seconds": totals["reference_seconds"], "reference_tokens": totals["reference_tokens"],
              **({"references": {"rerun_alone": totals["rerun_alone"]}} if batch_size > 1 else {"references": {}})}
    reports = {k: {**build_report(common, *turn_runs(records, questions, k), k, simulated[k],
                                  totals["speculative_seconds"][k]), "engine": "hf"} for k in draft_token_counts}
    return combine_reports(reports, draft_token_counts)


@click.command("eval")
@click_options(EvalOptions)
@vllm_options
def command(**options):
    """Measure acceptance length with real speculative decoding; check it is lossless against generate()."""
    eval_options, vllm_params = split_options(EvalOptions, options)
    vllm = VllmOptions.from_params(vllm_params) if eval_options.engine == "vllm" else None
    result = evaluate(eval_options, vllm)
    if eval_options.report:
        write_report(result, Path(eval_options.report))
    click.echo(jsonlib.dumps(result) if eval_options.json else format_report(result))
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
