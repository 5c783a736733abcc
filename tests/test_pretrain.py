import json
import signal
import subprocess
import time

from conftest import PYTHON, REPO, run_stage


def curve(root, stage="pretrain", run="t"):
    return [json.loads(line) for line in (root / run / stage / "metrics.jsonl").read_text().splitlines()]


def test_tiny_pretraining_lowers_val_loss_and_writes_the_stage_folder(tiny_pretrained):
    out = tiny_pretrained / "t" / "pretrain"
    metrics = json.loads((out / "metrics.json").read_text())
    val = [r["val_loss"] for r in curve(tiny_pretrained) if "val_loss" in r]
    assert val[-1] < val[0] - 0.5 and val[-1] < 5.0
    for key in ("val_loss", "val_bpb", "train_tokens", "tokens_per_sec", "params"):
        assert key in metrics
    for name in ("model.safetensors", "config.json", "manifest.json", "loss.png", "train.log", "ranks.tiktoken",
                 "tokenizer.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["seed"] == 0 and manifest["data_fingerprint"]
    assert not (out / "resume").exists()  # resume state is cleared once the stage is done


def test_interrupted_pretraining_resumes_to_the_same_final_loss(tiny_runs, tmp_path):
    """Ctrl-C saves and exits 130; the same command continues and ends where an uninterrupted run ends."""
    import shutil

    for run in ("a", "b"):
        shutil.copytree(tiny_runs / "t", tmp_path / run, ignore=shutil.ignore_patterns("pretrain", "tokens"))
    run_stage("pretrain", tmp_path, run="a")
    command = [PYTHON, "stages/pretrain.py", "--run", "b", "--preset", "tiny", "--runs-root", str(tmp_path),
               "sample_every=1000", "log_every=1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "b" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # interrupt once a few steps have run
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 15:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output[-2000:]
    state = json.loads((tmp_path / "b" / "pretrain" / "resume" / "state.json").read_text())
    assert 0 < state["step"] < 120
    assert not (tmp_path / "b" / "pretrain" / "metrics.json").exists()
    resumed = run_stage("pretrain", tmp_path, "sample_every=1000", "log_every=1", run="b")
    assert "resuming from step" in resumed.stderr + resumed.stdout
    a = json.loads((tmp_path / "a" / "pretrain" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "pretrain" / "metrics.json").read_text())
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-4, (a["val_loss"], b["val_loss"])


def test_sample_command_continues_text(tiny_pretrained):
    result = subprocess.run([PYTHON, "-m", "minigpt.sample", "--ckpt", str(tiny_pretrained / "t" / "pretrain"),
                             "--prompt", "Once upon a time", "--max-new-tokens", "20"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("Once upon a time") and len(result.stdout) > len("Once upon a time") + 5


def test_sample_command_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run([PYTHON, "-m", "minigpt.sample", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "nope" in result.stderr and "Traceback" not in result.stderr


def test_compiled_pretraining_saves_resume_state_and_a_plain_checkpoint(tiny_runs, tmp_path):
    """compile=on (the gpu preset's auto choice, wherever it wins) saves what an eager run saves: the model's own
    weight names, not torch.compile's `_orig_mod.` wrapper (which safetensors refused: tied weights)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_runs / "t", tmp_path / "c", ignore=shutil.ignore_patterns("pretrain"))
    run_stage("pretrain", tmp_path, "compile=on", "max_steps=6", "save_every=3", "eval_every=3",
              "sample_every=1000", run="c")
    out = tmp_path / "c" / "pretrain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["speed"]["compile"] is True and metrics["steps"] == 6
    names = load_file(str(out / "model.safetensors"))
    assert names and not any("_orig_mod" in name for name in names)
