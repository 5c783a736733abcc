from pathlib import Path

import pytest
import torch

from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM, MiniGPTForSequenceClassification
from minigpt.ppo import (AdaptiveKLController, KLStop, TokenValueModel, assign_rewards, clipped_policy_loss,
                         clipped_value_loss, exact_kl, gae_advantages, health_verdict, kl_penalty,
                         leave_one_out_advantages, make_rollout, ppo_update, step_prompts, trained_prompts,
                         transfer_note, whiten)


def test_gae_and_returns_against_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.3  # last real token: no bootstrap
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]), atol=1e-6)


def test_clipped_policy_loss_clips_only_in_the_improving_direction():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    advantages = torch.tensor([[1.0, 1.0]])
    loss, clip_fraction, approx_kl = clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    # positive advantage: min(r·A, clip(r)·A) → 1.2 for r=1.5, 0.5 for r=0.5 (no benefit from clipping up)
    assert abs(loss.item() - -(1.2 + 0.5) / 2) < 1e-6
    assert abs(clip_fraction.item() - 0.5) < 1e-6
    expected_kl = ((1.5 - 1 - torch.log(torch.tensor(1.5))) + (0.5 - 1 - torch.log(torch.tensor(0.5)))) / 2
    assert abs(approx_kl.item() - expected_kl.item()) < 1e-6


def test_clipped_value_loss():
    values, old, returns, mask = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1)
    # unclipped error (2-1)^2 = 1; clipped prediction 0.5 → (0.5-1)^2 = 0.25; the max is kept
    assert abs(clipped_value_loss(values, old, returns, mask, 0.5).item() - 0.5 * 1.0) < 1e-6
    values = torch.tensor([[1.2]])  # inside the clip range: plain squared error
    assert abs(clipped_value_loss(values, old, returns, mask, 0.5).item() - 0.5 * 0.25) < 1e-6


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.4]))
    k1 = kl_penalty(logp, ref, "k1")
    assert torch.allclose(k1, logp - ref)
    k3 = kl_penalty(logp, ref, "k3")
    r = torch.exp(ref - logp)
    assert torch.allclose(k3, (r - 1) - torch.log(r))
    assert (k3 >= 0).all()
    # both are unbiased for KL(p‖q) when tokens are sampled from p
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    true_kl = (p * (p / q).log()).sum()
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(p.log()[x], q.log()[x], estimator).mean()
        assert abs(estimate - true_kl) < 0.01


def test_exact_kl_sums_over_the_vocabulary_and_pulls_tokens_the_sample_does_not_show():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    assert torch.allclose(exact_kl(p.log()[None, None], q.log()[None, None]), (p * (p / q).log()).sum())
    assert exact_kl(q.log()[None, None], q.log()[None, None]).abs().item() < 1e-7
    # the drawn token (0) has the reference's probability; the policy moved mass from token 2 to token 1
    ref = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    logits = torch.log(torch.tensor([0.5, 0.45, 0.05])).requires_grad_(True)
    drawn = torch.log_softmax(logits, -1)[0]
    kl_penalty(drawn, ref[0], "k3").backward()
    assert logits.grad.abs().max().item() < 1e-6  # k3 on the sampled token sees nothing to pull
    logits.grad = None
    exact_kl(torch.log_softmax(logits, -1)[None, None], ref[None, None]).sum().backward()
    assert logits.grad[1].item() > 0 > logits.grad[2].item()  # exact: token 1 pushed down, token 2 up


def test_whitening_over_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean().item()) < 1e-6 and abs(real.std(unbiased=False).item() - 1) < 1e-3
    assert w[0, 3] == 0


def test_adaptive_kl_moves_beta_toward_the_target():
    control = AdaptiveKLController(0.1, target=4.0, horizon=10)
    control.update(8.0, n_samples=1)
    assert control.beta > 0.1
    control = AdaptiveKLController(0.1, target=4.0, horizon=10)
    control.update(1.0, n_samples=1)
    assert control.beta < 0.1


