"""DPO, GRPO and RSFT beside PPO: ranking → pairs, best-of-k picks, the tiny stages, and GRPO against a toy reward."""

import json
import statistics

import pytest
import torch

from conftest import make
from minigpt.checkpoint import load_causal_lm, read_manifest, weights_hash
from minigpt.config import GRPOConfig, load_config
from minigpt.data import load_prompts, load_rankings
from minigpt.ppo import prompt_and_response_batch, response_logprobs
from minigpt.preference import best_of_each, grpo_trainer, pair_margins, preference_pairs, preference_rows
from minigpt.sampling import SamplingConfig, generate
from minigpt.tokenizer import Tokenizer


def test_ranking_gives_every_untied_pair_and_ties_give_none():
    ranks = [1, 0, 2, 1]  # responses 0 and 3 tie
    assert preference_pairs(ranks) == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]
    assert preference_pairs(ranks, "best") == [(1, 0), (1, 2), (1, 3)]
    assert preference_pairs([0, 0, 0]) == [] and preference_pairs([2, 2], "best") == []
    with pytest.raises(ValueError, match="pairs='worst'"):
        preference_pairs(ranks, "worst")


def test_preference_rows_put_the_better_response_on_the_chosen_side():
    prompt = [{"role": "user", "content": "What is Mara's job?"}]
    record = {"prompt": prompt, "responses": ["a baker", "a tailor", "Mara is a baker.", "no idea"],
              "ranks": [1, 2, 0, 2]}
    rows = preference_rows([record, {"prompt": prompt, "responses": ["x", "y"], "ranks": [0, 0]}])
    assert len(rows) == 5  # C(4,2) = 6 minus the tie; the all-tied ranking gives nothing
    assert all(r["prompt"] == prompt for r in rows)
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert ("Mara is a baker.", "a baker") in pairs and ("a baker", "no idea") in pairs
    assert ("a tailor", "no idea") not in pairs and ("no idea", "a tailor") not in pairs
    assert all(r["chosen"][0]["role"] == "assistant" for r in rows)


def test_tiny_dpo_raises_the_chosen_margin_and_writes_a_checkpoint_naming_sft(tiny_ppo):
    make("dpo", tiny_ppo)
    run = tiny_ppo / "t"
    out, sft_dir = run / "dpo", run / "sft"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_margin_after"] > metrics["train_margin_before"]
    for key in ("gold_before", "gold_after", "kl", "reward_before", "reward_after", "val_accuracy", "train_time_sec"):
        assert isinstance(metrics[key], float), key
    # The saved checkpoint, measured here on every pair of the run's rankings (most were trained on).
    rows = preference_rows(load_rankings(run / "samples" / "ranked.jsonl"))
    tokenizer = Tokenizer.load(out)
    dpo, sft = load_causal_lm(out), load_causal_lm(sft_dir)
    assert statistics.fmean(pair_margins(dpo, tokenizer, rows)) > statistics.fmean(pair_margins(sft, tokenizer, rows))
    manifest = read_manifest(out)
    assert manifest["stage"] == "dpo" and manifest["parent"] == str(sft_dir)
    assert manifest["parent_hash"] == weights_hash(sft_dir) != weights_hash(out)
    assert manifest["config"]["DPOConfig"]["beta"] > 0


def test_tiny_grpo_stage_writes_a_checkpoint_naming_sft_and_the_reward_model(tiny_ppo):
    make("grpo", tiny_ppo)
    run = tiny_ppo / "t"
    out = run / "grpo"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("gold_before", "gold_after", "kl", "reward_before", "reward_after", "train_time_sec"):
        assert isinstance(metrics[key], float), key
    assert metrics["steps"] == load_config(GRPOConfig, "tiny").steps
    manifest = read_manifest(out)
    assert manifest["stage"] == "grpo" and manifest["parent"] == str(run / "sft")
    assert manifest["reward_model"] == str(run / "reward") and manifest["config"]["GRPOConfig"]["beta"] > 0
    assert weights_hash(out) != weights_hash(run / "sft")
    Tokenizer.load(out)
    load_causal_lm(out)
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kl", 0) > 0 for r in curve)  # the KL term to the SFT model is live


