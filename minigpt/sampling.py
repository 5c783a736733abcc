"""The one sampler: batched, KV-cached, streaming. Used by sample, samples, PPO rollouts, chat, compare.

Prompts of different lengths are left-padded, so every row's next token sits in the last column
and one forward pass per step serves the whole batch. The KV cache is preallocated for the prompt
plus the new tokens, so a step costs one token's worth of compute instead of the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None


class KVCache:
    """Preallocated keys and values for every layer: (B, n_head, max_len, head_dim) each.

    Speaks the part of Transformers' Cache interface the model uses (`update`, `get_seq_length`).
    """

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.length = config.n_layer, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k, v, layer_idx):
        end = self.length + k.size(2)
        self.keys[layer_idx, :, :, self.length:end] = k
        self.values[layer_idx, :, :, self.length:end] = v
        if layer_idx == self.n_layer - 1:
            self.length = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """(input_ids, attention_mask), both (B, T), prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; others -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream(model, prompts: list[list[int]], config: SamplingConfig, stop_ids=(), pad_id: int = 0,
           generator: torch.Generator | None = None):
    """Yield the next token of every row, (B,) per step, until all rows stopped or the budget is spent.

    Rows that already emitted a stop token get `pad_id` from then on.
    """
    model_config = getattr(model, "module", model).config  # through a DDP wrapper; PEFT forwards .config
    device = next(model.parameters()).device
    max_prompt = model_config.block_size - config.max_new_tokens  # keep the newest context
    prompts = [p[-max_prompt:] if max_prompt > 0 and len(p) > max_prompt else p for p in prompts]
    ids, mask = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    padded = not bool(mask.all())
    cache = KVCache(model_config, B, T + config.max_new_tokens, device, next(model.parameters()).dtype)
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_input = ids
    for _ in range(config.max_new_tokens):
        logits = model(input_ids=step_input, attention_mask=mask if padded else None,
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if config.temperature <= 0:
            token = logits.argmax(-1)
        else:
            logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        token = token.masked_fill(done, pad_id)
        yield token
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            return
        step_input = token[:, None]
        if padded:
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, without the stop token
    finished: list[bool]  # the row emitted a stop token (rather than running out of budget)


def generate(model, prompts: list[list[int]], config: SamplingConfig, stop_ids=(), pad_id: int = 0,
             generator=None) -> Generation:
    """Sample continuations of every prompt in one batch."""
    columns = list(stream(model, prompts, config, stop_ids, pad_id, generator))
    stop = set(stop_ids)
    tokens, finished = [], []
    for row in range(len(prompts)):
        out = []
        ended = False
        for column in columns:
            t = int(column[row])
            if t in stop:
                ended = True
                break
            out.append(t)
        tokens.append(out)
        finished.append(ended)
    return Generation(tokens, finished)


def generate_in_batches(model, prompts, config: SamplingConfig, stop_ids=(), pad_id=0, batch_size=64,
                        seed: int | None = None, progress: str | None = None) -> Generation:
    """`generate` over many prompts, `batch_size` at a time, reproducible from `seed`.

    Prompts are sorted by length so each batch needs little padding; results come back in order.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed if seed is not None else 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens, finished = [None] * len(prompts), [False] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        out = generate(model, [prompts[i] for i in batch], config, stop_ids, pad_id, generator)
        for i, toks, fin in zip(batch, out.tokens, out.finished):
            tokens[i], finished[i] = toks, fin
    return Generation(tokens, finished)