def test_adaptive_kl_moves_slowly_over_many_steps_with_the_stage_batch():
    """The stage passes the rollouts of a step (64) and the horizon counts rollouts (10,000): after 24
    steps far below target beta shrinks by a few percent, not to zero (the bug: ×0.36 per step)."""
    from minigpt.config import PPOConfig

    config = PPOConfig()
    control = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    for _ in range(config.steps):
        control.update(0.0, config.prompts_per_step)
    floor = config.kl_coef * (1 - 0.2 * config.prompts_per_step / config.kl_horizon) ** config.steps
    assert control.beta >= floor - 1e-12 and control.beta > 0.9 * config.kl_coef
    for _ in range(config.steps):
        control.update(100.0, config.prompts_per_step)
    assert control.beta < 1.1 * config.kl_coef


def test_value_model_starts_as_the_reward_model(tmp_path):
    config = MiniGPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=32)
    torch.manual_seed(0)
    MiniGPTForSequenceClassification(config).save_pretrained(tmp_path)
    from minigpt.checkpoint import load_sequence_classifier

    reward_model = load_sequence_classifier(tmp_path)
    value_model = TokenValueModel(load_sequence_classifier(tmp_path))
    for (name, a), (_, b) in zip(reward_model.state_dict().items(), value_model.scorer.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(x)
    assert torch.allclose(value_model(x, mask)[:, -1], reward_model(x, attention_mask=mask).logits.squeeze(-1))


def test_value_model_starts_on_the_normalised_reward_scale(tmp_path):
    """PPO's rewards are (raw − mean)/std: the critic's first predictions must be on that scale."""
    config = MiniGPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=32)
    torch.manual_seed(0)
    reward_model = MiniGPTForSequenceClassification(config)
    value_model = TokenValueModel(reward_model, reward_mean=0.55, reward_std=1.45)
    x = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(x)
    raw = reward_model(x, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(value_model(x, mask)[:, -1], (raw - 0.55) / 1.45, atol=1e-6)


class ToyTokenizer:
    end_id, pad_id = 1, 0


class ToyConfig:
    max_new_tokens, temperature, top_k, top_p = 6, 1.0, 0, 1.0
    reward_clip, no_end_penalty, kl_estimator = 5.0, 0.0, "k1"
    gamma, lam = 1.0, 0.95
    ppo_epochs, minibatch_size, clip_range, clip_range_value, value_coef = 2, 16, 0.2, 0.2, 0.5
    grad_clip, target_approx_kl, ptx_coef, kl_loss_coef, kl_loss_estimator = 1.0, 1.0, 0.0, 0.0, "k3"
    advantage, samples_per_prompt = "gae", 1


def train_toy_policy(advantage: str) -> tuple[float, float]:
    """A toy reward that pays for token 7 in the answer: (its mean before, after 15 steps of PPO)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=12, n_layer=1, n_head=2, n_embd=16, block_size=32, pad_token_id=0)
    policy = MiniGPTForCausalLM(config)
    reference = MiniGPTForCausalLM(config)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    critic_free = advantage == "rloo"
    value_model = None if critic_free else TokenValueModel(MiniGPTForSequenceClassification(config))
    accelerator = Accelerator(cpu=True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    value_optimizer = None if critic_free else torch.optim.Adam(value_model.parameters(), lr=3e-3)
    prompts = [[2, 3, 4]] * 16 + [[5, 6]] * 16 if critic_free else [[2, 3, 4]] * 32
    toy = type("RLOOConfig", (ToyConfig,), {"advantage": "rloo", "samples_per_prompt": 4}) if critic_free else ToyConfig

    def reward_fn(tokens, finished):
        return torch.tensor([float(sum(t == 7 for t in row)) / 6 for row in tokens])

    def frequency():
        rollout = make_rollout(policy, reference, value_model, reward_fn, prompts, toy, ToyTokenizer,
                               torch.Generator().manual_seed(123))
        return rollout.raw_scores.mean().item()

    before = frequency()
    for step in range(15):
        rollout = make_rollout(policy, reference, value_model, reward_fn, prompts, toy, ToyTokenizer,
                               torch.Generator().manual_seed(step))
        assign_rewards(rollout, beta=0.01, config=toy)
        ppo_update(policy, value_model, policy_optimizer, value_optimizer, rollout, toy, accelerator,
                   generator=torch.Generator().manual_seed(step))
    return before, frequency()


def test_ppo_learns_to_say_the_rewarded_token():
    before, after = train_toy_policy("gae")
    assert after > before + 0.1, (before, after)


def test_critic_free_rloo_learns_to_say_the_rewarded_token():
    before, after = train_toy_policy("rloo")
    assert after > before + 0.1, (before, after)


def test_leave_one_out_advantage_against_a_hand_computed_example():
    # two prompts, k=3 answers each; prompt 2's returns are prompt 1's + 10: the same advantages
    returns = torch.tensor([1.0, 2.0, 6.0, 11.0, 12.0, 16.0])
    advantages = leave_one_out_advantages(returns, 3)
    by_hand = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5] * 2)  # R_i minus the mean of the other two
    scale = by_hand.pow(2).mean().sqrt()
    assert torch.allclose(advantages, by_hand / scale, atol=1e-5)
    assert torch.allclose(advantages[:3], advantages[3:])  # a prompt-wide offset cancels
    assert abs(advantages.view(2, 3).sum(1)).max() < 1e-5  # centred per prompt
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_advantages(returns, 1)
    with pytest.raises(ValueError, match="groups"):
        leave_one_out_advantages(returns, 4)


def summary(**changes):
    base = {"rm_sampled": 0.0, "gold_sampled": 0.6, "gold_greedy": 0.6, "kl": 0.0, "length": 10, "repetition": 0.0,
            "distinct": 1.0, "end_rate": 1.0}
    return {**base, **changes}


def gains(sampled, sampled_ci, greedy=0.0, greedy_ci=(-0.01, 0.01), win=0.5):
    return {"gain_sampled": sampled, "gain_sampled_ci": list(sampled_ci), "gain_greedy": greedy,
            "gain_greedy_ci": list(greedy_ci), "win_rate": win, "win_rate_ci": [win - 0.05, win + 0.05]}


def test_health_verdict_reads_the_gold_interval():
    before = summary()
    hacked = summary(rm_sampled=1.0, gold_sampled=0.4, kl=2.0)
    healthy, lines = health_verdict(before, hacked, gains(-0.2, (-0.25, -0.15)), kl_budget=6.0, history=[])
    assert not healthy and any("REWARD HACKING" in line for line in lines)
    good = summary(rm_sampled=0.8, gold_sampled=0.7, gold_greedy=0.7, kl=2.0)
    healthy, lines = health_verdict(before, good, gains(0.1, (0.05, 0.15), 0.1, (0.05, 0.15), 0.7), 6.0, [])
    assert healthy and lines[0].startswith("VERDICT: healthy — PPO improved")
    # a tiny change inside the noise is not "the gold judge agrees"
    tiny = summary(rm_sampled=0.8, gold_sampled=0.605, kl=2.0)
    healthy, lines = health_verdict(before, tiny, gains(0.005, (-0.03, 0.04)), 6.0, [])
    assert "no measurable gold gain" in lines[0] and any("no measurable change" in line for line in lines)
    assert not any("agrees" in line for line in lines)
    # sampled better, greedy not: sharpening
    _, lines = health_verdict(before, good, gains(0.1, (0.05, 0.15), 0.0, (-0.02, 0.02)), 6.0, [])
    assert any("lower entropy" in line for line in lines)
    runaway = summary(rm_sampled=0.8, length=40, end_rate=0.3, kl=9.0)
    healthy, lines = health_verdict(before, runaway, gains(0.0, (-0.1, 0.1)), 6.0, [])
    assert not healthy and any("length ran away" in line for line in lines) and any("over the budget" in l for l in lines)


def test_sequence_kl_is_the_kl_of_the_policy_on_its_own_samples():
    """Summed per-token log-ratios on samples from the policy estimate KL(policy‖reference); identical models: 0."""
    from minigpt.ppo import sequence_kl
    from minigpt.sampling import SamplingConfig, generate

    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=12, n_layer=1, n_head=2, n_embd=16, block_size=32, pad_token_id=0)
    policy, reference = MiniGPTForCausalLM(config).eval(), MiniGPTForCausalLM(config).eval()
    prompts = [[2, 3, 4]] * 400
    out = generate(policy, prompts, SamplingConfig(max_new_tokens=1, temperature=1.0), pad_id=0,
                   generator=torch.Generator().manual_seed(0))
    estimate = sum(sequence_kl(policy, reference, prompts, out.tokens, pad_id=0)) / len(prompts)
    with torch.no_grad():
        ids = torch.tensor([[2, 3, 4]])
        p = policy(input_ids=ids).logits[0, -1].log_softmax(-1)
        q = reference(input_ids=ids).logits[0, -1].log_softmax(-1)
    exact = (p.exp() * (p - q)).sum().item()
    assert abs(estimate - exact) < 0.25 * max(exact, 0.05) + 0.02, (estimate, exact)
    assert sequence_kl(policy, policy, prompts[:4], out.tokens[:4], pad_id=0) == [0.0] * 4


def test_the_ppo_reward_reads_the_text_the_judge_reads(tiny_sft):
    """An emitted special token must not reach the reward model as literal text (a channel the judge never sees)."""
    from minigpt.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_sft)
    ids = tokenizer.encode(" Mara lives in Oakford.") + [tokenizer.special_ids["<|user|>"]]
    text = tokenizer.response_text(ids)
    assert text == "Mara lives in Oakford." and "<|" not in text
    source = (Path(__file__).resolve().parents[1] / "stages" / "ppo.py").read_text()
    assert "tokenizer.response_text(t)" in source and "tokenizer.decode(t)" not in source


def test_kl_stop_reads_the_mean_of_the_last_steps_and_zero_never_stops():
    stop = KLStop(1.0, window=3)
    assert not stop.exceeded(5.0) and not stop.exceeded(0.1)  # one noisy step is not enough: the window is not full
    assert stop.exceeded(0.1)  # (5.0 + 0.1 + 0.1) / 3 > 1
    stop = KLStop(1.0, window=3)
    assert [stop.exceeded(kl) for kl in (0.8, 0.9, 1.0, 1.2, 1.4)] == [False, False, False, True, True]
    resumed = KLStop(1.0, window=3)
    resumed.load_state_dict(stop.state_dict())
    assert resumed.recent == [1.0, 1.2, 1.4] and resumed.exceeded(1.5)
    never = KLStop(0.0, window=1)
    assert not any(never.exceeded(kl) for kl in (10.0, 100.0))


def test_rollout_logprobs_are_those_of_the_temperature_the_answers_were_sampled_at():
    """PPO's ratios and KL must concern the distribution that drew the answers: at temperature T the
    log-probabilities come from softmax(logits / T), so exp(logprob) of a one-token answer matches
    how often that token is drawn."""
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=12, n_layer=1, n_head=2, n_embd=16, block_size=32, pad_token_id=0)
    policy = MiniGPTForCausalLM(config)
    with torch.no_grad():
        policy.lm_head.weight.mul_(8)  # a peaked distribution, so temperature changes it a lot
    reference = MiniGPTForCausalLM(config)
    reference.load_state_dict(policy.state_dict())
    toy = type("Tempered", (ToyConfig,), {"temperature": 0.5, "max_new_tokens": 1})
    prompts = [[2, 3, 4]] * 2000

    def reward_fn(tokens, finished):
        return torch.zeros(len(tokens))

    rollout = make_rollout(policy, reference, None, reward_fn, prompts, toy, ToyTokenizer, torch.Generator().manual_seed(0))
    first = torch.tensor([t[0] if t else ToyTokenizer.end_id for t in rollout.response_tokens])
    probability = rollout.logprobs[:, 0].exp()
    common = first.mode().values
    frequency = (first == common).float().mean().item()
    assigned = probability[first == common][0].item()
    with torch.no_grad():
        untempered = policy(input_ids=torch.tensor([[2, 3, 4]])).logits[0, -1].softmax(-1)[common].item()
    assert abs(untempered - frequency) > 0.1, "the toy must make temperature matter"
    assert abs(assigned - frequency) < 0.04, (assigned, frequency, untempered)
    assert rollout.kl.abs().max().item() < 1e-5  # the reference is the same model at the same temperature


@pytest.mark.parametrize("setting, named", [({"temperature": 0.0}, "temperature"), ({"top_k": 5}, "top_k"),
                                            ({"top_p": 0.9}, "top_p"), ({"advantage": "ppo2"}, "advantage"),
                                            ({"samples_per_prompt": 1}, "samples_per_prompt")])
def test_ppo_settings_it_cannot_run_are_refused_by_name(setting, named):
    from dataclasses import replace

    from minigpt.config import PPOConfig
    from minigpt.ppo import check_ppo_config

    check_ppo_config(PPOConfig(), world=1)  # the defaults run
    with pytest.raises(ValueError, match=named):
        check_ppo_config(replace(PPOConfig(), **setting), world=1)


@pytest.mark.parametrize("estimator", ["k3", "exact"])
def test_kl_loss_term_pulls_the_policy_back_toward_the_reference(estimator):
    """With nothing to gain (equal rewards: zero advantages) the only force left is kl_loss_coef's pull to SFT."""
    from accelerate import Accelerator

    from minigpt.ppo import sequence_kl

    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=12, n_layer=1, n_head=2, n_embd=16, block_size=32, pad_token_id=0)
    reference = MiniGPTForCausalLM(config).requires_grad_(False)
    policy = MiniGPTForCausalLM(config)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        policy.lm_head.weight.add_(0.3 * torch.randn_like(policy.lm_head.weight))  # drifted away from SFT
    prompts = [[2, 3, 4]] * 16

    def kl_and_step(coef: float) -> tuple[float, float]:
        toy = type("KLLoss", (ToyConfig,), {"advantage": "rloo", "samples_per_prompt": 4, "kl_loss_coef": coef,
                                            "kl_loss_estimator": estimator})
        rollout = make_rollout(policy, reference, None, lambda tokens, finished: torch.zeros(len(tokens)), prompts,
                               toy, ToyTokenizer, torch.Generator().manual_seed(1))
        before = sum(sequence_kl(policy, reference, prompts, rollout.response_tokens, pad_id=0))
        assign_rewards(rollout, beta=0.0, config=toy)
        optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
        for step in range(5):
            ppo_update(policy, None, optimizer, None, rollout, toy, Accelerator(cpu=True),
                       generator=torch.Generator().manual_seed(step))
        return before, sum(sequence_kl(policy, reference, prompts, rollout.response_tokens, pad_id=0))

    before, after = kl_and_step(0.0)
    assert after == pytest.approx(before, abs=1e-6)  # zero advantages, no KL term: nothing moves
    before, after = kl_and_step(1.0)
    assert after < 0.8 * before, (before, after)


