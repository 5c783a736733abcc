"""What the TRL-trained stages (SFT, reward) share: the run-dir mechanics wired into a HF Trainer.

One callback gives every Trainer the library's behaviour: metrics to `metrics.jsonl`, Ctrl-C saves a
Trainer checkpoint and stops (exit 130; the same command resumes), a wall-clock budget ends
training cleanly. Trainer checkpoints live in `<stage>/trainer/` and are removed once the stage
has written its final checkpoint.

Under `accelerate launch` (NPROC>1) the Trainer runs data-parallel; the helpers at the end keep the
preset's global batch whatever the number of processes, let the stage do its one-off work (gold
evaluation, saving) on the main process only, make all processes stop at the same step, and check
that they end with the same weights (pretraining and PPO, our own loops, use the last two as well).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from minigpt.run import GracefulInterrupt, MetricsLog

log = logging.getLogger(__name__)

TRAINER_DIR = "trainer"
# The files of a Trainer checkpoint whose checksums prove it whole (per-process RNG files are left out:
# other processes may still be writing theirs when the main one records these).
CHECKED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth")


class StageCallback(TrainerCallback):
    def __init__(self, metrics: MetricsLog, interrupt: GracefulInterrupt, max_time: float = 0.0):
        self.metrics, self.interrupt, self.max_time = metrics, interrupt, max_time
        self.started = time.time()
        self.interrupted = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            values = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            self.metrics.log(**{"step": state.global_step, "epoch": round(state.epoch or 0, 4), **values})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from minigpt.checkpoint import write_checksums

            write_checksums(Path(args.output_dir) / f"checkpoint-{state.global_step}", CHECKED_FILES)

    def on_step_end(self, args, state, control, **kwargs):
        # Decided for all processes at once (the slowest clock, any Ctrl-C): all stop at the same step.
        if agree_max(self.interrupt.requested, args.device):
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
        elif self.max_time and agree_max(time.time() - self.started, args.device) >= self.max_time:
            log.info("wall-clock budget of %.0fs reached at step %d", self.max_time, state.global_step)
            control.should_training_stop = True
        return control


def latest_checkpoint(out_dir: Path) -> str | None:
    """The newest whole `checkpoint-N` folder of an interrupted Trainer run, or None.

    One whose checksums do not match (a kill -9 mid-save, a damaged disk) is set aside with a warning.
    Called by every process: only the main one checks and moves folders, the others wait for it.
    """
    from minigpt.checkpoint import checksum_damage, set_aside

    folder = Path(out_dir) / TRAINER_DIR
    if not folder.exists():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, path in found:
        damage = checksum_damage(path) if is_main_process() else ""
        if not damage:
            return str(path)
        set_aside(path, damage)
    return None


def clear_trainer_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / TRAINER_DIR, ignore_errors=True)


def common_training_arguments(out_dir: Path, config, seed: int, steps_per_epoch_hint: int = 0,
                              math: str | None = None) -> dict:
    """TrainingArguments shared by the TRL stages, from a stage config with the usual fields.

    `math`: a speed decision's math (minigpt/speed.py); "bf16_autocast" trains under bf16 autocast, on a
    CPU too. None keeps the old default: bf16 where a GPU supports it, fp32 otherwise.
    """
    import torch

    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if math is None \
        else math == "bf16_autocast"

    return dict(
        output_dir=str(Path(out_dir) / TRAINER_DIR),
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # < 1: a fraction of the training steps
        weight_decay=config.weight_decay,
        logging_steps=max(1, min(10, config.eval_steps // 2)),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        # Transformers allows bf16 autocast on a CPU only when told the run is on the CPU
        use_cpu=bf16 and not torch.cuda.is_available(),
        # TRL turns activation checkpointing on by default; our models are small enough to keep
        # activations, and recomputing them would double the forward cost.
        activation_checkpointing=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        log_level="warning",
    )


def run_trainer(trainer, out_dir: Path, callback: StageCallback):
    """Train, resuming from the newest Trainer checkpoint if an earlier run was interrupted."""
    require_data_parallel(trainer.accelerator)
    resume = latest_checkpoint(out_dir)
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    if callback.interrupted:
        from minigpt.run import exit_interrupted

        exit_interrupted(Path(out_dir) / TRAINER_DIR)
    check_replicas_agree(trainer.accelerator, trainer.model)


def decide_trainer_speed(model, rows: int, length: int, vocab: int, dtype: str, layouts=None):
    """bf16 or fp32 math for a Trainer stage, timed on `model` at the stage's batch shape (rows x length; `layouts`:
    padding-free rows of changing length instead, each packing sequences of the given lengths).

    The same measurement as pretraining's (minigpt/speed.py), math only: the attention kernel stays SDPA and
    nothing is compiled (a Trainer stage's batches change length from step to step). Measured on the main
    process and shared, so that every process trains with the same math.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from minigpt.speed import choose_speed

    state = PartialState()  # the process group and device the Trainer will use (one shared state)
    device = state.device
    started = time.time()
    decision = [None]
    if state.is_main_process:
        was = next(model.parameters()).device
        decision = [choose_speed(model.to(device), rows, length, vocab, device, dtype=dtype, compile="off",
                                 attention="sdpa", layouts=layouts)]
        model.to(was)
    if state.num_processes > 1:
        broadcast_object_list(decision)
    decision = decision[0]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shape = (f"packed rows of {min(map(sum, layouts))}-{max(map(sum, layouts))} tokens" if layouts
             else f"{rows} x {length} tokens")
    log.info("%s, at %s (decided in %.1fs)", decision.describe(), shape, time.time() - started)
    return decision


# ---- several processes ---------------------------------------------------------------------------
# The launcher (`accelerate launch`, torchrun) sets WORLD_SIZE and RANK; read before the Trainer
# exists, they need no process group. (decide_trainer_speed does create accelerate's shared state before
# the Trainer, with the defaults the Trainer's own would take: the same device and process group.)

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of all processes (on all machines): the one that logs, evaluates and saves."""
    return int(os.environ.get("RANK", "0")) == 0


def per_device_batch(global_batch: int, field: str) -> int:
    """Each process's share of the preset's global batch (`field` names the config field).

    The preset fixes the global batch, so 1 and N processes take the same optimisation steps.
    """
    world = world_size()
    if global_batch % world:
        raise SystemExit(f"error: {field}={global_batch} is the global batch and must divide evenly over "
                         f"{world} processes: set {field} to a multiple of {world}, or use another NPROC")
    return global_batch // world


def require_data_parallel(accelerator) -> None:
    """Refuse sharded launches (FSDP, DeepSpeed, Megatron): every stage needs the whole model on each
    process, because the main process alone samples from it, evaluates it and saves it."""
    from accelerate.utils import DistributedType

    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if accelerator.distributed_type in sharded:
        raise SystemExit(f"error: accelerate config with distributed_type {accelerator.distributed_type.value}: "
                         f"minigpt's stages are data-parallel only (the models fit one device with room to "
                         f"spare); use ACCEL_CONFIG=configs/accelerate/ddp.yaml or no ACCEL_CONFIG")


def agree_max(value: float, device) -> float:
    """The largest `value` over all processes (itself for one), so that all take the same decision.

    Clocks and Ctrl-C reach processes at slightly different moments; a process that stopped or saved
    alone would leave the others waiting for it in their next collective, for ever.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def check_replicas_agree(accelerator, model) -> None:
    """Log whether every process holds bit-identical weights, as data parallelism should keep them.

    One sha256 of the weights per process, compared on all of them: a cheap end-of-training proof
    that gradients were synchronised.
    """
    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return
    digest = hashlib.sha256()
    for name, tensor in sorted(accelerator.unwrap_model(model, keep_torch_compile=False).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()[:16]])
    if len(set(digests)) == 1:
        log.info("replicas agree: all %d processes hold the same weights (sha256 %s)", len(digests), digests[0])
    else:
        log.warning("replicas differ: weight hashes per process %s; gradients were not synchronised",
                    " ".join(digests))
