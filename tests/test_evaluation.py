"""The shared evaluation: intervals that cover, paired gains, win rates, best-of-n, one prompt list for all."""

import json
import math

import numpy as np
import pytest

from minigpt.config import EvalConfig, load_config
from minigpt.evaluation import (best_of_n, check_same_prompts, eval_records, pair, pairwise_agreement, pick_best,
                                 summarise)
from minigpt.stats import bootstrap_ci, paired_gain, spearman, win_rate


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for t in range(trials):
        values = rng.beta(2, 3, size=200)  # true mean 0.4, skewed and bounded like gold scores
        low, high = bootstrap_ci(values, n_boot=500, seed=t)
        covered += low <= 0.4 <= high
    assert 0.89 <= covered / trials <= 0.99, covered / trials


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0, 1, 200)  # per-prompt difficulty shared by both stages
    before = np.clip(difficulty + rng.normal(0, 0.05, 200), 0, 1)
    after = np.clip(difficulty + 0.03 + rng.normal(0, 0.05, 200), 0, 1)
    gain, (low, high) = paired_gain(before, after)
    a, b = bootstrap_ci(before), bootstrap_ci(after)
    assert high - low < 0.5 * ((a[1] - a[0]) + (b[1] - b[0]))
    assert low > 0 and abs(gain - 0.03) < 0.02
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain([0.1, 0.2], [0.3])


def test_win_rate_counts_ties_half():
    rate, ci = win_rate([0.1, 0.5, 0.3, 0.3], [0.2, 0.4, 0.3, 0.9])  # win, loss, tie, win
    assert rate == pytest.approx(2.5 / 4)
    assert 0 <= ci[0] <= rate <= ci[1] <= 1
    assert win_rate([0.5] * 3, [0.5] * 3)[0] == 0.5


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def fake_evaluation(golds_greedy, golds_sampled, ids=None, kinds=None):
    def answer(g):
        return {"text": "x", "finished": True, "gold": g, "rm": None, "length": 3, "repetition": 0.0,
                "correct": 1.0, "complete": 1.0, "concise": 1.0, "clean": 1.0}
    ids = ids or [f"p{i}" for i in range(len(golds_greedy))]
    kinds = kinds or ["fact"] * len(ids)
    return {"name": "x", "config": {}, "chat": True,
            "prompts": [{"id": i, "kind": k, "greedy": answer(g), "sampled": [answer(x) for x in s], "policy": [],
                         "kl": None} for i, k, g, s in zip(ids, kinds, golds_greedy, golds_sampled)]}


def test_summary_and_pair_use_the_per_prompt_mean_of_samples():
    before = fake_evaluation([0.2, 0.4], [[0.2, 0.4], [0.0, 0.2]], kinds=["fact", "passage"])
    after = fake_evaluation([0.6, 0.4], [[0.6, 0.8], [0.1, 0.1]], kinds=["fact", "passage"])
    s = summarise(after)
    assert s["gold_sampled"] == pytest.approx((0.7 + 0.1) / 2) and s["gold_greedy"] == pytest.approx(0.5)
    assert set(s["by_kind"]) == {"fact", "passage"} and s["by_kind"]["fact"]["gold_sampled"] == pytest.approx(0.7)
    p = pair(before, after, "sft", "ppo")
    assert p["gain_sampled"] == pytest.approx(((0.7 - 0.3) + (0.1 - 0.1)) / 2)
    assert p["win_rate"] == pytest.approx(0.75)  # one win, one tie
    assert "ppo vs sft" in p["summary"]
    with pytest.raises(ValueError, match="different prompts"):
        pair(before, fake_evaluation([0.1, 0.1], [[0.1], [0.1]], ids=["p0", "other"]))


class FixedScorer:
    """A 'reward model' that scores an answer by a number written in it."""

    def __call__(self, records, responses):
        return [float(len(r)) for r in responses]


def test_best_of_n_keeps_the_highest_scored_answer_and_reports_its_kl(monkeypatch):
    import minigpt.evaluation as evaluation

    # 2 prompts x 4 samples; the reward model prefers longer answers, the judge prefers "good"
    texts = ["a", "good answer", "bbb", "cc", "good", "x", "yy", "zzzzzz"]
    monkeypatch.setattr(evaluation, "answer_chat", lambda *a, **k: evaluation.Answers(texts, [True] * 8, [[]] * 8))
    monkeypatch.setattr(evaluation, "score", lambda record, text, finished: {"score": 1.0 if "good" in text else 0.0})
    config = EvalConfig(best_of_n="2,4")
    records = [{"id": "a", "kind": "fact"}, {"id": "b", "kind": "fact"}]
    result = best_of_n(_Dummy(), None, records, FixedScorer(), config)
    four = result["4"]
    assert four["reward_model"] == pytest.approx((1.0 + 0.0) / 2)  # picks "good answer", then "zzzzzz"
    assert four["oracle"] == 1.0 and four["mean"] == pytest.approx(2 / 8)
    assert four["kl"] == pytest.approx(math.log(4) - 3 / 4)
    # n = 2 averages over the two disjoint pairs of each prompt
    assert result["2"]["reward_model"] == pytest.approx(((1 + 0) / 2 + (1 + 0) / 2) / 2)
    assert pick_best([0.1, 0.9, 0.9]) == 1
    # pairs in rankings of the smallest n (2): ("a", "good answer") and ("good", "x") agree (the judge's pick is
    # the longer); ("bbb", "cc") and ("yy", "zzzzzz") are gold ties, no pair
    assert result["pairwise"] == {"accuracy": 1.0, "ci": [1.0, 1.0], "prompts": 2, "pairs": 2, "answers_per_ranking": 2}
    # at another temperature and for chosen n: the sampler is asked for that temperature, the result says so
    temperatures = []
    monkeypatch.setattr(evaluation, "answer_chat", lambda model, tok, recs, sampling, *a, **k: temperatures.append(
        sampling.temperature) or evaluation.Answers(texts[:len(recs)], [True] * len(recs), [[]] * len(recs)))
    tempered = best_of_n(_Dummy(), None, records, FixedScorer(), config, temperature=0.7, ns=[2])
    assert temperatures == [0.7] and tempered["temperature"] == 0.7 and "4" not in tempered
    assert tempered["2"]["reward_model"] == pytest.approx((1.0 + 0.0) / 2)  # "good answer" over "a", "bbb" over "cc"


