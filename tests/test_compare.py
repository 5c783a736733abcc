"""`make compare`: every stage's model on the same held-out prompts, in three self-describing reports."""

import json
import math
import os
import re
import subprocess

import pytest

from conftest import PYTHON, REPO
from minigpt.compare import find_stages, render_html

STAGES = ("base", "sft", "ppo")


@pytest.fixture(scope="module")
def compared(tiny_ppo):
    """A complete tiny run (pretrain → sft → samples → reward → ppo) and the output of `compare` on it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([PYTHON, "-m", "minigpt.compare", "--run", "t", "--runs-root", str(tiny_ppo),
                             "--preset", "tiny"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return tiny_ppo / "t", result.stdout


def test_compare_writes_one_finite_entry_per_stage(compared):
    run_dir, _ = compared
    for name in ("report.md", "report.html", "report.json"):
        assert (run_dir / "compare" / name).exists(), name
    report = json.loads((run_dir / "compare" / "report.json").read_text())
    # the shared tiny run may also hold dpo/grpo/rsft, when their tests ran first
    assert list(report["stages"])[:len(STAGES)] == list(STAGES) and set(report["stages"]) <= {*STAGES, "dpo", "grpo", "rsft"}
    for name, stage in report["stages"].items():
        for key in ("gold_sampled", "gold_greedy", "rm_sampled", "kl", "length"):
            value = stage[key]
            if name == "base" and key == "kl":
                assert value is None  # the base model answers a different (few-shot) prompt: no KL to SFT
                continue
            assert isinstance(value, float) and math.isfinite(value), (name, key, value)
        for key in ("gold_sampled_ci", "gold_greedy_ci"):
            low, high = stage[key]
            assert low <= stage[key[:-3]] <= high
        assert set(stage["components"]) == {"correct", "complete", "concise", "clean"}
        assert stage["by_kind"]
    assert report["stages"]["sft"]["kl"] == 0.0
    assert "verdict" in report["stages"]["ppo"]["headline"]
    for key in ("sft_vs_base", "ppo_vs_sft"):
        pair = report["pairs"][key]
        for figure in ("gain_sampled", "gain_greedy", "win_rate"):
            assert pair[f"{figure}_ci"][0] <= pair[figure] <= pair[f"{figure}_ci"][1]
    assert any(" at T=0.7" in key for key in report["best_of_n"])  # the reward stage's reranking at the evaluation temperature
    for key, best in report["best_of_n"].items():
        n = int(key.split()[0])
        assert best["oracle"] >= best["reward_model"] - 1e-9 and best["oracle"] >= best["mean"] - 1e-9
        assert best["kl"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-5)
    assert set(report["calibration"]) == {*report["stages"], "all"}  # every stage in the report, and all together
    assert set(report["sharpening"]) == {"0.5", "0.3"}  # SFT sampled at lower temperatures, against every RLHF stage
    for row in report["sharpening"].values():
        assert row["gold_sampled_ci"][0] <= row["gold_sampled"] <= row["gold_sampled_ci"][1]
        assert "ppo" in row["stages"] and math.isfinite(row["stages"]["ppo"]["gain_sampled"])
    prompts = sum(1 for line in (run_dir / "data" / "prompts_eval.jsonl").read_text().splitlines() if line.strip())
    assert report["prompts"] == len(report["responses"]) == prompts
    for entry in report["responses"]:
        assert all(isinstance(entry[name]["text"], str) and entry[name]["length"] >= 0 for name in STAGES)
    assert "NaN" not in (run_dir / "compare" / "report.json").read_text()


def test_sharpening_baseline_samples_at_its_own_temperature(compared):
    """Near temperature 0 the sharpened SFT samples are SFT's greedy answers: its sampled gold is the greedy gold."""
    import torch

    from minigpt.checkpoint import load_causal_lm
    from minigpt.compare import sharpening_baselines
    from minigpt.config import EvalConfig, load_config
    from minigpt.evaluation import eval_records, evaluate, summarise
    from minigpt.tokenizer import Tokenizer

    run_dir, _ = compared
    torch.set_num_threads(1)
    config = load_config(EvalConfig, "tiny")
    records = eval_records(run_dir / "data", config)
    sft, tokenizer = load_causal_lm(run_dir / "sft").eval(), Tokenizer.load(run_dir / "sft")
    evaluations = {"sft": evaluate(sft, tokenizer, records, config, is_reference=True)}
    row = sharpening_baselines(sft, tokenizer, records, config, evaluations, temperatures=(1e-4,))["0.0001"]
    assert row["gold_sampled"] == pytest.approx(summarise(evaluations["sft"])["gold_greedy"], abs=1e-9)
    assert row["stages"] == {}  # no RLHF stage given


def test_html_report_is_self_contained_with_embedded_curves(compared):
    run_dir, _ = compared
    page = (run_dir / "compare" / "report.html").read_text()
    for forbidden in ("http://", "https://", "<script", "<link"):
        assert forbidden not in page, forbidden
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(name in page for name in STAGES)


def test_terminal_table_lists_every_stage(compared):
    _, stdout = compared
    rows = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    assert set(STAGES) <= rows and {"sft_vs_base", "ppo_vs_sft"} <= rows
    assert "Sharpening alone" in stdout
    assert "report.html" in stdout


def test_model_text_is_escaped_in_the_html():
    figures = {"gold_sampled": 0.5, "gold_sampled_ci": [0.4, 0.6], "gold_greedy": 0.5, "gold_greedy_ci": [0.4, 0.6],
               "rm_sampled": None, "kl": 0.0, "length": 3.0, "components": {}, "by_kind": {}, "checkpoint": "x",
               "headline": {}}
    answer = {"text": "<script>alert('hi')</script> & more", "gold": 0.1, "gold_sampled": 0.1, "rm": None, "kl": 0.0,
              "length": 9}
    report = {"run": "r<b>", "prompts": 1, "stages": {"sft": figures}, "pairs": {}, "best_of_n": {},
              "calibration": {}, "report_card": {}, "responses": [{"id": "p1", "prompt": "Say <img src=x>", "sft": answer}]}
    page = render_html(report, images=[])
    assert "<script" not in page and "<img src=x>" not in page and "r<b>" not in page
    assert "&lt;script&gt;alert(&#x27;hi&#x27;)&lt;/script&gt; &amp; more" in page


def test_a_run_without_finished_stages_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished stage.*make ppo RUN=empty"):
        find_stages(tmp_path / "empty")


def test_stages_are_found_in_pipeline_order_with_rounds_numbered(tmp_path):
    run_dir = tmp_path / "r"
    for folder in ("pretrain", "grpo", "rsft", "ppo", "dpo", "rounds/10/ppo", "rounds/2/ppo", "rounds/3/samples"):
        (run_dir / folder).mkdir(parents=True)
        (run_dir / folder / "metrics.json").write_text("{}")
    (run_dir / "sft").mkdir()  # started, never finished: skipped
    stages = find_stages(run_dir)
    assert [s.name for s in stages] == ["base", "ppo", "dpo", "grpo", "rsft", "round2", "round10"]
    # each stage is measured against its parent (the nearest earlier one present: sft is missing here)
    assert [s.parent for s in stages] == [None, "base", "base", "base", "base", "ppo", "round2"]
