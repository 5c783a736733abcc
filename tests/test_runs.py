"""Runs that never restart or collide by accident: remembered settings, per-stage data, one writer per
folder, checkpoints that prove they are whole, user errors that read like help."""

import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest
import torch
from conftest import PYTHON, REPO, run_stage

from minigpt.checkpoint import load_resume_state, save_resume_state
from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.settings import goal_stages, stages_in_play


def make_raw(target, root, *variables, run="t", timeout=900):
    """`make <target>` as a user types it: no PRESET unless given; returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["make", target, f"RUN={run}", f"RUNS_ROOT={root}", *variables], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


def snapshot(folder):
    """Every file under a folder with its size, mtime and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tiny_ppo, tmp_path):
    """A copy of the tiny run after `make all PRESET=tiny`."""
    root = tmp_path / "runs"
    shutil.copytree(tiny_ppo, root, symlinks=True)
    result = make_raw("all", root, "PRESET=tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_commands_after_make_all_without_preset_run_nothing_and_change_no_file(finished_run):
    root = finished_run
    settings = json.loads((root / "t" / "settings.json").read_text())
    assert settings["preset"] == "tiny" and settings["seed"] == 0  # resolved and remembered
    before = snapshot(root)
    compare = make_raw("compare", root)
    assert compare.returncode == 0 and "Nothing to be done" in compare.stdout, compare.stderr[-2000:]
    label = make_raw("label", root, "-n")  # dry run: what `make label` would run
    assert label.returncode == 0 and "stages/" not in label.stdout and "minigpt.label" in label.stdout
    chat = make_raw("chat", root, "ARGS=--prompt 'Who is Ada?'")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert snapshot(root) == before


def test_a_changed_preset_refuses_and_names_the_stages(finished_run):
    root = finished_run
    before = snapshot(root)
    result = make_raw("compare", root, "PRESET=cpu")
    assert result.returncode == 2
    assert "would redo finished stages" in result.stderr and "preset tiny -> cpu" in result.stderr
    for stage in ("data", "tokenizer", "pretrain", "sft", "reward", "ppo", "compare"):
        assert stage in result.stderr.split("because")[0], stage
    assert "FORCE=1" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(root) == before


def test_stage_data_reaches_only_its_stage_and_reruns_only_what_follows(finished_run, tmp_path):
    root = finished_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {name}."}]}) + "\n"
                               for name in ("the sea", "a cat", "the market", "rain")))
    refused = make_raw("ppo", root, f"PPO_DATA={prompts}")
    assert refused.returncode == 2 and "ppo: ppo_data (none) -> " in refused.stderr
    assert "sft" not in refused.stderr.split("because")[0]
    forced = make_raw("ppo", root, f"PPO_DATA={prompts}", "FORCE=1")
    assert forced.returncode == 0, forced.stderr[-3000:]
    ppo_line = next(line for line in forced.stdout.splitlines() if "stages/ppo.py" in line)
    assert f"--data {prompts}" in ppo_line
    for stage in ("tokenizer", "pretrain", "sft", "samples", "reward"):
        assert f"stages/{stage}.py" not in forced.stdout, stage
    assert json.loads((root / "t" / "settings.json").read_text())["data"]["ppo"] == str(prompts)
    again = make_raw("ppo", root)  # the run remembers its PPO data
    assert again.returncode == 0 and "stages/" not in again.stdout


def test_reward_data_of_its_own_needs_no_ranked_samples():
    assert "samples" in stages_in_play(["reward"], {"reward": ""})
    assert stages_in_play(["reward"], {"reward": "prefs.jsonl"}) == ["data", "tokenizer", "pretrain", "sft", "reward"]
    assert stages_in_play(["all"], {})[-1] == "compare" and stages_in_play(["chat"], {}) == []
    assert stages_in_play(["dpo"], {"reward": "prefs.jsonl"})[-2:] == ["sft", "dpo"]  # DPO learns from them too


def test_dpo_learns_from_the_runs_own_rankings_when_it_has_them(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}) + "\n")
    dry = make_raw("dpo", tmp_path, "PRESET=tiny", f"REWARD_DATA={prefs}", "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert f"--data {prefs}" in next(line for line in dry.stdout.splitlines() if "stages/dpo.py" in line)
    assert "stages/samples.py" not in dry.stdout and "stages/sft.py" in dry.stdout
    plain = make_raw("dpo", tmp_path, "PRESET=tiny", "-n", run="u")  # the run's ranked samples, as before
    assert "--data" not in next(line for line in plain.stdout.splitlines() if "stages/dpo.py" in line)
    assert "stages/samples.py" in plain.stdout


def test_alternatives_builds_and_forces_each_alternative():
    assert goal_stages(["alternatives"]) == ["dpo", "grpo", "rsft"]  # FORCE=1 redoes all three, not only the last
    assert goal_stages(["all", "rlhf", "sft"]) == ["compare", "ppo", "sft"]
    assert {"samples", "reward", "dpo", "grpo", "rsft"} <= set(stages_in_play(["alternatives"], {}))


def test_a_second_run_on_a_busy_folder_refuses_and_the_first_finishes(tiny_pretrained, tmp_path):
    out = tmp_path / "pre"
    command = [PYTHON, "stages/pretrain.py", "--run", "t", "--preset", "tiny", "--runs-root", str(tiny_pretrained),
               "--out", str(out), "max_steps=400", "eval_every=1000", "save_every=1000", "sample_every=1000"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / ".lock").exists() and (out / ".lock").read_text().strip()):
        time.sleep(0.05)
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = first.communicate(timeout=300)[0]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is being written by pid {first.pid}" in second.stderr and "RUN=" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, output[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 400
    assert (out / ".lock").read_text() == ""  # a normal end leaves no holder behind


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(tiny_runs / "t" / "data", root / "t" / "data")
    out = root / "t" / "tokenizer"
    out.mkdir(parents=True)
    (out / ".lock").write_text(json.dumps({"pid": 999999999, "host": "gone", "started": "yesterday"}))
    result = run_stage("tokenizer", root)
    assert "taking over the lock left by pid 999999999" in result.stderr
    assert (out / "metrics.json").exists()


