"""PPO for language models, written out: rollouts, KL penalty, GAE, clipped losses, the health verdict.

One PPO step (InstructGPT / Ziegler et al. 2019):
  1. rollout   — the policy answers a batch of prompts (the library's KV-cached sampler);
  2. score     — the frozen reward model scores each answer (normalised with the reward stage's
                 mean/std, clipped; an answer that never ends is penalised);
  3. rewards   — per token: −β·KL(policy‖reference) at every token, plus the score at the last one;
  4. advantage — GAE(γ, λ) with the value model's estimates, whitened over the global batch; or,
                 critic-free (`advantage=rloo`, Ahmadian et al. 2024), each answer's return minus the
                 mean return of the other answers to the same prompt (k answers per prompt);
  5. update    — a few epochs over minibatches of the clipped policy loss and clipped value loss,
                 stopped early when the policy moved too far (approximate KL past a bound);
  6. β         — adapted so the KL to the reference stays near its target.

Tensors of a rollout are (B, R): B responses, R response positions; `mask` marks real tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.sampling import SamplingConfig, generate, left_pad

log = logging.getLogger(__name__)


# ---- the pieces, each small enough to check by hand ----------------------------------------------

def kl_penalty(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL(policy‖reference) estimate from sampled tokens (Schulman's k1 or k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio  # unbiased, can be negative per token
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # unbiased, always ≥ 0, lower variance
    raise ValueError(f"kl_estimator={estimator!r}: expected k1 or k3")


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1) if dim is not None else (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, accelerator=None, shift_mean=True):
    """Normalise to mean 0, std 1 over the real tokens of the *global* batch (all processes)."""
    total = torch.stack([(x * mask).sum(), mask.sum()])
    if accelerator is not None and accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    mean = total[0] / total[1].clamp(min=1)
    squares = (((x - mean) ** 2) * mask).sum()
    if accelerator is not None and accelerator.num_processes > 1:
        squares = accelerator.reduce(squares, reduction="sum")
    var = squares / total[1].clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae_advantages(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation, backwards over response positions.

    δ_t = r_t + γ·V_{t+1} − V_t (V after the last real token is 0); A_t = δ_t + γλ·A_{t+1}.
    Returns (advantages, returns = advantages + values), zero where mask is 0.
    """
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, device=rewards.device)
    next_advantage = torch.zeros(B, device=rewards.device)
    for t in reversed(range(R)):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * real
        # padding positions pass the future through untouched
        next_value = torch.where(real.bool(), values[:, t], next_value)
        next_advantage = torch.where(real.bool(), advantage, next_advantage)
    return advantages, (advantages + values) * mask


