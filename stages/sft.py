"""Stage 2 — supervised fine-tuning: the pretrained GPT learns to hold a dialogue.

    python stages/sft.py --run default --preset cpu [lora=true lr=5e-4 ...]

Reads runs/<RUN>/pretrain and the run's SFT dialogues (or --data: messages, ShareGPT, Alpaca,
OpenAssistant trees, HH transcripts); writes runs/<RUN>/sft/. The base and SFT models answer the
held-out prompts (the world's, or --eval-data); the gold judge scores them where the prompts carry
judge records. TRL's SFTTrainer renders each dialogue
with the tokenizer's chat template and puts the loss on the assistant's turns only. With LoRA the
adapter is merged at the end, so every later stage sees one plain model.
"""

import logging
import random

from datasets import Dataset
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from minigpt.checkpoint import load_causal_lm, make_manifest, save_model
from minigpt.config import EvalConfig, SFTConfig, load_config
from minigpt.data import load_dialogues
from minigpt.evaluation import (eval_records, evaluate, headline, log_examples, pair, pick_fewshot_examples,
                                summarise)
from minigpt.judge import NO_JUDGE_NOTE, has_judge_records
from minigpt.run import (GracefulInterrupt, MetricsLog, begin_stage, plot_curves, require_stage, run_main,
                         write_json_atomic)
from minigpt.speed import set_matmul_math
from minigpt.tokenizer import Tokenizer
from minigpt.trainer_glue import (StageCallback, clear_trainer_checkpoints, common_training_arguments,
                                  decide_trainer_speed, is_main_process, latest_checkpoint, per_device_batch,
                                  run_trainer)

log = logging.getLogger("minigpt.sft")


def lora_config(config: SFTConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets.split(","), task_type="CAUSAL_LM")


def truncate_tokenized(dataset, max_length: int):
    """Each tokenized dialogue cut to `max_length` tokens (as TRL does for padded batches); dialogues left
    without an assistant token to learn from are dropped."""
    cut = dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]})
    return cut.filter(lambda row: any(label != -100 for label in row["labels"]))


def batch_shape(tokenizer: Tokenizer, dialogues: list[dict], config: SFTConfig) -> dict:
    """Typical training batches, to time the speed choice on: padding-free, rows of a batch's dialogues end to
    end (position ids restarting at each), a different row length every step, as the Trainer will feed them;
    padded, the batch at its longest dialogue."""
    lengths = [min(len(tokenizer.encode_chat(d["messages"])[0]), config.max_length) for d in dialogues[:1000]]
    rows = per_device_batch(config.batch_size, "batch_size")
    if config.padding_free:
        random.Random(0).shuffle(lengths)
        # twelve rows: enough that the warm-up and each timed step of a candidate meet a length of their own
        layouts = [lengths[i:i + rows] for i in range(0, min(len(lengths), 12 * rows) - rows + 1, rows)] or [lengths]
        return {"rows": 1, "length": max(map(sum, layouts)), "layouts": layouts}
    return {"rows": rows, "length": max(lengths)}


