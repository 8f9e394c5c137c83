from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import tinygpt.data
import tinygpt.errors
import tinygpt.utf8
from helpers import MIXED_TEXT, expected_split, read_meta, read_split, write_text
from tinygpt.data import BatchSampler, DataError, get_batch, load_tokens, prepare

GOOD_FILES = {
    "a.txt": "Hello, world! Ça va? Déjà vu.\nnaïve café 😀\n" * 3,
    "sub/b.txt": "日本語のテキスト。中文字符。한국어 🎉🐍\nΕλληνικά Русский עברית العربية\n" * 2,
    "sub/deep/c.txt": "plain ascii line\n" * 5,
}
# A bad file with characters no good file has, so that skipping it is visible in the vocabulary.
BAD_PREFIX = "SKIPME Ω ünïcode 日本 ".encode()
BAD_BYTES = BAD_PREFIX + b"\xff middle \xe6\x97x end \xf0\x9f\x98 tail\n"
BAD_REPLACED = BAD_BYTES.decode("utf-8", "replace")  # three maximal invalid sequences


def make_corpus(root: Path, with_bad: bool = False) -> Path:
    corpus = root / "corpus"
    for name, text in GOOD_FILES.items():
        write_text(corpus / name, text)
    write_text(corpus / "sub" / "notes.md", "markdown ✓ only\n")
    if with_bad:
        (corpus / "sub" / "bad.txt").write_bytes(BAD_BYTES)
    return corpus


def good_paths(corpus: Path) -> list[Path]:
    return sorted(corpus / name for name in GOOD_FILES)


def check_split(data_dir: Path, texts: list[str], val_fraction: float) -> None:
    train, val = expected_split(texts, val_fraction)
    assert read_split(data_dir, "train") == train
    assert read_split(data_dir, "val") == val
    meta = read_meta(data_dir)
    assert meta["train_tokens"] == len(train)
    assert meta["val_tokens"] == len(val)


