"""The one evaluation of a checkpoint: held-out prompts, greedy and sampled, scored by the gold judge.

Every stage (SFT, PPO, RLHF rounds, DPO, GRPO) and `make compare` call `evaluate` on the same prompt
list (`eval_records`) with the same `EvalConfig` and seeds, so any two stages compare like with like.
Each prompt is answered
  - greedily (which model gives the better answer),
  - `samples` times at the evaluation temperature (what a chat user sees; the prompt's score is the
    mean), and
  - `kl_samples` times from the policy itself (temperature 1): on those exact token ids we measure
    KL(policy‖SFT) = E[Σ log π − log π_ref], the quantity PPO's budget is defined on, and they are
    the x-axis points of the over-optimisation curve.
A gain that shows sampled but not greedy means lower entropy, not better answers; the report says so.

Chat models answer in the chat layout. The pretrained base model has never seen the chat tokens, so
it gets a plain-text few-shot prompt built from training dialogues ("User: …" / "Assistant: …") and
its answer ends at the first newline.

Results are plain JSON (`evaluation.json` in each stage folder) so compare reuses them; `summarise`,
`pair` and `best_of_n` turn them into figures with 95% bootstrap intervals over prompts.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.config import EvalConfig, to_dict
from minigpt.data import load_prompts
from minigpt.judge import NO_JUDGE_NOTE, has_judge_records, score
from minigpt.ppo import repetition_rate, sequence_kl
from minigpt.ranking import pair_orders, ranks_from_scores
from minigpt.reward_model import RewardScorer
from minigpt.sampling import SamplingConfig, generate_in_batches
from minigpt.stats import bootstrap_ci, bootstrap_ratio_ci, paired_gain, significance, spearman, win_rate

log = logging.getLogger(__name__)

BATCH = 256  # rows per generation batch: small models decode many rows per step almost for free
COMPONENTS = ("correct", "complete", "concise", "clean")


def eval_records(data, config: EvalConfig) -> list[dict]:
    """The held-out prompts every evaluation uses: the first `config.prompts` of the eval set."""
    return load_prompts(data, "eval")[:config.prompts]


@dataclass
class Answers:
    responses: list[str]
    finished: list[bool]
    tokens: list[list[int]]  # generated ids, without the stop token


def _sampling(config: EvalConfig, temperature: float) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=temperature, top_k=0, top_p=1.0)


def answer_chat(model, tokenizer, records, sampling: SamplingConfig, seed=0, batch_size=BATCH,
                progress=None) -> Answers:
    """Responses of a chat model to prompt records (`messages` ending with a user turn)."""
    prompts = [tokenizer.encode_prompt(r["messages"]) for r in records]
    out = generate_in_batches(model, prompts, sampling, stop_ids=[tokenizer.end_id], pad_id=tokenizer.pad_id,
                              batch_size=batch_size, seed=seed, progress=progress)
    return Answers([tokenizer.response_text(t) for t in out.tokens], out.finished, out.tokens)


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


def newline_ids(tokenizer) -> list[int]:
    """The ordinary tokens whose bytes hold a newline."""
    return [rank for token, rank in tokenizer.ranks.items() if b"\n" in token]


def answer_fewshot(model, tokenizer, records, examples, sampling: SamplingConfig, seed=0, batch_size=BATCH,
                   progress=None) -> Answers:
    """Responses of the base model: few-shot prompt, answer cut at the first newline."""
    prefix = fewshot_prefix(examples)
    prompts = []
    for r in records:
        turns = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
                        for m in r["messages"] if m["role"] != "system")
        prompts.append([tokenizer.bos_id] + tokenizer.encode(prefix + turns + "Assistant:"))
    # The answer is its first line, so a row stops at the first token holding a newline (kept, since it may
    # start with the answer's last characters): the same answers without generating the lines after them.
    out = generate_in_batches(model, prompts, sampling, stop_ids=[tokenizer.bos_id, *newline_ids(tokenizer)],
                              pad_id=tokenizer.pad_id, batch_size=batch_size, seed=seed, progress=progress,
                              keep_stop=True)
    responses, finished = [], []
    for tokens, ended in zip(out.tokens, out.finished):
        text = tokenizer.decode_without_specials(tokens)
        responses.append(text.split("\n")[0].strip())
        finished.append(ended or "\n" in text)
    return Answers(responses, finished, out.tokens)


# ---- evaluate --------------------------------------------------------------------------------------

def _judged(record, text: str, finished: bool, tokenizer, judged: bool = True) -> dict:
    """One answer with its gold score and components (None without judge records)."""
    judged = score(record, text, finished) if judged else {"score": None, **{k: None for k in COMPONENTS}}
    ids = tokenizer.encode(text)
    return {"text": text, "finished": bool(finished), "gold": judged.pop("score"), "rm": None, "length": len(ids),
            "repetition": repetition_rate(ids), **judged}


@torch.no_grad()
def evaluate(model, tokenizer, records, config: EvalConfig, *, name: str = "", fewshot: list[dict] | None = None,
             reference=None, reward: RewardScorer | None = None, is_reference: bool = False) -> dict:
    """Answer every record greedily, `samples` times sampled and `kl_samples` times from the policy.

    `fewshot`: demonstrations for a base model (plain-text prompt; no KL). `reference`: the SFT model,
    for KL(policy‖SFT) on the policy's own samples (`is_reference`: the model *is* SFT, KL = 0).
    `reward`: a RewardScorer, to add reward-model scores. Returns the JSON-able evaluation.
    """
    started = time.time()
    was_training = model.training
    model.eval()

    def answer(recs, temperature, seed, label):
        sampling = _sampling(config, temperature)
        if fewshot is not None:
            return answer_fewshot(model, tokenizer, recs, fewshot, sampling, seed, progress=label)
        return answer_chat(model, tokenizer, recs, sampling, seed, progress=label)

    repeat = lambda n: [r for r in records for _ in range(n)]  # noqa: E731 — prompt-major: r0,r0,…,r1,…
    greedy = answer(records, 0.0, config.seed, f"{name} greedy".strip())
    sampled = answer(repeat(config.samples), config.temperature, config.seed + 1, f"{name} sampled".strip())
    n_policy = config.kl_samples if fewshot is None else 0
    policy = answer(repeat(n_policy), 1.0, config.seed + 2, f"{name} policy".strip()) if n_policy else None
    kl = None
    if policy is not None and is_reference:
        kl = [0.0] * len(policy.tokens)
    elif policy is not None and reference is not None:
        prompts = [tokenizer.encode_prompt(r["messages"]) for r in repeat(n_policy)]
        responses = [t + ([tokenizer.end_id] if f else []) for t, f in zip(policy.tokens, policy.finished)]
        kl = sequence_kl(model, reference, prompts, responses, tokenizer.pad_id)
    model.train(was_training)

    judge = has_judge_records(records)
    entries = []
    for i, record in enumerate(records):
        entry = {"id": record.get("id", str(i)), "kind": record.get("kind"),
                 "greedy": _judged(record, greedy.responses[i], greedy.finished[i], tokenizer, judge),
                 "sampled": [_judged(record, sampled.responses[j], sampled.finished[j], tokenizer, judge)
                             for j in range(i * config.samples, (i + 1) * config.samples)],
                 "policy": [], "kl": None}
        if policy is not None:
            span = range(i * n_policy, (i + 1) * n_policy)
            entry["policy"] = [_judged(record, policy.responses[j], policy.finished[j], tokenizer, judge) for j in span]
            entry["kl"] = statistics.fmean(kl[j] for j in span) if kl is not None else None
        entries.append(entry)
    evaluation = {"name": name, "config": to_dict(config), "chat": fewshot is None, "judged": judge,
                  "prompts": entries}
    if reward is not None:
        add_reward_scores(evaluation, records, reward)
    evaluation["seconds"] = round(time.time() - started, 2)
    log.info("evaluation of %s: %d prompts x (1 greedy + %d sampled + %d policy) answers in %.1f s", name or "model",
             len(records), config.samples, n_policy, evaluation["seconds"])
    return evaluation


def answers_of(evaluation: dict):
    """Every answer of an evaluation with its prompt index: (i, answer dict)."""
    for i, entry in enumerate(evaluation["prompts"]):
        for answer in [entry["greedy"], *entry["sampled"], *entry["policy"]]:
            yield i, answer


def add_reward_scores(evaluation: dict, records, reward: RewardScorer) -> None:
    """Score every answer of `evaluation` with `reward` (in place): the report's RM column."""
    pairs = list(answers_of(evaluation))
    scores = reward([records[i] for i, _ in pairs], [a["text"] for _, a in pairs])
    for (_, answer), value in zip(pairs, scores):
        answer["rm"] = value


