"""K-way rankings: from judge scores to ranks, from ranks to pairs, the InstructGPT loss, and metrics.

A ranking record holds K responses to one prompt and `ranks` (0 = best; equal ranks are ties).
Training uses every pair (i ranked above j) of a prompt together, as InstructGPT does: each response
is scored once and all C(K,2) comparisons of the prompt share those scores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minigpt.stats import bootstrap_ratio_ci


def ranks_from_scores(scores: list[float], noise: float = 0.0, rng: random.Random | None = None) -> list[int]:
    """Dense ranks, 0 = best; equal scores tie. With `noise`, each adjacent pair of distinct ranks is
    swapped with that probability, like labellers who disagree on close calls."""
    levels = sorted({round(s, 6) for s in scores}, reverse=True)
    ranks = [levels.index(round(s, 6)) for s in scores]
    if noise > 0:
        # Each adjacent pair of levels is swapped with probability `noise`; a swapped pair is not
        # swapped again with its neighbour, so no response moves more than one level.
        rng = rng or random.Random(0)
        new_level, level = list(range(len(levels))), 0
        while level < len(levels) - 1:
            if rng.random() < noise:
                new_level[level], new_level[level + 1] = level + 1, level
                level += 2
            else:
                level += 1
        ranks = [new_level[r] for r in ranks]
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
    pairwise_accuracy_ci: list[float] = field(default_factory=lambda: [float("nan")] * 2)  # prompts resampled


def pair_orders(rewards: list[float], ranks: list[int]) -> tuple[int, int, int]:
    """(pairs that `rewards` order as `ranks` do, pairs they order the other way, pairs) for one ranking;
    a tie in rewards is neither."""
    pairs = ranking_pairs(ranks)
    return (sum(rewards[better] > rewards[worse] for better, worse in pairs),
            sum(rewards[better] < rewards[worse] for better, worse in pairs), len(pairs))


def ranking_metrics(groups: list[tuple[list[float], list[int]]]) -> RankingMetrics:
    """Metrics of model rewards against rankings; `groups` = [(rewards, ranks), …] one per prompt."""
    agreeing, counts, taus = [], [], []  # per prompt
    top1 = 0
    for rewards, ranks in groups:
        agree, disagree, count = pair_orders(rewards, ranks)
        if not count:
            continue
        agreeing.append(agree)
        counts.append(count)
        taus.append((agree - disagree) / count)
        top1 += ranks[max(range(len(rewards)), key=lambda k: rewards[k])] == min(ranks)
    n, pairs = len(taus), sum(counts)
    # a prompt's pairs share its responses, so the interval resamples prompts, not pairs
    return RankingMetrics(sum(agreeing) / max(1, pairs), top1 / max(1, n), sum(taus) / max(1, n), n, pairs,
                          bootstrap_ratio_ci(agreeing, counts))


def split_by_prompt(rankings: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held out) with every record of one prompt on the same side.

    RLHF rounds rank fresh answers to the *same* ranking prompts, so a split by record would hold
    out answers to prompts the reward model trained on, and overstate its held-out accuracy.
    """
    from minigpt.data import split_off

    keys = list(dict.fromkeys(json.dumps(r["prompt"], sort_keys=True) for r in rankings))
    _, held_out = split_off(keys, fraction, seed=seed)
    held_out = set(held_out)
    train = [r for r in rankings if json.dumps(r["prompt"], sort_keys=True) not in held_out]
    val = [r for r in rankings if json.dumps(r["prompt"], sort_keys=True) in held_out]
    return train, val


def fit_pairwise_weights(groups: list[tuple[list[list[float]], list[int]]], l2: float = 1e-3) -> list[float]:
    """Weights w of a linear score w·x that orders each prompt's responses as its ranking does.

    `groups` = [(features of each response, ranks), …] one per prompt; the fit minimises the same
    −log σ(s_better − s_worse) as `ranking_loss`, over every pair (features standardised for the fit,
    weights returned in the features' own units). A logistic regression: convex, so LBFGS finds it.
    """
    differences = [[a - b for a, b in zip(features[i], features[j])]
                   for features, ranks in groups for i, j in ranking_pairs(ranks)]
    if not differences:
        raise ValueError("fit_pairwise_weights: the rankings have no comparisons (every response tied)")
    x = torch.tensor(differences, dtype=torch.float64)
    scale = x.std(0).clamp_min(1e-8)
    weights = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.softplus(-(x / scale) @ weights).mean() + l2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (weights.detach() / scale).tolist()
