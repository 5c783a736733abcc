"""Stage 4, the rejection-sampling way (Llama 2): the SFT model learns its own best answers.

    python stages/rsft.py --run default --preset cpu [k=8 temperature=0.7 lr=1e-4 ...]

Reads runs/<RUN>/sft, the reward model runs/<RUN>/reward and the run's PPO prompts (or --data: any
prompt source). The SFT model answers every prompt k times; the reward model keeps each prompt's
best finished answer (runs/<RUN>/rsft/best_answers.jsonl), and the SFT model is fine-tuned on those
answers with the SFT loss (TRL's SFTTrainer; loss on the SFT stage's held-out dialogues alongside).
The held-out evaluation prompts are answered before and after and scored by the gold judge, the
reward model and KL to SFT. Writes runs/<RUN>/rsft/.
"""

import json
import logging
import time

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from minigpt.checkpoint import load_causal_lm, make_manifest, save_model
from minigpt.config import RSFTConfig
from minigpt.data import DataError, load_dialogues, load_prompts
from minigpt.preference import RewardModelReward, evaluate_against_sft, rejection_sample, rsft_trainer
from minigpt.run import (GracefulInterrupt, MetricsLog, begin_stage, plot_curves, require_stage, run_main,
                         write_json_atomic, write_text_atomic)
from minigpt.tokenizer import Tokenizer
from minigpt.trainer_glue import (StageCallback, clear_trainer_checkpoints, is_main_process, latest_checkpoint,
                                  run_trainer)

log = logging.getLogger("minigpt.rsft")


def main():
    is_main = is_main_process()
    args, config = begin_stage("rsft", RSFTConfig, main_process=is_main)
    out = args.out_dir
    parent = require_stage(args, "sft")
    reward_dir = require_stage(args, "reward")
    data = args.data or args.run_dir / "data"
    try:
        prompts = load_prompts(data, "ppo")
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    world = args.run_dir / "data"
    held_out = load_dialogues(world, "val") if (world / "sft_val.jsonl").exists() else []
    tokenizer = Tokenizer.load(parent)
    reward = RewardModelReward.load(reward_dir)
    # the processes' shared state, on the CPU when the launcher says so (TRL's trainer joins the same one)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))

    # --- rejection sampling: k answers per prompt, the reward model's best kept (the main process's work) ---
    answers_file = out / "best_answers.jsonl"
    started = time.time()
    if is_main and not (latest_checkpoint(out) and answers_file.exists()):  # a resumed run keeps its answers
        log.info("rsft: %d prompts from %s x k=%d answers at temperature %.2f", len(prompts), data, config.k,
                 config.temperature)
        sft = load_causal_lm(parent).to(state.device).eval()
        reward.to(state.device)
        dialogues, stats = rejection_sample(sft, tokenizer, prompts, reward.scorer, config, args.seed)
        write_text_atomic(answers_file, "".join(json.dumps(d) + "\n" for d in dialogues))
        write_json_atomic(out / "sampling.json", {**stats, "seconds": round(time.time() - started, 1)})
        log.info("rsft: kept %d of %d prompts' best answers (%.0f%% of answers ended); reward %+.3f over all "
                 "answers, %+.3f over those that ended, %+.3f over the kept", stats["kept"], stats["prompts"],
                 100 * stats["finished_fraction"], stats["reward_mean"], stats["reward_usable_mean"] or 0.0,
                 stats["reward_kept_mean"] or 0.0)
        del sft
    state.wait_for_everyone()
    dialogues = [json.loads(line) for line in answers_file.read_text().splitlines()]
    if not dialogues:
        raise SystemExit(f"error: no prompt of {data} got an answer that ended within max_new_tokens="
                         f"{config.max_new_tokens}: nothing to learn; raise max_new_tokens or k")
    sampling_seconds = time.time() - started

    # --- fine-tune the SFT model on them ---------------------------------------------------------------------
    metrics = MetricsLog(out / "metrics.jsonl", is_main, resume_step=0 if latest_checkpoint(out) else None)
    started = time.time()
    with GracefulInterrupt() as interrupt:
        callback = StageCallback(metrics, interrupt, config.max_time)
        trainer = rsft_trainer(load_causal_lm(parent), tokenizer, dialogues, held_out, config, out, args.seed,
                               callbacks=[callback])
        # what learning only its own best answers costs on ordinary dialogues: their loss before and after
        val_loss_before = trainer.evaluate()["eval_loss"] if held_out else None
        run_trainer(trainer, out, callback)
    train_time = time.time() - started
    val_loss_after = trainer.evaluate()["eval_loss"] if held_out else None
    if not is_main:  # the gold evaluation and the checkpoint are the main process's alone
        return
    model = trainer.model.eval()

    # --- what the stage did: SFT vs RSFT on the held-out evaluation prompts ------------------------------
    sft = load_causal_lm(parent).to(model.device).eval()
    eval_source = args.eval_data or args.run_dir / "data"
    comparison, evaluation = evaluate_against_sft(model, sft, parent, tokenizer, eval_source, args.preset, reward, "rsft")
    sampling = json.loads((out / "sampling.json").read_text())
    curve = metrics.read()
    final = {**comparison, "kept_answers": len(dialogues), "sampled_answers": sampling["answers"],
             "sample_reward_mean": sampling["reward_mean"], "kept_reward_mean": sampling["reward_kept_mean"],
             "usable_reward_mean": sampling.get("reward_usable_mean"),
             "sft_val_loss_before": val_loss_before, "sft_val_loss_after": val_loss_after,
             "steps": trainer.state.global_step, "sampling_time_sec": round(sampling_seconds, 1),
             "train_time_sec": round(train_time, 1)}

    manifest = make_manifest("rsft", config, args, parent=parent, data_files=[data], metrics=final,
                             reward_model=str(reward_dir))
    save_model(model, out, parent, manifest)
    write_json_atomic(out / "evaluation.json", evaluation)
    plot_curves(curve, ["loss", "eval_loss"], out / "rsft.png", "rsft")
    write_json_atomic(out / "metrics.json", final)
    clear_trainer_checkpoints(out)
    log.info("rsft done: gold %.3f -> %.3f, reward %.3f -> %.3f, KL %.2f -> %s", final["gold_before"],
             final["gold_after"], final["reward_before"], final["reward_after"], final["kl"], out)


if __name__ == "__main__":
    run_main(main)
