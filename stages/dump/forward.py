"""The target model as dump-teacher uses it: loading, aux hidden states by hooks, chunked teacher outputs.

Aux hidden states are captured with forward *pre*-hooks on the decoder layers: the input of layer k is the
residual stream entering it, i.e. HF `hidden_states[k]` (what vLLM/SGLang feed EAGLE-3), without keeping every
layer as `output_hidden_states=True` would. Teacher outputs come from the base model's final (normed) hidden
state through `lm_head` in token chunks, so a [batch, seq, vocab] float32 logits tensor never exists.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.errors import StageError
from stages.shards.tokenizer_files import drop_load_kwargs, tokenizer_sha256
from stages.target import decoder_parts, effective_norm_weight

TEACHER_CHUNK_BYTES = 256 << 20      # float32 logits per teacher chunk, at most
TEACHER_CPU_CHUNK_BYTES = 16 << 20   # on CPU: about this much (see teacher_chunk_rows)
CONFIG_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation",
                        "_attn_implementation_autoset", "dtype", "torch_dtype")


@dataclass
class Target:
    source: str
    model: torch.nn.Module
    tokenizer: object
    config: object
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    dtype: torch.dtype
    device: torch.device  # where inputs go (the embedding's device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def base_model(self) -> torch.nn.Module:
        """The text decoder (see stages/target.py): its last_hidden_state is the final-normed state."""
        return decoder_parts(self.model).base


def load_config(source: str, trust_remote_code: bool):
    """The target's config, refusing a missing path or a model that is not a causal LM (one line each)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local and not path.is_dir():
        raise StageError(f"target {source}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else source,
                                            trust_remote_code=trust_remote_code)
    except Exception as exc:  # hub/network/format errors all mean: not a usable target
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"target {source}: cannot load its config: {first}") from None
    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (
            trust_remote_code and "AutoModelForCausalLM" in auto_map):
        raise StageError(f"target {source}: model type '{config.model_type}' is not a causal language model")
    return config


