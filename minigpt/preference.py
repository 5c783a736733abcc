"""DPO, GRPO and rejection sampling beside PPO, through TRL: rankings become preference pairs, the reward model
becomes a reward function or picks the answers to learn.

DPO (`DPOTrainer`) learns the rankings directly: no reward model, no sampling; the loss raises the
log-probability gap between the preferred and the other response of a pair, measured against the
SFT model's gap (the reference), so `beta` acts as a KL leash.

GRPO (`GRPOTrainer`) samples k answers per prompt, scores them with the run's reward model, and
uses each answer's score against its group's mean as the advantage: no value model. A KL term to
the SFT model sits in the loss (beta > 0). GRPO rather than RLOO: both drop PPO's critic for a
group baseline, but GRPOTrainer is the one the recipes people copy today use (DeepSeekMath, R1),
and its clipped multi-pass updates (`epochs_per_step`) let it spend PPO's budget of gradient steps
per round of generations; RLOO's leave-one-out baseline is the same idea with the group mean
taken without the answer itself.

Rejection-sampling fine-tuning (RSFT, Llama 2's first RLHF step) samples k answers per prompt,
keeps the reward model's best finished one, and fine-tunes the SFT model on those answers with
`SFTTrainer` and the SFT loss: best-of-k distilled into the policy, no policy gradient at all. The
policy moves only as far as one round of its own best answers takes it, so it needs no KL term.

The trainers get our model and the SFT stage's chat template (`Tokenizer.to_transformers()`);
TRL's generation (GRPO) runs `MiniGPTForCausalLM.generate` and stops at `<|end|>`, the template's
end-of-turn token, which the fast tokenizer declares as its eos token.
"""

from __future__ import annotations

import copy
import logging
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset

from minigpt.evaluation import (add_reward_scores, answer_chat, before_after_metrics, eval_records, evaluate, headline,
                                load_evaluation, log_examples, pair, summarise)
from minigpt.ppo import prompt_and_response_batch, response_logprobs
from minigpt.ranking import ranking_pairs
from minigpt.reward_model import RewardScorer, load_reward_scorer
from minigpt.sampling import SamplingConfig
from minigpt.trainer_glue import common_training_arguments, per_device_batch, world_size

log = logging.getLogger(__name__)

PAIR_CHOICES = ("all", "best")


# ---- DPO: rankings → preference pairs ------------------------------------------------------------

def preference_pairs(ranks: list[int], which: str = "all") -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of one K-way ranking; ties give no pair.

    `all` (the default) takes every untied pair, C(K,2) for a strict ranking: exactly the
    comparisons the reward model is trained on, so DPO and the reward model (hence PPO and GRPO)
    learn from the same evidence, and a K-way ranking gives K-1 times the pairs of a best-vs-worst
    choice. A middle-ranked response is chosen in some pairs and rejected in others: its
    log-probability is pushed both ways, which is what its rank says. `best` takes only the top
    response against each lower one (the UltraFeedback-binarised habit): the chosen side is always
    an answer the labeller liked most, at the cost of the comparisons among the others.
    """
    if which not in PAIR_CHOICES:
        raise ValueError(f"pairs={which!r}: expected one of {', '.join(PAIR_CHOICES)}")
    pairs = ranking_pairs(ranks)
    if which == "best":
        top = min(ranks)
        pairs = [(i, j) for i, j in pairs if ranks[i] == top]
    return pairs


def preference_rows(rankings: list[dict], which: str = "all") -> list[dict]:
    """Ranking records → TRL's conversational preference rows {prompt, chosen, rejected}."""
    rows = []
    for record in rankings:
        for i, j in preference_pairs(record["ranks"], which):
            rows.append({"prompt": list(record["prompt"]),
                         "chosen": [{"role": "assistant", "content": record["responses"][i]}],
                         "rejected": [{"role": "assistant", "content": record["responses"][j]}]})
    return rows


