"""Training mechanics shared by the stages we train ourselves (pretrain, PPO): accelerator, dtype,
optimizer, learning-rate schedule, seeding."""

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


def configure_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only (not on norms or biases), as in GPT-2/nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available() or None)


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
