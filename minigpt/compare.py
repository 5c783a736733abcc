"""Every stage's model on the same held-out prompts, side by side, with intervals: `make compare`.

    python -m minigpt.compare --run default [--runs-root runs] [--preset cpu] [prompts=N]

The stages present in runs/<RUN>/ (a folder with metrics.json), in pipeline order: `base`
(pretrain/, asked with a few-shot plain-text prompt), `sft`, `ppo`, `dpo`, `grpo`, `rsft`, and each later
RLHF round `round<n>` (rounds/<n>/ppo). All go through the one shared evaluation
(`minigpt.evaluation`: same prompts, greedy and sampled, same seeds); a stage that saved its own
evaluation under the same settings is not asked again. Every answer also gets the run's reward-model
score (normalised as PPO saw it), so its calibration against the judge can be read off.

The report has, with 95% bootstrap intervals over prompts: every stage's gold (sampled and greedy,
overall and per prompt kind), each stage against its parent (paired gain, win rate), best-of-n from
SFT (reward-model pick and oracle pick), the reward model's rank correlation with gold, and the
over-optimisation curve. Writes runs/<RUN>/compare/: report.md, report.html (self-contained: inline
CSS, curves as base64 PNGs) and report.json, last, since its presence means the comparison is done.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigpt.checkpoint import load_causal_lm
from minigpt.config import EvalConfig, default_preset, load_config
from minigpt.data import load_dialogues
from minigpt.evaluation import (add_reward_scores, best_of_n, calibration, eval_records, evaluate, headline,
                                load_evaluation, pair, pick_fewshot_examples, summarise)
from minigpt.judge import NO_JUDGE_NOTE, has_judge_records
from minigpt.reward_model import load_reward_scorer
from minigpt.run import run_main, setup_logging, write_json_atomic, write_text_atomic
from minigpt.settings import ALTERNATIVES
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.compare")

FEWSHOT_EXAMPLES = 3  # demonstrations in the base model's prompt, as the SFT stage's default
# The SFT model sampled at these lower temperatures: what sharpening alone, with no training, gains
SHARPENED_TEMPERATURES = (0.5, 0.3)
# What each kind of stage folder reports about itself, in the report card.
HEADLINE_KEYS = {
    "pretrain": ("val_loss", "val_bpb"),
    "sft": ("val_loss", "gold_sampled", "gold_greedy", "gold_sampled_base"),
    "reward": ("pairwise_accuracy", "top1_accuracy", "kendall_tau", "best_of_4_gold", "best_of_4_gain",
               "labelled_prompts", "labelled_comparisons"),
    "ppo": ("reward_before", "reward_after", "gold_before", "gold_after", "kl", "verdict"),
    "dpo": ("gold_sampled", "gold_greedy", "train_time_sec"),
    "grpo": ("gold_sampled", "gold_greedy", "train_time_sec"),
    "rsft": ("gold_sampled", "gold_greedy", "kept_answers", "train_time_sec"),
}
PIPELINE = (("base", "pretrain", "pretrain"), ("sft", "sft", "sft"), ("ppo", "ppo", "ppo"),
            *((name, name, name) for name in ALTERNATIVES))  # PPO's alternatives: each against SFT and PPO


@dataclass
class Stage:
    name: str  # its column in the report: base, sft, ppo, dpo, grpo, rsft, round2, ...
    folder: Path  # its checkpoint
    kind: str  # pretrain | sft | ppo | dpo | grpo | rsft: which headline figures its metrics.json has
    parent: str | None = None  # the stage it is measured against


def is_finished(folder: Path) -> bool:
    return (folder / "metrics.json").exists()


def round_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(n, rounds/<n>/) of the later RLHF rounds, in numeric order."""
    rounds = run_dir / "rounds"
    found = [(int(p.name), p) for p in rounds.iterdir() if p.is_dir() and p.name.isdigit()] if rounds.is_dir() else []
    return sorted(found)