def dpo_trainer(model, tokenizer, train_rows: list[dict], eval_rows: list[dict], config, out_dir: Path, seed: int,
                callbacks=()):
    """TRL's DPOTrainer on our model, chat template and run-dir mechanics."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    precompute = world_size() == 1
    training_args = TRLDPOConfig(
        **common_training_arguments(out_dir, config, seed),
        per_device_train_batch_size=per_device_batch(config.batch_size, "batch_size"),
        per_device_eval_batch_size=per_device_batch(config.batch_size, "batch_size"),
        gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length,
        beta=config.beta,
        loss_type=[config.loss_type],
        disable_dropout=True,
        # The reference is the SFT model, which is also the policy before its first step: on one
        # process its log-probabilities are computed once over the pairs instead of a second forward
        # per step (a resumed run recomputes them from the freshly loaded SFT weights, before the
        # Trainer checkpoint is restored). Under several processes TRL 1.16 writes that cache to each
        # process's own temporary folder for an in-memory dataset and the others cannot find it, so
        # there the reference is a frozen copy of the SFT model, run at every step.
        precompute_ref_log_probs=precompute,
        dataset_num_proc=None,
    )
    reference = None if precompute else copy.deepcopy(model).eval().requires_grad_(False)
    return DPOTrainer(model=model, ref_model=reference, args=training_args, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                      processing_class=tokenizer.to_transformers(), callbacks=list(callbacks))


@torch.no_grad()
def pair_margins(model, tokenizer, rows: list[dict], max_length: int = 256, batch_size: int = 64) -> list[float]:
    """log p(chosen) − log p(rejected) per preference row, under `model` (summed over the response tokens)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def logps(side: str) -> list[float]:
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [tokenizer.encode_prompt(r["prompt"]) for r in chunk]
            responses = [tokenizer.encode(r[side][0]["content"]) + [tokenizer.end_id] for r in chunk]
            responses = [resp[:max(1, max_length - len(p))] for p, resp in zip(prompts, responses)]
            ids, attention, mask, width = prompt_and_response_batch(prompts, responses, tokenizer.pad_id, device)
            out.extend((response_logprobs(model, ids, attention, width) * mask).sum(1).tolist())
        return out

    margins = [c - r for c, r in zip(logps("chosen"), logps("rejected"))]
    model.train(was_training)
    return margins


# ---- GRPO: the reward model as a reward function ---------------------------------------------------

class RewardModelReward:
    """The run's reward as a TRL reward function: normalised, clipped, penalised like PPO's reward.

    The score is the reward stage's `RewardScorer` (head + SFT confidence, (raw − reward_mean) /
    reward_std over the SFT samples, so 0 is a typical SFT answer), clipped to ±`clip`, plus
    `no_end_penalty` for an answer that never reached `<|end|>`: the same reward PPO optimises, so
    the two compare like with like.
    """

    __name__ = "reward_model"  # TRL logs `rewards/<name>/mean`

    def __init__(self, scorer: RewardScorer, clip: float = 5.0, no_end_penalty: float = 0.0):
        self.scorer, self.clip, self.no_end_penalty = scorer, clip, no_end_penalty

    @classmethod
    def load(cls, reward_dir: Path, **kwargs) -> "RewardModelReward":
        """From a reward stage folder, with the weights and normalisation its manifest records."""
        scorer = load_reward_scorer(reward_dir)
        if scorer is None:
            raise FileNotFoundError(f"{reward_dir}: no finished reward model (metrics.json)")
        return cls(scorer, **kwargs)

    def to(self, device) -> "RewardModelReward":
        self.scorer.to(device)
        return self

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        texts = [c[-1]["content"].strip() if isinstance(c, list) else c.strip() for c in completions]
        scores = self.scorer.normalised(prompts, texts).clamp(-self.clip, self.clip)
        ended = [bool(ids) and ids[-1] == self.scorer.tokenizer.end_id for ids in completion_ids]
        return [s + (0.0 if e else self.no_end_penalty) for s, e in zip(scores.tolist(), ended)]


