"""K-way rankings: from judge scores to ranks, from ranks to pairs, the InstructGPT loss, and metrics.

A ranking record holds K responses to one prompt and `ranks` (0 = best; equal ranks are ties).
Training uses every pair (i ranked above j) of a prompt together, as InstructGPT does: each response
is scored once and all C(K,2) comparisons of the prompt share those scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def ranks_from_scores(scores: list[float], noise: float = 0.0, rng: random.Random | None = None) -> list[int]:
    """Dense ranks, 0 = best; equal scores tie. With `noise`, each adjacent pair of distinct ranks is
    swapped with that probability, like labellers who disagree on close calls."""
    levels = sorted({round(s, 6) for s in scores}, reverse=True)
    ranks = [levels.index(round(s, 6)) for s in scores]
    if noise > 0:
        rng = rng or random.Random(0)
        for level in range(len(levels) - 1):
            if rng.random() < noise:
                ranks = [level + 1 if r == level else level if r == level + 1 else r for r in ranks]
    return ranks


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """Every (better, worse) index pair; ties give no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """InstructGPT's loss: mean over comparisons of −log σ(r_better − r_worse)."""
    return -F.logsigmoid(rewards[better] - rewards[worse]).mean()


@dataclass
class RankingMetrics:
    pairwise_accuracy: float  # comparisons the model orders as the ranking does
    top1_accuracy: float  # the model's best response is one of the ranking's best
    kendall_tau: float  # mean per prompt over untied pairs: (concordant − discordant) / pairs
    n_prompts: int
    n_pairs: int


def ranking_metrics(groups: list[tuple[list[float], list[int]]]) -> RankingMetrics:
    """Metrics of model rewards against rankings; `groups` = [(rewards, ranks), …] one per prompt."""
    correct = pairs = top1 = 0
    taus = []
    for rewards, ranks in groups:
        group_pairs = ranking_pairs(ranks)
        if not group_pairs:
            continue
        agree = sum(rewards[i] > rewards[j] for i, j in group_pairs)
        disagree = sum(rewards[i] < rewards[j] for i, j in group_pairs)
        correct += agree
        pairs += len(group_pairs)
        taus.append((agree - disagree) / len(group_pairs))
        top1 += ranks[max(range(len(rewards)), key=lambda k: rewards[k])] == min(ranks)
    n = len(taus)
    return RankingMetrics(correct / max(1, pairs), top1 / max(1, n), sum(taus) / max(1, n), n, pairs)
