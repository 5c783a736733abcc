"""Iterated RLHF, as the ChatGPT recipe runs it: `make rlhf ROUNDS=N` (`python -m minigpt.rounds`).

Round 1 is the pipeline's own samples → reward → ppo. Each later round n:
  1. samples  — fresh responses from the newest policy, ranked        → rounds/n/samples/
  2. reward   — a reward model trained on *all* rankings so far      → rounds/n/reward/
  3. ppo      — PPO from the newest policy against that reward model → rounds/n/ppo/
(the KL anchor stays the SFT model). A summary shows reward-model accuracy and gold score per round.
Each step is the ordinary stage command, so every round folder is an ordinary stage folder.

`--time-budget S` (what `make all` uses): start another round only if the run, timed from its
first output (data/stats.json), would still end within S seconds, estimating the round's cost by
the one before it, and give that round's PPO loop only the time left (`max_time`), so a round that costs
more than the one before still ends in time. `make all` on the cpu preset thereby runs as many rounds as its
20 minutes allow. `--round-1-time-limit` prints the same limit for round 1's PPO (the Makefile's own stage),
so a machine slow enough to reach PPO late still ends on time.
"""

from __future__ import annotations

import argparse
import json
import time
import shlex
import subprocess
import sys
from pathlib import Path

from minigpt.run import write_json_atomic


def round_dir(run_dir: Path, n: int) -> Path:
    return run_dir / "rounds" / str(n)


def stage_folders(run_dir: Path, n: int) -> dict[str, Path]:
    if n == 1:
        return {s: run_dir / s for s in ("samples", "reward", "ppo")}
    return {s: round_dir(run_dir, n) / s for s in ("samples", "reward", "ppo")}


# Round n's PPO runs with seed + (n−1) × this: PPO draws its prompts (and rollouts) from the seed, so with the
# run's own seed every round would be rewarded on round 1's first prompts again, in the same order.
ROUND_SEED_STRIDE = 100_000


def round_seed(seed: int, n: int) -> int:
    """The seed round n's PPO stage runs with: its own prompt draws and rollouts."""
    return seed + ROUND_SEED_STRIDE * (n - 1)


# What a PPO stage spends outside its timed loop (loading, the final evaluations, saving), with margin:
# a round under a deadline gives PPO's loop the time left minus this.
PPO_WRAP_UP_SECONDS = 40


def ppo_seconds_left(deadline: float, now: float | None = None) -> float:
    """The loop time a PPO stage launched now has if it must end by `deadline` (a time.time())."""
    return deadline - (time.time() if now is None else now) - PPO_WRAP_UP_SECONDS


# Round 1's PPO is cut to the time left too, but never below this: its held-out gain is made in the first
# 16 or so steps (the over-optimisation curves of runs z0, e0-e2), which 90 s buys on the cpu preset's machines.
ROUND_1_MIN_PPO_SECONDS = 90


def with_time_limit(ppo_args: list[str], seconds: float) -> list[str]:
    """PPO's key=value arguments with `max_time` at most `seconds` (a smaller one of the user's stays)."""
    given = [float(a.split("=", 1)[1]) for a in ppo_args if a.startswith("max_time=")]
    if given and 0 < given[-1] <= seconds:
        return list(ppo_args)
    return [a for a in ppo_args if not a.startswith("max_time=")] + [f"max_time={max(1, round(seconds))}"]


