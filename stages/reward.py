"""Stage 3 — the reward model: learn to reproduce the rankings of sampled responses.

    python stages/reward.py --run default --preset cpu [sources=both lr=1e-4 ...]

Starts from runs/<RUN>/sft with a scalar score head and trains on runs/<RUN>/samples (judge rankings,
human rankings from `make label`, or both), or on --data: any rankings or preference pairs the
loaders accept (HH-RLHF, OpenAssistant ranked replies, chosen/rejected pairs). Held-out prompts
measure pairwise and top-1 accuracy and Kendall τ. The reward is the trained head plus the SFT
model's confidence in the response, their two weights fitted on the training rankings (see
minigpt/reward_model.py; `confidence=false` keeps the head alone); the weights and the reward's
mean and std over the SFT samples are saved for PPO to normalise with. Writes runs/<RUN>/reward/.
"""

import logging
import statistics

from datasets import Dataset
from trl import RewardConfig as TRLRewardConfig

from minigpt.checkpoint import load_causal_lm, load_sequence_classifier, make_manifest, save_model
from minigpt.config import EvalConfig, RewardConfig, load_config
from minigpt.data import DataError, load_rankings
from minigpt.evaluation import best_of_n, eval_records
from minigpt.judge import has_judge_records
from minigpt.ranking import fit_pairwise_weights, ranking_metrics, ranking_pairs, split_by_prompt
from minigpt.reward_model import (CONFIDENCE_FEATURES, RankingCollator, RankingRewardTrainer, RewardScorer,
                                  encode_rankings, init_verifier_head, response_confidence, score_conversations)
from minigpt.run import (GracefulInterrupt, MetricsLog, begin_stage, plot_curves, require_stage, run_main,
                         write_json_atomic)
from minigpt.tokenizer import Tokenizer
from minigpt.trainer_glue import (StageCallback, clear_trainer_checkpoints, common_training_arguments,
                                  is_main_process, latest_checkpoint, per_device_batch, run_trainer)

log = logging.getLogger("minigpt.reward")


def ranked_sources(args, config: RewardConfig) -> list:
    """The ranking files to train on: judge rankings, human rankings, or both (or --data)."""
    if args.data:
        return [args.data]
    samples = args.run_dir / "samples"
    files = {"judge": [samples / "ranked.jsonl"], "human": [samples / "human.jsonl"],
             "both": [samples / "ranked.jsonl", samples / "human.jsonl"]}[config.sources]
    files += sorted(args.run_dir.glob("rounds/*/samples/ranked.jsonl"))  # earlier RLHF rounds, when present
    present = [f for f in files if f.exists()]
    if not present:
        raise SystemExit(f"error: no rankings for sources={config.sources}: expected {files[0]} "
                         f"(run `make samples`, or `make label` for human rankings)")
    return present


def log_pairwise(pairwise: dict, n_prompts: int, where: str) -> None:
    log.info("reward model on the %d evaluation prompts' answers %s: pairwise accuracy %.3f (95%% CI %.3f to %.3f; "
             "%d prompts with a pair, %d pairs in rankings of %d)", n_prompts, where, pairwise["accuracy"],
             *pairwise["ci"], pairwise["prompts"], pairwise["pairs"], pairwise["answers_per_ranking"])


def log_best_of_n(n: int, where: str, row: dict) -> None:
    log.info("best-of-%d %s: one sample %.3f, reward-model pick %.3f (%+.3f, 95%% CI %+.3f to %+.3f), oracle %.3f",
             n, where, row["mean"], row["reward_model"], row["gain"], *row["gain_ci"], row["oracle"])


