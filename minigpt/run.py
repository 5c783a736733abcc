"""Run directories and the mechanics every stage shares: arguments, logging, metrics, plots, Ctrl-C.

A run lives in `runs/<RUN>/`; each stage writes one folder there (`pretrain/`, `sft/`, …) holding
its checkpoint, `manifest.json`, `metrics.jsonl` (the curve), `metrics.json` (final figures, written
last: its presence means the stage finished), PNG plots and `train.log`.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.config import PRESET_NAMES, default_preset

log = logging.getLogger("minigpt")


@dataclass
class StageArgs:
    stage: str
    run: str = "default"
    preset: str = "cpu"
    seed: int = 0
    data: str = ""  # a data source other than the run's generated world
    eval_data: str = ""  # held-out evaluation prompts other than the world's
    overrides: list[str] = field(default_factory=list)
    runs_root: str = "runs"
    out: str = ""  # another output folder (e.g. an RLHF round's)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else self.run_dir / self.stage

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


def parse_stage_args(stage: str, argv=None, extra=None) -> StageArgs:
    """`--run R --preset P --seed S --data D key=value ...`, the same for every stage."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"minigpt stage: {stage}")
    parser.add_argument("--run", default=os.environ.get("RUN", "default"))
    parser.add_argument("--preset", default=os.environ.get("PRESET") or None, choices=PRESET_NAMES)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SEED", 0)))
    parser.add_argument("--data", default=os.environ.get("DATA", ""))
    parser.add_argument("--eval-data", default=os.environ.get("EVAL_DATA", ""),
                        help="held-out evaluation prompts (default: the world's)")
    parser.add_argument("--runs-root", default=os.environ.get("RUNS_ROOT", "runs"))
    parser.add_argument("--out", default="", help="output folder (default runs/<RUN>/<stage>)")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the stage's config")
    ns = parser.parse_args(argv)
    from minigpt.settings import read_settings

    run_dir = Path(ns.runs_root) / ns.run
    preset = ns.preset or read_settings(run_dir).get("preset") or default_preset()  # the run's own first
    args = StageArgs(stage=stage, run=ns.run, preset=preset, seed=ns.seed, data=ns.data, eval_data=ns.eval_data,
                     overrides=list(ns.overrides), runs_root=ns.runs_root, out=ns.out)
    args.namespace = ns
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per launch: the main process holds it
        lock_stage_folder(args.out_dir)
    return args


def begin_stage(stage: str, config_class, extra=None, main_process: bool = True):
    """The prologue every stage shares: arguments, the effective config, logging, seeds → (args, config)."""
    from minigpt.config import load_config
    from minigpt.training import seed_everything

    args = parse_stage_args(stage, extra=extra)
    config = load_config(config_class, args.preset, args.overrides)
    setup_logging(args.out_dir, main_process)
    seed_everything(args.seed)
    return args, config


