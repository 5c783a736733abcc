"""Run-time speed choices: bf16 math, the attention kernel and `torch.compile`, decided by measuring this machine.

Machines differ from one day to the next: on a Xeon with AMX bf16 matmuls are several times faster
than fp32, on an EPYC without AVX-512 bf16 is twenty times *slower*, and whether `torch.compile`
pays depends on the model size, the compiler and the cores. So a stage does not guess: it times a few
of its own training steps (its real shapes) in each candidate setting, interleaved so background load
hits all alike, and keeps the fastest only when it is measurably faster than plain fp32 eager.
Anything that fails (no bf16, a compiler error) falls back to fp32 eager.

    decision = choose_speed(model, batch=16, block=256, vocab=2048, device=device, dtype="auto", compile="auto",
                            adamw="auto")
    decision.apply()             # sets the process-wide matmul precision the decision wants
    model = decision.wrap(model) # its attention kernel set, and torch.compile'd when that won
    decision.apply_to_optimizer(optimizer)  # AdamW's fused kernel, when that was measurably faster
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)

# A candidate must beat fp32 eager by this fraction of a step to be chosen: smaller gains are noise
# on shared cores, and a wrong "win" would make the run slower than doing nothing.
MARGIN = 0.05
# The math settings: "fp32"; "bf16_autocast" (activations in bf16: accelerate's mixed_precision=bf16);
# "bf16_matmul" (fp32 weights and activations, oneDNN computes each fp32 matmul in bf16 on CPU).
MATHS = ("fp32", "bf16_autocast", "bf16_matmul")
# Compiling costs 20-60 s on a 2-core CPU and a compiled step saved 15-25% there, so it pays back only after a
# few minutes of training: a shorter run (a 70-s tinyshakespeare try, a smoke test) is not worth compiling.
COMPILE_PAYS_AFTER = 240.0
# The attention kernels, by Transformers' `attn_implementation` names: "sdpa" (PyTorch's fused
# scaled_dot_product_attention, the default) and "eager" (matmul, softmax, matmul written out:
# model.explicit_attention). On a CPU, bf16, short sequences and small heads, the written-out form
# trains faster, above all compiled (its mask and softmax fuse into one loop); in fp32 it is slower.
ATTENTIONS = ("sdpa", "eager")


@dataclass
class SpeedDecision:
    math: str = "fp32"
    attention: str = "sdpa"
    compile: bool = False
    # seconds per training step, median of the interleaved measurements, per candidate tried
    step_seconds: dict = field(default_factory=dict)
    compile_seconds: float = 0.0  # the one-off cost of compiling, when it was tried
    attention_round: dict = field(default_factory=dict)  # SDPA vs written-out attention, measured together
    compile_round: dict = field(default_factory=dict)  # eager vs compiled, measured together
    notes: list = field(default_factory=list)  # why a candidate was skipped or failed
    adamw: str = "default"  # AdamW's kernel: torch's default for the device, or "fused" (ADAMW_KERNELS)
    adamw_seconds: dict = field(default_factory=dict)  # seconds per optimizer step, per kernel, when measured

    @property
    def dtype(self) -> str:
        """What accelerate's mixed precision should be: autocast only for bf16_autocast."""
        return "bfloat16" if self.math == "bf16_autocast" else "float32"

    def speedup(self) -> float:
        """Chosen step time vs fp32 eager's (1.0 when nothing was measured)."""
        for times in (self.compile_round, self.attention_round, self.step_seconds):  # the round that decided
            chosen, base = times.get(self.name()), times.get("fp32")
            if chosen and base:
                return round(base / chosen, 3)
        return 1.0

    def name(self) -> str:
        return candidate_name(self.math, self.attention, self.compile)

    def apply(self) -> None:
        set_matmul_math(self.math)

    def wrap(self, model):
        set_attention(model, self.attention)
        return torch.compile(model) if self.compile else model

    def apply_to_optimizer(self, optimizers) -> None:
        """Give the AdamW optimizers (torch optimizers, or anything with `.optimizers`) the chosen kernel.

        Set on the param groups, which AdamW reads at every step and saves with its state, so that the
        choice can be made after the optimizer exists, before its first step (a resumed run's param groups,
        restored from its state, already hold the kernel it started with)."""
        if self.adamw != "fused":
            return
        for optimizer in adamw_optimizers(optimizers):
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = True, False

    def as_dict(self) -> dict:
        return {**asdict(self), "chosen": self.name(), "speedup_vs_fp32_eager": self.speedup()}

    def describe(self) -> str:
        times = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.step_seconds.items())
        def then(rounds):
            return "; then " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in rounds.items()) if rounds else ""

        extra = then(self.attention_round)
        extra += f"; compile took {self.compile_seconds:.1f}s" if self.compile_seconds else ""
        extra += then(self.compile_round)
        if self.adamw_seconds:
            extra += "; AdamW " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in self.adamw_seconds.items())
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        adamw = " with fused AdamW" if self.adamw == "fused" else ""
        return (f"speed: chose {self.name()}{adamw} ({self.speedup():.2f}x fp32 eager) from "
                f"{times or 'no measurement'}{extra}{notes}")


