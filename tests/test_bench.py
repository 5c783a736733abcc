"""`make bench` runs end to end and its last line carries every key (a smoke test: no timing asserted)."""

import json
import subprocess

from conftest import PYTHON, REPO


def test_bench_prints_machine_decisions_and_one_json_line(tmp_path):
    result = subprocess.run([PYTHON, "-m", "minigpt.bench", "--run", str(tmp_path / "no_run"),
                             "--layers", "1", "--width", "32", "--heads", "2",
                             "--vocab", "64", "--batch", "2", "--block", "16", "--steps", "1", "--repeats", "1",
                             "--new-tokens", "4", "--prompt-len", "4", "--rollout-prompts", "3",
                             "--rollout-tokens", "4", "--threads", "1", "--compile", "off"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and any(line.startswith("speed: chose") for line in lines)
    assert f"run rollouts: {tmp_path / 'no_run'} has no finished SFT model and data; skipped" in lines
    figures = json.loads(lines[-1])
    for key in ("train_tokens_per_sec", "train_mfu", "gpt2_train_tokens_per_sec", "decode_tokens_per_sec_cached",
                "decode_cache_ratio", "train_ratio_vs_gpt2", "train_ratio_vs_fp32_eager", "decode_ratio_vs_gpt2",
                "rollout_ratio_vs_gpt2", "cpu_model", "decisions", "matmul_peak_gflops",
                "decode_tokens_per_sec_compiled", "rollout_compiled_ratio_vs_eager", "rollout_compiled_ratio_vs_gpt2",
                "rollout_sampled_ratio_vs_gpt2"):
        assert key in figures, key
    assert figures["decisions"]["chosen"] in ("fp32", "bf16_autocast", "bf16_matmul")
    assert figures["decode_compiled_attention"]["attention"] in ("sdpa", "eager")  # timed both, compiled
    assert any(line.startswith("decoding compiled: ") for line in lines)
    assert all(figures[k] > 0 for k in ("train_ratio_vs_fp32_eager", "rollout_ratio_vs_gpt2", "decode_ratio_vs_gpt2",
                                        "rollout_sampled_ratio_vs_gpt2"))


def test_a_runs_rollouts_are_timed_against_generate_on_the_same_model(tiny_sft):
    from minigpt.bench import run_rollout_rates

    figures = run_rollout_rates(tiny_sft.parent, prompts=4, new_tokens=8, repeats=1)
    for name in ("greedy", "sampled"):
        assert figures[f"run_rollout_{name}_seconds"] > 0
        assert figures[f"run_rollout_{name}_ratio_vs_generate"] > 0
    assert "4 PPO prompts" in figures["run_rollout_shape"]
