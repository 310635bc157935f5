"""What `eagle-pipe train` does before its first step: check the dumps, build the draft, the optimizer, the
schedule, and the process group. Kept apart from the loop in stages/train/stage.py so each file reads in one sitting.

Multi-GPU choice: the compiled step (`torch.compile(fullgraph=True)`) runs on the plain, unwrapped module and
gradients are summed across ranks with ONE coalesced all-reduce of a flat buffer after the last micro-batch of
each optimizer step (the step's global loss rides in the same buffer). DDP's bucketed hooks would overlap the
all-reduce with backward, but DDP's graph splitting (DDPOptimizer) breaks `fullgraph=True`; for a one-layer
draft the all-reduce is a few hundred MB at most, a few ms over NVLink, and accumulation needs no `no_sync`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from stages.errors import StageError
from stages.shards import read_json

# manifest fields that must agree between dumps trained together (same target, tokenizer, features, teacher).
# The schema version and the aux dtype may differ: each dump is read by its own layout, and the step
# dequantizes each batch by its own scales (an FP8 --eval-teacher-dir for a bf16 --teacher-dir, or back).
PROVENANCE = (("target", "config_sha256"), ("target", "tokenizer_sha256"), ("target", "weights_sha256"),
              ("target", "hidden_size"), ("target", "vocab_size"), ("target", "num_layers"),
              ("aux_layer_ids",), ("teacher", "kind"), ("teacher", "k"))


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_opt: str | None) -> DistInfo:
    """One process per GPU under torchrun (NCCL on GPU, gloo on CPU); a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    opt = device_opt or "auto"
    if opt == "auto":
        opt = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(opt)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StageError(f"--device {device_opt}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # rank 0 checksums the whole dump while the others wait in the first barrier: allow for it
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return DistInfo(rank, world, local, device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def broadcast_ok(info: DistInfo, ok: bool) -> bool:
    """Every rank learns whether rank 0's check passed (so all stop together)."""
    if info.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(flag, 0)
    return bool(flag.item())


def _field(manifest: dict, path: tuple) -> object:
    value = manifest
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_dumps(teacher_dir: Path, eval_dir: Path | None) -> dict:
    """Verify every dump (manifest, shards, streaming checksums of every part) and that dumps trained together
    share a target, tokenizer and teacher. Raises StageError naming the first bad file; returns the manifest."""
    from stages.shards.verify import verify_dump

    manifests = {}
    for d in [teacher_dir] + ([eval_dir] if eval_dir else []):
        if not (d / "manifest.json").is_file():
            raise StageError(f"{d / 'manifest.json'}: missing ({d} is not a complete teacher dump)")
        problems = verify_dump(d)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s); run `eagle-pipe verify {d}`)" if len(problems) > 1 else ""
            raise StageError(f"refusing to train on {d}: {problems[0]}{more}")
        manifests[d] = read_json(d / "manifest.json")
    base = manifests[teacher_dir]
    for d, m in manifests.items():
        for path in PROVENANCE:
            if _field(m, path) != _field(base, path):
                raise StageError(f"{d / 'manifest.json'}: {'.'.join(path)} = {_field(m, path)!r} differs from "
                                 f"{teacher_dir / 'manifest.json'} ({_field(base, path)!r}); dumps of different "
                                 "targets, tokenizers or teacher settings cannot be trained together")
    return base