def bf16_supported(device) -> bool:
    """Whether this device has native bf16 math (on CPU: oneDNN's AVX-512 BF16 / AMX kernels)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def set_matmul_math(math: str) -> None:
    """Process-wide: oneDNN's fp32 matmuls in bf16 for `bf16_matmul`, exact fp32 otherwise."""
    if math not in MATHS:
        raise ValueError(f"math={math!r}: expected one of {', '.join(MATHS)}")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if math == "bf16_matmul" else "none"


def autocast_for(math: str, device):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=math == "bf16_autocast")


def candidate_maths(dtype: str, device) -> tuple[list[str], list[str]]:
    """The math settings to measure for a `dtype` request, and notes on any left out."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: expected auto, float32 or bfloat16")
    if dtype == "float32":
        return ["fp32"], []
    if not bf16_supported(device):
        note = f"bf16 not supported on {torch.device(device).type}"
        if dtype == "bfloat16":
            raise ValueError(f"dtype=bfloat16: {note}; use dtype=auto or float32")
        return ["fp32"], [note + ": fp32"]
    if dtype == "bfloat16":
        return ["bf16_autocast"], []
    maths = ["fp32", "bf16_autocast"]
    if torch.device(device).type == "cpu":
        maths.append("bf16_matmul")
    return maths, []


def candidate_name(math: str, attention: str = "sdpa", compiled: bool = False) -> str:
    """How a setting is named in the logs and metrics: e.g. `bf16_autocast+eager_attention+compile`."""
    return math + ("+eager_attention" if attention == "eager" else "") + ("+compile" if compiled else "")


def set_attention(model, attention: str) -> None:
    """Point the model at an attention kernel: Transformers' `config._attn_implementation`, which our
    attention (and GPT-2's) reads at every call. Not saved with the model: a checkpoint loads as SDPA."""
    check_attention(attention)
    from transformers import PretrainedConfig

    for module in model.modules():  # through any wrapper: DDP, torch.compile, PEFT
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            config._attn_implementation = attention


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected auto or one of {', '.join(ATTENTIONS)}")


def candidate_attentions(attention: str) -> list[str]:
    if attention == "auto":
        return list(ATTENTIONS)
    check_attention(attention)
    return [attention]


def parse_compile(value) -> str:
    """`auto` | `on` | `off` (booleans and 1/0/true/false are accepted as on/off)."""
    text = str(value).strip().lower()
    if text in ("auto",):
        return "auto"
    if text in ("1", "true", "yes", "on"):
        return "on"
    if text in ("0", "false", "no", "off", ""):
        return "off"
    raise ValueError(f"compile={value!r}: expected auto, on or off")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def training_step_fn(model, batch: int, block: int, vocab: int, device, math: str, layouts=None):
    """One forward+backward on random tokens of the run's shape; gradients are dropped, weights untouched.

    `layouts`: rows that pack sequences end to end, position ids restarting at each, as padding-free SFT batches
    do: a list of layouts, each the lengths of one row's sequences (`block` is then unused). Call i trains on
    layouts[i % len(layouts)], so the row length changes from step to step as it does in such a stage: on a CPU,
    oneDNN builds its bf16 kernels per shape, and a new shape every step made bf16 autocast slower than fp32 on
    the Xeon with AMX although it was faster at any one fixed shape.
    """
    # Its own generator: measuring must not move the run's random stream.
    generator = torch.Generator().manual_seed(0)
    rows = [(block, None)] if not layouts else [(sum(lengths), torch.cat([torch.arange(n) for n in lengths]))
                                                for lengths in layouts]
    data = [(torch.randint(0, vocab, (batch, n + 1), generator=generator).to(device),
             None if positions is None else positions.expand(batch, -1).to(device)) for n, positions in rows]
    calls = itertools.count()

    def step():
        x, positions = data[next(calls) % len(data)]
        set_matmul_math(math)
        with autocast_for(math, device):  # the loss inside forward, as pretraining computes it (fused when compiled)
            loss = model(input_ids=x[:, :-1], position_ids=positions, targets=x[:, 1:]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
    return step


def measure(steps: dict, repeats: int = 5, min_seconds: float = 0.0) -> dict:
    """Median seconds of each callable, called round-robin `repeats` times (more while under min_seconds)."""
    times = {name: [] for name in steps}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - started < min_seconds and rounds < 4 * repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
        rounds += 1
    return {name: statistics.median(v) for name, v in times.items()}


ADAMW_KERNELS = ("default", "fused")


def choose_adamw(params, device, repeats: int = 5) -> tuple[str, dict]:
    """AdamW's kernel for these parameters, and the seconds a step took with each: "fused" (one kernel over
    every tensor) only when measurably faster than torch's default for the device, which on a CPU updates
    one tensor at a time (the cpu preset's 2.2M parameters: 1.5 against 3.7 ms a step on a 2-core Xeon).
    On CUDA fused is the known best and is not measured. Timed on copies with random gradients (the weights
    are not touched); a device or dtype the fused kernel refuses means the default."""
    if torch.device(device).type == "cuda":
        return "fused", {}
    copies = [p.detach().clone().requires_grad_(True) for p in params if p.requires_grad]
    generator = torch.Generator().manual_seed(0)  # its own: measuring must not move the run's random stream
    for copy in copies:
        copy.grad = torch.randn(copy.shape, generator=generator).to(copy)
    optimizers = {"default": torch.optim.AdamW(copies, lr=1e-6)}
    try:
        optimizers["fused"] = torch.optim.AdamW(copies, lr=1e-6, fused=True)
        optimizers["fused"].step()
    except (RuntimeError, ValueError) as error:
        log.info("AdamW: fused kernel unavailable (%s)", error_summary(error))
        return "default", {}
    optimizers["default"].step()  # each allocates its state before timing
    seconds = measure({name: optimizer.step for name, optimizer in optimizers.items()}, repeats)
    return pick(seconds, "default"), seconds


def adamw_optimizers(optimizers) -> list:
    """The AdamW optimizers among `optimizers` (a torch optimizer, or anything with `.optimizers`)."""
    return [o for o in getattr(optimizers, "optimizers", [optimizers]) if isinstance(o, torch.optim.AdamW)]


def adamw_parameters(optimizers) -> list:
    """The parameters those AdamW optimizers update: with Muon for the hidden matrices, only the embedding
    and norms."""
    return [p for optimizer in adamw_optimizers(optimizers)
            for group in optimizer.param_groups for p in group["params"]]


def choose_speed(model, batch: int, block: int, vocab: int, device, dtype: str = "auto", compile="auto",
                 repeats: int = 5, compile_batch: int | None = None, planned_steps: int = 0,
                 max_seconds: float = 0.0, attention: str = "auto", layouts=None,
                 adamw: str | None = None, adamw_params=None) -> SpeedDecision:
    """Time the candidate settings on `model` itself and return the fastest that beats fp32 eager.

    Three rounds, each interleaved and each with its own baseline: the math (fp32, bf16 autocast, bf16
    matmuls), then the attention kernel at the chosen math (SDPA or written out), then compiled against
    eager. An explicit `dtype` (float32 / bfloat16), `attention` (sdpa / eager) or `compile` (on / off)
    is obeyed, not measured. The model's weights are not changed (forward and backward only; gradients
    are discarded). `compile_batch` (default `batch`): the batch torch.compile is tried and timed at. Give
    the run's own micro-batch, so the training loop reuses the graph compiled here instead of compiling
    another one for a new shape (a second shape also makes torch.compile fall back to shape-generic kernels).
    `planned_steps` / `max_seconds` (0: unknown / none): the run's length. `compile=auto` is not tried when
    the run, at the eager step time just measured, would train for less than COMPILE_PAYS_AFTER seconds.
    `layouts`: packed rows of changing length, timed as they will train (training_step_fn).
    `adamw` ("auto", or one of ADAMW_KERNELS to obey; None: not the caller's to choose, e.g. a Trainer's):
    AdamW's kernel (`choose_adamw`; `apply_to_optimizer` sets it), timed on `adamw_params` (default: all the
    model's parameters; give `adamw_parameters(optimizer)` when Muon takes the hidden matrices).
    """
    compile_batch = compile_batch or batch
    compile = parse_compile(compile)
    maths, notes = candidate_maths(dtype, device)
    attentions = candidate_attentions(attention)
    decision = SpeedDecision(math=maths[0], attention=attentions[0], notes=notes)
    if adamw == "auto":
        params = model.parameters() if adamw_params is None else adamw_params
        decision.adamw, decision.adamw_seconds = choose_adamw(params, device)
    elif adamw is not None:
        if adamw not in ADAMW_KERNELS:
            raise ValueError(f"adamw={adamw!r}: expected auto or one of {', '.join(ADAMW_KERNELS)}")
        decision.adamw = adamw
    if len(maths) == 1 and len(attentions) == 1 and compile == "off":
        return decision  # nothing else to choose

    def step_fn(target, math, attn, rows=batch):
        step = training_step_fn(target, rows, block, vocab, device, math, layouts)

        def run():
            set_attention(model, attn)
            step()
        return run

    was_training = model.training
    model.train()
    try:
        steps = {m: step_fn(model, m, attentions[0]) for m in maths}
        for step in steps.values():  # warm-up: oneDNN primitives, allocator
            step()
        if len(maths) > 1:
            decision.step_seconds = measure(steps, repeats)
            decision.math = pick(decision.step_seconds, "fp32")
        elif compile == "auto" or len(attentions) > 1:
            decision.step_seconds = measure(steps, 2)
        # The attention kernel, at the chosen math, eager.
        if len(attentions) > 1:
            round_steps = {candidate_name(m, a): step_fn(model, m, a)
                           for m, a in dict.fromkeys([("fp32", "sdpa"), (decision.math, "sdpa"),
                                                      (decision.math, "eager")])}
            round_steps[candidate_name(decision.math, "eager")]()  # warm-up
            decision.attention_round = measure(round_steps, repeats)
            sdpa, written = (candidate_name(decision.math, a) for a in ("sdpa", "eager"))
            better = pick({sdpa: decision.attention_round[sdpa], written: decision.attention_round[written]}, sdpa)
            decision.attention = "eager" if better == written else "sdpa"
        if compile == "auto" and planned_steps:
            planned = decision.step_seconds[decision.math] * compile_batch / batch * planned_steps
            planned = min(planned, max_seconds) if max_seconds else planned
            if planned < COMPILE_PAYS_AFTER:
                compile = "off"
                decision.notes.append(f"compile not tried: about {planned:.0f} s of training cannot pay back "
                                      f"compiling (under {COMPILE_PAYS_AFTER:.0f} s)")
        if compile != "off":
            # Compiled, each attention kernel again: the eager ranking does not carry over, since a compiled
            # written-out attention fuses its mask and softmax, which SDPA's own kernel cannot gain.
            compiled = {}
            for attn in attentions:
                set_attention(model, attn)
                model_compiled, seconds, error = try_compile(model, compile_batch, block, vocab, device, decision.math,
                                                               layouts)
                decision.compile_seconds += seconds
                if error:
                    if compile == "on":
                        raise RuntimeError(f"compile=on: torch.compile failed: {error}") from None
                    decision.notes.append(f"compile failed ({error}): eager")
                    break
                compiled[candidate_name(decision.math, attn, compiled=True)] = (model_compiled, attn)
            if compile == "on" and len(compiled) == 1:
                decision.compile, decision.attention = True, attentions[0]
            elif compiled:
                # A round of its own, with fp32 eager beside it: every ratio is from one round.
                round_steps = {candidate_name(m, a): step_fn(model, m, a, compile_batch)
                               for m, a in dict.fromkeys([("fp32", "sdpa"), (decision.math, decision.attention)])}
                for name, (model_compiled, attn) in compiled.items():
                    round_steps[name] = step_fn(model_compiled, decision.math, attn, compile_batch)
                decision.compile_round = measure(round_steps, repeats)
                best = min(compiled, key=decision.compile_round.get)
                baseline = min(decision.compile_round[m] for m in round_steps if m not in compiled)
                if compile == "on" or decision.compile_round[best] < (1 - MARGIN) * baseline:
                    decision.compile, decision.attention = True, compiled[best][1]
    finally:
        set_matmul_math(decision.math)
        set_attention(model, decision.attention)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return decision


def pick(seconds: dict, baseline: str) -> str:
    """The fastest entry, if it beats `baseline` by more than MARGIN; otherwise the baseline."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < (1 - MARGIN) * seconds[baseline] else baseline


def try_compile(model, batch, block, vocab, device, math, layouts=None):
    """(compiled model, seconds to compile, error text or None): any failure means eager."""
    started = time.perf_counter()
    try:
        compiled = torch.compile(model)
        training_step_fn(compiled, batch, block, vocab, device, math, layouts)()  # compiles forward and backward
        return compiled, time.perf_counter() - started, None
    except Exception as error:  # noqa: BLE001 — a compiler can fail in many ways; eager always works
        return None, time.perf_counter() - started, error_summary(error)


def error_summary(error: BaseException) -> str:
    """One short line for a log: the error's type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]


@contextlib.contextmanager
def matmul_math(math: str):
    """Temporarily use a math setting (for measurements outside a stage, e.g. the bench)."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    set_matmul_math(math)
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