def find_stages(run_dir: Path) -> list[Stage]:
    """The finished stages of a run, in pipeline order, each with the parent it is compared with."""
    stages = []
    parents = {"base": None, "sft": "base", "ppo": "sft", **{name: "sft" for name in ALTERNATIVES}}
    for name, folder, kind in PIPELINE:
        if is_finished(run_dir / folder):
            stages.append(Stage(name, run_dir / folder, kind, parents[name]))
        elif name in ("base", "sft", "ppo"):
            log.info("compare: skipping %s: %s has no metrics.json (not finished)", name, run_dir / folder)
    previous = "ppo"
    for n, path in round_folders(run_dir):
        if is_finished(path / "ppo"):
            stages.append(Stage(f"round{n}", path / "ppo", "ppo", previous))
            previous = f"round{n}"
    if not stages:
        raise SystemExit(f"error: {run_dir} has no finished stage to compare (looked for metrics.json in pretrain/, "
                         f"sft/, ppo/ and rounds/*/ppo/); run `make ppo RUN={run_dir.name}` first")
    present = {s.name for s in stages}
    for stage in stages:  # a missing parent: compare with the nearest earlier stage that is there
        while stage.parent is not None and stage.parent not in present:
            stage.parent = parents.get(stage.parent)
    return stages


def read_headline(folder: Path, kind: str) -> dict:
    """The figures a stage folder's metrics.json reports about itself (HEADLINE_KEYS[kind])."""
    metrics = json.loads((folder / "metrics.json").read_text())
    return {key: json_safe(metrics[key]) for key in HEADLINE_KEYS[kind] if key in metrics}


def report_card(run_dir: Path) -> dict[str, dict]:
    """{label: headline figures} of every finished stage folder, reward models included."""
    folders = [("pretrain", run_dir / "pretrain", "pretrain"), ("sft", run_dir / "sft", "sft"),
               ("reward", run_dir / "reward", "reward"), ("ppo", run_dir / "ppo", "ppo"),
               *((name, run_dir / name, name) for name in ALTERNATIVES)]
    for n, path in round_folders(run_dir):
        folders += [(f"round{n} reward", path / "reward", "reward"), (f"round{n} ppo", path / "ppo", "ppo")]
    return {label: read_headline(folder, kind) for label, folder, kind in folders if is_finished(folder)}


def json_safe(x):
    """Numbers rounded and NaN/inf as None, recursively (lists, dicts); other values as they are."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, (int, float)):
        return round(float(x), 6) if math.isfinite(float(x)) else None
    return x


# ---- collect and score ---------------------------------------------------------------------------

def stage_evaluation(stage: Stage, run_dir: Path, records, config: EvalConfig, examples, reference, device) -> dict:
    """A stage's shared evaluation: the one it saved under this config, or a fresh one."""
    saved = stage.folder.parent / "sft" / "evaluation_base.json" if stage.kind == "pretrain" else \
        stage.folder / "evaluation.json"
    evaluation = load_evaluation(saved, config, records)
    if evaluation is not None:
        log.info("%s: reusing its saved evaluation (%s)", stage.name, saved)
        return evaluation
    model = load_causal_lm(stage.folder).eval().to(device)
    tokenizer = Tokenizer.load(stage.folder)
    if stage.kind == "pretrain":
        return evaluate(model, tokenizer, records, config, name=stage.name, fewshot=examples)
    return evaluate(model, tokenizer, records, config, name=stage.name, reference=reference,
                    is_reference=stage.name == "sft")


