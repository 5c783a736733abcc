"""Ranked samples: K responses per prompt from the dialogue model, ranked by the gold judge.

    python stages/samples.py --run default --preset cpu [k=4 noise=0.1 policy=runs/default/ppo]

Writes runs/<RUN>/samples/ranked.jsonl: per prompt the K responses, their ranks (0 = best, ties
equal), the judge's scores and the policy they came from. `make label` lets a person rank the same
responses instead (runs/<RUN>/samples/human.jsonl); the reward stage trains on either or both.
"""

import json
import logging
import random
from pathlib import Path

import torch

from minigpt.checkpoint import load_causal_lm
from minigpt.config import SamplesConfig
from minigpt.data import load_prompts
from minigpt.judge import score
from minigpt.ranking import ranks_from_scores
from minigpt.run import begin_stage, require_stage, run_main, write_json_atomic, write_text_atomic
from minigpt.sampling import SamplingConfig, generate_in_batches
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.samples")
RESAMPLE_ROUNDS = 3  # tries to replace duplicate responses of a prompt by distinct ones


def sample_responses(model, tokenizer, prompts, config: SamplesConfig, seed: int):
    """K responses per prompt (batched, KV cache); duplicates within a prompt are resampled."""
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_k, config.top_p)
    encoded = [tokenizer.encode_prompt(p["messages"]) for p in prompts]
    responses = [[None] * config.k for _ in prompts]
    finished = [[False] * config.k for _ in prompts]
    todo = [(i, j) for i in range(len(prompts)) for j in range(config.k)]
    for attempt in range(1 + RESAMPLE_ROUNDS):
        out = generate_in_batches(model, [encoded[i] for i, _ in todo], sampling, stop_ids=[tokenizer.end_id],
                                  pad_id=tokenizer.pad_id, batch_size=config.batch_size, seed=seed + attempt,
                                  progress=f"sampling (round {attempt + 1})")
        for (i, j), tokens, ended in zip(todo, out.tokens, out.finished):
            responses[i][j], finished[i][j] = tokenizer.response_text(tokens), ended
        todo = [(i, j) for i in range(len(prompts)) for j in range(config.k)
                if responses[i][j] in responses[i][:j]]
        if not todo:
            break
    return responses, finished


def main():
    args, config = begin_stage("samples", SamplesConfig)
    out = args.out_dir
    policy = Path(config.policy) if config.policy else require_stage(args, "sft")
    prompts = load_prompts(args.data or args.run_dir / "data", "ranking")
    model = load_causal_lm(policy).eval()
    tokenizer = Tokenizer.load(policy)
    log.info("samples: %d prompts x K=%d from %s", len(prompts), config.k, policy)

    with torch.no_grad():
        responses, finished = sample_responses(model, tokenizer, prompts, config, args.seed)
    rng = random.Random(args.seed)
    records, best, mean, distinct = [], [], [], []
    for prompt, group, ended in zip(prompts, responses, finished):
        scores = [score(prompt, r, f)["score"] for r, f in zip(group, ended)]
        extra = {k: v for k, v in prompt.items() if k != "messages"}
        records.append({**extra, "prompt": prompt["messages"], "responses": group,
                        "ranks": ranks_from_scores(scores, config.noise, rng), "scores": scores,
                        "finished": ended, "policy": str(policy), "source": "judge"})
        best.append(max(scores))
        mean.append(sum(scores) / len(scores))
        distinct.append(len(set(group)) / len(group))
    write_text_atomic(out / "ranked.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    metrics = {"prompts": len(records), "k": config.k, "gold_mean": sum(mean) / len(mean),
               "gold_best_of_k": sum(best) / len(best), "distinct_fraction": sum(distinct) / len(distinct),
               "noise": config.noise, "policy": str(policy)}
    write_json_atomic(out / "metrics.json", metrics)
    log.info("samples: gold mean %.3f, best-of-%d %.3f, distinct %.2f -> %s", metrics["gold_mean"], config.k,
             metrics["gold_best_of_k"], metrics["distinct_fraction"], out / "ranked.jsonl")


if __name__ == "__main__":
    run_main(main)