def run_round(n: int, run_dir: Path, common: list[str], launch: list[str], python: list[str],
              stage_args: dict[str, list[str]] | None = None, deadline: float | None = None, seed: int = 0) -> None:
    """Round n's three stages; `stage_args` are the run's own key=value overrides per stage (PPO_ARGS, ...),
    so a round trains as round 1 did. Samples and reward run with `seed` (the reward model's held-out prompts
    stay the same in every round); PPO with `round_seed`, so it is rewarded on prompts of its own.
    `deadline` (a time.time()): PPO stops its loop in time to end by then,
    however long the samples and the reward model took (a round is started on an estimate of its cost)."""
    folders, previous = stage_folders(run_dir, n), stage_folders(run_dir, n - 1)
    policy = previous["ppo"]
    extra = lambda stage: list((stage_args or {}).get(stage, []))  # noqa: E731
    steps = [
        ("samples", python + ["stages/samples.py", *common, "--seed", str(seed), "--out", str(folders["samples"]),
                              *extra("samples"), f"policy={policy}"]),
        ("reward", launch + ["stages/reward.py", *common, "--seed", str(seed), "--out", str(folders["reward"]),
                             *extra("reward")]),
        ("ppo", launch + ["stages/ppo.py", *common, "--seed", str(round_seed(seed, n)), "--out", str(folders["ppo"]),
                          "--policy", str(policy), "--reward", str(folders["reward"])]),
    ]
    for stage, command in steps:
        if (folders[stage] / "metrics.json").exists():
            print(f"round {n}: {folders[stage]} is done, skipping", flush=True)
            continue
        if stage == "ppo":
            left = None if deadline is None else ppo_seconds_left(deadline)
            command = command + (extra("ppo") if left is None else with_time_limit(extra("ppo"), left))
        print(f"round {n}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)


def round_seconds(run_dir: Path, n: int) -> float:
    """Wall time round n took: from its parent's end (SFT's for round 1) to its PPO's end."""
    start = run_dir / "sft" / "metrics.json" if n == 1 else stage_folders(run_dir, n - 1)["ppo"] / "metrics.json"
    return (stage_folders(run_dir, n)["ppo"] / "metrics.json").stat().st_mtime - start.stat().st_mtime


def run_started(run_dir: Path) -> float:
    """When the run began (a time.time()): its first output, the world's data/stats.json."""
    return (run_dir / "data" / "stats.json").stat().st_mtime


def fits_in_budget(run_dir: Path, n: int, budget: float, now: float | None = None) -> tuple[bool, str]:
    """Whether round n, costing what round n−1 did, ends within `budget` seconds of the run's start."""
    now = time.time() if now is None else now
    elapsed = now - run_started(run_dir)
    cost = round_seconds(run_dir, n - 1)
    fits = elapsed + cost <= budget
    return fits, (f"round {n}: {elapsed:.0f} s since the run began + {cost:.0f} s (round {n - 1}'s time) "
                  f"{'<=' if fits else '>'} the {budget:.0f} s budget")


def round_1_time_limit(run_dir: Path, budget: float, ppo_args: list[str], now: float | None = None) -> list[str]:
    """The `max_time=` argument (or none) round 1's PPO gets under `budget` seconds from the run's start:
    the time left minus the wrap-up, at least ROUND_1_MIN_PPO_SECONDS; a user's smaller limit stays."""
    left = max(ROUND_1_MIN_PPO_SECONDS, ppo_seconds_left(run_started(run_dir) + budget, now))
    return [a for a in with_time_limit(ppo_args, left) if a not in ppo_args]


def summarise(run_dir: Path, rounds: int) -> list[dict]:
    rows = []
    for n in range(1, rounds + 1):
        folders = stage_folders(run_dir, n)
        reward = json.loads((folders["reward"] / "metrics.json").read_text())
        ppo = json.loads((folders["ppo"] / "metrics.json").read_text())
        # "before" is the round's own starting policy (the previous round's PPO), so each row shows what
        # that round did; gains are paired on the shared evaluation's prompts.
        rows.append({"round": n, "pairwise_accuracy": reward["pairwise_accuracy"],
                     "kendall_tau": reward["kendall_tau"], "best_of_4_gain": reward.get("best_of_4_gain"),
                     "labelled_prompts": reward.get("labelled_prompts"),
                     "labelled_comparisons": reward.get("labelled_comparisons"),
                     "gold_before": ppo["gold_before"], "gold_after": ppo["gold_after"],
                     "gold_greedy_before": ppo.get("gold_greedy_before"), "gold_greedy_after": ppo.get("gold_greedy_after"),
                     "gain_sampled": ppo.get("gain_sampled"), "gain_sampled_ci": ppo.get("gain_sampled_ci"),
                     "win_rate": ppo.get("win_rate"), "reward_after": ppo["reward_after"], "kl": ppo["kl"],
                     "ppo_steps": ppo.get("steps"), "stopped_at_kl": ppo.get("stopped_at_kl"),
                     # the same gain on prompts the round's PPO was rewarded on: what did not carry to new ones
                     "own_prompts_gain_sampled": (ppo.get("trained_prompts") or {}).get("gain_sampled"),
                     "own_prompts_gain_greedy": (ppo.get("trained_prompts") or {}).get("gain_greedy"),
                     "healthy": ppo.get("healthy")})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="default")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--launch", default=sys.executable, help="how reward/ppo are launched (python or accelerate)")
    for stage in ("samples", "reward", "ppo"):
        parser.add_argument(f"--{stage}-args", default="", help=f"key=value overrides for every round's {stage} stage")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds from the run's start: start a round only if it should end within them (0: none)")
    parser.add_argument("--round-1-time-limit", action="store_true",
                        help="only print round 1's PPO `max_time=` under --time-budget (nothing if none applies)")
    args = parser.parse_args(argv)
    run_dir = Path(args.runs_root) / args.run
    if args.round_1_time_limit:
        if args.time_budget:
            print(" ".join(round_1_time_limit(run_dir, args.time_budget, shlex.split(args.ppo_args))))
        return
    if not (run_dir / "ppo" / "metrics.json").exists():
        raise SystemExit(f"error: {run_dir / 'ppo'} is not finished: round 1 is the pipeline itself "
                         f"(run `make ppo RUN={args.run}` first)")
    common = ["--run", args.run, "--runs-root", args.runs_root]
    if args.preset:
        common += ["--preset", args.preset]
    stage_args = {s: shlex.split(getattr(args, f"{s}_args")) for s in ("samples", "reward", "ppo")}
    done = 1
    deadline = run_started(run_dir) + args.time_budget if args.time_budget else None
    for n in range(2, args.rounds + 1):
        if args.time_budget and not (stage_folders(run_dir, n)["ppo"] / "metrics.json").exists():
            fits, why = fits_in_budget(run_dir, n, args.time_budget)
            print(why + ("" if fits else f": stopping after {done} round{'s' * (done > 1)}"), flush=True)
            if not fits:
                break
        run_round(n, run_dir, common, shlex.split(args.launch), [sys.executable], stage_args, deadline, args.seed)
        done = n
    rows = summarise(run_dir, done)
    write_json_atomic(run_dir / "rounds" / "summary.json", rows)
    print(f"\n{'round':>5}  {'RM pair acc':>11}  {'gold before':>11}  {'gold after':>10}  {'gain [95% CI]':>24}"
          f"  {'own prompts':>11}  {'KL':>6}  healthy")
    for r in rows:
        ci = r["gain_sampled_ci"] or [float("nan")] * 2
        gain = f"{r['gain_sampled']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if r["gain_sampled"] is not None else "—"
        own = f"{r['own_prompts_gain_sampled']:+.3f}" if r["own_prompts_gain_sampled"] is not None else "—"
        print(f"{r['round']:>5}  {r['pairwise_accuracy']:>11.3f}  {r['gold_before']:>11.3f}  {r['gold_after']:>10.3f}"
              f"  {gain:>24}  {own:>11}  {r['kl']:>6.2f}  {r['healthy']}")
    print(f"\nsummary: {run_dir / 'rounds' / 'summary.json'}")


if __name__ == "__main__":
    from minigpt.run import run_main

    run_main(main)
