"""Rank sampled responses by hand: human rankings for the reward model (`make label`).

    python -m minigpt.label --run default [--runs-root runs] [--source PATH]

Shows each prompt of runs/<RUN>/samples/ranked.jsonl (or --source) with its K numbered responses and
asks for an order, best first: `2 1 4 3`, or with ties `2=1 4 3`. Answers go to
runs/<RUN>/samples/human.jsonl in the same ranking format ({"prompt", "responses", "ranks": 0 = best,
ties equal, "source": "human", ...}) for `make reward ARGS="sources=human"` (or `sources=both`).
Each answer is on disk (appended and fsynced) as soon as it is given, so Ctrl-C or a crash loses
nothing, and starting again continues with the prompts not yet answered.

Only the standard library: no model is needed, and the file also runs as a plain script without
importing torch (which `import minigpt` does), so it starts at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

HELP = """\
Type the response numbers best first, separated by spaces or commas:
  2 1 4 3      2 is best, then 1, then 4; 3 is worst
  2=1 4 3      '=' joins a tie: 2 and 1 tie for best, then 4, then 3
Every response exactly once. Commands:
  s, skip      leave this prompt for now (it is offered again next time)
  u, undo      take back the last saved answer and show that prompt again
  q, quit      stop; every answer given is already saved (Ctrl-D too; Ctrl-C stops at once)
  h, help, ?   this text"""
JUDGE_ONLY = ("ranks", "scores", "source")  # the judge's verdict is never copied into a human record


def parse_order(text: str, k: int) -> list[int]:
    """'2=1 4 3' with k=4 -> ranks [0, 0, 2, 1]: ranks[i] of response i+1, 0 = best, ties equal (dense)."""
    groups = [group for group in re.split(r"[\s,]+", re.sub(r"\s*=\s*", "=", text)) if group]
    if not groups:
        raise ValueError(f"expected an order of 1-{k}, best first, e.g. '{' '.join(map(str, range(1, k + 1)))}'")
    ranks: list[int | None] = [None] * k
    repeated = []
    for rank, group in enumerate(groups):
        for token in group.split("="):
            if not token:
                raise ValueError(f"'{group}': '=' must join two response numbers, as in 2=1")
            if not re.fullmatch(r"[0-9]+", token):
                raise ValueError(f"'{token}' is not a response number: expected numbers 1-{k} (h for help)")
            number = int(token)
            if not 1 <= number <= k:
                raise ValueError(f"there is no response {number}: the responses are 1-{k}")
            if ranks[number - 1] is not None:
                repeated.append(number)
            ranks[number - 1] = rank
    missing = [i + 1 for i, rank in enumerate(ranks) if rank is None]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(map(str, missing))}")
    if repeated:
        problems.append(f"repeated {', '.join(map(str, sorted(set(repeated))))}")
    if problems:
        raise ValueError(f"expected each of 1-{k} exactly once ({', '.join(problems)})")
    return ranks


def format_order(ranks: list[int]) -> str:
    """The inverse of parse_order, for the confirmation: [0, 0, 2, 1] -> '1=2 > 4 > 3'."""
    return " > ".join("=".join(str(i + 1) for i, r in enumerate(ranks) if r == rank) for rank in sorted(set(ranks)))


def prompt_key(record: dict) -> str:
    """Which prompt a record ranks: its id, or else its prompt and responses."""
    if record.get("id") is not None:
        return f"id {record['id']}"
    return json.dumps([record["prompt"], record["responses"]], sort_keys=True)


def read_records(path: Path, needs: tuple[str, ...]) -> list[dict]:
    """The JSON lines of `path`; SystemExit naming the file and line when one is not a ranking record."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: {path}, line {number}: not valid JSON ({error}); fix or delete that line")
        absent = [field for field in needs if not isinstance(record, dict) or field not in record]
        if absent:
            raise SystemExit(f"error: {path}, line {number}: a ranking record needs the field(s) {', '.join(absent)}; "
                             f"fix or delete that line")
        responses = record["responses"]
        if not (isinstance(responses, list) and len(responses) >= 2 and all(isinstance(r, str) for r in responses)):
            raise SystemExit(f"error: {path}, line {number}: 'responses' should be a list of two or more strings")
        records.append(record)
    return records


def append_answer(path: Path, record: dict) -> None:
    """Add one answer and force it to disk, so Ctrl-C, a crash or a power cut after this loses nothing."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove_last_answer(path: Path) -> dict | None:
    """Drop the last answer (rewriting the file atomically: temporary file, then rename); return it."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    if not lines:
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return json.loads(lines[-1])


