"""The one sampler: batched, KV-cached, streaming. Used by sample, samples, PPO rollouts, chat, compare.

Prompts of different lengths are left-padded, so every row's next token sits in the last column
and one forward pass per step serves the whole batch. The KV cache is preallocated for the prompt
plus the new tokens, so a step costs one token's worth of compute instead of the whole sequence.
Rows that have ended stop costing compute: each time rows emit their stop token, the batch (and its
cache) shrinks to the rows still going.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from minigpt.speed import ATTENTIONS, check_attention, error_summary, measure, pick, set_attention


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None


class KVCache:
    """Preallocated keys and values, per layer: (B, n_head, max_len, head_dim) each.

    Speaks the part of Transformers' Cache interface the model uses (`update`, `get_seq_length`).
    Two ways to fill it: a chunk of tokens (the prompt) goes to the next free slots and attention sees
    the filled part; after `start_decoding`, each single new token is written at `slot`, a tensor, and
    attention reads the filled part again (`next_slot` moves on) or, `static`, the whole buffer behind the
    mask `visible`, so that every decode step has the same shapes (what lets one compiled graph serve every
    token: `advance` moves the slot and the mask inside it).
    """

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        # one tensor per layer: a compiled step then writes its token in place instead of copying the cache
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.n_layer, self.length = config.n_layer, 0
        self.decoding = self.static = self.padded = False
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros((batch_size, max_len), dtype=torch.bool, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k, v, layer_idx):
        if self.decoding:
            keys, values = self.keys[layer_idx], self.values[layer_idx]
            keys.index_copy_(2, self.slot, k.to(keys.dtype))  # under autocast k is bf16
            values.index_copy_(2, self.slot, v.to(values.dtype))
            if self.static:
                return keys, values
            return keys[:, :, :self.length], values[:, :, :self.length]
        end = self.length + k.size(2)
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        if layer_idx == self.n_layer - 1:
            self.length = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def put_rows(self, rows: torch.Tensor, part: "KVCache") -> None:
        """Another cache's filled slots (prompts of these rows, left-padded to their own longest) into these
        rows, ending where this cache's filled part ends: left padding lines every row up on the right."""
        start = self.length - part.length
        for mine, theirs in ((self.keys, part.keys), (self.values, part.values)):
            for layer in range(self.n_layer):
                mine[layer][rows, :, start:self.length] = theirs[layer][:, :, :part.length]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch): a batch whose other rows have ended."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.visible = self.visible.index_select(0, rows)

    def start_decoding(self, attention_mask=None, static: bool = False):
        """From now on one token per step; `attention_mask` (B, length) marks the prompt's real tokens.

        `static`: attention reads the whole buffer behind a mask, so every step has the same shapes (for
        a compiled step); otherwise it reads the filled part, unmasked when no row is padded (eager's
        fastest attention)."""
        self.visible[:, :self.length] = True if attention_mask is None else attention_mask.bool()
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self.decoding, self.static = True, static

    def next_slot(self):
        """The attention mask of the coming token: what each row may see, itself included (None: all)."""
        self.visible[:, self.length] = True
        self.slot.fill_(self.length)
        self.length += 1
        return self.visible[:, None, None, :self.length] if self.padded else None


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """(input_ids, attention_mask), both (B, T), prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits, top_k: int = 0, top_p=1.0):
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; others -inf (0 and 1: off).

    `top_p` may be a 0-d tensor (always applied then), which a compiled step takes as an input: a new top-p
    reuses its graph. `top_k` stays a number: `torch.topk` needs one, and sorting the vocabulary instead costs
    10x (4,096 tokens: 191 us against 17 us)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if torch.is_tensor(top_p) or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def draw(probs, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None):
    """One token per row of `probs` (B, V), by inverse CDF: the first token whose running sum exceeds a
    uniform number. The same distribution as `torch.multinomial(probs, 1)`, which on a CPU draws a random
    number per vocabulary entry and costs ~40x more at the rollout shape (64 x 4096: 6.6 ms vs 0.15 ms,
    most of a sampled decode step). `uniform` (B, 1): the numbers in [0, 1), when the caller drew them."""
    cdf = probs.cumsum(-1)  # float32: monotone under rounding, so a zero-probability token is never found
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = uniform * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the last sum
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def length_groups(lengths: list[int], min_rows: int = 8, shorter_by: float = 0.2) -> list[list[int]]:
    """Row indices in groups of similar length, longest first: a group closes when the next row is more than
    `shorter_by` shorter than the group's longest and the group has `min_rows` rows (each group costs one
    forward pass of fixed overhead)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups = [[order[0]]] if order else []
    for i in order[1:]:
        group = groups[-1]
        if len(group) >= min_rows and lengths[i] < (1 - shorter_by) * lengths[group[0]]:
            groups.append([i])
        else:
            group.append(i)
    return groups


