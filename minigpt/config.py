"""Typed configuration: one dataclass per stage, presets (tiny / cpu / gpu), `key=value` overrides.

A stage builds its config with `load_config(PretrainConfig, preset, ["lr=1e-3"])`. Defaults in the
dataclass are the `cpu` preset (the laptop); `PRESETS` lists what `tiny` and `gpu` change.
The effective config is saved in every checkpoint's manifest.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields

PRESET_NAMES = ("tiny", "cpu", "gpu")


class ConfigError(ValueError):
    """A bad preset name or `key=value` override: the message names it and what was expected."""


def default_preset() -> str:
    """`gpu` when CUDA is available, otherwise `cpu`."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


@dataclass
class DataConfig:
    """Size of the generated world (the embedded default data)."""

    n_people: int = 48
    n_documents: int = 9000  # pretraining documents (train + val)
    val_fraction: float = 0.05
    n_sft_dialogues: int = 4000
    n_sft_val: int = 200
    n_ranking_prompts: int = 400  # prompts the reward model's ranked samples come from
    n_ppo_prompts: int = 600
    n_eval_prompts: int = 200  # held out: gold-judge evaluation of every stage

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(n_people=12, n_documents=600, n_sft_dialogues=300, n_sft_val=24,
                     n_ranking_prompts=24, n_ppo_prompts=32, n_eval_prompts=16),
        "gpu": dict(n_people=120, n_documents=60000, n_sft_dialogues=20000, n_sft_val=500,
                    n_ranking_prompts=3000, n_ppo_prompts=4000, n_eval_prompts=400),
    }


@dataclass
class TokenizerConfig:
    vocab_size: int = 2048  # including the special tokens
    max_train_chars: int = 20_000_000  # BPE is trained on at most this much text

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(vocab_size=512),
        "gpu": dict(vocab_size=8192),
    }


@dataclass
class PretrainConfig:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0
    # optimisation
    batch_size: int = 16  # sequences per micro-batch; the global batch is batch_size x grad_accum, split over processes
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta2: float = 0.95
    warmup_steps: int = 100
    max_steps: int = 1500
    max_time: float = 600.0  # seconds of training (whichever of max_steps/max_time ends first); 0 = none
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for embedding and norms)
    muon_lr: float = 0.0  # Muon's lr on AdamW's scale (match_rms_adamw); 0 = lr
    # auto | float32 | bfloat16 (autocast). auto times a few training steps at stage start in fp32, bf16
    # autocast and (CPU) oneDNN bf16 matmuls, and keeps the fastest only if measurably faster (minigpt/speed.py)
    dtype: str = "auto"
    # auto | on | off: auto also measures torch.compile (20-60 s of compiling on a 2-core CPU, spent from
    # max_time). Measured per class (README, Performance): it paid on the AMD EPYC with bf16 (1,500 steps in
    # 440 s instead of 485-561 s) and came out level on the Xeon without AMX, so the cpu preset tries it.
    compile: str = "auto"
    # auto | sdpa | eager: the attention kernel (Transformers' attn_implementation names). auto times
    # PyTorch's fused SDPA against attention written out as matmul, softmax, matmul, eager and compiled
    # (minigpt/speed.py); on the AMD EPYC with bf16 the written-out one compiled trains the cpu preset 1.16x faster.
    attention: str = "auto"
    # auto | default | fused: AdamW's kernel. auto times torch's default for the device (on a CPU one tensor
    # at a time) against the fused one on the model's parameters and keeps fused only if measurably faster
    # (speed.choose_adamw; on CUDA fused, not measured).
    adamw: str = "auto"
    speed_batch: int = 4  # sequences per step the auto choices are timed on
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 250  # resume checkpoint every N steps
    sample_every: int = 500
    log_every: int = 10

    PRESETS: typing.ClassVar[dict] = {
        # tiny is fp32 with SDPA: its tests compare runs to 1e-4, which a per-run bf16 or kernel choice would break.
        "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, batch_size=8, lr=3e-3, max_time=0.0,
                     dtype="float32", compile="off", attention="sdpa", adamw="default",
                     warmup_steps=10, max_steps=120, eval_every=40, eval_batches=4,
                     save_every=40, sample_every=120),
        # SDPA's fused kernels are the known best on a GPU, and written-out attention at 512 tokens x batch 64
        # would hold GBs of scores: not measured there.
        "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=64, max_time=0.0, attention="sdpa",
                    lr=1e-3, warmup_steps=500, max_steps=20000, eval_every=500,
                    save_every=1000, sample_every=2000),
    }


