"""The tokenizer: BPE trained here (rustbpe), run by tiktoken, mirrored as a Transformers fast tokenizer.

One source of truth: `ranks.tiktoken` (base64 token bytes and rank, tiktoken's file format) plus
`special_tokens.json` in the tokenizer folder. Ordinary tokens have ids 0..N-1 (their BPE rank);
the special tokens follow. At run time `tiktoken` encodes (fast, no network); the TRL stages get a
`PreTrainedTokenizerFast` built from the same ranks, with a chat template whose assistant part is
marked `{% generation %}` so TRL can compute the loss on assistant tokens only.

Chat layout (one conversation):
    <|bos|><|user|>question<|end|><|assistant|>answer<|end|><|user|>...
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import tiktoken
from transformers.convert_slow_tokenizer import TikTokenConverter

log = logging.getLogger(__name__)

# GPT-4-style split pattern, with numbers split into single digits: small models learn arithmetic
# far more easily when every number is spelled digit by digit (as in nanochat).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS, SYSTEM, USER, ASSISTANT, END, PAD = (
    "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>",
)
SPECIAL_TOKENS = [BOS, SYSTEM, USER, ASSISTANT, END, PAD]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

RANKS_FILE = "ranks.tiktoken"
SPECIALS_FILE = "special_tokens.json"

# The chat template TRL renders. Assistant turns sit inside {% generation %} so that
# `assistant_only_loss=True` masks everything else. Must match `Tokenizer.encode_chat` token for token.
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts, vocab_size: int, out_dir: str | Path) -> "Tokenizer":
    """Train BPE on `texts` (an iterable of str) and save it to `out_dir` (atomically per file)."""
    import rustbpe

    n_ordinary = vocab_size - len(SPECIAL_TOKENS)
    if n_ordinary < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_ordinary, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / RANKS_FILE, "".join(
        f"{base64.b64encode(token).decode()} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])))
    _write_atomic(out_dir / SPECIALS_FILE, json.dumps(
        {"pattern": SPLIT_PATTERN, "special_tokens": SPECIAL_TOKENS}, indent=2))
    tokenizer = Tokenizer.load(out_dir)
    tokenizer.to_transformers().save_pretrained(out_dir)
    log.info("trained BPE: %d tokens (%d special) -> %s", tokenizer.vocab_size, len(SPECIAL_TOKENS), out_dir)
    return tokenizer


class Tokenizer:
    """tiktoken encoding of the saved ranks, plus the chat layout."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, special_tokens: list[str], name="minigpt"):
        self.ranks = ranks
        self.pattern = pattern
        n = len(ranks)
        self.special_ids = {token: n + i for i, token in enumerate(special_tokens)}
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_ids)
        self.bos_id, self.end_id, self.pad_id = (self.special_ids[t] for t in (BOS, END, PAD))
        self.user_id, self.assistant_id = self.special_ids[USER], self.special_ids[ASSISTANT]

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a tokenizer folder or any checkpoint folder that carries the tokenizer files."""
        path = Path(path)
        ranks_path, specials_path = path / RANKS_FILE, path / SPECIALS_FILE
        if not ranks_path.exists() or not specials_path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer here (expected {RANKS_FILE} and {SPECIALS_FILE}); "
                                    f"run `make tokenizer` or point at a checkpoint folder")
        ranks = {}
        # Read the ranks ourselves: tiktoken's loader caches by path, so a tokenizer retrained to the
        # same path would be served stale from its cache.
        for line_number, line in enumerate(ranks_path.read_text().splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{ranks_path}:{line_number}: expected '<base64 token> <rank>'") from None
        specials = json.loads(specials_path.read_text())
        return cls(ranks, specials["pattern"], specials["special_tokens"])

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in `text` are treated as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def decode_without_specials(self, ids) -> str:
        return self.decode([i for i in ids if int(i) < len(self.ranks)])

    def response_text(self, ids) -> str:
        """A generated answer as every reader sees it (judge, reward model, report): specials dropped, stripped."""
        return self.decode_without_specials(ids).strip()

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False):
        """Chat messages to (ids, assistant_mask): the mask is 1 on tokens the assistant wrote."""
        ids, mask = [self.bos_id], [0]
        for message in messages:
            role = message["role"]
            if role not in ROLE_TOKENS:
                raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLE_TOKENS)}")
            body = self.encode(message["content"]) + [self.end_id]
            ids.append(self.special_ids[ROLE_TOKENS[role]])
            mask.append(0)
            ids.extend(body)
            mask.extend([int(role == "assistant")] * len(body))
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation ending in a user turn, followed by the assistant marker: ready to sample."""
        return self.encode_chat(messages, add_generation_prompt=True)[0]

    def to_transformers(self):
        """A `PreTrainedTokenizerFast` with identical ids and the chat template (for TRL)."""
        from transformers import PreTrainedTokenizerFast

        backend = _RanksConverter(self.ranks, pattern=self.pattern,
                                  extra_special_tokens=list(self.special_ids)).converted()
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=BOS, eos_token=END, pad_token=PAD,
            chat_template=CHAT_TEMPLATE, model_max_length=1 << 20, padding_side="left",
        )


def tokenizer_files(path: str | Path) -> list[Path]:
    """Every file of a tokenizer folder (copied into each checkpoint so it is self-contained)."""
    names = [RANKS_FILE, SPECIALS_FILE, "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja"]
    return [Path(path) / n for n in names if (Path(path) / n).exists()]


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _RanksConverter(TikTokenConverter):
    """Transformers' tiktoken converter, fed our ranks instead of a (cached) file."""

    def __init__(self, ranks, **kwargs):
        super().__init__(vocab_file="<in memory>", **kwargs)
        self.ranks = ranks

    def load_tiktoken_bpe(self, _):
        return self.ranks
