"""What a run remembers: its preset, seed, data and stage arguments, and the Make stamps built from them.

`runs/<RUN>/settings.json` is written by the first command on a run: the preset *resolved* (never
empty), the seed, the data of each stage and each stage's arguments. A later command that leaves a
setting unset uses the run's own, so `make label RUN=X` after `make all PRESET=cpu RUN=X` is the
same run. A setting given again with another value would redo finished stages: the command says
which and why and stops, unless FORCE=1.

The Makefile calls this file once per command, before any recipe runs:

    python minigpt/settings.py --run-dir runs/R --goals "ppo" --force "" --set preset=tiny \\
        --set data= --set pretrain_data=... --args sft="lr=1e-3" --args-for-goals "..."

It writes the stamps `runs/<RUN>/.settings/<stage>` (one per stage; Make reruns a stage whose stamp
is newer than its output, and everything after it) and prints the resolved settings as Make
assignments. It is run as a plain script (not `-m`): importing the package would import Transformers,
seconds on every `make` call; it needs only the standard library and `config.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__:
    from minigpt.config import PRESET_NAMES, default_preset
else:  # run as `python minigpt/settings.py`: config.py sits beside this file and needs only the stdlib
    from config import PRESET_NAMES, default_preset

SETTINGS_FILE = "settings.json"
STAMPS = ".settings"
DATA_KINDS = ("pretrain", "sft", "reward", "ppo", "eval")  # PRETRAIN_DATA, SFT_DATA, ...
# The pipeline in order: each stage's parent (Make prerequisite), the data kinds it reads, the file
# whose presence means it finished.
STAGES = {
    "data": ((), (), "data/stats.json"),
    "tokenizer": (("data",), ("pretrain",), "tokenizer/metrics.json"),
    "pretrain": (("tokenizer",), ("pretrain",), "pretrain/metrics.json"),
    "sft": (("pretrain",), ("sft", "eval"), "sft/metrics.json"),
    "samples": (("sft",), (), "samples/metrics.json"),
    "reward": (("samples",), ("reward",), "reward/metrics.json"),
    "ppo": (("reward",), ("ppo", "eval"), "ppo/metrics.json"),
    "dpo": (("samples",), ("reward", "eval"), "dpo/metrics.json"),  # the reward model's rankings
    "grpo": (("reward",), ("ppo", "eval"), "grpo/metrics.json"),
    "rsft": (("reward",), ("ppo", "eval"), "rsft/metrics.json"),
    "compare": (("ppo",), ("sft", "eval"), "compare/report.json"),
}
GOAL_STAGES = {"all": "compare", "label": "samples", "rlhf": "ppo"}  # Make goals that are not stages
ALTERNATIVES = ("dpo", "grpo", "rsft")  # what `make alternatives` builds


def goal_stages(goals: list[str]) -> list[str]:
    """The stages Make goals name (`all` → compare, `alternatives` → each alternative, ...)."""
    return [s for g in goals for s in (ALTERNATIVES if g == "alternatives" else (GOAL_STAGES.get(g, g),))]


class SettingsError(ValueError):
    """A setting that cannot be used, or a command that would redo finished work without FORCE=1."""


def read_settings(run_dir: Path) -> dict:
    """The run's remembered settings ({} for a new run)."""
    path = Path(run_dir) / SETTINGS_FILE
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SettingsError(f"{path}: the run's settings file is damaged ({error}); delete it and give "
                            f"PRESET=, SEED= and the data again") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: expected a JSON object of settings, got {type(settings).__name__}")
    return settings


def write_atomic(path: Path, text: str) -> None:
    """A per-process temporary name, then rename: concurrent commands never interleave their writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parents_of(stage: str, data: dict) -> tuple:
    # With its own REWARD_DATA the reward model (and DPO) does not need the run's ranked samples.
    if stage in ("reward", "dpo") and data.get("reward"):
        return ("sft",)
    return STAGES[stage][0]


def stages_in_play(goals: list[str], data: dict) -> list[str]:
    """Every stage the goals build, in pipeline order."""
    wanted, todo = set(), [s for s in goal_stages(goals) if s in STAGES]
    while todo:
        stage = todo.pop()
        if stage not in wanted:
            wanted.add(stage)
            todo.extend(parents_of(stage, data))
    return [s for s in STAGES if s in wanted]


def resolve(run_dir: Path, given: dict, stage_args: dict, goals: list[str], force: bool) -> dict:
    """The run's effective settings: what the command gives, else what the run remembers, else defaults."""
    remembered = read_settings(run_dir)
    preset = given.get("preset") or remembered.get("preset") or _preset_of_finished_stages(run_dir)
    if not preset:
        preset = default_preset()  # imports torch: only for a new run without PRESET
    if preset not in PRESET_NAMES:
        raise SettingsError(f"unknown preset {preset!r}: expected one of {', '.join(PRESET_NAMES)} "
                            f"(PRESET=tiny for seconds, cpu for a laptop, gpu for one GPU)")
    seed = given.get("seed") or remembered.get("seed", 0)
    try:
        seed = int(seed)
    except ValueError:
        raise SettingsError(f"SEED={seed!r}: expected a whole number") from None
    data = {}
    for kind in DATA_KINDS:
        data[kind] = given.get(f"{kind}_data") or given.get("data") or remembered.get("data", {}).get(kind, "")
    args = {}
    for stage in STAGES:
        explicit = stage_args.get(stage, "").split()
        args[stage] = explicit or list(remembered.get("args", {}).get(stage, []))
    return {"preset": preset, "seed": seed, "data": data, "args": args}


