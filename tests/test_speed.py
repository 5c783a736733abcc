"""The run-time speed choice (minigpt/speed.py): bf16 and compilation only when measurably faster."""

import json
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import run_stage
from minigpt import speed
from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM

VOCAB, BLOCK = 64, 32


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniGPTForCausalLM(MiniGPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK))


def choose(model, monkeypatch=None, **kwargs):
    kwargs.setdefault("attention", "sdpa")  # the attention kernel's own tests ask for auto
    return speed.choose_speed(model, batch=2, block=BLOCK, vocab=VOCAB, device="cpu", **kwargs)


def test_without_bf16_support_the_choice_is_fp32_eager(monkeypatch):
    monkeypatch.setattr(speed, "bf16_supported", lambda device: False)
    decision = choose(tiny_model(), dtype="auto", compile="off")
    assert decision.name() == "fp32" and decision.dtype == "float32"
    assert any("not supported" in note for note in decision.notes)
    with pytest.raises(ValueError, match="bfloat16"):
        choose(tiny_model(), dtype="bfloat16", compile="off")


@pytest.mark.parametrize("timings, expected", [
    ({"fp32": 1.0, "bf16_autocast": 2.0, "bf16_matmul": 1.5}, "fp32"),  # bf16 slower: the EPYC case
    ({"fp32": 1.0, "bf16_autocast": 0.98, "bf16_matmul": 0.99}, "fp32"),  # within noise: not worth it
    ({"fp32": 1.0, "bf16_autocast": 0.6, "bf16_matmul": 0.8}, "bf16_autocast"),  # clearly faster
    ({"fp32": 1.0, "bf16_autocast": 0.9, "bf16_matmul": 0.5}, "bf16_matmul"),
])
def test_bf16_is_chosen_only_when_measurably_faster(monkeypatch, timings, expected):
    monkeypatch.setattr(speed, "bf16_supported", lambda device: True)
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {k: timings[k] for k in steps})
    decision = choose(tiny_model(), dtype="auto", compile="off")
    assert decision.math == expected
    assert decision.dtype == ("bfloat16" if expected == "bf16_autocast" else "float32")
    assert decision.speedup() == pytest.approx(timings["fp32"] / timings[expected], abs=1e-3)