def prefill(model, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, cache: KVCache,
            pad_id: int) -> torch.Tensor:
    """The prompts through the model into `cache` (`ids`, `mask`: `left_pad` of them); each row's last logits (B, V).

    A batch's prompts can differ a lot in length (a PPO step's: 10 to 79 tokens, so one batch padded to 79 is
    63% padding), so they run in groups of similar length, each padded only to its own longest, and land in
    the batch's cache right-aligned as one padded pass would put them: 81 ms instead of 216 ms for a PPO step's
    64 prompts (AMD EPYC). Every row's values are its own prompt's, whichever rows share its pass."""
    groups = length_groups([len(p) for p in prompts])
    if len(groups) == 1:
        return model(input_ids=ids, attention_mask=None if mask.all() else mask, cache=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]
    device = ids.device
    cache.length = ids.shape[1]
    logits = None
    for rows in groups:
        group_ids, group_mask = left_pad([prompts[i] for i in rows], pad_id, device)
        part = KVCache(_unwrapped(model).config, len(rows), group_ids.shape[1], device, cache.keys[0].dtype)
        out = model(input_ids=group_ids, attention_mask=None if group_mask.all() else group_mask, cache=part,
                    use_cache=True, logits_to_keep=1).logits[:, -1]
        index = torch.tensor(rows, device=device)
        cache.put_rows(index, part)
        if logits is None:
            logits = out.new_empty((len(prompts), out.size(-1)))
        logits[index] = out
    return logits


@torch.no_grad()
def stream(model, prompts: list[list[int]], config: SamplingConfig, stop_ids=(), pad_id: int = 0,
           generator: torch.Generator | None = None):
    """Yield the next token of every row, (B,) per step, until all rows stopped or the budget is spent.

    Rows that already emitted a stop token get `pad_id` from then on.
    """
    model_config = _unwrapped(model).config
    device = next(model.parameters()).device
    max_prompt = model_config.block_size - config.max_new_tokens  # keep the newest context
    prompts = [p[-max_prompt:] if max_prompt > 0 and len(p) > max_prompt else p for p in prompts]
    ids, mask = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    step, static = decode_step_of(model)
    length = T + config.max_new_tokens
    cache = KVCache(model_config, B, static_cache_length(length, B, model_config.block_size) if static else length,
                    device, next(model.parameters()).dtype)
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    # the prompts (in groups of similar length); then one token per step
    logits = prefill(model, prompts, ids, mask, cache, pad_id)
    cache.start_decoding(mask, static=static)
    position = mask.sum(-1, keepdim=True)  # a row's next position counts its real tokens
    if static:  # compiled: every row to the end, its shapes are fixed
        yield from _decode_in_one_graph(model, logits, position, cache, config, stop, pad_id, generator)
        return
    # The rows the model still computes (indices into the batch): answers end at very different lengths
    # (the evaluation's: median 8 tokens, longest 48), and a batch would otherwise run every row to its
    # longest; shrinking at every end costs a copy of the cache and halved the evaluation's sampling time.
    done = torch.zeros(B, dtype=torch.bool, device=device)
    live = torch.arange(B, device=device)
    knobs = sampling_knobs(config)
    for i in range(config.max_new_tokens):
        if config.temperature <= 0:
            picked = choose_tokens(logits)
        else:
            # one number per row of the whole batch, so a row draws the same token whether or not the
            # batch has shrunk around it
            uniform = torch.rand((B, 1), generator=generator, device=device)
            picked = choose_tokens(logits, uniform[live], **knobs)
        token = torch.full((B,), pad_id, dtype=torch.long, device=device).index_copy_(0, live, picked)
        token = token.masked_fill(done, pad_id)
        yield token
        done = done | torch.isin(token, stop)
        if bool(done.all()) or i == config.max_new_tokens - 1:
            return
        going = ~done[live]
        if int(going.sum()) < len(live):
            keep = going.nonzero().squeeze(-1)
            live, position = live[keep], position[keep]
            cache.keep_rows(keep)
        logits = step(token[live, None], position, cache.next_slot(), cache)
        position = position + 1


def choose_tokens(logits, uniform=None, temperature=1.0, top_k: int = 0, top_p=1.0):
    """Each row's next token from its last logits (B, V): the argmax when `uniform` is None (temperature 0),
    else the draw `uniform` (B, 1) makes (see `draw`) from the tempered, filtered distribution. `temperature`
    and `top_p` are numbers, or 0-d tensors for a compiled step (a new value then reuses its graph)."""
    logits = logits.float()
    if uniform is None:
        return logits.argmax(-1)
    return draw(filter_logits(logits / temperature, top_k, top_p).softmax(-1), uniform=uniform)


