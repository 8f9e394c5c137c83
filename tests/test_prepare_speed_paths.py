"""Both decoding methods of `prepare` give exactly what Python's own UTF-8 decoder gives.

`tinygpt.utf8`'s vectorised method reads ASCII without decoding it, decodes the multi-byte
characters of ASCII-heavy chunks with array operations, and hands chunks with invalid bytes (or
mostly non-ASCII ones) to Python's incremental decoder, which the plain method uses for every
chunk. These tests hold every path to the reference, `bytes.decode`, on valid text, on every
kind of invalid UTF-8, and across chunk boundaries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tinygpt.data
import tinygpt.utf8
from helpers import expected_split, read_meta, read_split
from tinygpt.data import DataError, prepare

# Characters at the edges of each UTF-8 length, from other scripts, and emoji (4 bytes).
EDGE_CHARACTERS = "\x00\x7f\x80\u07ff\u0800\ud7ff\ue000\ufffd\uffff\U00010000\U0010ffff"
SCRIPT_CHARACTERS = "éßÆλόжЖ日本語한국어עבריתالعربيةनमस्ते“”—€😀🚀👍🏽🇯🇵"

# One example of each way UTF-8 goes wrong; Python's strict decoder rejects them all.
INVALID_SEQUENCES = [
    b"\x80",  # a continuation byte with no lead
    b"\xbf\xbf",
    b"\xc0\x80",  # overlong 2-byte forms
    b"\xc1\xbf",
    b"\xe0\x80\x80",  # overlong 3-byte forms
    b"\xe0\x9f\xbf",
    b"\xed\xa0\x80",  # UTF-16 surrogates
    b"\xed\xbf\xbf",
    b"\xf0\x80\x80\x80",  # overlong 4-byte forms
    b"\xf0\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",  # bytes that never occur in UTF-8
    b"\xf8\x88\x80\x80\x80",
    b"\xfe",
    b"\xff",
    b"\xc3A",  # a lead byte followed by too few continuation bytes
    b"\xe6\x97A",
    b"\xf0\x9f\x98A",
    b"\xf0\x9fA",
    b"\xe6A\x97",
]


def random_text(rng: np.random.Generator, n: int, non_ascii: float = 0.1) -> str:
    """Mostly ASCII, with characters of every UTF-8 length mixed in."""
    pool = EDGE_CHARACTERS + SCRIPT_CHARACTERS
    chars = [
        pool[rng.integers(len(pool))] if rng.random() < non_ascii else chr(rng.integers(32, 127))
        for _ in range(n)
    ]
    return "".join(chars)


def identity_tables() -> tuple[np.ndarray, bytes]:
    """Tables under which `tinygpt.utf8.encode` returns code points, not ids."""
    return np.arange(tinygpt.data.MAX_CODE_POINT, dtype=np.uint32), bytes(range(128)) + bytes(128)


@pytest.fixture(params=tinygpt.utf8.METHODS)
def method(request, monkeypatch) -> str:
    """Run the test under each decoding method."""
    monkeypatch.setattr(tinygpt.utf8, "METHOD", request.param)
    return request.param


def decoded_by_chunks(path, errors: str = "strict", **reading) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Code points of the file as pass 2 would encode them (in chunks of
    `tinygpt.data.CHUNK_BYTES`, as prepare reads), the per-code-point counts pass 1 would make,
    and which path each chunk took ("fast" or "python"). `reading`: decoded_chunks' options."""
    table, ascii_identity = identity_tables()
    pieces, paths = [], []
    counts = np.zeros(tinygpt.data.MAX_CODE_POINT, dtype=np.int64)
    for chunk in tinygpt.utf8.decoded_chunks(path, errors, tinygpt.data.CHUNK_BYTES, **reading):
        paths.append("fast" if isinstance(chunk, tinygpt.utf8.Utf8Chunk) else "python")
        pieces.append(tinygpt.utf8.encode(chunk, table, ascii_identity).astype(np.int64))
        present, present_counts = tinygpt.utf8.tally(chunk)
        assert (np.diff(present) > 0).all() and (present_counts > 0).all()  # distinct, increasing
        counts[present] += present_counts
    code_points = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return code_points, counts, paths


def code_points_of(text: str) -> np.ndarray:
    return np.array([ord(c) for c in text], dtype=np.int64)


def test_decode_multibyte_matches_python_on_valid_text():
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = random_text(rng, int(rng.integers(0, 60)), non_ascii=0.3)
        raw = text.encode("utf-8")
        utf8 = np.frombuffer(raw, dtype=np.uint8)
        decoded = tinygpt.utf8.decode_multibyte(utf8, int(np.count_nonzero(utf8 >= 0x80)))
        assert decoded is not None, raw
        leads, lengths, code_points = decoded
        multibyte = [(i, c) for i, c in enumerate(text) if ord(c) >= 0x80]
        byte_offsets = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])[:-1]
        assert leads.tolist() == [int(byte_offsets[i]) for i, _ in multibyte]
        assert lengths.tolist() == [len(c.encode("utf-8")) for _, c in multibyte]
        assert code_points.tolist() == [ord(c) for _, c in multibyte]


