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
from dataclasses import dataclass, field
from pathlib import Path

from stages.errors import StageError

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


@dataclass
class Output:
    tokens: list[int]                                   # new tokens, up to and including the stop token
    accepted: list[int] = field(default_factory=list)   # accepted drafts per verification step (speculative)


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


def evaluate_vllm(target: str, draft: str, data, *, ks: list[int], num_prompts=32, max_new_tokens=128, dtype=None,
                  device=None, run_dir=None, trust_remote_code=False, batch_size=None, vllm=None) -> dict:
    """`eval --engine vllm`: the report of `stages.evaluate.stage.evaluate`, measured in vLLM (module docstring).

    `vllm`: the VllmOptions of the shared flags (stages/vllm_runtime.py); `batch_size` caps the sequences vLLM
    decodes at once (its max_num_seqs; None: vLLM's own default)."""
    from stages.data.prompts import answer_text
    from stages.data.records import summarize_skips
    from stages.evaluate.questions import load_prompts, render_prompt, require_questions
    from stages.evaluate.report import build_report, simulated_acceptance_from_run, skip_examples
    from stages.target import dtype_name, end_of_sequence_ids, load_tokenizer, resolve_device, resolve_dtype
    from stages.vllm_runtime import VllmOptions, require_vllm, vllm_version

    if trust_remote_code:
        raise StageError("--trust-remote-code is for --engine hf; vLLM loads the target with its own model code")
    require_vllm()
    method, draft_format = speculative_method(draft)
    device = resolve_device(None if device in (None, "", "auto") else device)  # where vLLM runs: the report's word
    torch_dtype = resolve_dtype(None if dtype in (None, "", "auto") else dtype, device)
    options = vllm or VllmOptions()
    options = VllmOptions(**{**options.__dict__, "dtype": dtype_name(torch_dtype)})
    tokenizer = load_tokenizer(target)
    eos_ids = end_of_sequence_ids(tokenizer, target=target)
    questions, skips = load_prompts(data, tokenizer, num_prompts)
    require_questions(data, questions, skips)
    simulated = {k: simulated_acceptance_from_run(run_dir, k) if run_dir else None for k in ks}
    engine_args = dict(max_new_tokens=max_new_tokens, stop_ids=eos_ids, max_num_seqs=batch_size)

    # 1. the target alone: reference outputs turn by turn (later turns follow its own answers)
    prompts: dict[int, list[tuple[int, list[int]]]] = {}          # turn -> [(question, prompt ids)]
    references: dict[tuple[int, int], list[int]] = {}             # (question, turn) -> reference tokens
    reference_seconds, answers = 0.0, {i: [] for i in range(len(questions))}
    decoder = VllmDecoder(options, target, **engine_args)
    try:
        start_seconds = {"reference": decoder.start_seconds}
        for turn in range(1, max(len(q.user_turns) for q in questions) + 1):
            active = [i for i, q in enumerate(questions) if len(q.user_turns) >= turn]
            prompts[turn] = [(i, render_prompt(tokenizer, questions[i].conversation(answers[i]), questions[i].where))
                             for i in active]
            outputs, seconds = decoder.generate([ids for _, ids in prompts[turn]])
            reference_seconds += seconds
            for (i, _), out in zip(prompts[turn], outputs):
                references[i, turn] = out.tokens
                answers[i].append(answer_text(tokenizer, out.tokens, eos_ids))
    finally:
        decoder.close()

    # 2. with the draft, one engine per K, on the same prompts
    runs, mismatches, spec_seconds, served = {}, {}, {}, {}
    for k in ks:
        decoder = VllmDecoder(options, target, draft=draft, method=method, draft_tokens=k, **engine_args)
        try:
            start_seconds[f"speculative_k{k}"] = decoder.start_seconds
            before = decoder.counters()
            runs[k], mismatches[k], spec_seconds[k] = [], [], 0.0
            for turn, turn_prompts in prompts.items():
                outputs, seconds = decoder.generate([ids for _, ids in turn_prompts])
                spec_seconds[k] += seconds
                for (i, ids), out in zip(turn_prompts, outputs):
                    q, reference = questions[i], references[i, turn]
                    runs[k].append({"question": i, "where": q.where, "question_id": q.question_id,
                                    "category": q.category, "turn": turn, "prompt_tokens": len(ids),
                                    "accepted": out.accepted, "new_tokens": len(out.tokens),
                                    "baseline_new_tokens": len(reference), "seconds": None,
                                    "baseline_seconds": None, "output_tokens": out.tokens})
                    if out.tokens != reference:
                        diff = next((j for j, (a, b) in enumerate(zip(out.tokens, reference)) if a != b),
                                    min(len(out.tokens), len(reference)))
                        mismatches[k].append({"prompt": i, "turn": turn, "where": q.where, "first_difference": diff,
                                              "speculative_len": len(out.tokens), "reference_len": len(reference)})
            served[k] = counter_difference(before, decoder.counters(), k)
        finally:
            decoder.close()
        runs[k].sort(key=lambda r: (r["question"], r["turn"]))
        mismatches[k].sort(key=lambda m: (m["prompt"], m["turn"]))

    reference_tokens = sum(len(t) for t in references.values())
    common = {"target": str(target), "draft": str(draft), "draft_format": draft_format,
              "data": [str(d) for d in data], "num_prompts": len(questions),
              "skipped_records": summarize_skips(skips), "skipped_examples": skip_examples(skips),
              "max_new_tokens": max_new_tokens, "device": device, "dtype": dtype_name(torch_dtype),
              "batch_size": batch_size, "reference_seconds": reference_seconds, "reference_tokens": reference_tokens,
              "warmup_seconds": sum(start_seconds.values()),
              "engine": {"engine": "vllm", "start_seconds": start_seconds}, "references": {}}
    reports = {}
    for k in ks:
        report = build_report(common, runs[k], mismatches[k], k, simulated[k], spec_seconds[k])
        report.update(served_acceptance(served[k], k))  # the served numbers are vLLM's counters
        report["engine"] = "vllm"
        report["vllm"] = {"version": vllm_version(), "speculative_method": method,
                          "counters": served[k],
                          "acceptance_length": "1 + vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_drafts",
                          "per_position_acceptance": "vllm:spec_decode_num_accepted_tokens_per_pos / "
                                                     "vllm:spec_decode_num_drafts",
                          "per_request_equals_counters": per_request_counts(runs[k], k) == {
                              name: served[k][name] for name in per_request_counts(runs[k], k)},
                          "options": options.record()}
        reports[k] = report
    report = reports[ks[0]]
    if len(ks) > 1:
        report = {**report, "lossless": all(r["lossless"] for r in reports.values()),
                  "draft_tokens_list": ks, "by_draft_tokens": {str(k): r for k, r in reports.items()}}
    return report


def per_request_counts(runs: list[dict], draft_tokens: int) -> dict:
    """The counters a run's per-request step records add up to (draft counts per step are not kept)."""
    accepted = [a for run in runs for a in run["accepted"]]
    return {"vllm:spec_decode_num_drafts": len(accepted), "vllm:spec_decode_num_accepted_tokens": sum(accepted),
            "vllm:spec_decode_num_accepted_tokens_per_pos": [sum(a >= i for a in accepted)
                                                             for i in range(1, draft_tokens + 1)]}
