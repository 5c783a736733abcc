"""The reward model: the SFT GPT with a scalar `score` head, trained on K-way rankings.

Why a K-way collator on top of TRL's RewardTrainer rather than pairs expanded into rows: TRL knows
only (chosen, rejected) pairs, and expanding K responses into C(K,2) rows would score each response
K−1 times and scatter one prompt's comparisons over different batches (InstructGPT found that
overfits). Here a batch row is a whole prompt: its K responses are scored once, and the loss is
over all of the prompt's pairs together. RewardTrainer still runs everything else: optimisation,
evaluation, logging, checkpoints and resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import RewardTrainer

from minigpt.ranking import ranking_loss, ranking_pairs
from minigpt.sampling import left_pad


def encode_response(tokenizer, prompt_messages, response: str, max_length: int) -> list[int]:
    """The conversation as the reward model reads it; its score sits on the final <|end|>."""
    ids, _ = tokenizer.encode_chat(list(prompt_messages) + [{"role": "assistant", "content": response}])
    return ids[-max_length:]


def encode_rankings(tokenizer, rankings: list[dict], max_length: int) -> list[dict]:
    """Ranking records → rows of {responses_ids (K lists), ranks}; prompts without a comparison dropped."""
    rows = []
    for record in rankings:
        if not ranking_pairs(record["ranks"]):
            continue  # all tied: nothing to learn from
        rows.append({"responses_ids": [encode_response(tokenizer, record["prompt"], r, max_length)
                                       for r in record["responses"]],
                     "ranks": list(record["ranks"])})
    return rows


@dataclass
class RankingCollator:
    """Flattens a batch of prompts into one padded batch of responses plus the pair indices."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        sequences, better, worse = [], [], []
        for row in rows:
            offset = len(sequences)
            sequences.extend(row["responses_ids"])
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
                "better": torch.tensor(better, dtype=torch.long), "worse": torch.tensor(worse, dtype=torch.long)}


class RankingRewardTrainer(RewardTrainer):
    """RewardTrainer whose batches are whole K-way rankings (see the module docstring)."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset  # already tokenized into K-way rows by `encode_rankings`

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["responses_ids", "ranks"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)  # (n_responses,)
        better, worse = inputs["better"], inputs["worse"]
        loss = ranking_loss(rewards, better, worse)
        with torch.no_grad():
            margin = rewards[better] - rewards[worse]
            metrics = self._metrics[mode]
            metrics["accuracy"].append(self.accelerator.gather_for_metrics((margin > 0).float().mean()).mean().item())
            metrics["margin"].append(self.accelerator.gather_for_metrics(margin.mean()).mean().item())
            metrics["mean_reward"].append(self.accelerator.gather_for_metrics(rewards.mean()).mean().item())
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def score_conversations(reward_model, tokenizer, prompts: list[list[dict]], responses: list[str],
                        max_length: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores (n,) of responses to prompts (message lists)."""
    device = next(reward_model.parameters()).device
    sequences = [encode_response(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    scores = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = left_pad(sequences[start:start + batch_size], tokenizer.pad_id, device)
        scores.append(reward_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float())
    return torch.cat(scores) if scores else torch.zeros(0)
