"""Every stage's model on the same held-out prompts, side by side: `make compare`.

    python -m minigpt.compare --run default [--runs-root runs] [--seed 0] [--prompts 100]

The stages present in runs/<RUN>/ (a folder with metrics.json), in order: `base` (pretrain/, asked
with a few-shot plain-text prompt, as the SFT stage measures it), `sft`, `ppo`, and each later RLHF
round `round<n>` (rounds/<n>/ppo). All answer the first N held-out eval prompts with the same
decoding and seed. Each answer gets the gold judge's score, the reward model's (normalised as PPO
saw it; null without a reward model), its KL to the SFT model (nats; 0 for SFT itself) and its
length in tokens.

The base model's KL is null: it answered a different prompt (few-shot text, not the chat layout),
so a log-ratio against SFT under the chat prompt would not measure how far the two models are apart.

Writes runs/<RUN>/compare/: report.md, report.html (self-contained: inline CSS, curves as base64
PNGs) and report.json, last, since its presence means the comparison is done.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigpt.checkpoint import load_causal_lm, load_sequence_classifier, read_manifest
from minigpt.data import load_dialogues, load_prompts
from minigpt.evaluation import EVAL_SAMPLING, answer_chat, answer_fewshot, pick_fewshot_examples
from minigpt.judge import NO_JUDGE_NOTE, has_judge_records, score
from minigpt.ppo import kl_to_reference
from minigpt.reward_model import score_conversations
from minigpt.run import setup_logging, write_json_atomic, write_text_atomic
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.compare")

FEWSHOT_EXAMPLES = 3  # demonstrations in the base model's prompt, as the SFT stage's default
DEFAULT_PROMPTS = 100
# What each kind of stage folder reports about itself, in the report card.
HEADLINE_KEYS = {
    "pretrain": ("val_loss", "val_bpb"),
    "sft": ("val_loss", "gold_score", "gold_score_base"),
    "reward": ("pairwise_accuracy", "top1_accuracy", "kendall_tau"),
    "ppo": ("reward_before", "reward_after", "gold_before", "gold_after", "kl", "verdict"),
}
AVERAGES = (("gold_score", "gold"), ("rm_score", "RM"), ("kl_to_sft", "KL to SFT"), ("mean_length", "tokens"))
RESPONSE_FIELDS = (("gold", "gold"), ("rm", "RM"), ("kl", "KL"), ("length", "tokens"))


@dataclass
class Stage:
    name: str  # its column in the report: base, sft, ppo, round2, ...
    folder: Path  # its checkpoint
    kind: str  # pretrain | sft | ppo: which headline figures its metrics.json has


def is_finished(folder: Path) -> bool:
    return (folder / "metrics.json").exists()


def round_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(n, rounds/<n>/) of the later RLHF rounds, in numeric order."""
    rounds = run_dir / "rounds"
    found = [(int(p.name), p) for p in rounds.iterdir() if p.is_dir() and p.name.isdigit()] if rounds.is_dir() else []
    return sorted(found)


def find_stages(run_dir: Path) -> list[Stage]:
    """The finished stages of a run, in pipeline order; missing ones are noted and skipped."""
    stages = []
    for name, folder, kind in (("base", "pretrain", "pretrain"), ("sft", "sft", "sft"), ("ppo", "ppo", "ppo")):
        if is_finished(run_dir / folder):
            stages.append(Stage(name, run_dir / folder, kind))
        else:
            log.info("compare: skipping %s: %s has no metrics.json (not finished)", name, run_dir / folder)
    stages += [Stage(f"round{n}", path / "ppo", "ppo") for n, path in round_folders(run_dir)
               if is_finished(path / "ppo")]
    if not stages:
        raise SystemExit(f"error: {run_dir} has no finished stage to compare (looked for metrics.json in pretrain/, "
                         f"sft/, ppo/ and rounds/*/ppo/); run `make ppo RUN={run_dir.name}` first")
    return stages


def read_headline(folder: Path, kind: str) -> dict:
    """The figures a stage folder's metrics.json reports about itself (HEADLINE_KEYS[kind])."""
    metrics = json.loads((folder / "metrics.json").read_text())
    return {key: json_number(metrics[key]) if key != "verdict" else metrics[key] for key in HEADLINE_KEYS[kind]
            if key in metrics}


