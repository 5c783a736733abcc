"""The reward model: the SFT GPT with a scalar `score` head, trained on K-way rankings, plus the SFT
model's confidence in the response.

Why a K-way collator on top of TRL's RewardTrainer rather than pairs expanded into rows: TRL knows
only (chosen, rejected) pairs, and expanding K responses into C(K,2) rows would score each response
K−1 times and scatter one prompt's comparisons over different batches (InstructGPT found that
overfits). Here a batch row is a whole prompt: its K responses are scored once, and the loss is
over all of the prompt's pairs together. RewardTrainer still runs everything else: optimisation,
evaluation, logging, checkpoints and resume.

Why a confidence term: a scalar head trained on a few hundred rankings learns style (full sentence,
short, ends cleanly) but hardly learns to check a sum, a fact or a passage; the knowledge that can
check them sits in the language model's next-token predictions. Where a sampled answer says "6
take away 0 leaves 5", the SFT model gave the "6" a low probability. So the reward is

    r = w_head · head(response) + w_mean · mean log π_SFT(response tokens) + w_min · min log π_SFT(response tokens)

(the response's tokens with its end included). The mean says how typical the whole answer is; the
minimum is its weakest token, where a wrong digit or name sits, diluted in the mean over a dozen
tokens of well-known phrasing. The weights are fitted on the training rankings by the same pairwise
loss (`fit_pairwise_weights`): the rankings alone decide how much each counts (zero if it does not
help). It reads the reward from the model's own next-token probabilities, as generative verifiers
do (Zhang et al. 2024), without a question-and-answer format the small model never saw.

`head=verifier` is the generative verifier itself, for comparison (Zhang et al. 2024): the reward model
reads the conversation followed by a check question ("Is that answer right?") and the assistant marker,
and its score head starts as the language model's "Yes" logit minus its "No" logit at that position —
at initialisation the score *is* the SFT model's zero-shot verdict, read through the same LM head that
holds its knowledge — then the pairwise loss trains it on the rankings like the scalar head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from trl import RewardTrainer

from minigpt.ranking import ranking_loss, ranking_pairs
from minigpt.sampling import batches_by_length, left_pad


# The SFT model's confidence in a response, from its tokens' log-probabilities: their mean and their minimum
CONFIDENCE_FEATURES = ("mean", "min")

# The generative verifier's question and the two answers whose logits it compares (head=verifier)
CHECK_QUESTION = "Is that answer right?"
VERDICT_WORDS = ("Yes", "No")


def encode_response(tokenizer, prompt_messages, response: str, max_length: int, verifier: bool = False) -> list[int]:
    """The conversation as the reward model reads it; its score sits on the final <|end|>, or, for the
    verifier, on the assistant marker after the check question (where the verdict's first token comes)."""
    messages = list(prompt_messages) + [{"role": "assistant", "content": response}]
    if verifier:
        messages.append({"role": "user", "content": CHECK_QUESTION})
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=verifier)
    return ids[-max_length:]


def init_verifier_head(classifier, language_model, tokenizer) -> None:
    """Start the score head as the LM's logit("Yes") − logit("No"): the final hidden state goes through the same
    norm in both models, so at the check position the classifier's score equals the LM's logit difference."""
    yes, no = (tokenizer.encode(word)[0] for word in VERDICT_WORDS)
    head = language_model.get_output_embeddings().weight
    with torch.no_grad():
        classifier.score.weight.copy_((head[yes] - head[no])[None].to(classifier.score.weight.dtype))


def encode_rankings(tokenizer, rankings: list[dict], max_length: int, verifier: bool = False,
                    offsets: list[list[float]] | None = None) -> list[dict]:
    """Ranking records → rows of {responses_ids (K lists), ranks, offsets}; prompts without a comparison dropped.

    `offsets` (one list of K per record) are added to the head's scores in the loss: with the confidence's
    scores there, the head learns what the confidence does not already say. Zero by default."""
    rows = []
    for n, record in enumerate(rankings):
        if not ranking_pairs(record["ranks"]):
            continue  # all tied: nothing to learn from
        rows.append({"responses_ids": [encode_response(tokenizer, record["prompt"], r, max_length, verifier)
                                       for r in record["responses"]],
                     "ranks": list(record["ranks"]),
                     "offsets": list(offsets[n]) if offsets is not None else [0.0] * len(record["responses"])})
    return rows


