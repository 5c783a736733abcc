"""The world generator: deterministic, disjoint prompt sets, held-out facts, honest stats."""

import json
import time
from itertools import combinations

import pytest

from minigpt.config import DataConfig, load_config
from minigpt.judge import number_to_words
from minigpt.world import KIND_MIX, QUALITY_MIX, generate_world

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
