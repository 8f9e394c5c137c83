"""Tokenizers: characters (one id per Unicode code point seen in the corpus) and byte-level BPE.

Both answer the same questions, so the rest of tinyGPT never asks which one it holds:

* `encode(text)` → ids, `decode(ids)` → text;
* `token_bytes[id]`: the UTF-8 bytes a token stands for. A character token is one whole
  character; a BPE token is any run of bytes, which may end inside a character, so text is
  streamed through a `TextStream`, which holds a character's first bytes back until its
  last one arrives;
* `byte_lengths` and `char_starts` (arrays over the vocabulary): how many UTF-8 bytes a
  token has and how many characters start in it. Summed over a split's tokens they give its
  bytes and characters exactly, which is how bits per byte and bits per character are
  computed for either tokenizer.

The BPE is Hugging Face `tokenizers`' byte-level BPE (as GPT-2's): the text is cut into
word-like pieces by GPT-2's pattern, each piece's UTF-8 bytes are spelled with 256 visible
stand-in characters (so every byte, and thus every text, can be encoded), and the merges
learned from the corpus join them into longer tokens. It is saved as a standard
`tokenizer.json` that `tokenizers.Tokenizer.from_file` and `transformers` read as is.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tinygpt.errors import TinyGPTError, UnknownCharacterError

__all__ = ["CharTokenizer", "BPETokenizer", "Tokenizer", "TextStream", "UnknownCharacterError",
           "tokenizer_from_dict", "train_bpe", "check_bpe_vocab_size", "MAX_CODE_POINT", "MAX_VOCAB_SIZE",
           "BYTE_ALPHABET", "KINDS"]

MAX_CODE_POINT = 0x110000
MAX_VOCAB_SIZE = 65536  # ids must fit in uint16 token files
BYTE_ALPHABET = 256  # a byte-level BPE starts from one token per byte value
KINDS = ("char", "bpe")


def _ids_dtype(vocab_size: int) -> type:
    return np.uint8 if vocab_size <= 256 else np.uint16


class _Tables:
    """What both tokenizers derive from `token_bytes`."""

    token_bytes: list[bytes]
    dtype: type

    def _build_tables(self) -> None:
        self.byte_lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        # a character starts at every byte that is not a continuation byte (10xxxxxx)
        self.char_starts = np.array([sum((c & 0xC0) != 0x80 for c in b) for b in self.token_bytes], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def display(self, token: int) -> str:
        """A token as a person reads it: its text, with any byte of an unfinished character as \\xNN."""
        return self.token_bytes[int(token)].decode("utf-8", errors="backslashreplace")

    def file_text(self) -> str:
        raise NotImplementedError

    def save(self, path) -> None:
        Path(path).write_text(self.file_text(), encoding="utf-8")

    def stream(self) -> TextStream:
        return TextStream(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError


class TextStream:
    """Tokens in, text out, never half a character: a token that ends inside a multi-byte
    character is held until the bytes that finish it arrive (`flush` gives what is left,
    an unfinishable rest as U+FFFD)."""

    def __init__(self, token_bytes: list[bytes]):
        self.token_bytes = token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self.decoder.decode(self.token_bytes[token])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class CharTokenizer(_Tables):
    """Maps characters to ids by their rank in the sorted vocabulary."""

    kind = "char"

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise TinyGPTError("a character vocabulary needs distinct single characters")
        if len(chars) > MAX_VOCAB_SIZE:
            raise TinyGPTError(
                f"vocabulary has {len(chars)} symbols; at most {MAX_VOCAB_SIZE} are supported"
            )
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.dtype = _ids_dtype(len(chars))
        # code point -> id lookup table for vectorised encoding; -1 marks "not in vocabulary"
        self.table = np.full(MAX_CODE_POINT, -1, dtype=np.int32)
        self.table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
        self.token_bytes = [c.encode("utf-8", errors="surrogatepass") for c in self.chars]
        self._build_tables()

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = self.table[code_points]
        if (ids < 0).any():
            missing = sorted(set(text) - set(self.index))
            shown = ", ".join(repr(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UnknownCharacterError(f"characters not in the vocabulary: {shown}{more}")
        return ids.astype(self.dtype)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def display(self, token: int) -> str:
        return self.chars[int(token)]

    def start_ids(self) -> list[int]:
        """What a generation with an empty prompt starts from: a newline, else the first symbol."""
        return [self.index.get("\n", 0)]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        if not isinstance(data, dict) or data.get("type") != "char" or not isinstance(
            data.get("chars"), list
        ):
            raise TinyGPTError("not a tinygpt character tokenizer")
        return cls(data["chars"])

    def file_text(self) -> str:
        """What `save` writes: tinyGPT's own JSON of the vocabulary."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def load(cls, path) -> CharTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _byte_stand_ins() -> dict[str, int]:
    """GPT-2's spelling of bytes as characters, inverted: stand-in character → byte value.
    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls,
    space, soft hyphen, ...) are spelled with the code points from U+0100 up, in byte order."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    stand_in = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in stand_in.items()}


class BPETokenizer(_Tables):
    """A byte-level BPE held by Hugging Face `tokenizers`, with tinyGPT's tables beside it."""

    kind = "bpe"

    def __init__(self, json_text: str, where: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        _check_byte_level_bpe(json_text, where)
        try:
            self.tokenizer = Tokenizer.from_str(json_text)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TinyGPTError(f"{where} is not a valid tokenizer.json: {e}") from None
        self.json_text = json_text
        vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size > MAX_VOCAB_SIZE:
            raise TinyGPTError(f"{where} has {vocab_size} tokens; at most {MAX_VOCAB_SIZE} are supported")
        bytes_of = _byte_stand_ins()
        self.token_bytes = []
        for token_id in range(vocab_size):
            token = self.tokenizer.id_to_token(token_id)
            if token is None or any(c not in bytes_of for c in token):
                raise TinyGPTError(f"{where} is not a byte-level BPE tinyGPT can read: "
                                   f"id {token_id} is {token!r}, not a byte sequence")
            self.token_bytes.append(bytes(bytes_of[c] for c in token))
        missing = BYTE_ALPHABET - len({b for b in self.token_bytes if len(b) == 1})
        if missing:
            raise TinyGPTError(f"{where} lacks {missing} of the 256 single-byte tokens, so it cannot encode every text")
        self.dtype = _ids_dtype(vocab_size)
        self._build_tables()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=self.dtype)

    def start_ids(self) -> list[int]:
        """What a generation with an empty prompt starts from: a newline."""
        return self.encode("\n")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once, encoded in parallel by the Rust side."""
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=self.dtype) for e in encodings]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "tokenizer_json": self.json_text}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        if not isinstance(data, dict) or data.get("type") != "bpe" or not isinstance(data.get("tokenizer_json"), str):
            raise TinyGPTError("not a tinygpt BPE tokenizer")
        return cls(data["tokenizer_json"])

    def file_text(self) -> str:
        """What `save` writes: the standard tokenizer.json."""
        return self.json_text

    @classmethod
    def load(cls, path) -> BPETokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinyGPTError(f"cannot read {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
        return cls(text, where=repr(str(path)))


def _check_byte_level_bpe(json_text: str, where: str) -> None:
    """One line for a tokenizer.json that is not JSON, or not the kind tinyGPT writes."""
    try:
        data = json.loads(json_text)
    except ValueError as e:
        raise TinyGPTError(f"{where} is not a valid tokenizer.json (not JSON: {e})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TinyGPTError(f"{where} is {'a ' + str(kind) if kind else 'not a'} tokenizer; "
                           f"tinyGPT reads byte-level BPE tokenizers only")
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        raise TinyGPTError(f"{where} is a BPE without tinyGPT's byte-level pre-tokenizer "
                           f"(ByteLevel, no prefix space); tinyGPT reads only the tokenizers it trains")


def tokenizer_from_dict(data: Any) -> CharTokenizer | BPETokenizer:
    """The tokenizer a data description or a checkpoint record holds."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer.from_dict(data)
    if kind == "bpe":
        return BPETokenizer.from_dict(data)
    raise TinyGPTError(f"unknown tokenizer type {kind!r}; this tinyGPT knows {', '.join(KINDS)}")


def check_bpe_vocab_size(vocab_size: int) -> None:
    if not BYTE_ALPHABET <= vocab_size <= MAX_VOCAB_SIZE:
        raise TinyGPTError(f"--vocab-size must be between {BYTE_ALPHABET} (one token per byte value) and "
                           f"{MAX_VOCAB_SIZE} (ids are stored as uint16), got {vocab_size}")


def train_bpe(texts: Iterator[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of at most `vocab_size` tokens learned from `texts` (streamed: the
    trainer keeps the count of each distinct piece, not the text). Fewer when the text runs
    out of pairs to merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab_size(vocab_size)
    bpe = Tokenizer(models.BPE())
    # no prefix space: a text encodes the same whether it is encoded whole or cut into pieces
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    # a tokenizer read back from its JSON encodes faster than the trainer's own object
    return BPETokenizer(bpe.to_str())


Tokenizer = CharTokenizer | BPETokenizer
