"""Several processes (`make <stage> NPROC=2`, and two "machines" on 127.0.0.1), on CPU over gloo.

The preset fixes the global batch, so two processes must train the same model as one: the same
loss curve (up to float summation order), the same weights on every process, and one set of outputs
written by rank 0 alone.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make

# Two processes compute the same global batch as one; only the order of float32 additions differs
# (two half-batch means averaged by the all-reduce instead of one mean). Over the tiny run's 120
# Adam steps that moves the logged losses by about 1e-6 (the metrics' last digit); 1e-3 leaves a
# thousandfold margin yet is far below what a real mistake does (logging one process's half of the
# batch, or a doubled global batch, move the curve by 1e-2 to 2e-1).
LOSS_TOLERANCE = 1e-3
WEIGHT_TOLERANCE = 1e-4  # observed: about 1e-6


@pytest.fixture(autouse=True)
def cpu_processes(monkeypatch):
    """CPU processes over gloo even on a machine with one GPU (two processes cannot share it)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def copy_run(src_root, dst_root, stages, run="t"):
    """A copy of a session run holding only `stages` (and the settings stamps), times preserved."""
    (dst_root / run).mkdir(parents=True)
    for name in [*stages, ".settings"]:
        shutil.copytree(src_root / run / name, dst_root / run / name)
    return dst_root


def curve(path, key):
    return {row["step"]: row[key] for row in map(json.loads, path.read_text().splitlines()) if key in row}


def max_weight_difference(a, b):
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


def assert_written_once(stage_dir, done_line):
    """Rank 0 alone wrote the stage's outputs: one checkpoint, no stray temporary files, one log."""
    names = sorted(p.name for p in stage_dir.iterdir())
    assert names.count("metrics.json") == 1 and names.count("model.safetensors") == 1, names
    assert not [n for n in names if ".tmp" in n or n == "resume"], names
    assert (stage_dir / "train.log").read_text().count(done_line) == 1


@pytest.fixture(scope="module")
def pretrained_one_and_two(tiny_runs, tmp_path_factory):
    """The tiny pretraining run with 1 and with 2 processes, from copies of the same tokenizer stage."""
    roots = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CUDA_VISIBLE_DEVICES", "")  # as cpu_processes does, for this module-wide fixture
        for nproc in (1, 2):
            root = copy_run(tiny_runs, tmp_path_factory.mktemp(f"nproc{nproc}"), ["data", "tokenizer"])
            roots[nproc] = (root / "t" / "pretrain", make("pretrain", root, f"NPROC={nproc}"))
    return roots


