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
from stages.evaluate.questions import cache_length_bound, load_prompts, render_prompt, require_questions
from stages.evaluate.report import (acceptance_stats, build_report, combine_reports, format_report, group_stats,
                                    simulated_acceptance_from_run, skip_examples, write_report)
from stages.target import eos_token_ids, load_target, resolve_device, resolve_dtype
from stages.vllm_runtime import vllm_options


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

    from stages.data.records import summarize_skips
    from stages.evaluate.dflash_decoding import dflash_draft_tokens, is_dflash_draft
    from stages.evaluate.hf_engine import HFDecoder
    from stages.evaluate.turns import decoded_turns, turn_runs
    from stages.static_cache import bucket

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
    generate = None
    if dflash:  # its own block drafting, one turn at a time
        if batch_size > 1:
            raise StageError(f"--batch-size {batch_size}: the HF engine decodes a DFlash draft one turn at a time "
                             "(--batch-size 1), or serve it batched with --engine vllm")
        from stages.evaluate.dflash_decoding import dflash_speculative_generate as generate
    questions, skips = load_prompts(data, tokenizer, num_prompts)
    require_questions(data, questions, skips)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    simulated = {k: simulated_acceptance_from_run(run_dir, k) if run_dir else None for k in ks}

    decoder = HFDecoder(model, drafter, ks, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                        device=device, batch_size=batch_size, compile=compile, where=str(target),
                        cache_len=bucket(cache_length_bound(questions, tokenizer, max_new_tokens, max(ks))),
                        speculative_generate=generate)
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
                                  totals["speculative_seconds"][k]), "engine": "hf"} for k in ks}
    return combine_reports(reports, ks)


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