def check_same_prompts(evaluation: dict, records) -> None:
    ids = [e["id"] for e in evaluation["prompts"]]
    expected = [r.get("id", str(i)) for i, r in enumerate(records)]
    if ids != expected:
        raise ValueError(f"evaluation {evaluation.get('name')!r} answered other prompts than the held-out set "
                         f"({len(ids)} vs {len(expected)} prompts): stages must be compared on the same prompts")


def load_evaluation(path: Path, config: EvalConfig, records) -> dict | None:
    """A stage's saved evaluation, if it was made with this config on these prompts (else None)."""
    import json

    if not path.exists():
        return None
    evaluation = json.loads(path.read_text())
    if evaluation.get("config") != to_dict(config):
        return None
    try:
        check_same_prompts(evaluation, records)
    except ValueError:
        return None
    return evaluation


# ---- figures ---------------------------------------------------------------------------------------

def per_prompt(evaluation: dict, key: str, decoding: str) -> list[float | None]:
    """One value per prompt: the greedy answer's, or the mean over the sampled / policy answers."""
    if decoding == "greedy":
        return [e["greedy"][key] for e in evaluation["prompts"]]
    out = []
    for e in evaluation["prompts"]:
        values = [a[key] for a in e[decoding] if a[key] is not None]
        out.append(statistics.fmean(values) if values else None)
    return out


