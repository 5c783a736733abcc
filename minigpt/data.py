"""Data loading: any source -> the few record formats minigpt's stages consume.

Four loaders, one per kind of stage input:

    load_texts(source, split)      -> ["document", ...]                                        pretraining
    load_dialogues(source, split)  -> [{"messages": [... ending on an assistant turn]}]           SFT
    load_prompts(source, name)     -> [{"messages": [... ending on a user turn], **extras}]       eval / PPO / ranking
    load_rankings(source)          -> [{"prompt": [...], "responses": [str], "ranks": [int], **extras}]   reward model

A *source* is resolved in this order:
  1. a folder holding the stage's own file: pretrain_<split>.jsonl, sft_<split>.jsonl, prompts_<name>.jsonl
     or ranked*.jsonl (the folder the world generator wrote, or a run's samples/ folder) -> that file;
  2. any other local file or folder: .txt, .jsonl, .json, .parquet, .csv (.jsonl/.json may be gzipped);
     a folder means all such files directly inside it;
  3. otherwise `owner/name` or `owner/name:split` (default split: train) is loaded from the Hugging Face Hub,
     which needs network access.
A source of kind 2 or 3 has no validation part of its own, so for split "train"/"val" the loaders hold out
HELD_OUT_FRACTION of its rows deterministically (`split_off`); split=None returns every row.

Rows are recognised by their fields (`detect_format`): plain text, chat `messages`, ShareGPT, Alpaca,
HH-RLHF transcripts, OpenAssistant message trees, preference pairs (TRL conventions) and K-way rankings.
Anything wrong raises `DataError`, whose message names the file, the line or row, the field and what was
expected. These functions only read.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import random
import re
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.05  # of a source's rows held out as "val" when it has no validation part of its own
HELD_OUT_SEED = 0
DATA_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
WORLD_MARKERS = ("pretrain_train.jsonl", "sft_train.jsonl")  # plus any prompts_*.jsonl
END_OF_TEXT = "<|endoftext|>"  # TinyStories' document separator

# Every speaker name seen in common chat datasets -> our three roles.
ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
         "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant",
         "model": "assistant"}

# Each format: its own fields (a converted record drops them and keeps all others as extras) and what
# it looks like (for the error about a row in no known format).
FORMATS = {
    "text": (("text",), "{text}"),
    "messages": (("messages",), "{messages: [{role, content}, ...]}"),
    "sharegpt": (("conversations",), "{conversations: [{from, value}, ...]}"),
    "alpaca": (("instruction", "input", "output"), "{instruction, input (optional), output}"),
    "hh": (("chosen", "rejected"), "{chosen, rejected} as '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts"),
    "oasst_tree": (("prompt",), "{message_tree_id, prompt: {role, text, replies: [...]}}"),
    "preference": (("prompt", "chosen", "rejected"),
                   "{prompt (optional), chosen, rejected} as strings or message lists"),
    "ranking": (("prompt", "responses", "ranks"), "{prompt, responses: [str, ...], ranks: [int, ...]}"),
    "prompt": (("messages", "prompt"), "{messages ending on a user turn} or {prompt}"),
}

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")  # HH-RLHF speaker markers start a line pair


class DataError(ValueError):
    """Input data that cannot be used; the message says where (file, line or row, field) and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Public loaders


def load_records(source: str | Path, split: str | None = None) -> list[dict]:
    """Raw rows of any source: a local file, a folder of data files, or a Hub dataset (`split`, default train)."""
    return [record for _, record in _read_source(source, split)]


def load_texts(source, split: str | None = "train") -> list[str]:
    """Pretraining documents: `text` fields, or .txt files split on <|endoftext|> (else on blank lines)."""
    texts = []
    for where, record in _stage_rows(source, split, f"pretrain_{split or 'train'}.jsonl"):
        format_name = detect_format(record, where)
        if format_name != "text":
            raise DataError(f"{where}: load_texts reads documents ({{'text': ...}} rows or .txt files), but this "
                            f"row is a '{format_name}' record; pass it to the stage that uses that format")
        text = _string(record, "text", where)
        if text.strip():
            texts.append(text)
    return _non_empty(texts, source, split, "documents")


