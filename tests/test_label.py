"""`make label`: parsing an order, scripted sessions, resuming after a kill, and a real terminal with Ctrl-C.

The tool is run as a plain script (`python minigpt/label.py`): it needs only the standard library, and
`python -m minigpt.label` would import torch through the package, seconds per start.
"""

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from minigpt.label import format_order, parse_order

LABEL = Path(__file__).resolve().parents[1] / "minigpt" / "label.py"
RANKED = [
    {"id": "p0", "prompt": [{"role": "user", "content": "Name a fruit."}],
     "responses": ["apple", "", "pear", "a very long answer that never"], "ranks": [0, 2, 0, 1],
     "scores": [0.9, 0.1, 0.9, 0.5], "finished": [True, True, True, False], "policy": "sft", "source": "judge",
     "answer": "apple"},
    {"id": "p1", "prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "Count to three."}],
     "responses": ["1 2 3", "one two", "3 2 1", "1, 2, 3"], "ranks": [0, 2, 3, 1], "scores": [1, .5, .2, .8],
     "policy": "sft", "source": "judge"},
    {"prompt": [{"role": "user", "content": "Say yes."}], "responses": ["yes", "no"], "ranks": [0, 1],
     "policy": "sft", "source": "judge"},  # no id: matched by prompt and responses
]


@pytest.fixture
def runs_root(tmp_path):
    samples = tmp_path / "t" / "samples"
    samples.mkdir(parents=True)
    (samples / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RANKED))
    return tmp_path


def human_records(runs_root):
    path = runs_root / "t" / "samples" / "human.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_label(runs_root, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LABEL), "--run", "t", "--runs-root", str(runs_root), *args],
                          input=script, capture_output=True, text=True, timeout=120)


# ---- parse_order --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, k, ranks", [
    ("2 1 4 3", 4, [1, 0, 3, 2]),
    ("2,1,4,3,", 4, [1, 0, 3, 2]),
    ("2, 1, 4, 3", 4, [1, 0, 3, 2]),
    ("  1 2  ", 2, [0, 1]),
    ("2=1 4 3", 4, [0, 0, 2, 1]),
    ("2 = 1 4=3", 4, [0, 0, 1, 1]),
    ("1=2=3", 3, [0, 0, 0]),
])
def test_parse_order_gives_dense_ranks_best_first_with_ties(text, k, ranks):
    assert parse_order(text, k) == ranks
    assert parse_order(format_order(ranks).replace(">", " "), k) == ranks  # the confirmation reads back


@pytest.mark.parametrize("text, k, message", [
    ("2 1 4", 4, "expected each of 1-4 exactly once (missing 3)"),
    ("2 1 4 3 2", 4, "expected each of 1-4 exactly once (repeated 2)"),
    ("2 2 1", 4, "expected each of 1-4 exactly once (missing 3, 4, repeated 2)"),
    ("2=2 1 3", 3, "(repeated 2)"),
    ("1 5 2 3", 4, "there is no response 5: the responses are 1-4"),
    ("0 1", 2, "there is no response 0"),
    ("1 two", 2, "'two' is not a response number"),
    ("1 -2", 2, "'-2' is not a response number"),
    ("1 ²", 2, "'²' is not a response number"),
    ("2==1", 2, "'=' must join two response numbers"),
    ("=1 2", 2, "'=' must join two response numbers"),
    ("", 3, "expected an order of 1-3, best first, e.g. '1 2 3'"),
])
def test_parse_order_rejects_malformed_orders_with_a_message(text, k, message):
    with pytest.raises(ValueError) as error:
        parse_order(text, k)
    assert message in str(error.value)


# ---- scripted sessions (stdin not a terminal) ---------------------------------------------------------------

def test_each_answer_is_saved_as_a_human_ranking_and_a_rerun_has_nothing_left(runs_root):
    result = run_label(runs_root, "2 1 4 3\n2=1 4 3\n2 1\n")
    assert result.returncode == 0, result.stderr
    assert "prompt 1 of 3 (0 done)" in result.stdout and "prompt 3 of 3 (2 done)" in result.stdout
    assert " 2. (empty)" in result.stdout and "never  [did not end]" in result.stdout
    assert "assistant: Hello!" in result.stdout  # earlier turns are shown
    saved = human_records(runs_root)
    assert [r["ranks"] for r in saved] == [[1, 0, 3, 2], [0, 0, 2, 1], [1, 0]]
    assert [r.get("id") for r in saved] == ["p0", "p1", None]
    for record, source in zip(saved, RANKED):
        assert record["source"] == "human" and "scores" not in record
        assert record["prompt"] == source["prompt"] and record["responses"] == source["responses"]
        assert record["policy"] == "sft"
    again = run_label(runs_root, "")
    assert again.returncode == 0 and "prompt 1 of" not in again.stdout
    assert "3 of 3 prompts ranked (0 skipped)" in again.stdout
    from minigpt.data import load_rankings  # what the reward stage reads with sources=human
    loaded = load_rankings(runs_root / "t" / "samples" / "human.jsonl")
    assert [r["ranks"] for r in loaded] == [r["ranks"] for r in saved]