@dataclass
class RankingCollator:
    """Flattens a batch of prompts into one padded batch of responses plus the pair indices."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        sequences, better, worse, offsets = [], [], [], []
        for row in rows:
            offset = len(sequences)
            sequences.extend(row["responses_ids"])
            offsets.extend(row.get("offsets") or [0.0] * len(row["responses_ids"]))
            for i, j in ranking_pairs(row["ranks"]):
                better.append(offset + i)
                worse.append(offset + j)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for k, s in enumerate(sequences):  # right padding: the score is read at the last real token
            input_ids[k, :len(s)] = torch.tensor(s)
            attention_mask[k, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "better": torch.tensor(better, dtype=torch.long), "worse": torch.tensor(worse, dtype=torch.long),
                "offsets": torch.tensor(offsets, dtype=torch.float32)}


class RankingRewardTrainer(RewardTrainer):
    """RewardTrainer whose batches are whole K-way rankings (see the module docstring)."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset  # already tokenized into K-way rows by `encode_rankings`

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["responses_ids", "ranks", "offsets"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        # the head's score plus the row's fixed offset (the confidence's score, when the head learns on top of it)
        rewards = outputs.logits.squeeze(-1) + inputs["offsets"].to(outputs.logits.dtype)  # (n_responses,)
        better, worse = inputs["better"], inputs["worse"]
        loss = ranking_loss(rewards, better, worse)
        with torch.no_grad():
            margin = rewards[better] - rewards[worse]
            metrics = self._metrics[mode]
            metrics["accuracy"].append(self.accelerator.gather_for_metrics((margin > 0).float().mean()).mean().item())
            metrics["margin"].append(self.accelerator.gather_for_metrics(margin.mean()).mean().item())
            metrics["mean_reward"].append(self.accelerator.gather_for_metrics(rewards.mean()).mean().item())
        return (loss, outputs) if return_outputs else loss


def in_given_order(batches: list[list[int]], values: list[torch.Tensor]) -> torch.Tensor:
    """Per-batch results (rows of each batch first) put back in the order of the inputs."""
    if not batches:
        return torch.zeros(0)
    out = torch.empty(sum(len(b) for b in batches), *values[0].shape[1:])
    out[torch.tensor([i for b in batches for i in b])] = torch.cat(values).cpu()
    return out


@torch.no_grad()
def score_conversations(reward_model, tokenizer, prompts: list[list[dict]], responses: list[str],
                        max_length: int = 256, batch_size: int = 64, verifier: bool = False) -> torch.Tensor:
    """Reward-model scores (n,) of responses to prompts (message lists)."""
    device = next(reward_model.parameters()).device
    sequences = [encode_response(tokenizer, p, r, max_length, verifier) for p, r in zip(prompts, responses)]
    batches = batches_by_length([len(s) for s in sequences], batch_size)
    scores = []
    for batch in batches:
        ids, mask = left_pad([sequences[i] for i in batch], tokenizer.pad_id, device)
        scores.append(reward_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float())
    return in_given_order(batches, scores)


@torch.no_grad()
def response_confidence(language_model, tokenizer, prompts: list[list[dict]], responses: list[str],
                        max_length: int = 256, batch_size: int = 64) -> torch.Tensor:
    """The confidence features (n, 2) of `language_model` in each response (CONFIDENCE_FEATURES): the mean and
    the minimum log-probability of the response's tokens, its <|end|> included."""
    device = next(language_model.parameters()).device
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = encode_response(tokenizer, prompt, response, max_length)
        n_response = len(tokenizer.encode(response)) + 1  # + <|end|>
        rows.append((ids, min(n_response, len(ids) - 1)))
    batches = batches_by_length([len(ids) for ids, _ in rows], batch_size)
    out = []
    for batch in batches:
        chunk = [rows[i] for i in batch]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
        for k, (ids, n) in enumerate(chunk):  # right padding; the response is the last n tokens
            input_ids[k, :len(ids)] = torch.tensor(ids)
            attention_mask[k, :len(ids)] = 1
            scored[k, len(ids) - 1 - n:len(ids) - 1] = True
        input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
        logits = language_model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        mean = logp.where(scored, 0.0).sum(1) / scored.sum(1).clamp_min(1)
        weakest = logp.where(scored, torch.inf).amin(1)
        out.append(torch.stack([mean, weakest], 1))
    return in_given_order(batches, out)


@dataclass
class RewardScorer:
    """The reward as every stage reads it: w_head · head + w · the SFT confidence features (see the module
    docstring), normalised as (raw − mean)/std with the reward stage's statistics over the SFT samples,
    so 0 is a typical SFT answer and 1 is one standard deviation better: the scale PPO optimises."""

    model: torch.nn.Module
    tokenizer: object
    mean: float = 0.0
    std: float = 1.0
    confidence_model: torch.nn.Module | None = None  # the SFT language model; needed when a confidence weight ≠ 0
    head_weight: float = 1.0
    confidence_weights: tuple = (0.0, 0.0)  # one per CONFIDENCE_FEATURES
    max_length: int = 256
    verifier: bool = False  # the head reads the check question's position (head=verifier)

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        score = self.head_weight * score_conversations(self.model, self.tokenizer, prompts, responses,
                                                       self.max_length, verifier=self.verifier).cpu()
        if any(self.confidence_weights):
            if self.confidence_model is None:
                raise ValueError("RewardScorer: a confidence weight is set but no confidence_model (the SFT model)")
            features = response_confidence(self.confidence_model, self.tokenizer, prompts, responses, self.max_length)
            score = score + features @ torch.tensor(self.confidence_weights, dtype=features.dtype)
        return score

    def normalised(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        return (self.raw(prompts, responses) - self.mean) / self.std

    def __call__(self, records, responses) -> list[float]:
        """Normalised scores of responses to prompt records (dicts with `messages`)."""
        if not responses:
            return []
        return self.normalised([r["messages"] for r in records], responses).tolist()

    def to(self, device) -> "RewardScorer":
        self.model.to(device)
        if self.confidence_model is not None:
            self.confidence_model.to(device)
        return self


def load_reward_scorer(folder: Path, device=None, confidence_model=None) -> "RewardScorer | None":
    """The reward model in `folder` with its weights and normalisation, or None when it is not finished.

    The confidence term needs the SFT model the reward model started from (its manifest's parent);
    pass it as `confidence_model` when it is already loaded (PPO's reference is that model)."""
    from minigpt.checkpoint import load_causal_lm, load_sequence_classifier, read_manifest
    from minigpt.tokenizer import Tokenizer

    folder = Path(folder)
    if not (folder / "metrics.json").exists():
        return None
    manifest = read_manifest(folder)
    stats = manifest.get("metrics") or {}
    # saved before the minimum was a feature: one weight, the mean's
    weights = tuple(stats.get("confidence_weights") or (stats.get("confidence_weight", 0.0) or 0.0, 0.0))
    if any(weights) and confidence_model is None:
        parent = Path(manifest.get("parent", ""))
        if not (parent / "config.json").exists():
            parent = folder.parent / "sft"
        if not (parent / "config.json").exists():
            raise FileNotFoundError(f"{folder}: the reward model's confidence term needs its SFT model "
                                    f"({manifest.get('parent')}), which is not there")
        confidence_model = load_causal_lm(parent)
    if confidence_model is not None:
        confidence_model = confidence_model.eval().requires_grad_(False)
    scorer = RewardScorer(load_sequence_classifier(folder).eval().requires_grad_(False), Tokenizer.load(folder),
                          stats.get("reward_mean", 0.0), stats.get("reward_std", 1.0) or 1.0,
                          confidence_model if any(weights) else None, stats.get("head_weight", 1.0),
                          weights, stats.get("max_length", 256), stats.get("head") == "verifier")
    return scorer.to(device) if device is not None else scorer
