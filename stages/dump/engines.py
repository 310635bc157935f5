"""The engines dump-teacher runs the target in: one interface, two implementations.

    engine.part_batches(part, following) -> Iterator[(aux [n, A*H], final [n, H])]   per planned batch, in order
    engine.hidden_states(sequences) -> (aux, final)          n = the sequences' tokens, in order
    engine.describe() -> dict                                what the manifest records as `engine` (vLLM)
    engine.close()

`aux` holds the input residual stream of each aux layer (HF `hidden_states[k]`, layers in ascending order);
`final` is the base model's final *normed* state, from which stages/dump/forward.py's `teacher_outputs`
computes the teacher with the target's lm_head and the family's logit post-processing. Both come back on the
dump's device in the target's dtype, so everything after the engine (teacher, aux encoding, parts, checksums,
resume) is one path.

`HFEngine` runs the target in transformers with forward pre-hooks (stages/dump/forward.py), one padded forward per
planned batch. `VllmEngine` hands vLLM a whole part per `generate` call (vLLM batches by its own token budget; a
call per planned batch cost ~0.3 s of fixed overhead each on CPU), starts the next part's `generate` in a
background thread so vLLM computes while eagle-pipe computes the teacher and writes (so at most two parts' state
files exist), and cuts the results into the planned batches, reading each batch's files only when that batch is
consumed. It runs the target
in vLLM's offline `LLM` in this process (no server): the `extract_hidden_states` speculative method captures the
aux layers plus layer `num_hidden_layers` (the final state before the norm) for every prompt token, our
connector (stages/dump/vllm_connector.py) writes one file per request into a temporary directory, and this
engine reads and deletes each file as soon as its batch is collected (disk and memory stay bounded by one
batch). The final norm is applied here, with the target's own norm module. Prefix caching is off: with it, vLLM
would skip recomputing a shared prefix, and its states must come from this request's own forward. vLLM may
batch and reorder internally; `generate` returns outputs in request order and each file carries its token ids,
which are checked against the request.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from stages.errors import StageError

VLLM_LAYER_CONVENTION = ("aux id k = the input of decoder layer k (HF hidden_states[k]); vLLM extract_hidden_states "
                         "layer ids = aux ids + [num_hidden_layers] (the final state before the norm)")
STATE_FILE_TIMEOUT_S = 600.0   # a finished request's file not written by then means vLLM's worker failed


class HFEngine:
    """The target in transformers, aux states by forward pre-hooks on the decoder layers."""

    name = "hf"

    def __init__(self, target, aux_ids: list[int]):
        self.target, self.aux_ids = target, aux_ids
        tokenizer = target.tokenizer
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)

    def hidden_states(self, seqs):
        from stages.dump.forward import forward_batch
        from stages.dump.plan import pad_batch

        ids, mask, real, _ = pad_batch(seqs, self.pad_id)
        return forward_batch(self.target, self.aux_ids, ids, mask, real)

    def part_batches(self, part, following=None):
        for lo, hi in part.batches:
            yield self.hidden_states(part.sequences[lo:hi])

    def describe(self) -> dict:
        import transformers

        return {"name": self.name, "transformers_version": transformers.__version__}

    def close(self) -> None:
        pass


def vllm_engine_record(aux_ids: list[int], num_layers: int, options) -> dict:
    """The manifest's `engine` for a vLLM dump: what changes its numbers (version, layers, extra vLLM arguments
    such as quantization), not the parallel layout (shards of one dump may run on different GPU counts)."""
    from stages.vllm_runtime import vllm_version

    return {"name": "vllm", "vllm_version": vllm_version(), "layer_ids": [*aux_ids, num_layers],
            "layer_index_convention": VLLM_LAYER_CONVENTION, "vllm_args": dict(options.vllm_args)}


def refuse_without_aux_outputs(target) -> None:
    """vLLM returns aux hidden states only from model classes with its EAGLE-3 interface (Llama, Qwen2/3,
    Qwen3-MoE, Mistral-3, DeepSeek-V2/3, gpt-oss, ... but not e.g. Gemma-3 in vLLM 0.32): refuse the others in
    one line before the engine starts, instead of a worker traceback."""
    architectures = list(getattr(target.config, "architectures", None) or [])
    try:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_eagle3

        classes = [ModelRegistry._try_load_model_cls(a) for a in architectures]  # None: not in vLLM's registry
    except Exception:  # another vLLM version's internals: let the engine decide
        return
    for arch, cls in zip(architectures, classes):
        if cls is not None:
            if not supports_eagle3(cls):
                raise StageError(f"target {target.source}: vLLM's {arch} cannot return aux hidden states (no EAGLE-3 "
                                 "interface in this vLLM); use --engine hf")
            return


def claim_rank_gpus(gpus_per_replica: int, env=os.environ) -> None:
    """Under torchrun (one dump shard per rank) every rank's vLLM would start on GPU 0: give rank r the GPUs
    r*TP .. r*TP+TP-1 through CUDA_VISIBLE_DEVICES (read by the worker processes vLLM spawns), unless the
    launcher already set CUDA_VISIBLE_DEVICES (SLURM does)."""
    if "LOCAL_RANK" not in env or "CUDA_VISIBLE_DEVICES" in env or not torch.cuda.is_available():
        return
    first = int(env["LOCAL_RANK"]) * gpus_per_replica
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_replica))


def default_max_model_len(config, max_seq_len: int) -> int:
    """A record of --max-seq-len tokens plus the one token vLLM generates, within the model's positions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return min(max_seq_len + 1, int(limit)) if limit else max_seq_len + 1