@pytest.mark.parametrize("bad", INVALID_SEQUENCES)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_decode_multibyte_rejects_what_python_rejects(bad, where):
    good = "abc é 日 😀 xyz".encode()
    raw = {"start": bad + good, "middle": good + bad + good, "end": good + bad}[where]
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    utf8 = np.frombuffer(raw, dtype=np.uint8)
    assert tinygpt.utf8.decode_multibyte(utf8, int(np.count_nonzero(utf8 >= 0x80))) is None


def test_decode_multibyte_agrees_with_python_on_random_bytes():
    """Random short byte strings, biased towards UTF-8-like bytes: accepted exactly when Python
    accepts them, with the same code points."""
    rng = np.random.default_rng(1)
    interesting = np.array(
        [0x41, 0x20, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEF,
         0xF0, 0xF1, 0xF4, 0xF5, 0xFF],
        dtype=np.uint8,
    )
    accepted = 0
    for _ in range(3000):
        n = int(rng.integers(1, 9))
        raw = bytes(rng.choice(interesting, size=n)) if rng.random() < 0.7 else rng.bytes(n)
        utf8 = np.frombuffer(raw, dtype=np.uint8)
        decoded = tinygpt.utf8.decode_multibyte(utf8, int(np.count_nonzero(utf8 >= 0x80)))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert decoded is None, raw
            continue
        accepted += 1
        assert decoded is not None, raw
        assert decoded[2].tolist() == [ord(c) for c in text if ord(c) >= 0x80], raw
    assert accepted > 100  # the sample holds valid strings too


@pytest.mark.parametrize("chunk_bytes", [1, 4, 5, 6, 7, 13, 64, None])
def test_valid_text_takes_the_fast_path_across_chunk_boundaries(tmp_path, monkeypatch, chunk_bytes):
    """Every character straddles a chunk boundary somewhere. Nothing falls back to Python's
    decoder, except tiny chunks that happen to be mostly non-ASCII."""
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    text = random_text(np.random.default_rng(2), 700) + "😀"  # ends with a 4-byte character
    path = tmp_path / "mixed.txt"
    path.write_bytes(text.encode("utf-8"))
    code_points, counts, paths = decoded_by_chunks(path)
    assert code_points.tolist() == code_points_of(text).tolist()
    assert counts.sum() == len(text)
    assert all(counts[ord(c)] == text.count(c) for c in set(text))
    assert set(paths) == {"fast"} if chunk_bytes is None or chunk_bytes >= 64 else "fast" in paths


def test_ascii_chunks_and_dense_chunks_mix(tmp_path, monkeypatch):
    """ASCII chunks, ASCII-heavy chunks and mostly-CJK chunks (Python's decoder) in one file."""
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", 32)
    text = ("plain ascii words, " * 4 + "ünïcödé " + "日本語の文章です。" * 6 + "\n") * 5
    path = tmp_path / "blend.txt"
    path.write_bytes(text.encode("utf-8"))
    code_points, counts, paths = decoded_by_chunks(path)
    assert code_points.tolist() == code_points_of(text).tolist()
    assert all(counts[ord(c)] == text.count(c) for c in set(text))
    assert {"fast", "python"} <= set(paths)


@pytest.mark.parametrize("chunk_bytes", [4, 5, 7, 1 << 20])
@pytest.mark.parametrize("bad", INVALID_SEQUENCES[::3] + [b"\xe2\x82", b"\xf0\x9f\x98"])
def test_invalid_bytes_at_every_offset(tmp_path, monkeypatch, method, chunk_bytes, bad):
    """Strict mode names Python's byte offset; replace mode gives Python's text and U+FFFD
    count, wherever the bad bytes fall relative to a chunk boundary."""
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    good = "ab é 日 😀 cd".encode()
    for shift in range(0, 12):
        raw = good[:shift] + bad + good + bad[:2]  # a second, different error near the end
        try:
            raw.decode("utf-8")
            continue  # the cut left valid bytes (e.g. inside a character); nothing to check
        except UnicodeDecodeError as e:
            offset = e.start
        path = tmp_path / f"bad{shift}.txt"
        path.write_bytes(raw)
        with pytest.raises(tinygpt.utf8.UndecodableFile) as info:
            decoded_by_chunks(path, "strict")
        assert info.value.offset == offset, (raw, shift)

        tinygpt.utf8.replacements["count"] = 0
        code_points, counts, _ = decoded_by_chunks(path, "replace")
        replaced = raw.decode("utf-8", "replace")
        assert code_points.tolist() == code_points_of(replaced).tolist(), raw
        assert tinygpt.utf8.replacements["count"] == replaced.count("\ufffd"), raw