def _preset_of_finished_stages(run_dir: Path) -> str:
    """A run from before settings.json: the preset its checkpoints were made with."""
    for stage in ("pretrain", "sft", "reward", "ppo"):
        try:
            return json.loads((Path(run_dir) / stage / "manifest.json").read_text()).get("preset", "")
        except (OSError, json.JSONDecodeError):
            continue
    return ""


def stamp_of(stage: str, settings: dict) -> dict:
    """What a stage's output depends on, besides its parent: Make reruns it when this changes."""
    return {"preset": settings["preset"], "seed": settings["seed"],
            **{f"{kind}_data": settings["data"][kind] for kind in STAGES[stage][1]},
            "args": settings["args"][stage]}


def plan(run_dir: Path, settings: dict, goals: list[str], force: bool) -> tuple[dict, list[str], list[str]]:
    """(stamps to write, finished stages the command would redo, why) for the stages in play."""
    run_dir = Path(run_dir)
    in_play = stages_in_play(goals, settings["data"])
    forced = set(goal_stages(goals)) if force else set()
    writes, redo, reasons, rerun = {}, [], [], set()
    for stage in in_play:
        path = run_dir / STAMPS / stage
        new = stamp_of(stage, settings)
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None  # no stamp yet (or one from an older Makefile)
        finished = (run_dir / STAGES[stage][2]).exists()
        changed = old is not None and old != new
        if changed or old is None or stage in forced:
            writes[stage] = new
        if changed or stage in forced or (not finished and old is None) \
                or any(p in rerun for p in parents_of(stage, settings["data"])):
            rerun.add(stage)
        if finished and stage in rerun:
            redo.append(stage)
            if changed:
                what = [f"{k} {_shown(old.get(k))} -> {_shown(new[k])}" for k in new if old.get(k) != new[k]]
                reasons.append(f"{stage}: {', '.join(what)}")
    return writes, redo, reasons


def _shown(value) -> str:
    if value in ("", None, []):
        return "(none)"
    return " ".join(value) if isinstance(value, list) else str(value)


def apply(run_dir: Path, given: dict, stage_args: dict, goals: list[str], force: bool) -> dict:
    """Resolve, refuse a silent redo, then write the stamps and the run's settings; the settings."""
    run_dir = Path(run_dir)
    settings = resolve(run_dir, given, stage_args, goals, force)
    writes, redo, reasons = plan(run_dir, settings, goals, force)
    if reasons and not force:
        raise SettingsError(
            f"this command would redo finished stages of {run_dir}: {', '.join(redo)}, because settings "
            f"changed:\n  " + "\n  ".join(reasons) + "\nNothing was touched. Leave the setting out to use the "
            f"run's own (see {run_dir / SETTINGS_FILE}), add FORCE=1 to redo these stages, or use another RUN=.")
    for stage, stamp in writes.items():
        path = run_dir / STAMPS / stage
        write_atomic(path, json.dumps(stamp) + "\n")
        target = run_dir / STAGES[stage][2]
        if target.exists() and stage not in redo:
            # A finished stage seen for the first time (made by hand or by an older Makefile): adopt it
            # as it is, with a stamp older than its output, so Make does not rerun it.
            mtime = target.stat().st_mtime - 1
            os.utime(path, (mtime, mtime))
    remembered = read_settings(run_dir)
    if run_dir.exists() or writes:
        if {k: remembered.get(k) for k in settings} != settings:
            write_atomic(run_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    return settings


def make_assignments(settings: dict) -> list[str]:
    """The settings as Make assignments (RUN_PRESET, RUN_SEED, RUN_<KIND>_DATA, RUN_<STAGE>_ARGS)."""
    escape = lambda value: str(value).replace("$", "$$").replace("#", "\\#")  # noqa: E731
    lines = [f"RUN_PRESET := {settings['preset']}", f"RUN_SEED := {settings['seed']}"]
    lines += [f"RUN_{kind.upper()}_DATA := {escape(value)}" for kind, value in settings["data"].items()]
    lines += [f"RUN_{stage.upper()}_ARGS := {escape(' '.join(args))}" for stage, args in settings["args"].items()]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="resolve a run's settings and write its Make stamps")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--goals", default="")
    parser.add_argument("--force", default="")
    parser.add_argument("--set", action="append", default=[], help="name=value: preset, seed, data, <kind>_data")
    parser.add_argument("--args", action="append", default=[], help="stage=key=value ...: a stage's arguments")
    parser.add_argument("--goal-args", default="", help="ARGS: arguments for the stages named as goals")
    parser.add_argument("--newline", default="\n", help="what separates the printed assignments")
    ns = parser.parse_args(argv)
    given = {name.lower(): value for name, value in (item.split("=", 1) for item in ns.set)}
    stage_args = {stage.lower(): value for stage, value in (item.split("=", 1) for item in ns.args)}
    for goal in ns.goals.split():  # ARGS goes to the stages named on the command line
        if goal in STAGES:
            stage_args[goal] = f"{stage_args.get(goal, '')} {ns.goal_args}"
    try:
        settings = apply(Path(ns.run_dir), given, stage_args, ns.goals.split(), ns.force not in ("", "0"))
    except SettingsError as error:
        print(f"minigpt: {error}", file=sys.stderr)
        print("$(error minigpt: stopped before running anything)")
        return 0  # Make reads the line above and stops with its own exit code, 2
    print(ns.newline.join(make_assignments(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
