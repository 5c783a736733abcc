"""`make bench` runs end to end and its last line carries every key (a smoke test: no timing asserted)."""

import json
import subprocess

from conftest import PYTHON, REPO


def test_bench_prints_machine_decisions_and_one_json_line():
    result = subprocess.run([PYTHON, "-m", "minigpt.bench", "--layers", "1", "--width", "32", "--heads", "2",
                             "--vocab", "64", "--batch", "2", "--block", "16", "--steps", "1", "--repeats", "1",
                             "--new-tokens", "4", "--prompt-len", "4", "--rollout-prompts", "3",
                             "--rollout-tokens", "4", "--threads", "1", "--compile", "off"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and any(line.startswith("speed: chose") for line in lines)
    figures = json.loads(lines[-1])
    for key in ("train_tokens_per_sec", "train_mfu", "gpt2_train_tokens_per_sec", "decode_tokens_per_sec_cached",
                "decode_cache_ratio", "train_ratio_vs_gpt2", "train_ratio_vs_fp32_eager", "decode_ratio_vs_gpt2",
                "rollout_ratio_vs_gpt2", "cpu_model", "decisions", "matmul_peak_gflops",
                "decode_tokens_per_sec_compiled", "rollout_compiled_ratio_vs_eager", "rollout_sampled_ratio_vs_gpt2"):
        assert key in figures, key
    assert figures["decisions"]["chosen"] in ("fp32", "bf16_autocast", "bf16_matmul")
    assert all(figures[k] > 0 for k in ("train_ratio_vs_fp32_eager", "rollout_ratio_vs_gpt2", "decode_ratio_vs_gpt2",
                                        "rollout_sampled_ratio_vs_gpt2"))