def _mean_ci(values, seed=0) -> tuple[float | None, list[float] | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), bootstrap_ci(values, seed=seed)


def summarise(evaluation: dict) -> dict:
    """Means with 95% bootstrap intervals over prompts, overall and per prompt kind."""
    out = {"prompts": len(evaluation["prompts"]), "eval_seconds": evaluation.get("seconds")}
    for decoding in ("sampled", "greedy", "policy"):
        for key in ("gold", "rm"):
            mean, ci = _mean_ci(per_prompt(evaluation, key, decoding))
            out[f"{key}_{decoding}"], out[f"{key}_{decoding}_ci"] = mean, ci
    out["kl"], out["kl_ci"] = _mean_ci(e["kl"] for e in evaluation["prompts"])
    sampled = [a for e in evaluation["prompts"] for a in e["sampled"]]
    out["length"] = statistics.fmean(a["length"] for a in sampled)
    out["repetition"] = statistics.fmean(a["repetition"] for a in sampled)
    out["end_rate"] = statistics.fmean(a["finished"] for a in sampled)
    first = [e["sampled"][0]["text"] for e in evaluation["prompts"]]
    out["distinct"] = len(set(first)) / max(1, len(first))
    out["components"] = {k: statistics.fmean(a[k] for a in sampled) if sampled[0][k] is not None else None
                         for k in COMPONENTS}
    if not evaluation.get("judged", True):
        out["gold"] = NO_JUDGE_NOTE
    kinds = sorted({e["kind"] for e in evaluation["prompts"] if e["kind"] is not None})
    out["by_kind"] = {}
    for kind in kinds:
        sub = {**evaluation, "prompts": [e for e in evaluation["prompts"] if e["kind"] == kind]}
        row = {"prompts": len(sub["prompts"])}
        for decoding in ("sampled", "greedy"):
            row[f"gold_{decoding}"], row[f"gold_{decoding}_ci"] = _mean_ci(per_prompt(sub, "gold", decoding))
        out["by_kind"][kind] = row
    return out