@pytest.mark.parametrize("chunk_bytes", [4, 7])
def test_prepare_strict_offset_and_replace_count(tmp_path, monkeypatch, method, chunk_bytes):
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    raw = "é日😀 fine ".encode() * 3 + b"\xed\xa0\x80" + " then 😀\xe2\x82".encode() + b"\xe2\x82"
    python_error = None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        python_error = e
    assert python_error is not None
    path = tmp_path / "in" / "bad.txt"
    path.parent.mkdir()
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"byte offset {python_error.start} "):
        prepare([str(path)], tmp_path / "strict")

    prepare([str(path)], tmp_path / "replace", encoding_errors="replace", val_fraction=0.3)
    replaced = raw.decode("utf-8", "replace")
    meta = read_meta(tmp_path / "replace")
    assert meta["replacements"] == replaced.count("\ufffd") == meta["symbol_counts"]["\ufffd"]
    train, val = expected_split([replaced], 0.3)
    assert read_split(tmp_path / "replace", "train") == train
    assert read_split(tmp_path / "replace", "val") == val


@pytest.mark.parametrize("distinct_ideographs", [10, 400])  # uint8 and uint16 token files
def test_prepare_fast_path_ids(tmp_path, monkeypatch, method, distinct_ideographs):
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", 64)
    rng = np.random.default_rng(3)
    ideographs = "".join(chr(0x4E00 + i) for i in range(distinct_ideographs))
    texts = [random_text(rng, 900) + ideographs + random_text(rng, 300), "ascii only\n" * 50, "😀"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / "in" / f"{i}.txt")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(text.encode("utf-8"))
    prepare([str(p) for p in paths], tmp_path / "data", val_fraction=0.25)
    meta = read_meta(tmp_path / "data")
    assert meta["dtype"] == ("uint8" if len(set("".join(texts))) <= 256 else "uint16")
    assert meta["dtype"] == ("uint8" if distinct_ideographs == 10 else "uint16")
    train, val = expected_split(texts, 0.25)
    assert read_split(tmp_path / "data", "train") == train
    assert read_split(tmp_path / "data", "val") == val


@pytest.mark.parametrize("chunk_bytes", [5, 64, None])
def test_plain_method_decodes_every_chunk_with_python(tmp_path, monkeypatch, chunk_bytes):
    """The plain method (the benchmark's baseline) never takes the vectorised path, and reads
    the same code points and counts as the vectorised one."""
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    text = "pure ascii first, " * 10 + random_text(np.random.default_rng(4), 500) + "😀"
    path = tmp_path / "mixed.txt"
    path.write_bytes(text.encode("utf-8"))
    vectorised = decoded_by_chunks(path)
    monkeypatch.setattr(tinygpt.utf8, "METHOD", "plain")
    code_points, counts, paths = decoded_by_chunks(path)
    assert set(paths) == {"python"}
    assert "fast" in vectorised[2]
    assert code_points.tolist() == vectorised[0].tolist() == code_points_of(text).tolist()
    assert np.array_equal(counts, vectorised[1])


def test_both_methods_write_identical_files(tmp_path, monkeypatch):
    """ASCII, ASCII-heavy, CJK and invalid (replaced) input: the same bytes out either way."""
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", 256)
    rng = np.random.default_rng(5)
    raws = [b"ascii only\n" * 100, random_text(rng, 2000).encode(),
            "日本語の文章です。".encode() * 40 + b"\xff\xe6\x97 tail", "x😀".encode() * 99 + b"\xf0\x9f"]
    for i, raw in enumerate(raws):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_bytes(raw)
    outputs = {}
    for name in tinygpt.utf8.METHODS:
        monkeypatch.setattr(tinygpt.utf8, "METHOD", name)
        out = tmp_path / name
        prepare([str(tmp_path / "in")], out, encoding_errors="replace", val_fraction=0.2)
        outputs[name] = [(out / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")]
    train, val, meta = outputs["vectorised"]
    assert outputs["plain"] == [train, val, meta]
    replaced = [raw.decode("utf-8", "replace") for raw in raws]
    assert read_meta(tmp_path / "plain")["replacements"] == 3  # \xff, \xe6\x97 and the cut-off \xf0\x9f
    assert len(train) + len(val) == sum(len(text) for text in replaced)


def test_an_unknown_method_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tinygpt.utf8, "METHOD", "simd")
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="METHOD"):
        list(tinygpt.utf8.decoded_chunks(path, "strict", 1024))


