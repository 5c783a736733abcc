"""Stage 1 — pretraining: a GPT from random weights learns the run's text by next-token prediction.

    python stages/pretrain.py --run default --preset cpu [max_time=600 lr=2e-3 ...]

Reads runs/<RUN>/data (or --data) and runs/<RUN>/tokenizer; writes runs/<RUN>/pretrain/.
Ctrl-C saves a resume checkpoint; the same command continues from it.
"""

import contextlib
import logging
import math
import time

import torch
from tqdm.auto import tqdm

from minigpt.checkpoint import (clear_resume_state, load_resume_state, make_manifest, save_model,
                                save_resume_state)
from minigpt.config import PretrainConfig, load_config, to_dict
from minigpt.data import load_texts
from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.run import (GracefulInterrupt, MetricsLog, exit_interrupted, fingerprint_files, run_main,
                         parse_stage_args, plot_curves, require_stage, setup_logging,
                         write_json_atomic)
from minigpt.sampling import SamplingConfig, generate
from minigpt.speed import SpeedDecision, adamw_parameters, autocast_for, bf16_supported, choose_speed
from minigpt.token_data import TokenBlocks, cache_key, cached_tokens, token_stats
from minigpt.tokenizer import Tokenizer
from minigpt.trainer_glue import agree_max, check_replicas_agree, require_data_parallel
from minigpt.training import (configure_optimizer, count_parameters, make_accelerator, lr_multiplier,
                              seed_everything)

log = logging.getLogger("minigpt.pretrain")
SAMPLE_PROMPTS = ["Once upon a time", "The market in", "3 plus 4 is"]


