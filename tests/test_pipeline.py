"""The whole recipe through Make on the tiny preset: every stage's checkpoint and finite metrics."""

import json
import math

import subprocess

from conftest import REPO, make

STAGE_METRICS = {
    "pretrain": ["val_loss", "val_bpb", "train_tokens", "tokens_per_sec", "params"],
    "sft": ["val_loss", "gold_score", "gold_score_base", "gold_sampled", "gold_greedy", "gain_sampled", "win_rate"],
    "samples": ["gold_mean", "gold_best_of_k"],
    "reward": ["pairwise_accuracy", "top1_accuracy", "kendall_tau", "reward_mean", "reward_std", "best_of_4_gold", "best_of_4_gain",
               "best_of_2_gain_eval_temperature", "best_of_4_gain_eval_temperature"],  # tiny reranks 2 and 4 answers
    "ppo": ["reward_before", "reward_after", "kl", "gold_before", "gold_after", "gain_sampled", "gain_greedy", "win_rate"],
}


def test_make_all_runs_every_stage_and_skips_finished_ones(tiny_ppo):
    result = make("all", tiny_ppo)
    run = tiny_ppo / "t"
    assert "report.html" in result.stdout
    for stage, keys in STAGE_METRICS.items():
        metrics = json.loads((run / stage / "metrics.json").read_text())
        for key in keys:
            assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (stage, key)
        if stage != "samples":
            assert (run / stage / "model.safetensors").exists() and (run / stage / "manifest.json").exists()
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    assert manifest["parent"].endswith("sft") and manifest["parent_hash"]
    assert "VERDICT" in (run / "ppo" / "verdict.txt").read_text()
    assert "of its own training prompts" in (run / "ppo" / "verdict.txt").read_text()
    trained = json.loads((run / "ppo" / "metrics.json").read_text())["trained_prompts"]
    assert trained["prompts"] > 0 and math.isfinite(trained["gain_sampled"]) and len(trained["gain_greedy_ci"]) == 2
    # everything is done: a second `make all` runs no stage
    again = make("all", tiny_ppo)
    assert "stages/" not in again.stdout


