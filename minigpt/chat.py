"""Chat with a checkpoint: `python -m minigpt.chat --ckpt runs/default/ppo` (or `make chat STAGE=sft`).

Interactive when stdin is a terminal: answers stream as they are sampled, /help lists the commands.
`--prompt "..."` answers once and exits; with stdin piped, every line is a user turn of one
conversation and only the answers go to stdout (notices go to stderr), so the output is scriptable.

Ctrl-C during an answer stops it; the interrupted turn (question and partial answer) is left out of
the history, so the next question follows the last complete exchange.
"""

from __future__ import annotations

import argparse
import math
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.checkpoint import WEIGHTS, CheckpointError, load_causal_lm
from minigpt.sample import CHAT_STAGES, StreamPrinter, add_sampling_arguments, is_chat_checkpoint
from minigpt.sampling import SamplingConfig, compile_decoding, stream
from minigpt.tokenizer import Tokenizer

MIN_PROMPT_TOKENS = 16  # room kept for the conversation when /max is set near the context size


# ---- checkpoints -------------------------------------------------------------------------------

def is_reward_model(folder: Path) -> bool:
    config = folder / "config.json"
    return config.exists() and "ForSequenceClassification" in config.read_text()


def stages_in(run_dir: Path) -> list[str]:
    """Names of the language-model checkpoint folders in `run_dir` (reward models left out)."""
    if not run_dir.is_dir():
        return []
    return [f.name for f in sorted(run_dir.iterdir()) if (f / WEIGHTS).exists() and not is_reward_model(f)]


def describe_stages(run_dir: Path) -> str:
    stages = stages_in(run_dir)
    if stages:
        return f"stages present: {', '.join(stages)}"
    return f"{run_dir} does not exist" if not run_dir.is_dir() else f"no checkpoints in {run_dir} yet"


