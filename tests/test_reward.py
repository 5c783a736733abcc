import json
import signal
import subprocess
import time

from conftest import PYTHON, REPO, SHARED_DATA, kill_after_trainer_checkpoint, run_stage

import pytest


def test_samples_writes_k_distinct_ranked_responses_per_prompt(tiny_ppo):
    records = [json.loads(line) for line in (tiny_ppo / "t" / "samples" / "ranked.jsonl").read_text().splitlines()]
    prompts = [json.loads(line) for line in (tiny_ppo / "t" / "data" / "prompts_ranking.jsonl").read_text().splitlines()]
    assert len(records) == len(prompts)
    for record in records:
        assert len(record["responses"]) == 4 == len(set(record["responses"]))
        assert len(record["ranks"]) == 4 and min(record["ranks"]) == 0
        best = max(record["scores"])
        assert all((rank == 0) == (score == best) for rank, score in zip(record["ranks"], record["scores"]))
        assert record["policy"].endswith("sft") and record["prompt"][-1]["role"] == "user"


def test_reward_metrics_are_reported(tiny_ppo):
    metrics = json.loads((tiny_ppo / "t" / "reward" / "metrics.json").read_text())
    for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
        assert -1 <= metrics[key] <= 1
    assert metrics["reward_std"] > 0


@pytest.mark.parametrize("name", ["preferences_sample.jsonl", "chat_sample.jsonl"])
def test_reward_trains_on_real_preference_formats(tiny_sft, tmp_path, name):
    source = SHARED_DATA / name
    if not source.exists():
        pytest.skip(f"{source} is absent (../shared/data is only on the developers' machines)")
    subset = tmp_path / name
    subset.write_text("".join(source.read_text().splitlines(keepends=True)[:40]))
    out = tmp_path / "reward"
    run_stage("reward", tiny_sft.parents[1], "--data", str(subset), "--out", str(out), "max_steps=3")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_prompts"] > 10 and 0 <= metrics["pairwise_accuracy"] <= 1