def report_card(run_dir: Path) -> dict[str, dict]:
    """{label: headline figures} of every finished stage folder, reward models included."""
    folders = [("pretrain", run_dir / "pretrain", "pretrain"), ("sft", run_dir / "sft", "sft"),
               ("reward", run_dir / "reward", "reward"), ("ppo", run_dir / "ppo", "ppo")]
    for n, path in round_folders(run_dir):
        folders += [(f"round{n} reward", path / "reward", "reward"), (f"round{n} ppo", path / "ppo", "ppo")]
    return {label: read_headline(folder, kind) for label, folder, kind in folders if is_finished(folder)}


def json_number(x):
    """A JSON-safe number: rounded, and None for NaN, infinities and missing values."""
    if isinstance(x, bool) or x is None:
        return x
    return round(float(x), 6) if math.isfinite(float(x)) else None


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return json_number(statistics.fmean(values)) if values else None


# ---- collect and score ---------------------------------------------------------------------------

@dataclass
class RewardScorer:
    model: torch.nn.Module
    tokenizer: Tokenizer
    mean: float
    std: float

    def __call__(self, records, responses) -> list[float]:
        raw = score_conversations(self.model, self.tokenizer, [r["messages"] for r in records], responses)
        return ((raw - self.mean) / self.std).tolist()


def load_reward_scorer(run_dir: Path, device) -> RewardScorer | None:
    folder = run_dir / "reward"
    if not is_finished(folder):
        log.info("compare: no finished reward model at %s; reward-model scores are left null", folder)
        return None
    stats = read_manifest(folder).get("metrics") or {}
    model = load_sequence_classifier(folder).eval().requires_grad_(False).to(device)
    return RewardScorer(model, Tokenizer.load(folder), stats.get("reward_mean", 0.0),
                        stats.get("reward_std", 1.0) or 1.0)


@torch.no_grad()
def answer_and_score(stage: Stage, records, examples, seed: int, reference, reward: RewardScorer | None,
                     device) -> list[dict]:
    """One stage's answers to `records`, each with its gold, reward-model, KL and length figures."""
    model, tokenizer = load_causal_lm(stage.folder).eval().to(device), Tokenizer.load(stage.folder)
    progress = f"{stage.name} answers"
    if stage.kind == "pretrain":
        answers = answer_fewshot(model, tokenizer, records, examples, EVAL_SAMPLING, seed, progress=progress)
    else:
        answers = answer_chat(model, tokenizer, records, EVAL_SAMPLING, seed, progress=progress)
    texts = answers.responses
    if stage.name == "sft":
        kl = [0.0] * len(texts)
    elif stage.kind == "ppo" and reference is not None:
        prompts = [tokenizer.encode_prompt(r["messages"]) for r in records]
        kl = kl_to_reference(model, reference, tokenizer, prompts, texts)
    else:
        kl = [None] * len(texts)
    rm = reward(records, texts) if reward is not None else [None] * len(texts)
    rows, judged_prompts = [], has_judge_records(records)
    for record, text, finished, rm_score, kl_score in zip(records, texts, answers.finished, rm, kl):
        judged = score(record, text, finished) if judged_prompts else {"score": None}
        rows.append({"text": text, "finished": finished, "gold": json_number(judged.pop("score")),
                     "rm": json_number(rm_score), "kl": json_number(kl_score), "length": len(tokenizer.encode(text)),
                     "components": judged})
    return rows


def summarise(stage: Stage, rows: list[dict], headline: dict) -> dict:
    components = rows[0]["components"] if rows else {}
    return {"gold_score": mean_or_none(r["gold"] for r in rows), "rm_score": mean_or_none(r["rm"] for r in rows),
            "kl_to_sft": mean_or_none(r["kl"] for r in rows), "mean_length": mean_or_none(r["length"] for r in rows),
            "gold_components": {k: mean_or_none(r["components"][k] for r in rows) for k in components},
            "checkpoint": str(stage.folder), "headline": headline}


