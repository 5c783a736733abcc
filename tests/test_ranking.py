import math
import random

import torch

import pytest

from minigpt.ranking import fit_pairwise_weights, ranking_loss, ranking_metrics, ranking_pairs, ranks_from_scores
from minigpt.reward_model import RankingCollator


def test_ranks_from_scores_are_dense_and_keep_ties():
    assert ranks_from_scores([0.2, 0.9, 0.2, 0.5]) == [2, 0, 2, 1]


def test_label_noise_swaps_adjacent_levels_only():
    rng = random.Random(0)
    noisy = [ranks_from_scores([0.9, 0.5, 0.1], noise=1.0, rng=rng) for _ in range(3)]
    assert all(sorted(r) == [0, 1, 2] for r in noisy)
    assert ranks_from_scores([0.9, 0.5, 0.1], noise=0.0) == [0, 1, 2]


def test_label_noise_moves_no_response_more_than_one_level():
    rng = random.Random(0)
    for _ in range(200):
        noisy = ranks_from_scores([0.9, 0.7, 0.5, 0.3, 0.1], noise=0.9, rng=rng)
        assert sorted(noisy) == [0, 1, 2, 3, 4]
        assert all(abs(r - i) <= 1 for i, r in enumerate(noisy)), noisy


def test_held_out_split_keeps_every_record_of_a_prompt_together():
    from minigpt.ranking import split_by_prompt

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(20)]
    rankings = [{"prompt": p, "responses": ["a", "b"], "ranks": [0, 1], "round": r} for r in range(3) for p in prompts]
    train, val = split_by_prompt(rankings, 0.25, seed=0)
    key = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert val and {key(r) for r in train}.isdisjoint({key(r) for r in val})
    assert len(train) + len(val) == len(rankings) and len({key(r) for r in val}) == 5


def test_pairs_of_a_ranking_with_a_tie():
    # responses 0 and 2 tie for best, 1 is worst: two comparisons, no pair between the tied ones
    assert sorted(ranking_pairs([0, 1, 0])) == [(0, 1), (2, 1)]
    assert len(ranking_pairs([0, 1, 2, 3])) == 6  # C(4, 2)


def test_loss_equals_a_hand_computation_on_k3_with_a_tie():
    rewards = torch.tensor([1.0, -0.5, 0.3])
    ranks = [0, 1, 0]
    pairs = ranking_pairs(ranks)
    better = torch.tensor([i for i, _ in pairs])
    worse = torch.tensor([j for _, j in pairs])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = -(math.log(sigmoid(1.0 - -0.5)) + math.log(sigmoid(0.3 - -0.5))) / 2
    assert abs(ranking_loss(rewards, better, worse).item() - by_hand) < 1e-6


def test_collator_keeps_every_pair_of_a_prompt_in_the_batch():
    rows = [{"responses_ids": [[1, 2], [3], [4, 5, 6]], "ranks": [0, 2, 1]},
            {"responses_ids": [[7], [8, 9]], "ranks": [1, 0]}]
    batch = RankingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (5, 3)  # every response once
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 3, 1, 2]
    pairs = set(zip(batch["better"].tolist(), batch["worse"].tolist()))
    assert pairs == {(0, 1), (0, 2), (2, 1), (4, 3)}  # 3 pairs of prompt 1, 1 of prompt 2 (offset 3)


def test_metrics_on_known_scores():
    perfect = ranking_metrics([([3.0, 2.0, 1.0], [0, 1, 2])])
    assert (perfect.pairwise_accuracy, perfect.top1_accuracy, perfect.kendall_tau) == (1.0, 1.0, 1.0)
    reversed_ = ranking_metrics([([1.0, 2.0, 3.0], [0, 1, 2])])
    assert (reversed_.pairwise_accuracy, reversed_.top1_accuracy, reversed_.kendall_tau) == (0.0, 0.0, -1.0)
    mixed = ranking_metrics([([2.0, 3.0, 1.0], [0, 1, 2]), ([0.0, 0.0], [0, 0])])
    assert mixed.n_prompts == 1  # an all-tied prompt has nothing to compare
    assert abs(mixed.pairwise_accuracy - 2 / 3) < 1e-9 and abs(mixed.kendall_tau - 1 / 3) < 1e-9
    assert mixed.top1_accuracy == 0.0


def test_pairwise_accuracy_interval_resamples_prompts():
    rng = random.Random(0)

    def metrics(n_prompts, flip):  # K=4 rankings; a share `flip` of the prompts is ranked backwards
        groups = []
        for p in range(n_prompts):
            scores = [rng.random() for _ in range(4)]
            ranks = ranks_from_scores(scores)
            groups.append(([-s for s in scores] if p < flip * n_prompts else scores, ranks))
        return ranking_metrics(groups)

    perfect = metrics(20, 0.0)
    assert perfect.pairwise_accuracy_ci == [1.0, 1.0]
    few, many = metrics(40, 0.25), metrics(400, 0.25)
    for m in (few, many):
        low, high = m.pairwise_accuracy_ci
        assert low < m.pairwise_accuracy < high and abs(m.pairwise_accuracy - 0.75) < 1e-9
    # prompts, not pairs, are the unit: 40 prompts' interval is about sqrt(10) times wider than 400's
    width = lambda m: m.pairwise_accuracy_ci[1] - m.pairwise_accuracy_ci[0]  # noqa: E731
    assert 2.0 < width(few) / width(many) < 5.0 and width(few) > 0.15


def test_pairwise_weights_recover_the_feature_that_decides_the_ranking():
    rng = random.Random(0)
    groups = []
    for _ in range(60):  # feature 0 is noise, feature 1 (in large units) decides the ranks
        features = [[rng.gauss(0, 1), rng.gauss(0, 100)] for _ in range(4)]
        groups.append((features, ranks_from_scores([f[1] for f in features])))
    w_noise, w_signal = fit_pairwise_weights(groups)
    assert w_signal > 0 and abs(w_noise) * 1 < w_signal * 100 / 5  # in standardised units the signal dominates
    scored = [([w_noise * a + w_signal * b for a, b in features], ranks) for features, ranks in groups]
    assert ranking_metrics(scored).pairwise_accuracy > 0.97


def test_pairwise_weights_refuse_rankings_without_a_comparison():
    with pytest.raises(ValueError, match="no comparisons"):
        fit_pairwise_weights([([[1.0], [2.0]], [0, 0])])