def test_trained_prompts_are_the_prompts_the_steps_drew_first_drawn_first():
    from minigpt.config import PPOConfig

    config = PPOConfig(prompts_per_step=16, samples_per_prompt=4)
    drawn = [step_prompts(50, config, seed=3, step=s) for s in range(6)]
    assert all(len(d) == 4 == len(set(d)) for d in drawn)
    assert drawn[0] != drawn[1] and drawn[0] == step_prompts(50, config, seed=3, step=0)  # a function of the step
    trained = trained_prompts(50, config, seed=3, steps=6, limit=100)
    assert set(trained) == {i for d in drawn for i in d} and len(trained) == len(set(trained))
    assert trained[:4] == drawn[0]
    assert trained_prompts(50, config, seed=3, steps=6, limit=5) == trained[:5]
    assert trained_prompts(50, config, seed=3, steps=0, limit=5) == []


def test_transfer_note_says_when_a_gain_on_the_rewarded_prompts_does_not_carry_over():
    held_out = gains(0.04, (0.01, 0.07), -0.01, (-0.05, 0.03))
    trained = {**gains(0.19, (0.15, 0.22), 0.12, (0.08, 0.17)), "prompts": 200}
    note = transfer_note(held_out, trained)
    assert note.startswith("note  on 200 of its own training prompts: sampled +0.190 [+0.150, +0.220]")
    assert "greedy gain on the prompts it was rewarded on did not carry" in note  # sampled carried, greedy did not
    both = transfer_note(gains(0.04, (0.01, 0.07), 0.06, (0.02, 0.1)), trained)
    assert "did not carry" not in both
    neither = transfer_note(held_out, {**gains(0.0, (-0.03, 0.03)), "prompts": 200})
    assert "did not carry" not in neither
