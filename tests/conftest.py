"""Shared test set-up: one torch thread (2 shared cores: two OpenMP threads of tiny models can run
tens of times slower when anything else is busy), paths, and a tiny run built once per session."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = sys.executable


def run_stage(script: str, runs_root: Path, *args: str, run: str = "t", check: bool = True, timeout=600):
    """Run `stages/<script>.py` (or any repo script) on the tiny preset in a temporary runs root."""
    path = script if script.endswith(".py") else f"stages/{script}.py"
    cmd = [PYTHON, path, "--run", run, "--preset", "tiny", "--runs-root", str(runs_root), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def kill_after_trainer_checkpoint(stage: str, runs_root: Path, out: Path, *settings: str, timeout=240) -> None:
    """Start a Trainer stage on the tiny preset, kill -9 it once its first whole periodic checkpoint is on
    disk (no chance to save), and check that it left no finished result behind."""
    import signal
    import time

    command = [PYTHON, f"stages/{stage}.py", "--run", "t", "--preset", "tiny", "--runs-root", str(runs_root),
               "--out", str(out), *settings]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not list((out / "trainer").glob("checkpoint-*/checksums.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "metrics.json").exists()


def make(target: str, runs_root: Path, *variables: str, run: str = "t", timeout=900):
    """`make <target> PRESET=tiny` on a run in a temporary runs root: the pipeline as users run it."""
    cmd = ["make", target, "PRESET=tiny", f"RUN={run}", f"RUNS_ROOT={runs_root}", *variables]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_runs(tiny_root):
    """runs root with a tiny world and tokenizer (run name `t`)."""
    make("tokenizer", tiny_root)
    return tiny_root


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_runs):
    """The tiny run after pretraining."""
    make("pretrain", tiny_runs)
    return tiny_runs


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrained):
    """The tiny run's SFT checkpoint folder."""
    make("sft", tiny_pretrained)
    return tiny_pretrained / "t" / "sft"


@pytest.fixture(scope="session")
def tiny_ppo(tiny_sft):
    """The tiny run after samples, reward and PPO: the runs root."""
    make("ppo", tiny_sft.parents[1])
    return tiny_sft.parents[1]