def main():
    args = parse_stage_args("pretrain")
    config = load_config(PretrainConfig, args.preset, args.overrides)
    # bf16 autocast is ours to apply (autocast_for), once the speed decision is made below.
    accelerator = make_accelerator("float32")
    require_data_parallel(accelerator)
    out = args.out_dir
    setup_logging(out, accelerator.is_main_process)
    seed_everything(args.seed)
    world = accelerator.num_processes
    log.info("pretrain: preset=%s world_size=%d device=%s", args.preset, world, accelerator.device)

    # --- data: tokenized once, cached beside the tokenizer ---------------------------------------
    tokenizer_dir = require_stage(args, "tokenizer")
    tokenizer = Tokenizer.load(tokenizer_dir)
    source = args.data or str(args.run_dir / "data")
    data_key = cache_key(source, fingerprint_files([source]), fingerprint_files([tokenizer_dir / "ranks.tiktoken"]))
    cache = args.run_dir / "tokens"
    with accelerator.main_process_first():  # rank 0 tokenizes, the others read its cache
        train_tokens = cached_tokens(lambda: load_texts(source, "train"), tokenizer, cache, "train", data_key)
        val_tokens = cached_tokens(lambda: load_texts(source, "val"), tokenizer, cache, "val", data_key)
    train, val = TokenBlocks(train_tokens, config.block_size), TokenBlocks(val_tokens, config.block_size)
    val_stats = token_stats(cache, "val")
    bytes_per_token = val_stats["bytes"] / val_stats["tokens"]

    # --- model, optimizer, schedule ---------------------------------------------------------------
    model_config = MiniGPTConfig(vocab_size=tokenizer.vocab_size, n_layer=config.n_layer, n_head=config.n_head,
                                 n_embd=config.n_embd, block_size=config.block_size, dropout=config.dropout,
                                 bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.end_id,
                                 pad_token_id=tokenizer.pad_id)
    model = MiniGPTForCausalLM(model_config)
    kind = config.optimizer
    if kind == "muon" and not bf16_supported(accelerator.device):
        # Muon's Newton-Schulz iteration runs in bf16: on a device without bf16 math it is very slow.
        log.warning("optimizer=muon: no bf16 math on %s, so Muon would be slow; using adamw", accelerator.device)
        kind = "adamw"
    optimizer = configure_optimizer(model, config.lr, config.weight_decay, (0.9, config.beta2), kind, config.muon_lr)
    # A resumed run must have the same config (a new wall-clock budget is fine).
    resume_key = {k: v for k, v in to_dict(config).items() if k != "max_time"}
    state = load_resume_state(out, model, optimizer, expect={"config": resume_key})
    start_step = state["step"] if state else 0
    elapsed_before = state["elapsed"] if state else 0.0
    train_tokens_seen = state["train_tokens"] if state else 0
    if state:
        log.info("resuming from step %d (%s)", start_step, out / "resume")
    # The per-process micro-batch (see below) is the shape every forward pass has.
    global_batch = config.batch_size * config.grad_accum
    if global_batch % world:
        raise SystemExit(f"error: global batch {global_batch} (batch_size x grad_accum) is not divisible by "
                         f"{world} processes")
    per_process = global_batch // world
    micro = math.ceil(per_process / config.grad_accum)  # sequences per forward pass
    # The speed decision (and any compiling it does) is spent from the training budget: a faster step
    # must pay for its own set-up inside the same wall time.
    decision_started = time.time()
    model.to(accelerator.device)
    speed = decide_speed(config, state, model, optimizer, micro, tokenizer.vocab_size, accelerator)
    elapsed_before += time.time() - decision_started
    speed.apply()
    speed.apply_to_optimizer(optimizer)
    model, *optimizer.optimizers = accelerator.prepare(model, *optimizer.optimizers)
    model = speed.wrap(model)
    # the plain model under accelerate's and torch.compile's wrappers: what is sampled from and saved
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    params = count_parameters(raw_model)
    log.info("model: %.2fM parameters, %d layers x %d wide, context %d, vocab %d", params / 1e6,
             config.n_layer, config.n_embd, config.block_size, tokenizer.vocab_size)

    rank = accelerator.process_index

    def loss_of(inputs, targets, net=model):  # inside forward: a compiled model fuses the loss with the head
        return net(input_ids=inputs.to(accelerator.device), targets=targets.to(accelerator.device)).loss

    @torch.no_grad()
    def evaluate():
        model.eval()
        offsets = val.eval_offsets(config.eval_batches * config.batch_size)
        losses = []
        for chunk in offsets.split(config.batch_size)[rank::world]:
            # the plain model: a compiled one would compile a second (no-grad) graph for a few evaluations
            with autocast_for(speed.math, accelerator.device):
                losses.append(loss_of(*val.blocks(chunk), net=raw_model))
        # Summed and counted over processes, then divided: processes may hold different numbers of batches.
        total = torch.stack([torch.stack(losses).sum() if losses else torch.tensor(0.0, device=accelerator.device),
                             torch.tensor(float(len(losses)), device=accelerator.device)])
        total = accelerator.reduce(total, reduction="sum")
        loss = (total[0] / total[1]).item()
        model.train()
        return loss, loss / math.log(2) / bytes_per_token

    def write_samples(step):
        raw_model.eval()
        prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in SAMPLE_PROMPTS]
        gen = generate(raw_model, prompts, SamplingConfig(max_new_tokens=40, temperature=0.8, top_k=50, seed=step),
                       stop_ids=[tokenizer.bos_id], pad_id=tokenizer.pad_id)
        for prompt, tokens in zip(SAMPLE_PROMPTS, gen.tokens):
            log.info("sample @%d: %s|%s", step, prompt, tokenizer.decode(tokens).replace("\n", " "))
        raw_model.train()

    def save(step, elapsed):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_resume_state(out, raw_model, optimizer, None,
                              {"step": step, "elapsed": elapsed, "train_tokens": train_tokens_seen,
                               "config": resume_key, "speed": speed.as_dict()})
        accelerator.wait_for_everyone()

    metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, resume_step=start_step if state else None)
    model.train()
    step, started = start_step, time.time()
    val_loss = val_bpb = float("nan")
    tokens_per_step = global_batch * config.block_size
    bar = tqdm(total=config.max_steps, initial=start_step, desc="pretrain", disable=not accelerator.is_main_process)
    with GracefulInterrupt() as interrupt:
        while step < config.max_steps:
            # The slowest clock counts for all processes: the same learning rate, the same last step.
            elapsed = agree_max(elapsed_before + time.time() - started, accelerator.device)
            if config.max_time and elapsed >= config.max_time:
                log.info("wall-clock budget of %.0fs reached at step %d", config.max_time, step)
                break
            multiplier = lr_multiplier(step, config.warmup_steps, config.max_steps, elapsed, config.max_time,
                                       config.min_lr_ratio)
            optimizer.set_lr_multiplier(multiplier)
            lr = config.lr * multiplier
            offsets = train.random_offsets(step, global_batch, args.seed)
            mine = offsets[rank * per_process:(rank + 1) * per_process]
            step_loss = 0.0
            chunks = mine.split(micro)
            for i, chunk in enumerate(chunks):
                # Gradients are all-reduced once per step, on the last micro-batch.
                sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(model)
                with sync, autocast_for(speed.math, accelerator.device):
                    loss = loss_of(*train.blocks(chunk))
                    accelerator.backward(loss * len(chunk) / per_process)
                step_loss += loss.item() * len(chunk) / per_process
            if config.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_tokens_seen += tokens_per_step
            if step % config.log_every == 0 or step == 1:
                if world > 1:  # each process saw its slice: the global batch's loss is their mean
                    step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean").item()
                rate = (step - start_step) * tokens_per_step / max(1e-9, time.time() - started)
                metrics.log(step=step, train_loss=step_loss, lr=lr, tokens_per_sec=rate,
                            train_tokens=train_tokens_seen)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rate:,.0f}")
            if step % config.eval_every == 0:
                val_loss, val_bpb = evaluate()
                metrics.log(step=step, val_loss=val_loss, val_bpb=val_bpb)
                log.info("step %d: val_loss %.4f val_bpb %.4f", step, val_loss, val_bpb)
            if step % config.sample_every == 0 and accelerator.is_main_process:
                write_samples(step)
            interrupted = agree_max(interrupt.requested, accelerator.device)  # Ctrl-C stops all at this step
            if step % config.save_every == 0 or interrupted:
                save(step, elapsed_before + time.time() - started)
            if interrupted:
                exit_interrupted(out)
            bar.update(1)
    bar.close()

    # --- final evaluation and checkpoint ----------------------------------------------------------
    train_time = elapsed_before + time.time() - started
    check_replicas_agree(accelerator, model)
    val_loss, val_bpb = evaluate()
    final = {"val_loss": val_loss, "val_bpb": val_bpb, "train_tokens": train_tokens_seen,
             "tokens_per_sec": train_tokens_seen / max(1e-9, train_time), "params": params, "steps": step,
             "train_time_sec": round(train_time, 1), "world_size": world, "dtype": speed.dtype, "optimizer": kind,
             "speed": speed.as_dict()}
    if accelerator.is_main_process:
        metrics.log(step=step, val_loss=val_loss, val_bpb=val_bpb)
        if step % config.sample_every:
            write_samples(step)
        manifest = make_manifest("pretrain", config, args, parent=None, data_files=[source], metrics=final,
                                 tokenizer=str(tokenizer_dir), speed=speed.as_dict())
        save_model(raw_model, out, tokenizer_dir, manifest)
        plot_curves(metrics.read(), ["train_loss", "val_loss", "val_bpb", "lr"], out / "loss.png", "pretrain")
        write_json_atomic(out / "metrics.json", final)
        clear_resume_state(out)
        log.info("pretrain done: val_loss %.4f, val_bpb %.4f, %.0f tokens/s, %.1fs -> %s",
                 val_loss, val_bpb, final["tokens_per_sec"], train_time, out)
    accelerator.wait_for_everyone()


