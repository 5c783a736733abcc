"""Training mechanics shared by the stages we train ourselves (pretrain, PPO): accelerator,
optimizers, learning-rate schedule, seeding."""

from __future__ import annotations

import logging
import math
import random

import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(dtype: str = "float32", grad_accum: int = 1):
    """An `accelerate.Accelerator`: one process, several CPU processes (gloo) or GPUs alike."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16" if dtype == "bfloat16" else "no",
                       gradient_accumulation_steps=grad_accum)


OPTIMIZERS = ("adamw", "muon")


class Optimizers:
    """Several torch optimizers stepped as one: Muon for the hidden matrices, AdamW for the rest.

    Each param group keeps its own `base_lr`; the schedule sets `lr = base_lr * multiplier` on all.
    """

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * multiplier

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError(f"resume state holds {len(state.get('optimizers', []))} optimizers, this run has "
                             f"{len(self.optimizers)}: was it started with another optimizer=?")
        for optimizer, part in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(part)


def hidden_matrices(model) -> list[str]:
    """Names of the 2-D weights inside the Transformer blocks: what Muon orthogonalises.

    Not the embedding (it is also the tied LM head: a lookup table, not a map between hidden states),
    not norms or biases (1-D).
    """
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and ".blocks." in f".{name}"]


def configure_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), kind: str = "adamw",
                        muon_lr: float = 0.0) -> Optimizers:
    """AdamW (weight decay on matrices only, as in GPT-2/nanoGPT), or Muon for the hidden matrices with
    AdamW for the embedding and norms (as nanochat and the modded-nanoGPT speedrun do).

    Muon's update is scaled to AdamW's RMS (`match_rms_adamw`), so `muon_lr` (0: `lr`) is on AdamW's scale.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer={kind!r}: expected one of {', '.join(OPTIMIZERS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named = list({id(p): (n, p) for n, p in named}.values())  # the tied head once
    muon_names = set(hidden_matrices(model)) if kind == "muon" else set()
    muon = [p for n, p in named if n in muon_names]
    decay = [p for n, p in named if n not in muon_names and p.dim() >= 2]
    no_decay = [p for n, p in named if n not in muon_names and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "base_lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": lr}]
    parts = [torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available() or None)]
    if muon:
        muon_lr = muon_lr or lr
        parts.append(torch.optim.Muon([{"params": muon, "base_lr": muon_lr}], lr=muon_lr,
                                      weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
    return Optimizers(parts)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, elapsed: float = 0.0, max_time: float = 0.0,
                  min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to `min_ratio` over whichever budget ends first.

    With a wall-clock budget (`max_time`), progress is the larger of the step and time fractions, so
    a run told to train for ten minutes still finishes its decay instead of stopping at a high rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if max_time:
        progress = max(progress, elapsed / max_time)
    progress = min(1.0, progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def count_parameters(model) -> int:
    """Unique parameters (the tied LM head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