def main():
    is_main = is_main_process()
    args, config = begin_stage("sft", SFTConfig, main_process=is_main)
    out = args.out_dir
    parent = require_stage(args, "pretrain")
    world = args.run_dir / "data"
    source = args.data or world

    # --- data: dialogues in the internal `messages` format ----------------------------------------
    train_dialogues = load_dialogues(source, "train")
    val_dialogues = load_dialogues(source, "val")
    log.info("sft: %d train / %d held-out dialogues from %s", len(train_dialogues), len(val_dialogues), source)
    as_dataset = lambda dialogues: Dataset.from_list([{"messages": d["messages"]} for d in dialogues])  # noqa: E731

    # --- model and trainer ---------------------------------------------------------------------------
    tokenizer = Tokenizer.load(parent)
    model = load_causal_lm(parent)
    # bf16 where this machine trains measurably faster with it (minigpt/speed.py), fp32 otherwise
    speed = decide_trainer_speed(model, vocab=tokenizer.vocab_size, dtype=config.dtype,
                                 **batch_shape(tokenizer, train_dialogues, config))
    speed.apply()
    # TRL does not truncate padding-free batches (one row per batch) unless it packs; then the stage does
    truncate_here = config.padding_free and not config.packing
    training_args = TRLSFTConfig(
        **common_training_arguments(out, config, args.seed, math=speed.math),
        per_device_train_batch_size=per_device_batch(config.batch_size, "batch_size"),
        per_device_eval_batch_size=per_device_batch(config.batch_size, "batch_size"),
        gradient_accumulation_steps=config.grad_accum,
        max_length=None if truncate_here else config.max_length,
        packing=config.packing,
        padding_free=config.padding_free,
        assistant_only_loss=True,  # the user's words are context, not targets
        dataset_num_proc=None,
    )
    metrics = MetricsLog(out / "metrics.jsonl", is_main, resume_step=0 if latest_checkpoint(out) else None)
    with GracefulInterrupt() as interrupt:
        callback = StageCallback(metrics, interrupt, config.max_time)
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=as_dataset(train_dialogues),
                             eval_dataset=as_dataset(val_dialogues), processing_class=tokenizer.to_transformers(),
                             peft_config=lora_config(config) if config.lora else None, callbacks=[callback])
        if truncate_here:
            trainer.train_dataset = truncate_tokenized(trainer.train_dataset, config.max_length)
            trainer.eval_dataset = truncate_tokenized(trainer.eval_dataset, config.max_length)
        run_trainer(trainer, out, callback)
    val_loss = trainer.evaluate()["eval_loss"]
    set_matmul_math("fp32")  # the gold evaluation below samples in exact fp32 whatever training used
    if not is_main:  # the gold evaluation and the checkpoint are the main process's alone
        return
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()  # one plain model for every later stage
    model.eval()

    # --- what the stage did: base (few-shot) vs SFT on held-out prompts, scored by the gold judge -----
    final = {"val_loss": val_loss, "speed": speed.as_dict()}
    # The shared evaluation (same prompts and seeds as PPO and compare); saved for them to reuse.
    eval_config = load_config(EvalConfig, args.preset)
    eval_source = args.eval_data or world
    prompts = eval_records(eval_source, eval_config) if args.eval_data or world.is_dir() else []
    if not prompts:
        log.info("sft: no held-out prompts (no world data and no --eval-data): val_loss only")
    else:
        sft_eval = evaluate(model, tokenizer, prompts, eval_config, name="sft", is_reference=True)
        base = load_causal_lm(parent).eval()
        examples = pick_fewshot_examples(train_dialogues, config.fewshot)
        base_eval = evaluate(base, tokenizer, prompts, eval_config, name="base", fewshot=examples)
        write_json_atomic(out / "evaluation.json", sft_eval)
        write_json_atomic(out / "evaluation_base.json", base_eval)
        log_examples(prompts, {"base": base_eval, "sft": sft_eval})
        final["eval_prompts"] = len(prompts)
        if has_judge_records(prompts):
            sft_summary, base_summary = summarise(sft_eval), summarise(base_eval)
            gain = pair(base_eval, sft_eval, "base", "sft")
            final.update({k: sft_summary[k] for k in ("gold_sampled", "gold_sampled_ci", "gold_greedy",
                                                      "gold_greedy_ci")})
            final.update({f"{k}_base": base_summary[k] for k in ("gold_sampled", "gold_sampled_ci", "gold_greedy",
                                                                   "gold_greedy_ci")})
            final.update({k: gain[k] for k in ("gain_sampled", "gain_sampled_ci", "gain_greedy", "gain_greedy_ci",
                                               "win_rate", "win_rate_ci")})
            final.update({f"gold_{k}": v for k, v in sft_summary["components"].items()})
            final["gold_score"], final["gold_score_base"] = sft_summary["gold_sampled"], base_summary["gold_sampled"]
            log.info("base (few-shot): %s", headline(base_summary))
            log.info("sft: %s", headline(sft_summary))
            log.info("%s", gain["summary"])
        else:
            final["gold"] = NO_JUDGE_NOTE
            log.info("sft: %s (%s)", NO_JUDGE_NOTE, eval_source)

    manifest = make_manifest("sft", config, args, parent=parent, data_files=[source], metrics=final,
                             speed=speed.as_dict())
    save_model(model, out, parent, manifest)
    plot_curves(metrics.read(), ["loss", "eval_loss", "learning_rate"], out / "loss.png", "sft")
    write_json_atomic(out / "metrics.json", final)
    clear_trainer_checkpoints(out)
    log.info("sft done: val_loss %.4f -> %s", val_loss, out)


if __name__ == "__main__":
    run_main(main)