def load_dialogues(source, split: str | None = "train", all_oasst_paths: bool = False) -> list[dict]:
    """SFT dialogues `{"messages": [...]}` with a user and an assistant turn, ending on the assistant.

    OpenAssistant trees give their best path (the best-ranked reply at every turn); `all_oasst_paths=True`
    gives every root-to-leaf path instead. Trailing user turns (ShareGPT often ends on one) are dropped.
    """
    dialogues, trimmed = [], 0
    for where, record in _stage_rows(source, split, f"sft_{split or 'train'}.jsonl"):
        format_name = detect_format(record, where)
        if format_name == "oasst_tree":
            conversations = _oasst_paths(record, where, all_oasst_paths)
        else:
            conversations = [to_messages(record, where)]
        for messages in conversations:
            last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
            if last_assistant < 0 or not any(m["role"] == "user" for m in messages[:last_assistant]):
                raise DataError(f"{where}: a dialogue needs a user turn followed by an assistant turn, got roles "
                                f"{[m['role'] for m in messages]}; prompts without answers belong in load_prompts")
            trimmed += last_assistant < len(messages) - 1
            # extras (kind, quality, …) kept: the few-shot prompt picks good demonstrations by them
            dialogues.append({"messages": messages[:last_assistant + 1], **_extras(record, format_name)})
    if trimmed:
        logger.info("%s: dropped the trailing user turns of %d dialogues", source, trimmed)
    return _non_empty(dialogues, source, split, "dialogues")


def load_prompts(source, name: str = "eval") -> list[dict]:
    """Prompts `{"messages": [... ending on a user turn], **extras}`; a world folder's prompts_<name>.jsonl.

    Any chat record gives the conversation up to its last user turn; an OpenAssistant tree gives its root
    prompt. Fields other than the record's format's own (id, kind, answer, ...) are kept.
    """
    prompts = []
    for where, record in _stage_rows(source, None, f"prompts_{name}.jsonl"):
        format_name = detect_format(record, where)
        if format_name == "oasst_tree":
            root = _oasst_root(record, where)
            messages = [_oasst_turn(root, where)] if root is not None else []
        elif format_name in ("hh", "preference", "ranking"):
            messages = _to_ranking(record, format_name, where)["prompt"]
        else:
            messages = to_messages(record, where)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if last_user < 0:
            if format_name == "oasst_tree":
                continue  # the tree's root was deleted
            raise DataError(f"{where}: a prompt needs a user turn, got roles {[m['role'] for m in messages]}")
        prompts.append({"messages": messages[:last_user + 1], **_extras(record, format_name)})
    return _non_empty(prompts, source, None, "prompts")


def load_rankings(source) -> list[dict]:
    """Ranked responses `{"prompt", "responses", "ranks", **extras}` (0 = best, equal ranks = ties).

    Reads a folder's ranked*.jsonl files, or else the whole source. K-way ranking records are validated;
    preference pairs and HH-RLHF chosen/rejected transcripts give K = 2 (ranks [0, 1]); OpenAssistant trees
    give every prompt with two or more ranked assistant replies.
    """
    rankings = []
    for where, record in _stage_rows(source, None, "ranked*.jsonl"):
        format_name = detect_format(record, where)
        if format_name == "oasst_tree":
            rankings.extend(_oasst_rankings(record, where))
        elif format_name in ("ranking", "hh", "preference"):
            rankings.append(_to_ranking(record, format_name, where))
        else:
            raise DataError(f"{where}: load_rankings needs ranked responses ({FORMATS['ranking'][1]}, "
                            f"{FORMATS['preference'][1]}, HH-RLHF transcripts or OpenAssistant trees), "
                            f"but this row is a '{format_name}' record")
    return _non_empty(rankings, source, None, "rankings")


def split_off(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, val): `fraction` of the items (at least one, if any) chosen by `seed`; order kept."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n_val = round(len(items) * fraction)
    if fraction > 0 and len(items) >= 2:
        n_val = max(1, n_val)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [item for i, item in enumerate(items) if i not in held_out]
    val = [item for i, item in enumerate(items) if i in held_out]
    return train, val


