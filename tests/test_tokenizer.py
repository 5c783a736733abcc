import pytest

from minigpt.tokenizer import ASSISTANT, BOS, END, SPECIAL_TOKENS, USER, Tokenizer, train_tokenizer

from conftest import SHARED_DATA

CORPUS = (
    "Mara lives in Oakfield. Tom is a baker who lives in Brookside; his dog Pip barks.\n"
    "3 plus 4 is 7. 12 minus 5 is 7. The river runs past the old mill, and the market opens at dawn.\n"
    "Café, naïve, 東京 and emoji 🙂 are bytes too.\n"
) * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer([CORPUS], 400, tmp_path_factory.mktemp("tok"))


def test_round_trip_including_unicode(tokenizer):
    for text in [CORPUS[:500], "Hello, world!", "東京 🙂 naïve", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids_after_the_ranks(tokenizer):
    # At most the requested size (a small corpus can run out of merges before it is reached).
    n = tokenizer.vocab_size
    assert 256 + len(SPECIAL_TOKENS) < n <= 400
    ids = [tokenizer.special_ids[t] for t in SPECIAL_TOKENS]
    assert ids == list(range(n - len(SPECIAL_TOKENS), n))
    # In plain text, a special token's spelling is ordinary text, never the special id.
    assert not set(tokenizer.encode("<|end|> <|bos|>")) & set(ids)


def test_digits_are_split(tokenizer):
    assert [tokenizer.decode([i]) for i in tokenizer.encode("1234")] == ["1", "2", "3", "4"]


def test_tiktoken_and_fast_tokenizer_agree(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.to_transformers().save_pretrained(tmp_path)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    samples = [CORPUS[:2000]]
    if (SHARED_DATA / "tinyshakespeare.txt").exists():
        samples.append((SHARED_DATA / "tinyshakespeare.txt").read_text()[:20000])
    for text in samples:
        assert fast(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": "Where does Mara live?"},
                {"role": "assistant", "content": "Mara lives in Oakfield."},
                {"role": "user", "content": "And Tom?"},
                {"role": "assistant", "content": "Tom lives in Brookside."}]
    ids, mask = tokenizer.encode_chat(messages)
    rendered = fast.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert rendered["input_ids"] == ids
    assert rendered["assistant_masks"] == mask
    prompt = fast.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert prompt["input_ids"] == tokenizer.encode_prompt(messages[:1])


def test_chat_layout_and_assistant_mask(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ids, mask = tokenizer.encode_chat(messages)
    assert tokenizer.decode(ids) == f"{BOS}{USER}Hi{END}{ASSISTANT}Hello.{END}"
    answer = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(answer) == f"Hello.{END}"


def test_retraining_to_the_same_path_is_not_served_stale(tmp_path):
    first = train_tokenizer(["aaaa bbbb " * 50], 300, tmp_path)
    second = train_tokenizer(["xyzxyz qrs " * 50], 300, tmp_path)
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.encode("xyzxyz") == second.encode("xyzxyz")
    assert len(second.encode("xyzxyz")) < len(first.encode("xyzxyz"))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        Tokenizer.load(tmp_path)
