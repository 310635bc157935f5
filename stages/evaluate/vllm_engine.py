"""`eagle-pipe eval --engine vllm`: a draft measured the way users serve it, in vLLM's speculative decoding.

The questions, turns and rendered prompt token ids are eval's own (stages/evaluate/stage.py), passed to vLLM as
token ids so both engines see identical prompts. Two offline `vllm.LLM` engines run one after the other (the
first is shut down before the second starts):
  1. the target alone, greedy: the reference outputs (and the baseline speed); a question's later turns follow
     these answers, as in the HF eval;
  2. the target with the draft (`speculative_config = {"method": eagle3 | dflash (from the draft's config.json),
     "model": draft_dir, "num_speculative_tokens": K}`), greedy, on the same prompts: one engine per K.
Stopping is eval's rule on both: `ignore_eos=True` with `stop_token_ids` = the target's end-of-sequence ids
(generation_config, then the model config, then the tokenizer), so vLLM's own EOS handling adds nothing.

Served acceptance comes from vLLM's Prometheus counters (`llm.get_metrics()`, process-global, so read as the
difference over each speculative run), named in COUNTERS:
    acceptance length           = 1 + vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_drafts
    per-position acceptance[i]  = vllm:spec_decode_num_accepted_tokens_per_pos[i] / vllm:spec_decode_num_drafts
Per category, turn and prompt come from vLLM's per-request step record (`per_request_spec_decode_metrics=
"detailed"`: accepted drafts per verification step), whose sums must equal the counters (reported).
Lossless = every speculative output identical, token for token, to the reference output of the same prompt.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from stages.errors import StageError
from stages.evaluate.options import EvalOptions
from stages.vllm_runtime import VllmOptions

COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
            "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos")


def speculative_method(draft_dir: str) -> tuple[str, str]:
    """(vLLM's speculative method, the draft's format) from the draft's config.json: dflash for a DFlash draft
    (architectures DFlashDraftModel or a dflash_config), else eagle3 (eagle/draft_formats.py names the format)."""
    from eagle.draft_formats import DraftFormatError, detect_format

    path = Path(draft_dir) / "config.json"
    if not path.is_file():
        raise StageError(f"{draft_dir}: not an exported draft (no config.json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise StageError(f"{path}: not JSON ({e})") from None
    if "DFlashDraftModel" in (config.get("architectures") or []) or "dflash_config" in config:
        return "dflash", "dflash"
    try:
        return "eagle3", detect_format(config, str(path))
    except DraftFormatError as e:
        raise StageError(str(e)) from None


def aux_layers_as_served(draft_dir: str, target: str) -> dict | None:
    """For an EAGLE-3 draft, the target layers it was trained on and those vLLM feeds it, both as HF
    hidden_states indices: {"trained": [...], "served": [...]}. vLLM 0.32 (GPUModelRunner.
    _get_eagle3_aux_layers_from_config) takes the top-level eagle_aux_hidden_state_layer_ids, else eagle_config's
    verbatim, else the target's default (2, N//2, N-3). Model-Optimizer writes only eagle_config's, counted as
    layer outputs (k: hidden_states[k + 1]), so vLLM feeds its drafts every layer one early. None where eagle-pipe
    cannot read the draft's config (vLLM may still run it)."""
    from eagle.config import DraftConfig
    from eagle.draft_formats import DraftFormatError, peer_draft_config
    from stages.target import read_target_config

    config, target_config = json.loads((Path(draft_dir) / "config.json").read_text()), read_target_config(target)
    try:
        if "eagle_pipe" in config:
            trained = DraftConfig.from_dict(config["eagle_pipe"]["draft_config"]).aux_layer_ids
        else:
            trained = peer_draft_config(config, target_config)[1].aux_layer_ids
    except (DraftFormatError, KeyError, TypeError, ValueError):
        return None
    text = target_config if "num_hidden_layers" in target_config else target_config.get("text_config") or {}
    n = text.get("num_hidden_layers")
    if not isinstance(n, int):
        return None
    nested = config.get("eagle_config") if isinstance(config.get("eagle_config"), dict) else {}
    served = config.get("eagle_aux_hidden_state_layer_ids") or nested.get("eagle_aux_hidden_state_layer_ids") \
        or [2, n // 2, n - 3]
    return {"trained": sorted(int(k) for k in trained), "served": sorted(int(k) for k in served)}


@dataclass
class Output:
    tokens: list[int]                                   # new tokens, up to and including the stop token
    accepted: list[int] = field(default_factory=list)   # accepted drafts per verification step (speculative)
    seconds: float | None = None                        # vLLM decodes the turns together: no per-turn time


class VllmDecoder:
    """One offline vLLM engine for the target, with or without a draft: greedy outputs of token-id prompts."""

    def __init__(self, options, target: str, *, max_new_tokens: int, stop_ids: list[int], draft: str | None = None,
                 method: str | None = None, draft_tokens: int | None = None, max_num_seqs: int | None = None):
        from stages.vllm_runtime import open_llm, require_vllm

        vllm = require_vllm()
        extra = {"disable_log_stats": False}
        if max_num_seqs:
            extra["max_num_seqs"] = max_num_seqs
        if draft is not None:
            _require_per_request_metrics(vllm)
            extra["speculative_config"] = {"method": method, "model": str(draft),
                                           "num_speculative_tokens": int(draft_tokens)}
            extra["per_request_spec_decode_metrics"] = "detailed"
        started = time.perf_counter()
        self.llm = open_llm(options, str(target), **extra)
        self.start_seconds = time.perf_counter() - started
        self.speculative = draft is not None
        self.params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True,
                                          stop_token_ids=list(stop_ids), detokenize=False)

    def generate(self, prompts: list[list[int]]) -> tuple[list[Output], float]:
        """Greedy outputs of the prompts in one vLLM call (vLLM batches them), in prompt order; the seconds."""
        started = time.perf_counter()
        results = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], self.params, use_tqdm=False)
        seconds = time.perf_counter() - started
        outputs = []
        for result in results:
            completion = result.outputs[0]
            metrics = getattr(completion, "spec_decode_metrics", None)
            if self.speculative and metrics is None:
                raise StageError("vLLM returned no per-request speculative metrics "
                                 "(per_request_spec_decode_metrics needs vLLM >= 0.32)")
            outputs.append(Output(list(completion.token_ids), list(metrics.per_step_accepted) if metrics else []))
        return outputs, seconds

    def counters(self) -> dict:
        """The spec-decode counters now (process-wide totals since the first engine of this process)."""
        found = {name: None for name in COUNTERS}
        for metric in self.llm.get_metrics():
            if metric.name in found:
                found[metric.name] = list(metric.values) if hasattr(metric, "values") else int(metric.value)
        return found

    def close(self) -> None:
        """Shut the engine's processes down and free its memory before the next engine starts."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already gone: nothing to free
            pass
        del llm
        gc.collect()


def _require_per_request_metrics(vllm) -> None:
    """vLLM's per-request step record (what per category, turn and prompt are counted from) is an engine argument
    of recent vLLM (0.32 has it); an older one is refused in one line instead of failing inside vLLM."""
    from dataclasses import fields

    from vllm.engine.arg_utils import EngineArgs

    if "per_request_spec_decode_metrics" not in {f.name for f in fields(EngineArgs)}:
        raise StageError(f"eval --engine vllm needs vLLM's per_request_spec_decode_metrics (vLLM 0.32 has it); this "
                         f"is vLLM {vllm.__version__}: upgrade it")


def counter_difference(before: dict, after: dict, draft_tokens: int) -> dict:
    """The counters of one speculative run: after - before (missing = 0; the per-position vector padded to K)."""
    def value(counters, name):
        v = counters.get(name)
        if name.endswith("_per_pos"):
            v = list(v or [])
            return v + [0] * (draft_tokens - len(v))
        return v or 0

    return {name: ([a - b for a, b in zip(value(after, name), value(before, name))] if name.endswith("_per_pos")
                   else value(after, name) - value(before, name)) for name in COUNTERS}


def served_acceptance(counters: dict, draft_tokens: int) -> dict:
    """Acceptance length and per-position rates from the counters of one run (see the module docstring)."""
    drafts = counters["vllm:spec_decode_num_drafts"]
    per_pos = counters["vllm:spec_decode_num_accepted_tokens_per_pos"][:draft_tokens]
    if not drafts:
        return {"acceptance_length": None, "per_position_acceptance": [None] * draft_tokens,
                "per_position_conditional": [None] * draft_tokens, "target_forwards": 0}
    reached = [drafts] + per_pos
    return {"acceptance_length": 1 + counters["vllm:spec_decode_num_accepted_tokens"] / drafts,
            "per_position_acceptance": [n / drafts for n in per_pos],
            "per_position_conditional": [reached[i] / reached[i - 1] if reached[i - 1] else None
                                         for i in range(1, draft_tokens + 1)],
            "target_forwards": drafts}


def evaluate_vllm(options: EvalOptions, draft_token_counts: list[int], vllm: VllmOptions | None = None) -> dict:
    """`eval --engine vllm`: the report of `stages.evaluate.stage.evaluate`, measured in vLLM (module docstring).

    `draft_token_counts`: the K to measure (options.draft_tokens parsed); `vllm`: the VllmOptions of the shared
    flags (stages/vllm_runtime.py); `options.batch_size` caps the sequences vLLM decodes at once (its
    max_num_seqs; None: vLLM's own default)."""
    from stages.data.records import summarize_skips
    from stages.evaluate.questions import load_prompts, require_questions
    from stages.evaluate.report import build_report, combine_reports, simulated_acceptance_from_run, skip_examples
    from stages.evaluate.turns import Decoded, decoded_turns, turn_runs
    from stages.target import dtype_name, eos_token_ids, load_tokenizer, resolve_device, resolve_dtype
    from stages.vllm_runtime import require_vllm, vllm_version

    target, draft, data, max_new_tokens = options.target, options.draft, list(options.data), options.max_new_tokens
    vllm = vllm or VllmOptions()
    if options.trust_remote_code:
        raise StageError("--trust-remote-code is for --engine hf; vLLM loads the target with its own model code")
    if vllm.data_parallel_size > 1:
        raise StageError("--data-parallel-size: eval runs one vLLM engine at a time; spread a large target with "
                         "--tensor-parallel-size (and --enable-expert-parallel for MoE targets)")
    method, draft_format = speculative_method(draft)
    require_vllm()
    aux_layers = aux_layers_as_served(draft, target) if method == "eagle3" else None
    if aux_layers and aux_layers["served"] != aux_layers["trained"]:
        click.echo(f"eval: warning: vLLM {vllm_version()} feeds this {draft_format} draft the target's hidden states "
                   f"{aux_layers['served']}, it was trained on {aux_layers['trained']} (HF hidden_states indices): "
                   f"the served acceptance is that of a misread draft; `eagle-pipe export {draft} OUT --target "
                   f"{target}` rewrites it so vLLM reads it as trained", err=True)
    device = resolve_device(options.device)  # where vLLM runs: the report's word for it
    torch_dtype = resolve_dtype(options.dtype, device)
    vllm = replace(vllm, dtype=dtype_name(torch_dtype))
    tokenizer = load_tokenizer(target)
    eos_ids = eos_token_ids(None, tokenizer, target)
    questions, skips = load_prompts(data, tokenizer, options.num_prompts)
    require_questions(data, questions, skips)
    simulated = {k: simulated_acceptance_from_run(options.run_dir, k) if options.run_dir else None
                 for k in draft_token_counts}
    engine_args = dict(max_new_tokens=max_new_tokens, stop_ids=eos_ids, max_num_seqs=options.batch_size)

    # 1. the target alone: reference outputs turn by turn (later turns follow its own answers), all questions
    #    at once (vLLM batches them)
    reference_seconds = [0.0]
    decoder = VllmDecoder(vllm, target, **engine_args)

    def references(prompts: list[list[int]]) -> list[Decoded]:
        outputs, seconds = decoder.generate(prompts)
        reference_seconds[0] += seconds
        return [Decoded(out.tokens, None, {}) for out in outputs]

    try:
        start_seconds = {"reference": decoder.start_seconds}
        records = list(decoded_turns(questions, tokenizer, references, group_size=len(questions), eos_ids=eos_ids))
    finally:
        decoder.close()

    # 2. with the draft, one engine per K, on the same prompts, turn by turn
    spec_seconds, served = {}, {}
    for k in draft_token_counts:
        decoder = VllmDecoder(vllm, target, draft=draft, method=method, draft_tokens=k, **engine_args)
        try:
            start_seconds[f"speculative_k{k}"] = decoder.start_seconds
            before = decoder.counters()
            spec_seconds[k] = 0.0
            for turn in sorted({r.turn for r in records}):
                turn_records = [r for r in records if r.turn == turn]
                outputs, seconds = decoder.generate([r.prompt for r in turn_records])
                spec_seconds[k] += seconds
                for r, out in zip(turn_records, outputs):
                    r.decoded.specs[k] = out
            served[k] = counter_difference(before, decoder.counters(), k)
        finally:
            decoder.close()

    common = {"target": str(target), "draft": str(draft), "draft_format": draft_format,
              "data": [str(d) for d in data], "num_prompts": len(questions),
              "skipped_records": summarize_skips(skips), "skipped_examples": skip_examples(skips),
              "max_new_tokens": max_new_tokens, "device": device, "dtype": dtype_name(torch_dtype),
              "batch_size": options.batch_size, "reference_seconds": reference_seconds[0],
              "reference_tokens": sum(len(r.decoded.reference) for r in records),
              "warmup_seconds": sum(start_seconds.values()),
              "engine": {"engine": "vllm", "start_seconds": start_seconds}, "references": {}}
    reports = {}
    for k in draft_token_counts:
        runs, mismatches = turn_runs(records, questions, k)
        report = build_report(common, runs, mismatches, k, simulated[k], spec_seconds[k])
        report.update(served_acceptance(served[k], k))  # the served numbers are vLLM's counters
        counted = per_request_counts(runs, k)
        report["engine"] = "vllm"
        report["vllm"] = {"version": vllm_version(), "speculative_method": method, "aux_layer_ids": aux_layers,
                          "counters": served[k],
                          "acceptance_length": "1 + vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_drafts",
                          "per_position_acceptance": "vllm:spec_decode_num_accepted_tokens_per_pos / "
                                                     "vllm:spec_decode_num_drafts",
                          "per_request_equals_counters": counted == {name: served[k][name] for name in counted},
                          "options": vllm.record()}
        reports[k] = report
    return combine_reports(reports, draft_token_counts)


def per_request_counts(runs: list[dict], draft_tokens: int) -> dict:
    """The counters a run's per-request step records add up to (draft counts per step are not kept)."""
    accepted = [a for run in runs for a in run["accepted"]]
    return {"vllm:spec_decode_num_drafts": len(accepted), "vllm:spec_decode_num_accepted_tokens": sum(accepted),
            "vllm:spec_decode_num_accepted_tokens_per_pos": [sum(a >= i for a in accepted)
                                                             for i in range(1, draft_tokens + 1)]}