def pair(before: dict, after: dict, before_name: str = "before", after_name: str = "after") -> dict:
    """`after` against `before` on the same prompts: paired gains, win rates, each with its interval."""
    if [e["id"] for e in before["prompts"]] != [e["id"] for e in after["prompts"]]:
        raise ValueError(f"{after_name} vs {before_name}: the evaluations answered different prompts")
    out = {"prompts": len(before["prompts"])}
    if not (before.get("judged", True) and after.get("judged", True)):
        return {**out, **{k: None for k in ("gain_sampled", "gain_sampled_ci", "gain_greedy", "gain_greedy_ci",
                                             "win_rate", "win_rate_ci", "win_rate_greedy", "win_rate_greedy_ci")},
                "summary": f"{after_name} vs {before_name}: {NO_JUDGE_NOTE}"}
    for decoding in ("sampled", "greedy"):
        a, b = per_prompt(before, "gold", decoding), per_prompt(after, "gold", decoding)
        out[f"gain_{decoding}"], out[f"gain_{decoding}_ci"] = paired_gain(a, b)
        suffix = "" if decoding == "sampled" else "_greedy"
        out[f"win_rate{suffix}"], out[f"win_rate{suffix}_ci"] = win_rate(a, b)
    out["summary"] = pair_sentence(out, before_name, after_name)
    return out


def before_after_metrics(before: dict, after: dict, gains: dict) -> dict:
    """metrics.json's comparison keys of a stage that starts from a policy (PPO, DPO, GRPO, rounds)."""
    final = {"gold_before": before["gold_sampled"], "gold_after": after["gold_sampled"],
             "gold_greedy_before": before["gold_greedy"], "gold_greedy_after": after["gold_greedy"],
             "gold_sampled": after["gold_sampled"], "gold_sampled_ci": after["gold_sampled_ci"],
             "gold_greedy": after["gold_greedy"], "gold_greedy_ci": after["gold_greedy_ci"],
             "kl": after["kl"], "kl_ci": after["kl_ci"], "length_before": before["length"], "length_after": after["length"],
             **{k: gains[k] for k in ("gain_sampled", "gain_sampled_ci", "gain_greedy", "gain_greedy_ci",
                                      "win_rate", "win_rate_ci", "win_rate_greedy", "win_rate_greedy_ci")},
             "eval_prompts": after["prompts"], **{f"gold_{k}_after": v for k, v in after["components"].items()}}
    if after.get("rm_sampled") is not None:
        final.update(reward_before=before["rm_sampled"], reward_after=after["rm_sampled"])
    return final


def pair_sentence(figures: dict, before_name: str, after_name: str) -> str:
    """The pair's result in words, e.g. 'ppo beats sft on 63% of prompts (95% CI 57–69%) …'."""
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    s, g = figures["gain_sampled"], figures["gain_greedy"]
    s_ci, g_ci = figures["gain_sampled_ci"], figures["gain_greedy_ci"]
    lo, hi = figures["win_rate_ci"]
    verdict_s, verdict_g = significance(s, s_ci), significance(g, g_ci)
    text = (f"{after_name} vs {before_name}: sampled gold {s:+.3f} (95% CI {s_ci[0]:+.3f} to {s_ci[1]:+.3f}, "
            f"{verdict_s}), greedy {g:+.3f} ({g_ci[0]:+.3f} to {g_ci[1]:+.3f}, {verdict_g}); "
            f"{after_name} wins on {pct(figures['win_rate'])} of prompts (95% CI {pct(lo)}–{pct(hi)})")
    if verdict_s == "better" and verdict_g != "better":
        text += "; the gain holds sampled but not greedy: lower entropy, not better answers"
    return text


