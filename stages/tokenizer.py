"""Train the BPE tokenizer on the run's pretraining text → runs/<RUN>/tokenizer/.

    python stages/tokenizer.py --run default --preset cpu [vocab_size=2048]
"""

import logging

from minigpt.config import TokenizerConfig
from minigpt.data import load_texts
from minigpt.run import begin_stage, run_main, write_json_atomic
from minigpt.tokenizer import train_tokenizer

log = logging.getLogger("minigpt.tokenizer")


def main():
    args, config = begin_stage("tokenizer", TokenizerConfig)
    source = args.data or args.run_dir / "data"
    texts = load_texts(source, "train")

    def capped(texts, budget):  # BPE statistics settle long before the corpus ends
        for text in texts:
            if budget <= 0:
                return
            budget -= len(text)
            yield text

    tokenizer = train_tokenizer(capped(texts, config.max_train_chars), config.vocab_size, args.out_dir)
    sample = texts[0][:200]
    ids = tokenizer.encode(sample)
    log.info("sample: %r -> %d tokens: %s", sample[:80], len(ids), [tokenizer.decode([i]) for i in ids[:16]])
    write_json_atomic(args.out_dir / "metrics.json", {
        "vocab_size": tokenizer.vocab_size,
        "source": str(source),
        "chars_per_token_sample": round(len(sample) / max(1, len(ids)), 3),
    })
    print(f"tokenizer: {tokenizer.vocab_size} tokens -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
