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


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """runs root with a tiny world and tokenizer (run name `t`)."""
    root = tmp_path_factory.mktemp("runs")
    subprocess.run([PYTHON, "data/generate.py", "--out", str(root / "t" / "data"), "--preset", "tiny",
                    "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    run_stage("tokenizer", root)
    return root


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_runs):
    """The tiny run after pretraining."""
    run_stage("pretrain", tiny_runs)
    return tiny_runs
