"""The gold judge: a deterministic scorer that stands in for human labellers.

`score(record, response, finished=True)` rates one response to one prompt record (a line of
prompts_*.jsonl, or the "judge" field of an SFT dialogue) and returns

    {"score": float, "correct": float, "complete": float, "concise": float, "clean": float}

all in [0, 1]. It ranks the samples the reward model learns from and measures every stage on the
held-out prompts, so it is built not to be fooled by cheap tricks (naming every candidate, repeating
the answer, padding).

Components
- correct:  the expected answer is there and nothing that contradicts it is. By the record's "check":
            mention  an accepted answer (e.g. the town) is named and no other candidate of the same
                     category is: "Mara lives in Oakfield, Brookside and Redhill" is not correct;
            number   the answer number is there (digits or words) and no number other than the
                     question's own operands ("numbers") is;
            count    the numbers start..end appear in order, with nothing outside the range;
            repeat   the word appears `times` times in a row (and not more);
            greet    a greeting word and the name, and no other person's name.
- complete: half for a full sentence (a capital letter or digit first, two or more words, real words
            and not just a list), half for restating the subject (the person's name, the operands,
            the habitat ...), so "oakfield" gets 0 and "Mara lives in Oakfield." gets 1.
- concise:  1 up to the reference answer's length plus a little slack; every further word costs
            1/12, so filler loses points smoothly and a very long answer loses them all.
- clean:    a product of four checks: ends on . ! or ? (else x0.5); the model emitted its end of turn,
            `finished` (else x0.5); no repetition - a word right after itself, a 3-gram or a whole
            sentence said again (x0 once 40% of it repeats); no run-on sentence (x0 at 60 words
            without a full stop).

Combination. Each style flaw removes a fixed share of the credit, independently of the others, and
being wrong caps the score at 0.2 - fluency is worth something, never as much as being right:

    style = (1 - 0.25 (1 - complete)) * (1 - 0.35 (1 - concise)) * (1 - 0.50 (1 - clean))
    score = style * (0.2 + 0.8 * correct)

What that gives (tested in tests/test_judge.py): a good short sentence ~1.0; correct but padded
~0.65-0.75; a bare lowercase answer ~0.55-0.65; a fluent wrong answer 0.2; every candidate listed
<= 0.2; the right sentence said twice <= 0.5, five times ~0.35; a good sentence never finished 0.75;
an empty response 0.

Matching is on words: lowercase, possessive 's and trailing punctuation dropped, plurals folded
("apples" = "apple"), and number words read as numbers ("twenty-one" = "21"). A number word such as
"one" therefore counts as a number wherever it appears.
"""

from __future__ import annotations

import re

STYLE_WEIGHTS = {"complete": 0.25, "concise": 0.35, "clean": 0.50}
WRONG_CREDIT = 0.2  # the most a wrong answer can score
CONCISE_WORD_COST = 1 / 12  # per word past the reference length plus slack
RUN_ON_WORDS = 30  # a sentence longer than this starts to lose `clean`; twice this loses it all
GREETINGS = ("hello", "hi", "hey", "greetings", "welcome")

SMALL_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SMALL = {word: value for value, word in enumerate(SMALL_NUMBERS)}
_TENS = {word: 10 * value for value, word in enumerate(TENS) if word}
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+")
_SENTENCE_END = re.compile(r"[.!?]+")