def calibration(evaluations: dict[str, dict]) -> dict:
    """Spearman between reward-model score and gold over all answers, overall and per evaluation."""
    out, every_rm, every_gold = {}, [], []
    for name, evaluation in evaluations.items():
        pairs = [(a["rm"], a["gold"]) for _, a in answers_of(evaluation) if a["rm"] is not None and a["gold"] is not None]
        out[name] = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        every_rm += [p[0] for p in pairs]
        every_gold += [p[1] for p in pairs]
    out["all"] = spearman(every_rm, every_gold) if every_rm else None
    return out


@torch.no_grad()
def best_of_n(model, tokenizer, records, reward: RewardScorer, config: EvalConfig, name: str = "best-of-n",
              temperature: float = 1.0, ns: list[int] | None = None) -> dict:
    """Best-of-n baselines from samples of `model` at `temperature`, for each n in `ns` (config.best_of_n).

    At temperature 1 it is the classic baseline whose KL to the sampling policy is known; at the
    evaluation temperature it answers "does reranking beat what a user of the SFT model sees" — the
    figure PPO's sampled gold is held against (a T=1 sample is worse than a T=0.7 one, so the same
    pick gains more over it).

    n_max = the largest n samples per prompt; best-of-n for a smaller n averages over the
    n_max / n disjoint groups of n (less noise than one group). Per n: `mean` (gold of a single
    sample), `reward_model` (gold of the answer the reward model scores highest), `oracle` (the best
    gold: the ceiling of reranking), `rm_pick` (the RM score of its pick) and the analytic
    `kl` = log n − (n−1)/n of best-of-n to the sampling policy. `pairwise`: the reward model's pairwise
    accuracy against the judge on the same answers (`pairwise_agreement`, in groups of the smallest n).
    """
    ns = sorted(ns or config.best_of_n_values)
    n_max = max(ns)
    model.eval()
    repeated = [r for r in records for _ in range(n_max)]
    answers = answer_chat(model, tokenizer, repeated, _sampling(config, temperature), config.seed + 3, progress=name)
    gold = [score(r, t, f)["score"] for r, t, f in zip(repeated, answers.responses, answers.finished)]
    rm = reward(repeated, answers.responses)
    kinds = [r.get("kind") for r in records]
    out = {"samples_per_prompt": n_max, "temperature": temperature}
    for n in ns:
        picks, oracle, means, rm_picks = [], [], [], []
        for i in range(len(records)):
            groups = [range(i * n_max + g * n, i * n_max + (g + 1) * n) for g in range(n_max // n)]
            best = [g[pick_best([rm[j] for j in g])] for g in groups]
            picks.append(statistics.fmean(gold[j] for j in best))
            rm_picks.append(statistics.fmean(rm[j] for j in best))
            oracle.append(statistics.fmean(max(gold[j] for j in g) for g in groups))
            means.append(statistics.fmean(gold[i * n_max:(i + 1) * n_max]))
        gain, gain_ci = paired_gain(means, picks)
        row = {"mean": statistics.fmean(means), "mean_ci": bootstrap_ci(means),
               "reward_model": statistics.fmean(picks), "reward_model_ci": bootstrap_ci(picks),
               "oracle": statistics.fmean(oracle), "oracle_ci": bootstrap_ci(oracle),
               "gain": gain, "gain_ci": gain_ci, "rm_pick": statistics.fmean(rm_picks),
               "kl": math.log(n) - (n - 1) / n, "by_kind": {}}
        for kind in sorted({k for k in kinds if k is not None}):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            row["by_kind"][kind] = {"mean": statistics.fmean(means[i] for i in idx),
                                    "reward_model": statistics.fmean(picks[i] for i in idx),
                                    "oracle": statistics.fmean(oracle[i] for i in idx)}
        out[str(n)] = row
    out["pairwise"] = pairwise_agreement(gold, rm, len(records), n_max, ns[0])
    out["config"] = to_dict(config)
    out["rm_mean_sample"] = statistics.fmean(rm)
    return out


def pairwise_agreement(gold: list[float], rm: list[float], n_prompts: int, per_prompt: int, k: int) -> dict:
    """How often the reward model orders two answers to one prompt as the judge does, on prompts it never saw.

    `gold` and `rm` hold `per_prompt` answers for each prompt in turn; each prompt's answers are taken in
    groups of `k` and ranked by their gold as the labelling stage ranks its K answers (ties give no pair), so
    the figure is the held-out pairwise accuracy of the reward stage, measured on the evaluation's prompts
    (hundreds, where the reward stage holds out a few dozen ranked ones). Pooled over pairs; the interval
    resamples prompts, whose pairs share answers."""
    agreeing, counts = [], []
    for i in range(n_prompts):
        agree = count = 0
        for start in range(i * per_prompt, (i + 1) * per_prompt - k + 1, k):
            agreed, _, pairs = pair_orders(rm[start:start + k], ranks_from_scores(gold[start:start + k]))
            agree += agreed
            count += pairs
        if count:
            agreeing.append(agree)
            counts.append(count)
    return {"accuracy": sum(agreeing) / max(1, sum(counts)), "ci": bootstrap_ratio_ci(agreeing, counts),
            "prompts": len(counts), "pairs": sum(counts), "answers_per_ranking": k}


def pick_best(scores: list[float]) -> int:
    """Index of the highest score (the first on ties): how best-of-n chooses."""
    return max(range(len(scores)), key=lambda j: scores[j])


def log_examples(records, columns: dict[str, dict], n: int = 5) -> None:
    """A few prompt → greedy answer lines per evaluation, with their gold scores, into the log."""
    for i, record in enumerate(records[:n]):
        log.info("prompt: %s", record["messages"][-1]["content"].replace("\n", " ")[:200])
        for name, evaluation in columns.items():
            answer = evaluation["prompts"][i]["greedy"]
            gold = "  -  " if answer["gold"] is None else f"{answer['gold']:.2f}"
            log.info("  %-5s [%s] %s", name, gold, answer["text"][:200])


def headline(summary: dict) -> str:
    """One log line of a summary."""
    ci = lambda key: f"[{summary[key][0]:.3f}, {summary[key][1]:.3f}]" if summary.get(key) else ""  # noqa: E731
    parts = [f"gold sampled {summary['gold_sampled']:.3f} {ci('gold_sampled_ci')}",
             f"greedy {summary['gold_greedy']:.3f} {ci('gold_greedy_ci')}"] if summary.get("gold_sampled") is not None \
        else ["no gold (no judge records)"]
    if summary.get("rm_sampled") is not None:
        parts.append(f"RM {summary['rm_sampled']:+.3f}")
    if summary.get("kl") is not None:
        parts.append(f"KL {summary['kl']:.2f}")
    parts.append(f"length {summary['length']:.1f}")
    return ", ".join(parts)


# ---- the over-optimisation curve (Gao et al. 2022) --------------------------------------------------

def plot_overoptimisation(points: list[dict], best: dict | None, out_png: Path, title: str = "") -> None:
    """Gold and reward-model score against √KL: PPO's evaluations as a line, best-of-n as points.

    `points`: [{kl, gold, rm, step}] from the policy's own (temperature-1) samples.
    """
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if p.get("kl") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "gold", "gold judge"), (axes[1], "rm", "reward model (normalised)")):
        xs = [math.sqrt(max(0.0, p["kl"])) for p in points]
        ys = [p[key] for p in points]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, marker="o", label="PPO (held-out evaluations)")
        if best:
            ns = [k for k in best if k.isdigit()]
            bx = [0.0] + [math.sqrt(best[n]["kl"]) for n in ns]
            by = [best[ns[0]]["mean"] if key == "gold" else best.get("rm_mean_sample")] + \
                 [best[n]["reward_model" if key == "gold" else "rm_pick"] for n in ns]
            ax.plot(bx, by, marker="s", linestyle="--", label="best-of-n (reward model picks)")
            for n, x, y in zip(["1", *ns], bx, by):
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel("√KL(policy ‖ SFT)  [√nats]")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "over-optimisation: gold vs reward-model score as the policy moves from SFT")
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
