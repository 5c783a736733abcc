"""The world generator: deterministic, disjoint prompt sets, held-out facts, honest stats."""

import json
import random
import re
import time
from itertools import combinations

import pytest

from minigpt.config import DataConfig, load_config
from minigpt.judge import number_to_words, words
from minigpt.world import (ANIMALS, COLOURS, FACT_QUESTIONS, FEMALE_NAMES, FOODS, JOBS, KIND_MIX, MALE_NAMES,
                           PASSAGE_FEMALE_NAMES, PASSAGE_MALE_NAMES, PASSAGE_PET_NAMES, PASSAGE_PROMPTS, PASSAGE_TOWNS,
                           PET_NAMES, QUALITY_MIX, TOWNS, generate_world, write_passage)

FILES = ["pretrain_train.jsonl", "pretrain_val.jsonl", "sft_train.jsonl", "sft_val.jsonl", "prompts_ranking.jsonl",
         "prompts_ppo.jsonl", "prompts_eval.jsonl", "world.json", "stats.json"]
PROMPT_SETS = ["ranking", "ppo", "eval"]


@pytest.fixture(scope="module")
def config():
    return load_config(DataConfig, "tiny")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, config):
    """Three tiny worlds: seed 0 twice, seed 1 once."""
    root = tmp_path_factory.mktemp("worlds")
    start = time.perf_counter()
    generate_world(root / "a", config, seed=0)
    seconds = time.perf_counter() - start
    generate_world(root / "b", config, seed=0)
    generate_world(root / "c", config, seed=1)
    return {"a": root / "a", "b": root / "b", "c": root / "c", "seconds": seconds}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def first_user_turns(records):
    return [r["messages"][0]["content"] for r in records]


def test_writes_every_file_and_nothing_half_written(worlds):
    names = sorted(p.name for p in worlds["a"].iterdir())
    assert names == sorted(FILES)  # no temporary files left behind


def test_tiny_world_is_generated_quickly(worlds):
    assert worlds["seconds"] < 2.0


def test_same_seed_writes_identical_bytes(worlds):
    for name in FILES:
        assert (worlds["a"] / name).read_bytes() == (worlds["b"] / name).read_bytes(), name


def test_different_seed_gives_a_different_world(worlds):
    for name in ["world.json", "pretrain_train.jsonl", "sft_train.jsonl", "prompts_eval.jsonl"]:
        assert (worlds["a"] / name).read_bytes() != (worlds["c"] / name).read_bytes(), name
    people_a = json.loads((worlds["a"] / "world.json").read_text())["people"]
    people_c = json.loads((worlds["c"] / "world.json").read_text())["people"]
    assert people_a != people_c


def test_no_prompt_text_is_shared_between_sets(worlds):
    sets = {f"sft_{split}": first_user_turns(read_jsonl(worlds["a"] / f"sft_{split}.jsonl")) for split in ("train", "val")}
    sets.update({name: first_user_turns(read_jsonl(worlds["a"] / f"prompts_{name}.jsonl")) for name in PROMPT_SETS})
    for (name_a, texts_a), (name_b, texts_b) in combinations(sets.items(), 2):
        assert not set(texts_a) & set(texts_b), f"{name_a} and {name_b} share prompts"
    for name in PROMPT_SETS + ["sft_val"]:
        assert len(set(sets[name])) == len(sets[name]), f"{name} repeats a prompt"
    # nor does any SFT turn (follow-ups included) equal a held-out prompt
    sft_turns = {m["content"] for split in ("train", "val") for d in read_jsonl(worlds["a"] / f"sft_{split}.jsonl")
                 for m in d["messages"] if m["role"] == "user"}
    for name in PROMPT_SETS:
        assert not sft_turns & set(sets[name])


