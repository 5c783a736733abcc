"""The chat REPL: a real pseudo-terminal session, the scripted modes, the command parser and the
history that makes room in the model's context."""

import fcntl
import json
import io
import os
import pty
import signal
import subprocess
import termios
import threading
import time

import pytest

from conftest import PYTHON, REPO
from minigpt.chat import ChatSession, CommandError, Settings, clean_text, fit_to_context, main, parse_command
from minigpt.tokenizer import Tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}

# Runs the chat with every sampled token delayed, so a Ctrl-C reliably lands mid-answer.
SLOW_CHAT = """
import sys, time
import minigpt.chat as chat
fast_stream = chat.stream
def slow_stream(*args, **kwargs):
    for step in fast_stream(*args, **kwargs):
        time.sleep(0.03)
        yield step
chat.stream = slow_stream
sys.exit(chat.main())
"""


class PtyChat:
    """The chat running on a pseudo-terminal (its controlling terminal, so \\x03 sends SIGINT)."""

    def __init__(self, ckpt):
        self.master, slave = pty.openpty()

        def become_terminal_owner():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background launcher may have set it to ignore

        self.proc = subprocess.Popen([PYTHON, "-c", SLOW_CHAT, "--ckpt", str(ckpt)], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, env=ENV, preexec_fn=become_terminal_owner)
        os.close(slave)
        self.output, self.lock = "", threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            with self.lock:
                self.output += chunk.decode(errors="replace")

    def send(self, text: str):
        data = text.encode()
        while data:  # a big write blocks until the child reads, so go in pieces
            written = os.write(self.master, data[:4096])
            data = data[written:]

    def expect(self, needle: str, since: int = 0, timeout: float = 120.0) -> int:  # generous: shared, busy cores
        """Wait until `needle` appears after position `since`; return the position just past it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                at = self.output.find(needle, since)
            if at >= 0:
                return at + len(needle)
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} did not appear (exit {self.proc.poll()}); output after {since}:\n"
                             f"{self.output[since:][-3000:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_interactive_session_on_a_terminal(tiny_sft):
    chat = PtyChat(tiny_sft)
    try:
        at = chat.expect("you: ", timeout=180)
        chat.send("/max 8\r")
        at = chat.expect("you: ", chat.expect("(max new tokens = 8)", at))
        chat.send("Who is Ada?\r")
        at = chat.expect("sft: ", at)
        end = chat.expect("you: ", at)
        answer = chat.output[at:end - len("you: ")]
        assert answer.split("(answer cut")[0].strip(), "no answer text after the prompt"

        chat.send("/temp 0\r")
        at = chat.expect("(temperature = 0.0)", at)
        chat.send("/stage pretrain\r")
        at = chat.expect("(now chatting with pretrain", at)
        chat.send("/help\r")
        at = chat.expect("[now 0.0]", at)
        at = chat.expect("[now pretrain;", at)
        at = chat.expect("you: ", at)

        # Ctrl-C at the prompt drops the typed line: the next Enter sends only what follows.
        chat.send("half a question\x03")
        at = chat.expect("you: ", at)  # typing on before that would be flushed with the line
        chat.send("/topk\r")
        at = chat.expect("top k = 50", at)
        at = chat.expect("you: ", at)

        # Ctrl-C mid-answer: the base model never writes <|end|>, so the answer runs to /max.
        chat.send("/max 100\r")
        at = chat.expect("you: ", chat.expect("(max new tokens = 100)", at))
        chat.send("Once upon a time\r")
        at = chat.expect("pretrain: ", at)
        time.sleep(0.5)
        chat.send("\x03")
        at = chat.expect("(interrupted; this turn is not kept in the history)", at)
        at = chat.expect("you: ", at)
        assert chat.proc.poll() is None

        # A 100 KB line is cut to what fits, with a notice.
        chat.send("/max 4\r")
        at = chat.expect("you: ", chat.expect("(max new tokens = 4)", at))
        chat.send("word " * 20_000 + "\r")
        at = chat.expect("(message too long", at, timeout=60)
        at = chat.expect("you: ", at, timeout=60)

        chat.send("/quit\r")
        assert chat.proc.wait(timeout=30) == 0
    finally:
        chat.close()


def test_one_shot_prompt_prints_an_answer(tiny_sft):
    result = subprocess.run([PYTHON, "-m", "minigpt.chat", "--ckpt", str(tiny_sft), "--prompt", "Who is Ada?",
                             "--max-new-tokens", "12"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # Library warnings the user can do nothing about (e.g. deprecated cache argument names) stay out.
    warnings = [line for line in (result.stdout + result.stderr).splitlines()
                if "warn" in line.lower() or "deprecat" in line.lower()]
    assert not warnings, warnings


def test_compiled_decoding_gives_the_same_greedy_answer(tiny_sft, capsys):
    answers = []
    for extra in ([], ["--compile"]):
        assert main(["--ckpt", str(tiny_sft), "--prompt", "Who is Ada?", "--max-new-tokens", "12",
                     "--temperature", "0", *extra]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0].strip() and answers[0] == answers[1]


def test_piped_stdin_answers_every_line_and_keeps_notices_off_stdout(tiny_sft, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Who is Ada?\n\n/temp 0\nWhat is 2 plus 3?\n/nonsense\n"))
    assert main(["--ckpt", str(tiny_sft), "--max-new-tokens", "12", "--temperature", "1.5"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and out.count("\n") >= 2  # each answer ends its line
    assert "(temperature = 0.0)" in err and "unknown command /nonsense" in err
    assert "you:" not in out and "temperature" not in out


def test_missing_checkpoint_exits_2_naming_the_path_and_the_stages(tiny_sft, tmp_path, capsys):
    run = tmp_path / "run"  # a run of its own: other tests add stages to the shared tiny run
    run.mkdir()
    for stage in ("pretrain", "sft"):
        (run / stage).symlink_to(tiny_sft.parent / stage, target_is_directory=True)
    missing = run / "ppo"
    assert main(["--ckpt", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such checkpoint folder" in err
    assert "stages present: pretrain, sft" in err


@pytest.mark.parametrize("line, expected", [
    ("/temp 0.5", ("temp", 0.5)), ("/TEMP 0", ("temp", 0.0)), ("/topk 40", ("topk", 40)),
    ("/topp 0.9", ("topp", 0.9)), ("/max 64", ("max", 64)), ("/seed 7", ("seed", 7)),
    ("/stage sft", ("stage", "sft")), ("/reset", ("reset", None)), ("/help", ("help", None)),
    ("/quit", ("quit", None)), ("/temp", ("temp", None)),
])
def test_parse_command_reads_each_command(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize("line, message", [
    ("/temp abc", "expected a number ≥ 0"), ("/temp -1", "expected a number ≥ 0"),
    ("/temp nan", "expected a number ≥ 0"), ("/topk 2.5", "expected a whole number ≥ 0"),
    ("/topp 1.5", "expected a number from 0 to 1"), ("/max 0", "expected a whole number ≥ 1"),
    ("/reset now", "/reset takes no argument"), ("/bogus", "unknown command /bogus; /help"),
])
def test_parse_command_explains_bad_input(line, message):
    with pytest.raises(CommandError, match=message.replace("/", ".")):
        parse_command(line)


def test_fit_to_context_drops_oldest_turns_first(tiny_sft):
    tokenizer = Tokenizer.load(tiny_sft)
    history = []
    for turn in range(4):
        history += [{"role": "user", "content": f"question {turn} " * 3},
                    {"role": "assistant", "content": f"answer {turn} " * 3}]
    full = len(tokenizer.encode_prompt(history + [{"role": "user", "content": "new"}]))
    kept, text, notices = fit_to_context(tokenizer, history, "new", budget=full - 1)
    assert kept == history[2:] and text == "new"
    assert notices == ["(context full: dropped the oldest 1 turn)"]
    kept, text, notices = fit_to_context(tokenizer, history, "new", budget=full)
    assert kept == history and notices == []


def test_fit_to_context_cuts_a_message_that_alone_is_too_long(tiny_sft):
    tokenizer = Tokenizer.load(tiny_sft)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    kept, text, notices = fit_to_context(tokenizer, history, "déjà vu " * 500, budget=30)
    assert kept == [] and text and ("déjà vu " * 500).startswith(text) and len(notices) == 2
    assert len(tokenizer.encode_prompt([{"role": "user", "content": text}])) <= 30
    assert "message too long" in notices[1]


def test_session_keeps_history_and_strips_control_characters(tiny_sft):
    session = ChatSession(tiny_sft, Settings(max_new_tokens=6), notify=lambda message: None)
    assert clean_text(" a\x00b\x1b[Ac\td\u00e9\n ") == "ab[Ac\td\u00e9"
    tokens = []
    reply = session.reply("Who is Ada?", tokens.append)
    assert session.history == [{"role": "user", "content": "Who is Ada?"},
                               {"role": "assistant", "content": reply.text}]
    assert session.tokenizer.decode(tokens) == reply.text
    session.reset()
    assert session.history == []


@pytest.mark.parametrize("stage, chat", [("sft", True), ("ppo", True), ("dpo", True), ("grpo", True), ("rsft", True),
                                         ("pretrain", False), ("reward", False)])
def test_every_stage_from_sft_on_is_a_chat_checkpoint(tmp_path, stage, chat):
    from minigpt.sample import is_chat_checkpoint

    (tmp_path / "manifest.json").write_text(json.dumps({"stage": stage}))
    assert is_chat_checkpoint(tmp_path) is chat  # so `make sample STAGE=dpo` answers as a dialogue, not plain text