def show(record: dict, position: int, total: int, done: int) -> None:
    """The conversation so far, then the numbered responses (marking empty ones and ones cut off)."""
    heading = f"prompt {position} of {total} ({done} done)" + (f" · {record['id']}" if "id" in record else "")
    print(f"\n──── {heading} ────")
    turns = record["prompt"] if isinstance(record["prompt"], list) else [{"role": "user", "content": record["prompt"]}]
    for turn in turns:
        print(f"{turn.get('role', 'user')}: " + str(turn.get("content", "")).replace("\n", "\n    "))
    print()
    finished = record.get("finished") or []  # the samples stage's flags: did the response reach end of turn
    for number, response in enumerate(record["responses"], 1):
        text = response.strip().replace("\n", "\n    ") or "(empty)"
        cut_off = number <= len(finished) and finished[number - 1] is False
        print(f"{number:>2}. {text}" + ("  [did not end]" if cut_off else ""))


def label(rankings: list[dict], human_path: Path) -> None:
    """Ask for an order for every prompt not yet in human.jsonl; returns on quit, end of input or when all are done."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    keys = [prompt_key(r) for r in rankings]
    answered = {prompt_key(r) for r in read_records(human_path, ("prompt", "responses", "ranks"))} \
        if human_path.exists() else set()
    skipped, shown_first = set(), None
    while True:
        pending = [i for i, key in enumerate(keys) if key not in answered and key not in skipped]
        if not pending:
            print(f"\n{len(rankings) - len(skipped)} of {len(rankings)} prompts ranked ({len(skipped)} skipped) "
                  f"-> {human_path}")
            return
        index = shown_first if shown_first in pending else pending[0]
        record, k = rankings[index], len(rankings[index]["responses"])
        show(record, index + 1, len(rankings), sum(key in answered for key in keys))
        while True:
            try:
                answer = input(f"order of 1-{k}, best first (h: help)> ").strip()
            except EOFError:  # Ctrl-D, or the end of a script: like quit
                print()
                return
            if not interactive:
                print(answer)  # a scripted session's transcript then reads like a typed one
            command = answer.lower()
            if command in ("q", "quit"):
                print(f"stopped: every answer given is saved in {human_path}")
                return
            if command in ("h", "help", "?"):
                print(HELP)
                continue
            if command in ("s", "skip"):
                skipped.add(keys[index])
                break
            if command in ("u", "undo"):
                undone = remove_last_answer(human_path) if human_path.exists() else None
                if undone is None:
                    print("nothing to undo")
                    continue
                answered.discard(prompt_key(undone))
                if prompt_key(undone) in keys:
                    shown_first = keys.index(prompt_key(undone))
                    print(f"undone: removed the answer to prompt {shown_first + 1}; here it is again")
                else:
                    print(f"undone: removed the last answer in {human_path} (its prompt is not in this source)")
                break
            try:
                ranks = parse_order(answer, k)
            except ValueError as error:
                print(f"  {error}")
                continue
            human = {field: value for field, value in record.items() if field not in JUDGE_ONLY}
            append_answer(human_path, {**human, "ranks": ranks, "source": "human"})
            answered.add(keys[index])
            print(f"saved: {format_order(ranks)}")
            break


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt.label", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=os.environ.get("RUN", "default"))
    parser.add_argument("--runs-root", default=os.environ.get("RUNS_ROOT", "runs"))
    parser.add_argument("--source", default="", help="rankings to label (default runs/<RUN>/samples/ranked.jsonl)")
    args = parser.parse_args(argv)
    samples = Path(args.runs_root) / args.run / "samples"
    source = Path(args.source) if args.source else samples / "ranked.jsonl"
    if not source.is_file():
        hint = f"run `make samples RUN={args.run}` first" if not args.source else "check the --source path"
        raise SystemExit(f"error: {source} not found: nothing to label; {hint}")
    rankings = read_records(source, ("prompt", "responses"))
    if not rankings:
        raise SystemExit(f"error: {source} has no rankings to label")
    samples.mkdir(parents=True, exist_ok=True)
    human_path = samples / "human.jsonl"
    print(f"ranking {source} -> {human_path} (h: help)")
    try:
        label(rankings, human_path)
    except KeyboardInterrupt:
        print(f"\nstopped: every answer given is saved in {human_path}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from minigpt.run import run_main

    sys.exit(run_main(main))
