"""The gpu preset, exercised here on CPU: `make ppo PRESET=gpu` with every stage capped to a couple of
steps and tiny batches, so a user's first GPU run does not die on a config error after an hour.

What this checks is the gpu preset's configuration end to end (its model size, vocab, lengths, batch
settings, 96-token sampling, the evaluation settings) through every training and sampling stage (the
report, `make compare`, only reads what the stages saved and runs the same evaluation).
What it cannot check here: CUDA itself, bf16 on a GPU, `torch.compile` (off: on 2 CPU cores compiling the
preset's model takes minutes), the run-time dtype measurement (fp32 given: tests/test_speed.py covers it), and
several processes over NCCL.
"""

import json
import os
import subprocess

from conftest import REPO

# Small world and one or two optimiser steps per stage; everything else is the gpu preset's.
CAPS = [
    "DATA_ARGS=n_people=16 n_documents=240 n_sft_dialogues=40 n_sft_val=8 n_ranking_prompts=4 n_ppo_prompts=8 "
    "n_eval_prompts=2",
    "TOKENIZER_ARGS=vocab_size=1024",  # the preset's 8192 needs more text than this small world has
    "PRETRAIN_ARGS=max_steps=2 batch_size=2 warmup_steps=1 eval_every=2 eval_batches=1 save_every=2 "
    "sample_every=2 dtype=float32 compile=off",
    "SFT_ARGS=max_steps=2 batch_size=2 dtype=float32",  # as pretraining: timing bf16 on the preset's model costs 15 s
    "REWARD_ARGS=max_steps=2 prompts_per_batch=2",
    "PPO_ARGS=steps=1 prompts_per_step=8 minibatch_size=4",
]


def test_every_stage_of_the_gpu_preset_runs_with_capped_steps(tmp_path):
    # one thread, like every test: the suite runs one test per core side by side (more threads oversubscribe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["make", "ppo", "PRESET=gpu", "RUN=g", f"RUNS_ROOT={tmp_path}", *CAPS]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    run = tmp_path / "g"
    config = json.loads((run / "pretrain" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (8, 512, 512)  # the gpu model
    for stage in ("pretrain", "sft", "reward", "ppo"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["preset"] == "gpu", stage
    ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    assert ppo["steps"] == 1
    evaluation = json.loads((run / "ppo" / "evaluation.json").read_text())
    assert evaluation["config"]["max_new_tokens"] == 96  # the preset's answer length reached the evaluation