def sampling_knobs(config: SamplingConfig, device=None) -> dict:
    """`choose_tokens`'s keyword arguments for `config`, a filter that is off left out; with a `device`, the
    temperature and top-p as 0-d tensors there, for a compiled step."""
    knobs = {"temperature": config.temperature}
    if config.top_k > 0:
        knobs["top_k"] = config.top_k
    if config.top_p < 1.0:
        knobs["top_p"] = config.top_p
    if device is not None:
        for name in ("temperature", "top_p"):
            if name in knobs:
                knobs[name] = torch.tensor(knobs[name], device=device)
    return knobs


def advance(model, token, position, cache: KVCache, done, uniform, stop, pad_id: int, knobs: dict):
    """A whole decoding step of a static cache, the unit `compile_decoding` compiles (`model`: our causal LM,
    unwrapped): every row's last `token` (B,) into the cache, the next tokens chosen, the rows that emit a stop
    token marked in `done`. `knobs`: `sampling_knobs(config, device)`, the temperature and top-p as tensors.

    The cache's slot and mask, `position` and `done` are updated in place, so every step has the same inputs
    and one graph serves the whole generation. Compiled apart from the model step, these ten small ops (the
    token choice, the stop check, the mask's new slot) cost 20% of a compiled token on a 2-core Xeon."""
    cache.visible.index_fill_(1, cache.slot, True)
    logits = model.decode_step(token[:, None], position, cache.visible[:, None, None, :], cache)
    cache.slot.add_(1)
    position.add_(1)
    token = choose_tokens(logits, uniform, **knobs).masked_fill(done, pad_id)
    done.logical_or_(torch.isin(token, stop))
    return token


def _decode_in_one_graph(model, logits, position, cache: KVCache, config, stop, pad_id, generator):
    """`stream`'s tokens from a static cache, each step one call of the compiled `advance` (every row to the
    end: its shapes are fixed). Chooses the same tokens as the eager loop, from the same random numbers."""
    B = logits.size(0)

    def uniform():  # the draw's numbers, one per row, as the eager loop draws them
        return torch.rand((B, 1), generator=generator, device=logits.device) if config.temperature > 0 else None

    token = choose_tokens(logits, uniform(), **sampling_knobs(config))
    done = torch.isin(token, stop)
    base = _unwrapped(model)
    step, knobs = base._compiled_advance, sampling_knobs(config, logits.device)
    cache.slot.fill_(cache.length)
    for i in range(config.max_new_tokens):
        yield token
        if i == config.max_new_tokens - 1 or bool(done.all()):
            return
        token = step(base, token, position, cache, done, uniform(), stop, pad_id, knobs)
        cache.length += 1