# ----------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(record: dict, where: str = "") -> str:
    """Which format one row is in, recognised by its fields (see FORMATS)."""
    if not isinstance(record, dict):
        raise DataError(f"{_at(where)}expected a record (a JSON object / table row), got {_describe(record)}")

    def has(field):  # rows read through Arrow (parquet, csv, Hub) have None for absent columns
        return record.get(field) is not None

    if has("responses") and has("ranks"):
        return "ranking"
    if has("message_tree_id") or (isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]):
        return "oasst_tree"
    if has("chosen") and has("rejected"):
        if not has("prompt") and _is_hh_transcript(record["chosen"]) and _is_hh_transcript(record["rejected"]):
            return "hh"
        return "preference"
    if has("conversations"):
        return "sharegpt"
    if has("messages"):
        turns = record["messages"]
        last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
        speaker = str(last.get("role", last.get("from", ""))).lower()
        return "prompt" if ROLES.get(speaker) == "user" else "messages"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("prompt"):
        return "prompt"
    if has("text"):
        return "text"
    formats = "\n  ".join(f"{name}: {looks}" for name, (_, looks) in FORMATS.items())
    raise DataError(f"{_at(where)}unknown format: the row has fields {sorted(record)}; expected one of "
                    f"(recognised by their fields):\n  {formats}")


def to_messages(record: dict, where: str = "") -> list[dict]:
    """One record of any chat format -> [{"role", "content"}, ...] with roles system/user/assistant.

    Preference records give the prompt and the chosen reply, rankings the prompt and the best response,
    OpenAssistant trees their best path.
    """
    format_name = detect_format(record, where)
    if format_name in ("messages", "prompt"):
        if record.get("messages") is not None:
            return _turns(record["messages"], where, "messages")
        return _prompt_turns(record["prompt"], where, "prompt")
    if format_name == "sharegpt":
        return _turns(record["conversations"], where, "conversations")
    if format_name == "alpaca":
        return [{"role": "user", "content": _alpaca_instruction(record, where)},
                {"role": "assistant", "content": _string(record, "output", where)}]
    if format_name == "hh":
        return parse_hh_transcript(record["chosen"], where, "chosen")
    if format_name == "preference":
        if record.get("prompt") is None:  # implicit prompt: chosen is the whole conversation
            return _conversation(record["chosen"], where, "chosen")
        prompt = _prompt_turns(record["prompt"], where, "prompt")
        return prompt + [{"role": "assistant", "content": _completion(record["chosen"], prompt, where, "chosen")}]
    if format_name == "ranking":
        ranking = _to_ranking(record, format_name, where)
        best = ranking["ranks"].index(min(ranking["ranks"]))
        return ranking["prompt"] + [{"role": "assistant", "content": ranking["responses"][best]}]
    if format_name == "oasst_tree":
        paths = _oasst_paths(record, where, all_paths=False)
        return paths[0] if paths else []
    hint = (" (it looks like one flat OpenAssistant message: use the tree export, *.trees.jsonl)"
            if "message_id" in record else "")
    raise DataError(f"{_at(where)}this row is plain text ({{'text': ...}}), not a conversation{hint}")