@dataclass
class SFTConfig:
    epochs: float = 3.0
    max_steps: int = -1  # overrides epochs when > 0
    batch_size: int = 16  # global, split over processes
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 256
    packing: bool = False
    # a batch as one row of its dialogues end to end (attention kept within each by position ids): the
    # same examples, steps and loss as padded batches, without computing the padding (random batches of
    # the world's dialogues are half padding: 1.6x faster on the cpu preset). Our attention then masks one
    # (tokens x tokens) square per batch, so it pays for small batches of short dialogues, not for the gpu preset's
    padding_free: bool = True
    # auto | float32 | bfloat16 (autocast): auto times a few training steps of the stage's own batches (packed rows
    # of changing length) in fp32, bf16 autocast and (CPU) oneDNN bf16 matmuls and keeps the fastest only if
    # measurably faster: on the Xeon with AMX that is fp32 for the cpu preset's model (README, Performance)
    dtype: str = "auto"
    eval_steps: int = 100
    save_steps: int = 100
    max_time: float = 0.0
    # LoRA (PEFT): merged into a plain checkpoint at the end
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "qkv,proj,fc"  # comma-separated module names
    fewshot: int = 3  # examples in the base model's few-shot prompt (the shared evaluation: EvalConfig)

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(epochs=1.0, max_steps=30, batch_size=8, eval_steps=15, save_steps=15,
                     max_length=128, dtype="float32"),  # exact fp32: tests compare tiny runs closely
        "gpu": dict(epochs=3.0, batch_size=64, lr=2e-4, max_length=512, eval_steps=200,
                    save_steps=200, padding_free=False),
    }


@dataclass
class SamplesConfig:
    k: int = 4  # responses per prompt
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 48
    noise: float = 0.0  # probability that a labeller swaps two adjacent responses
    batch_size: int = 96
    policy: str = ""  # checkpoint to sample from; default runs/$RUN/sft

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(max_new_tokens=24, batch_size=32),
        "gpu": dict(max_new_tokens=96, batch_size=256),
    }


@dataclass
class RewardConfig:
    epochs: float = 2.0
    max_steps: int = -1
    prompts_per_batch: int = 8  # global; every pair of one prompt sits in the same batch
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 256
    val_fraction: float = 0.15
    eval_steps: int = 50
    save_steps: int = 50
    max_time: float = 0.0
    sources: str = "judge"  # judge | human | both
    confidence: bool = True  # add the SFT model's confidence in the response, weighted by the rankings
    # fit the confidence's weights first and train the head on top of its score, so the head learns what the
    # confidence does not say; false: train the head alone and fit all the weights after it
    residual: bool = True
    # scalar: a score head read on the response's <|end|>; verifier: the generative verifier's form, the head read
    # after a check question and started as the LM's logit("Yes") − logit("No") (minigpt/reward_model.py)
    head: str = "scalar"

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(epochs=1.0, max_steps=12, prompts_per_batch=4, eval_steps=6,
                     save_steps=6, max_length=128, val_fraction=0.25),
        "gpu": dict(epochs=2.0, prompts_per_batch=32, lr=5e-5, max_length=512),
    }