def load_chat_model(path: Path):
    """(model in eval mode, tokenizer) of a checkpoint folder; CheckpointError says what is there."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder; {describe_stages(path.parent)}")
    if not (path / WEIGHTS).exists() and stages_in(path):
        raise CheckpointError(f"{path} is a run folder, not a stage: pick one, e.g. "
                              f"--ckpt {path / stages_in(path)[-1]} ({describe_stages(path)})")
    if is_reward_model(path):
        raise CheckpointError(f"{path} is a reward model (it scores answers, it cannot write them); "
                              f"{describe_stages(path.parent)}")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would clutter the chat
    try:
        return load_causal_lm(path).eval(), Tokenizer.load(path)
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt or foreign folder: say where, never a traceback
        raise CheckpointError(f"{path}: cannot load the checkpoint ({type(error).__name__}: {error})") from None


# ---- the conversation --------------------------------------------------------------------------

def clean_text(text: str) -> str:
    """Drop control characters (except tab and newline) and unpaired surrogates; trim the ends."""
    return "".join(c for c in text if c in "\t\n" or unicodedata.category(c) not in ("Cc", "Cs")).strip()


def fit_to_context(tokenizer, history: list[dict], user_text: str, budget: int):
    """(kept history, user text, notices) whose rendered prompt fits in `budget` tokens.

    Whole user+assistant pairs are dropped oldest first; a message too long on its own keeps its start.
    """
    def prompt_length(messages, text):
        return len(tokenizer.encode_prompt(messages + [{"role": "user", "content": text}]))

    notices, dropped = [], 0
    while history and prompt_length(history, user_text) > budget:
        history, dropped = history[2:], dropped + 1
    if dropped:
        notices.append(f"(context full: dropped the oldest {dropped} turn{'s' * (dropped > 1)})")
    if prompt_length(history, user_text) > budget:
        ids = tokenizer.encode(user_text)
        keep = max(0, budget - prompt_length(history, ""))
        while keep > 0 and prompt_length(history, tokenizer.decode(ids[:keep]).rstrip("\ufffd")) > budget:
            keep -= 1  # decoding a cut and encoding again can merge differently
        user_text = tokenizer.decode(ids[:keep]).rstrip("\ufffd")
        notices.append(f"(message too long: {len(ids):,} tokens, kept the first {keep} to fit the "
                       f"{budget}-token budget; /max lowers the answer length to leave more)")
    return history, user_text, notices


@dataclass
class Settings:
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 100
    seed: int = 0


@dataclass
class Reply:
    text: str
    finished: bool  # ended with a stop token rather than at the max_new_tokens limit


class ChatSession:
    """A model, its tokenizer, the sampling settings and the conversation so far."""

    def __init__(self, ckpt, settings: Settings, notify=print, compile_decode: bool = False):
        self.settings, self.notify, self.history = settings, notify, []
        self.compile_decode = compile_decode
        self.load(Path(ckpt))
        self.reset()

    def load(self, ckpt: Path):
        self.model, self.tokenizer = load_chat_model(ckpt)
        if self.compile_decode:
            compile_decoding(self.model, notify=self.notify)  # measures the attention kernel too
        self.ckpt, self.is_chat = ckpt, is_chat_checkpoint(ckpt)
        # <|end|> closes the turn; a model that goes on to write the user's next turn is done too.
        self.stop_ids = [self.tokenizer.end_id, self.tokenizer.user_id]
        self.block_size = self.model.config.block_size
        if not self.is_chat:
            self.notify(f"note: {ckpt} was not trained to chat (not one of the stages {', '.join(CHAT_STAGES)}); "
                        "expect rambling")
        if self.settings.max_new_tokens > self.max_allowed:
            self.notify(f"note: max new tokens {self.settings.max_new_tokens} leaves no room for the conversation "
                        f"in this model's {self.block_size}-token context; using {self.max_allowed}")
            self.settings.max_new_tokens = self.max_allowed

    @property
    def max_allowed(self) -> int:
        return max(1, self.block_size - MIN_PROMPT_TOKENS)

    def reset(self):
        """Forget the conversation and restart the random stream, so a conversation replays from its seed."""
        self.history = []
        self.generator = torch.Generator().manual_seed(self.settings.seed)

    def reply(self, user_text: str, on_token) -> Reply:
        """Sample the assistant's answer to `user_text`, calling on_token(id) as each token arrives.

        The history changes only once the answer is complete (an interrupted turn leaves no trace).
        """
        s = self.settings
        history, user_text, notices = fit_to_context(self.tokenizer, self.history, user_text,
                                                     self.block_size - s.max_new_tokens)
        for notice in notices:
            self.notify(notice)
        messages = history + [{"role": "user", "content": user_text}]
        config = SamplingConfig(s.max_new_tokens, s.temperature, s.top_k, s.top_p)
        tokens, finished = [], False
        for step in stream(self.model, [self.tokenizer.encode_prompt(messages)], config, self.stop_ids,
                           self.tokenizer.pad_id, self.generator):
            token = int(step[0])
            if token in self.stop_ids:
                finished = True
                break
            if token < len(self.tokenizer.ranks):  # other special tokens (a stray <|bos|>) are not text
                tokens.append(token)
                on_token(token)
        text = self.tokenizer.decode(tokens)
        self.history = messages + [{"role": "assistant", "content": text}]
        return Reply(text, finished)


# ---- commands ----------------------------------------------------------------------------------

class CommandError(ValueError):
    pass


def _number(low: float, high: float = math.inf, integer: bool = False):
    """An argument parser for a number in [low, high], with the error message people read."""
    kind = "a whole number" if integer else "a number"
    expected = f"expected {kind} ≥ {low:g}" if high == math.inf else f"expected {kind} from {low:g} to {high:g}"

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise CommandError(f"{expected}, got {text!r}") from None
        if not (low <= value <= high) or (not integer and not math.isfinite(value)):
            raise CommandError(f"{expected}, got {text!r}")
        return value
    return parse


# name: (argument, parser, what it does, the Settings field it shows)
COMMANDS = {
    "reset": ("", None, "forget the conversation (and restart the random stream from the seed)", None),
    "temp": ("X", _number(0), "sampling temperature, 0 = always the most likely token", "temperature"),
    "topk": ("N", _number(0, integer=True), "sample among the N most likely tokens, 0 = all", "top_k"),
    "topp": ("X", _number(0, 1), "sample among the most likely tokens holding X of the probability", "top_p"),
    "max": ("N", _number(1, integer=True), "most new tokens per answer", "max_new_tokens"),
    "seed": ("N", _number(0, integer=True), "seed of the random stream (restarts it)", "seed"),
    "stage": ("NAME", str, "switch to another checkpoint of this run, e.g. /stage sft", None),
    "help": ("", None, "this list", None),
    "quit": ("", None, "leave (Ctrl-D too)", None),
}


def parse_command(line: str) -> tuple[str, object]:
    """'/temp 0.5' -> ('temp', 0.5). A bare '/temp' gives ('temp', None): show the value."""
    name, _, argument = line[1:].strip().partition(" ")
    name, argument = name.lower(), argument.strip()
    if name not in COMMANDS:
        raise CommandError(f"unknown command /{name}; /help lists the commands")
    metavar, parse, _, _ = COMMANDS[name]
    if parse is None:
        if argument:
            raise CommandError(f"/{name} takes no argument")
        return name, None
    if not argument:
        return name, None
    try:
        return name, parse(argument)
    except CommandError as error:
        raise CommandError(f"/{name} {metavar}: {error}") from None


def help_text(session: ChatSession) -> str:
    lines = ["commands:"]
    for name, (metavar, _, description, field) in COMMANDS.items():
        now = f"  [now {getattr(session.settings, field)}]" if field else ""
        if name == "stage":
            now = f"  [now {session.ckpt.name}; {describe_stages(session.ckpt.parent)}]"
        usage = f"/{name} {metavar}".strip()
        lines.append(f"  {usage:<12} {description}{now}")
    lines.append(f"conversation: {len(session.history) // 2} turn(s) kept; context {session.block_size} tokens")
    lines.append("Ctrl-C stops an answer (that turn is not kept) or clears the line.")
    return "\n".join(lines)


def run_command(session: ChatSession, name: str, value) -> bool:
    """Apply a parsed command and say what changed; False means quit."""
    say, s = session.notify, session.settings
    field = COMMANDS[name][3]
    if name == "quit":
        return False
    if name == "help":
        say(help_text(session))
    elif name == "reset":
        session.reset()
        say("(conversation cleared)")
    elif value is None and field:
        say(f"{field.replace('_', ' ')} = {getattr(s, field)}  (/{name} {COMMANDS[name][0]} to change)")
    elif value is None and name == "stage":
        say(f"stage {session.ckpt.name} ({session.ckpt}); {describe_stages(session.ckpt.parent)}")
    elif name == "stage":
        try:
            session.load(session.ckpt.parent / value)
        except CheckpointError as error:
            raise CommandError(str(error)) from None
        say(f"(now chatting with {value}: {session.ckpt}; conversation kept, /reset clears it)")
    elif name == "max" and value > session.max_allowed:
        raise CommandError(f"/max N: expected a whole number from 1 to {session.max_allowed} "
                           f"(the model's context is {session.block_size} tokens), got {value}")
    else:
        setattr(s, field, value)
        if name == "seed":
            session.generator.manual_seed(value)
        say(f"({field.replace('_', ' ')} = {value})")
    return True


# ---- the loop ----------------------------------------------------------------------------------

def answer(session: ChatSession, text: str, prefix: str = "") -> None:
    """Print the answer as it is sampled; Ctrl-C (KeyboardInterrupt) propagates to the caller."""
    printer, started = StreamPrinter(session.tokenizer, sys.stdout), False  # the stdout of now, not of import

    def on_token(token: int):
        nonlocal started
        if not started:  # the prefix waits for the first token, so notices print above the answer
            print(prefix, end="")
            started = True
        printer.push(token)

    reply = session.reply(text, on_token)
    print("" if started else prefix, flush=True)
    if not reply.finished:
        session.notify(f"(answer cut: it reached the limit of {session.settings.max_new_tokens} new tokens)")


def repl(session: ChatSession, interactive: bool) -> int:
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"minigpt chat with {session.ckpt}. /help lists the commands; Ctrl-D or /quit leaves.")
    while True:
        try:
            line = input("you: " if interactive else "")
        except EOFError:  # Ctrl-D, or the end of piped input
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            if not interactive:
                raise
            print()
            continue
        text = clean_text(line)
        try:
            if not text:
                continue
            if text.startswith("/"):
                if not run_command(session, *parse_command(text)):
                    return 0
            else:
                answer(session, text, prefix=f"{session.ckpt.name}: " if interactive else "")
        except CommandError as error:
            session.notify(f"error: {error}")
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(interrupted; this turn is not kept in the history)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint folder, e.g. runs/default/ppo")
    parser.add_argument("--prompt", help="answer this one question and exit")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    for stream_ in (sys.stdin, sys.stdout, sys.stderr):  # odd bytes or a narrow locale never crash it
        if hasattr(stream_, "reconfigure"):
            stream_.reconfigure(errors="replace")

    interactive = args.prompt is None and sys.stdin.isatty()
    ui = sys.stdout if interactive else sys.stderr  # keep stdout to answers when scripted
    for option, command, value in (("--temperature", "temp", args.temperature), ("--top-k", "topk", args.top_k),
                                   ("--top-p", "topp", args.top_p), ("--seed", "seed", args.seed),
                                   ("--max-new-tokens", "max", args.max_new_tokens)):
        try:
            COMMANDS[command][1](str(value))  # the same checks as the commands
        except CommandError as error:
            parser.error(f"{option}: {error}")
    settings = Settings(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    try:
        session = ChatSession(args.ckpt, settings, notify=lambda message: print(message, file=ui, flush=True),
                              compile_decode=args.compile)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        text = clean_text(args.prompt)
        if not text:
            parser.error("--prompt is empty")
        try:
            answer(session, text)
        except KeyboardInterrupt:
            return 130
        return 0
    try:
        return repl(session, interactive)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from minigpt.run import run_main

    sys.exit(run_main(main))