def leave_one_out_advantages(returns, group_size: int, accelerator=None):
    """RLOO: A_i = R_i − mean of R_j over the other answers j to the same prompt, scaled to unit std.

    `returns` (B,) holds `group_size` consecutive answers per prompt. The baseline is the prompt's own,
    so what the reward model scores alike for every answer to a prompt (how hard the prompt is, how
    likely its words are) cancels; only the ranking *within* a prompt — what a reward model trained on
    rankings of one prompt's answers knows — moves the policy. Unbiased: R_i's baseline excludes R_i.
    """
    k = group_size
    if k < 2 or returns.numel() % k:
        raise ValueError(f"rloo needs groups of k >= 2 answers per prompt; got k={k} for {returns.numel()} rollouts")
    grouped = returns.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    advantages = (grouped - baseline).reshape(-1)
    squares = torch.stack([(advantages ** 2).sum(), torch.tensor(float(advantages.numel()), device=returns.device)])
    if accelerator is not None and accelerator.num_processes > 1:
        squares = accelerator.reduce(squares, reduction="sum")
    return advantages * torch.rsqrt(squares[0] / squares[1] + 1e-8)  # already centred per prompt: scale only


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """PPO's clipped surrogate; also returns the clip fraction and the approximate KL (old‖new)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)  # k3 estimator, ≥ 0
    return loss, clip_fraction, approx_kl


def clipped_value_loss(values, old_values, returns, mask, clip_range: float):
    """Value loss with the new prediction kept within clip_range of the old one (PPO2)."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """β follows the measured KL toward a target (Ziegler et al. 2019): proportional, clipped ±20%.

    β ← β·(1 + clip(KL/target − 1, ±0.2) · n / horizon), with n the samples this update saw and the
    horizon counted in samples too (10,000 in the paper): with 64 rollouts a step β moves by at most
    0.13% per step, i.e. slowly and smoothly. (Passing n = 64 against a horizon counted in *steps*
    turned the controller into ×0.36 / ×1.64 per step and drove β to zero within ten steps.)
    """

    def __init__(self, beta: float, target: float, horizon: int, adaptive: bool = True):
        self.beta, self.target, self.horizon, self.adaptive = beta, target, horizon, adaptive

    def update(self, kl: float, n_samples: int) -> None:
        if self.adaptive and self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n_samples / self.horizon

    def state_dict(self):
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = state["beta"]


class KLStop:
    """Ends PPO once the policy has moved a given KL from the SFT model: the standard guard against
    over-optimising a reward model (Gao et al. 2022), where a fixed step count is not.

    The KL is each step's mean over its rollouts (nats per response, the budget's unit); the decision uses
    the mean of the last `window` steps, so one noisy batch does not end the run.
    """

    def __init__(self, limit: float, window: int = 4):
        self.limit, self.window, self.recent = limit, max(1, window), []

    @property
    def mean(self) -> float:
        return sum(self.recent) / max(1, len(self.recent))

    def exceeded(self, kl: float) -> bool:
        self.recent = (self.recent + [kl])[-self.window:]
        return self.limit > 0 and len(self.recent) == self.window and self.mean > self.limit

    def state_dict(self):
        return {"recent": list(self.recent)}

    def load_state_dict(self, state):
        self.recent = list(state.get("recent", []))


def step_prompts(n_prompts: int, config, seed: int, step: int) -> list[int]:
    """The distinct prompts (indices) PPO answers at `step`, each `samples_per_prompt` times: a fixed
    function of the seed and the step, the same on every process and after a resume."""
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + step))
    return order[:config.prompts_per_step // config.samples_per_prompt].tolist()


def trained_prompts(n_prompts: int, config, seed: int, steps: int, limit: int) -> list[int]:
    """Up to `limit` prompts the first `steps` steps answered, in the order first drawn: what the policy was
    rewarded on, to hold its held-out gain against (a gain there but not held out did not transfer)."""
    seen: dict[int, None] = {}
    for step in range(steps):
        seen.update(dict.fromkeys(step_prompts(n_prompts, config, seed, step)))
    return list(seen)[:limit]


def transfer_note(held_out: dict, trained: dict) -> str:
    """A verdict line: the gain on prompts the policy was rewarded on beside the held-out gain (`pair`s)."""
    from minigpt.stats import significance

    figure = lambda g, key: f"{g[key]:+.3f} [{g[key + '_ci'][0]:+.3f}, {g[key + '_ci'][1]:+.3f}]"  # noqa: E731
    line = (f"note  on {trained['prompts']} of its own training prompts: sampled {figure(trained, 'gain_sampled')}, "
            f"greedy {figure(trained, 'gain_greedy')} (held out: {held_out['gain_sampled']:+.3f} / "
            f"{held_out['gain_greedy']:+.3f})")
    for decoding in ("sampled", "greedy"):
        key = f"gain_{decoding}"
        learnt = significance(trained[key], trained[key + "_ci"]) == "better"
        if learnt and significance(held_out[key], held_out[key + "_ci"]) != "better":
            return line + f": the {decoding} gain on the prompts it was rewarded on did not carry to new ones"
    return line


def repetition_rate(tokens: list[int], n: int = 3) -> float:
    """Share of the response's n-grams that already appeared earlier in it."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def check_ppo_config(config, world: int) -> None:
    """A ValueError naming the setting that cannot run (checked before any model is loaded)."""
    k = config.samples_per_prompt
    if config.advantage not in ("gae", "rloo"):
        raise ValueError(f"advantage={config.advantage!r}: expected gae (value model) or rloo (critic-free)")
    if k < 1 or (config.advantage == "rloo" and k < 2):
        raise ValueError(f"samples_per_prompt={k}: rloo compares each answer with the prompt's other "
                         f"answers, so it needs samples_per_prompt >= 2 (e.g. 4)")
    if not config.temperature > 0:
        raise ValueError(f"temperature={config.temperature}: PPO samples its rollouts and needs a temperature > 0 "
                         f"(1.0 = the model's own distribution)")
    if config.top_k or config.top_p < 1.0:
        # truncated sampling draws from a distribution the policy's log-probabilities do not describe
        raise ValueError(f"top_k={config.top_k}, top_p={config.top_p}: PPO's ratios and KL need rollouts from the "
                         f"policy's whole distribution; leave top_k=0 and top_p=1.0 (set temperature instead)")
    if config.kl_loss_estimator not in ("k3", "exact"):
        raise ValueError(f"kl_loss_estimator={config.kl_loss_estimator!r}: expected k3 (the sampled token's "
                         f"estimate) or exact (the sum over the vocabulary)")
    if (config.prompts_per_step // world) % k:
        raise ValueError(f"prompts_per_step={config.prompts_per_step} answers over {world} processes must give "
                         f"each process whole groups of samples_per_prompt={k} answers to one prompt")


# ---- model passes ----------------------------------------------------------------------------------

def response_logprobs(model, ids, attention_mask, prompt_width: int, with_entropy: bool = False,
                      temperature: float = 1.0, with_distribution: bool = False):
    """Log-probabilities (B, R) of the response tokens, from the logits one position earlier.

    At `temperature` T these are the log-probabilities of the policy that samples at T
    (softmax(logits / T)): PPO's ratios, its KL and the gradient then all concern the distribution the
    answers were actually drawn from. `with_entropy` adds each position's entropy (B, R);
    `with_distribution` adds each position's whole log-distribution (B, R, V), last.
    """
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, prompt_width - 1:-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, -1)
    out = (logprobs.gather(-1, ids[:, prompt_width:, None]).squeeze(-1),)
    if with_entropy:
        out += (-(logprobs.exp() * logprobs).sum(-1),)
    if with_distribution:
        out += (logprobs,)
    return out[0] if len(out) == 1 else out


