"""The GPT: a decoder-only Transformer, written top to bottom like a figure in a paper.

    tokens ─► embedding ─► [ Block: x + Attention(RMSNorm(x)),  x + MLP(RMSNorm(x)) ] × n_layer
           ─► RMSNorm ─► LM head (tied to the embedding)            (MiniGPTForCausalLM)
                     └─► score head at the last real token          (MiniGPTForSequenceClassification)

Positions are rotary (RoPE) and come from `position_ids`: a left-padded row simply starts counting
at its first real token, and packed sequences restart at 0, so padding and packing need no learned
table and no special casing beyond the attention mask. Attention is `scaled_dot_product_attention`.

It is a first-class Transformers model (config, backbone, causal LM, sequence classification,
registered with the Auto classes): `AutoModelForCausalLM.from_pretrained(dir)` works after
`import minigpt`, and TRL, PEFT and accelerate treat it like any other model.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,
                          AutoModelForSequenceClassification, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)


class MiniGPTConfig(PretrainedConfig):
    model_type = "minigpt"
    # Our classes are registered with the Auto classes, not shipped as Hub remote code, so there is no
    # `auto_map`; TRL (GRPOTrainer's reference model, `create_model_from_path`) reads it anyway for any
    # architecture that transformers does not define. An empty, read-only class attribute answers
    # "no remote code" to both TRL and transformers and is never written to config.json.
    auto_map = MappingProxyType({})
    # The standard names, so libraries that look for `hidden_size` & co. find ours.
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size=2048, n_layer=4, n_head=4, n_embd=192, block_size=256,
                 dropout=0.0, rope_theta=10000.0, initializer_range=0.02,
                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.block_size = block_size
        self.dropout = dropout
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        kwargs.setdefault("num_labels", 1)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rotate(x, cos, sin):
    """Apply RoPE: rotate each (even, odd) half-pair of channels by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.residual_out = True
        self.dropout = config.dropout
        self.config = config  # its `_attn_implementation` picks the kernel at every call

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, T, hd)
        q, k = rotate(qkv[:2], cos, sin)  # queries and keys in one go: half the small ops per layer
        v = qkv[2]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, past + T, hd)
        # mask is None: plain causal (or a single new token that may see everything before it)
        is_causal = mask is None and T > 1
        attend = explicit_attention if self.config._attn_implementation == "eager" else F.scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def explicit_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    """softmax(q kᵀ / √d + mask) v written out: SDPA's arithmetic in plain matmuls (`attn_implementation="eager"`).

    On a CPU, for short sequences and small heads, this is faster than SDPA's fused kernel (its backward
    above all: heads of 256 tokens x 48 channels ran 1.5x, of 64 x 32 3x faster here), and under torch.compile
    the mask and softmax fuse into one loop. It holds a (T x T) score matrix per head, so long sequences
    on a GPU want SDPA: `speed.choose_speed` times both and keeps the faster.
    """
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, nh, T, S)
    if is_causal:  # the queries are the last T of S positions
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.float().softmax(-1).to(q.dtype)  # in fp32, as SDPA accumulates it, whatever the dtype
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


GELU_SIGMOID_SCALE = 2 * math.sqrt(2 / math.pi)


def gelu(x):
    """GPT-2's GELU, the tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

    Inside a `torch.compile`d graph it is written with a sigmoid instead, the same function (0.5·(1 + tanh z)
    = σ(2z); 5e-7 apart in fp32): the compiler's vectorised tanh is slow on CPUs, and the sigmoid form made a
    compiled training step 1.07x faster at the bench's size and 1.04x at the cpu preset's (a 2-core Xeon).
    Eagerly, torch's one-kernel tanh GELU is the faster (the sigmoid form is five kernels: 2.3x slower)."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_SIGMOID_SCALE * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.proj.residual_out = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(gelu(self.fc(x))))


class Block(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.norm_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, cache)
        x = x + self.mlp(self.norm_2(x))
        return x


class MiniGPTPreTrainedModel(PreTrainedModel):
    config_class = MiniGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # GPT-2's scaled init: each residual branch's output projection shrinks with depth.
            if getattr(module, "residual_out", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MiniGPTModel):
            init.copy_(module.inv_freq, module.rope_frequencies(self.config))


class MiniGPTModel(MiniGPTPreTrainedModel):
    """The backbone: embeddings, blocks, final norm. Returns hidden states (B, T, C)."""

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd)
        self.register_buffer("inv_freq", self.rope_frequencies(config), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    @staticmethod
    def rope_frequencies(config):
        head_dim = config.n_embd // config.n_head
        return 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def rope(self, position_ids, dtype):
        """cos and sin of every position's rotation angles, (B, 1, T, head_dim/2) each."""
        angles = position_ids[:, None, :, None].float() * self.inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, inputs_embeds=None, **kwargs):
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        if use_cache and cache is None:
            from transformers import DynamicCache
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        # Only positions a caller gives can restart inside a row (packing); derived ones never do, and
        # not looking spares a data-dependent check that would split a torch.compile'd graph in two.
        may_be_packed = position_ids is not None
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, x.device)
        mask = attention_mask_4d(attention_mask, position_ids, past, T, may_be_packed)
        cos, sin = self.rope(position_ids, x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm_f(x),
                                       cache=cache if use_cache else None)