def test_interrupted_ppo_resumes(tiny_ppo, tmp_path):
    """Ctrl-C and resume, with the value model (gae) so its weights and optimiser go through the resume state
    too (the kill -9 test below runs the critic-free default)."""
    out = tmp_path / "ppo"
    args = ["--run", "t", "--preset", "tiny", "--runs-root", str(tiny_ppo), "--out", str(out), "steps=12",
            "save_every=1000", "eval_every=1000", "advantage=gae", "samples_per_prompt=1"]
    process = subprocess.Popen([PYTHON, "stages/ppo.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    curve = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (curve.exists() and len(curve.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 130, output[-3000:]
    state = json.loads((out / "resume" / "state.json").read_text())
    assert 2 <= state["step"] < 12 and not (out / "metrics.json").exists()
    result = run_stage("ppo", tiny_ppo, *args[6:], "--out", str(out))
    assert f"resuming from step {state['step']}" in result.stderr + result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and not (out / "resume").exists()
    steps = [json.loads(line)["step"] for line in curve.read_text().splitlines()]
    assert steps.count(state["step"]) == 1  # the resumed curve continues, without duplicates


def test_ppo_killed_after_a_periodic_save_resumes_and_finishes(tiny_ppo, tmp_path):
    """kill -9: the same command resumes from the last whole resume state (checksums checked) and ends at the
    configured step with one curve row per step (the reward model and SFT use the Trainer's resume, tested
    with SFT)."""
    out = tmp_path / "ppo"
    args = ["--run", "t", "--preset", "tiny", "--runs-root", str(tiny_ppo), "--out", str(out), "steps=8",
            "save_every=2", "eval_every=1000"]
    process = subprocess.Popen([PYTHON, "stages/ppo.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "resume" / "checksums.json").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["step"] >= 2 and not (out / "metrics.json").exists()
    result = run_stage("ppo", tiny_ppo, *args[6:], "--out", str(out))
    assert "resuming from step" in result.stderr + result.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(s for s in steps if s > 0)) == list(range(1, 9))


def test_reward_killed_after_a_periodic_save_resumes_to_the_uninterrupted_result(tiny_ppo, tmp_path):
    """kill -9 during reward-model training: the same command resumes from the last whole Trainer checkpoint
    and ends where an uninterrupted run ends (held-out accuracy equal, reward scale to 1e-4: the Trainer
    restores weights, optimizer, scheduler, data order and RNG)."""
    settings = ["max_steps=12", "save_steps=4", "eval_steps=1000"]
    baseline = tmp_path / "whole"
    run_stage("reward", tiny_ppo, "--out", str(baseline), *settings)
    out = tmp_path / "killed"
    kill_after_trainer_checkpoint("reward", tiny_ppo, out, *settings)
    result = run_stage("reward", tiny_ppo, "--out", str(out), *settings)
    assert "resuming from" in result.stderr + result.stdout
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (baseline, out))
    assert got["pairwise_accuracy"] == expected["pairwise_accuracy"]
    for key in ("reward_mean", "reward_std", "head_weight"):
        assert abs(got[key] - expected[key]) < 1e-4 * max(1.0, abs(expected[key])), key


@pytest.mark.parametrize("residual", [True, False])
def test_reward_combines_the_head_with_the_sft_confidence_by_fitted_weights(tiny_ppo, tmp_path, residual):
    import torch

    from minigpt.checkpoint import load_causal_lm
    from minigpt.data import load_prompts
    from minigpt.reward_model import CONFIDENCE_FEATURES, load_reward_scorer, response_confidence, score_conversations

    run = tiny_ppo / "t"
    folder = run / "reward"
    if not residual:  # the default (residual) is the fixture's; the other way is trained here
        folder = tmp_path / "reward_after"
        run_stage("reward", tiny_ppo, "--out", str(folder), "residual=false")
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("head_weight", "confidence_weights", "head_pairwise_accuracy", "confidence_pairwise_accuracy"):
        assert key in metrics
    assert metrics["residual"] == residual and len(metrics["confidence_weights"]) == len(CONFIDENCE_FEATURES)
    if residual:  # the head was trained to be added to the confidence's score as it is
        assert metrics["head_weight"] == 1.0
    scorer = load_reward_scorer(folder)
    assert (scorer.confidence_model is not None) == any(metrics["confidence_weights"])
    records = load_prompts(run / "data", "eval")[:3]
    prompts = [r["messages"] for r in records]
    responses = ["The answer is four.", "Hello there friend.", "Mara lives in Oakfield."]
    sft = load_causal_lm(run / "sft").eval()
    head = score_conversations(scorer.model, scorer.tokenizer, prompts, responses)
    confidence = response_confidence(sft, scorer.tokenizer, prompts, responses)
    expected = (metrics["head_weight"] * head + confidence @ torch.tensor(metrics["confidence_weights"])
                - metrics["reward_mean"]) / metrics["reward_std"]
    assert torch.allclose(torch.tensor(scorer(records, responses)), expected, atol=1e-4)


def test_a_reward_model_saved_with_one_confidence_weight_still_loads(tiny_ppo, tmp_path):
    import shutil

    from minigpt.reward_model import load_reward_scorer

    folder = tmp_path / "reward"
    shutil.copytree(tiny_ppo / "t" / "reward", folder)
    for name in ("manifest.json", "metrics.json"):
        data = json.loads((folder / name).read_text())
        stats = data["metrics"] if name == "manifest.json" else data
        del stats["confidence_weights"]
        stats["confidence_weight"] = 0.5  # the mean's weight, before the minimum was a feature
        (folder / name).write_text(json.dumps(data))
    scorer = load_reward_scorer(folder, confidence_model=None)
    assert scorer.confidence_weights == (0.5, 0.0) and scorer.confidence_model is not None


def test_the_ranking_loss_adds_each_responses_offset_to_the_heads_score():
    import math
    from types import SimpleNamespace

    import torch

    from minigpt.reward_model import RankingCollator, RankingRewardTrainer, encode_rankings

    class ConstantHead(torch.nn.Module):
        training = True

        def forward(self, input_ids, attention_mask, use_cache=False):
            return SimpleNamespace(logits=torch.zeros(len(input_ids), 1))

    class Ids:
        pad_id = 0

        def encode_chat(self, messages, add_generation_prompt=False):
            return [1] + [2] * len(messages[-1]["content"]), None

    records = [{"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "ranks": [0, 0]},  # all tied
               {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "bb"], "ranks": [0, 1]}]
    rows = encode_rankings(Ids(), records, 16, offsets=[[9.0, -9.0], [2.0, -3.0]])
    assert [row["offsets"] for row in rows] == [[2.0, -3.0]]  # the tied prompt is dropped with its offsets
    trainer = SimpleNamespace(model=ConstantHead(), _metrics={"train": {"accuracy": [], "margin": [], "mean_reward": []}},
                              accelerator=SimpleNamespace(gather_for_metrics=lambda x: x))
    loss = RankingRewardTrainer.compute_loss(trainer, trainer.model, RankingCollator(0)(rows))
    assert math.isclose(loss.item(), -math.log(1 / (1 + math.exp(-5.0))), rel_tol=1e-5)  # −log σ(2 − (−3))
    rows[0]["offsets"] = [0.0, 0.0]
    assert math.isclose(RankingRewardTrainer.compute_loss(trainer, trainer.model, RankingCollator(0)(rows)).item(),
                        math.log(2), rel_tol=1e-5)


def test_confidence_is_the_mean_and_the_least_log_probability_of_the_response_and_its_end(tiny_sft):
    import torch

    from minigpt.checkpoint import load_causal_lm
    from minigpt.reward_model import response_confidence
    from minigpt.tokenizer import Tokenizer

    tokenizer, model = Tokenizer.load(tiny_sft), load_causal_lm(tiny_sft).eval()
    prompt, response = [{"role": "user", "content": "What is two plus two?"}], "Two plus two is four."
    ids, _ = tokenizer.encode_chat(prompt + [{"role": "assistant", "content": response}])
    n = len(tokenizer.encode(response)) + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    by_hand = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][-n:]
    batch = response_confidence(model, tokenizer, [prompt, prompt], [response, "No."])  # padding must not matter
    assert batch.shape == (2, 2)
    assert torch.allclose(batch[0], torch.stack([by_hand.mean(), by_hand.min()]), atol=1e-5)
    assert not torch.equal(batch[1], batch[0])


def test_scores_batched_by_length_come_back_in_the_order_of_the_inputs(tiny_ppo):
    import torch

    from minigpt.data import load_prompts
    from minigpt.reward_model import load_reward_scorer, response_confidence, score_conversations

    scorer = load_reward_scorer(tiny_ppo / "t" / "reward")
    prompts = [r["messages"] for r in load_prompts(tiny_ppo / "t" / "data", "eval")[:5]]
    responses = ["Four.", "It is a long answer that goes on for quite a few words.", "No.", "Mara.", "Yes, it is."]
    one_by_one = torch.cat([score_conversations(scorer.model, scorer.tokenizer, [p], [r], batch_size=1)
                            for p, r in zip(prompts, responses)])
    assert torch.allclose(score_conversations(scorer.model, scorer.tokenizer, prompts, responses, batch_size=2),
                          one_by_one, atol=1e-5)
    if scorer.confidence_model is not None:
        alone = torch.cat([response_confidence(scorer.confidence_model, scorer.tokenizer, [p], [r], batch_size=1)
                           for p, r in zip(prompts, responses)])
        assert torch.allclose(response_confidence(scorer.confidence_model, scorer.tokenizer, prompts, responses,
                                                  batch_size=2), alone, atol=1e-5)


def test_ppo_ptx_mixes_pretraining_text_into_the_updates(tiny_ppo, tmp_path):
    out = tmp_path / "ppo"
    run_stage("ppo", tiny_ppo, "--out", str(out), "steps=2", "eval_every=1000", "ptx_coef=1.0", "ptx_block_size=32")
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ptx = [row["ptx_loss"] for row in curve if "ptx_loss" in row]
    assert len(ptx) == 2 and all(0 < x < 20 for x in ptx)  # a next-token loss in nats, every step


def test_ppo_ptx_without_pretraining_tokens_is_one_clear_error(tiny_ppo, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(tiny_ppo, root, symlinks=True)
    shutil.rmtree(root / "t" / "tokens")
    result = run_stage("ppo", root, "--out", str(tmp_path / "ppo"), "steps=1", "ptx_coef=1.0", check=False)
    assert result.returncode == 2 and "tokens/train.npy" in result.stderr and "Traceback" not in result.stderr


def test_ppo_critic_free_rloo_runs_without_a_value_model(tiny_ppo, tmp_path):
    out = tmp_path / "ppo"
    run_stage("ppo", tiny_ppo, "--out", str(out), "steps=2", "eval_every=1000")  # rloo, 4 answers a prompt: the default
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in curve if "policy_loss" in row]
    assert len(steps) == 2 and all("value_loss" not in row and "explained_variance" not in row for row in steps)
    assert (out / "model.safetensors").exists() and json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_ppo_rloo_with_one_answer_per_prompt_is_one_clear_error(tiny_ppo, tmp_path):
    result = run_stage("ppo", tiny_ppo, "--out", str(tmp_path / "ppo"), "steps=1", "advantage=rloo",
                       "samples_per_prompt=1", check=False)
    assert result.returncode == 2 and "samples_per_prompt" in result.stderr and "Traceback" not in result.stderr


def test_ppo_stops_at_its_kl_budget(tiny_ppo, tmp_path):
    """kl_stop ends the run once the policy's rollouts are that far from SFT, and the metrics say so."""
    out = tmp_path / "ppo"
    result = run_stage("ppo", tiny_ppo, "--out", str(out), "steps=6", "eval_every=1000", "kl_estimator=k3",
                       "kl_stop=1e-9", "kl_stop_window=1", "lr=1e-3")
    metrics = json.loads((out / "metrics.json").read_text())
    # step 1's rollouts come from the SFT weights themselves (KL 0); after one update the KL is > 0
    assert metrics["steps"] == 2 and metrics["stopped_at_kl"] > 0
    assert "KL budget reached at step 2" in result.stderr + result.stdout


def test_a_verifier_head_starts_as_the_lms_yes_minus_no_logit_after_the_check_question(tiny_sft):
    import torch

    from minigpt.checkpoint import load_causal_lm, load_sequence_classifier
    from minigpt.reward_model import (CHECK_QUESTION, encode_response, init_verifier_head, score_conversations)
    from minigpt.tokenizer import Tokenizer

    tokenizer, lm = Tokenizer.load(tiny_sft), load_causal_lm(tiny_sft).eval()
    classifier = load_sequence_classifier(tiny_sft).eval()
    init_verifier_head(classifier, lm, tokenizer)
    prompt = [{"role": "user", "content": "What is two plus two?"}]
    responses = ["Four.", "Two plus two is five, I think."]
    scores = score_conversations(classifier, tokenizer, [prompt, prompt], responses, verifier=True)
    yes, no = tokenizer.encode("Yes")[0], tokenizer.encode("No")[0]
    for response, score in zip(responses, scores):
        ids = encode_response(tokenizer, prompt, response, 256, verifier=True)
        question = tokenizer.encode(CHECK_QUESTION)
        assert ids[-1] == tokenizer.assistant_id and ids[-2 - len(question):-2] == question
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(score, logits[yes] - logits[no], atol=1e-4)
    assert scores[0] != scores[1]


def test_reward_with_the_verifier_head_is_read_the_same_way_by_every_stage(tiny_ppo, tmp_path):
    import torch

    from minigpt.data import load_prompts
    from minigpt.reward_model import load_reward_scorer, response_confidence, score_conversations

    out = tmp_path / "reward_verifier"
    run_stage("reward", tiny_ppo, "--out", str(out), "head=verifier")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"] == "verifier" and 0 <= metrics["pairwise_accuracy"] <= 1
    scorer = load_reward_scorer(out)
    assert scorer.verifier
    records = load_prompts(tiny_ppo / "t" / "data", "eval")[:3]
    prompts, responses = [r["messages"] for r in records], ["Four.", "Mara lives in Oakfield.", "No."]
    head = score_conversations(scorer.model, scorer.tokenizer, prompts, responses, verifier=True)
    assert not torch.allclose(head, score_conversations(scorer.model, scorer.tokenizer, prompts, responses))
    raw = metrics["head_weight"] * head
    if scorer.confidence_model is not None:
        raw = raw + response_confidence(scorer.confidence_model, scorer.tokenizer, prompts, responses) @ torch.tensor(
            metrics["confidence_weights"])
    expected = (raw - metrics["reward_mean"]) / metrics["reward_std"]
    assert torch.allclose(torch.tensor(scorer(records, responses)), expected, atol=1e-4)


def test_an_unknown_reward_head_is_one_clear_error(tiny_ppo, tmp_path):
    result = run_stage("reward", tiny_ppo, "--out", str(tmp_path / "r"), "head=banana", check=False)
    assert result.returncode != 0 and "head='banana': expected scalar or verifier" in result.stderr
