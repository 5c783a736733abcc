"""Stage 4, the DPO way: the SFT model learns the ranked samples directly, without a reward model.

    python stages/dpo.py --run default --preset cpu [beta=0.1 pairs=best lr=1e-5 ...]

Reads runs/<RUN>/sft and the run's ranked samples (runs/<RUN>/samples/ranked.jsonl: each K-way
ranking gives its untied pairs, see minigpt/preference.py), or --data: any rankings or preference
pairs the loaders accept (HH-RLHF, OpenAssistant ranked replies, chosen/rejected pairs). The
reference is the SFT model. Held-out prompts' pairs measure preference accuracy; the held-out
evaluation prompts are answered before and after and scored by the gold judge, by the reward
model when the run has one, and for KL to SFT. Writes runs/<RUN>/dpo/.
"""

import logging
import statistics
import time

from minigpt.checkpoint import load_causal_lm, make_manifest, save_model
from minigpt.config import DPOConfig
from minigpt.data import DataError, load_rankings
from minigpt.preference import RewardModelReward, dpo_trainer, evaluate_against_sft, pair_margins, preference_rows
from minigpt.ranking import split_by_prompt
from minigpt.run import (GracefulInterrupt, MetricsLog, begin_stage, plot_curves, require_stage, run_main,
                         write_json_atomic)
from minigpt.tokenizer import Tokenizer
from minigpt.trainer_glue import (StageCallback, clear_trainer_checkpoints, is_main_process, latest_checkpoint,
                                  run_trainer)

log = logging.getLogger("minigpt.dpo")


def main():
    is_main = is_main_process()
    args, config = begin_stage("dpo", DPOConfig, main_process=is_main)
    out = args.out_dir
    parent = require_stage(args, "sft")
    source = args.data or require_stage(args, "samples") / "ranked.jsonl"

    # --- data: K-way rankings → (chosen, rejected) pairs, held out by prompt ------------------------
    try:
        rankings = load_rankings(source)
        train_rankings, val_rankings = split_by_prompt(rankings, config.val_fraction, seed=args.seed)
        train_rows, val_rows = preference_rows(train_rankings, config.pairs), preference_rows(val_rankings, config.pairs)
    except (DataError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if not train_rows:
        raise SystemExit(f"error: {source}: no preference pairs (every ranking is a tie)")
    log.info("dpo: %d train / %d held-out pairs from %d ranked prompts in %s", len(train_rows), len(val_rows),
             len(rankings), source)

    # --- train ------------------------------------------------------------------------------------------
    tokenizer = Tokenizer.load(parent)
    metrics = MetricsLog(out / "metrics.jsonl", is_main, resume_step=0 if latest_checkpoint(out) else None)
    started = time.time()
    with GracefulInterrupt() as interrupt:
        callback = StageCallback(metrics, interrupt, config.max_time)
        trainer = dpo_trainer(load_causal_lm(parent), tokenizer, train_rows, val_rows, config, out, args.seed,
                              callbacks=[callback])
        run_trainer(trainer, out, callback)
    train_time = time.time() - started
    held_out = {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))} if val_rows else {}
    if not is_main:  # the gold evaluation and the checkpoint are the main process's alone
        return
    model = trainer.model.eval()

    # --- what the stage did: pair margins, then SFT vs DPO on the held-out evaluation prompts -----------
    sft = load_causal_lm(parent).to(model.device).eval()
    final = {"train_pairs": len(train_rows), "val_pairs": len(val_rows),
             "train_margin_before": statistics.fmean(pair_margins(sft, tokenizer, train_rows, config.max_length)),
             "train_margin_after": statistics.fmean(pair_margins(model, tokenizer, train_rows, config.max_length)),
             "val_loss": held_out.get("eval_loss"), "val_accuracy": held_out.get("eval_rewards/accuracies"),
             "val_margin": held_out.get("eval_rewards/margins"), "train_time_sec": round(train_time, 1),
             "steps": trainer.state.global_step}
    reward_dir = args.stage_dir("reward")
    reward = RewardModelReward.load(reward_dir) if (reward_dir / "metrics.json").exists() else None
    eval_source = args.eval_data or args.run_dir / "data"
    comparison, evaluation = evaluate_against_sft(model, sft, parent, tokenizer, eval_source, args.preset, reward, "dpo")
    final.update(comparison)

    manifest = make_manifest("dpo", config, args, parent=parent, data_files=[source], metrics=final,
                             reward_model=str(reward_dir) if reward else None)
    save_model(model, out, parent, manifest)
    write_json_atomic(out / "evaluation.json", evaluation)
    plot_curves(metrics.read(), ["loss", "eval_loss", "rewards/margins", "eval_rewards/accuracies"],
                out / "dpo.png", "dpo")
    write_json_atomic(out / "metrics.json", final)
    clear_trainer_checkpoints(out)
    log.info("dpo done: train margin %.2f -> %.2f, gold %.3f -> %.3f, KL %.2f -> %s", final["train_margin_before"],
             final["train_margin_after"], final["gold_before"], final["gold_after"], final["kl"], out)


if __name__ == "__main__":
    run_main(main)
