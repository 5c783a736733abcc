"""Sample from a checkpoint: `python -m minigpt.sample --ckpt runs/default/sft --prompt "..."`.

A chat checkpoint (sft, ppo, …) gets the prompt as a user turn and answers as the assistant; a
pretrained checkpoint continues the text. Tokens are printed as they are sampled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt.checkpoint import CheckpointError, load_causal_lm, read_manifest
from minigpt.sampling import SamplingConfig, compile_decoding, stream
from minigpt.settings import ALTERNATIVES
from minigpt.tokenizer import Tokenizer

CHAT_STAGES = ("sft", "ppo", *ALTERNATIVES)  # every stage from SFT on answers in the chat format


def is_chat_checkpoint(path: Path) -> bool:
    stage = read_manifest(path).get("stage", "")
    return any(stage.startswith(s) for s in CHAT_STAGES)


class StreamPrinter:
    """Decodes a growing list of ids and prints only the new text (whole UTF-8 characters)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def add_sampling_arguments(parser, max_new_tokens: int = 100) -> None:
    """The decoding flags every sampling command shares (sample, chat)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step (static KV cache): seconds to tens of seconds to start, then "
                             "faster tokens for one conversation (`make bench`: decode_tokens_per_sec_compiled)")


def load_for_sampling(ckpt: str | Path):
    """(model in eval mode, tokenizer) of a checkpoint folder, with errors that say what is there."""
    path = Path(ckpt)
    try:
        model = load_causal_lm(path).eval()
        tokenizer = Tokenizer.load(path)
    except (CheckpointError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"error: cannot load checkpoint {path}: {error}") from None
    return model, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint folder, e.g. runs/default/sft")
    parser.add_argument("--prompt", default="", help="text to continue, or the user's question for a chat model")
    parser.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                        help="format the prompt as a chat turn (auto: for sft/ppo checkpoints)")
    parser.add_argument("--num-samples", type=int, default=1)
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)

    model, tokenizer = load_for_sampling(args.ckpt)
    if args.compile:
        compile_decoding(model, notify=lambda message: print(message, file=sys.stderr))
    chat = args.chat == "yes" or (args.chat == "auto" and is_chat_checkpoint(Path(args.ckpt)))
    if chat:
        prompt_ids = tokenizer.encode_prompt([{"role": "user", "content": args.prompt}])
        stop = [tokenizer.end_id]
    else:
        prompt_ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
        stop = [tokenizer.bos_id]
    config = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        if not chat:
            print(args.prompt, end="")
        printer = StreamPrinter(tokenizer)
        config.seed = args.seed + i
        for token in stream(model, [prompt_ids], config, stop_ids=stop, pad_id=tokenizer.pad_id):
            if int(token[0]) in stop:
                break
            printer.push(int(token[0]))
        print()


if __name__ == "__main__":
    from minigpt.run import run_main

    run_main(main)
