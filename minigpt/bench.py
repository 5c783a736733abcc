"""Performance figures: `python -m minigpt.bench` (or `make bench`); the last line is one JSON object.

Prints the machine (CPU model, cores, bf16/AMX support) and the speed choices `minigpt.speed` makes
here, then training throughput side by side: ours with those choices, ours in plain fp32 eager,
Transformers' GPT2LMHeadModel of identical dimensions as a user runs it (fp32 eager) and with our
choices (so the ratios show where a gain comes from), with model-FLOPs utilisation against the
measured matmul peak; then decoding, single stream and batched rollouts (the PPO shape), against
GPT-2's `generate`. Every comparison is measured in one run, interleaved (A, B, A, B, …), and
reported as medians: the cores are shared and noisy, ratios measured together are what can be trusted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time

import torch

from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.sampling import SamplingConfig, compile_decoding, generate
from minigpt.speed import autocast_for, bf16_supported, choose_speed, matmul_math, set_attention


def machine() -> dict:
    """CPU model, cores and the instruction sets bf16 speed depends on."""
    model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return {"cpu_model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "onednn_bf16": bf16_supported("cpu")}


def matmul_peak_gflops(dtype=torch.float32, n=1024, repeats=5) -> float:
    """This machine's dense matmul rate: the denominator of MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        rates.append(10 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return max(rates)


def flops_per_token(n_params_no_embedding: int, n_layer: int, n_embd: int, block: int, vocab: int) -> float:
    """Training FLOPs per token: 6·(matmul params incl. LM head) + attention scores (PaLM appendix B)."""
    return 6 * (n_params_no_embedding + n_embd * vocab) + 12 * n_layer * n_embd * block


def build_models(layers, width, heads, vocab, positions):
    torch.manual_seed(0)
    ours = MiniGPTForCausalLM(MiniGPTConfig(vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=width,
                                            block_size=positions))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=width,
                                      n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return ours, gpt2


def next_token_loss(model, x):
    """The loss as each model's users compute it, inside its forward (where a compiled model fuses it with the
    head): ours from pretraining's aligned `targets`, Transformers' GPT-2 from `labels` it shifts itself."""
    if hasattr(model, "decode_step"):  # ours (a compiled wrapper passes attributes through)
        return model(input_ids=x[:, :-1], targets=x[:, 1:]).loss
    return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # one prediction fewer a row: GPT-2's favour