def load_target(source: str, dtype: torch.dtype, device: str, device_map: str | None,
                trust_remote_code: bool) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(source, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise StageError(f"target {source}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise StageError(f"target {source}: cannot load the model: {str(exc).splitlines()[0]}") from None
    if not device_map:
        model.to(device)
    model.eval()
    try:
        parts = decoder_parts(model)
    except ValueError as exc:
        raise StageError(f"target {source}: {exc}") from None
    if model.get_output_embeddings() is None:
        raise StageError(f"target {source}: unsupported architecture {type(model).__name__} (no lm_head)")
    return Target(source, model, tokenizer, config, parts.layers, parts.norm, dtype,
                  model.get_input_embeddings().weight.device)


def load_target_head(source: str, dtype: torch.dtype, device: str, trust_remote_code: bool) -> Target | None:
    """The target with only its embedding, final norm and lm_head in memory (on `device`), every other weight left
    on the meta device: what OUT/target and the teacher need when another engine (vLLM) runs the decoder, so a
    target larger than the dump's device still fits. The three modules' tensors are read from the checkpoint's
    safetensors files by name (exact, else the one key ending in the same `module.param`); a tied lm_head shares
    the embedding. None when that is not possible (a hub id, no safetensors, an ambiguous or missing name): the
    caller then loads the whole model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(source).expanduser()
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    config = load_config(source, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise StageError(f"target {source}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        parts = decoder_parts(model)
    except Exception:
        return None
    key_file = {}
    for f in files:
        with safe_open(f, "pt") as handle:
            key_file.update({key: f for key in handle.keys()})
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return None
    tied = head.weight is embed.weight
    for module in ([embed, parts.norm] if tied else [embed, parts.norm, head]):
        tensors = {}
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{names[id(module)]}.{pname}"
            tail = ".".join(full.split(".")[-2:])
            found = [full] if full in key_file else [k for k in key_file if k == tail or k.endswith("." + tail)]
            if len(found) != 1:
                if module is head and not found and getattr(config.get_text_config(), "tie_word_embeddings", False):
                    tied = True
                    break
                return None
            with safe_open(key_file[found[0]], "pt") as handle:
                tensors[pname] = handle.get_tensor(found[0]).to(device, dtype)
        else:
            for pname, value in tensors.items():
                setattr(module, pname, torch.nn.Parameter(value, requires_grad=False))
    if tied:
        head.weight = embed.weight
    model.eval()
    return Target(source, model, tokenizer, config, parts.layers, parts.norm, dtype, torch.device(device))


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The draft library's default (eagle.config.default_aux_layer_ids), so dump and train agree."""
    from eagle.config import default_aux_layer_ids

    try:
        return default_aux_layer_ids(num_layers)
    except ValueError as e:
        raise StageError(f"{e} (EAGLE-3 fuses three different target layers)") from None


def parse_aux_layers(text: str | None, num_layers: int) -> list[int]:
    """'2,16,29' -> [2, 16, 29]; default (2, N//2, N-3), evenly spread ids for N < 7. Ascending ids: three for
    EAGLE-3 drafts (train refuses other counts for them), any number for DFlash drafts (z-lab's use 5)."""
    if text is None or str(text).strip() == "":
        ids = list(default_aux_layers(num_layers))
        origin = f"the default aux layers for N={num_layers} layers"
    else:
        try:
            items = text if isinstance(text, (list, tuple)) else str(text).split(",")
            ids = [int(str(x).strip()) for x in items]
        except ValueError:
            raise StageError(f"--aux-layers {text!r}: expected comma-separated layer ids") from None
        origin = f"--aux-layers {text}"
    if not ids:
        raise StageError(f"{origin}: no layer ids (EAGLE-3 drafts need three, DFlash drafts at least one)")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise StageError(f"{origin}: layer ids {ids} must be strictly ascending (pass --aux-layers)")
    if ids[0] < 0 or ids[-1] >= num_layers:
        raise StageError(f"{origin}: layer ids {ids} must lie in 0..{num_layers - 1} (pass --aux-layers)")
    return ids


class AuxCapture:
    """Forward pre-hooks that keep the input hidden state of the chosen layers ([B, T, H] each)."""

    def __init__(self, layers: torch.nn.ModuleList, ids: list[int]):
        self.layers, self.ids = layers, ids
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for k in self.ids:
            self.handles.append(self.layers[k].register_forward_pre_hook(self._hook(k), with_kwargs=True))
        return self

    def _hook(self, k):
        def hook(module, args, kwargs):
            self.captured[k] = args[0] if args else kwargs["hidden_states"]
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def logits_postprocess(config):
    """The few scalings some causal LMs apply after lm_head (softcapping, logit scales); identity for most."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def apply(logits):
        if scale not in (None, 1.0):
            logits = logits * scale
        if divide not in (None, 1.0):
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return apply


@torch.inference_mode()
def forward_batch(target: Target, aux_ids: list[int], input_ids, attention_mask, real_index):
    """(aux [n, 3H] target dtype, final hidden [n, H]) at the n real tokens of a right-padded batch."""
    with AuxCapture(target.layers, aux_ids) as cap:
        out = target.base_model()(input_ids=input_ids.to(target.device),
                                  attention_mask=attention_mask.to(target.device), use_cache=False)
    final = out.last_hidden_state
    idx = real_index.to(final.device, non_blocking=True)
    aux = torch.cat([cap.captured[k].flatten(0, 1).to(final.device).index_select(0, idx) for k in aux_ids], -1)
    return aux, final.flatten(0, 1).index_select(0, idx)


def teacher_chunk_rows(target: Target, device: torch.device) -> int:
    """Token rows per teacher chunk: at most TEACHER_CHUNK_BYTES of float32 logits. On CPU also about
    TEACHER_CPU_CHUNK_BYTES, so a chunk stays cache-sized and below malloc's mmap threshold (a fresh 64 MiB
    logits tensor per chunk costs page faults comparable to the top-k itself), but at least hidden/2 rows so
    the lm_head weight is still reused across enough rows."""
    V = target.vocab_size
    rows = TEACHER_CHUNK_BYTES // (V * 4)
    if device.type == "cpu":
        rows = min(rows, max(TEACHER_CPU_CHUNK_BYTES // (V * 4), target.hidden_size // 2))
    return max(1, rows)


@torch.inference_mode()
def teacher_outputs(target: Target, hidden: torch.Tensor, kind: str, k: int) -> dict[str, torch.Tensor]:
    """Teacher tensors for [n, H] final hidden states, computed over token chunks of bounded float32 size.

    topk: the k largest logits (sorted, column 0 the argmax) minus the row's logsumexp, i.e. log-probabilities
    normalised over the full vocabulary without materialising log_softmax. The logsumexp reuses the top-k's
    maximum and runs in place on the chunk (sub, exp, sum): one extra pass instead of logsumexp's temporaries.
    """
    head, post = target.lm_head, logits_postprocess(target.config)
    hidden = hidden.to(head.weight.device)
    chunk = teacher_chunk_rows(target, hidden.device)
    pieces: dict[str, list] = {}
    for start in range(0, hidden.shape[0], chunk):
        logits = post(head(hidden[start:start + chunk]).float())  # (c, V) float32, a fresh tensor
        if kind == "topk":
            vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
            top = vals[:, :1]
            shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf rows: no nan
            # logsumexp = shift + log(sum(exp(logits - shift))); logits is ours, so overwrite it
            lse = logits.sub_(shift).exp_().sum(-1, keepdim=True).log_().add_(shift)
            pieces.setdefault("teacher_topk_ids", []).append(ids.to(torch.int32))
            pieces.setdefault("teacher_topk_logprobs", []).append(vals.sub_(lse))
        elif kind == "argmax":
            pieces.setdefault("teacher_argmax", []).append(logits.argmax(-1).to(torch.int32))
        else:
            pieces.setdefault("teacher_probs", []).append(torch.softmax(logits, -1).to(target.dtype))
    return {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in pieces.items()}


@torch.inference_mode()
def self_check(target: Target, aux_ids: list[int], input_ids: torch.Tensor) -> None:
    """Once per run: our hook + chunked-head path must equal the model's own forward on a short probe.

    Guards against architectures whose forward does something after lm_head that we do not reproduce.
    """
    ids = input_ids[None, :16]
    mask = torch.ones_like(ids)
    ref = target.model(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                       output_hidden_states=True, use_cache=False)
    aux, final = forward_batch(target, aux_ids, ids, mask, torch.arange(ids.shape[1]))
    want_aux = torch.cat([ref.hidden_states[k][0].to(aux.device) for k in aux_ids], -1)
    got = teacher_outputs(target, final, "topk", 1)["teacher_topk_logprobs"][:, 0]
    want = torch.log_softmax(ref.logits[0].float(), -1).max(-1).values.to(got.device)
    tol = 1e-3 if target.dtype == torch.float32 else 5e-2
    if not torch.allclose(aux.float(), want_aux.float(), atol=tol * 10, rtol=tol * 10):
        raise StageError(f"target {target.source}: hooked aux hidden states differ from the model's "
                         "hidden_states (unsupported architecture)")
    if not torch.allclose(got, want, atol=tol * 10, rtol=tol):
        raise StageError(f"target {target.source}: lm_head(final hidden) differs from the model's logits "
                         "(unsupported architecture)")


# ---- provenance and OUT/target ---------------------------------------------------------------------------------

def config_sha256(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in CONFIG_VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def write_target_dir(target: Target, directory: Path) -> dict:
    """config.json, tokenizer files and weights.safetensors {embed_tokens, lm_head (also when tied), norm as the
    scale a plain RMSNorm applies};
    returns provenance hashes {config_sha256, tokenizer_sha256, weights_sha256}."""
    from stages.shards import write_safetensors

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    target.config.save_pretrained(directory)
    target.tokenizer.save_pretrained(directory)
    drop_load_kwargs(directory / "tokenizer_config.json")  # stages/shards/tokenizer_files.py says why
    tensors = {  # clone: tied weights share storage, and safetensors refuses shared tensors
        "embed_tokens.weight": target.model.get_input_embeddings().weight.detach().to("cpu").clone(),
        "lm_head.weight": target.lm_head.weight.detach().to("cpu").clone(),
        "norm.weight": effective_norm_weight(target.norm).to("cpu").clone(),  # Gemma: 1 + weight
    }
    weights_sha256, _ = write_safetensors(directory / "weights.safetensors", tensors, {"format": "pt"})
    return {"config_sha256": config_sha256(target.config),
            "tokenizer_sha256": tokenizer_sha256(directory),
            "weights_sha256": weights_sha256}  # hashed while written, not read back


def install_target_dir(staged: Path, final: Path) -> None:
    """Move a staged OUT/target into place; when another shard job got there first, keep theirs (the manifest
    check already proved it identical)."""
    import os

    from stages.shards import fsync_path

    try:
        os.rename(staged, final)
        fsync_path(final.parent)
    except OSError:
        if not (final / "weights.safetensors").is_file():
            raise
        shutil.rmtree(staged, ignore_errors=True)