def main():
    is_main = is_main_process()
    args, config = begin_stage("reward", RewardConfig, main_process=is_main)
    out = args.out_dir
    parent = require_stage(args, "sft")
    tokenizer = Tokenizer.load(parent)
    if config.head not in ("scalar", "verifier"):
        raise SystemExit(f"error: head={config.head!r}: expected scalar or verifier")
    verifier = config.head == "verifier"

    rankings = []
    for source in ranked_sources(args, config):
        try:
            rankings += load_rankings(source)
        except DataError as error:
            raise SystemExit(f"error: {error}") from None
    train_rankings, val_rankings = split_by_prompt(rankings, config.val_fraction, seed=args.seed)
    sft_model = load_causal_lm(parent).eval()  # the confidence term's model, and the verifier head's start

    def confidence_of(records) -> list[list[list[float]]]:
        """Per prompt, per response: the SFT model's confidence features (CONFIDENCE_FEATURES)."""
        prompts = [r["prompt"] for r in records for _ in r["responses"]]
        responses = [x for r in records for x in r["responses"]]
        flat = iter(response_confidence(sft_model, tokenizer, prompts, responses, config.max_length).tolist())
        return [[next(flat) for _ in r["responses"]] for r in records]

    def weighted(weights, features) -> float:
        return sum(w * x for w, x in zip(weights, features))

    # With `residual`, the confidence's weights are fitted first (on the training rankings) and the head learns on
    # top of that score: it is trained on the pairs the confidence gets wrong, not on what the SFT model knows.
    train_confidence, val_confidence = confidence_of(train_rankings), confidence_of(val_rankings)
    residual = config.confidence and config.residual
    confidence_weights = (fit_pairwise_weights([(c, r["ranks"]) for c, r in zip(train_confidence, train_rankings)])
                          if residual else [0.0] * len(CONFIDENCE_FEATURES))

    def offsets_of(confidence):
        return [[weighted(confidence_weights, features) for features in prompt] for prompt in confidence]

    train_rows = encode_rankings(tokenizer, train_rankings, config.max_length, verifier, offsets_of(train_confidence))
    val_rows = encode_rankings(tokenizer, val_rankings, config.max_length, verifier, offsets_of(val_confidence))
    log.info("reward: %d prompts with rankings (%d train / %d held out)", len(rankings), len(train_rows), len(val_rows))

    model = load_sequence_classifier(parent)
    model.config.pad_token_id = tokenizer.pad_id
    if verifier:  # a resumed run's trainer then loads its trained head over this start
        init_verifier_head(model, sft_model, tokenizer)
    training_args = TRLRewardConfig(
        **common_training_arguments(out, config, args.seed),
        # whole prompts: all their pairs together
        per_device_train_batch_size=per_device_batch(config.prompts_per_batch, "prompts_per_batch"),
        per_device_eval_batch_size=per_device_batch(config.prompts_per_batch, "prompts_per_batch"),
        max_length=None,  # rows are truncated when they are encoded
        remove_unused_columns=False,
        center_rewards_coefficient=None,
    )
    metrics_log = MetricsLog(out / "metrics.jsonl", is_main, resume_step=0 if latest_checkpoint(out) else None)
    with GracefulInterrupt() as interrupt:
        callback = StageCallback(metrics_log, interrupt, config.max_time)
        trainer = RankingRewardTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(train_rows),
                                       eval_dataset=Dataset.from_list(val_rows),
                                       processing_class=tokenizer.to_transformers(),
                                       data_collator=RankingCollator(tokenizer.pad_id), callbacks=[callback])
        run_trainer(trainer, out, callback)
    if not is_main:  # held-out scoring and the checkpoint are the main process's alone
        return
    model = trainer.model.eval()

    # --- the reward: the trained head plus the SFT model's confidence, weighted by the rankings -------
    def features_of(records, confidence):
        """Per prompt: [(head, *confidence features) per response] and its ranks."""
        prompts = [r["prompt"] for r in records for _ in r["responses"]]
        responses = [x for r in records for x in r["responses"]]
        heads = iter(score_conversations(model, tokenizer, prompts, responses, config.max_length,
                                         verifier=verifier).tolist())
        return [([(next(heads), *features) for features in prompt], r["ranks"])
                for prompt, r in zip(confidence, records)]

    train_groups = features_of(train_rankings, train_confidence)
    val_groups = features_of(val_rankings, val_confidence)
    head_weight = 1.0  # with `residual`, the head was trained to be added to the confidence's score as it is
    if config.confidence and not residual:
        head_weight, *confidence_weights = fit_pairwise_weights(train_groups)
    weights = [head_weight, *confidence_weights]
    combined = lambda groups: [([weighted(weights, response) for response in features], ranks)  # noqa: E731
                               for features, ranks in groups]
    quality = ranking_metrics(combined(val_groups))
    head_only = ranking_metrics([([h for h, *_ in f], ranks) for f, ranks in val_groups])
    confidence_fit = fit_pairwise_weights([([c for _, *c in f], ranks) for f, ranks in train_groups])
    confidence_only = ranking_metrics([([weighted(confidence_fit, c) for _, *c in f], ranks)
                                       for f, ranks in val_groups])
    # the SFT model's samples are among the rankings just scored (split into train and held out): reuse their features
    group_of = {id(r): g for r, g in zip(train_rankings + val_rankings, train_groups + val_groups)}
    sft_samples = [r for r in rankings if str(r.get("policy", "")).rstrip("/").endswith("sft")] or rankings
    sft_groups = [group_of[id(r)] for r in sft_samples]
    all_rewards = [x for scores, _ in combined(sft_groups) for x in scores]
    final = {"pairwise_accuracy": quality.pairwise_accuracy, "pairwise_accuracy_ci": quality.pairwise_accuracy_ci,
             "top1_accuracy": quality.top1_accuracy,
             "kendall_tau": quality.kendall_tau, "reward_mean": statistics.fmean(all_rewards),
             "reward_std": statistics.pstdev(all_rewards) or 1.0, "val_prompts": quality.n_prompts,
             "val_pairs": quality.n_pairs, "train_prompts": len(train_rows),
             "head_weight": head_weight, "confidence_weights": confidence_weights,
             "confidence_features": list(CONFIDENCE_FEATURES), "residual": residual, "head": config.head,
             "head_mean": statistics.fmean(h for f, _ in sft_groups for h, *_ in f), "max_length": config.max_length,
             "head_pairwise_accuracy": head_only.pairwise_accuracy,
             "confidence_pairwise_accuracy": confidence_only.pairwise_accuracy}
    log.info("reward model on held-out prompts (%d): pairwise accuracy %.3f (95%% CI %.3f to %.3f; head alone %.3f, "
             "SFT confidence alone %.3f), top-1 %.3f, Kendall tau %.3f; reward = %.3f x head%s",
             quality.n_prompts, quality.pairwise_accuracy, *quality.pairwise_accuracy_ci, head_only.pairwise_accuracy,
             confidence_only.pairwise_accuracy, quality.top1_accuracy, quality.kendall_tau, head_weight,
             "".join(f" {w:+.3f} x {name} log-prob" for w, name in zip(confidence_weights, CONFIDENCE_FEATURES)))
    final["labelled_prompts"] = len(rankings)
    final["labelled_comparisons"] = sum(len(ranking_pairs(r["ranks"])) for r in rankings)

    # --- does the reward model carry signal? Best-of-n from SFT on the held-out eval prompts --------
    # Gold of the answer it picks among n SFT samples vs a single sample's gold: if reranking does not
    # beat SFT, PPO against this reward model cannot either (Gao et al. 2022).
    eval_config = load_config(EvalConfig, args.preset)
    eval_source = args.eval_data or args.run_dir / "data"
    eval_prompts = eval_records(eval_source, eval_config) if args.eval_data or eval_source.is_dir() else []
    if has_judge_records(eval_prompts):
        scorer = RewardScorer(model, tokenizer, final["reward_mean"], final["reward_std"], sft_model,
                              head_weight, tuple(confidence_weights), config.max_length, verifier)
        best = best_of_n(sft_model, tokenizer, eval_prompts, scorer, eval_config)
        for n in eval_config.best_of_n_values:
            row = best[str(n)]
            final[f"best_of_{n}_gold"], final[f"best_of_{n}_gold_ci"] = row["reward_model"], row["reward_model_ci"]
            final[f"best_of_{n}_gain"], final[f"best_of_{n}_gain_ci"] = row["gain"], row["gain_ci"]
            final[f"best_of_{n}_oracle"] = row["oracle"]
            log_best_of_n(n, f"on {len(eval_prompts)} held-out prompts", row)
        final["sample_gold_mean"] = best[str(eval_config.best_of_n_values[0])]["mean"]
        log_pairwise(best["pairwise"], len(eval_prompts), "at temperature 1, as the ranked answers")
        final["eval_pairwise_accuracy"], final["eval_pairwise_accuracy_ci"] = (best["pairwise"]["accuracy"],
                                                                               best["pairwise"]["ci"])
        # the same reranking of answers sampled as a chat user sees them (the evaluation's temperature), from as
        # many samples as above: best-of-4 then averages 4 disjoint groups of 4, half the noise of one group
        best["eval_temperature"] = best_of_n(sft_model, tokenizer, eval_prompts, scorer, eval_config,
                                             name="best-of-n (eval temperature)", temperature=eval_config.temperature)
        write_json_atomic(out / "best_of_n.json", best)
        for n in eval_config.best_of_n_values:
            row = best["eval_temperature"][str(n)]
            final[f"best_of_{n}_gain_eval_temperature"] = row["gain"]
            final[f"best_of_{n}_gain_eval_temperature_ci"] = row["gain_ci"]
            log_best_of_n(n, f"at the evaluation temperature {eval_config.temperature:.1f}", row)
        pairwise = best["eval_temperature"]["pairwise"]
        log_pairwise(pairwise, len(eval_prompts), f"at the evaluation temperature {eval_config.temperature:.1f}")
        final["eval_pairwise_accuracy_eval_temperature"] = pairwise["accuracy"]
        final["eval_pairwise_accuracy_eval_temperature_ci"] = pairwise["ci"]

    manifest = make_manifest("reward", config, args, parent=parent, data_files=ranked_sources(args, config),
                             metrics=final)
    save_model(model, out, parent, manifest)
    plot_curves(metrics_log.read(), ["loss", "eval_loss", "eval_accuracy", "accuracy"], out / "loss.png", "reward")
    write_json_atomic(out / "metrics.json", final)
    clear_trainer_checkpoints(out)


if __name__ == "__main__":
    run_main(main)