def positions_from_mask(attention_mask, past: int, T: int, device):
    """Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).unsqueeze(0)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]


def attention_mask_4d(attention_mask, position_ids, past: int, T: int, may_be_packed: bool = True):
    """The boolean mask (B, 1, T, past+T) for SDPA, or None when plain causal attention will do.

    Three cases need a mask: left padding (attention_mask has zeros before real tokens), packed sequences (position_ids
    restart at 0 inside a row: attention stays within each sequence) and a chunk of several new
    tokens after a cache. Every query may always see itself, so no row is fully masked (which would
    give NaN that leaks into later layers through the values of padding tokens).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding only: causal attention already keeps real tokens from seeing the pads after
        # them, and what pads compute is never used. Plain causal attention is the fast kernel.
        padded = False
    packed = (may_be_packed and attention_mask is None and past == 0 and T > 1
              and bool((position_ids[:, 1:] == 0).any()))
    if not padded and not packed and (past == 0 or T == 1):
        return None
    device = position_ids.device
    S = past + T
    query_at = torch.arange(past, S, device=device)[:, None]  # (T, 1) absolute index of each query
    key_at = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (key_at <= query_at)[None, None]  # (1, 1, T, S) causal
    if padded:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if packed:
        segment = (position_ids == 0).cumsum(-1)  # (B, T): which packed sequence each token is in
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    return mask | (key_at == query_at)[None, None]


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, inputs_embeds=None, labels=None, logits_to_keep=0,
                num_items_in_batch=None, targets=None, **kwargs):
        """`labels` as Transformers' causal LMs take them (the input ids; shifted here). `targets`: the next
        token at every input position, already shifted (pretraining's blocks, nanoGPT's `targets`); -100 is
        ignored, and only the loss is returned (`logits` None). Computed inside `forward`, a `torch.compile`d
        model fuses the loss with the head: outside, the log-softmax over the vocabulary and its gradient were
        up to a tenth of a compiled training step (inside: 1.14x a cpu-preset-sized step at the bench's vocabulary
        of 4,096, 1.04x at the preset's 2,048, on a 2-core Xeon; returning the logits as well kept only a fifth
        of that)."""
        out = self.model(input_ids, attention_mask, position_ids, cache, use_cache, inputs_embeds)
        hidden = out.last_hidden_state
        if logits_to_keep:  # generation only needs the last position's logits
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = shifted_cross_entropy(logits, labels, num_items_in_batch)
        elif targets is not None:
            loss = token_cross_entropy(logits, targets)
            logits = None  # an output the compiled graph would have to write out: most of the fusion's gain
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def decode_step(self, input_ids, position_ids, mask, cache):
        """The sampler's inner loop: one new token per row, (B, 1), against a preallocated cache.

        The same blocks as `forward` without its generality (no padding analysis, no output objects):
        `mask` (B, 1, 1, keys) marks the cache slots each row may see (None: all it has filled), and the
        cache writes at a position held in a tensor. Per-token Python and dispatch overhead is most of a
        step at this size. With a static cache every shape is fixed for the whole generation, so
        `torch.compile` turns the step into one graph reused for every token. Returns the logits (B, vocab).
        """
        backbone = self.model
        x = backbone.wte(input_ids)
        cos, sin = backbone.rope(position_ids, x.dtype)
        for block in backbone.blocks:
            x = block(x, cos, sin, mask, cache)
        return self.lm_head(backbone.norm_f(x))[:, -1]


def shifted_cross_entropy(logits, labels, num_items_in_batch=None):
    """Next-token loss from Transformers-style `labels` (the input ids, shifted here)."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], num_items_in_batch)


def token_cross_entropy(logits, targets, num_items_in_batch=None):
    """Cross-entropy of each position's `targets` (aligned with `logits`); targets of -100 are ignored. Summed
    over `num_items_in_batch` when given (the Trainer's way of keeping gradient accumulation exact)."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    targets = targets.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


class MiniGPTForSequenceClassification(MiniGPTPreTrainedModel):
    """Backbone + a linear `score` head read at the last real token: the reward and value models."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MiniGPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, inputs_embeds=None, labels=None, **kwargs):
        out = self.model(input_ids, attention_mask, position_ids, cache, use_cache, inputs_embeds)
        scores = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B, T = scores.shape[:2]
        if attention_mask is not None:  # last real token, for left or right padding alike
            last = (attention_mask.long() * torch.arange(T, device=scores.device)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            is_real = (input_ids != self.config.pad_token_id).long()
            last = (is_real * torch.arange(T, device=scores.device)).argmax(-1)
        else:
            last = torch.full((B,), T - 1, device=scores.device)
        logits = scores[torch.arange(B, device=scores.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = F.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1 \
                else F.cross_entropy(logits, labels)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, cache=out.cache)


AutoConfig.register("minigpt", MiniGPTConfig)
AutoModel.register(MiniGPTConfig, MiniGPTModel)
AutoModelForCausalLM.register(MiniGPTConfig, MiniGPTForCausalLM)
AutoModelForSequenceClassification.register(MiniGPTConfig, MiniGPTForSequenceClassification)
