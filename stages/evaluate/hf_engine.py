"""`eval --engine hf`'s decoder: the target in transformers, decoding turns greedily twice (its own `generate()`,
the reference, and eagle-pipe's speculative decoding with the draft at each K), one turn at a time or batched.

    decoder = HFDecoder(model, drafter, draft_token_counts, ...)
    decoder.decode(prompts) -> [Decoded(reference, reference_seconds, {K: result})]   one per prompt
    decoder.warm_up(prompt, rows); decoder.describe(); decoder.totals; decoder.close()

Batch 1 (`batch_size` 1): each turn alone, on a static KV cache with a compiled K+1-token verification step where
the target allows it (stages/evaluate/static_target.py), else the dynamic cache (speculative.py). Batched: one
batched generate() for the references and one batched speculative run per K (batched.py; one turn at a time for
a target that cannot batch them); a turn whose batched outputs differ from each other (another float rounding of
the same greedy decodes) is decided alone, exactly as batch 1 decides it. `totals` adds up the seconds and tokens
each side spent, which the report turns into speeds.
"""
from __future__ import annotations

from stages.errors import StageError
from stages.evaluate.turns import Decoded


class HFDecoder:
    def __init__(self, model, drafter, draft_token_counts: list[int], *, max_new_tokens: int, eos_ids, pad_id,
                 device: str, batch_size: int, compile: bool, cache_len: int, where: str, speculative_generate=None):
        from stages.evaluate.batched import BatchedTarget, Unbatchable
        from stages.evaluate.speculative import speculative_generate as eagle_generate
        from stages.evaluate.static_target import position_dependent_rope
        from stages.static_cache import supports_static_cache

        self.model, self.drafter, self.draft_token_counts = model, drafter, draft_token_counts
        self.max_new_tokens, self.eos_ids, self.pad_id, self.device = max_new_tokens, eos_ids, pad_id, device
        self.batch_size = batch_size
        self.speculative_generate = speculative_generate or eagle_generate
        self.static = supports_static_cache(model)
        self.totals = {"reference_seconds": 0.0, "reference_tokens": 0, "rerun_alone": 0,
                       "speculative_seconds": {k: 0.0 for k in draft_token_counts}}
        self.batched_target = self.target_aux = None
        try:
            if batch_size > 1:
                try:
                    self.batched_target = BatchedTarget(model, drafter.cfg.aux_layer_ids)
                except Unbatchable:  # sliding windows, softcapping...: the speculative runs go one turn at a time
                    pass
            # batched, the batch-1 path only decides the rare turns whose batched outputs differ: not worth a compile
            self.compiled = bool(compile and self.static and self.batched_target is None
                                 and not position_dependent_rope(model.config))
            self.target_aux = self._make_target(cache_len)
        except ValueError as e:  # no text decoder found, or aux ids outside it: one line naming the target
            self.close()
            raise StageError(f"{where}: {e}") from None
        self.cache_length = cache_len if self.static else None

    def describe(self) -> dict:
        """What the report's timing section records about this engine."""
        from stages.evaluate.static_target import StaticTarget

        # the greedy reference is transformers' own generate() on its default dynamic cache: the most independent
        # reference, and on the CPUs measured a static cache with a compiled decode step was no faster at batch 1
        # and slower batched (docs/regenerate.md, "Measured")
        return {"static_cache": isinstance(self.target_aux, StaticTarget), "compile": self.compiled,
                "cache_length": self.cache_length, "batch_size": self.batch_size,
                "batched_speculative": self.batched_target is not None}

    def _make_target(self, length: int):
        from stages.evaluate.speculative import TargetWithAux
        from stages.evaluate.static_target import StaticTarget, UncroppableCache

        if self.static:
            try:
                return StaticTarget(self.model, self.drafter.cfg.aux_layer_ids, length,
                                    compiled_tokens=[k + 1 for k in self.draft_token_counts] if self.compiled else ())
            except UncroppableCache:  # e.g. linear-attention layers: the dynamic cache, cropped per round
                pass
        return TargetWithAux(self.model, self.drafter.cfg.aux_layer_ids)

    def close(self) -> None:
        if self.target_aux is not None:
            self.target_aux.remove()
        if self.batched_target is not None:
            self.batched_target.remove()

    def _fit(self, ids: list[int]) -> None:
        """A larger static cache (and new compiles) for a turn longer than the bound (re-tokenized answers)."""
        from stages.evaluate.static_target import StaticTarget
        from stages.static_cache import bucket

        needed = len(ids) + self.max_new_tokens + max(self.draft_token_counts) + 1
        if isinstance(self.target_aux, StaticTarget) and needed > self.target_aux.max_len:
            self.target_aux.remove()
            self.cache_length = bucket(needed)
            self.target_aux = self._make_target(self.cache_length)

    def _speculative(self, ids: list[int], k: int, new_tokens: int):
        return self.speculative_generate(self.target_aux, self.drafter, ids, max_new_tokens=new_tokens,
                                         draft_tokens=k, eos_ids=self.eos_ids, device=self.device)

    def _alone(self, ids: list[int], new_tokens: int) -> Decoded:
        """One turn by itself: the reference (seconds) and the speculative run of each K (batch 1)."""
        from stages.evaluate.speculative import greedy_generate

        self._fit(ids)
        reference, seconds = greedy_generate(self.model, ids, max_new_tokens=new_tokens, eos_ids=self.eos_ids,
                                             pad_id=self.pad_id, device=self.device)
        return Decoded(reference, seconds,
                       {k: self._speculative(ids, k, new_tokens) for k in self.draft_token_counts})

    def _together(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[Decoded], float, dict]:
        """Several turns at once: batched references, and batched speculative runs (one turn at a time for a
        target that cannot batch them); the seconds of each part."""
        from stages.evaluate.batched import speculative_generate_batch
        from stages.evaluate.speculative import greedy_generate_batch

        rows, ref_seconds = greedy_generate_batch(self.model, prompts, max_new_tokens=new_tokens,
                                                  eos_ids=self.eos_ids, pad_id=self.pad_id, device=self.device)
        specs, spec_seconds = {}, {}
        for k in self.draft_token_counts:
            if self.batched_target is not None:
                specs[k], spec_seconds[k] = speculative_generate_batch(
                    self.batched_target, self.drafter, prompts, max_new_tokens=new_tokens, draft_tokens=k,
                    eos_ids=self.eos_ids, pad_id=self.pad_id, device=self.device)
            else:
                for ids in prompts:
                    self._fit(ids)
                specs[k] = [self._speculative(ids, k, new_tokens) for ids in prompts]
                spec_seconds[k] = sum(spec.seconds for spec in specs[k])
        decoded = [Decoded(row, None, {k: specs[k][n] for k in self.draft_token_counts}) for n, row in enumerate(rows)]
        return decoded, ref_seconds, spec_seconds

    def warm_up(self, prompt: list[int], rows: int) -> None:
        """First-call allocations, lazy inits and the compiles, outside the timings (2 new tokens)."""
        self._alone(prompt, 2)
        if self.batch_size > 1:
            self._together([prompt] * min(self.batch_size, rows), 2)

    def decode(self, prompts: list[list[int]]) -> list[Decoded]:
        """Each prompt's reference and speculative runs, batched when batch_size > 1; adds to `totals`."""
        totals = self.totals
        if self.batch_size == 1:
            decoded = [self._alone(ids, self.max_new_tokens) for ids in prompts]
            for turn in decoded:
                totals["reference_seconds"] += turn.reference_seconds
                totals["reference_tokens"] += len(turn.reference)
                for k in self.draft_token_counts:
                    totals["speculative_seconds"][k] += turn.specs[k].seconds
            return decoded
        decoded, ref_seconds, spec_seconds = self._together(prompts, self.max_new_tokens)
        totals["reference_seconds"] += ref_seconds
        totals["reference_tokens"] += sum(len(turn.reference) for turn in decoded)
        for k in self.draft_token_counts:
            totals["speculative_seconds"][k] += spec_seconds[k]
        for n, (ids, turn) in enumerate(zip(prompts, decoded)):
            if any(spec.tokens != turn.reference for spec in turn.specs.values()):
                # batched rows are another float rounding of the same greedy decodes: where they differ, the turn
                # is decided alone, exactly as --batch-size 1 decides it
                alone = self._alone(ids, self.max_new_tokens)
                totals["rerun_alone"] += 1
                totals["reference_seconds"] += alone.reference_seconds
                totals["reference_tokens"] += len(alone.reference)
                for k in self.draft_token_counts:
                    totals["speculative_seconds"][k] += alone.specs[k].seconds
                decoded[n] = Decoded(alone.reference, None, alone.specs)  # not a batch-1 baseline of the whole run
        return decoded