def train_steps_per_sec(model, batch, block, vocab, steps, math="fp32", adamw="default"):
    """Tokens/s of whole training steps (forward, backward, AdamW) after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if adamw == "fused" else None)
    x = torch.randint(0, vocab, (batch, block + 1))
    model.train()

    def step():
        with matmul_math(math), autocast_for(math, "cpu"):
            loss = next_token_loss(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * block / (time.perf_counter() - start)


@torch.no_grad()
def decode_rates(ours, gpt2, prompt_len, new_tokens, vocab):
    ours.eval(), gpt2.eval()
    prompt = torch.randint(0, vocab, (1, prompt_len))
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0)

    def cached(model=ours):
        start = time.perf_counter()
        out = generate(model, prompt.tolist(), greedy)
        assert len(out.tokens[0]) == new_tokens
        return new_tokens / (time.perf_counter() - start)

    def uncached():  # the whole sequence through the model for every new token
        start = time.perf_counter()
        seq = prompt
        for _ in range(new_tokens):
            seq = torch.cat([seq, ours(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return new_tokens / (time.perf_counter() - start)

    def reference():
        start = time.perf_counter()
        gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return new_tokens / (time.perf_counter() - start)

    return cached, uncached, reference


@torch.no_grad()
def rollout_rates(ours, gpt2, prompts, prompt_len, new_tokens, vocab, temperature=0.0):
    """Batched decoding, the PPO rollout shape: `prompts` rows of `prompt_len` tokens, `new_tokens` each.

    Greedy (`temperature` 0), or sampled from the whole distribution as PPO's rollouts are (GPT-2's
    `generate` is told top_k=0, since its default keeps only the 50 most likely tokens)."""
    ours.eval(), gpt2.eval()
    batch = torch.randint(0, vocab, (prompts, prompt_len))
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, seed=0)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)

    def ours_batched(model=ours):
        start = time.perf_counter()
        out = generate(model, batch.tolist(), config)
        assert all(len(row) == new_tokens for row in out.tokens)  # no stop tokens: every row runs to the end
        return prompts * new_tokens / (time.perf_counter() - start)

    def gpt2_batched():
        start = time.perf_counter()
        gpt2.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=0, **sampling)
        return prompts * new_tokens / (time.perf_counter() - start)

    return ours_batched, gpt2_batched


@torch.no_grad()
def run_rollout_rates(run_dir, prompts: int, new_tokens: int, repeats: int) -> dict | None:
    """PPO's rollouts as the stage runs them: a finished run's SFT model answering `prompts` of its PPO
    prompts, up to `new_tokens` each, every row stopping at its end token, against Transformers' `generate`
    on the same model, prompts and stop token (interleaved; medians). None when the run has no SFT model.

    The random-weight rollouts above never stop early; real answers end at very different lengths, and
    the sampler stops computing a row once it has ended, where `generate` computes every row to the last."""
    from pathlib import Path

    from minigpt.checkpoint import load_causal_lm
    from minigpt.data import load_prompts
    from minigpt.sampling import left_pad
    from minigpt.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "sft" / "metrics.json").exists() or not (run_dir / "data").is_dir():
        return None
    tokenizer, model = Tokenizer.load(run_dir / "sft"), load_causal_lm(run_dir / "sft").eval()
    encoded = [tokenizer.encode_prompt(r["messages"]) for r in load_prompts(run_dir / "data", "ppo")[:prompts]]
    ids, mask = left_pad(encoded, tokenizer.pad_id, "cpu")
    seconds = {}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        config = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
            dict(do_sample=False)
        ours, theirs, answer_tokens = [], [], []
        for repeat in range(repeats):
            start = time.perf_counter()
            out = generate(model, encoded, config, stop_ids=[tokenizer.end_id], pad_id=tokenizer.pad_id,
                           generator=torch.Generator().manual_seed(repeat))
            ours.append(time.perf_counter() - start)
            answer_tokens.append(sum(len(t) for t in out.tokens))
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=tokenizer.end_id,
                           pad_token_id=tokenizer.pad_id, **sampling)
            theirs.append(time.perf_counter() - start)
        seconds[name] = (statistics.median(ours), statistics.median(theirs), statistics.median(answer_tokens))
    result = {"run_rollout_shape": f"{len(encoded)} PPO prompts of {run_dir}, up to {new_tokens} tokens, end token"}
    for name, (ours, theirs, answer_tokens) in seconds.items():
        print(f"run rollouts {name:>8}: ours {ours * 1000:,.0f} ms, generate {theirs * 1000:,.0f} ms "
              f"({theirs / ours:.2f}x; {answer_tokens:.0f} answer tokens)")
        result[f"run_rollout_{name}_seconds"] = round(ours, 4)
        result[f"run_rollout_{name}_generate_seconds"] = round(theirs, 4)
        result[f"run_rollout_{name}_ratio_vs_generate"] = round(theirs / ours, 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved measurements per figure (median)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--rollout-prompts", type=int, default=64, help="rows of the batched rollout")
    parser.add_argument("--rollout-tokens", type=int, default=48, help="new tokens per rollout row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16, as the stages take it")
    parser.add_argument("--compile", default="auto",
                        help="auto | on | off, as pretraining takes it (on a 2-core CPU compiling takes 20-60 s)")
    parser.add_argument("--attention", default="auto", help="auto | sdpa | eager, as pretraining takes it")
    parser.add_argument("--run", default="",
                        help="a finished run's folder: also time its SFT model's rollouts on its PPO prompts")
    parser.add_argument("--decode-compile", type=int, default=1,
                        help="1: also time decoding with the decode step compiled (static cache), 0: skip")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    positions = max(args.block, args.prompt_len + args.new_tokens, args.prompt_len + args.rollout_tokens)
    ours, gpt2 = build_models(args.layers, args.width, args.heads, args.vocab, positions)
    host = machine()
    print(f"machine: {host['cpu_model']}, {host['cores']} cores, {torch.get_num_threads()} torch threads, "
          f"avx512_bf16 {host['avx512_bf16']}, amx_bf16 {host['amx_bf16']}, oneDNN bf16 {host['onednn_bf16']}")
    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    # The same decision a stage makes at start, on the bench's shapes.
    decision = choose_speed(ours, args.batch, args.block, args.vocab, "cpu", args.dtype, args.compile,
                            attention=args.attention, adamw="auto")
    print(decision.describe())
    math = decision.math
    # Copies take the choices (attention kernel, compilation); `ours` and `gpt2` stay as plain SDPA models:
    # the fp32-eager baseline, GPT-2 as a user runs it, and every decoding figure.
    ours_auto, gpt2_same = decision.wrap(copy.deepcopy(ours)), decision.wrap(copy.deepcopy(gpt2))
    set_attention(ours, "sdpa")

    train = {"ours": [], "ours_fp32_eager": [], "gpt2": [], "gpt2_same_choices": []}
    # (model, math, AdamW kernel): the plain ones with torch's default AdamW, as a user's own loop gets it
    runs = {"ours": (ours_auto, math, decision.adamw), "ours_fp32_eager": (ours, "fp32", "default"),
            "gpt2": (gpt2, "fp32", "default"), "gpt2_same_choices": (gpt2_same, math, decision.adamw)}
    if bf16_supported("cpu"):  # plain bf16 autocast, whatever was chosen: today's train_bf16_speedup
        train["ours_bf16"], runs["ours_bf16"] = [], (ours, "bf16_autocast", "default")
    for _ in range(args.repeats):  # interleaved, so background load hits all alike
        for name, (model, model_math, adamw) in runs.items():
            train[name].append(train_steps_per_sec(model, args.batch, args.block, args.vocab, args.steps, model_math,
                                                   adamw))
    cached, uncached, reference = decode_rates(ours, gpt2, args.prompt_len, args.new_tokens, args.vocab)
    ours_batched, gpt2_batched = rollout_rates(ours, gpt2, args.rollout_prompts, args.prompt_len,
                                               args.rollout_tokens, args.vocab)
    ours_sampled, gpt2_sampled = rollout_rates(ours, gpt2, args.rollout_prompts, args.prompt_len,
                                               args.rollout_tokens, args.vocab, temperature=1.0)
    decode = {"cached": [], "uncached": [], "gpt2": [], "rollout": [], "rollout_gpt2": [], "rollout_sampled": [],
              "rollout_sampled_gpt2": []}
    compiled = None
    if args.decode_compile:  # the same weights, decode step through torch.compile (static cache shapes)
        compiled = copy.deepcopy(ours)
        start = time.perf_counter()
        # the attention kernel chosen as `make sample --compile` and chat choose it: timed on one row
        decode_choice = compile_decoding(compiled, notify=print)
        cached(compiled), ours_batched(compiled)  # compiles for one row (when not yet), then for the batch
        compile_seconds = time.perf_counter() - start
        if decode_choice["compiled"]:  # else `compile_decoding` said why, and the "compiled" rows are eager
            print(f"decode step compiled for 1 and {args.rollout_prompts} rows in {compile_seconds:.1f}s")
        decode["cached_compiled"], decode["rollout_compiled"] = [], []
    for _ in range(args.repeats):
        decode["cached"].append(cached())
        decode["uncached"].append(uncached())
        decode["gpt2"].append(reference())
        decode["rollout"].append(ours_batched())
        decode["rollout_gpt2"].append(gpt2_batched())
        decode["rollout_sampled"].append(ours_sampled())
        decode["rollout_sampled_gpt2"].append(gpt2_sampled())
        if compiled is not None:
            decode["cached_compiled"].append(cached(compiled))
            decode["rollout_compiled"].append(ours_batched(compiled))
    med = {k: statistics.median(v) for k, v in {**{f"train_{k}": v for k, v in train.items()},
                                                **{f"decode_{k}": v for k, v in decode.items()}}.items()}
    for name in train:
        print(f"train {name:>18}: {med[f'train_{name}']:>9,.0f} tokens/s")
    for name in decode:
        print(f"decode {name:>17}: {med[f'decode_{name}']:>9,.0f} tokens/s")

    non_embedding = sum(p.numel() for n, p in ours.named_parameters() if "wte" not in n)
    per_token = flops_per_token(non_embedding, args.layers, args.width, args.block, args.vocab)
    result = {
        "config": f"{args.layers}x{args.width}, heads {args.heads}, vocab {args.vocab}, batch {args.batch}x{args.block}",
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": round(peak["fp32"], 1),
        "matmul_peak_gflops_bf16": round(peak["bf16"], 1),
        "cpu_model": host["cpu_model"],
        "cores": host["cores"],
        "bf16_flags": {k: host[k] for k in ("avx512_bf16", "amx_bf16", "onednn_bf16")},
        "decisions": decision.as_dict(),
        "train_tokens_per_sec": round(med["train_ours"]),
        # against the peak of the math actually used (bf16 matmul peak when bf16 was chosen)
        "train_mfu": round(med["train_ours"] * per_token / (peak["bf16" if "bf16" in math else "fp32"] * 1e9), 4),
        "train_mfu_vs_fp32_peak": round(med["train_ours"] * per_token / (peak["fp32"] * 1e9), 4),
        "train_tokens_per_sec_fp32_eager": round(med["train_ours_fp32_eager"]),
        "train_ratio_vs_fp32_eager": round(med["train_ours"] / med["train_ours_fp32_eager"], 3),
        "train_tokens_per_sec_bf16": round(med["train_ours_bf16"]) if "train_ours_bf16" in med else None,
        "train_bf16_speedup": round(med["train_ours_bf16"] / med["train_ours_fp32_eager"], 3)
        if "train_ours_bf16" in med else None,
        "gpt2_train_tokens_per_sec": round(med["train_gpt2"]),
        "gpt2_same_choices_train_tokens_per_sec": round(med["train_gpt2_same_choices"]),
        "train_ratio_vs_gpt2": round(med["train_ours"] / med["train_gpt2"], 3),
        "train_ratio_vs_gpt2_same_choices": round(med["train_ours"] / med["train_gpt2_same_choices"], 3),
        "decode_new_tokens": args.new_tokens,
        "decode_tokens_per_sec_cached": round(med["decode_cached"], 1),
        "decode_tokens_per_sec_uncached": round(med["decode_uncached"], 1),
        "decode_cache_ratio": round(med["decode_cached"] / med["decode_uncached"], 3),
        "gpt2_generate_tokens_per_sec": round(med["decode_gpt2"], 1),
        "decode_ratio_vs_gpt2": round(med["decode_cached"] / med["decode_gpt2"], 3),
        "rollout_shape": f"{args.rollout_prompts} prompts x {args.rollout_tokens} new tokens",
        "rollout_tokens_per_sec": round(med["decode_rollout"], 1),
        "gpt2_rollout_tokens_per_sec": round(med["decode_rollout_gpt2"], 1),
        "rollout_ratio_vs_gpt2": round(med["decode_rollout"] / med["decode_rollout_gpt2"], 3),
        # PPO's rollouts sample at temperature 1 from the whole distribution: the same shape, sampled
        "rollout_sampled_tokens_per_sec": round(med["decode_rollout_sampled"], 1),
        "gpt2_rollout_sampled_tokens_per_sec": round(med["decode_rollout_sampled_gpt2"], 1),
        "rollout_sampled_ratio_vs_gpt2": round(med["decode_rollout_sampled"] / med["decode_rollout_sampled_gpt2"], 3),
    }
    if compiled is not None:
        result.update({
            "decode_compile_seconds": round(compile_seconds, 1),
            "decode_compiled_attention": decode_choice,
            "decode_tokens_per_sec_compiled": round(med["decode_cached_compiled"], 1),
            "decode_compiled_ratio_vs_eager": round(med["decode_cached_compiled"] / med["decode_cached"], 3),
            "decode_compiled_ratio_vs_gpt2": round(med["decode_cached_compiled"] / med["decode_gpt2"], 3),
            "rollout_tokens_per_sec_compiled": round(med["decode_rollout_compiled"], 1),
            "rollout_compiled_ratio_vs_eager": round(med["decode_rollout_compiled"] / med["decode_rollout"], 3),
            "rollout_compiled_ratio_vs_gpt2": round(med["decode_rollout_compiled"] / med["decode_rollout_gpt2"], 3),
        })
    if args.run:
        real = run_rollout_rates(args.run, args.rollout_prompts, args.rollout_tokens, args.repeats)
        if real is None:
            print(f"run rollouts: {args.run} has no finished SFT model and data; skipped")
        else:
            result.update(real)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
