import json
import os

import pytest
import torch

from minigpt.checkpoint import (CheckpointError, load_causal_lm, load_resume_state, save_model,
                                save_resume_state)
from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM

CONFIG = MiniGPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=32)


def model(seed):
    torch.manual_seed(seed)
    return MiniGPTForCausalLM(CONFIG)


def test_a_crash_while_writing_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    old = model(0)
    save_model(old, tmp_path, manifest={"version": 1})
    new = model(1)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(type(new), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        save_model(new, tmp_path, manifest={"version": 2})
    x = torch.randint(0, 64, (1, 5))
    assert torch.equal(load_causal_lm(tmp_path)(x).logits, old(x).logits)
    assert json.loads((tmp_path / "manifest.json").read_text())["version"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saving")]  # no debris


def test_a_crash_between_renames_is_caught_by_the_manifest_checksum(tmp_path, monkeypatch):
    """New weights with the old manifest: the checkpoint is not whole, and loading says so (not a mix)."""
    save_model(model(0), tmp_path, manifest={"version": 1})
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # weights are in place, the crash hits the next file
            raise OSError("simulated power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(OSError):
        save_model(model(1), tmp_path, manifest={"version": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged.*FORCE=1"):
        load_causal_lm(tmp_path)
    save_model(model(1), tmp_path, manifest={"version": 2})  # the rerun the message asks for
    x = torch.randint(0, 64, (1, 5))
    assert torch.equal(load_causal_lm(tmp_path)(x).logits, model(1)(x).logits)


def test_pickle_weights_are_refused(tmp_path):
    model(0).config.save_pretrained(tmp_path)
    torch.save(model(0).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load pickle"):
        load_causal_lm(tmp_path)


def test_missing_folder_and_empty_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_causal_lm(tmp_path)


def test_resume_state_round_trip_and_config_mismatch(tmp_path):
    m = model(0)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 64, (2, 6)), labels=torch.randint(0, 64, (2, 6))).loss.backward()
    optimizer.step()
    save_resume_state(tmp_path, m, optimizer, None, {"step": 7, "config": {"lr": 1}})
    fresh = model(1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_resume_state(tmp_path, fresh, fresh_optimizer, expect={"config": {"lr": 1}})
    assert state["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values()))
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    # state saved under another config is not resumed from
    assert load_resume_state(tmp_path, model(2), expect={"config": {"lr": 2}}) is None