def _unwrapped(model):
    """Our causal LM inside DDP and PEFT wrappers (PEFT's LoRA layers live inside its blocks)."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


class _CompiledOrEager:
    """`advance` through `torch.compile`, and eager for good the first time the compiler fails (no C++
    toolchain, an op it cannot lower: errors surface at a step's first call, before it changes any state):
    that step runs eagerly and the model forgets it was compiled, so later generations take the eager loop."""

    def __init__(self, base, notify):
        self.base, self.notify = base, notify
        self.compiled = torch.compile(advance, dynamic=False)

    def __call__(self, *args):
        try:
            return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 — a compiler can fail in many ways; eager always works
            if getattr(self.base, "_compiled_advance", None) is self:
                del self.base._compiled_advance
                self.notify(f"decoding not compiled ({error_summary(error)}): eager")
            return advance(*args)


def compile_decoding(model, attention: str = "auto", notify=None) -> dict:
    """From now on `stream` runs each decoding step of `model` as one `torch.compile`d graph (`advance`), with
    static cache shapes. Greedy tokens are the same either way.

    `attention` "auto" times both attention kernels compiled, on a one-row generation at the model's whole
    context (chat's and `make sample`'s shape), and keeps the written-out one only when it is measurably faster:
    under compile its mask and softmax fuse into the surrounding loop (1.15x a token for the bench's model on
    a 2-core Xeon), while which kernel wins depends on the CPU and the model (the cpu preset's chose SDPA
    there). The choice holds for the whole model (a prompt's pass too).
    Compiling costs seconds to tens of seconds on a CPU (twice for "auto") and is paid back only over many
    tokens; `make bench` measures both (`decode_compiled`). If the compiler fails, decoding stays eager and
    `notify` (a warning by default) says why. Returns what was chosen and measured, and whether it compiled."""
    if attention != "auto":
        check_attention(attention)
    base = _unwrapped(model)
    base._compiled_advance = _CompiledOrEager(base, notify or (lambda message: warnings.warn(message, stacklevel=4)))
    if attention != "auto":
        set_attention(model, attention)
        return {"attention": attention, "compiled": True}  # a failure shows at the first generation
    attention_before = base.config._attn_implementation
    seconds = time_decoding(model, ATTENTIONS)
    if getattr(base, "_compiled_advance", None) is None:  # the compiler failed: the timings were eager
        set_attention(model, attention_before)
        return {"attention": attention_before, "compiled": False}
    chosen = pick(seconds, "sdpa")
    set_attention(model, chosen)
    choice = {"attention": chosen, "compiled": True,
              "ms_per_token": {k: round(v * 1000, 3) for k, v in seconds.items()}}
    if notify is not None:
        times = ", ".join(f"{k} {v:.3f}" for k, v in choice["ms_per_token"].items())
        notify(f"decoding compiled: {chosen} attention ({times} ms a token)")
    return choice


def time_decoding(model, attentions, tokens: int = 128, repeats: int = 5) -> dict:
    """Seconds a token of a one-row greedy generation at the model's whole context, per attention kernel:
    medians of `repeats` interleaved runs, after one that compiles ({} if compiling failed)."""
    block_size = _unwrapped(model).config.block_size
    prompt = [[0] * min(8, block_size // 2)]
    config = SamplingConfig(max_new_tokens=min(tokens, block_size - len(prompt[0])), temperature=0)

    def run(attention):
        def generation():
            set_attention(model, attention)
            generate(model, prompt, config)
        return generation

    runs = {attention: run(attention) for attention in attentions}
    for generation in runs.values():
        generation()  # compiles
        if not decode_step_of(model)[1]:
            return {}  # the compiler failed: decoding is eager from now on, and there is nothing to choose
    return {attention: seconds / config.max_new_tokens for attention, seconds in measure(runs, repeats).items()}


def static_cache_length(length: int, rows: int, block_size: int, bucket: int = 64) -> int:
    """The cache length a compiled decode step runs at (each new length compiles it once more).

    One row (chat, `make sample`): the whole context, so every turn of a conversation reuses one graph.
    A batch: `length` rounded up to `bucket` tokens. Attention reads every slot of a static cache, and for
    64 short rollouts a whole-context cache is mostly empty slots (compiled ran at 0.5-0.6x eager)."""
    if rows == 1:
        return max(length, block_size)
    return max(length, min(block_size, -(-length // bucket) * bucket))


def decode_step_of(model):
    """(the model's one-token step, whether decoding is compiled: static cache shapes, `advance` in one graph)."""
    base = _unwrapped(model)
    if not hasattr(base, "decode_step"):
        raise TypeError(f"the sampler needs a minigpt causal LM (with decode_step), got {type(base).__name__}")
    return base.decode_step, getattr(base, "_compiled_advance", None) is not None


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, without the stop token
    finished: list[bool]  # the row emitted a stop token (rather than running out of budget)


def generate(model, prompts: list[list[int]], config: SamplingConfig, stop_ids=(), pad_id: int = 0,
             generator=None, keep_stop: bool = False) -> Generation:
    """Sample continuations of every prompt in one batch (`keep_stop`: a row's tokens end with its stop token)."""
    columns = list(stream(model, prompts, config, stop_ids, pad_id, generator))
    # one conversion to Python ints: reading a tensor element by element costs microseconds per token
    rows = torch.stack(columns, 1).tolist() if columns else [[] for _ in prompts]
    stop = set(stop_ids)
    tokens, finished = [], []
    for row in rows:
        out = []
        ended = False
        for t in row:
            if t in stop:
                ended = True
                if keep_stop:
                    out.append(t)
                break
            out.append(t)
        tokens.append(out)
        finished.append(ended)
    return Generation(tokens, finished)


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length: a batch is padded to its longest, and the stages' prompts run
    from a one-line question to a passage, so batching in the given order mostly computes padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_in_batches(model, prompts, config: SamplingConfig, stop_ids=(), pad_id=0, batch_size=64,
                        seed: int | None = None, progress: str | None = None, keep_stop: bool = False) -> Generation:
    """`generate` over many prompts, `batch_size` at a time, reproducible from `seed`.

    Prompts are sorted by length so each batch needs little padding; results come back in order.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed if seed is not None else 0)
    tokens, finished = [None] * len(prompts), [False] * len(prompts)
    batches = batches_by_length([len(p) for p in prompts], batch_size)
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        out = generate(model, [prompts[i] for i in batch], config, stop_ids, pad_id, generator, keep_stop)
        for i, toks, fin in zip(batch, out.tokens, out.finished):
            tokens[i], finished[i] = toks, fin
    return Generation(tokens, finished)
