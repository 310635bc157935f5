"""Training checkpoints: atomic directories of safetensors + JSON (no pickle anywhere).

    RUN/checkpoints/step-00001000/
        model.safetensors       the draft's state dict without the frozen embedding (it comes from the dump)
        optimizer.safetensors   optimizer state tensors, keys "state.<param name>.<field>"
        optimizer.json          param groups (hyper-parameters, parameter names) and non-tensor state
        rng.safetensors         torch CPU generator state, and CUDA generator states, as uint8 tensors
        meta.json               written last: step, draft config, settings, scheduler, data position, metrics
    RUN/checkpoints/best/       the same, for the best held-out simulated acceptance length

A checkpoint is written into a temporary directory (`.tmp-NAME-PID`), every file fsynced, then renamed into
place and the parent directory fsynced: a crash or a full disk at any moment leaves the previous checkpoints
untouched and never a directory that looks complete but is not. Only directories holding meta.json count.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.errors import StageError
from stages.shards import fsync_path

FORMAT = "eagle-pipe-checkpoint"
FROZEN = ("embed_tokens.weight",)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, **(metadata or {})})
    fsync_path(path)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict minus the frozen target embedding (a tensor shared under two names, as a DFlash
    draft's k_norm, is written once per name: safetensors refuses shared memory)."""
    state = {k: v for k, v in model.state_dict().items() if k not in FROZEN}
    seen: set[int] = set()
    for k, v in state.items():
        if v.data_ptr() in seen:
            state[k] = v.clone()
        seen.add(v.data_ptr())
    return state


def optimizer_payload(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """(tensors, json) of an optimizer state dict; parameters are named, not numbered."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, fields in sd["state"].items():
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{names[idx]}.{key}"] = value
            else:
                plain.setdefault(names[idx], {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def load_optimizer_payload(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, info: dict):
    index = {name: i for i, name in names.items()}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, rest = key.split(".", 1)
        name, field = rest.rsplit(".", 1)
        state.setdefault(index[name], {})[field] = value
    for name, fields in info.get("plain_state", {}).items():
        state.setdefault(index[name], {}).update(fields)
    # JSON turns tuples (AdamW's betas) into lists; the optimizer's own state dict holds tuples
    groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},
               "params": [index[n] for n in g["params"]]} for g in info["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(root: str | Path, name: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    param_names: dict[int, str], meta: dict) -> Path:
    """Write checkpoint `root/name` atomically (replacing one of the same name only once the new one is
    complete). A failed write (e.g. disk full) raises StageError and leaves every existing checkpoint as it was."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    old = None
    try:
        tmp.mkdir()
        _write_tensors(tmp / "model.safetensors", model_tensors(model))
        opt_tensors, opt_json = optimizer_payload(optimizer, param_names)
        _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / "optimizer.json", opt_json)
        _write_tensors(tmp / "rng.safetensors", rng_state())
        _write_json(tmp / "meta.json", {"format": FORMAT, "name": name, **meta})
        fsync_path(tmp)
        if final.exists():
            old = root / f".old-{name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)
        raise StageError(f"{final}: could not write the checkpoint ({e.strerror or e}); the previous "
                         f"checkpoints in {root} are intact") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == FORMAT and all((Path(path) / f).is_file() for f in
                                                ("model.safetensors", "optimizer.safetensors", "rng.safetensors"))


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (and leftovers of interrupted writes)."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    for _, path in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        if p.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(p, ignore_errors=True)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise StageError(f"{path}: not a complete eagle-pipe checkpoint (no valid meta.json / tensor files)")
    return json.loads((path / "meta.json").read_text())


def load_model_tensors(path: str | Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model` (everything but the frozen embedding must match)."""
    file = Path(path) / "model.safetensors"
    tensors = _read_tensors(file)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in FROZEN]
    if missing or unexpected:
        raise StageError(f"{file}: does not match the draft (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    param_names: dict[int, str] | None = None, restore_rng: bool = True) -> dict:
    """Restore model (and optimizer, RNG) from a checkpoint directory; returns its meta dict."""
    path = Path(path)
    meta = read_meta(path)
    load_model_tensors(path, model)
    if optimizer is not None:
        info = json.loads((path / "optimizer.json").read_text())
        load_optimizer_payload(optimizer, param_names, _read_tensors(path / "optimizer.safetensors"), info)
    if restore_rng:
        set_rng_state(_read_tensors(path / "rng.safetensors"))
    return meta