STATES_PREFIX = "eagle-pipe-vllm-states-"


def remove_stale_state_dirs(root: str | None) -> None:
    """State directories left by a dump killed on this machine (their pid no longer runs)."""
    for path in Path(root or tempfile.gettempdir()).glob(f"{STATES_PREFIX}*"):
        pid = path.name[len(STATES_PREFIX):].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def states_root() -> str | None:
    """Where the per-request state files go: memory-backed /dev/shm when it exists, else the system temp dir."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class VllmEngine:
    """The target in vLLM's offline LLM, states captured by `extract_hidden_states` and our connector."""

    name = "vllm"

    def __init__(self, target, aux_ids: list[int], options, *, max_seq_len: int, trust_remote_code: bool = False):
        from stages.vllm_runtime import open_llm, require_vllm

        self.vllm = require_vllm()
        self.target, self.aux_ids, self.options = target, aux_ids, options
        refuse_without_aux_outputs(target)
        self.layer_ids = [*aux_ids, target.num_layers]
        remove_stale_state_dirs(states_root())
        self.directory = tempfile.mkdtemp(prefix=f"{STATES_PREFIX}{os.getpid()}-", dir=states_root())
        speculative = {"method": "extract_hidden_states", "num_speculative_tokens": 1,
                       "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self.layer_ids}}}
        transfer = {"kv_connector": "SyncHiddenStatesConnector",
                    "kv_connector_module_path": "stages.dump.vllm_connector",
                    "kv_role": "kv_producer",
                    "kv_connector_extra_config": {"shared_storage_path": self.directory,
                                                  "use_synchronization_lock": False}}
        self.max_model_len = options.max_model_len or default_max_model_len(target.config, max_seq_len)
        claim_rank_gpus(options.tensor_parallel_size)
        try:
            self.llm = open_llm(options, target.source, speculative_config=speculative, kv_transfer_config=transfer,
                                enable_prefix_caching=False, skip_tokenizer_init=True,
                                max_model_len=self.max_model_len, trust_remote_code=trust_remote_code)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.sampling = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle-pipe-vllm-ahead")
        self._ahead = None   # (part, future of its outputs) generating in the background

    def hidden_states(self, seqs):
        return next(self._cut(seqs, self._generate(seqs), [(0, len(seqs))]))

    def part_batches(self, part, following=None):
        """The part's batches, from one generate over the whole part; `following` (the next part to compute)
        starts generating in a background thread now, so vLLM computes it while this part's teacher runs."""
        ahead, self._ahead = self._ahead, None
        outputs = ahead[1].result() if ahead is not None and ahead[0] is part else self._generate(part.sequences)
        if following is not None:
            self._ahead = (following, self._pool.submit(self._generate, following.sequences))
        return self._cut(part.sequences, outputs, part.batches)

    def _generate(self, seqs):
        """vLLM's outputs for `seqs` (one request each, max_tokens 1); their states are files until read."""
        for seq in seqs:
            if len(seq) >= self.max_model_len:
                raise StageError(f"--engine vllm: record {seq.sample_index} has {len(seq)} tokens, vLLM's "
                                 f"max_model_len is {self.max_model_len} (it needs one more position than the "
                                 "record); lower --max-seq-len or raise --max-model-len")
        prompts = [{"prompt_token_ids": s.input_ids.tolist()} for s in seqs]
        try:
            outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        except Exception as exc:  # the engine core died (its own log above has the worker's traceback)
            from stages.vllm_runtime import error_line
            raise StageError(f"target {self.target.source}: vLLM's engine failed on it ({type(exc).__name__}: "
                             f"{error_line(exc)}); vLLM's log above names the cause") from None
        if len(outputs) != len(seqs):
            raise StageError(f"--engine vllm: vLLM returned {len(outputs)} outputs for {len(seqs)} prompts")
        return outputs

    def _cut(self, seqs, outputs, batches):
        """(aux, normed final) per [lo, hi) batch of `seqs`, each batch's files read (and deleted) when consumed."""
        n_aux, device = len(self.aux_ids), self.target.device
        for lo, hi in batches:
            states = torch.cat([self._take(out, seq) for seq, out in zip(seqs[lo:hi], outputs[lo:hi])])
            states = states.to(device, self.target.dtype, non_blocking=True)   # [n, n_aux + 1, H]
            with torch.inference_mode():
                yield states[:, :n_aux].flatten(1), self.target.norm(states[:, n_aux])

    def close(self) -> None:
        ahead, self._ahead = getattr(self, "_ahead", None), None
        if ahead is not None:  # a part generated ahead but not used (an error stopped the dump): let it finish
            ahead[1].exception()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=True)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def _take(self, out, seq) -> torch.Tensor:
        """Wait for the request's file (written by the worker after the request finished), read, delete it."""
        from safetensors.torch import load_file

        params = getattr(out, "kv_transfer_params", None) or {}
        path = params.get("hidden_states_path")
        if path is None:
            raise StageError(f"--engine vllm: vLLM returned no hidden states for record {seq.sample_index} "
                             "(is the extract_hidden_states method supported for this target?)")
        deadline = time.monotonic() + STATE_FILE_TIMEOUT_S
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise StageError(f"--engine vllm: no hidden states for record {seq.sample_index} after "
                                 f"{STATE_FILE_TIMEOUT_S:.0f} s ({path}); vLLM's worker failed")
            time.sleep(0.0005)
        data = load_file(path)
        os.unlink(path)
        tokens = data["token_ids"]
        if tokens.shape[0] != len(seq) or not torch.equal(tokens.to(torch.int64),
                                                           torch.from_numpy(seq.input_ids).to(torch.int64)):
            raise StageError(f"--engine vllm: the hidden states vLLM returned for record {seq.sample_index} "
                             "belong to other tokens")
        states = data["hidden_states"]
        if states.shape[1] != len(self.layer_ids):
            raise StageError(f"--engine vllm: vLLM captured {states.shape[1]} layers, asked for {self.layer_ids}")
        return states

    def describe(self) -> dict:
        return vllm_engine_record(self.aux_ids, self.target.num_layers, self.options)