def build_draft(teacher_dir: Path, manifest: dict, token_counts: torch.Tensor, *, draft_vocab_size: int,
                ttt_steps: int, init_lm_head: bool, seed: int, draft_rope: str = "auto", draft_arch: str = "eagle3"):
    """The draft, from the dump alone: config from target/config.json + the manifest's aux ids (RoPE by
    `draft_rope`, eagle.config.choose_draft_rope; EAGLE-3 or 3.1 by `draft_arch`), frozen embedding (and the
    lm_head/norm init) from target/weights.safetensors, vocab map from token counts."""
    from eagle.config import DraftConfig, drafters_served, load_target_dir
    from eagle.model import Eagle3Draft
    from eagle.vocab import build_vocab_map

    aux = list(manifest["aux_layer_ids"])
    if "eagle3" not in drafters_served(len(aux)):
        raise StageError(f"{teacher_dir / 'manifest.json'}: the dump holds {len(aux)} aux layers {aux}; an EAGLE-3 "
                         "draft fuses exactly three: train --draft-arch dflash on it, or dump with three --aux-layers")
    try:
        target_cfg, weights = load_target_dir(teacher_dir / "target")
        cfg = DraftConfig.from_target_config(target_cfg, draft_vocab_size=draft_vocab_size, ttt_steps=ttt_steps,
                                             aux_layer_ids=tuple(manifest["aux_layer_ids"]), draft_rope=draft_rope,
                                             draft_arch=draft_arch)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{teacher_dir / 'target'}: {e}") from None
    if token_counts.numel() != cfg.vocab_size:
        raise StageError(f"{teacher_dir}: token counts cover {token_counts.numel()} ids, vocab is {cfg.vocab_size}")
    d2t, t2d = build_vocab_map(token_counts, cfg.draft_vocab_size)
    torch.manual_seed(seed)
    model = Eagle3Draft(cfg)
    model.init_from_target(weights, d2t, t2d, init_lm_head=init_lm_head)
    return model


def build_dflash(teacher_dir: Path, manifest: dict, token_counts: torch.Tensor, *, block_size: int,
                 draft_layers: int, mask_token_id: int | None, seed: int, draft_rope: str = "auto",
                 draft_vocab_size: int | None = None):
    """A DFlash draft from the dump alone: the target's geometry and RoPE (target/config.json), the dump's aux
    ids, the target's frozen embedding and lm_head, its final norm as the draft's starting `norm`. With
    `draft_vocab_size` (< V) the lm_head is the target's rows of the dump's most frequent ids (EAGLE-3's
    build_vocab_map), still frozen; None or >= V: the full vocabulary."""
    from eagle.config import load_target_dir
    from eagle.dflash import DFlashConfig, DFlashDraft
    from eagle.vocab import build_vocab_map

    try:
        target_cfg, weights = load_target_dir(teacher_dir / "target")
        if mask_token_id is None:
            mask_token_id = choose_mask_token_id(teacher_dir / "target", target_cfg, token_counts)
        cfg = DFlashConfig.from_target_config(target_cfg, aux_layer_ids=tuple(manifest["aux_layer_ids"]),
                                              block_size=block_size, num_hidden_layers=draft_layers,
                                              mask_token_id=mask_token_id, draft_rope=draft_rope,
                                              draft_vocab_size=draft_vocab_size)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{teacher_dir / 'target'}: {e}") from None
    if token_counts.numel() != cfg.vocab_size:
        raise StageError(f"{teacher_dir}: token counts cover {token_counts.numel()} ids, vocab is {cfg.vocab_size}")
    d2t = None if cfg.draft_vocab_size is None else build_vocab_map(token_counts, cfg.draft_vocab_size)[0]
    torch.manual_seed(seed)
    model = DFlashDraft(cfg)
    model.set_target_weights(weights["embed_tokens.weight"], weights["lm_head.weight"], d2t=d2t)
    with torch.no_grad():
        model.norm.weight.copy_(weights["norm.weight"])
    return model


