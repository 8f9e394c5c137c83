import json

import numpy as np
import pytest

from helpers import MIXED_TEXT
from tinygpt.config import TinyGPTError
from tinygpt.tokenizer import MAX_VOCAB_SIZE, CharTokenizer, UnknownCharacterError


def tokenizer_for(text: str) -> CharTokenizer:
    return CharTokenizer(sorted(set(text)))


def test_round_trip_non_ascii():
    tokenizer = tokenizer_for(MIXED_TEXT)
    ids = tokenizer.encode(MIXED_TEXT)
    assert len(ids) == len(MIXED_TEXT)  # one id per code point, emoji included
    assert tokenizer.decode(ids) == MIXED_TEXT
    assert tokenizer.decode(tokenizer.encode_array(MIXED_TEXT)) == MIXED_TEXT


def test_ids_are_ranks_by_code_point():
    tokenizer = CharTokenizer(sorted(set("cab😀é")))
    assert tokenizer.chars == ["a", "b", "c", "é", "😀"]
    assert tokenizer.encode("😀abcé") == [4, 0, 1, 2, 3]


def test_unknown_characters_are_named():
    tokenizer = tokenizer_for("hello world")
    with pytest.raises(UnknownCharacterError) as info:
        tokenizer.encode("hello ☃ wörld 😀")
    message = str(info.value)
    for char in "☃ö😀":
        assert repr(char) in message
    assert "'h'" not in message  # only the missing ones
    assert isinstance(info.value, TinyGPTError)


def test_many_unknown_characters_are_summarised():
    tokenizer = tokenizer_for("a")
    with pytest.raises(UnknownCharacterError, match="and 5 more"):
        tokenizer.encode("bcdefghijklmnop")


@pytest.mark.parametrize(("size", "dtype"), [(1, np.uint8), (256, np.uint8), (257, np.uint16), (3000, np.uint16)])
def test_dtype_fits_the_vocabulary(size, dtype):
    chars = [chr(0x4E00 + i) for i in range(size)]  # CJK ideographs
    tokenizer = CharTokenizer(chars)
    assert tokenizer.dtype == dtype
    text = "".join(chars[::-1])
    ids = tokenizer.encode_array(text)
    assert ids.dtype == dtype
    assert int(ids.max()) == size - 1
    assert tokenizer.decode(ids) == text


def test_save_and_load_json(tmp_path):
    tokenizer = tokenizer_for(MIXED_TEXT)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    assert json.loads(path.read_text(encoding="utf-8"))["chars"] == tokenizer.chars
    loaded = CharTokenizer.load(path)
    assert loaded.chars == tokenizer.chars
    assert loaded.encode(MIXED_TEXT) == tokenizer.encode(MIXED_TEXT)


@pytest.mark.parametrize(("chars", "message"), [
    (["a", "a"], "distinct single characters"),
    (["ab"], "distinct single characters"),
    ([chr(0x10000 + i) for i in range(MAX_VOCAB_SIZE + 1)], f"{MAX_VOCAB_SIZE + 1} symbols; at most {MAX_VOCAB_SIZE}"),
], ids=["repeated", "two-character-symbol", "too-many"])
def test_invalid_vocabularies(chars, message):
    with pytest.raises(TinyGPTError, match=message):
        CharTokenizer(chars)


@pytest.mark.parametrize("data", [{"type": "bpe", "chars": ["a"]}, {"type": "char"}, ["a", "b"]])
def test_foreign_tokenizer_json(data):
    with pytest.raises(TinyGPTError, match="not a tinygpt character tokenizer"):
        CharTokenizer.from_dict(data)