def test_a_changed_setting_reruns_that_stage_and_what_follows(tiny_ppo, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(tiny_ppo, root, symlinks=True)
    refused = subprocess.run(["make", "ppo", "PRESET=tiny", "RUN=t", f"RUNS_ROOT={root}", "REWARD_ARGS=max_steps=4"],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "reward, ppo" in refused.stderr and "reward: args (none) -> max_steps=4" \
        in refused.stderr  # finished work is redone only with FORCE=1
    result = make("ppo", root, "REWARD_ARGS=max_steps=4", "FORCE=1")
    assert "stages/reward.py" in result.stdout and "stages/ppo.py" in result.stdout
    assert "stages/sft.py" not in result.stdout and "stages/pretrain.py" not in result.stdout
    again = make("ppo", root)  # the run remembers the reward stage's arguments
    assert "stages/" not in again.stdout


def test_rlhf_rounds(tiny_ppo, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(tiny_ppo, root, symlinks=True)
    result = make("rlhf", root, "ROUNDS=2")
    summary = json.loads((root / "t" / "rounds" / "summary.json").read_text())
    assert [r["round"] for r in summary] == [1, 2]
    for name in ("samples/ranked.jsonl", "reward/metrics.json", "ppo/metrics.json"):
        assert (root / "t" / "rounds" / "2" / name).exists(), name
    assert "gold after" in result.stdout
    # each round's "before" is its own starting policy (round 1's PPO), not the SFT model
    round1 = json.loads((root / "t" / "ppo" / "metrics.json").read_text())
    assert summary[1]["gold_before"] == round1["gold_after"]
    assert summary[1]["gain_sampled_ci"][0] <= summary[1]["gain_sampled"] <= summary[1]["gain_sampled_ci"][1]
    round2 = json.loads((root / "t" / "rounds" / "2" / "ppo" / "metrics.json").read_text())
    assert summary[1]["own_prompts_gain_sampled"] == round2["trained_prompts"]["gain_sampled"]
    assert "own prompts" in result.stdout
    # `make all`'s time budget: a third round that would end past it is not started
    budgeted = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "minigpt.rounds", "--run", "t", "--runs-root",
                               str(root), "--preset", "tiny", "--rounds", "3", "--time-budget", "1"],
                              cwd=REPO, capture_output=True, text=True, check=True)
    assert "stopping after 2 rounds" in budgeted.stdout and not (root / "t" / "rounds" / "3").exists()
    assert [r["round"] for r in json.loads((root / "t" / "rounds" / "summary.json").read_text())] == [1, 2]


def test_a_round_is_started_only_if_it_fits_the_time_budget(tmp_path):
    import os

    from minigpt.rounds import fits_in_budget

    run = tmp_path / "r"
    for name, when in [("data/stats.json", 0), ("sft/metrics.json", 600), ("ppo/metrics.json", 900)]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
        os.utime(run / name, (when, when))
    assert fits_in_budget(run, 2, budget=1200, now=900)[0]  # 900 s in + round 1's 300 s = 1200
    fits, why = fits_in_budget(run, 2, budget=1200, now=901)
    assert not fits and "300 s" in why


def test_every_round_runs_its_stages_with_the_runs_own_arguments(tmp_path, monkeypatch):
    """PPO_ARGS (and SAMPLES_ARGS, REWARD_ARGS) reach round 2's stages, not only round 1's."""
    from minigpt import rounds

    commands = []
    monkeypatch.setattr(rounds.subprocess, "run", lambda command, check: commands.append(command))
    rounds.run_round(2, tmp_path / "r", ["--run", "r"], ["python"], ["python"],
                     {"samples": ["k=6"], "reward": ["lr=3e-4"], "ppo": ["advantage=rloo", "samples_per_prompt=4"]})
    samples, reward, ppo = commands
    assert "k=6" in samples and samples[-1].startswith("policy=")  # the round's policy wins over any given
    assert "lr=3e-4" in reward
    assert ppo[-2:] == ["advantage=rloo", "samples_per_prompt=4"] and "--policy" in ppo


def test_a_later_rounds_ppo_is_rewarded_on_prompts_of_its_own(tmp_path, monkeypatch):
    """Samples and reward keep the run's seed (the reward model's held-out prompts stay held out); PPO gets
    a seed of its own, or round 2 would draw round 1's first prompts again, step by step."""
    from minigpt import rounds
    from minigpt.config import PPOConfig, load_config
    from minigpt.ppo import step_prompts

    commands = []
    monkeypatch.setattr(rounds.subprocess, "run", lambda command, check: commands.append(command))
    rounds.run_round(2, tmp_path / "r", ["--run", "r"], ["python"], ["python"], seed=7)
    seed_of = lambda command: int(command[command.index("--seed") + 1])  # noqa: E731
    samples, reward, ppo = commands
    assert seed_of(samples) == seed_of(reward) == 7 and seed_of(ppo) == rounds.round_seed(7, 2) != 7
    config = load_config(PPOConfig, "cpu")
    round_1 = [step_prompts(600, config, 7, step) for step in range(config.steps)]
    assert all(step_prompts(600, config, seed_of(ppo), step) not in round_1 for step in range(8))


def test_a_round_under_a_deadline_gives_ppo_only_the_time_left(tmp_path, monkeypatch):
    """A round starts on an estimate of its cost; PPO's loop is then cut to what is left of the budget."""
    import time

    from minigpt import rounds

    commands = []
    monkeypatch.setattr(rounds.subprocess, "run", lambda command, check: commands.append(command))
    deadline = time.time() + rounds.PPO_WRAP_UP_SECONDS + 100
    rounds.run_round(2, tmp_path / "r", ["--run", "r"], ["python"], ["python"], {"ppo": ["lr=1e-5"]}, deadline)
    ppo = commands[-1]
    assert "lr=1e-5" in ppo and 95 <= int(ppo[-1].removeprefix("max_time=")) <= 100
    assert not any(a.startswith("max_time=") for c in commands[:-1] for a in c)  # samples and reward run whole
    # a user's smaller limit stays; a larger one, or none (0), gives way to the deadline
    assert rounds.with_time_limit(["max_time=30"], 100) == ["max_time=30"]
    assert rounds.with_time_limit(["max_time=300", "lr=1"], 100) == ["lr=1", "max_time=100"]
    assert rounds.with_time_limit(["max_time=0"], 100) == ["max_time=100"]
    assert rounds.with_time_limit([], -5) == ["max_time=1"]  # past the deadline: one step, then the wrap-up
    commands.clear()
    rounds.run_round(2, tmp_path / "r", ["--run", "r"], ["python"], ["python"], {"ppo": ["lr=1e-5"]})
    assert commands[-1][-1] == "lr=1e-5"  # no deadline, no limit


def test_round_1_ppo_under_make_alls_budget_gets_the_time_left(tmp_path):
    """A machine that reaches PPO late (z0, an AMD EPYC family 25: PPO began 973 s in, the run took 21 min)
    cuts round 1's PPO loop to what the budget leaves, but not below its floor; `make ppo` is never cut."""
    import os

    from minigpt import rounds

    run = tmp_path / "r"
    (run / "data").mkdir(parents=True)
    (run / "data" / "stats.json").write_text("{}")
    os.utime(run / "data" / "stats.json", (0, 0))
    wrap_up, floor = rounds.PPO_WRAP_UP_SECONDS, rounds.ROUND_1_MIN_PPO_SECONDS
    assert rounds.round_1_time_limit(run, 1140, [], now=900) == [f"max_time={1140 - 900 - wrap_up}"]
    assert rounds.round_1_time_limit(run, 1140, ["lr=1e-5"], now=1100) == [f"max_time={floor}"]  # late: the floor
    assert rounds.round_1_time_limit(run, 1140, ["max_time=60"], now=900) == []  # a user's smaller limit stays
    assert rounds.round_1_time_limit(run, 1140, ["max_time=600"], now=900) == [f"max_time={1140 - 900 - wrap_up}"]
    # the Makefile asks for it under `make all` with a budget only
    def ppo_line(*variables):
        dry = subprocess.run(["make", "-n", *variables, "RUN=t", f"RUNS_ROOT={tmp_path / 'runs'}"], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return next(line for line in dry.stdout.splitlines() if "stages/ppo.py" in line)
    under_make_all = ppo_line("all", "PRESET=cpu")
    assert "--round-1-time-limit" in under_make_all and "--time-budget 1080" in under_make_all
    assert "--round-1-time-limit" not in ppo_line("ppo", "PRESET=cpu")
    assert "--round-1-time-limit" not in ppo_line("all", "PRESET=tiny")  # no budget