def test_held_out_facts_are_never_asked_in_sft(worlds):
    world = json.loads((worlds["a"] / "world.json").read_text())
    split = {name: {tuple(pair) for pair in pairs} for name, pairs in world["fact_split"].items()}
    for a, b in combinations(split, 2):
        assert not split[a] & split[b], f"facts shared by {a} and {b}"
    asked_in_sft = {tuple(pair) for s in ("train", "val") for d in read_jsonl(worlds["a"] / f"sft_{s}.jsonl")
                    for pair in d["facts_asked"]}
    assert asked_in_sft and asked_in_sft <= split["sft"]
    for name in PROMPT_SETS:
        asked = {(r["person"], r["attribute"]) for r in read_jsonl(worlds["a"] / f"prompts_{name}.jsonl")
                 if r["kind"] == "fact"}
        assert asked and asked <= split[name]
        assert not asked & asked_in_sft
    people = len(world["people"])
    assert len(split["sft"]) == pytest.approx(people * 7 / 2, abs=1)  # about half of all facts


def test_stats_match_the_files(worlds, config):
    stats = json.loads((worlds["a"] / "stats.json").read_text())
    for split in ("train", "val"):
        texts = [r["text"] for r in read_jsonl(worlds["a"] / f"pretrain_{split}.jsonl")]
        assert stats["pretrain"][split] == {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts),
                                            "words": sum(len(t.split()) for t in texts)}
        dialogues = read_jsonl(worlds["a"] / f"sft_{split}.jsonl")
        assert stats["sft"][split]["dialogues"] == len(dialogues)
        assert stats["sft"][split]["turns"] == sum(len(d["messages"]) // 2 for d in dialogues)
        for kind, count in stats["sft"][split]["kinds"].items():
            assert count == sum(d["kind"] == kind for d in dialogues)
        for quality, count in stats["sft"][split]["qualities"].items():
            assert count == sum(d["quality"] == quality for d in dialogues)
    for name in PROMPT_SETS:
        records = read_jsonl(worlds["a"] / f"prompts_{name}.jsonl")
        assert stats["prompts"][name]["prompts"] == len(records) == getattr(config, f"n_{name}_prompts")
    assert stats["pretrain"]["train"]["documents"] + stats["pretrain"]["val"]["documents"] == config.n_documents
    assert stats["sft"]["train"]["dialogues"] == config.n_sft_dialogues
    assert stats["sft"]["val"]["dialogues"] == config.n_sft_val
    assert stats["seed"] == 0 and stats["config"]["n_people"] == config.n_people
    assert 100_000 < stats["pretrain"]["train"]["bytes"] + stats["pretrain"]["val"]["bytes"] < 250_000


def test_sft_follows_the_kind_quality_and_turn_mix(worlds, config):
    dialogues = read_jsonl(worlds["a"] / "sft_train.jsonl")
    n = len(dialogues)
    for kind, share in KIND_MIX.items():
        assert sum(d["kind"] == kind for d in dialogues) == pytest.approx(n * share, abs=1)
    for quality, share in QUALITY_MIX.items():
        assert sum(d["quality"] == quality for d in dialogues) == pytest.approx(n * share, abs=1)
    assert sum(len(d["messages"]) == 4 for d in dialogues) == pytest.approx(0.2 * n, abs=1)
    assert all(len(d["messages"]) in (2, 4) for d in dialogues)
    assert all(m["role"] == ("user", "assistant")[i % 2] for d in dialogues for i, m in enumerate(d["messages"]))


def test_every_fact_is_stated_many_times_in_pretraining(worlds):
    world = json.loads((worlds["a"] / "world.json").read_text())
    texts = [r["text"] for s in ("train", "val") for r in read_jsonl(worlds["a"] / f"pretrain_{s}.jsonl")]
    for person in world["people"]:
        about = [t for t in texts if person["name"] in t]
        for attribute in ("town", "job", "pet", "pet_name", "colour", "food"):
            assert sum(person[attribute] in t for t in about) >= 5, (person["name"], attribute)
        age = (str(person["age"]), number_to_words(person["age"]))
        assert sum(any(a in t for a in age) for t in about) >= 3, (person["name"], "age")


def test_prompt_records_carry_what_the_judge_needs(worlds):
    for name in PROMPT_SETS:
        for record in read_jsonl(worlds["a"] / f"prompts_{name}.jsonl"):
            assert record["id"].startswith(name + "-")
            assert [m["role"] for m in record["messages"]] == ["user"]
            assert record["kind"] in KIND_MIX
            assert record["answer"] and record["reference"]
            assert "prompt" not in record  # would make minigpt.data read the record as another format


def test_passage_answers_can_be_copied_from_the_passage(worlds):
    for name in PROMPT_SETS:
        for record in read_jsonl(worlds["a"] / f"prompts_{name}.jsonl"):
            if record["kind"] == "passage":
                text, answer = record["messages"][0]["content"], record["answer"]
                spelled = number_to_words(int(answer)) if answer.isdigit() else answer
                assert answer in text or spelled in text, (answer, text)


def test_passage_names_are_ordinary_and_never_the_worlds():
    """Passage people, pets and towns share no word - nor a word's start - with the world's names, nor
    with each other, so an answer can only be read and a name never half-matches another."""
    passage_names = PASSAGE_FEMALE_NAMES + PASSAGE_MALE_NAMES + PASSAGE_PET_NAMES + PASSAGE_TOWNS
    world_names = FEMALE_NAMES + MALE_NAMES + PET_NAMES + list(TOWNS)
    assert len(PASSAGE_FEMALE_NAMES + PASSAGE_MALE_NAMES) >= 150 and len(set(passage_names)) == len(passage_names)
    vocabulary = {w for name in [*world_names, *JOBS, *ANIMALS, *COLOURS, *FOODS] for w in words(name)}
    for name in passage_names:
        assert words(name)[0] not in vocabulary, name
        clashes = [other for other in world_names + passage_names
                   if other != name and other.lower().startswith(name.lower()) and name not in PASSAGE_TOWNS]
        assert not clashes, (name, clashes)


def test_a_passage_is_short_and_states_each_fact_once():
    rng = random.Random(0)
    for _ in range(300):
        passage = write_passage(rng)
        sentences = re.split(r"(?<=[.!?]) ", passage["text"])
        assert 3 <= len(sentences) <= 5, passage["text"]
        main, other = passage["people"]
        assert main.name in PASSAGE_FEMALE_NAMES + PASSAGE_MALE_NAMES and main.name != other.name
        assert 2 <= sum(main.name in s for s in sentences) <= 3 and 1 <= sum(other.name in s for s in sentences) <= 2
        assert passage["main_askable"] and all(person is main for person, _ in passage["main_askable"])
        for person, attribute in passage["askable"]:
            value = str(getattr(person, attribute))
            assert len(re.findall(rf"\b{re.escape(value)}\b", passage["text"])) == 1, (value, passage["text"])


def template_pattern(template: str, slots: dict) -> str:
    """A regex for a template's text: each {slot} by its pattern in `slots`, anything else literally."""
    parts = re.split(r"\{([a-z_]+)\}", template)  # literal, slot name, literal, ...
    return "".join(slots[part] if i % 2 else re.escape(part) for i, part in enumerate(parts))


def passage_of(prompt: str) -> str:
    """The passage inside a passage prompt: the prompt matched against each frame and question phrasing."""
    word = r"[A-Za-z]+"
    questions = "|".join(template_pattern(q, {"n": word, "p": word, "s": word, "animal": word})
                         for templates in FACT_QUESTIONS.values() for q in templates)
    for frame in sorted(PASSAGE_PROMPTS, key=len, reverse=True):  # "{passage} {question}" would match any
        match = re.fullmatch(template_pattern(frame, {"passage": "(?P<passage>.+)", "question": f"(?:{questions})"}),
                             prompt, re.S)
        if match:
            return match.group("passage")
    raise AssertionError(f"no passage frame matches {prompt!r}")


def test_pretraining_teaches_reading_with_passages_no_prompt_uses(worlds):
    texts = [r["text"] for s in ("train", "val") for r in read_jsonl(worlds["a"] / f"pretrain_{s}.jsonl")]
    passage_names = set(PASSAGE_FEMALE_NAMES + PASSAGE_MALE_NAMES)
    lessons = [t for t in texts if "?" in t and set(re.findall(r"[A-Z][a-z]+", t)) & passage_names]
    assert len(lessons) >= 0.08 * len(texts)
    pretraining = "\n".join(texts)
    prompts = [r for name in PROMPT_SETS for r in read_jsonl(worlds["a"] / f"prompts_{name}.jsonl")]
    prompts += [{**d, "messages": d["messages"][:1]} for s in ("train", "val")
                for d in read_jsonl(worlds["a"] / f"sft_{s}.jsonl")]
    passages = [passage_of(r["messages"][0]["content"]) for r in prompts if r["kind"] == "passage"]
    assert passages and not [p for p in passages if p in pretraining]
    assert all(3 <= len(re.split(r"(?<=[.!?]) ", p)) <= 5 for p in passages)


def arithmetic_turns(world_dir):
    """(user turn, judge record) of every arithmetic question: prompt sets, SFT last turns."""
    for name in PROMPT_SETS:
        for record in read_jsonl(world_dir / f"prompts_{name}.jsonl"):
            yield record["messages"][0]["content"], record
    for split in ("train", "val"):
        for dialogue in read_jsonl(world_dir / f"sft_{split}.jsonl"):
            yield dialogue["messages"][-2]["content"], dialogue["judge"]


def test_arithmetic_asks_small_sums_and_differences(worlds):
    asked = 0
    for turn, record in arithmetic_turns(worlds["a"]):
        if record["kind"] != "arithmetic":
            continue
        a, b = record["numbers"]
        result = a + b if record["op"] == "plus" else a - b
        assert int(record["answer"]) == result and 0 <= result <= 20, (turn, record)
        if not turn.startswith(("And", "Now")):  # a follow-up builds on the previous result
            assert 0 <= a <= 10 and 0 <= b <= 10, (turn, record)
            asked += 1
    assert asked > 20


def test_instructions_stay_small(worlds):
    for turn, record in arithmetic_turns(worlds["a"]):
        if record.get("task") == "count":
            assert 3 <= record["end"] - record["start"] + 1 <= 6, turn
        if record.get("task") == "repeat":
            assert 2 <= record["times"] <= 4, turn


def test_pretraining_sums_are_right_and_mostly_small(worlds):
    texts = [r["text"] for r in read_jsonl(worlds["a"] / "pretrain_train.jsonl")]
    sums = [(int(a), op, int(b), int(r)) for t in texts
            for a, op, b, r in re.findall(r"\b(\d+) (plus|minus|\+|-) (\d+) (?:is|equals|makes|=|leaves) (\d+)\b", t)]
    assert len(sums) > 200
    for a, op, b, r in sums:
        assert r == (a + b if op in ("plus", "+") else a - b), (a, op, b, r)
    small = [s for s in sums if s[3] <= 20 and max(s[0], s[2]) <= 20]
    assert len(small) >= 0.75 * len(sums)
    plus_facts = {(a, b) for a, op, b, _ in small if op in ("plus", "+") and a <= 10 and b <= 10}
    assert len(plus_facts) >= 60  # most of the 121 small sums, even in the tiny world


def test_generate_script_writes_a_world(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "data/generate.py", "--out", str(tmp_path / "data"), "--preset", "tiny",
                             "--seed", "3", "n_people=8"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "data") in result.stdout
    world = json.loads((tmp_path / "data" / "world.json").read_text())
    assert len(world["people"]) == 8 and world["seed"] == 3