@dataclass
class PPOConfig:
    steps: int = 48  # rollout + update iterations
    prompts_per_step: int = 64  # rollouts per step (global): prompts_per_step / samples_per_prompt prompts
    minibatch_size: int = 16  # global, split over processes
    ppo_epochs: int = 2
    # rloo (default): critic-free, each prompt answered samples_per_prompt times and each answer's baseline
    # is the mean of the others (the reward model was trained on exactly such within-prompt rankings);
    # gae: a value model (the reward model's head at every token) is the baseline
    advantage: str = "rloo"
    samples_per_prompt: int = 4  # answers per prompt in a step; rloo needs >= 2, gae takes 1 or more
    lr: float = 3e-5
    value_lr: float = 1e-4
    max_new_tokens: int = 48
    temperature: float = 1.0  # rollouts are sampled at this temperature, and their log-probs are computed at it
    top_k: int = 0
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_coef: float = 0.5
    grad_clip: float = 1.0
    kl_coef: float = 0.05  # β: the initial coefficient of the per-token KL penalty
    kl_estimator: str = "k1"  # k1 | k3
    # weight of a KL(policy‖SFT) term in the policy loss, beside β's penalty in the reward (whose pull on a token
    # is as noisy as the reward); 0 = none. exact: the KL summed over the vocabulary at every response position;
    # k3: GRPO's estimate from the sampled token. Measured on seven PPO runs (three parent sets, README): exact
    # at 1.0 kept the greedy answers from getting worse (greedy gain −0.025 → +0.000 on average, better in all
    # seven pairs) for about the same sampled gain (−0.003), at a quarter of the KL (0.2 against 0.7-0.9 nats)
    kl_loss_coef: float = 1.0
    kl_loss_estimator: str = "exact"  # exact | k3
    adaptive_kl: bool = True
    kl_target: float = 2.0  # nats per response: the KL the adaptive β steers to (budget: 1.5x this)
    kl_horizon: int = 10000  # samples (Ziegler et al.): beta moves by at most 20% per this many rollouts
    # KL(policy‖SFT) in nats per response at which the stage stops (0 = never): the mean over the last
    # kl_stop_window steps' rollouts. Past about 1 nat the gold curve turned down while the reward model's
    # score still rose (seeds 0 and 1), and an RLHF round that starts from the last policy starts near it.
    kl_stop: float = 1.0
    kl_stop_window: int = 4
    reward_clip: float = 5.0  # normalised reward-model score is clipped to ±this
    no_end_penalty: float = -1.0  # added to the score of a response that never ends
    target_approx_kl: float = 0.05  # stop this update's epochs early past this
    ptx_coef: float = 0.0  # PPO-ptx (InstructGPT): weight of a next-token loss on pretraining text in each update
    ptx_batch_size: int = 4  # pretraining sequences per PPO minibatch (global)
    ptx_block_size: int = 128
    eval_every: int = 16  # steps between held-out evaluations (the over-optimisation curve's points)
    save_every: int = 16
    max_time: float = 0.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(steps=4, prompts_per_step=16, minibatch_size=8, max_new_tokens=16,
                     eval_every=2, save_every=2),
        "gpu": dict(steps=200, prompts_per_step=256, minibatch_size=64, max_new_tokens=96,
                    eval_every=20, save_every=20),
    }


@dataclass
class EvalConfig:
    """The one held-out evaluation every stage, round and `make compare` runs (same prompts, same seeds).

    Fixed per preset rather than per stage, so a stage's "before" and "after" are always comparable.
    """

    prompts: int = 200  # the first N held-out eval prompts
    samples: int = 4  # sampled answers per prompt at `temperature` (a prompt's score is their mean)
    temperature: float = 0.7  # what a user of the chat sees
    max_new_tokens: int = 48
    seed: int = 0
    kl_samples: int = 1  # answers per prompt sampled from the policy itself (temperature 1) for KL and the curve
    best_of_n: str = "4,16"  # n values of the best-of-n baseline (samples from SFT at temperature 1)

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(prompts=16, samples=2, max_new_tokens=24, best_of_n="2,4"),
        "gpu": dict(prompts=400, max_new_tokens=96),
    }

    @property
    def best_of_n_values(self) -> list[int]:
        try:
            values = sorted({int(v) for v in self.best_of_n.split(",") if v.strip()})
        except ValueError:
            raise ValueError(f"best_of_n={self.best_of_n!r}: expected comma-separated integers, e.g. 4,16") from None
        return values


@dataclass
class DPOConfig:
    """Direct preference optimisation: the SFT model learns the rankings directly, no reward model."""

    epochs: float = 2.0
    max_steps: int = -1  # overrides epochs when > 0
    batch_size: int = 16  # preference pairs per optimiser step (global, split over processes)
    grad_accum: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    beta: float = 0.1  # strength of the implicit KL leash to the SFT model (higher: stay closer)
    loss_type: str = "sigmoid"  # TRL's DPO loss: sigmoid (the paper's) | ipo | hinge | ...
    pairs: str = "all"  # all: every untied pair of a K-way ranking | best: the top response against each other
    max_length: int = 256  # tokens of prompt + response
    val_fraction: float = 0.1  # prompts held out: their pairs measure preference accuracy
    eval_steps: int = 50
    save_steps: int = 50
    max_time: float = 0.0

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(epochs=1.0, max_steps=12, batch_size=8, lr=1e-4, eval_steps=6, save_steps=6,
                     max_length=128, val_fraction=0.25),
        "gpu": dict(batch_size=64, lr=1e-5, max_length=512, eval_steps=100, save_steps=100),
    }