def test_malformed_order_is_explained_and_asked_again(runs_root):
    result = run_label(runs_root, "2 1 4\n2 2 1 3\nbest\n2 1 4 3\nq\n")
    assert result.returncode == 0
    assert "expected each of 1-4 exactly once (missing 3)" in result.stdout
    assert "expected each of 1-4 exactly once (missing 4, repeated 2)" in result.stdout
    assert "'best' is not a response number" in result.stdout
    assert result.stdout.count("prompt 1 of 3") == 1 and "prompt 2 of 3 (1 done)" in result.stdout
    assert [r["ranks"] for r in human_records(runs_root)] == [[1, 0, 3, 2]]


def test_skip_leaves_a_prompt_for_next_time_and_undo_takes_back_the_last_answer(runs_root):
    result = run_label(runs_root, "u\ns\n1 2 3 4\nu\n4 3 2 1\nq\n")
    assert result.returncode == 0
    assert "nothing to undo" in result.stdout
    assert "undone: removed the answer to prompt 2" in result.stdout
    assert result.stdout.count("prompt 2 of 3") == 2 and "prompt 3 of 3 (1 done)" in result.stdout
    assert [(r["id"], r["ranks"]) for r in human_records(runs_root)] == [("p1", [3, 2, 1, 0])]
    again = run_label(runs_root, "q\n")  # the skipped prompt is offered again
    assert "prompt 1 of 3 (1 done)" in again.stdout


def test_quit_and_end_of_input_exit_0(runs_root):
    for script in ("q\n", "quit\n", ""):
        result = run_label(runs_root, script)
        assert result.returncode == 0 and "Traceback" not in result.stderr
    assert human_records(runs_root) == []


def test_missing_samples_and_a_broken_human_file_are_reported_clearly(runs_root, tmp_path):
    missing = run_label(tmp_path / "no", "")
    assert missing.returncode == 2 and "make samples RUN=t" in missing.stderr and "Traceback" not in missing.stderr
    human = runs_root / "t" / "samples" / "human.jsonl"
    human.write_text(json.dumps({**RANKED[0], "source": "human"}) + "\n{not json\n")
    broken = run_label(runs_root, "")
    assert broken.returncode == 2 and f"{human}, line 2" in broken.stderr and "Traceback" not in broken.stderr


# ---- a real terminal ----------------------------------------------------------------------------------------

def _take_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal, so ^C sends SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background launcher may have set it to ignore


class Terminal:
    """The tool on a pseudo-terminal: what a person at a keyboard sees and sends."""

    def __init__(self, runs_root):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            [sys.executable, str(LABEL), "--run", "t", "--runs-root", str(runs_root)], stdin=slave, stdout=slave,
            stderr=slave, start_new_session=True, preexec_fn=_take_terminal, env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.output, self.seen = "", 0

    def expect(self, text: str, timeout: float = 120) -> None:  # generous: shared, busy cores
        """Wait until `text` appears after what earlier expects consumed."""
        deadline = time.monotonic() + timeout
        while text not in self.output[self.seen:]:
            ready, _, _ = select.select([self.master], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; the terminal shows:\n{self.output}")
            if not self.read():
                raise AssertionError(f"the tool ended before showing {text!r}; the terminal shows:\n{self.output}")
        self.seen = self.output.index(text, self.seen) + len(text)

    def read(self) -> bool:
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: the tool has exited and closed the terminal
            chunk = b""
        self.output += chunk.decode(errors="replace")
        return bool(chunk)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)
        os.close(self.master)


def test_terminal_shows_the_conversation_and_ctrl_c_stops_without_a_traceback(runs_root):
    terminal = Terminal(runs_root)
    try:
        terminal.expect("prompt 1 of 3 (0 done)")
        terminal.expect("user: Name a fruit.")
        for line in (" 1. apple", " 2. (empty)", " 3. pear", " 4. a very long answer that never  [did not end]"):
            terminal.expect(line)
        terminal.expect("best first (h: help)> ")
        # CPython's readline prints the prompt just before it waits: a ^C in between is only seen at the next key.
        # No person is that quick, so give it a moment.
        time.sleep(0.3)
        terminal.send("\x03")
        assert terminal.process.wait(timeout=60) == 130
        while terminal.read():
            pass
        assert "stopped" in terminal.output and "Traceback" not in terminal.output
    finally:
        terminal.close()
    assert human_records(runs_root) == []


def test_a_killed_session_resumes_at_the_next_prompt_with_earlier_answers_kept(runs_root):
    terminal = Terminal(runs_root)
    try:
        terminal.expect("best first (h: help)> ")
        terminal.send("3 1 2 4\r")
        terminal.expect("saved: 3 > 1 > 2 > 4")
        terminal.expect("prompt 2 of 3 (1 done)")
        terminal.expect("best first (h: help)> ")
        terminal.process.send_signal(signal.SIGKILL)  # no chance to clean up: the answer must already be on disk
        assert terminal.process.wait(timeout=60) == -signal.SIGKILL
    finally:
        terminal.close()
    assert [(r["id"], r["ranks"]) for r in human_records(runs_root)] == [("p0", [1, 2, 0, 3])]
    resumed = run_label(runs_root, "1 2 3 4\nq\n")
    assert "prompt 1 of 3" not in resumed.stdout and "prompt 2 of 3 (1 done)" in resumed.stdout
    assert [r["id"] for r in human_records(runs_root)] == ["p0", "p1"]