def setup_logging(out_dir: Path | None = None, main_process: bool = True) -> None:
    """Log to stderr (through tqdm, so bars stay intact) and to `train.log` in the stage folder."""
    from tqdm.contrib.logging import _TqdmLoggingHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = _TqdmLoggingHandler()
    console.setFormatter(fmt)
    root.addHandler(console)
    if out_dir is not None and main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(out_dir / "train.log")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "rustbpe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricsLog:
    """The curve: one JSON object per line in `metrics.jsonl`, flushed as it is written."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: it will be logged again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif enabled and resume_step is None and self.path.exists():
            # A fresh start keeps the earlier run's curve beside the new one, rather than deleting it
            # before the new run has finished anything (a run stopped early must not cost the old curve).
            self.path.replace(self.previous_path)

    @property
    def previous_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".previous" + self.path.suffix)

    def log(self, **values) -> None:
        if not self.enabled:
            return
        values = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(values) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def read_metrics_curve(path: Path) -> list[dict]:
    return MetricsLog(path, enabled=False).read()


def plot_curves(rows: list[dict], keys: list[str], out_png: Path, title: str, x: str = "step") -> None:
    """One PNG with a panel per metric (those present in `rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r[x], r[key]) for r in rows if key in r and x in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fingerprint_files(paths) -> str:
    """A short content hash of some files (the data a stage trained on)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        if path.is_dir():  # dot files are bookkeeping (a lock, a temporary file), not data
            digest.update(fingerprint_files(p for p in path.rglob("*") if p.is_file()
                                            and not p.name.startswith(".")).encode())
        elif path.exists():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- one writer per stage folder -----------------------------------------------------------------

LOCK_FILE = ".lock"
_held_locks: dict[str, int] = {}  # folder -> open descriptor, kept for the life of the process


class StageBusyError(RuntimeError):
    """Another live process is writing the same stage folder."""


def lock_stage_folder(folder: Path) -> None:
    """Take the exclusive lock of a stage folder before touching it, or stop at once if it is taken.

    An flock on `<folder>/.lock`, held until the process ends: the kernel releases it whatever the end
    (a crash, kill -9), so a lock left by a dead process is simply taken over. The file says who holds
    it (pid, host, start time, command) for the message the next process prints.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_holder(path)
        os.close(fd)
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')} "
               f"({holder.get('command', '?')})") if holder else "another process"
        raise StageBusyError(f"{folder} is being written by {who}. Wait for it to finish, or run this "
                             f"elsewhere with another RUN= (or --out).") from None
    previous = _lock_holder(path)
    if previous and previous.get("pid") != os.getpid():
        log.warning("%s: taking over the lock left by pid %s on %s (started %s), which is no longer running",
                    folder, previous.get("pid"), previous.get("host"), previous.get("started"))
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _held_locks[key] = fd
    # A normal end empties the file (the lock itself goes with the process); after a kill -9 the
    # holder's details stay, and the next run says whose lock it took over.
    atexit.register(os.ftruncate, fd, 0)


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(Path(path).read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def require_stage(args: StageArgs, name: str, target: str | None = None) -> Path:
    """The folder of a finished parent stage, or a clear error saying how to build it."""
    path = args.stage_dir(name)
    if not (path / "metrics.json").exists():
        raise SystemExit(f"error: {path} is not a finished {name} checkpoint (no metrics.json); "
                         f"run `make {target or name} RUN={args.run}` first")
    return path


class GracefulInterrupt:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop; a second one stops at once.

    Training loops check `.requested` once per step, write a resume checkpoint and exit with 130.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: saving a resume checkpoint, then stopping "
                    "(press Ctrl-C again to stop without saving)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


INTERRUPTED_EXIT_CODE = 130


def exit_interrupted(out_dir: Path) -> None:
    log.warning("stopped; resume with the same command (state in %s)", out_dir)
    sys.exit(INTERRUPTED_EXIT_CODE)


# ---- user errors read like help ------------------------------------------------------------------

USER_ERROR_EXIT_CODE = 2


def user_error_types() -> tuple:
    """Errors that are the input's fault, not the code's: shown as their message alone."""
    from minigpt.checkpoint import CheckpointError
    from minigpt.config import ConfigError
    from minigpt.data import DataError
    from minigpt.settings import SettingsError

    return DataError, CheckpointError, ConfigError, SettingsError, StageBusyError


def finish_processes() -> None:
    """Under a launcher, wait for every process to finish its stage, then close the process group.

    The main process alone evaluates and saves; a helper process that simply returned would exit with
    the group still open, and its communication threads can abort at interpreter exit (SIGABRT,
    "terminate called without an active exception"), which makes the launcher kill the main process
    mid-evaluation. Waiting here, then closing the group on every process, ends the run cleanly.
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_main(main, *args):
    """Run a command's `main`: a user error (bad data, override, preset, a missing or damaged checkpoint,
    a busy folder) prints one or two lines and exits 2; a bug keeps its traceback. MINIGPT_DEBUG=1
    shows the traceback of everything."""
    debug = os.environ.get("MINIGPT_DEBUG", "") not in ("", "0")
    try:
        result = main(*args)
        finish_processes()
        return result
    except SystemExit as stop:  # `raise SystemExit("error: ...")` in the stages: a message for people
        if debug or not isinstance(stop.code, str):
            raise
        print(stop.code if stop.code.startswith("error") else f"error: {stop.code}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except Exception as error:
        if debug or not isinstance(error, user_error_types()):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
