"""Measuring a stage by what its model says: answer the held-out prompts, score with the gold judge.

Chat models (SFT, PPO) answer in the chat layout. The pretrained base model has never seen the
chat tokens, so it gets a plain-text few-shot prompt built from training dialogues ("User: …" /
"Assistant: …") and its answer ends at the first newline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from minigpt.judge import has_judge_records, score, score_many
from minigpt.sampling import SamplingConfig, generate_in_batches

log = logging.getLogger(__name__)

# Fixed decoding for every evaluation, so stages compare like with like.
EVAL_SAMPLING = SamplingConfig(max_new_tokens=48, temperature=0.7, top_k=0, top_p=1.0)


@dataclass
class Answers:
    responses: list[str]
    finished: list[bool]


def answer_chat(model, tokenizer, records, sampling=EVAL_SAMPLING, seed=0, batch_size=64, progress=None) -> Answers:
    """Responses of a chat model to prompt records (`messages` ending with a user turn)."""
    prompts = [tokenizer.encode_prompt(r["messages"]) for r in records]
    out = generate_in_batches(model, prompts, sampling, stop_ids=[tokenizer.end_id], pad_id=tokenizer.pad_id,
                              batch_size=batch_size, seed=seed, progress=progress)
    return Answers([tokenizer.decode_without_specials(t).strip() for t in out.tokens], out.finished)


def fewshot_prefix(examples: list[dict]) -> str:
    """Plain-text demonstrations for the base model: single-turn dialogues as User/Assistant lines."""
    blocks = [f"User: {d['messages'][0]['content']}\nAssistant: {d['messages'][1]['content']}" for d in examples]
    return "\n\n".join(blocks) + "\n\n"


def pick_fewshot_examples(dialogues: list[dict], n: int) -> list[dict]:
    """`n` good single-turn demonstrations, one of each kind first, for the base model's prompt."""
    single = [d for d in dialogues if len(d["messages"]) == 2 and d["messages"][0]["role"] == "user"
              and "\n" not in d["messages"][1]["content"] and d.get("quality", "good") == "good"]
    chosen, kinds = [], set()
    for d in single:
        if d.get("kind") not in kinds:
            chosen.append(d)
            kinds.add(d.get("kind"))
    chosen += [d for d in single if d not in chosen]
    return chosen[:n]


def answer_fewshot(model, tokenizer, records, examples, sampling=EVAL_SAMPLING, seed=0, batch_size=64,
                   progress=None) -> Answers:
    """Responses of the base model: few-shot prompt, answer cut at the first newline."""
    prefix = fewshot_prefix(examples)
    prompts = []
    for r in records:
        turns = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
                        for m in r["messages"] if m["role"] != "system")
        prompts.append([tokenizer.bos_id] + tokenizer.encode(prefix + turns + "Assistant:"))
    out = generate_in_batches(model, prompts, sampling, stop_ids=[tokenizer.bos_id], pad_id=tokenizer.pad_id,
                              batch_size=batch_size, seed=seed, progress=progress)
    responses, finished = [], []
    for tokens, ended in zip(out.tokens, out.finished):
        text = tokenizer.decode_without_specials(tokens)
        responses.append(text.split("\n")[0].strip())
        finished.append(ended or "\n" in text)
    return Answers(responses, finished)


def judge_answers(records, answers: Answers) -> dict:
    """{'gold_score': mean, 'gold_<component>': mean, …} over the prompts ({} without judge records)."""
    if not has_judge_records(records):
        return {}
    mean, components = score_many(records, answers.responses, answers.finished)
    return {"gold_score": mean, **{f"gold_{k}": v for k, v in components.items()}}


def log_examples(records, columns: dict[str, Answers], n: int = 5) -> None:
    """A few prompt → answer lines per model, with their gold scores, into the log."""
    judged = has_judge_records(records)
    for record in records[:n]:
        i = records.index(record)
        log.info("prompt: %s", record["messages"][-1]["content"].replace("\n", " ")[:200])
        for name, answers in columns.items():
            s = f"{score(record, answers.responses[i], answers.finished[i])['score']:.2f}" if judged else "-"
            log.info("  %-5s [%s] %s", name, s, answers.responses[i][:200])


@torch.no_grad()
def evaluate_chat_model(model, tokenizer, records, seed=0) -> tuple[dict, Answers]:
    was_training = model.training
    model.eval()
    answers = answer_chat(model, tokenizer, records, seed=seed, progress="gold eval")
    model.train(was_training)
    return judge_answers(records, answers), answers
