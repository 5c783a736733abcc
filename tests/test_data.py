"""minigpt.data: every source kind and format, on the real samples in shared/data and small files in tmp_path."""

import csv
import gzip
import json
from pathlib import Path

import datasets
import pytest

from minigpt.data import (DataError, detect_format, load_dialogues, load_prompts, load_rankings, load_records,
                          load_texts, split_off, to_messages)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data sample {path} is absent (the shared/ folder sits beside the repository clone)")
    return path


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # datasets caches what it reads; keep that out of the user's ~/.cache during tests.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def alternates(messages) -> bool:
    roles = [m["role"] for m in messages if m["role"] != "system"]
    return roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:]))


# --- real samples ---------------------------------------------------------------------------------------------


def test_tinystories_splits_on_endoftext_lines():
    stories = load_texts(shared_file("tinystories_sample.txt"), split=None)
    assert len(stories) == 2316  # README: 2,316 stories
    assert all(story and "<|endoftext|>" not in story and story == story.strip() for story in stories)
    fixture = load_texts(shared_file("tinystories_cs336_fixture.txt"), split=None)
    assert 2 <= len(fixture) < 25 and all("<|endoftext|>" not in story for story in fixture)


def test_plain_source_holds_out_a_deterministic_val_part():
    path = shared_file("tinystories_sample.txt")
    train, val = load_texts(path, "train"), load_texts(path, "val")
    assert len(train) + len(val) == 2316 and len(val) == round(2316 * 0.05)
    assert not set(train) & set(val)
    assert load_texts(path, "val") == val


def test_tinyshakespeare_splits_on_blank_lines():
    blocks = load_texts(shared_file("tinyshakespeare.txt"), split=None)
    assert len(blocks) > 5000
    assert blocks[0].startswith("First Citizen:") and all("\n\n" not in block for block in blocks)


def test_hh_transcripts_become_pairwise_rankings():
    rankings = load_rankings(shared_file("preferences_sample.jsonl"))
    assert len(rankings) == 2000
    for ranking in rankings:
        assert ranking["ranks"] == [0, 1] and len(ranking["responses"]) == 2
        assert ranking["prompt"][-1]["role"] == "user" and alternates(ranking["prompt"])
        assert all(isinstance(r, str) and "\n\nHuman:" not in r for r in ranking["responses"])
    assert all(ranking["responses"][1] for ranking in rankings)
    # Four chosen replies are empty in the data (saying nothing beat a harmful answer); they are kept.
    assert sum(not ranking["responses"][0] for ranking in rankings) == 4
    assert sum(len(ranking["prompt"]) > 1 for ranking in rankings) == 1421  # README: multi-turn rows


def test_hh_double_assistant_turns_are_merged_so_prefixes_match():
    rows = load_records(shared_file("preferences_sample.jsonl"))
    row = rows[1952]  # line 1953: the chosen transcript has two Assistant turns in a row
    ranking = load_rankings(shared_file("preferences_sample.jsonl"))[1952]
    assert "\n\nAssistant: Alrighty" in row["chosen"] and ranking["responses"][0].startswith("Alrighty")
    assert "O.k. let’s go ahead" in ranking["responses"][0]


def test_hh_chosen_transcripts_become_dialogues():
    path = shared_file("preferences_sample.jsonl")
    dialogues = load_dialogues(path, split=None)
    rankings = load_rankings(path)
    assert len(dialogues) == 2000
    for dialogue, ranking in zip(dialogues, rankings):
        assert alternates(dialogue["messages"]) and dialogue["messages"][-1]["role"] == "assistant"
        assert dialogue["messages"] == ranking["prompt"] + [{"role": "assistant", "content": ranking["responses"][0]}]


def test_oasst_trees_give_best_path_dialogues():
    path = shared_file("chat_sample.jsonl")
    dialogues = load_dialogues(path, split=None)
    assert len(dialogues) == 100
    for dialogue in dialogues:
        messages = dialogue["messages"]
        assert alternates(messages) and messages[-1]["role"] == "assistant"
    # The best path takes the rank-0 reply at every turn.
    tree = load_records(path)[0]
    first_reply = min(tree["prompt"]["replies"], key=lambda reply: reply["rank"])
    assert dialogues[0]["messages"][1]["content"] == first_reply["text"]


def test_oasst_all_paths_is_a_superset_of_best_paths():
    path = shared_file("chat_sample.jsonl")
    every = load_dialogues(path, split=None, all_oasst_paths=True)
    best = load_dialogues(path, split=None)
    assert len(every) > 3 * len(best)
    assert all(dialogue in every for dialogue in best)
    assert all(alternates(d["messages"]) and d["messages"][-1]["role"] == "assistant" for d in every)