def test_a_truncated_weight_file_is_one_clear_error(tiny_sft, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(tiny_sft, root / "t" / "sft")
    shutil.copytree(tiny_sft.parent / "data", root / "t" / "data")
    weights = root / "t" / "sft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_stage("samples", root, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{weights} is damaged" in result.stderr and "make sft FORCE=1 RUN=t" in result.stderr


def tiny_model():
    torch.manual_seed(0)
    return MiniGPTForCausalLM(MiniGPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))


def test_a_damaged_resume_state_is_set_aside_and_the_stage_starts_over(tmp_path, caplog):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    save_resume_state(tmp_path, model, optimizer, None, {"step": 7})
    assert load_resume_state(tmp_path, tiny_model(), torch.optim.AdamW(model.parameters()))["step"] == 7
    state = tmp_path / "resume" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-50])
    with caplog.at_level("WARNING"):
        assert load_resume_state(tmp_path, tiny_model()) is None
    assert "trainer_state.pt is damaged" in caplog.text and "starting this stage over" in caplog.text
    assert not (tmp_path / "resume").exists() and list(tmp_path.glob("resume.damaged-*"))


def test_a_resume_state_cut_off_mid_write_is_not_used(tmp_path):
    """kill -9 during a save: the new state has no checksums yet; the old one, swapped aside, is whole."""
    model = tiny_model()
    save_resume_state(tmp_path, model, None, None, {"step": 3})
    os.replace(tmp_path / "resume", tmp_path / ".resume.old")  # the moment between the two renames
    assert load_resume_state(tmp_path, tiny_model())["step"] == 3
    (tmp_path / ".resume.old" / "checksums.json").unlink()  # a state whose write never finished
    assert load_resume_state(tmp_path, tiny_model()) is None


BAD_INPUTS = {
    "malformed JSON line": ('{"messages": [}\n', "malformed JSON"),
    "empty file": ("", "the file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_data_errors_print_no_traceback_and_exit_2(case, tiny_runs, tmp_path):
    text, message = BAD_INPUTS[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    result = run_stage("tokenizer", tiny_runs, "--data", str(bad), "--out", str(tmp_path / "tok"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr and str(bad) in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--data", "/nowhere/such.txt"], "/nowhere/such.txt: no such file or folder"),
    (["lr=fast"], "override 'lr=fast': expected a float"),
    (["--run", "missing"], "is not a finished tokenizer checkpoint"),
])
def test_user_errors_print_no_traceback_and_exit_2(args, message, tiny_runs, tmp_path):
    result = run_stage("pretrain", tiny_runs, "--out", str(tmp_path / "pre"), *args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) <= 3


def test_minigpt_debug_shows_the_traceback(tiny_runs, tmp_path):
    env = {**os.environ, "MINIGPT_DEBUG": "1"}
    result = subprocess.run([PYTHON, "stages/pretrain.py", "--run", "t", "--preset", "tiny", "--runs-root",
                             str(tiny_runs), "--out", str(tmp_path / "pre"), "lr=fast"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_an_unknown_preset_through_make_is_one_message(tmp_path):
    result = make_raw("data", tmp_path / "runs", "PRESET=huge")
    assert result.returncode == 2 and "unknown preset 'huge'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_a_fresh_start_keeps_the_earlier_curve_and_a_resume_trims_it(tmp_path):
    from minigpt.run import MetricsLog

    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path)
    for step in (1, 2, 3):
        first.log(step=step, loss=1.0 / step)
    MetricsLog(path, resume_step=2).log(step=3, loss=0.2)  # resumed after step 2: step 3 is logged again
    assert [row["step"] for row in MetricsLog(path, enabled=False).read()] == [1, 2, 3]
    fresh = MetricsLog(path)  # a new run in the same folder (FORCE, changed settings)
    assert not path.exists() and [row["loss"] for row in MetricsLog(fresh.previous_path, enabled=False).read()] == [1.0, 0.5, 0.2]
    fresh.log(step=1, loss=2.0)
    assert MetricsLog(path, enabled=False).read() == [{"step": 1, "loss": 2.0}]