def test_pairwise_agreement_ranks_each_group_by_gold_and_counts_the_reward_models_agreeing_pairs():
    # one prompt, two groups of 3: gold orders (0.9, 0.5, 0.1) and (0.2, 0.2, 0.7)
    gold = [0.9, 0.5, 0.1, 0.2, 0.2, 0.7]
    rm = [3.0, 1.0, 2.0, 0.0, 5.0, 1.0]
    result = pairwise_agreement(gold, rm, n_prompts=1, per_prompt=6, k=3)
    # group 1: (0,1) yes, (0,2) yes, (1,2) no; group 2: the tie gives no pair, (2,0) yes, (2,1) no
    assert result["pairs"] == 5 and result["accuracy"] == pytest.approx(3 / 5)
    assert result["prompts"] == 1 and result["answers_per_ranking"] == 3
    # all ties: no pair, the prompt does not count; an rm tie is not agreement
    assert pairwise_agreement([0.5] * 4, [1, 2, 3, 4], 1, 4, 2)["prompts"] == 0
    assert pairwise_agreement([1.0, 0.0], [1.0, 1.0], 1, 2, 2)["accuracy"] == 0.0


class _Dummy:
    def eval(self):
        return self


def test_every_stage_is_evaluated_on_the_same_prompt_list(tiny_ppo):
    """SFT, base, PPO and compare answer exactly the held-out prompts `eval_records` lists."""
    run = tiny_ppo / "t"
    config = load_config(EvalConfig, "tiny")
    records = eval_records(run / "data", config)
    assert len(records) == config.prompts
    for path in (run / "sft" / "evaluation.json", run / "sft" / "evaluation_base.json", run / "ppo" / "evaluation.json"):
        evaluation = json.loads(path.read_text())
        check_same_prompts(evaluation, records)  # raises if a stage took another subset
        assert all(len(e["sampled"]) == config.samples for e in evaluation["prompts"])
    with pytest.raises(ValueError, match="other prompts"):
        check_same_prompts(json.loads((run / "ppo" / "evaluation.json").read_text()), records[1:])
    ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    for key in ("gain_sampled", "gain_greedy", "win_rate"):
        assert len(ppo[f"{key}_ci"]) == 2 and ppo[f"{key}_ci"][0] <= ppo[key] <= ppo[f"{key}_ci"][1]
    assert (run / "ppo" / "overoptimisation.png").stat().st_size > 1000
    best = json.loads((run / "reward" / "best_of_n.json").read_text())
    reward = json.loads((run / "reward" / "metrics.json").read_text())
    for pairwise, accuracy in ((best["pairwise"], reward["eval_pairwise_accuracy"]),
                               (best["eval_temperature"]["pairwise"], reward["eval_pairwise_accuracy_eval_temperature"])):
        assert pairwise["accuracy"] == accuracy and pairwise["answers_per_ranking"] == min(config.best_of_n_values)
        assert pairwise["prompts"] <= config.prompts and (pairwise["pairs"] == 0 or 0 <= accuracy <= 1)


def test_the_base_model_stops_at_its_first_newline_with_the_same_answers(tiny_pretrained):
    """A few-shot answer is its first line: stopping each row at its first newline token gives the answers
    that generating on to the end-of-text token and cutting at the newline gives."""
    from minigpt.checkpoint import load_causal_lm
    from minigpt.data import load_dialogues
    from minigpt.evaluation import answer_fewshot, fewshot_prefix, newline_ids, pick_fewshot_examples
    from minigpt.sampling import SamplingConfig, generate_in_batches
    from minigpt.tokenizer import Tokenizer

    run = tiny_pretrained / "t"
    tokenizer, model = Tokenizer.load(run / "pretrain"), load_causal_lm(run / "pretrain").eval()
    records = eval_records(run / "data", load_config(EvalConfig, "tiny"))
    examples = pick_fewshot_examples(load_dialogues(run / "data", "train"), 3)
    assert newline_ids(tokenizer) and all("\n" in tokenizer.decode([i]) for i in newline_ids(tokenizer))
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0)
    answers = answer_fewshot(model, tokenizer, records, examples, sampling, seed=5)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(fewshot_prefix(examples) + f"User: {r['messages'][-1]['content']}\n"
                                                     "Assistant:") for r in records]
    whole = generate_in_batches(model, prompts, sampling, stop_ids=[tokenizer.bos_id], pad_id=tokenizer.pad_id,
                                batch_size=256, seed=5)
    texts = [tokenizer.decode_without_specials(t) for t in whole.tokens]
    assert answers.responses == [t.split("\n")[0].strip() for t in texts]
    assert answers.finished == [f or "\n" in t for f, t in zip(whole.finished, texts)]
    assert sum(len(t) for t in answers.tokens) < sum(len(t) for t in whole.tokens)  # the lines after: not generated