def test_prepare_leaves_torch_threads_alone(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("some text, é\n".encode() * 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # prepare counts on one thread inside: it must put 3 back
    try:
        prepare([str(path)], tmp_path / "data")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- BOM and line endings


def as_prepare_reads(text: str) -> str:
    """The text prepare trains on by default: no leading BOM; CR LF and lone CR made LF."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def line_ending_text(rng: np.random.Generator, n: int) -> str:
    """Random text thick with CR LF, lone CR, CR CR LF and LF, next to multi-byte characters."""
    pool = ["\r\n", "\r", "\n", "\r\r\n", "\n\r", "a", "b", " ", "é", "日", "😀", "\ufeff"]
    return "".join(pool[i] for i in rng.integers(len(pool), size=n))


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4, 5, 7, 9, 64])
def test_line_endings_across_chunk_boundaries(tmp_path, monkeypatch, method, chunk_bytes):
    """Wherever a read cuts a CR LF (or a BOM), both methods yield the normalised text, and the
    counts (pass 1) agree with the code points (pass 2) and with what was changed."""
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(chunk_bytes)
    ascii_heavy = "\ufeffsome words\r\nthen é, \r\r\nand 日本 here\rend\r\n" * 6  # the vectorised way
    windows = "naïve café\r\nline 日\r\n" * 8  # CR LF only, multi-byte characters after each
    texts = [ascii_heavy, windows, "\r\n" * 40, "\r" * 9 + "\n"] + [
        ("\ufeff" if i % 2 else "") + line_ending_text(rng, int(rng.integers(0, 80))) for i in range(12)]
    paths_taken = set()
    for i, text in enumerate(texts):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(text.encode("utf-8"))
        changes = tinygpt.utf8.TextChanges()
        code_points, counts, paths = decoded_by_chunks(path, strip_bom=True, lf_line_endings=True, changes=changes)
        paths_taken.update(paths)
        expected = as_prepare_reads(text)
        assert code_points.tolist() == code_points_of(expected).tolist(), repr(text)
        assert counts.sum() == len(expected) and all(counts[ord(c)] == expected.count(c) for c in set(expected))
        body = text.removeprefix("\ufeff")
        assert changes.bom_stripped == text.startswith("\ufeff")
        assert changes.crlf_converted == body.count("\r\n")
        assert changes.cr_converted == body.replace("\r\n", "").count("\r")

        kept, _, _ = decoded_by_chunks(path)  # asked for nothing, the reader changes nothing
        assert kept.tolist() == code_points_of(text).tolist()
    assert paths_taken == ({"fast", "python"} if method == "vectorised" else {"python"})


@pytest.mark.parametrize("chunk_bytes", [3, 5, 64])
def test_prepare_normalises_line_endings_the_same_by_either_method(tmp_path, monkeypatch, chunk_bytes):
    """CR LF files, invalid bytes between CR and LF (replace), a BOM: identical files either way,
    the documented split of the normalised text, and meta.json's record of what was changed."""
    monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(7)
    raws = [("\ufeff" + line_ending_text(rng, 300)).encode(), b"dos line\r\n" * 30 + b"cr\r\xff\n",
            random_text(rng, 200).replace(" ", "\r\n").encode(), "\ufeff日本語\r\n".encode() * 20]
    (tmp_path / "in").mkdir()
    for i, raw in enumerate(raws):
        (tmp_path / "in" / f"{i}.txt").write_bytes(raw)
    outputs = {}
    for name in tinygpt.utf8.METHODS:
        monkeypatch.setattr(tinygpt.utf8, "METHOD", name)
        prepare([str(tmp_path / "in")], tmp_path / name, encoding_errors="replace", val_fraction=0.2)
        outputs[name] = [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")]
    assert outputs["plain"] == outputs["vectorised"]

    decoded = [raw.decode("utf-8", "replace") for raw in raws]
    texts = [as_prepare_reads(text) for text in decoded]
    train, val = expected_split(texts, 0.2)
    assert read_split(tmp_path / "plain", "train") == train
    assert read_split(tmp_path / "plain", "val") == val
    meta = read_meta(tmp_path / "plain")
    assert "\r" not in meta["tokenizer"]["chars"]
    assert meta["symbol_counts"]["\ufeff"] == sum(text.count("\ufeff") for text in texts) > 0  # not leading: kept
    assert meta["line_endings"] == "normalised" and meta["boms_stripped"] == 2
    bodies = [text.removeprefix("\ufeff") for text in decoded]
    assert meta["crlf_converted"] == sum(body.count("\r\n") for body in bodies)
    assert meta["cr_converted"] == sum(body.replace("\r\n", "").count("\r") for body in bodies)
    assert [f["characters"] for f in meta["files"]] == [len(text) for text in texts]
