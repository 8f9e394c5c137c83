"""The character tokenizer: one id per Unicode code point seen in the corpus."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tinygpt.errors import TinyGPTError, UnknownCharacterError

__all__ = ["CharTokenizer", "UnknownCharacterError", "MAX_CODE_POINT", "MAX_VOCAB_SIZE"]

MAX_CODE_POINT = 0x110000
MAX_VOCAB_SIZE = 65536  # ids must fit in uint16 token files


class CharTokenizer:
    """Maps characters to ids by their rank in the sorted vocabulary."""

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TinyGPTError("a character vocabulary needs distinct single characters")
        if len(chars) > MAX_VOCAB_SIZE:
            raise TinyGPTError(
                f"vocabulary has {len(chars)} symbols; at most {MAX_VOCAB_SIZE} are supported"
            )
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.dtype = np.uint8 if len(chars) <= 256 else np.uint16
        # code point -> id lookup table for vectorised encoding; -1 marks "not in vocabulary"
        self.table = np.full(MAX_CODE_POINT, -1, dtype=np.int32)
        self.table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self.table[code_points]
        if (ids < 0).any():
            missing = sorted(set(text) - set(self.index))
            shown = ", ".join(repr(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UnknownCharacterError(f"characters not in the vocabulary: {shown}{more}")
        return ids.astype(self.dtype)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        if not isinstance(data, dict) or data.get("type") != "char" or not isinstance(
            data.get("chars"), list
        ):
            raise TinyGPTError("not a tinygpt character tokenizer")
        return cls(data["chars"])

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path) -> CharTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