def test_pretraining_on_two_processes_matches_one(pretrained_one_and_two):
    (one, _), (two, result) = pretrained_one_and_two[1], pretrained_one_and_two[2]
    assert "accelerate launch" in result.stdout
    log = (two / "train.log").read_text()
    assert "world_size=2" in log and "world_size=1" in (one / "train.log").read_text()
    assert "replicas agree: all 2 processes hold the same weights" in log
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    assert_written_once(two, "pretrain done")
    for key in ("train_loss", "val_loss"):
        expected, got = curve(one / "metrics.jsonl", key), curve(two / "metrics.jsonl", key)
        assert expected.keys() == got.keys() and len(expected) >= 3, key
        worst = max(abs(expected[s] - got[s]) for s in expected)
        assert worst < LOSS_TOLERANCE, f"{key} differs by {worst:.2e} between 1 and 2 processes"
    assert max_weight_difference(one, two) < WEIGHT_TOLERANCE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_localhost_train_like_two_processes(pretrained_one_and_two, tiny_runs, tmp_path):
    """The multi-node launch, one process per "machine" meeting at 127.0.0.1, each with its own disk."""
    two, _ = pretrained_one_and_two[2]
    port = free_port()
    roots, machines = [], []
    for rank in (0, 1):
        roots.append(copy_run(tiny_runs, tmp_path / f"machine{rank}", ["data", "tokenizer"]))
        flags = f"--num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port}"
        machines.append(subprocess.Popen(
            ["make", "pretrain", "PRESET=tiny", "RUN=t", f"RUNS_ROOT={roots[-1]}", "NPROC=2", f"ACCEL_ARGS={flags}"],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    stage = roots[0] / "t" / "pretrain"
    log = (stage / "train.log").read_text()
    assert "world_size=2" in log and "replicas agree: all 2 processes" in log
    assert_written_once(stage, "pretrain done")
    assert not (roots[1] / "t" / "pretrain" / "metrics.json").exists()  # rank 0's machine holds the outputs
    assert max_weight_difference(two, stage) < WEIGHT_TOLERANCE


def test_ppo_on_two_processes(tiny_sft, tmp_path):
    root = copy_run(tiny_sft.parents[1], tmp_path / "runs", ["data", "tokenizer", "pretrain", "sft"])
    make("reward", root)  # one process: this test is about PPO
    result = make("ppo", root, "NPROC=2")
    assert "accelerate launch" in result.stdout and "PPO health verdict" in result.stdout
    stage = root / "t" / "ppo"
    log = (stage / "train.log").read_text()
    assert "world_size=2" in log
    # the critic-free default: the policy is the one trained model (a prompt's 4 answers stay on one process)
    assert log.count("replicas agree: all 2 processes hold the same weights") == 1
    assert log.count(": gold sampled") == 3  # evaluated before (saved), at step 2 and after, by rank 0
    assert json.loads((stage / "metrics.json").read_text())["world_size"] == 2
    assert_written_once(stage, "PPO policy: gold sampled")
    steps = [row["step"] for row in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
             if "rm_score" in row]
    assert steps == [1, 2, 3, 4]  # one row per step: only rank 0 logs


def test_rsft_on_two_processes_learns_the_answers_rank_0_kept(tiny_sft, tmp_path):
    root = copy_run(tiny_sft.parents[1], tmp_path / "runs", ["data", "tokenizer", "pretrain", "sft"])
    make("reward", root)  # one process: this test is about RSFT
    make("rsft", root, "NPROC=2")  # rank 1 waits for rank 0's answers, then both train on them
    stage = root / "t" / "rsft"
    log = (stage / "train.log").read_text()
    assert log.count("rsft: kept") == 1  # sampled and scored once, by rank 0
    assert "replicas agree: all 2 processes hold the same weights" in log
    kept = (stage / "best_answers.jsonl").read_text().splitlines()
    assert len(kept) == json.loads((stage / "metrics.json").read_text())["kept_answers"] > 0
    assert_written_once(stage, "rsft done")


def test_sft_and_reward_on_two_processes_keep_the_global_batch(tiny_sft, tmp_path):
    root = copy_run(tiny_sft.parents[1], tmp_path / "runs", ["data", "tokenizer", "pretrain"])
    make("reward", root, "NPROC=2")
    sft, reward = root / "t" / "sft", root / "t" / "reward"
    for stage, done in ((sft, "sft done"), (reward, "reward model on held-out prompts")):
        assert "replicas agree: all 2 processes hold the same weights" in (stage / "train.log").read_text()
        assert_written_once(stage, done)
    # Per-device batch = global / 2, so the first logged losses match the 1-process run (the last
    # batch of an epoch may differ: accelerate evens out a short final batch across processes).
    expected, got = curve(tiny_sft / "metrics.jsonl", "loss"), curve(sft / "metrics.jsonl", "loss")
    first = min(expected)
    assert abs(expected[first] - got[first]) < LOSS_TOLERANCE


def test_per_device_batch_splits_the_global_batch(monkeypatch):
    from minigpt.trainer_glue import per_device_batch

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert per_device_batch(8, "batch_size") == 4
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="batch_size=8 .* 3 processes"):
        per_device_batch(8, "batch_size")


def test_agree_max_is_the_value_itself_in_one_process():
    from minigpt.trainer_glue import agree_max

    assert agree_max(True, "cpu") == 1.0 and agree_max(2.5, torch.device("cpu")) == 2.5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