def test_prepare_multi_file_corpus(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "data"
    report = prepare([str(corpus)], out, val_fraction=0.25)
    paths = good_paths(corpus)
    texts = [p.read_text(encoding="utf-8") for p in paths]
    check_split(out, texts, 0.25)

    meta = read_meta(out)
    everything = "".join(texts)
    assert meta["format"] == "tinygpt-data"
    assert meta["tokenizer"]["chars"] == sorted(set(everything))  # sorted by code point
    assert [ord(c) for c in meta["tokenizer"]["chars"]] == sorted(ord(c) for c in set(everything))
    assert meta["vocab_size"] == len(set(everything))
    assert meta["dtype"] == "uint8"
    assert meta["symbol_counts"] == dict(Counter(everything))
    assert meta["val_fraction"] == 0.25
    assert "last val_fraction" in meta["split"]
    assert meta["bytes"] == sum(p.stat().st_size for p in paths)
    assert meta["encoding_errors"] == "strict"
    assert meta["replacements"] == 0
    assert meta["skipped_files"] == []
    # *.txt only, found recursively, in sorted order
    assert [f["path"] for f in meta["files"]] == [str(p) for p in paths]
    for entry, path, text in zip(meta["files"], paths, texts, strict=True):
        assert entry["status"] == "ok"
        assert entry["bytes"] == path.stat().st_size
        assert entry["characters"] == len(text)
        assert entry["val_characters"] == int(len(text) * 0.25)
        assert entry["train_characters"] + entry["val_characters"] == len(text)
    assert report.train_tokens == meta["train_tokens"]
    assert report.vocab == meta["tokenizer"]["chars"]
    assert not list(out.glob(".*.tmp"))


def test_glob_and_explicit_files(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "md"
    prepare([str(corpus)], out, glob="*.md", val_fraction=0.0)
    assert read_split(out, "train") == "markdown ✓ only\n"
    assert read_split(out, "val") == ""

    # explicit files in the order given; a file named twice counts once
    a, c = corpus / "a.txt", corpus / "sub" / "deep" / "c.txt"
    out = tmp_path / "files"
    prepare([str(c), str(a), str(c)], out, val_fraction=0.1)
    check_split(out, [c.read_text(encoding="utf-8"), a.read_text(encoding="utf-8")], 0.1)


@pytest.mark.parametrize("chunk_bytes", [None, 1, 3, 7])
def test_mixed_scripts_across_chunk_boundaries(tmp_path, monkeypatch, chunk_bytes):
    """Multi-byte characters straddling a read boundary decode intact, ASCII fast path or not."""
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    texts = [MIXED_TEXT * 2, "ascii only, long enough to fill several chunks\n" * 3, "é" + "x" * 6 + "😀" * 3]
    paths = [write_text(tmp_path / "in" / f"{i}.txt", text) for i, text in enumerate(texts)]
    prepare([str(p) for p in paths], tmp_path / "data", val_fraction=0.2)
    check_split(tmp_path / "data", texts, 0.2)
    assert read_meta(tmp_path / "data")["symbol_counts"]["😀"] == MIXED_TEXT.count("😀") * 2 + 3


def test_large_vocabulary_uses_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 2 + "\n"
    write_text(tmp_path / "in" / "cjk.txt", text)
    prepare([str(tmp_path / "in")], tmp_path / "data")
    meta = read_meta(tmp_path / "data")
    assert meta["dtype"] == "uint16"
    assert (tmp_path / "data" / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    check_split(tmp_path / "data", [text], 0.1)


@pytest.mark.parametrize("chunk_bytes", [None, 4, 5, 9])
@pytest.mark.parametrize(
    ("raw", "offset"),
    [
        (BAD_BYTES, len(BAD_PREFIX)),
        ("abc日".encode()[:-1], 3),  # a sequence cut off by the end of the file
        ("ab日".encode() + b"\xe6x", 5),  # a lead byte followed by ASCII
        (("x" * 20 + "é").encode() + b"\x80rest", 22),  # a stray continuation byte after the ASCII fast path
    ],
)
def test_strict_names_file_and_byte_offset(tmp_path, monkeypatch, chunk_bytes, raw, offset):
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    with pytest.raises(UnicodeDecodeError) as python_says:
        raw.decode("utf-8")
    assert python_says.value.start == offset  # the table above is right
    good = write_text(tmp_path / "in" / "good.txt", "fine text\n")
    bad = tmp_path / "in" / "bad.txt"
    bad.write_bytes(raw)
    with pytest.raises(DataError) as info:
        prepare([str(good), str(bad)], tmp_path / "data")
    message = str(info.value)
    assert str(bad) in message
    assert f"byte offset {offset} " in message
    assert "--encoding-errors" in message
    assert not (tmp_path / "data" / "meta.json").exists()


def test_strict_offset_literal(tmp_path):
    """The offset counts bytes, not characters: 'é' and '日' are 2 and 3 bytes."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes("é日".encode() + b"\xff")
    with pytest.raises(DataError, match=r"byte offset 5\b"):
        prepare([str(bad)], tmp_path / "data")


@pytest.mark.parametrize("chunk_bytes", [None, 3])
def test_replace_policy(tmp_path, monkeypatch, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    corpus = make_corpus(tmp_path, with_bad=True)
    prepare([str(corpus)], tmp_path / "data", encoding_errors="replace")
    paths = sorted(good_paths(corpus) + [corpus / "sub" / "bad.txt"])
    texts = [BAD_REPLACED if p.name == "bad.txt" else p.read_text(encoding="utf-8") for p in paths]
    check_split(tmp_path / "data", texts, 0.1)
    meta = read_meta(tmp_path / "data")
    assert BAD_REPLACED.count("\ufffd") == 3
    assert meta["replacements"] == 3
    assert meta["encoding_errors"] == "replace"
    assert "\ufffd" in meta["tokenizer"]["chars"]
    assert meta["symbol_counts"]["\ufffd"] == 3
    statuses = {Path(f["path"]).name: (f["status"], f["replacements"]) for f in meta["files"]}
    assert statuses["bad.txt"] == ("replaced", 3)
    assert statuses["a.txt"] == ("ok", 0)
    assert meta["skipped_files"] == []


@pytest.mark.parametrize("chunk_bytes", [None, 4])  # 4: the bad file's first characters are counted, then taken out
def test_skip_policy(tmp_path, capsys, monkeypatch, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    corpus = make_corpus(tmp_path, with_bad=True)
    bad = corpus / "sub" / "bad.txt"
    prepare([str(corpus)], tmp_path / "data", encoding_errors="skip", progress=False)
    stderr = capsys.readouterr().err
    assert "skipping" in stderr and str(bad) in stderr
    assert f"byte offset {len(BAD_PREFIX)}" in stderr

    meta = read_meta(tmp_path / "data")
    assert meta["skipped_files"] == [str(bad)]
    entry = next(f for f in meta["files"] if f["path"] == str(bad))
    assert entry["status"] == "skipped" and entry["characters"] == 0 and "byte offset" in entry["error"]
    texts = [p.read_text(encoding="utf-8") for p in good_paths(corpus)]
    check_split(tmp_path / "data", texts, 0.1)  # nothing of the bad file
    text = read_split(tmp_path / "data", "train") + read_split(tmp_path / "data", "val")
    assert "SKIPME" not in text
    assert "Ω" not in meta["tokenizer"]["chars"] and "Ω" not in meta["symbol_counts"]
    assert meta["symbol_counts"] == dict(Counter("".join(texts)))


def test_a_leading_bom_is_stripped_per_file(tmp_path):
    """Editors' U+FEFF at the start of a file is no symbol; one later in a file is text."""
    texts = {"a.txt": "\ufeffbom first\n", "b.txt": "\ufeffagain\n", "c.txt": "no bom, one \ufeff inside\n"}
    for name, text in texts.items():
        write_text(tmp_path / "in" / name, text)
    prepare([str(tmp_path / "in")], tmp_path / "data", val_fraction=0.0)
    meta = read_meta(tmp_path / "data")
    assert read_split(tmp_path / "data", "train") == "bom first\nagain\nno bom, one \ufeff inside\n"
    assert meta["symbol_counts"]["\ufeff"] == 1
    assert meta["boms_stripped"] == 2
    assert [f["bom_stripped"] for f in meta["files"]] == [True, True, False]
    assert [f["characters"] for f in meta["files"]] == [len(t.removeprefix("\ufeff")) for t in texts.values()]
    assert meta["bytes"] == sum(len(t.encode()) for t in texts.values())  # the BOM's bytes were read


def test_strict_offset_after_a_bom_counts_from_the_start_of_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("\ufeffab".encode() + b"\xff")
    with pytest.raises(DataError, match=r"byte offset 5\b"):
        prepare([str(bad)], tmp_path / "data")


@pytest.mark.parametrize("chunk_bytes", [None, 1, 4])
def test_line_endings_become_lf_unless_kept(tmp_path, monkeypatch, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    texts = ["windows\r\nlines\r\n\r\n", "old mac\rlines\r", "mixed\r\r\nunix\n"]
    paths = [write_text(tmp_path / "in" / f"{i}.txt", text) for i, text in enumerate(texts)]
    prepare([str(p) for p in paths], tmp_path / "lf", val_fraction=0.25)
    normalised = ["windows\nlines\n\n", "old mac\nlines\n", "mixed\n\nunix\n"]
    check_split(tmp_path / "lf", normalised, 0.25)
    meta = read_meta(tmp_path / "lf")
    assert "\r" not in meta["tokenizer"]["chars"]
    assert meta["symbol_counts"] == dict(Counter("".join(normalised)))
    assert (meta["line_endings"], meta["crlf_converted"], meta["cr_converted"]) == ("normalised", 4, 3)
    assert [(f["crlf_converted"], f["cr_converted"]) for f in meta["files"]] == [(3, 0), (0, 2), (1, 1)]

    prepare([str(p) for p in paths], tmp_path / "kept", val_fraction=0.25, keep_line_endings=True)
    check_split(tmp_path / "kept", texts, 0.25)
    meta = read_meta(tmp_path / "kept")
    assert meta["symbol_counts"]["\r"] == 7
    assert (meta["line_endings"], meta["crlf_converted"], meta["cr_converted"]) == ("kept", 0, 0)


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*missing"):
        prepare([str(tmp_path / "missing")], tmp_path / "data")

    (tmp_path / "only_md").mkdir()
    write_text(tmp_path / "only_md" / "x.md", "text")
    with pytest.raises(DataError, match=r"no files matching '\*\.txt'"):
        prepare([str(tmp_path / "only_md")], tmp_path / "data")

    write_text(tmp_path / "empty" / "a.txt", "")
    with pytest.raises(DataError, match="empty"):
        prepare([str(tmp_path / "empty")], tmp_path / "data")

    # every file skipped: nothing left
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "a.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="empty"):
        prepare([str(tmp_path / "allbad")], tmp_path / "data", encoding_errors="skip")

    with pytest.raises(DataError, match="encoding-errors"):
        prepare([str(tmp_path / "empty")], tmp_path / "data", encoding_errors="ignore")
    with pytest.raises(DataError, match="val-fraction"):
        prepare([str(tmp_path / "empty")], tmp_path / "data", val_fraction=1.0)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_vocabulary_too_large(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(65537))  # supplementary planes: all valid
    write_text(tmp_path / "in" / "huge.txt", text)
    with pytest.raises(DataError, match="65537 distinct characters"):
        prepare([str(tmp_path / "in")], tmp_path / "data")


def test_load_tokens_checks_the_directory(tmp_path):
    write_text(tmp_path / "in" / "a.txt", "abcdefghij" * 10)
    prepare([str(tmp_path / "in")], tmp_path / "data")
    tokens = load_tokens(tmp_path / "data", "train")
    assert len(tokens) == 90 and tokens.dtype == np.uint8
    with pytest.raises(DataError, match="split"):
        load_tokens(tmp_path / "data", "test")
    with open(tmp_path / "data" / "train.bin", "r+b") as f:
        f.truncate(50)
    with pytest.raises(DataError, match="prepare again"):
        load_tokens(tmp_path / "data", "train")
    with pytest.raises(DataError, match="no meta.json"):
        load_tokens(tmp_path, "train")


def test_data_error_is_the_shared_type():
    assert DataError is tinygpt.errors.DataError
    assert issubclass(DataError, tinygpt.errors.TinyGPTError)


def test_batch_sampler_draws_one_seeded_stream():
    """The window starts are torch.randint from a generator seeded with `seed`, call after
    call, so a run resumed from the saved generator state sees the same batches."""
    tokens = np.arange(1000, dtype=np.uint16)  # a token's value is its position
    sampler = BatchSampler(tokens, block_size=16, seed=7)
    reference = torch.Generator().manual_seed(7)
    for _ in range(3):
        x, y = sampler.next(8, torch.device("cpu"))
        starts = torch.randint(0, 1000 - 16, (8,), generator=reference)
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 0], starts)
        assert torch.equal(x, starts[:, None] + torch.arange(16))  # contiguous windows
        assert torch.equal(y, x + 1)  # targets are the next characters

    state = sampler.generator.get_state()
    expected = sampler.next(8, torch.device("cpu"))
    resumed = BatchSampler(tokens, block_size=16, seed=0)
    resumed.generator.set_state(state)
    got = resumed.next(8, torch.device("cpu"))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_batch_sampler_ranks_split_the_same_global_batch():
    tokens = np.arange(500, dtype=np.uint16)
    whole_x, whole_y = BatchSampler(tokens, 8, seed=5).next(12, torch.device("cpu"))
    for world_size in (2, 3, 4):
        pieces = [BatchSampler(tokens, 8, seed=5, rank=rank, world_size=world_size).next(12, torch.device("cpu"))
                  for rank in range(world_size)]
        assert all(x.shape == (12 // world_size, 8) for x, _ in pieces)
        assert torch.equal(torch.cat([x for x, _ in pieces]), whole_x)
        assert torch.equal(torch.cat([y for _, y in pieces]), whole_y)


def test_get_batch_windows():
    tokens = np.arange(200, dtype=np.uint8)
    x, y = get_batch(tokens, batch_size=6, block_size=10, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(6, 9, dtype=torch.int64))  # contiguous
    assert torch.equal(y, x + 1)  # targets are the next characters
    generator = torch.Generator().manual_seed(0)
    starts = torch.cat([get_batch(tokens, 64, 10, generator)[0][:, 0] for _ in range(20)])
    assert int(starts.min()) == 0 and int(starts.max()) == 189  # every window start, the last full one included


# Pieces of valid UTF-8 and of everything a decoder must reject: stray continuation bytes,
# bytes that never occur, overlong forms, UTF-16 surrogates, code points above U+10FFFF and
# sequences cut short.
VALID_PIECES = ["a", "Z", " ", "\n", "é", "ß", "ж", "日", "語", "€", "😀", "🐍", "\U0010fffd"]
INVALID_PIECES = [b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                  b"\xf5\x80\x80\x80", b"\xff", b"\xfe", b"\xc3", b"\xe6\x97", b"\xf0\x9f\x98", b"\xe6x"]


def random_bytes(rng: np.random.Generator, n_pieces: int, invalid_rate: float) -> bytes:
    pieces = []
    for _ in range(n_pieces):
        if rng.random() < invalid_rate:
            pieces.append(INVALID_PIECES[rng.integers(len(INVALID_PIECES))])
        else:
            pieces.append(VALID_PIECES[rng.integers(len(VALID_PIECES))].encode())
    return b"".join(pieces)


@pytest.mark.parametrize("method", tinygpt.utf8.METHODS)
@pytest.mark.parametrize("chunk_bytes", [None, 4, 5, 8, 13])
def test_decoding_matches_python_on_random_bytes(tmp_path, monkeypatch, chunk_bytes, method):
    """Valid and invalid UTF-8 in random mixtures decode (replace) and fail (strict) exactly as
    Python's own decoder does, whatever the read size and the decoding method."""
    monkeypatch.setattr(tinygpt.utf8, "METHOD", method)
    if chunk_bytes is not None:
        monkeypatch.setattr(tinygpt.data, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(chunk_bytes or 0)
    raws = [random_bytes(rng, int(rng.integers(1, 40)), rate) for rate in [0.0] * 5 + [0.05, 0.2, 0.5] * 5]
    paths = []
    for i, raw in enumerate(raws):
        paths.append(tmp_path / "in" / f"{i:03d}.txt")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(raw)
    texts = [raw.decode("utf-8", "replace") for raw in raws]
    prepare([str(p) for p in paths], tmp_path / "data", val_fraction=0.3, encoding_errors="replace")
    check_split(tmp_path / "data", texts, 0.3)
    meta = read_meta(tmp_path / "data")
    assert [f["replacements"] for f in meta["files"]] == [text.count("\ufffd") for text in texts]
    assert meta["replacements"] == sum(text.count("\ufffd") for text in texts)

    for path, raw in zip(paths, raws, strict=True):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            with pytest.raises(DataError, match=rf"byte offset {e.start} "):
                prepare([str(path)], tmp_path / "strict")
