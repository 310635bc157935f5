"""The peers' training input for bench/peers/quality.py, built from eagle-pipe's dump: same token ids, same supervision.

Model-Optimizer and speculators train from per-conversation files of target states, not from eagle-pipe's
shards. This module writes one neutral, safetensors-only file per conversation of the dump, from which each
peer's driver (bench/peers/modelopt/train.py, bench/peers/speculators/train.py, run in the peer's own venv) writes the layout
that peer reads. Nothing here imports a peer package, so the project's tests cover it.

What is written (OUT/conversations/conv-NNNNNN.safetensors, one per dumped sequence, in sample_index order):
    input_ids            int64 [n]      the dump's token ids, unchanged
    dump_loss_mask       uint8 [n]      the dump's loss mask: 1 = token i is a trained (assistant) token
    loss_mask            uint8 [n]      the same supervision in the peers' convention (see below)
    aux_hidden_states    float32 [n, 3H] residual streams entering the dump's aux layers (HF hidden_states[k])
    last_hidden_prenorm  float32 [n, H]  the last decoder layer's output, before the final norm (speculators)
    last_hidden_postnorm float32 [n, H]  after the final norm: lm_head of it gives the logits (Model-Optimizer)
plus OUT/vocab.safetensors {d2t int64 [Vd], t2d bool [V]} (eagle-pipe's own map from the dump's supervised-token
counts, the one `eagle-pipe train` builds) and OUT/quality_data.json (counts, aux layer ids, and how far the
plain HF forward's aux states are from the dump's: the two must describe the same data).

The states come from a plain `AutoModelForCausalLM` forward of the target with `output_hidden_states=True`
(aux) and a forward hook on the final norm (last states), one conversation at a time, independent of
dump-teacher's hooked path.

Loss-mask convention. eagle-pipe's position t (aux of token t, token t+1 fed) predicts token t+2 and is supervised
when token t+2 is a trained token (`dump_loss_mask[t+2]`; eagle/ttt.py). Both peers feed the same pair at position
t but read the mask of the *fed* token: Model-Optimizer's `_eagle_loss` uses `loss_mask[:, 1 + ttt_step:]` against
`eagle_logits[:, ttt_step:-1]` (plugins/hf_eagle.py), speculators' `shift_batch` aligns (x_{t+1}, g_t, y_{t+1},
l_{t+1}) (models/eagle3/data.py). Given their own per-token assistant masks they would supervise the prediction of
the token *after* each trained token (one more after every turn's end-of-turn token, one fewer at every answer's
first token). So the peers get `loss_mask[i] = dump_loss_mask[i + 1]` (last position 0): all three trainers then
supervise exactly the same (position, predicted token) pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PEER_FORMAT = "eagle-pipe-quality-conversation"


def peer_loss_mask(dump_loss_mask: torch.Tensor) -> torch.Tensor:
    """The dump's per-token mask in the peers' fed-token convention: out[i] = mask[i + 1], out[-1] = 0."""
    out = torch.zeros_like(dump_loss_mask)
    out[:-1] = dump_loss_mask[1:]
    return out


def supervised_pairs_eagle_pipe(dump_loss_mask: torch.Tensor) -> set[tuple[int, int]]:
    """(position t, index of the predicted token) pairs eagle-pipe trains at TTT step 0 (see eagle/ttt.py)."""
    n = dump_loss_mask.numel()
    return {(t, t + 2) for t in range(n - 1) if t + 2 < n and bool(dump_loss_mask[t + 2])}


def supervised_pairs_peer(loss_mask: torch.Tensor) -> set[tuple[int, int]]:
    """The same pairs as Model-Optimizer / speculators read them: position t is trained when loss_mask[t + 1]."""
    n = loss_mask.numel()
    return {(t, t + 2) for t in range(n - 2) if bool(loss_mask[t + 1])}


def iter_dump_sequences(dump: Path):
    """(sample_index, input_ids int64 [n], loss_mask uint8 [n]) of every dumped sequence, by sample_index."""
    from stages.shards import iter_parts, load_part

    seqs = []
    for part in iter_parts(Path(dump)):
        t = load_part(part, ["input_ids", "loss_mask", "cu_seqlens", "sample_index"])
        cu = t["cu_seqlens"].tolist()
        for s, idx in enumerate(t["sample_index"].tolist()):
            seqs.append((idx, t["input_ids"][cu[s]:cu[s + 1]].to(torch.int64),
                         t["loss_mask"][cu[s]:cu[s + 1]].to(torch.uint8), part, cu[s]))
    seqs.sort(key=lambda x: x[0])
    for idx, ids, mask, _, _ in seqs:
        yield idx, ids, mask


def dump_aux_of(dump: Path, sample_index: int) -> torch.Tensor:
    """The dump's stored aux states of one sequence, as float32 (fp8 dumps dequantized) — for the agreement check."""
    from stages.shards import iter_parts, load_part, part_header

    for part in iter_parts(Path(dump)):
        index = load_part(part, ["cu_seqlens", "sample_index"])
        where = (index["sample_index"] == sample_index).nonzero()
        if where.numel():
            seq = int(where[0, 0])
            lo, hi = int(index["cu_seqlens"][seq]), int(index["cu_seqlens"][seq + 1])
            names = ["aux_hidden_states"] + (["aux_scales"] if "aux_scales" in part_header(part)["tensors"] else [])
            full = load_part(part, names)
            aux = full["aux_hidden_states"][lo:hi]
            if "aux_scales" in full:
                from stages.shards.aux import dequantize_fp8
                return dequantize_fp8(aux, full["aux_scales"][lo:hi])
            return aux.float()
    raise KeyError(f"{dump}: no sequence with sample_index {sample_index}")