def parse_hh_transcript(transcript, where: str = "", field: str = "text") -> list[dict]:
    """An HH-RLHF transcript '\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages.

    A few HH transcripts have two Assistant turns in a row; they are merged so that roles alternate.
    Text before the first marker, if any, becomes a system turn.
    """
    if not isinstance(transcript, str):
        raise DataError(f"{_at(where)}field '{field}' should be an HH transcript string, got {_describe(transcript)}")
    pieces = HH_TURN.split(transcript)
    preamble, pieces = pieces[0].strip(), pieces[1:]
    if not pieces:
        raise DataError(f"{_at(where)}field '{field}' has no '\\n\\nHuman:' or '\\n\\nAssistant:' turn markers")
    messages = [{"role": "system", "content": preamble}] if preamble else []
    for speaker, content in zip(pieces[0::2], pieces[1::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(part for part in (messages[-1]["content"], content) if part)
        else:
            messages.append({"role": role, "content": content})
    return messages


def _is_hh_transcript(value) -> bool:
    return isinstance(value, str) and ("\n\nHuman:" in value or value.startswith("Human:"))


def _turns(turns, where: str, field: str) -> list[dict]:
    """A list of chat turns ({role, content} or ShareGPT {from, value}) -> normalised messages."""
    if isinstance(turns, str) and turns.lstrip().startswith("["):  # CSV files hold lists as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            pass
    if turns is None:
        raise DataError(f"{_at(where)}field '{field}' is missing; expected a list of turns like "
                        f"{{'role': 'user', 'content': '...'}}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{_at(where)}field '{field}' should be a non-empty list of turns like "
                        f"{{'role': 'user', 'content': '...'}}, got {_describe(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        here = f"{_at(where)}field '{field}[{i}]'"
        if not isinstance(turn, dict):
            raise DataError(f"{here} should be an object with 'role' and 'content', got {_describe(turn)}")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if speaker is None:
            raise DataError(f"{here} has no 'role' (or ShareGPT 'from'); it has fields {sorted(turn)}")
        if not isinstance(speaker, str) or speaker.lower() not in ROLES:
            raise DataError(f"{here} has role {speaker!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{here} should have a string 'content' (or ShareGPT 'value'), got {_describe(content)}")
        messages.append({"role": ROLES[speaker.lower()], "content": content})
    return messages


def _conversation(value, where: str, field: str) -> list[dict]:
    """A whole conversation given as an HH transcript or a message list."""
    if isinstance(value, str):
        if not _is_hh_transcript(value):
            raise DataError(f"{_at(where)}field '{field}' is a plain string, so the prompt it answers is unknown; "
                            f"add a 'prompt' field, or give '{field}' as a message list")
        return parse_hh_transcript(value, where, field)
    return _turns(value, where, field)


def _prompt_turns(value, where: str, field: str) -> list[dict]:
    """A prompt given as a string, an HH transcript or a message list -> messages ending on a user turn."""
    if isinstance(value, str) and _is_hh_transcript(value):
        messages = parse_hh_transcript(value, where, field)
        if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages = messages[:-1]  # the open "\n\nAssistant:" the reply would follow
    elif isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    else:
        messages = _turns(value, where, field)
    if not messages or messages[-1]["role"] != "user":
        ends = f"ends on a {messages[-1]['role']} turn" if messages else "has no turns"
        raise DataError(f"{_at(where)}field '{field}' should end on a user turn (the one to answer), but it {ends}")
    return messages


def _completion(value, prompt: list[dict], where: str, field: str) -> str:
    """The reply in an explicit-prompt preference: a string, or assistant message(s) (optionally after the prompt)."""
    if isinstance(value, str):
        return value.strip()
    messages = _turns(value, where, field)
    if messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]  # chosen/rejected repeated the prompt
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise DataError(f"{_at(where)}field '{field}' should be the assistant's reply to 'prompt' (a string or "
                        f"assistant messages), got roles {[m['role'] for m in messages]}")
    return "\n\n".join(m["content"] for m in messages)


def _alpaca_instruction(record: dict, where: str) -> str:
    instruction = _string(record, "instruction", where)
    extra_input = record.get("input") or ""
    if not isinstance(extra_input, str):
        raise DataError(f"{_at(where)}field 'input' should be a string, got {_describe(extra_input)}")
    return f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction


# ----------------------------------------------------------------------------------------------------------------
# Rankings


def _to_ranking(record: dict, format_name: str, where: str) -> dict:
    """A ranking, preference or HH record -> a validated internal ranking record."""
    if format_name == "ranking":
        ranking = {"prompt": _prompt_turns(record.get("prompt"), where, "prompt"),
                   "responses": record["responses"], "ranks": record["ranks"]}
    elif record.get("prompt") is not None:  # explicit prompt (TRL's standard and conversational formats)
        prompt = _prompt_turns(record["prompt"], where, "prompt")
        ranking = {"prompt": prompt, "responses": [_completion(record[name], prompt, where, name)
                                                   for name in ("chosen", "rejected")], "ranks": [0, 1]}
    else:  # implicit prompt: the turns chosen and rejected share, up to the last shared user turn
        chosen = _conversation(record["chosen"], where, "chosen")
        rejected = _conversation(record["rejected"], where, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        cut = max((i + 1 for i in range(shared) if chosen[i]["role"] == "user"), default=0)
        if cut == 0:
            raise DataError(f"{_at(where)}'chosen' and 'rejected' share no user turn, so the prompt is unknown; "
                            f"add a 'prompt' field")
        responses = []
        for name, conversation in (("chosen", chosen), ("rejected", rejected)):
            reply = conversation[cut:]
            if not reply or any(m["role"] != "assistant" for m in reply):
                raise DataError(f"{_at(where)}'chosen' and 'rejected' should differ only in the final assistant "
                                f"reply, but after their shared prompt '{name}' has roles "
                                f"{[m['role'] for m in reply]}")
            responses.append("\n\n".join(m["content"] for m in reply))
        ranking = {"prompt": chosen[:cut], "responses": responses, "ranks": [0, 1]}
    _check_ranking(ranking, where)
    return {**ranking, **_extras(record, format_name)}


def _check_ranking(ranking: dict, where: str) -> None:
    responses, ranks = ranking["responses"], ranking["ranks"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{_at(where)}field 'responses' should be a list of strings, got {_describe(responses)}")
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                              for r in ranks):
        raise DataError(f"{_at(where)}field 'ranks' should be a list of integers >= 0 (0 = best), "
                        f"got {_describe(ranks)}")
    if len(responses) != len(ranks):
        raise DataError(f"{_at(where)}'responses' has {len(responses)} entries but 'ranks' has {len(ranks)}; "
                        f"ranks[i] is the rank of responses[i], so their lengths must match")
    if len(responses) < 2:
        raise DataError(f"{_at(where)}a ranking needs at least 2 responses, got {len(responses)}")


# ----------------------------------------------------------------------------------------------------------------
# OpenAssistant message trees: {"message_tree_id", "prompt": {role, text, rank, deleted, replies: [...]}}


def _oasst_root(record: dict, where: str) -> dict | None:
    root = record.get("prompt")
    if not isinstance(root, dict):
        raise DataError(f"{_at(where)}field 'prompt' of an OpenAssistant tree should be the root message "
                        f"{{role, text, replies}}, got {_describe(root)}")
    return None if root.get("deleted") else root


def _oasst_replies(message: dict) -> list[dict]:
    return [reply for reply in message.get("replies") or [] if not reply.get("deleted")]


def _oasst_turn(message: dict, where: str) -> dict:
    role, text = ROLES.get(str(message.get("role")).lower()), message.get("text")
    if role not in ("user", "assistant") or not isinstance(text, str):
        raise DataError(f"{_at(where)}OpenAssistant message {message.get('message_id')} should have role 'prompter' "
                        f"or 'assistant' and a string 'text', got role {message.get('role')!r}, "
                        f"text {_describe(text)}")
    return {"role": role, "content": text}


def _oasst_paths(record: dict, where: str, all_paths: bool) -> list[list[dict]]:
    """Root-to-leaf conversations of one tree, cut to end on an assistant turn; deleted messages are skipped.

    Best path: at every turn the reply with the best (lowest) rank; unranked replies come after ranked ones,
    and ties go to the first listed.
    """
    root = _oasst_root(record, where)
    if root is None:
        return []
    paths, seen = [], set()

    def walk(message, path):
        path = path + [_oasst_turn(message, where)]
        replies = _oasst_replies(message)
        if replies:
            best_first = sorted(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))
            for reply in best_first if all_paths else best_first[:1]:
                walk(reply, path)
            return
        while path and path[-1]["role"] != "assistant":
            path = path[:-1]  # a leaf prompter message was never answered
        key = tuple((m["role"], m["content"]) for m in path)
        if path and key not in seen:  # sibling unanswered leaves cut back to the same conversation
            seen.add(key)
            paths.append(path)

    walk(root, [])
    return paths


def _oasst_rankings(record: dict, where: str) -> list[dict]:
    """One K-way ranking per prompter message with at least two ranked (non-deleted) assistant replies."""
    root = _oasst_root(record, where)
    rankings = []

    def walk(message, path):
        path = path + [_oasst_turn(message, where)]
        ranked = [r for r in _oasst_replies(message) if r.get("rank") is not None and r.get("role") == "assistant"]
        if path[-1]["role"] == "user" and len(ranked) >= 2:
            # Deleted siblings leave gaps in the ranks: renumber densely so that 0 is always the best.
            levels = sorted({reply["rank"] for reply in ranked})
            ranking = {"prompt": path, "responses": [_oasst_turn(r, where)["content"] for r in ranked],
                       "ranks": [levels.index(r["rank"]) for r in ranked],
                       "message_tree_id": record.get("message_tree_id"), "message_id": message.get("message_id")}
            _check_ranking(ranking, where)
            rankings.append(ranking)
        for reply in _oasst_replies(message):
            walk(reply, path)

    if root is not None:
        walk(root, [])
    return rankings


# ----------------------------------------------------------------------------------------------------------------
# Reading sources: each row comes with `where` ("file:line" or "file row N") for error messages


def _stage_rows(source, split: str | None, own_files: str) -> list[tuple[str, dict]]:
    """A stage's rows: its own files in a folder (world data, or a run's samples/ beside metrics.jsonl);
    otherwise the whole source, with "train"/"val" split off."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob(own_files))
        if files:
            return [row for file in files for row in _read_file(file)]
        if _is_world_folder(path):
            present = sorted(p.name for p in path.glob("*.jsonl"))
            raise DataError(f"{path} is a world data folder (it has {', '.join(present)}) but has no {own_files}; "
                            f"regenerate the data, or pass a file with --data")
    rows = _read_source(source)
    if split not in ("train", "val"):
        return rows
    train, val = split_off(rows, HELD_OUT_FRACTION, HELD_OUT_SEED)
    logger.info("%s has no validation part of its own: holding out %d of its %d rows as val (seed %d)",
                source, len(val), len(rows), HELD_OUT_SEED)
    return train if split == "train" else val


def _is_world_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in WORLD_MARKERS) or any(path.glob("prompts_*.jsonl"))


def _read_source(source, split: str | None = None) -> list[tuple[str, dict]]:
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES)
                       and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: the folder has no data files (looked for {', '.join(DATA_SUFFIXES)}; "
                            f"sub-folders are not searched)")
        return [row for file in files for row in _read_file(file)]
    if _looks_like_hub_name(str(source)):
        return _read_hub(str(source), split)
    raise DataError(f"{source}: no such file or folder")


def _looks_like_hub_name(name: str) -> bool:
    # "owner/name[:split]", unless it is visibly a local path with a typo: a data file's suffix, or an
    # owner that is a local folder ("runs/demo").
    return (bool(HUB_NAME.match(name)) and not name.lower().endswith(DATA_SUFFIXES)
            and not Path(name.split("/")[0]).is_dir())


def _read_hub(name: str, split: str | None) -> list[tuple[str, dict]]:
    repo, _, named_split = name.partition(":")
    split = split or named_split or "train"
    try:
        dataset = datasets.load_dataset(repo, split=split)
    except Exception as error:  # offline, unknown name, unknown split, ...: all end here
        raise DataError(f"{name}: not a local file or folder, so it was read as a Hugging Face Hub dataset "
                        f"(owner/name[:split]) and loading split '{split}' failed: {_innermost(error)}. "
                        f"The Hub needs network access; offline, pass a local file or folder.") from error
    return _numbered_rows(f"{repo} (split {split})", dataset.to_list())


def _read_file(path: Path) -> list[tuple[str, dict]]:
    name = path.name.lower()
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        if name.endswith((".jsonl", ".jsonl.gz")):
            rows = _read_json_lines(path)
        elif name.endswith((".json", ".json.gz")):
            rows = _read_json(path)
        elif name.endswith(".txt"):
            text = "".join(_load_with_datasets("text", path, sample_by="document", keep_linebreaks=True)["text"])
            rows = [(f"{path} document {i}", {"text": doc}) for i, doc in enumerate(_split_documents(text), 1)]
        elif name.endswith(".csv"):
            # Every cell is text: without string features pandas would read a column of numbers ("007") as ints.
            with open(path, newline="", encoding="utf-8-sig") as file:
                header = next(csv.reader(file), [])
            features = datasets.Features({column: datasets.Value("string") for column in header})
            table = _load_with_datasets("csv", path, features=features, encoding="utf-8-sig")
            rows = _numbered_rows(str(path), table.to_list())
        elif name.endswith(".parquet"):
            rows = _numbered_rows(str(path), _load_with_datasets("parquet", path).to_list())
        else:
            raise DataError(f"{path}: unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}")
    except (OSError, UnicodeDecodeError) as error:  # permissions, a broken link, a corrupt gzip stream, ...
        raise DataError(f"{path}: cannot read the file: {error}") from error
    if not rows:
        raise DataError(f"{path}: the file has no records")
    return rows


def _read_json_lines(path: Path) -> list[tuple[str, dict]]:
    # Parsed here rather than by datasets: errors can name the line, and rows stay exactly as written
    # (Arrow would add None for fields a row lacks, and unify OpenAssistant's nested trees).
    rows = []
    with _open_bytes(path) as lines:  # bytes, decoded line by line, so a decode error names its line too
        for line_number, raw_line in enumerate(lines, 1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8-sig")  # -sig: tolerate a Windows byte-order mark
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text ({error})") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); each line of "
                                f"a JSON Lines file must be one complete JSON object") from error
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object {{...}}, got {_describe(record)}")
            rows.append((where, record))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    """A JSON array of records (Alpaca style), {"<name>": [records]}, one record, or JSON Lines named .json."""
    try:
        with _open_bytes(path) as file:
            text = file.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one value: JSON Lines
            return _read_json_lines(path)
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from error
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list) and value
                 and all(isinstance(item, dict) for item in value)]
        data = lists[0] if len(data) == 1 and lists else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {_describe(data)}")
    for i, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path} row {i}: expected a JSON object {{...}}, got {_describe(record)}")
    return _numbered_rows(str(path), data)


def _load_with_datasets(builder: str, path: Path, **options) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as error:  # datasets wraps the real cause (pandas, Arrow, a decode error) in its own
        if "corresponds to no data" in str(error):
            raise DataError(f"{path}: the file has no records") from error
        raise DataError(f"{path}: cannot read it as {builder}: {_innermost(error)}") from error


def _split_documents(text: str) -> list[str]:
    """TinyStories-style text separates documents with <|endoftext|>; otherwise blank lines do."""
    pieces = text.split(END_OF_TEXT) if END_OF_TEXT in text else re.split(r"\n\s*\n", text)
    return [piece.strip() for piece in pieces if piece.strip()]


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _numbered_rows(name: str, records: list) -> list[tuple[str, dict]]:
    return [(f"{name} row {i}", record) for i, record in enumerate(records, 1)]


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _string(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        got = "nothing (the field is missing)" if field not in record else _describe(value)
        raise DataError(f"{_at(where)}field '{field}' should be a string, got {got}")
    return value


def _extras(record: dict, format_name: str) -> dict:
    """The fields a converted record keeps: all but its format's own (and nulls, which Arrow adds for absent ones)."""
    return {k: v for k, v in record.items() if k not in FORMATS[format_name][0] and v is not None}


def _non_empty(items: list, source, split: str | None, what: str) -> list:
    if not items and split != "val":
        raise DataError(f"{source}: found no {what}")
    return items


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _describe(value) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60] + '...' if len(shown) > 60 else shown}"


def _innermost(error: BaseException) -> str:
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"
