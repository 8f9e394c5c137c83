"""Reading a UTF-8 file chunk by chunk as code points: how `tinygpt.data.prepare` decodes text.

UTF-8 writes each character (code point) in 1 to 4 bytes. ASCII (U+0000..U+007F) is one byte
below 0x80. Any other character starts with a *lead* byte (0xC2..0xF4) that says how many bytes
follow, and each following byte is a *continuation* byte, 0b10xxxxxx, carrying 6 more bits:

    U+0041 'A'   01000001
    U+00E9 'é'   110_00011 10_101001
    U+65E5 '日'  1110_0110 10_010111 10_100101
    U+1F600 '😀' 11110_000 10_011111 10_011000 10_000000

`prepare` needs, for every chunk, the number of times each code point occurs (pass 1) and the
code points themselves, to map them to token ids (pass 2). There are two ways to get them:

- **plain**: Python's incremental decoder turns the bytes into a `str`, and
  `np.frombuffer(text.encode("utf-32-le"), np.uint32)` makes that one uint32 per character;
  `np.bincount` counts them and a lookup table indexed by code point maps them to ids. Python's
  decoder also checks the bytes and reports the offset of the first invalid one.
- **vectorised**: most corpora are mostly ASCII, and ASCII needs no decoding: its bytes *are*
  its code points. A pure-ASCII chunk is counted as bytes (`torch.bincount`) and mapped to ids
  by `bytes.translate`, without ever becoming a `str`. In an ASCII-heavy chunk only the
  multi-byte characters are decoded, with array operations over their lead bytes
  (`decode_multibyte`): one table lookup on each lead byte and the byte after it gives the
  character's length (and rejects every invalid pair), shifts and masks assemble its code
  point. `encode` then drops the continuation bytes with `bytes.translate`, which leaves one
  byte per character, and writes the multi-byte characters' ids over their lead bytes.

The vectorised method falls back to the plain one, per chunk, whenever it would not win or
not be exact: a chunk in which most bytes are non-ASCII (text in a non-Latin script, where
array operations per character cost more than Python's decoder), and any chunk that is not
valid UTF-8 (so that error offsets and `--encoding-errors replace` counts are Python's own).
`tally` counts a chunk's code points with work that follows the chunk's size, never the 1.1 M
possible code points (`np.bincount` when the chunk is long enough to fill its table, a sort
otherwise). On request the reader drops a BOM that starts the file and turns CR LF and lone CR
into LF, wherever the chunks are cut, on the bytes (vectorised) or the text (plain) alike.

`METHOD` picks the method for the whole run; `benchmarks/prepare_speed.py` flips it to compare
the two, and BENCHMARKS.md ("Preparation") has the figures that decided which one is default.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

METHODS = ("vectorised", "plain")
METHOD = "vectorised"  # read when a file's reading starts; the benchmark sets "plain" to compare

# Above this share of non-ASCII bytes (text in a non-Latin script, not ASCII-heavy), Python's
# decoder is faster than decoding character by character with array operations.
DENSE_NON_ASCII = 0.5


class UndecodableFile(Exception):
    """Invalid UTF-8 under the strict policy, at byte `offset` of the file (Python's offset)."""

    def __init__(self, offset: int, reason: str):
        self.offset = offset
        self.reason = reason


# U+FFFD substitutions made under errors="replace" since the caller last zeroed the count. One
# handler call covers one maximal invalid byte sequence, exactly as Python's own "replace" does.
replacements = {"count": 0}


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    replacements["count"] += 1
    return "\ufffd", error.end


codecs.register_error("tinygpt-count-replace", _count_and_replace)


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


def decode_multibyte(utf8: np.ndarray, non_ascii: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
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


class Utf8Chunk(NamedTuple):
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


# What the reader yields: a vectorised chunk, or the code points Python's decoder gave (uint32).
Chunk = Utf8Chunk | np.ndarray


def complete_length(data: bytearray, size: int) -> int:
    """Length of `data[:size]` without a multi-byte character cut off at its end by the read."""
    for i in range(size - 1, max(size - 4, -1), -1):
        byte = data[i]
        if byte < 0x80:
            return size
        if byte >= 0xC0:  # a lead byte: is its whole sequence here?
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return i if i + needed > size else size
    return size


def _vectorised_chunk(data: bytearray, size: int, final: bool) -> Utf8Chunk | None:
    """The chunk decoded with array operations, or None where Python's decoder should take it:
    invalid UTF-8, or mostly non-ASCII bytes. A character cut off by the read (not by the end
    of the file) is left out of `length`, for the next read to complete."""
    if data.isascii():
        return Utf8Chunk(data, size)
    length = size if final else complete_length(data, size)
    utf8 = np.frombuffer(data, dtype=np.uint8, count=length)
    non_ascii = np.count_nonzero(utf8 >= 0x80)
    if non_ascii > DENSE_NON_ASCII * length:
        return None
    decoded = decode_multibyte(utf8, non_ascii)
    return None if decoded is None else Utf8Chunk(data, length, *decoded)


def _read_into(f, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


BOM = b"\xef\xbb\xbf"  # U+FEFF, which some editors put at the start of a UTF-8 file


@dataclass
class TextChanges:
    """What the reader changed in one file's text, when asked to (see `decoded_chunks`)."""

    bom_stripped: bool = False
    crlf_converted: int = 0  # CR LF pairs that became one LF
    cr_converted: int = 0  # lone CRs (old Mac line ends) that became LF


def _lf_text(text: str, after_cr: bool, changes: TextChanges) -> str:
    """`text` with CR LF and lone CR made LF. `after_cr`: the text before it ended with a CR,
    already made LF, so a LF at the start completes a CR LF pair and goes."""
    if after_cr and text.startswith("\n"):
        text = text[1:]
        changes.crlf_converted += 1
        changes.cr_converted -= 1  # counted as lone when its chunk ended
    if "\r" in text:
        length = len(text)
        text = text.replace("\r\n", "\n")
        changes.crlf_converted += length - len(text)
        lone = text.count("\r")
        if lone:
            changes.cr_converted += lone
            text = text.replace("\r", "\n")
    return text


def _lf_chunk(chunk: Utf8Chunk, after_cr: bool, changes: TextChanges) -> Utf8Chunk:
    """`_lf_text` for a vectorised chunk, on its bytes: CR and LF are ASCII, never part of a
    multi-byte character, so only the multi-byte characters' offsets move (by the bytes dropped
    before them). The chunk comes back as it was if it holds no CR, the common case; when all
    its CRs begin CR LF pairs (a Windows file), dropping every CR is one `bytes.translate`."""
    first = int(after_cr and chunk.data[0] == 0x0A)
    if not first and chunk.data.find(b"\r", 0, chunk.length) < 0:
        return chunk
    raw = chunk.data[first : chunk.length]  # a copy: the reader's buffer is reused
    utf8 = np.frombuffer(raw, dtype=np.uint8)
    carriage_returns = np.flatnonzero(utf8 == 0x0D)
    pair_starts = carriage_returns[utf8.take(carriage_returns + 1, mode="clip") == 0x0A]
    lone = len(carriage_returns) - len(pair_starts)
    if lone:
        text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    else:
        text = raw.translate(None, b"\r")
    changes.crlf_converted += first + len(pair_starts)
    changes.cr_converted += lone - first
    leads = chunk.lead_offsets
    if len(leads) and (first or len(pair_starts)):
        leads = leads - first
        leads = leads - np.searchsorted(pair_starts, leads)  # one byte gone per CR LF before it
    return Utf8Chunk(text, len(text), leads, chunk.lead_lengths, chunk.code_points)


def decoded_chunks(
    path: Path, errors: str, chunk_bytes: int, on_bytes: Callable[[int], object] | None = None, *,
    strip_bom: bool = False, lf_line_endings: bool = False, changes: TextChanges | None = None,
) -> Iterator[Chunk]:
    """Yield the file's text `chunk_bytes` at a time, as a `Utf8Chunk` (vectorised) or as a
    uint32 array of code points from Python's incremental decoder (plain, and the vectorised
    method's fallback). `errors` is "strict" (raise `UndecodableFile`) or "replace" (U+FFFD,
    counted in `replacements`). A read that cuts a character in two carries its first bytes
    over to the next chunk; Python's decoder is only ever started where every byte before has
    been decoded, so what it reports is what it would report decoding the whole file at once.
    `on_bytes` is called with the number of bytes each read took from the file.

    `strip_bom` drops a BOM that starts the file; `lf_line_endings` makes CR LF and lone CR
    one LF each, as Python's universal newlines do, wherever the chunks are cut. `changes`
    counts what they changed. Error offsets stay offsets in the file as it is on disk."""
    if METHOD not in METHODS:
        raise ValueError(f"tinygpt.utf8.METHOD must be one of {METHODS}, not {METHOD!r}")
    vectorised = METHOD == "vectorised"
    changes = changes if changes is not None else TextChanges()
    handler = "tinygpt-count-replace" if errors == "replace" else "strict"
    decoder = codecs.getincrementaldecoder("utf-8")(handler)
    after_cr = False  # the text yielded last ended with a CR (line endings only)
    start = 0  # file offset of buffer[0]
    with open(path, "rb", buffering=0) as f:
        if strip_bom and f.read(len(BOM)) == BOM:
            start = len(BOM)
            changes.bom_stripped = True
            if on_bytes is not None:
                on_bytes(start)
        else:
            f.seek(0)
        # reused for every read; holds any whole character; a small file takes one small read
        file_bytes = os.fstat(f.fileno()).st_size - start
        buffer = bytearray(max(4, min(chunk_bytes, max(file_bytes + 1, 1 << 16))))
        view = memoryview(buffer)
        carried = 0  # bytes at the start of the buffer: a character the previous read cut off
        while True:
            got = _read_into(f, view[carried:])
            size = carried + got
            final = size < len(buffer)  # the file ended
            data = buffer if not final else buffer[:size]
            pending = decoder.getstate()[0]  # bytes Python's decoder holds back
            chunk = _vectorised_chunk(data, size, final) if vectorised and not pending else None
            if chunk is not None:
                carried = size - chunk.length
                if chunk.length and lf_line_endings:
                    ends_with_cr = chunk.data[chunk.length - 1] == 0x0D
                    chunk = _lf_chunk(chunk, after_cr, changes)
                    after_cr = ends_with_cr
                if chunk.length:
                    yield chunk
            else:
                carried = 0
                try:
                    text = decoder.decode(data, final=final)
                except UnicodeDecodeError as e:
                    raise UndecodableFile(start - len(pending) + e.start, e.reason) from None
                if text and lf_line_endings:
                    ends_with_cr = text.endswith("\r")
                    text = _lf_text(text, after_cr, changes)
                    after_cr = ends_with_cr
                if text:
                    yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            if on_bytes is not None:
                on_bytes(got)
            if final:
                return
            buffer[:carried] = buffer[size - carried : size]
            start += size - carried


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch.bincount on a 1 MiB chunk is fastest on one thread: waking the thread pool for it
    costs more than it saves, and much more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_NO_COUNTS = np.zeros(0, dtype=np.int64)


def _distinct(code_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of `code_points` and how often each occurs, in increasing order:
    np.bincount when its table (as long as the largest code point) is not much longer than the
    array, else a sort (np.unique), so the cost follows the array, never the 1.1 M code points."""
    if not len(code_points):
        return _NO_INDICES, _NO_COUNTS
    if int(code_points.max()) < 8 * len(code_points) + 1024:
        per_code_point = np.bincount(code_points)
        present = np.flatnonzero(per_code_point)
        return present, per_code_point[present]
    present, counts = np.unique(code_points, return_counts=True)
    return present.astype(np.intp), counts.astype(np.int64)


def text_of(chunk: Chunk) -> str:
    """The chunk's characters as a str (what a tokenizer of Python strings needs)."""
    if isinstance(chunk, Utf8Chunk):
        return chunk.data[:chunk.length].decode("utf-8")
    return chunk.tobytes().decode("utf-32-le")


def byte_count(chunk: Chunk, characters: int | None = None) -> int:
    """UTF-8 bytes of the chunk's text, or of its first `characters` characters."""
    if isinstance(chunk, Utf8Chunk):
        if characters is None or characters >= chunk.characters:
            return chunk.length
        if not len(chunk.lead_offsets):
            return characters  # ASCII: a byte per character
        before = int(np.searchsorted(chunk.character_offsets(), characters))  # multi-byte ones among them
        return characters + int((chunk.lead_lengths[:before] - 1).sum(dtype=np.intp))
    code_points = chunk if characters is None else chunk[:characters]
    return int(len(code_points) + (code_points >= 0x80).sum() + (code_points >= 0x800).sum()
               + (code_points >= 0x10000).sum())


def tally(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's distinct code points, in increasing order, and how often each occurs."""
    if not isinstance(chunk, Utf8Chunk):
        return _distinct(chunk)
    # torch counts the bytes as they are; np.bincount would first widen each to int64
    raw = torch.frombuffer(chunk.data, dtype=torch.uint8, count=chunk.length)
    ascii_counts = torch.bincount(raw, minlength=256)[:128].numpy()  # the ASCII characters
    ascii_present = np.flatnonzero(ascii_counts)
    if not len(chunk.code_points):
        return ascii_present, ascii_counts[ascii_present]
    present, counts = _distinct(chunk.code_points)  # all >= 128: no overlap with the ASCII ones
    return np.concatenate([ascii_present, present]), np.concatenate([ascii_counts[ascii_present], counts])


def encode(chunk: Chunk, table: np.ndarray, ascii_ids: bytes) -> np.ndarray:
    """The chunk's characters as token ids (`table` maps code points to ids; `ascii_ids`, a
    bytes.translate table, maps ASCII bytes to theirs)."""
    if not isinstance(chunk, Utf8Chunk):
        return table.take(chunk)  # take: the same gather as table[chunk], without its overhead
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