@dataclass
class GRPOConfig:
    """Group relative policy optimisation: k answers per prompt, each judged against its group's mean.

    The budget mirrors PPO's: `steps` rounds of `prompts_per_step` x `k` generations, each round
    used for `epochs_per_step` passes in `minibatches` optimiser steps.
    """

    steps: int = 24  # generation rounds
    prompts_per_step: int = 16  # prompts per round (global); x k completions = PPO's 64 rollouts
    k: int = 4  # generations per prompt: the group whose mean is the baseline
    minibatches: int = 4  # optimiser steps per pass over a round's completions
    epochs_per_step: int = 2  # passes over each round (TRL's num_iterations, μ)
    lr: float = 3e-5
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    beta: float = 0.05  # KL to the SFT model in the loss (> 0: the reference is loaded)
    clip_range: float = 0.2  # ε of the clipped ratio
    loss_type: str = "dapo"  # TRL's token aggregation: dapo | grpo | dr_grpo | bnpo
    scale_rewards: str = "group"  # divide by the group's std (GRPO) | batch | none (Dr. GRPO)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    reward_clip: float = 5.0  # normalised reward-model score is clipped to ±this, as PPO
    no_end_penalty: float = -1.0  # added to the score of a response that never ends, as PPO
    save_steps: int = 40  # Trainer checkpoints (optimiser steps) for Ctrl-C resume
    max_time: float = 0.0

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(steps=4, prompts_per_step=4, k=4, minibatches=1, epochs_per_step=1, lr=1e-4,
                     max_new_tokens=16, save_steps=2),
        "gpu": dict(steps=200, prompts_per_step=64, max_new_tokens=96, save_steps=200),
    }


@dataclass
class RSFTConfig:
    """Rejection-sampling fine-tuning (Llama 2): k answers per PPO prompt from the SFT model, the reward
    model's best finished one kept, and the SFT model fine-tuned on those answers with the SFT loss."""

    k: int = 8  # answers sampled per prompt; the reward model keeps one
    temperature: float = 0.7  # of the samples (the evaluation's): T=1 samples taught a worse greedy answer
    max_new_tokens: int = 48
    sample_batch_size: int = 96
    epochs: float = 1.0
    max_steps: int = -1  # overrides epochs when > 0
    batch_size: int = 16  # global, split over processes
    grad_accum: int = 1
    lr: float = 1e-4  # cosine-decayed: about 5e-5 on average
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_length: int = 256
    eval_steps: int = 20  # loss on the SFT stage's held-out dialogues: what the narrower data costs
    save_steps: int = 20
    max_time: float = 0.0

    PRESETS: typing.ClassVar[dict] = {
        "tiny": dict(k=4, max_new_tokens=16, sample_batch_size=32, batch_size=8, lr=3e-4, max_length=128,
                     eval_steps=2, save_steps=2),
        "gpu": dict(max_new_tokens=96, sample_batch_size=256, batch_size=64, lr=5e-5, max_length=512,
                    eval_steps=50, save_steps=50),
    }


def load_config(cls, preset: str = "cpu", overrides: typing.Iterable[str] = ()):
    """The config of `cls` for a preset, with `key=value` overrides applied (typed)."""
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}: expected one of {', '.join(PRESET_NAMES)}")
    config = cls(**cls.PRESETS.get(preset, {}))
    return apply_overrides(config, overrides)


def apply_overrides(config, overrides: typing.Iterable[str]):
    """Return a copy of `config` with each `key=value` parsed to the field's type."""
    types = typing.get_type_hints(type(config))
    names = [f.name for f in fields(config)]
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in names:
            raise ConfigError(f"override {item!r}: {type(config).__name__} has no field {key!r}; "
                             f"fields are: {', '.join(names)}")
        changes[key] = _parse(value.strip(), types[key], item)
    return dataclasses.replace(config, **changes)


def _parse(value: str, kind, item: str):
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(value)
    except ValueError:
        raise ConfigError(f"override {item!r}: expected a {kind.__name__}") from None


def split_overrides(args: typing.Iterable[str], config_classes) -> list[list[str]]:
    """Route each `key=value` to the config class that has that field (first match wins).

    Lets one ARGS string carry overrides for a stage and the configs it shares (e.g. pretrain's
    model and tokenizer). Unknown keys are an error naming every class searched.
    """
    routed = [[] for _ in config_classes]
    for item in args:
        key = item.split("=", 1)[0].strip()
        for i, cls in enumerate(config_classes):
            if key in {f.name for f in fields(cls)}:
                routed[i].append(item)
                break
        else:
            names = ", ".join(c.__name__ for c in config_classes)
            raise ConfigError(f"override {item!r}: no field {key!r} in {names}")
    return routed


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


__all__ = [
    "DataConfig", "TokenizerConfig", "PretrainConfig", "SFTConfig", "SamplesConfig",
    "RewardConfig", "PPOConfig", "EvalConfig", "DPOConfig", "GRPOConfig", "RSFTConfig", "load_config", "apply_overrides",
    "split_overrides", "default_preset", "to_dict", "PRESET_NAMES", "ConfigError", "field",
]