def test_oasst_trees_give_k_way_rankings():
    rankings = load_rankings(shared_file("chat_sample.jsonl"))
    assert 205 <= len(rankings) <= 215  # README counts 211 nodes with two or more ranked replies
    for ranking in rankings:
        assert len(ranking["responses"]) == len(ranking["ranks"]) >= 2
        assert min(ranking["ranks"]) == 0 and ranking["prompt"][-1]["role"] == "user"
        assert alternates(ranking["prompt"]) and ranking["message_tree_id"]
    assert max(len(ranking["responses"]) for ranking in rankings) > 2


def test_prompts_from_chat_and_preference_samples():
    oasst = load_prompts(shared_file("chat_sample.jsonl"))
    assert len(oasst) == 100 and all(len(p["messages"]) == 1 and p["message_tree_id"] for p in oasst)
    hh = load_prompts(shared_file("preferences_sample.jsonl"))
    assert len(hh) == 2000 and all(p["messages"][-1]["role"] == "user" for p in hh)
    assert all(set(p) == {"messages"} for p in hh)  # chosen/rejected are the format's own fields


# --- converters on small hand-written files ------------------------------------------------------------------

SHAREGPT = {"id": "s1", "conversations": [{"from": "system", "value": "Be brief."},
                                          {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                          {"from": "human", "value": "Bye"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
MESSAGES = {"messages": [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
PROMPT = {"id": 7, "kind": "fact", "answer": "Paris", "messages": [{"role": "user", "content": "Capital?"}]}
PREFERENCE = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "source": "hand"}
CONVERSATIONAL_PREFERENCE = {"prompt": [{"role": "user", "content": "Name a colour."}],
                             "chosen": [{"role": "assistant", "content": "Blue."}],
                             "rejected": [{"role": "assistant", "content": "No."}]}
IMPLICIT_PREFERENCE = {"chosen": [{"role": "user", "content": "Name a colour."},
                                  {"role": "assistant", "content": "Blue."}],
                       "rejected": [{"role": "user", "content": "Name a colour."},
                                    {"role": "assistant", "content": "No."}]}
RANKING = {"prompt": [{"role": "user", "content": "Name a colour."}], "responses": ["Blue.", "No.", "Red."],
           "ranks": [0, 2, 0], "scores": [0.9, 0.1, 0.9], "policy": "sft"}
HH = {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
      "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."}


@pytest.mark.parametrize("record, expected", [
    ({"text": "Once upon a time."}, "text"), (MESSAGES, "messages"), (SHAREGPT, "sharegpt"), (ALPACA, "alpaca"),
    (HH, "hh"), ({"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Hi", "replies": []}}, "oasst_tree"),
    (PREFERENCE, "preference"), (CONVERSATIONAL_PREFERENCE, "preference"), (IMPLICIT_PREFERENCE, "preference"),
    (RANKING, "ranking"), (PROMPT, "prompt"), ({"prompt": "Say hi."}, "prompt")])
def test_detect_format_recognises_each_format_by_its_fields(record, expected):
    assert detect_format(record) == expected


def test_sharegpt_alpaca_and_messages_become_dialogues(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT, ALPACA, MESSAGES])
    sharegpt, alpaca, messages = load_dialogues(path, split=None)
    # ShareGPT's trailing human turn is dropped so the dialogue ends on the assistant.
    assert sharegpt["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello!"}]
    assert alpaca["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                  {"role": "assistant", "content": "5"}]
    assert messages == MESSAGES
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "Hi"})[0]["content"] == "Say hi."


def test_prompt_records_keep_their_extra_fields(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [PROMPT, {"prompt": "Say hi.", "id": 8}, SHAREGPT, MESSAGES])
    prompt, plain, sharegpt, messages = load_prompts(path)
    assert prompt == PROMPT
    assert plain == {"messages": [{"role": "user", "content": "Say hi."}], "id": 8}
    assert sharegpt["messages"][-1] == {"role": "user", "content": "Bye"} and sharegpt["id"] == "s1"
    assert messages["messages"][-1] == {"role": "user", "content": "Hi"}


def test_preference_pairs_in_every_trl_convention_become_rankings(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PREFERENCE, CONVERSATIONAL_PREFERENCE, IMPLICIT_PREFERENCE, HH])
    rankings = load_rankings(path)
    for ranking in rankings:
        assert ranking["prompt"] == [{"role": "user", "content": "Name a colour."}]
        assert ranking["responses"] == ["Blue.", "No."] and ranking["ranks"] == [0, 1]
    assert rankings[0]["source"] == "hand"
    assert to_messages(PREFERENCE)[-1] == {"role": "assistant", "content": "Blue."}


