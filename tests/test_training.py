"""Optimisers for the stages we train ourselves (minigpt/training.py)."""

import pytest
import torch

from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.training import configure_optimizer, hidden_matrices


def tiny_model():
    torch.manual_seed(0)
    return MiniGPTForCausalLM(MiniGPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=32))


def test_muon_only_receives_the_blocks_2d_matrices():
    model = tiny_model()
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon")
    adamw, muon = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    on_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert on_muon == set(hidden_matrices(model))
    assert on_muon == {f"model.blocks.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert all(p.dim() == 2 for group in muon.param_groups for p in group["params"])
    assert "model.wte.weight" in on_adamw and not on_adamw & on_muon  # the tied embedding/head stays on AdamW
    assert on_adamw | on_muon == set(names.values())  # every parameter is optimised, once


def test_adamw_alone_decays_matrices_only():
    optimizer = configure_optimizer(tiny_model(), lr=1e-3, weight_decay=0.1, kind="adamw")
    (adamw,) = optimizer.optimizers
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_the_schedule_scales_each_groups_own_lr_and_state_round_trips():
    model = tiny_model()
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon", muon_lr=4e-3)
    optimizer.set_lr_multiplier(0.5)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [5e-4, 2e-3]
    model(input_ids=torch.randint(0, 64, (2, 8))).logits.sum().backward()
    optimizer.step()
    again = configure_optimizer(tiny_model(), lr=1e-3, weight_decay=0.1, kind="muon", muon_lr=4e-3)
    again.load_state_dict(optimizer.state_dict())
    assert len(again.optimizers[1].state) == len(hidden_matrices(model))
    with pytest.raises(ValueError, match="optimizer="):
        configure_optimizer(tiny_model(), 1e-3, 0.1, kind="adamw").load_state_dict(optimizer.state_dict())
    with pytest.raises(ValueError, match="expected one of"):
        configure_optimizer(model, 1e-3, 0.1, kind="sgd")
