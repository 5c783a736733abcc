"""Pretraining tokens: documents tokenized once (cached on disk), served as fixed-length blocks.

Batches are drawn from a generator seeded by (seed, step), so the data position of a resumed run
is just its step number, and every process of a multi-process run computes the same global batch
and takes its own slice of it: 1 and N processes see the same data at the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def tokenize_documents(texts: list[str], tokenizer) -> np.ndarray:
    """One stream of ids: <|bos|> before every document."""
    ids = []
    for doc in tokenizer.encode_batch(texts):
        ids.append(tokenizer.bos_id)
        ids.extend(doc)
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    return np.asarray(ids, dtype=dtype)


def cached_tokens(texts_fn, tokenizer, cache_dir: Path, name: str, key: str) -> np.ndarray:
    """Tokens of `texts_fn()`, read from `cache_dir/name.npy` when `key` (data + tokenizer) matches."""
    cache_dir = Path(cache_dir)
    path, meta = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("key") == key:
        log.info("tokens: cached %s (%s)", path, key)
        return np.load(path, mmap_mode="r")
    texts = texts_fn()
    tokens = tokenize_documents(texts, tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.{os.getpid()}.tmp.npy"
    np.save(tmp, tokens)
    os.replace(tmp, path)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    meta.write_text(json.dumps({"key": key, "tokens": int(len(tokens)), "bytes": n_bytes,
                                "documents": len(texts)}))
    log.info("tokens: %s documents -> %s tokens (%s)", len(texts), len(tokens), path)
    return tokens


def cache_key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def token_stats(cache_dir: Path, name: str) -> dict:
    return json.loads((Path(cache_dir) / f"{name}.json").read_text())


class TokenBlocks:
    """Blocks of `block_size + 1` tokens (inputs and next-token targets) from one token stream."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        if len(tokens) < block_size + 2:
            raise ValueError(f"only {len(tokens)} tokens: need more than block_size + 1 = {block_size + 1}; "
                             f"use more data or a smaller block_size")
        self.tokens, self.block_size = tokens, block_size

    def blocks(self, offsets: torch.Tensor):
        """(inputs, targets), each (B, block_size)."""
        rows = [torch.from_numpy(self.tokens[o:o + self.block_size + 1].astype(np.int64)) for o in offsets.tolist()]
        stacked = torch.stack(rows)
        return stacked[:, :-1], stacked[:, 1:]

    def random_offsets(self, step: int, global_batch: int, seed: int) -> torch.Tensor:
        """The global batch of `step`: the same on every process and after a resume."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, len(self.tokens) - self.block_size - 1, (global_batch,), generator=generator)

    def eval_offsets(self, n_blocks: int) -> torch.Tensor:
        """Evenly spaced, fixed blocks: the same validation set at every evaluation."""
        last = len(self.tokens) - self.block_size - 1
        return torch.linspace(0, last, n_blocks).long()