def exact_kl(logprobs, ref_logprobs):
    """KL(policy‖reference) at each position (B, R), summed over the whole vocabulary: (B, R, V) inputs.

    As a loss it pulls every token's probability toward the reference at every position the rollouts
    visit, including tokens the reward is indifferent to and tokens that were not drawn; k3 on the
    sampled token pulls only the token drawn, and not at all where its probability equals the reference's.
    """
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


def uses_exact_kl_loss(config) -> bool:
    return config.kl_loss_coef > 0 and config.kl_loss_estimator == "exact"


class TokenValueModel(torch.nn.Module):
    """The value model: the reward model's backbone and score head, read at every position.

    It starts on the scale of the rewards it must predict: PPO normalises reward-model scores as
    (raw − mean)/std, so the head's output is mapped the same way (a fixed affine map; the head and
    backbone train as usual). Raw reward-model units would leave the critic off by the mean for many
    steps under the value clip, biasing the advantages most at the end token — a push on length.
    A module of its own (not a call into the backbone) so DDP sees its forward and syncs gradients.
    """

    def __init__(self, scorer, reward_mean: float = 0.0, reward_std: float = 1.0):
        super().__init__()
        self.scorer = scorer  # a MiniGPTForSequenceClassification, initialised from the reward model
        self.reward_mean, self.reward_std = float(reward_mean), float(reward_std or 1.0)

    def forward(self, input_ids, attention_mask):
        hidden = self.scorer.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        raw = self.scorer.score(hidden).squeeze(-1).float()  # (B, T)
        return (raw - self.reward_mean) / self.reward_std


def token_values(value_model, ids, attention_mask, prompt_width: int):
    """V of the state before each response token, (B, R)."""
    return value_model(ids, attention_mask)[:, prompt_width - 1:-1]


# ---- a rollout ---------------------------------------------------------------------------------------