def prompt_text(record: dict) -> str:
    if len(record["messages"]) == 1:
        return record["messages"][0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def collect(run_dir: Path, config: EvalConfig, eval_data=None, sft_data=None) -> dict:
    """The report: every stage through the shared evaluation, the pairs, best-of-n, calibration."""
    stages = find_stages(run_dir)
    records = eval_records(eval_data or run_dir / "data", config)
    judged = has_judge_records(records)
    if not judged:
        log.info("compare: %s", NO_JUDGE_NOTE)
    examples = pick_fewshot_examples(load_dialogues(sft_data or run_dir / "data", "train"), FEWSHOT_EXAMPLES)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = None
    if is_finished(run_dir / "sft"):
        reference = load_causal_lm(run_dir / "sft").eval().requires_grad_(False).to(device)
    reward = load_reward_scorer(run_dir / "reward", device, confidence_model=reference)
    if reward is None:
        log.info("compare: no finished reward model in %s; reward-model scores are left null", run_dir / "reward")
    evaluations = {}
    for stage in tqdm(stages, desc="compare", unit="stage"):
        evaluation = stage_evaluation(stage, run_dir, records, config, examples, reference, device)
        if reward is not None:
            add_reward_scores(evaluation, records, reward)
        evaluations[stage.name] = evaluation
    report = {"run": run_dir.name, "prompts": len(records), "eval_config": dataclasses.asdict(config),
              "gold_note": None if judged else NO_JUDGE_NOTE,
              "stages": {}, "pairs": {}, "best_of_n": {}, "calibration": {}, "sharpening": {},
              "report_card": report_card(run_dir)}
    for stage in stages:
        summary = summarise(evaluations[stage.name])
        report["stages"][stage.name] = {**summary, "checkpoint": str(stage.folder), "parent": stage.parent,
                                        "headline": read_headline(stage.folder, stage.kind)}
        log.info("%s: %s", stage.name, headline(summary))
    comparisons = [(s.name, s.parent) for s in stages if s.parent]
    comparisons += [(s.name, other) for s in stages for other in ("sft", "ppo")
                    if s.name in ALTERNATIVES or s.name.startswith("round") and other == "sft"]
    for after, before in dict.fromkeys(c for c in comparisons if c[0] != c[1] and c[1] in evaluations):
        report["pairs"][f"{after}_vs_{before}"] = pair(evaluations[before], evaluations[after], before, after)
        log.info("%s", report["pairs"][f"{after}_vs_{before}"]["summary"])
    report["winner"] = which_method_won(report["pairs"])
    if reward is not None and reference is not None and judged:
        report["best_of_n"] = saved_or_new_best_of_n(run_dir, reference, records, reward, config)
        report["calibration"] = calibration(evaluations)
    if reference is not None and judged and "sft" in evaluations:
        report["sharpening"] = sharpening_baselines(reference, Tokenizer.load(run_dir / "sft"), records, config,
                                                    evaluations)
    report["responses"] = [{"id": r.get("id", str(i)), "kind": r.get("kind"), "prompt": prompt_text(r),
                            **{name: answer_row(ev["prompts"][i]) for name, ev in evaluations.items()}}
                           for i, r in enumerate(records)]
    return json_safe(report)


def sharpening_baselines(sft_model, tokenizer, records, config: EvalConfig, evaluations: dict,
                         temperatures=SHARPENED_TEMPERATURES) -> dict:
    """The SFT model sampled at lower temperatures, against SFT at the evaluation's and against every RLHF stage.

    A lower temperature makes the sampled answers more like the greedy one, which is better here, at no
    training cost. RLHF's sampled gain is partly such sharpening (its greedy gain says how much is not);
    this row says how much sharpening alone buys, so an RLHF stage that does no better is only sharpening."""
    sft = evaluations["sft"]
    rlhf = [name for name in evaluations if name not in ("base", "sft")]
    out = {}
    for temperature in temperatures:
        # no policy samples: they are drawn at temperature 1, so SFT's own evaluation already has them
        sharpened = evaluate(sft_model, tokenizer, records,
                             dataclasses.replace(config, temperature=temperature, kl_samples=0),
                             name=f"sft T={temperature:g}", is_reference=True)
        summary = summarise(sharpened)
        gain = pair(sft, sharpened, "sft", f"sft at T={temperature:g}")
        row = {"gold_sampled": summary["gold_sampled"], "gold_sampled_ci": summary["gold_sampled_ci"],
               "gain_sampled": gain["gain_sampled"], "gain_sampled_ci": gain["gain_sampled_ci"],
               "win_rate": gain["win_rate"], "win_rate_ci": gain["win_rate_ci"], "stages": {}}
        for name in rlhf:  # the stage's sampled answers (at the evaluation temperature) minus sharpened SFT's
            versus = pair(sharpened, evaluations[name], f"sft at T={temperature:g}", name)
            row["stages"][name] = {"gain_sampled": versus["gain_sampled"], "gain_sampled_ci": versus["gain_sampled_ci"]}
        log.info("sft sampled at T=%g: gold %.3f, %+.3f over T=%g (95%% CI %+.3f to %+.3f)%s", temperature,
                 row["gold_sampled"], row["gain_sampled"], config.temperature, *row["gain_sampled_ci"],
                 "".join(f"; {name} {v['gain_sampled']:+.3f} against it" for name, v in row["stages"].items()))
        out[f"{temperature:g}"] = row
    return out


def which_method_won(pairs: dict) -> str | None:
    """One sentence: which of the RLHF methods (PPO, DPO, GRPO, RSFT, rounds) gained most over SFT, and whether measurably."""
    from minigpt.stats import significance

    methods = {key[:-len("_vs_sft")]: p for key, p in pairs.items()
               if key.endswith("_vs_sft") and key != "sft_vs_base" and p.get("gain_sampled") is not None}
    if not methods:
        return None
    best = max(methods, key=lambda m: methods[m]["gain_sampled"])
    p = methods[best]
    verdict = significance(p["gain_sampled"], p["gain_sampled_ci"])
    others = ", ".join(f"{m} {q['gain_sampled']:+.3f}" for m, q in methods.items() if m != best)
    if verdict != "better":
        return (f"No method measurably beat SFT on this run: the largest sampled gain is {best}'s "
                f"({p['gain_sampled']:+.3f}, 95% CI {p['gain_sampled_ci'][0]:+.3f} to {p['gain_sampled_ci'][1]:+.3f})"
                + (f"; the others: {others}." if others else "."))
    return (f"{best} won on this run: {p['summary'].split(': ', 1)[-1]}" + (f". The others' sampled gains over SFT: "
                                                                           f"{others}." if others else "."))


def saved_or_new_best_of_n(run_dir: Path, reference, records, reward, config: EvalConfig) -> dict:
    path = run_dir / "reward" / "best_of_n.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == dataclasses.asdict(config):
            rows = {k: v for k, v in saved.items() if k.isdigit()}
            # the reward stage also reranks answers sampled at the evaluation temperature (what PPO is held against)
            rows.update({f"{k} at T={config.temperature:g}": v
                         for k, v in saved.get("eval_temperature", {}).items() if k.isdigit()})
            return rows
    tokenizer = Tokenizer.load(run_dir / "sft")
    best = best_of_n(reference, tokenizer, records, reward, config)
    return {k: v for k, v in best.items() if k.isdigit()}


def answer_row(entry: dict) -> dict:
    """What the report shows of one stage's answers to one prompt: the greedy answer, the sampled mean."""
    greedy, sampled = entry["greedy"], entry["sampled"]
    mean = lambda key: sum(a[key] for a in sampled) / len(sampled) if sampled and None not in  \
        [a[key] for a in sampled] else None  # noqa: E731
    return {"text": greedy["text"], "finished": greedy["finished"], "gold": greedy["gold"], "rm": greedy["rm"],
            "length": greedy["length"], "gold_sampled": mean("gold"), "rm_sampled": mean("rm"), "kl": entry["kl"],
            "sample": sampled[0]["text"] if sampled else None}


# ---- render --------------------------------------------------------------------------------------

HOW_TO_READ = (
    "Every figure is a mean over the same held-out prompts with its 95% bootstrap interval over prompts. "
    "*sampled*: each prompt answered several times at the evaluation temperature (what a chat user sees); "
    "*greedy*: the single most likely answer (which model answers better). A gain counts only when its paired "
    "interval excludes zero; a gain that shows sampled but not greedy is lower entropy, not better answers. "
    "Win rate: the share of prompts where a stage's expected gold beats the other's (ties count half). "
    "Best-of-n: n SFT samples, the reward model keeps one — if that does not beat a single sample, PPO against "
    "the same reward model cannot either; the oracle (the judge picks) is the ceiling of reranking. "
    "Sharpening alone: the SFT model sampled at a lower temperature, no training; an RLHF stage whose sampled "
    "gold does not beat it has only sharpened the SFT model. "
    "Calibration: Spearman between reward-model score and gold over all answers. RM: reward-model score "
    "(normalised); KL: nats per answer to the SFT model, measured on the policy's own samples.")


def shown(text: str) -> str:
    """Model text made safe to show: control characters (a tiny model emits some) as U+FFFD."""
    return "".join(c if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160) else "\ufffd" for c in text)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def with_ci(value, ci, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "—"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f.format(value) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def pct_ci(value, ci) -> str:
    return "—" if value is None else f"{100 * value:.0f}% [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%]"


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the terminal, Markdown and HTML renderings."""
    stages = report["stages"]
    out = [("Stages", ["stage", "gold sampled [95% CI]", "gold greedy [95% CI]", "RM", "KL to SFT", "tokens",
                       "correct", "complete", "concise", "clean"],
            [[name, with_ci(s["gold_sampled"], s["gold_sampled_ci"]), with_ci(s["gold_greedy"], s["gold_greedy_ci"]),
              fmt(s["rm_sampled"], 2), fmt(s["kl"], 2), fmt(s["length"], 1),
              *(fmt(s["components"].get(k), 2) for k in ("correct", "complete", "concise", "clean"))]
             for name, s in stages.items()])]
    kinds = sorted({k for s in stages.values() for k in s["by_kind"]})
    if kinds:
        out.append(("Gold (sampled) by prompt kind", ["stage", *(f"{k} (n={next(iter(stages.values()))['by_kind'].get(k, {}).get('prompts', '?')})" for k in kinds)],
                    [[name, *(with_ci(s["by_kind"][k]["gold_sampled"], s["by_kind"][k]["gold_sampled_ci"], 2)
                              if k in s["by_kind"] else "—" for k in kinds)] for name, s in stages.items()]))
    if report["pairs"]:
        out.append(("Each stage against another (paired, same prompts)",
                    ["pair", "gain sampled [95% CI]", "gain greedy [95% CI]", "win rate [95% CI]", "in words"],
                    [[key, with_ci(p["gain_sampled"], p["gain_sampled_ci"], signed=True),
                      with_ci(p["gain_greedy"], p["gain_greedy_ci"], signed=True), pct_ci(p["win_rate"], p["win_rate_ci"]),
                      p["summary"].split(": ", 1)[-1]] for key, p in report["pairs"].items()]))
    if report["best_of_n"]:
        out.append(("Best-of-n from SFT (temperature 1 unless the row says; KL to the sampling policy)",
                    ["n", "one sample", "reward-model pick [95% CI]", "gain [95% CI]", "oracle pick [95% CI]",
                     "KL (log n − (n−1)/n)"],
                    [[n, fmt(b["mean"]), with_ci(b["reward_model"], b["reward_model_ci"]),
                      with_ci(b["gain"], b["gain_ci"], signed=True), with_ci(b["oracle"], b["oracle_ci"]), fmt(b["kl"], 2)]
                     for n, b in report["best_of_n"].items()]))
    if report.get("sharpening"):
        rlhf = list(next(iter(report["sharpening"].values()))["stages"])
        out.append(("Sharpening alone: SFT sampled at a lower temperature, no training",
                    ["SFT sampled at", "gold sampled [95% CI]", f"gain over T={report['eval_config']['temperature']:g}",
                     "win rate", *(f"{name} minus it" for name in rlhf)],
                    [[f"T={t}", with_ci(r["gold_sampled"], r["gold_sampled_ci"]),
                      with_ci(r["gain_sampled"], r["gain_sampled_ci"], signed=True), pct_ci(r["win_rate"], r["win_rate_ci"]),
                      *(with_ci(r["stages"][name]["gain_sampled"], r["stages"][name]["gain_sampled_ci"], signed=True)
                        for name in rlhf)]
                     for t, r in report["sharpening"].items()]))
    if report["calibration"]:
        out.append(("Reward-model calibration (Spearman with gold)", ["answers of", "Spearman"],
                    [[name, fmt(rho, 2)] for name, rho in report["calibration"].items()]))
    return out


def render_table(report: dict) -> str:
    """The tables as plain text for the terminal."""
    blocks = []
    for title, header, rows in tables(report):
        if title.startswith("Each stage"):  # the words column is too wide for a terminal table
            header, rows = header[:-1], [r[:-1] for r in rows]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        blocks.append("\n".join([title, line(header), "  ".join("-" * w for w in widths), *map(line, rows)]))
    return "\n\n".join(blocks)


def card_lines(headline: dict) -> tuple[list[str], list[str]]:
    """(`key value` strings of a headline's figures, its PPO verdict lines)."""
    figures = [f"{k} {fmt(v) if not isinstance(v, list) else v}" for k, v in headline.items() if k != "verdict"]
    return figures, headline.get("verdict", [])


RESPONSE_FIELDS = (("gold", "gold (greedy)"), ("gold_sampled", "gold (sampled mean)"), ("rm", "RM"), ("kl", "KL"),
                   ("length", "tokens"))


def render_markdown(report: dict) -> str:
    md_cell = lambda text: shown(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = [f"# minigpt run `{report['run']}`: every stage on {report['prompts']} held-out prompts", "", HOW_TO_READ, ""]
    if report.get("gold_note"):
        out += [f"**{report['gold_note']}**", ""]
    if report.get("winner"):
        out += [f"**Which method won.** {report['winner']}", ""]
    for title, header, rows in tables(report):
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows), ""]
    out += ["## Report card", ""]
    for label, headline_ in report["report_card"].items():
        figures, verdict = card_lines(headline_)
        out.append(f"- **{label}**: " + ", ".join(figures))
        out += [f"  - `{line}`" for line in verdict]
    out += ["", "## Answers (greedy)", ""]
    for entry in report["responses"]:
        out += [f"### {entry['id']} ({entry.get('kind') or '?'})", "",
                *("> " + line for line in shown(entry["prompt"]).splitlines()), "",
                "| stage | " + " | ".join(t for _, t in RESPONSE_FIELDS) + " | answer |",
                "|" + "---|" * (len(RESPONSE_FIELDS) + 2)]
        for name in report["stages"]:
            r = entry[name]
            out.append(f"| {name} | " + " | ".join(fmt(r[k], 0 if k == "length" else 3) for k, _ in RESPONSE_FIELDS)
                       + f" | {md_cell(r['text']) or '*(empty)*'} |")
        out.append("")
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;padding:.25em .6em;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
blockquote{white-space:pre-wrap;background:#f8f8f8;border-left:4px solid #bbb;margin:0;padding:.4em .8em}
.warn{color:#a40000}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}code{font-size:90%}"""


def render_html(report: dict, images: list[tuple[str, bytes]]) -> str:
    """A self-contained page: inline CSS, PNG curves as data URIs, every model text escaped."""
    e = html.escape
    cells = lambda row, tag="td": "".join(f"<{tag}{'' if i == 0 or tag == 'th' else ' class=n'}>{e(c)}</{tag}>"  # noqa: E731
                                          for i, c in enumerate(row))
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>minigpt compare: {e(report['run'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Run {e(report['run'])}: every stage on {report['prompts']} held-out prompts</h1>",
           f"<p>{e(HOW_TO_READ)}</p>"] + ([f"<p class=warn><b>{e(report['gold_note'])}</b></p>"]
                                            if report.get("gold_note") else []) + \
          ([f"<p><b>Which method won.</b> {e(report['winner'])}</p>"] if report.get("winner") else [])
    for title, header, rows in tables(report):
        out += [f"<h2>{e(title)}</h2><table><tr>" + cells(header, "th") + "</tr>",
                *("<tr>" + cells(r) + "</tr>" for r in rows), "</table>"]
    out.append("<h2>Report card</h2><ul>")
    for label, headline_ in report["report_card"].items():
        figures, verdict = card_lines(headline_)
        warn = lambda line: "warn" if line.startswith(("WARN", "VERDICT: needs")) else "ok"  # noqa: E731
        lines = "".join(f"<li class={warn(line)}><code>{e(line)}</code></li>" for line in verdict)
        out.append(f"<li><b>{e(label)}</b>: {e(', '.join(figures))}" + (f"<ul>{lines}</ul>" if lines else "") + "</li>")
    out.append("</ul><h2>Curves</h2>")
    for name, png in images:
        out.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src=\"data:image/png;base64,"
                   f"{base64.b64encode(png).decode('ascii')}\">")
    out.append("<h2>Answers (greedy)</h2>")
    for entry in report["responses"]:
        out += [f"<h3>{e(str(entry['id']))} ({e(str(entry.get('kind') or '?'))})</h3>"
                f"<blockquote>{e(shown(entry['prompt']))}</blockquote><table><tr>",
                cells(["stage", *(t for _, t in RESPONSE_FIELDS), "answer"], "th") + "</tr>"]
        for name in report["stages"]:
            r = entry[name]
            figures = [fmt(r[k], 0 if k == "length" else 3) for k, _ in RESPONSE_FIELDS]
            out.append("<tr>" + cells([name, *figures]) + f"<td>{e(shown(r['text'])) or '<i>(empty)</i>'}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def curve_images(run_dir: Path) -> list[tuple[str, bytes]]:
    """(relative path, PNG bytes) of the curves every stage folder already drew (over-optimisation first)."""
    folders = [run_dir / s for s in ("pretrain", "sft", "reward", "ppo", *ALTERNATIVES)]
    for _, path in round_folders(run_dir):
        folders += [path / "reward", path / "ppo"]
    pngs = [png for folder in folders if folder.is_dir() for png in sorted(folder.glob("*.png"))]
    pngs.sort(key=lambda p: p.name != "overoptimisation.png")
    return [(str(png.relative_to(run_dir)), png.read_bytes()) for png in pngs]


def parse_overrides(items: list[str], config: EvalConfig) -> EvalConfig:
    """`prompts=N` (and the other EvalConfig fields) as key=value, so `make compare ARGS=prompts=20` works.

    A changed setting means a fresh evaluation of every stage (saved ones no longer match).
    """
    from minigpt.config import apply_overrides

    try:
        return apply_overrides(config, items)
    except ValueError as error:
        raise SystemExit(f"error: compare: {error}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="default")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--seed", type=int, default=0, help="accepted for the Makefile (the evaluation's seeds are fixed)")
    parser.add_argument("--prompts", type=int, default=None, help="first N held-out prompts (default: the preset's)")
    parser.add_argument("--preset", default=None, help="the run's preset: the evaluation's size (default cpu/gpu)")
    parser.add_argument("--eval-data", default=None, help="held-out prompts (default: the run's world)")
    parser.add_argument("--sft-data", default=None, help="dialogues for the base model's few-shot prompt")
    parser.add_argument("overrides", nargs="*", help="EvalConfig fields as key=value, e.g. prompts=50")
    args = parser.parse_args(argv)
    config = load_config(EvalConfig, args.preset or default_preset())
    config = parse_overrides(args.overrides + ([f"prompts={args.prompts}"] if args.prompts else []), config)
    run_dir = Path(args.runs_root) / args.run
    out_dir = run_dir / "compare"
    setup_logging(out_dir)
    report = collect(run_dir, config, args.eval_data, args.sft_data)
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    write_text_atomic(out_dir / "report.html", render_html(report, curve_images(run_dir)))
    write_json_atomic(out_dir / "report.json", report)  # last: Make's target
    print("\n" + render_table(report), flush=True)
    if report.get("winner"):
        print("\n" + report["winner"], flush=True)
    print(f"\nreport: {out_dir / 'report.html'} (also report.md, report.json)", flush=True)


if __name__ == "__main__":
    run_main(main)
