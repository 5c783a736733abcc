import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from datasets import Dataset

from conftest import PYTHON, REPO, kill_after_trainer_checkpoint, run_stage
from minigpt.checkpoint import load_causal_lm
from minigpt.tokenizer import Tokenizer

TWO_TURNS = [{"role": "user", "content": "Where does Mara live?"},
             {"role": "assistant", "content": "Mara lives in Oakfield."},
             {"role": "user", "content": "And what is her job?"},
             {"role": "assistant", "content": "Mara is a baker."}]


def test_labels_mask_every_non_assistant_token(tiny_pretrained, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ckpt = tiny_pretrained / "t" / "pretrain"
    tokenizer = Tokenizer.load(ckpt)
    trainer = SFTTrainer(model=load_causal_lm(ckpt), processing_class=tokenizer.to_transformers(),
                         train_dataset=Dataset.from_list([{"messages": TWO_TURNS}]),
                         args=SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none",
                                        per_device_train_batch_size=1, max_length=128, bf16=False,
                                        activation_checkpointing=False))
    batch = next(iter(trainer.get_train_dataloader()))
    ids, mask = tokenizer.encode_chat(TWO_TURNS)
    assert batch["input_ids"][0].tolist() == ids
    labels = batch["labels"][0].tolist()
    assert [label != -100 for label in labels] == [bool(m) for m in mask]
    kept = [i for i, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(kept) == "Mara lives in Oakfield.<|end|>Mara is a baker.<|end|>"


def test_chat_template_round_trips(tiny_pretrained):
    tokenizer = Tokenizer.load(tiny_pretrained / "t" / "tokenizer")
    fast = tokenizer.to_transformers()
    text = fast.apply_chat_template(TWO_TURNS, tokenize=False)
    assert text == ("<|bos|><|user|>Where does Mara live?<|end|><|assistant|>Mara lives in Oakfield.<|end|>"
                    "<|user|>And what is her job?<|end|><|assistant|>Mara is a baker.<|end|>")
    ids = fast.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text and fast.decode(ids) == text


def test_lora_merged_model_gives_the_unmerged_logits(tiny_pretrained):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny_pretrained / "t" / "pretrain"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # a trained adapter: B is no longer zero
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()(input_ids=x).logits
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_tiny_sft_lowers_held_out_loss_and_scores_with_the_judge(tiny_sft):
    rows = [json.loads(line) for line in (tiny_sft / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(eval_losses) >= 2 and eval_losses[-1] < eval_losses[0]
    metrics = json.loads((tiny_sft / "metrics.json").read_text())
    for key in ("val_loss", "gold_score", "gold_score_base", "gold_correct", "gold_concise"):
        assert 0 <= metrics[key] < 20, key
    assert json.loads((tiny_sft / "manifest.json").read_text())["stage"] == "sft"


def test_padding_free_batches_train_like_padded_ones(tiny_sft, tiny_pretrained, tmp_path):
    """One row of dialogues end to end, kept apart by position ids, is the padded batch without its
    padding: the same per-step training losses and held-out loss (to float noise). `tiny_sft` is the
    default, padding-free; the same run with padded batches is trained here."""
    padded = tmp_path / "padded"
    run_stage("sft", tiny_pretrained, "--out", str(padded), "padding_free=false")

    def curve(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row], json.loads((out / "metrics.json").read_text())["val_loss"]

    (free, free_val), (pad, pad_val) = curve(tiny_sft), curve(padded)
    assert len(pad) >= 3 and len(pad) == len(free)
    assert pad == pytest.approx(free, rel=1e-3)
    assert pad_val == pytest.approx(free_val, rel=1e-3)


def test_lora_sft_writes_a_plain_checkpoint(tiny_pretrained, tmp_path):
    run_stage("sft", tiny_pretrained, "lora=true", "max_steps=4", "--out", str(tmp_path / "sft"))
    assert not (tmp_path / "sft" / "adapter_config.json").exists()
    model = load_causal_lm(tmp_path / "sft")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_interrupted_sft_resumes(tiny_pretrained, tmp_path):
    out = tmp_path / "sft"
    command = [PYTHON, "stages/sft.py", "--run", "t", "--preset", "tiny", "--runs-root", str(tiny_pretrained),
               "--out", str(out), "max_steps=400", "save_steps=1000", "eval_steps=1000"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=180)[0]
    assert process.returncode == 130, output[-3000:]
    checkpoints = list((out / "trainer").glob("checkpoint-*"))
    assert checkpoints and not (out / "metrics.json").exists()
    interrupted_at = int(checkpoints[0].name.split("-")[1])
    result = run_stage("sft", tiny_pretrained, "--out", str(out), "max_steps=400", "save_steps=1000",
                       "eval_steps=1000")
    assert "resuming from" in result.stderr + result.stdout
    assert (out / "metrics.json").exists() and not (out / "trainer").exists()
    steps = [json.loads(line).get("step", 0) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 400 and interrupted_at < 400
    shutil.rmtree(out)


def test_sft_killed_after_a_periodic_save_resumes_to_the_uninterrupted_result(tiny_pretrained, tmp_path):
    """kill -9 (no chance to save): the same command resumes from the last whole Trainer checkpoint and
    ends at the uninterrupted run's validation loss (promised to 1e-4: the Trainer restores weights,
    optimizer, scheduler, data order and RNG)."""
    settings = ["max_steps=40", "save_steps=10", "eval_steps=1000"]
    baseline = tmp_path / "whole"
    run_stage("sft", tiny_pretrained, "--out", str(baseline), *settings)
    out = tmp_path / "killed"
    kill_after_trainer_checkpoint("sft", tiny_pretrained, out, *settings)
    result = run_stage("sft", tiny_pretrained, "--out", str(out), *settings)
    assert "resuming from" in result.stderr + result.stdout
    assert "taking over the lock left by pid" in result.stderr
    expected = json.loads((baseline / "metrics.json").read_text())["val_loss"]
    assert abs(json.loads((out / "metrics.json").read_text())["val_loss"] - expected) < 1e-4
