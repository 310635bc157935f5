"""Checkpoints: exact round trip (model, optimizer, RNG), atomic replacement, a full disk, newest-complete lookup."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from eagle.config import DraftConfig
from eagle.model import Eagle3Draft
from stages.train import checkpoint as ckpt
from stages.errors import StageError
from stages.train.setup import make_optimizer

TARGET = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
          "num_hidden_layers": 6, "vocab_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 256}


def make_model(seed=0):
    torch.manual_seed(seed)
    return Eagle3Draft(DraftConfig.from_target_config(TARGET, draft_vocab_size=32, ttt_steps=2))


def trained(seed=0, steps=3):
    """A model and its AdamW after a few real updates (so every optimizer state tensor is non-trivial)."""
    model = make_model(seed)
    opt, params, names = make_optimizer(model, 1e-2, 0.01, torch.device("cpu"))
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params) + torch.randn(()) * 0
        loss.backward()
        opt.step()
    return model, opt, params, names


def save(root, name, model, opt, names, **meta):
    return ckpt.save_checkpoint(root, name, model=model, optimizer=opt, param_names=names,
                                meta={"step": meta.get("step", 1), **meta})


def test_round_trip_is_exact(tmp_path):
    model, opt, params, names = trained()
    torch.manual_seed(123)
    path = save(tmp_path, ckpt.step_name(3), model, opt, names, step=3, loader={"epoch": 1, "step": 7},
                draft_config=model.cfg.to_dict())
    expected_next = torch.rand(4)
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optimizer.json",
                                                      "optimizer.safetensors", "rng.safetensors"]
    assert "embed_tokens.weight" not in ckpt.model_tensors(model)

    model2, opt2, _, names2 = trained(seed=1, steps=1)
    torch.manual_seed(999)
    meta = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, param_names=names2)
    assert meta["step"] == 3 and meta["loader"] == {"epoch": 1, "step": 7}
    assert torch.equal(torch.rand(4), expected_next), "torch RNG restored"
    for (n1, t1), (n2, t2) in zip(ckpt.model_tensors(model).items(), ckpt.model_tensors(model2).items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for key in s1["state"][i]:
            assert torch.equal(s1["state"][i][key], s2["state"][i][key]), (i, key)


def test_nothing_is_pickled(tmp_path):
    model, opt, _, names = trained()
    path = save(tmp_path, "step-00000001", model, opt, names)
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x02" and not f.name.endswith((".pt", ".bin", ".pkl"))
    json.loads((path / "optimizer.json").read_text())


def test_disk_full_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt, params, names = trained()
    first = save(tmp_path, ckpt.step_name(1), model, opt, names, step=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    best = save(tmp_path, "best", model, opt, names, step=1)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)

    calls = {"n": 0}
    real = ckpt._write_tensors

    def full_disk(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file: the model file is already half of the new checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "_write_tensors", full_disk)
    with pytest.raises(StageError, match="No space left"):
        save(tmp_path, ckpt.step_name(2), model, opt, names, step=2)
    calls["n"] = 0
    with pytest.raises(StageError, match="No space left"):
        save(tmp_path, "best", model, opt, names, step=2)  # replacing an existing checkpoint of the same name
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert ckpt.read_meta(best)["step"] == 1
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    fresh = make_model(5)
    ckpt.load_checkpoint(first, model=fresh)  # and it still loads


def test_latest_ignores_incomplete_and_temporary_directories(tmp_path):
    model, opt, _, names = trained()
    save(tmp_path, ckpt.step_name(5), model, opt, names, step=5)
    newest = save(tmp_path, ckpt.step_name(10), model, opt, names, step=10)
    (tmp_path / ckpt.step_name(20)).mkdir()                      # a directory without meta.json
    (tmp_path / ".tmp-step-00000030-1").mkdir()                  # an interrupted write
    half = tmp_path / ckpt.step_name(40)
    half.mkdir()
    (half / "meta.json").write_text("{not json")
    assert ckpt.latest_checkpoint(tmp_path) == newest
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == [ckpt.step_name(10)]
    assert not (tmp_path / ".tmp-step-00000030-1").exists()


def test_replacing_a_checkpoint_of_the_same_name(tmp_path):
    model, opt, params, names = trained()
    save(tmp_path, "best", model, opt, names, step=1)
    save(tmp_path, "best", model, opt, names, step=7)
    assert ckpt.read_meta(tmp_path / "best")["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_loading_into_a_different_draft_names_the_file(tmp_path):
    model, opt, _, names = trained()
    path = save(tmp_path, "step-00000001", model, opt, names)
    other = Eagle3Draft(DraftConfig.from_target_config(dict(TARGET, intermediate_size=40), draft_vocab_size=32))
    with pytest.raises((StageError, RuntimeError), match="model.safetensors|size mismatch"):
        ckpt.load_checkpoint(path, model=other)
