"""Stage 4, the GRPO way: k answers per prompt, each scored by the reward model against its group's mean.

    python stages/grpo.py --run default --preset cpu [steps=40 k=8 beta=0.1 ...]

Policy and KL reference from runs/<RUN>/sft; the reward model from runs/<RUN>/reward, normalised
with its manifest's weights and reward_mean/reward_std, clipped and penalised for never ending exactly as PPO's
reward (minigpt/preference.py); prompts from the run's PPO prompt set (or --data). No value model:
the group is the baseline. Before and after, the held-out evaluation prompts are answered and
scored by the gold judge and the reward model, with the KL to SFT. Writes runs/<RUN>/grpo/.
"""

import logging
import time

from minigpt.checkpoint import load_causal_lm, make_manifest, save_model
from minigpt.config import GRPOConfig
from minigpt.data import DataError, load_prompts
from minigpt.preference import RewardModelReward, evaluate_against_sft, grpo_trainer
from minigpt.run import (GracefulInterrupt, MetricsLog, begin_stage, plot_curves, require_stage, run_main,
                         write_json_atomic)
from minigpt.tokenizer import Tokenizer
from minigpt.trainer_glue import (StageCallback, clear_trainer_checkpoints, is_main_process, latest_checkpoint,
                                  run_trainer)

log = logging.getLogger("minigpt.grpo")


def main():
    is_main = is_main_process()
    args, config = begin_stage("grpo", GRPOConfig, main_process=is_main)
    out = args.out_dir
    parent = require_stage(args, "sft")
    reward_dir = require_stage(args, "reward")
    data = args.data or args.run_dir / "data"
    try:
        prompts = load_prompts(data, "ppo")
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    log.info("grpo: %d prompts from %s, %d rounds of %d prompts x %d answers", len(prompts), data, config.steps,
             config.prompts_per_step, config.k)

    # --- train ------------------------------------------------------------------------------------------
    tokenizer = Tokenizer.load(parent)
    reward = RewardModelReward.load(reward_dir, clip=config.reward_clip,
                                    no_end_penalty=config.no_end_penalty)
    metrics = MetricsLog(out / "metrics.jsonl", is_main, resume_step=0 if latest_checkpoint(out) else None)
    started = time.time()
    with GracefulInterrupt() as interrupt:
        callback = StageCallback(metrics, interrupt, config.max_time)
        trainer = grpo_trainer(load_causal_lm(parent), [reward], tokenizer, prompts, config, out, args.seed,
                               callbacks=[callback])
        run_trainer(trainer, out, callback)
    train_time = time.time() - started
    if not is_main:  # the gold evaluation and the checkpoint are the main process's alone
        return
    model = trainer.model.eval()

    # --- what the stage did: SFT vs GRPO on the held-out evaluation prompts -----------------------------
    sft = load_causal_lm(parent).to(model.device).eval()
    eval_source = args.eval_data or args.run_dir / "data"
    comparison, evaluation = evaluate_against_sft(model, sft, parent, tokenizer, eval_source, args.preset, reward, "grpo")
    rounds = [r for r in metrics.read() if "reward" in r]
    final = {**comparison,
             "train_reward_first": rounds[0]["reward"] if rounds else None,
             "train_reward_last": rounds[-1]["reward"] if rounds else None,
             "steps": trainer.state.global_step // (config.minibatches * config.epochs_per_step),
             "optimizer_steps": trainer.state.global_step, "train_time_sec": round(train_time, 1)}

    manifest = make_manifest("grpo", config, args, parent=parent, data_files=[data], metrics=final,
                             reward_model=str(reward_dir))
    save_model(model, out, parent, manifest)
    write_json_atomic(out / "evaluation.json", evaluation)
    plot_curves(metrics.read(), ["reward", "kl", "completions/mean_length", "entropy", "loss"], out / "grpo.png",
                "grpo")
    write_json_atomic(out / "metrics.json", final)
    clear_trainer_checkpoints(out)
    log.info("grpo done: gold %.3f -> %.3f, reward %.3f -> %.3f, KL %.2f -> %s", final["gold_before"],
             final["gold_after"], final["reward_before"], final["reward_after"], final["kl"], out)


if __name__ == "__main__":
    run_main(main)