def choose_mask_token_id(target_dir: Path, target_cfg: dict, token_counts: torch.Tensor) -> int:
    """The DFlash mask id: the first special token of the target's tokenizer (tokenizer.json added_tokens) that is
    not its bos / eos / pad / unk and never a supervised token of the dump, so the masked slots' (frozen) embedding
    row is one the chat never feeds; else the least frequent supervised id (the last of equals)."""
    import json

    reserved = {target_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    reserved |= {i for k in ("eos_token_id",) if isinstance(target_cfg.get(k), list) for i in target_cfg[k]}
    special = []
    try:
        tokenizer = json.loads((target_dir / "tokenizer.json").read_text())
        names = json.loads((target_dir / "tokenizer_config.json").read_text()) \
            if (target_dir / "tokenizer_config.json").is_file() else {}
        named = {names.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = sorted(t["id"] for t in tokenizer.get("added_tokens", [])
                         if t.get("special") and t["content"] not in named)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for i in special:
        if i not in reserved and 0 <= i < token_counts.numel() and token_counts[i] == 0:
            return int(i)
    return int(token_counts.numel() - 1 - torch.argmin(token_counts.flip(0)).item())


def token_counts(index) -> torch.Tensor:
    from eagle.vocab import count_tokens_from_shards

    vocab = int(index.manifest["target"]["vocab_size"])
    try:
        return count_tokens_from_shards(index.done, vocab)
    except ValueError as e:
        raise StageError(f"{index.root}: {e}") from None


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW (fused: CUDA and CPU) on the trainable parameters; no decay on norms (1-D). Returns
    (optimizer, trainable params in order, {param index: name})."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    order = decay + no_decay
    names_by_id = {id(p): n for n, p in named}
    return opt, order, {i: names_by_id[id(p)] for i, p in enumerate(order)}


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(bf16 | fp32, why) for the step's matmuls. auto: bf16 on CUDA and on CPUs with AMX bf16 matrix units
    (on this project's Xeon a bf16 matmul of the step's shapes runs ~6x faster than fp32), fp32 elsewhere (CPUs
    without them emulate bf16, slower than fp32). Master weights, optimizer state and the loss stay fp32."""
    if precision not in PRECISIONS:
        raise StageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, "--precision"
    if device.type == "cuda":
        return "bf16", "CUDA"
    if device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "bf16", "the CPU has AMX bf16 matrix units"
    return "fp32", f"no bf16 matrix units on {device.type}"


# A run shorter than this cannot give a useful draft. Measured: a SmolLM2-135M draft after 54 optimizer steps
# (0.05 trained positions per draft parameter) accepted 1.16 tokens per step; the demo's 300 steps (1.9
# positions per parameter) accept 3.8. docs/quality.md, "Recipe", has the curve between the two.
MIN_USEFUL_STEPS = 200
MIN_POSITIONS_PER_PARAMETER = 0.5


def run_length_warning(total_steps: int, warmup_steps: int, positions: int, trainable_params: int) -> str | None:
    """One line when a run is too short to train a useful draft, naming the flags that lengthen it; else None.
    `positions` is what the whole run trains on (supervised positions per epoch x epochs)."""
    problems = []
    if total_steps < MIN_USEFUL_STEPS:
        problems.append(f"{total_steps} optimizer steps (a useful draft needs a few hundred at least)")
    if total_steps < 2 * warmup_steps:
        problems.append(f"the learning rate warms up for {warmup_steps} of them (--warmup-steps)")
    per_param = positions / max(trainable_params, 1)
    if per_param < MIN_POSITIONS_PER_PARAMETER:
        problems.append(f"{per_param:.2g} trained positions per draft parameter (useful drafts saw "
                        f">= {MIN_POSITIONS_PER_PARAMETER})")
    if not problems:
        return None
    return ("warning: this run is too short to train a useful draft: " + "; ".join(problems) + ". More steps on "
            "the same data: lower --batch-size or --seq-len, raise --epochs or --max-steps; more data: "
            "regenerate or dump more records")


class WarmupCosine:
    """Linear warmup to lr, then cosine decay to lr * min_ratio at total_steps. State: nothing but the step."""

    def __init__(self, lr: float, warmup: int, total: int, min_ratio: float = 0.1):
        self.lr, self.warmup, self.total, self.min_ratio = lr, max(warmup, 0), max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def state_dict(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "total": self.total, "min_ratio": self.min_ratio}


class GradSync:
    """Sum gradients (and the step loss) over ranks with one all-reduce of a flat buffer."""

    def __init__(self, params: list[torch.Tensor], info: DistInfo):
        self.params, self.info = params, info

    def broadcast_params(self) -> None:
        if self.info.world_size == 1:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            dist.broadcast(flat, 0)
            torch._foreach_copy_(self.params, list(self._split(flat, self.params)))

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """All-reduce every .grad (in place) and `loss`; returns the global loss."""
        if self.info.world_size == 1:
            return loss
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, list(self._split(flat[:-1], grads)))
        return flat[-1]

    @staticmethod
    def _split(flat: torch.Tensor, like: list[torch.Tensor]):
        offset = 0
        for t in like:
            yield flat[offset:offset + t.numel()].view_as(t)
            offset += t.numel()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t