def test_best_of_each_keeps_each_prompts_highest_scored_usable_answer():
    scores = [0.1, 0.9, 0.5, 2.0, -1.0, -0.5, 3.0, 3.0, 1.0]
    usable = [True, True, True, False, True, True, False, False, False]  # answer 3 never ended
    assert best_of_each(scores, usable, 3) == [1, 5, None]  # not 3 (unusable); none usable in the last group
    assert best_of_each([1.0, 1.0], [True, True], 2) == [0]  # a tie keeps the first
    with pytest.raises(ValueError, match="groups of k=4"):
        best_of_each(scores, usable, 4)


@torch.no_grad()
def answer_logprob(model, tokenizer, dialogues: list[dict]) -> float:
    """Mean over dialogues of log p(the assistant's answer + end | the prompt) under `model`."""
    prompts = [tokenizer.encode_prompt(d["messages"][:-1]) for d in dialogues]
    answers = [tokenizer.encode(d["messages"][-1]["content"]) + [tokenizer.end_id] for d in dialogues]
    ids, attention, mask, width = prompt_and_response_batch(prompts, answers, tokenizer.pad_id, "cpu")
    return (response_logprobs(model.eval(), ids, attention, width) * mask).sum(1).mean().item()


def test_tiny_rsft_learns_the_reward_models_best_answers_and_names_sft_and_the_reward_model(tiny_ppo):
    make("rsft", tiny_ppo)
    run = tiny_ppo / "t"
    out = run / "rsft"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("gold_before", "gold_after", "kl", "reward_before", "reward_after", "kept_reward_mean",
                "sample_reward_mean", "sft_val_loss_before", "sft_val_loss_after", "train_time_sec"):
        assert isinstance(metrics[key], float), key
    # one answer per prompt at most, each the best of its k answers that ended: not below their mean (equal where a
    # prompt has one such answer; an unfinished answer is never kept, so the mean over all k answers is no bound)
    kept = [json.loads(line) for line in (out / "best_answers.jsonl").read_text().splitlines()]
    prompts = load_prompts(run / "data", "ppo")
    assert 0 < len(kept) == metrics["kept_answers"] <= len(prompts)
    assert len({json.dumps(d["messages"][:-1]) for d in kept}) == len(kept)
    assert all(d["messages"][-1]["role"] == "assistant" and d["messages"][-1]["content"] for d in kept)
    assert metrics["kept_reward_mean"] >= metrics["usable_reward_mean"] - 1e-9
    # the saved model gives its kept answers more probability than the SFT model did
    tokenizer = Tokenizer.load(out)
    rsft, sft = load_causal_lm(out), load_causal_lm(run / "sft")
    assert answer_logprob(rsft, tokenizer, kept) > answer_logprob(sft, tokenizer, kept)
    manifest = read_manifest(out)
    assert manifest["stage"] == "rsft" and manifest["parent"] == str(run / "sft")
    assert manifest["reward_model"] == str(run / "reward") and manifest["config"]["RSFTConfig"]["k"] > 1


def vowel_share(text: str) -> float:
    return sum(c in "aeiou" for c in text) / max(1, len(text))


def test_tiny_grpo_raises_a_toy_reward(tiny_sft, tmp_path):
    """GRPO's machinery on our model: TRL samples with MiniGPTForCausalLM.generate, the toy reward
    (share of vowels) is dense, and a few rounds move the policy toward it."""
    tokenizer = Tokenizer.load(tiny_sft)
    prompts = load_prompts(tiny_sft.parent / "data", "ppo")

    def toy_reward(prompts, completions, completion_ids, **kwargs):
        return [vowel_share(c[-1]["content"]) for c in completions]

    def mean_reward(model):
        model.eval()
        encoded = [tokenizer.encode_prompt(p["messages"]) for p in prompts[:16]] * 4
        out = generate(model, encoded, SamplingConfig(max_new_tokens=16, temperature=1.0), stop_ids=[tokenizer.end_id],
                       pad_id=tokenizer.pad_id, generator=torch.Generator().manual_seed(1))
        return statistics.fmean(vowel_share(tokenizer.decode_without_specials(t)) for t in out.tokens)

    model = load_causal_lm(tiny_sft)
    before = mean_reward(model)
    config = load_config(GRPOConfig, "tiny", ["steps=8", "lr=1e-3"])
    trainer = grpo_trainer(model, [toy_reward], tokenizer, prompts, config, tmp_path, seed=0)
    trainer.train()
    assert mean_reward(trainer.model) > before + 0.02