def test_k_way_rankings_pass_through_with_ties_and_extras(tmp_path):
    ranking, = load_rankings(write_jsonl(tmp_path / "ranked.jsonl", [RANKING]))
    assert ranking == RANKING
    assert to_messages(RANKING)[-1] == {"role": "assistant", "content": "Blue."}


def test_hh_prompt_string_with_open_assistant_turn():
    record = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Colour?\n\nAssistant:",
              "chosen": " Blue.", "rejected": " No."}
    assert to_messages(record) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": "Colour?"},
                                   {"role": "assistant", "content": "Blue."}]


def test_parquet_and_csv_files_read_through_datasets(tmp_path):
    parquet = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([MESSAGES, MESSAGES]).to_parquet(str(parquet))
    assert load_dialogues(parquet, split=None) == [MESSAGES, MESSAGES]
    table = tmp_path / "alpaca.csv"
    with open(table, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows([ALPACA, {"instruction": "Say hi.", "input": "", "output": "Hi"}])
    first, second = load_dialogues(table, split=None)
    assert first["messages"][0]["content"] == "Add the numbers.\n\n2 and 3"
    assert second["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]
    texts = tmp_path / "texts.csv"
    texts.write_text("text,source\nhello world,a\nsecond doc,b\n")
    assert load_texts(texts, split=None) == ["hello world", "second doc"]
    numbers = tmp_path / "numbers.csv"  # a column of numbers stays text, exactly as written
    numbers.write_text("prompt,answer\nWhat is 5 + 2?,007\nWhat is 1 / 2?,0.50\n")
    assert [p["answer"] for p in load_prompts(numbers)] == ["007", "0.50"]


def test_json_array_file_alpaca_style(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([ALPACA, ALPACA], indent=2))
    assert len(load_dialogues(path, split=None)) == 2


# --- folders ---------------------------------------------------------------------------------------------------


def make_world_folder(folder: Path) -> Path:
    folder.mkdir()
    write_jsonl(folder / "pretrain_train.jsonl", [{"text": "train doc"}])
    write_jsonl(folder / "pretrain_val.jsonl", [{"text": "val doc"}])
    write_jsonl(folder / "sft_train.jsonl", [MESSAGES])
    write_jsonl(folder / "sft_val.jsonl", [{"messages": MESSAGES["messages"][1:]}])
    write_jsonl(folder / "prompts_eval.jsonl", [PROMPT])
    write_jsonl(folder / "prompts_ppo.jsonl", [{"messages": [{"role": "user", "content": "PPO?"}]}])
    write_jsonl(folder / "ranked.jsonl", [RANKING])
    return folder


def test_world_folder_each_loader_reads_its_own_file(tmp_path):
    world = make_world_folder(tmp_path / "world")
    before = sorted(p.name for p in world.iterdir())
    assert load_texts(world, "train") == ["train doc"] and load_texts(world, "val") == ["val doc"]
    assert load_dialogues(world, "train") == [MESSAGES] and len(load_dialogues(world, "val")[0]["messages"]) == 2
    assert load_prompts(world, "eval") == [PROMPT]
    assert load_prompts(world, "ppo")[0]["messages"][0]["content"] == "PPO?"
    assert load_rankings(world) == [RANKING]
    assert sorted(p.name for p in world.iterdir()) == before  # the loaders only read


def test_plain_folder_means_all_its_data_files(tmp_path):
    folder = tmp_path / "ranked_runs"
    folder.mkdir()
    write_jsonl(folder / "ranked_a.jsonl", [RANKING])
    write_jsonl(folder / "ranked_b.jsonl", [RANKING, PREFERENCE])
    (folder / "notes.md").write_text("not data")
    assert len(load_rankings(folder)) == 3


def test_run_folder_reads_its_ranked_files_not_its_metrics(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    write_jsonl(samples / "ranked.jsonl", [RANKING])
    write_jsonl(samples / "ranked_round2.jsonl", [RANKING])
    write_jsonl(samples / "metrics.jsonl", [{"step": 1, "loss": 2.0}])
    (samples / "manifest.json").write_text(json.dumps({"stage": "samples"}))
    assert load_rankings(samples) == [RANKING, RANKING]


def test_gzipped_json_lines_with_byte_order_mark(tmp_path):
    path = tmp_path / "texts.jsonl.gz"
    with gzip.open(path, "wb") as file:
        file.write("\ufeff".encode() + b'{"text": "first"}\n{"text": "second"}\n')
    assert load_texts(path, split=None) == ["first", "second"]


def test_split_off_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = split_off(items, 0.1, seed=3)
    assert (train, val) == split_off(items, 0.1, seed=3) and len(val) == 10
    assert sorted(train + val) == items and val != split_off(items, 0.1, seed=4)[1]
    assert split_off(["only"], 0.1) == (["only"], [])


# --- errors: one clear DataError naming the file and line/row/field -------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MESSAGES) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_dialogues(path)


def test_missing_and_mistyped_fields_name_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [MESSAGES, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: field 'messages\[0\]'.*string 'content'"):
        load_dialogues(path, split=None)
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": 5, "output": "x"}])
    with pytest.raises(DataError, match=r"alpaca\.jsonl:1: field 'instruction' should be a string, got int"):
        load_dialogues(path, split=None)
    path = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(DataError, match=r"roles\.jsonl:1: field 'messages\[0\]' has role 'tool'"):
        load_prompts(path)
    path = write_jsonl(tmp_path / "ranks.jsonl", [{**RANKING, "ranks": ["best", "worst", "best"]}])
    with pytest.raises(DataError, match=r"ranks\.jsonl:1: field 'ranks' should be a list of integers >= 0"):
        load_rankings(path)
    table = tmp_path / "rows.csv"
    table.write_text("instruction,output\nhi,there\n,missing instruction\n")
    with pytest.raises(DataError, match=r"rows\.csv row 2: .*'instruction'"):
        load_dialogues(table, split=None)


def test_ranking_with_mismatched_lengths(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", [RANKING, {**RANKING, "ranks": [0, 1]}])
    with pytest.raises(DataError, match=r"ranked\.jsonl:2: 'responses' has 3 entries but 'ranks' has 2"):
        load_rankings(path)


def test_preference_pair_that_differs_before_the_last_reply(tmp_path):
    record = {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
              "rejected": "\n\nHuman: A\n\nAssistant: X\n\nHuman: C\n\nAssistant: D"}
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: 'chosen' and 'rejected' should differ only"):
        load_rankings(write_jsonl(tmp_path / "pairs.jsonl", [record]))


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.txt", ""),
                                           ("blank.txt", "\n  \n"), ("empty.csv", ""), ("header.csv", "text\n")])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: the file (is empty|has no records)"):
        load_texts(path, split=None)


def test_unknown_format_lists_keys_and_accepted_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "label": 1}])
    with pytest.raises(DataError) as caught:
        load_dialogues(path)
    message = str(caught.value)
    assert "odd.jsonl:1: unknown format" in message and "['label', 'question']" in message
    assert all(name in message for name in ("sharegpt", "alpaca", "oasst_tree", "ranking", "conversations"))