def test_explicit_dtype_is_obeyed_without_measuring(monkeypatch):
    monkeypatch.setattr(speed, "measure", lambda *a, **k: pytest.fail("an explicit dtype must not be measured"))
    assert choose(tiny_model(), dtype="float32", compile="off").math == "fp32"


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken(model, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    decision = choose(tiny_model(), dtype="float32", compile="auto")
    assert decision.name() == "fp32" and not decision.compile
    assert any("compile failed" in note and "no C++ compiler" in note for note in decision.notes)
    with pytest.raises(RuntimeError, match="compile=on"):
        choose(tiny_model(), dtype="float32", compile="on")


class Slowed(torch.nn.Module):
    """Stands in for a compiled model that is slower than eager."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        time.sleep(0.02)
        return self.inner(**kwargs)


def test_a_slower_compiled_model_is_not_used(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Slowed(model))
    decision = choose(tiny_model(), dtype="float32", compile="auto", repeats=3)
    assert not decision.compile and decision.name() == "fp32"
    assert decision.compile_round["fp32+compile"] > decision.compile_round["fp32"] + 0.015


def test_a_faster_compiled_model_is_used(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {k: 0.5 if "compile" in k else 1.0 for k in steps})
    decision = choose(tiny_model(), dtype="float32", compile="auto")
    assert decision.compile and decision.name() == "fp32+compile" and decision.speedup() == 2.0


def test_compile_is_not_tried_for_a_run_too_short_to_pay_for_it(monkeypatch):
    tried = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: tried.append(1) or model)
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {k: 0.5 if "compile" in k else 1.0 for k in steps})
    # 1.0 s per step at batch 2; the run's micro-batch is 4: 2 s per step
    short = choose(tiny_model(), dtype="float32", compile="auto", compile_batch=4, planned_steps=100)
    assert not tried and not short.compile
    assert any("compile not tried: about 200 s of training" in note for note in short.notes)
    capped = choose(tiny_model(), dtype="float32", compile="auto", compile_batch=4, planned_steps=1000,
                    max_seconds=70)  # a 70-s budget whatever max_steps says
    assert not tried and any("about 70 s" in note for note in capped.notes)
    long = choose(tiny_model(), dtype="float32", compile="auto", compile_batch=4, planned_steps=1000, max_seconds=600)
    assert tried and long.compile
    assert choose(tiny_model(), dtype="float32", compile="on", planned_steps=1).compile  # an explicit on is obeyed


def test_compile_is_tried_and_timed_at_the_runs_own_micro_batch(monkeypatch):
    """The training loop reuses the graph compiled while measuring only if both see the same shape."""
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, **kwargs):
            seen.append(input_ids.shape[0])
            return self.inner(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Recording(model))
    decision = speed.choose_speed(tiny_model(), batch=2, block=BLOCK, vocab=VOCAB, device="cpu", dtype="float32",
                                  compile="auto", repeats=2, compile_batch=6, attention="sdpa")
    assert seen and set(seen) == {6}
    assert set(decision.compile_round) == {"fp32", "fp32+compile"}


def test_measuring_leaves_weights_and_random_stream_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    choose(model, dtype="auto", compile="off", repeats=2, adamw="auto")
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "bf16")


def train_curve(math, steps=40):
    """Loss per step of the tiny model on a learnable pattern (each token is the previous one + 1)."""
    model = tiny_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    speed.set_matmul_math(math)
    try:
        for _ in range(steps):
            start = torch.randint(0, VOCAB, (8, 1), generator=generator)
            x = (start + torch.arange(BLOCK + 1)) % VOCAB
            with speed.autocast_for(math, "cpu"):
                logits = model(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        speed.set_matmul_math("fp32")
    return losses


@pytest.mark.skipif(not speed.bf16_supported("cpu"), reason="this CPU has no bf16 math")
@pytest.mark.parametrize("math", ["bf16_autocast", "bf16_matmul"])
def test_bf16_training_follows_the_fp32_loss_curve(math):
    fp32, bf16 = train_curve("fp32"), train_curve(math)
    assert fp32[-1] < fp32[0] - 1.0  # it learns, so the comparison means something
    if bf16 == fp32:  # bit-identical: this CPU's oneDNN kept the matmuls in fp32 (seen with AVX-512 BF16, no AMX)
        pytest.skip(f"{math} does not change this CPU's arithmetic, so there is no bf16 curve to compare")
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert abs(a - b) < 0.05 * a + 0.02, (step, a, b)


def test_pretraining_records_its_speed_decision(tiny_runs, tmp_path):
    shutil.copytree(tiny_runs / "t", tmp_path / "s", ignore=shutil.ignore_patterns("pretrain", "tokens"))
    result = run_stage("pretrain", tmp_path, "dtype=auto", "adamw=auto", "max_steps=5", "eval_every=5",
                       "sample_every=5", run="s")
    assert "speed: chose" in result.stderr + result.stdout
    out = tmp_path / "s" / "pretrain"
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics["speed"] == manifest["speed"]
    assert metrics["speed"]["chosen"] in ("fp32", "bf16_autocast", "bf16_matmul")
    assert "fp32" in metrics["speed"]["step_seconds"] or not speed.bf16_supported("cpu")
    assert metrics["dtype"] == ("bfloat16" if metrics["speed"]["math"] == "bf16_autocast" else "float32")
    assert metrics["speed"]["adamw"] in speed.ADAMW_KERNELS
    assert set(metrics["speed"]["adamw_seconds"]) == set(speed.ADAMW_KERNELS)  # both timed


@pytest.mark.parametrize("written, expected", [(0.8, "eager"), (0.98, "sdpa"), (1.3, "sdpa")])
def test_written_out_attention_is_chosen_only_when_measurably_faster(monkeypatch, written, expected):
    timings = {"fp32": 1.0, "fp32+eager_attention": written}
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {k: timings[k] for k in steps})
    model = tiny_model()
    decision = choose(model, dtype="float32", compile="off", attention="auto")
    assert decision.attention == expected and model.config._attn_implementation == expected
    assert set(decision.attention_round) == {"fp32", "fp32+eager_attention"}
    assert decision.speedup() == pytest.approx(1.0 / written if expected == "eager" else 1.0, abs=1e-3)


def test_compiled_both_attention_kernels_are_timed_and_the_faster_kept(monkeypatch):
    """Eager, SDPA is as fast; compiled, the written-out attention fuses and wins: the compiled round decides."""
    compiled_for = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled_for.append(
        model.config._attn_implementation) or model)
    timings = {"fp32": 1.0, "fp32+eager_attention": 1.0, "fp32+compile": 0.8, "fp32+eager_attention+compile": 0.6}
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {k: timings[k] for k in steps})
    model = tiny_model()
    decision = choose(model, dtype="float32", compile="auto", attention="auto")
    assert compiled_for == ["sdpa", "eager"]
    assert set(decision.compile_round) == {"fp32", "fp32+compile", "fp32+eager_attention+compile"}
    assert decision.name() == "fp32+eager_attention+compile" and decision.speedup() == pytest.approx(1 / 0.6, abs=1e-3)
    assert model.config._attn_implementation == "eager"
    timings["fp32+eager_attention+compile"] = 0.9  # now SDPA compiled is the faster
    assert choose(tiny_model(), dtype="float32", compile="auto", attention="auto").name() == "fp32+compile"
    fixed = choose(tiny_model(), dtype="float32", compile="auto", attention="sdpa")  # an explicit kernel: one compile
    assert fixed.attention == "sdpa" and compiled_for[-1] == "sdpa" and len(compiled_for) == 5


def test_an_unknown_attention_kernel_is_refused():
    with pytest.raises(ValueError, match="attention='flash'"):
        choose(tiny_model(), dtype="float32", compile="off", attention="flash")


def test_a_trainer_stage_falls_back_to_fp32_without_bf16_and_passes_its_math_to_the_trainer(monkeypatch):
    from transformers import TrainingArguments

    from minigpt.config import SFTConfig
    from minigpt.trainer_glue import common_training_arguments, decide_trainer_speed

    monkeypatch.setattr(speed, "bf16_supported", lambda device: False)
    assert decide_trainer_speed(tiny_model(), 1, BLOCK, VOCAB, "auto").math == "fp32"
    monkeypatch.setattr(speed, "bf16_supported", lambda device: True)
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {k: 0.5 if k == "bf16_autocast" else 1.0 for k in steps})
    decision = decide_trainer_speed(tiny_model(), 1, BLOCK, VOCAB, "auto")
    assert decision.name() == "bf16_autocast" and not decision.compile and decision.attention == "sdpa"
    speed.set_matmul_math("fp32")
    for math, mixed in (("bf16_autocast", "bf16"), ("bf16_matmul", "no"), ("fp32", "no")):
        arguments = common_training_arguments("unused", SFTConfig(), 0, math=math)
        if not torch.cuda.is_available():  # a CPU run may use bf16 autocast only when marked as on the CPU
            assert arguments["use_cpu"] == (mixed == "bf16")
        assert TrainingArguments(**arguments).mixed_precision == mixed


@pytest.mark.skipif(not speed.bf16_supported("cpu"), reason="this CPU has no bf16 math")
def test_sft_in_bf16_follows_the_fp32_loss_curve_and_records_its_math(tiny_sft, tmp_path):
    # tiny_sft is the tiny preset's SFT: fp32 (the preset pins it), same data, seed and steps as this run
    out = tmp_path / "sft_bf16"
    run_stage("sft", tiny_sft.parents[1], "dtype=bfloat16", "--out", str(out))
    metrics, manifest = (json.loads((out / name).read_text()) for name in ("metrics.json", "manifest.json"))
    assert metrics["speed"]["math"] == "bf16_autocast" and manifest["speed"] == metrics["speed"]
    assert json.loads((tiny_sft / "metrics.json").read_text())["speed"]["math"] == "fp32"

    def curve(folder):
        return {row["step"]: row["loss"] for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "loss" in row}
    fp32, bf16 = curve(tiny_sft), curve(out)
    assert fp32.keys() == bf16.keys() and len(fp32) >= 3
    assert bf16 != fp32  # autocast changed the arithmetic: there is a bf16 curve to compare
    for step in fp32:
        assert abs(fp32[step] - bf16[step]) < 0.05 * fp32[step] + 0.02, (step, fp32[step], bf16[step])


def test_packed_rows_are_timed_with_restarting_positions_and_a_new_length_each_step():
    model, seen = tiny_model(), []
    forward = model.forward

    def spy(input_ids=None, position_ids=None, **kwargs):
        seen.append((input_ids.shape, position_ids))
        return forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
    model.forward = spy
    step = speed.training_step_fn(model, 1, BLOCK, VOCAB, "cpu", "fp32", layouts=[[3, 5], [4, 4, 2]])
    for _ in range(3):
        step()
    assert [shape[1] for shape, _ in seen] == [8, 10, 8]  # the layouts in turn, then again
    assert seen[0][1].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert seen[1][1].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fused, expected", [(0.3, "fused"), (0.98, "default"), (1.5, "default")])
def test_fused_adamw_is_chosen_only_when_measurably_faster(monkeypatch, fused, expected):
    monkeypatch.setattr(speed, "measure", lambda steps, repeats=5: {"default": 1.0, "fused": fused})
    decision = choose(tiny_model(), dtype="float32", compile="off", adamw="auto")
    assert decision.adamw == expected and decision.adamw_seconds == {"default": 1.0, "fused": fused}


def test_adamws_kernel_is_timed_on_the_parameters_adamw_updates(monkeypatch):
    from minigpt.training import configure_optimizer

    model = tiny_model()
    optimizer = configure_optimizer(model, 1e-2, 0.1, kind="muon")
    on_adamw = speed.adamw_parameters(optimizer)
    muon_params = {id(p) for p in optimizer.optimizers[1].param_groups[0]["params"]}
    assert on_adamw and len(on_adamw) + len(muon_params) == len(list(model.parameters()))
    assert not muon_params & {id(p) for p in on_adamw}
    assert {id(p) for p in speed.adamw_parameters(configure_optimizer(model, 1e-2, 0.1))} == {
        id(p) for p in model.parameters()}
    timed = []
    monkeypatch.setattr(speed, "choose_adamw", lambda params, device: (timed.append(list(params)), ("default", {}))[1])
    choose(model, dtype="float32", compile="off", adamw="auto", adamw_params=on_adamw)
    choose(model, dtype="float32", compile="off", adamw="auto")
    assert [len(params) for params in timed] == [len(on_adamw), len(list(model.parameters()))]


def test_adamw_keeps_its_default_kernel_where_the_fused_one_is_refused_or_not_asked_for(monkeypatch):
    real = torch.optim.AdamW

    def adamw(params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    assert speed.choose_adamw(tiny_model().parameters(), "cpu") == ("default", {})
    monkeypatch.setattr(speed, "measure", lambda *a, **k: pytest.fail("an explicit kernel must not be measured"))
    assert choose(tiny_model(), dtype="float32", compile="off", adamw="fused").adamw == "fused"
    assert choose(tiny_model(), dtype="float32", compile="off").adamw == "default"  # a Trainer's own choice
    with pytest.raises(ValueError, match="adamw='apex'"):
        choose(tiny_model(), dtype="float32", compile="off", adamw="apex")


def test_the_fused_kernel_trains_as_the_default_one_and_a_resumed_optimizer_keeps_it():
    from minigpt.training import configure_optimizer

    models = [tiny_model(), tiny_model()]
    optimizers = [configure_optimizer(model, 1e-2, 0.1) for model in models]
    speed.SpeedDecision(adamw="fused").apply_to_optimizer(optimizers[1])
    speed.SpeedDecision(adamw="default").apply_to_optimizer(optimizers[0])  # leaves torch's default alone
    assert [group["fused"] for group in optimizers[0].param_groups] == [None, None]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(0, VOCAB, (4, BLOCK + 1), generator=generator)
        for model, optimizer in zip(models, optimizers):
            model(input_ids=x[:, :-1], targets=x[:, 1:]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5), "fused AdamW must be the same update"
    assert not torch.equal(models[0].lm_head.weight, tiny_model().lm_head.weight)  # it trained
    resumed = configure_optimizer(tiny_model(), 1e-2, 0.1)
    resumed.optimizers[0].load_state_dict(optimizers[1].optimizers[0].state_dict())
    assert all(group["fused"] for group in resumed.param_groups)
