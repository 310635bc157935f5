"""bench/peers/quality.py's pure-python parts: the peers' training input written from an eagle-pipe dump.

No peer package is needed (the peers' drivers, bench/peers/modelopt/train.py and bench/peers/speculators/train.py, run in their
own venvs and are exercised by the bench itself). Checked here against independent references: the ids and masks
against the dump's parts, the supervised positions against eagle-pipe's own training loader (a second code
path), the aux states against the dump's hooked capture, the last hidden state after the norm against the HF
model's own logits, and the vocabulary against `build_vocab_map`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bench.peers.quality_data import (iter_dump_sequences, peer_loss_mask, supervised_pairs_eagle_pipe,
                                      supervised_pairs_peer, write_peer_inputs)
from conftest import CONVERSATIONS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat_dump(tmp_path_factory, tiny_llama) -> Path:
    from stages.cli import main

    root = tmp_path_factory.mktemp("quality-dump")
    data = root / "chat.jsonl"
    with data.open("w") as f:
        for _ in range(3):
            for rec in CONVERSATIONS[:3]:   # the chat records: assistant-only loss masks with several turns
                f.write(json.dumps(rec) + "\n")
    out = root / "dump"
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(tiny_llama), "--data", str(data), "--out",
                                       str(out), "--top-k", "8", "--num-shards", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def peer_data(tmp_path_factory, tiny_llama, chat_dump) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quality-peer") / "peer-data"
    return out, write_peer_inputs(str(tiny_llama), chat_dump, out, draft_vocab_size=64, check_every=1)


def test_peer_mask_supervises_the_same_pairs_for_any_mask():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 17, 64):
        for _ in range(20):
            mask = (torch.rand(n, generator=gen) < 0.5).to(torch.uint8)
            assert supervised_pairs_peer(peer_loss_mask(mask)) == supervised_pairs_eagle_pipe(mask)
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.uint8)   # the peers' own reading differs
    assert supervised_pairs_peer(mask) != supervised_pairs_eagle_pipe(mask)


def test_conversations_reproduce_the_dump(chat_dump, peer_data):
    out, summary = peer_data
    dumped = list(iter_dump_sequences(chat_dump))
    files = sorted((out / "conversations").glob("conv-*.safetensors"))
    assert len(files) == len(dumped) == summary["conversations"] == 9
    for (idx, ids, mask), path in zip(dumped, files):
        t = load_file(str(path))
        assert torch.equal(t["input_ids"], ids) and t["input_ids"].dtype == torch.int64
        assert torch.equal(t["dump_loss_mask"], mask)
        assert torch.equal(t["loss_mask"][:-1], mask[1:]) and int(t["loss_mask"][-1]) == 0
        assert 0 < int(mask.sum()) < mask.numel()   # real assistant masks, not all-ones
        n, h = ids.numel(), summary["hidden_size"]
        assert t["aux_hidden_states"].shape == (n, 3 * h) and t["last_hidden_prenorm"].shape == (n, h)
    assert summary["tokens"] == sum(ids.numel() for _, ids, _ in dumped)
    assert summary["aux_max_rel_error_vs_dump"] < 1e-5   # the plain forward's aux == the dump's hooked capture


def test_last_hidden_states_match_the_models_own_forward(tiny_llama, peer_data):
    from transformers import AutoModelForCausalLM

    out, _ = peer_data
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    t = load_file(str(sorted((out / "conversations").glob("conv-*.safetensors"))[1]))
    with torch.no_grad():
        logits = model(input_ids=t["input_ids"][None]).logits[0]
        post = model.model.norm(t["last_hidden_prenorm"])
    torch.testing.assert_close(model.lm_head(t["last_hidden_postnorm"]), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, t["last_hidden_postnorm"], rtol=1e-6, atol=1e-6)


def test_vocabulary_is_eagle_pipes_own_map(chat_dump, peer_data):
    from eagle.vocab import build_vocab_map, count_tokens_from_shards
    from stages.shards import read_done, read_json

    out, summary = peer_data
    manifest = read_json(chat_dump / "manifest.json")
    counts = count_tokens_from_shards([read_done(chat_dump, 0, 1)], int(manifest["target"]["vocab_size"]))
    d2t, t2d = build_vocab_map(counts, 64)
    v = load_file(str(out / "vocab.safetensors"))
    assert torch.equal(v["d2t"], d2t) and torch.equal(v["t2d"], t2d)
    assert summary["draft_vocab_size_effective"] == 64


def test_peers_supervise_what_eagle_pipes_loader_supervises(chat_dump, peer_data):
    """eagle-pipe's PackedLoader (the trainer's data path) trains position t of a document where its batch
    loss_mask is set; the peers train position t where their loss_mask[t + 1] is set. Same positions."""
    from eagle.vocab import build_vocab_map, count_tokens_from_shards
    from stages.shards import read_done
    from stages.train.loader import DumpIndex, PackedLoader

    out, summary = peer_data
    index = DumpIndex(chat_dump)
    _, t2d = build_vocab_map(count_tokens_from_shards([read_done(chat_dump, 0, 1)], summary["vocab_size"]), 10**6)
    loader = PackedLoader(index, np.arange(index.num_documents), seq_len=256, batch_size=1, steps=1, t2d=t2d,
                          shuffle=False, drop_last=False)
    theirs = {}
    for path in sorted((out / "conversations").glob("conv-*.safetensors")):
        t = load_file(str(path))
        key = tuple(t["input_ids"][1:].tolist())   # what eagle-pipe feeds: x_{t+1} for t = 0..n-2
        theirs.setdefault(key, []).append({p for p, _ in supervised_pairs_peer(t["loss_mask"])})
    seen = 0
    for step in loader:
        batch, _ = step[0]
        doc, pos = batch["document_ids"][0], batch["position_ids"][0]
        for d in torch.unique(doc).tolist():
            sel = doc == d
            fed = tuple(batch["input_ids"][0][sel].tolist())
            if fed not in theirs:
                continue   # padding
            ours = set(pos[sel][batch["loss_mask"][0][sel]].tolist())
            assert ours in theirs[fed], f"document {fed[:8]}...: eagle-pipe trains {sorted(ours)}"
            seen += 1
    assert seen == summary["conversations"]


def test_rewrite_is_skipped_when_nothing_changed(tiny_llama, chat_dump, peer_data):
    out, summary = peer_data
    marker = out / "conversations" / "conv-000000.safetensors"
    before = marker.stat().st_mtime_ns
    again = write_peer_inputs(str(tiny_llama), chat_dump, out, draft_vocab_size=64)
    assert again == summary and marker.stat().st_mtime_ns == before