def decide_speed(config, state, model, optimizer, micro, vocab, accelerator) -> SpeedDecision:
    """bf16 / compile for this run: measured on the main process and shared, so every process agrees;
    a resumed run keeps the choice it started with (the same math for its whole curve)."""
    from accelerate.utils import broadcast_object_list

    if state and "speed" in state:
        decision = SpeedDecision(**{k: v for k, v in state["speed"].items()
                                    if k in SpeedDecision.__dataclass_fields__})
        log.info("speed: keeping the resumed run's choice, %s", decision.name())
        return decision
    started = time.time()
    # A few sequences of the real length measure the same kernels as the full micro-batch, in a few seconds.
    # compile is tried at the real micro-batch: the training loop then reuses that compiled graph.
    decision = [choose_speed(model, min(micro, config.speed_batch), config.block_size, vocab, accelerator.device,
                             config.dtype, config.compile, compile_batch=micro,
                             planned_steps=config.max_steps * config.grad_accum, max_seconds=config.max_time,
                             attention=config.attention, adamw=config.adamw,
                             adamw_params=adamw_parameters(optimizer))
                if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    decision = decision[0]
    log.info("%s (decided in %.1fs)", decision.describe(), time.time() - started)
    return decision


if __name__ == "__main__":
    run_main(main)