def prompt_text(record: dict) -> str:
    if len(record["messages"]) == 1:
        return record["messages"][0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def collect(run_dir: Path, seed: int, n_prompts: int, eval_data: str = "", sft_data: str = "") -> dict:
    """The report: every stage's answers to the same prompts, scored, and its averages.

    `eval_data`/`sft_data`: the run's own held-out prompts and dialogues when not the world's.
    """
    stages = find_stages(run_dir)
    records = load_prompts(eval_data or run_dir / "data", "eval")[:n_prompts]
    examples = pick_fewshot_examples(load_dialogues(sft_data or run_dir / "data", "train"), FEWSHOT_EXAMPLES)
    if not has_judge_records(records):
        log.info("compare: %s; the report shows reward-model scores, KL, length and the answers", NO_JUDGE_NOTE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = None
    if is_finished(run_dir / "sft"):
        reference = load_causal_lm(run_dir / "sft").eval().requires_grad_(False).to(device)
    reward = load_reward_scorer(run_dir, device)
    report = {"run": run_dir.name, "seed": seed, "prompts": len(records), "stages": {},
              "responses": [{"id": r.get("id", str(i)), "prompt": prompt_text(r)} for i, r in enumerate(records)],
              "report_card": report_card(run_dir),
              **({} if has_judge_records(records) else {"note": NO_JUDGE_NOTE})}
    for stage in tqdm(stages, desc="compare", unit="stage"):
        rows = answer_and_score(stage, records, examples, seed, reference, reward, device)
        report["stages"][stage.name] = summarise(stage, rows, read_headline(stage.folder, stage.kind))
        for entry, row in zip(report["responses"], rows):
            entry[stage.name] = {k: row[k] for k in ("text", "gold", "rm", "kl", "length", "finished")}
        log.info("%s: gold %s, RM %s, KL %s, %s tokens", stage.name,
                 *(fmt(report["stages"][stage.name][key]) for key, _ in AVERAGES))
    return report


# ---- render --------------------------------------------------------------------------------------

def shown(text: str) -> str:
    """Model text made safe to show: control characters (a tiny model emits some) as U+FFFD."""
    return "".join(c if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160) else "\ufffd" for c in text)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def averages_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-stage averages table (shared by every rendering)."""
    components = sorted({k for s in report["stages"].values() for k in s["gold_components"]})
    header = ["stage", *(title for _, title in AVERAGES), *components]
    rows = [[name, *(fmt(s[key], 1 if key == "mean_length" else 3) for key, _ in AVERAGES),
             *(fmt(s["gold_components"].get(k)) for k in components)] for name, s in report["stages"].items()]
    return header, rows


def render_table(report: dict) -> str:
    header, rows = averages_rows(report)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def card_lines(headline: dict) -> tuple[list[str], list[str]]:
    """(`key value` strings of a headline's figures, its PPO verdict lines)."""
    figures = [f"{k} {fmt(v)}" for k, v in headline.items() if k != "verdict"]
    return figures, headline.get("verdict", [])


def render_markdown(report: dict) -> str:
    md_cell = lambda text: shown(text).replace("|", "\\|").replace("\n", " ")
    header, rows = averages_rows(report)
    out = [f"# minigpt run `{report['run']}`: every stage on {report['prompts']} held-out prompts "
           f"(seed {report['seed']})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
           *("| " + " | ".join(r) + " |" for r in rows), *(["", f"*{report['note']}*"] if "note" in report else []),
           "", "## Report card", ""]
    for label, headline in report["report_card"].items():
        figures, verdict = card_lines(headline)
        out.append(f"- **{label}**: " + ", ".join(figures))
        out += [f"  - `{line}`" for line in verdict]
    out += ["", "## Answers", ""]
    for entry in report["responses"]:
        out += [f"### {entry['id']}", "", *("> " + line for line in shown(entry["prompt"]).splitlines()), "",
                "| stage | " + " | ".join(t for _, t in RESPONSE_FIELDS) + " | answer |", "|---|---|---|---|---|---|"]
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
    cells = lambda row, tag="td": "".join(f"<{tag}{'' if i == 0 or tag == 'th' else ' class=n'}>{e(c)}</{tag}>"
                                          for i, c in enumerate(row))
    header, rows = averages_rows(report)
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>minigpt compare: {e(report['run'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Run {e(report['run'])}: every stage on {report['prompts']} held-out prompts</h1>",
           f"<p>Same prompts, decoding and seed ({report['seed']}) for every stage. RM: reward-model score "
           "(normalised); KL: nats per answer to the SFT model; tokens: answer length.</p>",
           "<h2>Averages</h2><table><tr>" + cells(header, "th") + "</tr>",
           *("<tr>" + cells(r) + "</tr>" for r in rows), "</table>",
           *([f"<p class=warn>{e(report['note'])}</p>"] if "note" in report else []), "<h2>Report card</h2><ul>"]
    for label, headline in report["report_card"].items():
        figures, verdict = card_lines(headline)
        warn = lambda line: "warn" if line.startswith(("WARN", "VERDICT: needs")) else "ok"
        lines = "".join(f"<li class={warn(line)}><code>{e(line)}</code></li>" for line in verdict)
        out.append(f"<li><b>{e(label)}</b>: {e(', '.join(figures))}" + (f"<ul>{lines}</ul>" if lines else "") + "</li>")
    out.append("</ul><h2>Curves</h2>")
    for name, png in images:
        out.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src=\"data:image/png;base64,"
                   f"{base64.b64encode(png).decode('ascii')}\">")
    out.append("<h2>Answers</h2>")
    for entry in report["responses"]:
        out += [f"<h3>{e(str(entry['id']))}</h3><blockquote>{e(shown(entry['prompt']))}</blockquote><table><tr>",
                cells(["stage", *(t for _, t in RESPONSE_FIELDS), "answer"], "th") + "</tr>"]
        for name in report["stages"]:
            r = entry[name]
            figures = [fmt(r[k], 0 if k == "length" else 3) for k, _ in RESPONSE_FIELDS]
            out.append("<tr>" + cells([name, *figures]) + f"<td>{e(shown(r['text'])) or '<i>(empty)</i>'}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def curve_images(run_dir: Path) -> list[tuple[str, bytes]]:
    """(relative path, PNG bytes) of the curves every stage folder already drew."""
    folders = [run_dir / s for s in ("pretrain", "sft", "reward", "ppo")]
    for _, path in round_folders(run_dir):
        folders += [path / "reward", path / "ppo"]
    return [(str(png.relative_to(run_dir)), png.read_bytes()) for folder in folders if folder.is_dir()
            for png in sorted(folder.glob("*.png"))]


def parse_overrides(items: list[str], n_prompts: int) -> int:
    """`prompts=N` is the one key=value compare takes (so `make compare ARGS=prompts=20` works)."""
    for item in items:
        key, _, value = item.partition("=")
        if key != "prompts" or not value.isdigit():
            raise SystemExit(f"error: compare takes no override {item!r}; the only one is prompts=N "
                             f"(or --prompts N)")
        n_prompts = int(value)
    return n_prompts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="default")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="first N held-out prompts")
    parser.add_argument("--preset", default=None, help="accepted for the Makefile; compare has no settings")
    parser.add_argument("--eval-data", default="", help="held-out prompts (default: the world's)")
    parser.add_argument("--sft-data", default="", help="dialogues for the base model's few-shot prompt")
    parser.add_argument("overrides", nargs="*", help="prompts=N")
    args = parser.parse_args(argv)
    n_prompts = parse_overrides(args.overrides, args.prompts)
    run_dir = Path(args.runs_root) / args.run
    out_dir = run_dir / "compare"
    setup_logging(out_dir)
    report = collect(run_dir, args.seed, n_prompts, args.eval_data, args.sft_data)
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    write_text_atomic(out_dir / "report.html", render_html(report, curve_images(run_dir)))
    write_json_atomic(out_dir / "report.json", report)  # last: Make's target
    print("\n" + render_table(report) + (f"\n{report['note']}" if "note" in report else ""), flush=True)
    print(f"\nreport: {out_dir / 'report.html'} (also report.md, report.json)", flush=True)


if __name__ == "__main__":
    from minigpt.run import run_main

    run_main(main)