def grpo_trainer(model, reward_funcs, tokenizer, prompts: list[dict], config, out_dir: Path, seed: int,
                 callbacks=()):
    """TRL's GRPOTrainer on our model and chat template, with PPO's budget (see GRPOConfig)."""
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    completions = config.prompts_per_step * config.k  # one round of generations (global)
    if completions % config.minibatches:
        raise SystemExit(f"error: prompts_per_step x k = {completions} completions must split into "
                         f"minibatches={config.minibatches} equal optimiser steps")
    steps_per_round = config.minibatches * config.epochs_per_step
    # common_training_arguments reads a stage config's usual fields; GRPO counts rounds, TRL optimiser steps.
    budget = SimpleNamespace(lr=config.lr, epochs=1.0, max_steps=config.steps * steps_per_round,
                             warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
                             eval_steps=config.save_steps, save_steps=config.save_steps)
    arguments = common_training_arguments(out_dir, budget, seed)
    arguments.update(
        eval_strategy="no",  # the gold evaluation runs once at the end, on the held-out prompts
        logging_steps=steps_per_round,  # one point of the curve per round of generations
        per_device_train_batch_size=per_device_batch(completions // config.minibatches, "prompts_per_step x k"),
        steps_per_generation=config.minibatches,
        num_iterations=config.epochs_per_step,
        num_generations=config.k,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        beta=config.beta,
        epsilon=config.clip_range,
        loss_type=config.loss_type,
        scale_rewards=config.scale_rewards,
        disable_dropout=True,
        shuffle_dataset=True,
        log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=list(reward_funcs), args=TRLGRPOConfig(**arguments),
                          train_dataset=Dataset.from_list([{"prompt": list(p["messages"])} for p in prompts]),
                          processing_class=tokenizer.to_transformers(), callbacks=list(callbacks))
    for reward in reward_funcs:  # reward models score on the training device
        if isinstance(reward, RewardModelReward):
            reward.to(trainer.accelerator.device)
    return trainer


# ---- the held-out report both stages write ---------------------------------------------------------

# ---- Rejection sampling: the reward model's best of k answers, learnt as SFT data -------------------

def best_of_each(scores: list[float], usable: list[bool], k: int) -> list[int | None]:
    """For each prompt's k consecutive answers, the index (in the flat list) of its highest-scored usable
    answer, or None when none is usable."""
    if len(scores) != len(usable) or len(scores) % k:
        raise ValueError(f"best_of_each: {len(scores)} scores and {len(usable)} flags for groups of k={k}")
    picks = []
    for start in range(0, len(scores), k):
        candidates = [i for i in range(start, start + k) if usable[i]]
        picks.append(max(candidates, key=scores.__getitem__) if candidates else None)
    return picks


@torch.no_grad()
def rejection_sample(model, tokenizer, records: list[dict], scorer: RewardScorer, config, seed: int):
    """Llama 2's rejection sampling: `config.k` answers per prompt record from `model`, scored by the reward;
    each prompt's best answer that ended and says something becomes a dialogue (the prompt's messages + that
    answer, with its `reward`). An answer cut off by the token budget is never kept: learning it would teach
    the model to stop mid-sentence. Returns (dialogues, stats)."""
    k = config.k
    asked = [record for record in records for _ in range(k)]
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=0,
                              top_p=1.0)
    out = answer_chat(model, tokenizer, asked, sampling, seed=seed, batch_size=config.sample_batch_size,
                      progress="rejection sampling")
    answers = out.responses
    scores = scorer(asked, answers)
    usable = [ended and bool(a) for ended, a in zip(out.finished, answers)]
    picks = best_of_each(scores, usable, k)
    dialogues = [{"messages": [*record["messages"], {"role": "assistant", "content": answers[i]}],
                  "reward": scores[i]} for record, i in zip(records, picks) if i is not None]
    # what the pick chose among: per prompt with a kept answer, the mean reward of its usable answers
    usable_means = [statistics.fmean(scores[j] for j in range(n * k, (n + 1) * k) if usable[j])
                    for n, i in enumerate(picks) if i is not None]
    stats = {"prompts": len(records), "answers": len(answers), "kept": len(dialogues),
             "finished_fraction": sum(out.finished) / max(1, len(answers)),
             "reward_mean": statistics.fmean(scores) if scores else None,
             "reward_usable_mean": statistics.fmean(usable_means) if usable_means else None,
             "reward_kept_mean": statistics.fmean(d["reward"] for d in dialogues) if dialogues else None}
    return dialogues, stats


def rsft_trainer(model, tokenizer, train_dialogues: list[dict], eval_dialogues: list[dict], config, out_dir: Path,
                 seed: int, callbacks=()):
    """TRL's SFTTrainer on the kept answers, with the SFT stage's loss (the assistant's turn only)."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    arguments = common_training_arguments(out_dir, config, seed)
    if not eval_dialogues:
        arguments["eval_strategy"] = "no"
    training_args = TRLSFTConfig(
        **arguments,
        per_device_train_batch_size=per_device_batch(config.batch_size, "batch_size"),
        per_device_eval_batch_size=per_device_batch(config.batch_size, "batch_size"),
        gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length,
        assistant_only_loss=True,
        dataset_num_proc=None,
    )
    as_dataset = lambda dialogues: Dataset.from_list([{"messages": d["messages"]} for d in dialogues])  # noqa: E731
    return SFTTrainer(model=model, args=training_args, train_dataset=as_dataset(train_dialogues),
                      eval_dataset=as_dataset(eval_dialogues) if eval_dialogues else None,
                      processing_class=tokenizer.to_transformers(), callbacks=list(callbacks))


def evaluate_against_sft(model, sft, sft_dir: Path, tokenizer, data_dir: Path, preset: str,
                         reward: RewardModelReward | None, name: str) -> tuple[dict, dict]:
    """The shared evaluation of `model` and of SFT (SFT's saved one when it matches), paired.

    Returns (metrics.json's comparison keys, as PPO names them; the model's evaluation to save).
    """
    from minigpt.config import EvalConfig, load_config

    config = load_config(EvalConfig, preset)
    records = eval_records(data_dir, config)  # the run's world, or the stage's --eval-data
    device = next(model.parameters()).device
    sft.to(device)
    scorer = None
    if reward is not None:
        reward.to(device)
        scorer = reward.scorer
    before_eval = load_evaluation(sft_dir / "evaluation.json", config, records)
    if before_eval is None:
        before_eval = evaluate(sft, tokenizer, records, config, name="sft", is_reference=True)
    if scorer is not None:
        add_reward_scores(before_eval, records, scorer)
    after_eval = evaluate(model, tokenizer, records, config, name=name, reference=sft, reward=scorer)
    before, after = summarise(before_eval), summarise(after_eval)
    gains = pair(before_eval, after_eval, "sft", name)
    log.info("sft: %s", headline(before))
    log.info("%s: %s", name, headline(after))
    log.info("%s", gains["summary"])
    log_examples(records, {"sft": before_eval, name: after_eval})
    return before_after_metrics(before, after, gains), after_eval
