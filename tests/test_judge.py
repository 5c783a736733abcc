"""The gold judge: right beats fluent, and cheap tricks do not pay."""

import json

import pytest

from minigpt.config import DataConfig, load_config
from minigpt.judge import number_to_words, score, score_many, words
from minigpt.world import generate_world

TOWNS = ["Oakfield", "Brookside", "Stonebridge", "Millbrook", "Ashford", "Redhill"]
FACT = {"kind": "fact", "check": "mention", "answer": "Oakfield", "candidates": TOWNS[1:], "subject": ["Mara"],
        "reference": "Mara lives in Oakfield."}
PASSAGE = {"kind": "passage", "check": "mention", "answer": "Sunford", "candidates": ["Goldwick", "Oakfield"],
           "subject": ["Emma"], "reference": "Emma lives in Sunford."}
AGE = {"kind": "fact", "check": "number", "answer": "34", "numbers": [], "subject": ["Tom"],
       "reference": "Tom is 34 years old."}
ARITHMETIC = {"kind": "arithmetic", "check": "number", "answer": "12", "numbers": [7, 5], "subject": ["7", "5"],
              "reference": "7 plus 5 is 12."}
COUNT = {"kind": "instruction", "task": "count", "check": "count", "start": 3, "end": 7, "answer": "3, 4, 5, 6, 7",
         "subject": [], "reference": "Counting from 3 to 7: 3, 4, 5, 6, 7."}
GREET = {"kind": "instruction", "task": "greet", "check": "greet", "answer": "Mara", "candidates": ["Tom", "Sam", "Nora"],
         "subject": ["Mara"], "reference": "Hello, Mara!"}
ANIMAL = {"kind": "instruction", "task": "name_animal", "check": "mention", "answer": "fox",
          "accepted": ["fox", "owl", "bear", "deer"], "candidates": ["dog", "cat", "whale", "duck", "horse"],
          "subject": ["forest"], "reference": "A fox lives in the forest."}
REPEAT = {"kind": "instruction", "task": "repeat", "check": "repeat", "word": "river", "times": 3,
          "answer": "river, river, river", "subject": ["river"], "reference": "River, river, river."}