class TargetStates:
    """A plain HF forward of the target: aux streams, last hidden state before and after the final norm."""

    def __init__(self, target_dir: str, aux_layer_ids: list[int], dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
        self.aux_layer_ids = list(aux_layer_ids)
        self.norm = self.model.get_decoder().norm
        self._captured: dict[str, torch.Tensor] = {}
        self.norm.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self._captured["pre"] = args[0].detach()
        self._captured["post"] = output.detach()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids[None], output_hidden_states=True, use_cache=False)
        aux = torch.cat([out.hidden_states[k][0] for k in self.aux_layer_ids], dim=-1)
        return {"aux_hidden_states": aux.float(), "last_hidden_prenorm": self._captured["pre"][0].float(),
                "last_hidden_postnorm": self._captured["post"][0].float(), "logits": out.logits[0].float()}


def write_peer_inputs(target_dir: str, dump: Path, out: Path, draft_vocab_size: int, check_every: int = 25) -> dict:
    """Write OUT/conversations/*, OUT/vocab.safetensors and OUT/quality_data.json (see the module docstring).

    Skips the work when OUT/quality_data.json already records the same dump manifest, target and vocab size.
    Every `check_every`-th conversation's aux states are compared with the dump's (relative max error, recorded).
    """
    from safetensors.torch import save_file

    from eagle.vocab import build_vocab_map, count_tokens_from_shards
    from stages.shards import manifest_sha256, read_done, read_json

    dump, out = Path(dump), Path(out)
    manifest = read_json(dump / "manifest.json")
    key = {"dump_manifest_sha256": manifest_sha256(manifest), "target": str(Path(target_dir).resolve()),
           "draft_vocab_size": draft_vocab_size, "format": PEER_FORMAT}
    summary_path = out / "quality_data.json"
    if summary_path.is_file():
        summary = read_json(summary_path)
        if {k: summary.get(k) for k in key} == key:
            return summary
    (out / "conversations").mkdir(parents=True, exist_ok=True)

    n_shards = int(manifest["num_shards"])
    dones = [read_done(dump, i, n_shards) for i in range(n_shards)]
    vocab = int(manifest["target"]["vocab_size"])
    d2t, t2d = build_vocab_map(count_tokens_from_shards(dones, vocab), draft_vocab_size)
    save_file({"d2t": d2t.contiguous(), "t2d": t2d.contiguous()}, str(out / "vocab.safetensors"))

    aux_ids = [int(k) for k in manifest["aux_layer_ids"]]
    states = TargetStates(target_dir, aux_ids)
    files, n_tokens, n_supervised, worst_rel, longest = [], 0, 0, 0.0, 0
    for i, (idx, ids, mask) in enumerate(iter_dump_sequences(dump)):
        hidden = states(ids)
        if i % check_every == 0:
            ref = dump_aux_of(dump, idx)
            rel = float((hidden["aux_hidden_states"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            worst_rel = max(worst_rel, rel)
        name = f"conv-{i:06d}.safetensors"
        save_file({"input_ids": ids.contiguous(), "dump_loss_mask": mask.contiguous(),
                   "loss_mask": peer_loss_mask(mask).contiguous(),
                   "aux_hidden_states": hidden["aux_hidden_states"].contiguous(),
                   "last_hidden_prenorm": hidden["last_hidden_prenorm"].contiguous(),
                   "last_hidden_postnorm": hidden["last_hidden_postnorm"].contiguous()},
                  str(out / "conversations" / name),
                  metadata={"format": PEER_FORMAT, "sample_index": str(idx)})
        files.append(name)
        n_tokens += ids.numel()
        longest = max(longest, ids.numel())
        n_supervised += len(supervised_pairs_eagle_pipe(mask))
    summary = key | {
        "conversations": len(files), "tokens": n_tokens, "max_conversation_tokens": longest, "supervised_positions": n_supervised,
        "aux_layer_ids": aux_ids, "hidden_size": int(manifest["target"]["hidden_size"]),
        "num_layers": int(manifest["target"]["num_layers"]), "vocab_size": vocab,
        "draft_vocab_size_effective": int(d2t.numel()),
        "aux_max_rel_error_vs_dump": worst_rel, "aux_checked_every": check_every,
    }
    summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the peers' training input from an eagle-pipe dump.")
    p.add_argument("--target", required=True)
    p.add_argument("--dump", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--draft-vocab-size", type=int, required=True)
    args = p.parse_args(argv)
    print(json.dumps(write_peer_inputs(args.target, Path(args.dump), Path(args.out), args.draft_vocab_size)))


if __name__ == "__main__":
    main()