def number_to_words(n: int) -> str:
    """0..999 in English words: 21 -> "twenty-one", 105 -> "one hundred and five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_to_words: {n} is outside 0..999")
    if n < 20:
        return SMALL_NUMBERS[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + SMALL_NUMBERS[n % 10])
    rest = n % 100
    return SMALL_NUMBERS[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_to_words(rest))


def words(text: str) -> list[str]:
    """The normalised words of a text: lowercase, number words as digits, plurals folded."""
    tokens = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    tokens = [t[:-2] if t.endswith("'s") else t for t in tokens]
    return [_singular(t) for t in _fold_numbers(tokens)]


def _singular(word: str) -> str:
    if word.isdigit() or len(word) <= 3 or word.endswith("ss") or not word.endswith("s"):
        return word
    if word.endswith("es") and word[:-2].endswith(("x", "sh", "ch", "ss")):
        return word[:-2]
    return word[:-1]


def _fold_numbers(tokens: list[str]) -> list[str]:
    """Number words -> digits: "twenty one" -> "21", "two hundred and five" -> "205", "one two" -> "1 2"."""
    out, i = [], 0
    while i < len(tokens):
        value, i = _read_number(tokens, i)
        if value is None:
            out.append(tokens[i])
            i += 1
        else:
            out.append(str(value))
    return out


def _read_number(tokens: list[str], i: int) -> tuple[int | None, int]:
    """The number spelled from tokens[i] on (or None) and the index after it."""
    value, i = _read_below_hundred(tokens, i)
    if value is None:
        return None, i
    if i < len(tokens) and tokens[i] == "hundred":
        value, i = value * 100, i + 1
        j = i + 1 if i < len(tokens) and tokens[i] == "and" else i
        rest, after = _read_below_hundred(tokens, j)
        if rest is not None:
            value, i = value + rest, after
    return value, i


def _read_below_hundred(tokens: list[str], i: int) -> tuple[int | None, int]:
    if i >= len(tokens):
        return None, i
    word = tokens[i]
    if word in _TENS:
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if following in _SMALL and 0 < _SMALL[following] < 10:
            return _TENS[word] + _SMALL[following], i + 2
        return _TENS[word], i + 1
    if word in _SMALL:
        return _SMALL[word], i + 1
    return None, i


def _contains(tokens: list[str], phrase: str) -> bool:
    """Whether the words of `phrase` appear in `tokens` as a contiguous run."""
    target = words(phrase)
    if not target:
        return False
    n = len(target)
    return any(tokens[i:i + n] == target for i in range(len(tokens) - n + 1))


def _numbers(tokens: list[str]) -> list[int]:
    return [int(t) for t in tokens if t.isdigit()]


# -- the components ---------------------------------------------------------------------------------

def correctness(record: dict, tokens: list[str]) -> float:
    """1.0 when the response gives the record's answer and nothing that contradicts it, else 0.0."""
    check = record.get("check", "mention")
    accepted = record.get("accepted") or [record["answer"]]
    candidates = [c for c in record.get("candidates", []) if c not in accepted]
    names_wrong_candidate = any(_contains(tokens, c) for c in candidates)

    if check == "mention":
        return float(any(_contains(tokens, a) for a in accepted) and not names_wrong_candidate)
    if check == "number":
        expected = int(record["answer"])
        allowed = {expected, *(int(n) for n in record.get("numbers", []))}
        found = _numbers(tokens)
        return float(expected in found and all(n in allowed for n in found))
    if check == "count":
        start, end = int(record["start"]), int(record["end"])
        found = _numbers(tokens)
        expected = list(range(start, end + 1))
        has_run = any(found[i:i + len(expected)] == expected for i in range(len(found)))
        return float(has_run and all(start <= n <= end for n in found))
    if check == "repeat":
        word = words(record["word"])[0]
        longest = run = 0
        for token in tokens:
            run = run + 1 if token == word else 0
            longest = max(longest, run)
        return float(longest == int(record["times"]) and tokens.count(word) <= int(record["times"]) + 1)
    if check == "greet":
        greeted = any(g in tokens for g in GREETINGS)
        return float(greeted and _contains(tokens, record["answer"]) and not names_wrong_candidate)
    raise ValueError(f"judge: record {record.get('id', '')!r} has unknown check {check!r}; "
                     f"expected mention, number, count, repeat or greet")


def completeness(record: dict, response: str, tokens: list[str]) -> float:
    """Half for being a sentence, half for restating the subject of the question."""
    subject = record.get("subject", [])
    restated = sum(_contains(tokens, s) for s in subject) / len(subject) if subject else 1.0
    return 0.5 * float(_is_sentence(response, tokens)) + 0.5 * restated


def _is_sentence(response: str, tokens: list[str]) -> bool:
    first = response.lstrip(" \"'(*-")[:1]
    has_real_word = any(t.isalpha() and len(t) >= 2 for t in tokens)
    return bool(first) and (first.isupper() or first.isdigit()) and len(tokens) >= 2 and has_real_word