def prompt_and_response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """(ids, attention_mask, response_mask, P): left-padded prompts then right-padded responses.

    Shapes (B, P+R), (B, P+R), (B, R); P is the prompt width, so response token t sits at P + t.
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    R = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(prompts), R), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), R), device=device)
    for row, r in enumerate(responses):
        response_ids[row, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[row, :len(r)] = 1
    ids = torch.cat([prompt_ids, response_ids], 1)
    return ids, torch.cat([prompt_mask, mask.long()], 1), mask, prompt_ids.size(1)


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P+R) left-padded prompt, then the response (incl. its end token)
    attention_mask: torch.Tensor  # (B, P+R)
    prompt_width: int  # P
    mask: torch.Tensor  # (B, R) real response tokens
    response_tokens: list[list[int]]  # without the end token
    finished: list[bool]
    logprobs: torch.Tensor  # (B, R) under the policy that sampled
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # None without a value model (rloo)
    scores: torch.Tensor  # (B,) the reward before the KL penalty (normalised, clipped, penalised)
    raw_scores: torch.Tensor  # (B,) what the reward function returned
    kl: torch.Tensor  # (B, R) per-token KL estimate
    ref_distribution: torch.Tensor | None = None  # (B, R, V) the reference's log-probabilities (exact KL loss only)
    rewards: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None


@torch.no_grad()
def make_rollout(policy, reference, value_model, reward_fn, prompts: list[list[int]], config, tokenizer,
                 generator=None) -> Rollout:
    """Sample answers to `prompts` and evaluate everything PPO needs about them.

    `reward_fn(response_tokens, finished) -> (B,) tensor of raw scores` (the reward model, or a toy).
    """
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_k, config.top_p)
    policy.eval()
    out = generate(policy, prompts, sampling, stop_ids=[tokenizer.end_id], pad_id=tokenizer.pad_id,
                   generator=generator)
    device = next(policy.parameters()).device
    responses = [t + ([tokenizer.end_id] if f else []) for t, f in zip(out.tokens, out.finished)]
    ids, attention_mask, mask, P = prompt_and_response_batch(prompts, responses, tokenizer.pad_id, device)

    logprobs = response_logprobs(policy, ids, attention_mask, P, temperature=config.temperature) * mask
    ref_distribution = None  # the exact KL loss needs the reference's whole distribution at each position
    if uses_exact_kl_loss(config):
        ref_logprobs, ref_distribution = response_logprobs(reference, ids, attention_mask, P,
                                                           temperature=config.temperature, with_distribution=True)
        ref_logprobs = ref_logprobs * mask
    else:
        ref_logprobs = response_logprobs(reference, ids, attention_mask, P, temperature=config.temperature) * mask
    # critic-free (rloo) runs have no value model: their baseline is the prompt's other answers
    values = token_values(value_model, ids, attention_mask, P) * mask if value_model is not None else None
    raw = reward_fn(out.tokens, out.finished).to(device).float()
    scores = raw.clamp(-config.reward_clip, config.reward_clip)
    scores = scores + torch.tensor([0.0 if f else config.no_end_penalty for f in out.finished], device=device)
    kl = kl_penalty(logprobs, ref_logprobs, config.kl_estimator) * mask
    return Rollout(ids, attention_mask, P, mask, out.tokens, out.finished, logprobs, ref_logprobs, values,
                   scores, raw, kl, ref_distribution=ref_distribution)


def assign_rewards(rollout: Rollout, beta: float, config, accelerator=None) -> None:
    """Per-token rewards (−β·KL, plus the score on the last token), then the advantages.

    gae: GAE with the value model, whitened. rloo: one return per answer (score − β·ΣKL), its
    leave-one-out advantage spread over the answer's tokens; no value model.
    """
    rewards = -beta * rollout.kl
    last = (rollout.mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += rollout.scores
    rollout.rewards = rewards
    if config.advantage == "rloo":
        sequence_returns = rewards.sum(1)
        advantages = leave_one_out_advantages(sequence_returns, config.samples_per_prompt, accelerator)
        rollout.advantages = advantages[:, None] * rollout.mask
        rollout.returns = sequence_returns[:, None] * rollout.mask
        return
    advantages, returns = gae_advantages(rewards, rollout.values, rollout.mask, config.gamma, config.lam)
    rollout.advantages = whiten(advantages, rollout.mask, accelerator)
    rollout.returns = returns


def ppo_update(policy, value_model, policy_optimizer, value_optimizer, rollout: Rollout, config,
               accelerator, ptx_batch_fn=None, generator=None) -> dict:
    """PPO epochs over minibatches; stops early when the approximate KL passes its bound."""
    policy.train()
    if value_model is not None:
        value_model.train()
    B = rollout.ids.size(0)
    # minibatch_size counts the rollouts of all processes, as prompts_per_step does: each process
    # takes its share, so 1 and N processes make the same number of optimiser steps.
    minibatch = max(1, config.minibatch_size // accelerator.num_processes)
    stats = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": [], "clip_fraction": [],
             "ptx_loss": [], "kl_loss": []}
    stopped_early = False
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, minibatch):
            idx = order[start:start + minibatch].to(rollout.ids.device)
            ids, attention, mask = rollout.ids[idx], rollout.attention_mask[idx], rollout.mask[idx]
            exact = uses_exact_kl_loss(config)
            logprobs, entropy, *distribution = response_logprobs(
                policy, ids, attention, rollout.prompt_width, with_entropy=True, temperature=config.temperature,
                with_distribution=exact)
            loss, clip_fraction, approx_kl = clipped_policy_loss(
                logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, config.clip_range)
            if config.kl_loss_coef > 0:  # the pull toward SFT as a loss term, beside the penalty in the reward
                kl_loss = masked_mean(exact_kl(distribution[0], rollout.ref_distribution[idx]) if exact
                                      else kl_penalty(logprobs, rollout.ref_logprobs[idx], "k3"), mask)
                loss = loss + config.kl_loss_coef * kl_loss
                stats["kl_loss"].append(kl_loss.item())
            if ptx_batch_fn is not None and config.ptx_coef > 0:  # PPO-ptx: keep the pretraining skill
                inputs, targets = ptx_batch_fn()
                logits = policy(input_ids=inputs.to(ids.device)).logits
                ptx = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.to(ids.device).reshape(-1))
                loss = loss + config.ptx_coef * ptx
                stats["ptx_loss"].append(ptx.item())
            policy_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(policy.parameters(), config.grad_clip)
            policy_optimizer.step()

            if value_model is not None:
                values = token_values(value_model, ids, attention, rollout.prompt_width)
                v_loss = config.value_coef * clipped_value_loss(values, rollout.values[idx], rollout.returns[idx],
                                                                mask, config.clip_range_value)
                value_optimizer.zero_grad(set_to_none=True)
                accelerator.backward(v_loss)
                accelerator.clip_grad_norm_(value_model.parameters(), config.grad_clip)
                value_optimizer.step()
                stats["value_loss"].append(v_loss.item())

            stats["policy_loss"].append(loss.item())
            stats["entropy"].append(masked_mean(entropy.detach(), mask).item())
            stats["clip_fraction"].append(clip_fraction.item())
            stats["approx_kl"].append(approx_kl.item())
        kl_now = torch.tensor(stats["approx_kl"][-1], device=rollout.ids.device)
        if accelerator.num_processes > 1:
            kl_now = accelerator.reduce(kl_now, reduction="mean")
        if kl_now.item() > config.target_approx_kl:
            stopped_early = epoch < config.ppo_epochs - 1
            break
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out["early_stop"] = float(stopped_early)
    return out


def rollout_stats(rollout: Rollout, accelerator=None) -> dict:
    """What one rollout says about the policy: score, KL, length, ends, repetition, value fit."""
    mask = rollout.mask
    stats = {
        "rm_score": rollout.raw_scores.mean().item(),
        "score": rollout.scores.mean().item(),
        "kl": rollout.kl.sum(1).mean().item(),  # nats per response
        "response_length": mask.sum(1).mean().item(),
        "end_rate": sum(rollout.finished) / len(rollout.finished),
        "repetition_rate": sum(repetition_rate(t) for t in rollout.response_tokens) / len(rollout.response_tokens),
    }
    if rollout.values is not None:  # how well the critic predicts the returns
        returns, values, real = rollout.returns, rollout.values, mask.bool()
        var_returns = returns[real].var() if real.sum() > 1 else torch.tensor(0.0)
        explained = 1 - (returns[real] - values[real]).var() / var_returns if var_returns > 0 else torch.tensor(0.0)
        stats["explained_variance"] = explained.item()
    if accelerator is not None and accelerator.num_processes > 1:
        keys = list(stats)
        reduced = accelerator.reduce(torch.tensor([stats[k] for k in keys], device=rollout.ids.device), "mean")
        stats = dict(zip(keys, reduced.tolist()))
    return stats


# ---- the verdict -------------------------------------------------------------------------------------

def health_verdict(before: dict, after: dict, gains: dict, kl_budget: float, history: list[dict]) -> tuple[bool, list[str]]:
    """Plain-words health of a PPO run, from the shared evaluation of the starting and the PPO policy.

    `before`/`after`: `evaluation.summarise` of each; `gains`: `evaluation.pair(before, after)`, whose
    paired 95% intervals decide whether the gold judge saw a change at all.
    """
    from minigpt.stats import significance

    lines, healthy = [], True

    def check(ok: bool, good: str, bad: str):
        nonlocal healthy
        healthy &= ok
        lines.append(("ok    " if ok else "WARN  ") + (good if ok else bad))

    rise = after["rm_sampled"] - before["rm_sampled"]
    check(rise > 0, f"reward rose: reward-model score {before['rm_sampled']:+.3f} -> {after['rm_sampled']:+.3f}",
          f"reward did not rise: reward-model score {before['rm_sampled']:+.3f} -> {after['rm_sampled']:+.3f}")
    check(after["kl"] <= kl_budget, f"KL to the SFT model {after['kl']:.2f} nats/response, within the budget of {kl_budget:.1f}",
          f"KL to the SFT model {after['kl']:.2f} nats/response is over the budget of {kl_budget:.1f}")
    check(after["length"] <= 1.5 * before["length"] + 2 and after["end_rate"] >= min(0.9, before["end_rate"] - 0.1),
          f"length stayed in bounds ({before['length']:.1f} -> {after['length']:.1f} tokens, "
          f"{after['end_rate']:.0%} of answers end)",
          f"length ran away ({before['length']:.1f} -> {after['length']:.1f} tokens, "
          f"{after['end_rate']:.0%} of answers end)")
    check(after["repetition"] <= before["repetition"] + 0.1,
          f"no repetition blow-up ({before['repetition']:.2f} -> {after['repetition']:.2f} repeated 3-grams)",
          f"repetition grew ({before['repetition']:.2f} -> {after['repetition']:.2f} repeated 3-grams)")
    check(after["distinct"] >= 0.5 * before["distinct"],
          f"no collapse: {after['distinct']:.0%} of answers to different prompts are distinct "
          f"(before {before['distinct']:.0%})",
          f"the policy collapsed: only {after['distinct']:.0%} of answers are distinct (before {before['distinct']:.0%})")
    if gains.get("gain_sampled") is None:  # prompts without judge records: no gold figures at all
        from minigpt.judge import NO_JUDGE_NOTE

        lines.append(f"note  {NO_JUDGE_NOTE}: whether the reward rise is real, read the answers")
        lines.insert(0, "VERDICT: healthy (reward-model figures only)" if healthy
                     else "VERDICT: needs attention — see the warnings below")
        return healthy, lines
    sampled = significance(gains["gain_sampled"], gains["gain_sampled_ci"])
    greedy = significance(gains["gain_greedy"], gains["gain_greedy_ci"])
    ci = lambda key: f"95% CI {gains[key][0]:+.3f} to {gains[key][1]:+.3f}"  # noqa: E731
    gold_line = (f"gold {before['gold_sampled']:.3f} -> {after['gold_sampled']:.3f} sampled "
                 f"({gains['gain_sampled']:+.3f}, {ci('gain_sampled_ci')}), greedy {before['gold_greedy']:.3f} -> "
                 f"{after['gold_greedy']:.3f} ({gains['gain_greedy']:+.3f}, {ci('gain_greedy_ci')}); "
                 f"wins on {gains['win_rate']:.0%} of prompts")
    if rise > 0 and sampled == "worse":
        check(False, "", f"REWARD HACKING: the reward model's score rose ({rise:+.3f}) while the gold judge's fell "
                         f"beyond its interval: {gold_line}")
    elif sampled == "worse":
        check(False, "", f"gold fell: {gold_line}")
    elif sampled == "better":
        lines.append(f"ok    the gold judge agrees: {gold_line}")
    else:
        lines.append(f"note  no measurable change in gold: {gold_line}")
    if sampled == "better" and greedy != "better":
        lines.append("note  the gold gain holds sampled but not greedy: lower entropy, not better answers")
    golds = [h["gold_sampled"] for h in history if "gold_sampled" in h]
    if len(golds) >= 3 and max(golds) - golds[-1] > 0.05:
        lines.append(f"note  gold peaked at {max(golds):.3f} before the end ({golds[-1]:.3f}): "
                     f"fewer steps or a smaller KL target may do better")
    improved = healthy and sampled == "better"
    lines.insert(0, "VERDICT: healthy — PPO improved the policy (gold gain above zero at 95%)" if improved
                 else "VERDICT: healthy, but no measurable gold gain" if healthy
                 else "VERDICT: needs attention — see the warnings below")
    return healthy, lines


def sequence_kl(policy, reference, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                batch_size: int = 64) -> list[float]:
    """Per-response Σ_t log π(y_t) − log π_ref(y_t) on the given token ids (k1, nats).

    On responses sampled from `policy` itself at temperature 1 (end token included when the answer
    ended), the mean is an unbiased estimate of KL(policy‖reference) per response — the quantity the
    PPO budget is defined on. Re-encoding decoded text, or sampling at another temperature, is not.
    """
    device = next(policy.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids, attention, mask, P = prompt_and_response_batch(prompts[start:start + batch_size],
                                                                responses[start:start + batch_size], pad_id, device)
            kl = (response_logprobs(policy, ids, attention, P) - response_logprobs(reference, ids, attention, P)) * mask
            out.extend(kl.sum(1).tolist())
    return out