def test_wrong_format_for_the_stage_says_so(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [PROMPT])
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: a dialogue needs a user turn followed by an assistant"):
        load_dialogues(path, split=None)
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: load_texts reads documents .* 'prompt' record"):
        load_texts(path, split=None)
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: load_rankings needs ranked responses"):
        load_rankings(path)


def test_nonexistent_local_path_is_not_mistaken_for_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)  # a typo must not go to the Hub
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder"):
        load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"^data/missing\.jsonl: no such file or folder"):
        load_texts("data/missing.jsonl")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(DataError, match=r"^runs/typo: no such file or folder"):
        load_texts("runs/typo")


def test_hub_name_offline_says_the_hub_needs_network(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_dialogues("someone/some-chat-data:test")
    message = str(caught.value)
    assert "someone/some-chat-data" in message and "Hub" in message and "network" in message
    assert "split 'test'" in message


def test_unreadable_files(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(DataError, match=r"binary\.txt: cannot read it as text: UnicodeDecodeError"):
        load_texts(binary, split=None)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"text": "ok"}).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 text"):
        load_texts(latin, split=None)
    with pytest.raises(DataError, match=r"notes\.md: unsupported file type"):
        (tmp_path / "notes.md").write_text("# hi")
        load_texts(tmp_path / "notes.md")
    with pytest.raises(DataError, match=r"no data files"):
        (tmp_path / "nothing").mkdir()
        load_texts(tmp_path / "nothing")


def test_world_folder_missing_a_file_names_it(tmp_path):
    world = make_world_folder(tmp_path / "world")
    (world / "prompts_eval.jsonl").unlink()
    with pytest.raises(DataError, match=r"world data folder .* has no prompts_eval\.jsonl"):
        load_prompts(world, "eval")