def conciseness(record: dict, tokens: list[str]) -> float:
    """1 up to the reference length plus slack, then 1/12 less for every further word."""
    reference_length = len(words(record.get("reference", record["answer"])))
    slack = max(2.0, reference_length / 4)
    extra = len(tokens) - reference_length - slack
    return min(1.0, max(0.0, 1.0 - CONCISE_WORD_COST * max(0.0, extra)))


def cleanliness(record: dict, response: str, tokens: list[str], finished: bool) -> float:
    """Ends properly, was finished, does not repeat itself, has no run-on sentence."""
    ending = response.rstrip().rstrip("\"')*")
    terminal = 1.0 if ending.endswith((".", "!", "?")) else 0.5
    ended = 1.0 if finished else 0.5
    # the repeat instruction asks for one word many times: that word is not a flaw there
    exempt = set(words(record["word"])) if record.get("check") == "repeat" else set()
    kept = [t for t in tokens if t not in exempt]
    sentences = [tuple(w for w in words(part) if w not in exempt) for part in _SENTENCE_END.split(response)]
    sentences = [sentence for sentence in sentences if sentence]
    repeated_sentences = 1 - len(set(sentences)) / len(sentences) if sentences else 0.0
    repetition = max(0.0, 1.0 - 2.5 * max(_repeated_share(kept), repeated_sentences))
    longest = max((len(words(s)) for s in _SENTENCE_END.split(response)), default=0)
    run_on = min(1.0, max(0.0, 1.0 - (longest - RUN_ON_WORDS) / RUN_ON_WORDS))
    return terminal * ended * repetition * run_on


def _repeated_share(tokens: list[str]) -> float:
    """The larger of: the share of 3-grams seen before, the share of words equal to the previous one.
    (Whole sentences said again are counted by the caller.)"""
    trigrams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    repeated_trigrams = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    stutters = sum(a == b and not a.isdigit() for a, b in zip(tokens, tokens[1:]))
    return max(repeated_trigrams, stutters / max(1, len(tokens) - 1))


# -- the score --------------------------------------------------------------------------------------

NO_JUDGE_NOTE = ("no gold figures: these prompts carry no judge records (an expected answer to check); "
                 "gold figures need judge records, as the generated world's prompts have")


def has_judge_records(records) -> bool:
    """Whether the gold judge can score answers to these prompts: each must say what the answer is."""
    records = list(records)
    return bool(records) and all(isinstance(r, dict) and r.get("answer") is not None for r in records)


def score(record: dict, response: str, finished: bool = True) -> dict:
    """The gold judge's score of `response` to the prompt `record`, with its components."""
    if not response or not response.strip():
        return {"score": 0.0, "correct": 0.0, "complete": 0.0, "concise": 0.0, "clean": 0.0}
    tokens = words(response)
    components = {
        "correct": correctness(record, tokens),
        "complete": completeness(record, response, tokens),
        "concise": conciseness(record, tokens),
        "clean": cleanliness(record, response, tokens, finished),
    }
    style = 1.0
    for name, weight in STYLE_WEIGHTS.items():
        style *= 1.0 - weight * (1.0 - components[name])
    total = style * (WRONG_CREDIT + (1.0 - WRONG_CREDIT) * components["correct"])
    return {"score": total, **components}


def score_many(records: list[dict], responses: list[str], finished: list[bool] | None = None) -> tuple[float, dict]:
    """Mean score over prompts and the mean of each component (for evaluations)."""
    if len(records) != len(responses):
        raise ValueError(f"score_many: {len(records)} records but {len(responses)} responses")
    if not records:
        return 0.0, {}
    finished = finished if finished is not None else [True] * len(records)
    results = [score(r, text, done) for r, text, done in zip(records, responses, finished)]
    means = {key: sum(result[key] for result in results) / len(results) for key in results[0]}
    return means.pop("score"), means


__all__ = ["score", "score_many", "words", "number_to_words", "correctness", "completeness",
           "conciseness", "cleanliness"]