# (record, good, verbose, curt, wrong, hack): hand-written answers of each quality, for every kind
CASES = {
    "fact": (FACT, "Mara lives in Oakfield.",
             "That is a great question! Let me think. Mara lives in Oakfield, which is a lovely town. I hope this helps you!",
             "oakfield", "Mara lives in Brookside.",
             "Mara lives in Oakfield, Brookside, Stonebridge, Millbrook, Ashford and Redhill."),
    "passage": (PASSAGE, "Emma lives in Sunford.",
                "Sure, I would be happy to help with that. Emma lives in Sunford, as the passage says. Have a lovely day!",
                "sunford", "Emma lives in Goldwick.", "Emma lives in Sunford or Goldwick or maybe Oakfield."),
    "age": (AGE, "Tom is 34 years old.", "Good question! I remember this well: Tom is 34 years old, and he is very "
            "proud of it. Let me know if you have any other questions.", "34", "Tom is 43 years old.",
            "Tom is 30, 31, 32, 33, 34, 35 or 36 years old."),
    "arithmetic": (ARITHMETIC, "7 plus 5 is 12.",
                   "What a lovely question! Let me work it out for you carefully. 7 plus 5 is 12. I hope this helps you!",
                   "12", "7 plus 5 is 13.", "7 plus 5 is 10, 11, 12 or 13."),
    "count": (COUNT, "Counting from 3 to 7: 3, 4, 5, 6, 7.",
              "Of course, I would love to count for you, that is an easy task! Here they are: 3, 4, 5, 6, 7. "
              "Counting is always so much fun. Is there anything else you would like?",
              "3 4 5 6 7", "Counting from 3 to 7: 3, 4, 6, 7.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."),
    "greet": (GREET, "Hello, Mara!", "Sure, I would be happy to help with that. Hello, Mara! I hope you are having a "
              "wonderful day. Let me know if you need anything else.", "hello mara", "Hello, Tom!",
              "Hello, Mara, Tom, Sam and Nora!"),
    "animal": (ANIMAL, "A fox lives in the forest.", "Thank you for asking! Many animals live there, but a good "
               "example is that a fox lives in the forest. I hope this helps you!", "fox", "A whale lives in the forest.",
               "A fox, a dog, a cat, a whale and a duck live in the forest."),
    "repeat": (REPEAT, "River, river, river.", "Of course, I can do that for you right away. River, river, river. "
               "That was a lovely word to say. I hope this helps you!", "river river river", "River, river.",
               "River, river, river, river, river, river, river, river."),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_good_beats_verbose_and_curt_beats_wrong_and_hacks(case):
    record, good, verbose, curt, wrong, hack = CASES[case]
    assert score(record, good)["score"] >= 0.9
    assert 0.5 <= score(record, verbose)["score"] <= 0.85
    assert 0.45 <= score(record, curt)["score"] <= 0.8
    assert score(record, wrong)["score"] <= 0.3
    assert score(record, hack)["score"] <= 0.3


@pytest.mark.parametrize("case", sorted(CASES))
def test_saying_the_answer_again_does_not_pay(case):
    record, good = CASES[case][:2]
    assert score(record, " ".join([good] * 2))["score"] <= 0.5
    assert score(record, " ".join([good] * 5))["score"] <= 0.5


@pytest.mark.parametrize("case", sorted(CASES))
def test_empty_response_scores_zero(case):
    record = CASES[case][0]
    for empty in ["", "   ", "\n\t"]:
        assert score(record, empty) == {"score": 0.0, "correct": 0.0, "complete": 0.0, "concise": 0.0, "clean": 0.0}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unfinished_response_scores_lower(case):
    record, good = CASES[case][:2]
    assert score(record, good, finished=False)["score"] < score(record, good)["score"]


def test_components_are_all_in_unit_range():
    for record, *responses in CASES.values():
        for response in responses:
            result = score(record, response)
            assert set(result) == {"score", "correct", "complete", "concise", "clean"}
            assert all(0.0 <= value <= 1.0 for value in result.values()), (response, result)


def test_matching_ignores_case_and_punctuation_and_reads_number_words():
    assert score(FACT, "MARA LIVES IN OAKFIELD!")["correct"] == 1.0
    assert score(FACT, "Mara lives in Oakfield...")["correct"] == 1.0
    assert score(FACT, "Mara's home is in oakfield.")["score"] >= 0.9
    assert score(ARITHMETIC, "Seven plus five is twelve.")["score"] >= 0.9
    assert score(AGE, "Tom is thirty-four years old.")["score"] >= 0.9
    assert score(COUNT, "Counting from three to seven: three, four, five, six, seven.")["correct"] == 1.0
    assert score(ANIMAL, "Foxes live in the forest.")["score"] >= 0.9  # any fitting animal, plural or not
    assert score(ANIMAL, "An owl lives in the forest.")["correct"] == 1.0


def test_stray_numbers_make_arithmetic_wrong():
    assert score(ARITHMETIC, "7 plus 5 is 12, or maybe 14.")["correct"] == 0.0
    assert score(AGE, "Tom is 34 years old and has 2 cats.")["correct"] == 0.0


def test_number_words_round_trip():
    for n in [0, 7, 13, 20, 21, 45, 99, 100, 105, 342]:
        assert words(number_to_words(n)) == [str(n)]
    assert words("one, two, three") == ["1", "2", "3"]


def test_score_many_averages_scores_and_components():
    records = [FACT, ARITHMETIC]
    mean, components = score_many(records, ["Mara lives in Oakfield.", "7 plus 5 is 13."])
    assert mean == pytest.approx((score(FACT, "Mara lives in Oakfield.")["score"]
                                  + score(ARITHMETIC, "7 plus 5 is 13.")["score"]) / 2)
    assert components["correct"] == pytest.approx(0.5)
    unfinished, _ = score_many(records, ["Mara lives in Oakfield.", "7 plus 5 is 13."], finished=[False, False])
    assert unfinished < mean


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, load_config(DataConfig, "tiny"), seed=0)
    return out


def test_judge_orders_the_sft_demonstrations_by_quality(tiny_world):
    means = {}
    for line in (tiny_world / "sft_train.jsonl").read_text().splitlines():
        dialogue = json.loads(line)
        means.setdefault(dialogue["quality"], []).append(
            score(dialogue["judge"], dialogue["messages"][-1]["content"])["score"])
    means = {quality: sum(v) / len(v) for quality, v in means.items()}
    assert means["good"] > 0.9
    assert means["good"] > means["verbose"] > means["wrong"]
    assert means["good"] > means["curt"] > means["wrong"]
    assert 0.55 <= means["verbose"] <= 0.8 and 0.5 <= means["curt"] <= 0.75 and means["wrong"] <= 0.25


def test_every_reference_answer_scores_high(tiny_world):
    for name in ["eval", "ppo", "ranking"]:
        for line in (tiny_world / f"prompts_{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert score(record, record["reference"])["score"] >= 0.9, record
