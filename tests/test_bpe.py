"""The byte-level BPE: training and encoding in `prepare`, the saved tokenizer.json read by
Hugging Face's own libraries, bits per byte, streaming whole characters, and the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    MIXED_TEXT,
    assert_ok,
    assert_one_line_error,
    expected_split,
    read_meta,
    run_cli,
    words_text,
    write_text,
)
from tinygpt import data
from tinygpt.config import ModelConfig
from tinygpt.data import load_tokenizer, load_tokens, prepare
from tinygpt.evaluate import evaluate_tokens
from tinygpt.generate import stream_text
from tinygpt.model import GPT
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, TextStream, train_bpe

TRAIN_ARGS = ["--preset", "tiny", "--set", "dtype=float32", "--device", "cpu", "--no-progress"]
# words, accents, CJK, emoji and line breaks: pieces that merge across bytes of one character
CORPUS = (MIXED_TEXT + words_text(400, seed=1)) * 3


def decoded_split(data_dir: Path, split: str) -> str:
    tokenizer = load_tokenizer(data_dir)
    return tokenizer.decode(load_tokens(data_dir, split).tolist())


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(iter([CORPUS]), 400)


def test_round_trip_of_multilingual_text_with_emoji(bpe):
    for text in (MIXED_TEXT, CORPUS, "😀" * 7, "a\u200db\n\n\t  x", "\ufffd replaced", ""):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert int(bpe.byte_lengths[ids].sum()) == len(text.encode("utf-8"))
        assert int(bpe.char_starts[ids].sum()) == len(text)
    assert len(bpe.encode(CORPUS)) < len(CORPUS) / 1.5  # merges learned: fewer tokens than characters
    # text the corpus never had is still encoded (every byte is a token), unlike with characters
    assert bpe.decode(bpe.encode("Ωμέγα ☃ 𝄞")) == "Ωμέγα ☃ 𝄞"


def test_prepare_bpe_splits_each_file_and_round_trips_replaced_input(tmp_path):
    good = MIXED_TEXT * 4 + words_text(300, seed=2)
    write_text(tmp_path / "corpus" / "a.txt", good)
    (tmp_path / "corpus" / "b.txt").write_bytes(b"bad \xff\xfe bytes, then words\n" * 30)
    report = prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="bpe", vocab_size=320,
                     encoding_errors="replace")
    bad = "bad \ufffd\ufffd bytes, then words\n" * 30
    train_text, val_text = expected_split([good, bad], 0.1)
    assert decoded_split(tmp_path / "data", "train") == train_text
    assert decoded_split(tmp_path / "data", "val") == val_text
    meta = read_meta(tmp_path / "data")
    assert meta["tokenizer_kind"] == "bpe" and meta["vocab_size"] == 320 == report.tokenizer.vocab_size
    assert meta["dtype"] == "uint16"
    for split, text in (("train", train_text), ("val", val_text)):
        assert meta[f"{split}_characters"] == len(text)
        assert meta[f"{split}_bytes"] == len(text.encode("utf-8"))
        assert meta[f"{split}_tokens"] == len(load_tokens(tmp_path / "data", split)) < len(text)
    saved = (tmp_path / "data" / "tokenizer.json").read_bytes()
    assert meta["tokenizer"] == {"type": "bpe", "file": "tokenizer.json", "sha256": hashlib.sha256(saved).hexdigest()}
    assert meta["tokenizer_training"]["share_of_each_file"] == 1.0
    assert meta["replacements"] == 60


def test_pieces_cut_at_safe_points_encode_exactly_as_the_whole_text(tmp_path, monkeypatch):
    """prepare encodes in pieces, in batches; cut every few characters, the ids must still be
    those of each file's training and validation text encoded whole."""
    texts = [CORPUS, "  spaces  and\n\n\nblank lines\n \n" * 40 + MIXED_TEXT, "x" * 5000 + " tail\n"]
    for i, text in enumerate(texts):
        write_text(tmp_path / "corpus" / f"{i}.txt", text)
    monkeypatch.setattr(data, "CHUNK_BYTES", 97)  # chunks cut inside characters and words
    monkeypatch.setattr(data, "BPE_PIECE_CHARS", 5)
    monkeypatch.setattr(data, "BPE_BATCH_CHARS", 40)
    prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="bpe", vocab_size=350)
    tokenizer = load_tokenizer(tmp_path / "data")
    train_ids, val_ids = [], []
    for text in texts:
        train, val = expected_split([text], 0.1)
        train_ids += tokenizer.encode(train)
        val_ids += tokenizer.encode(val)
    assert load_tokens(tmp_path / "data", "train").tolist() == train_ids
    assert load_tokens(tmp_path / "data", "val").tolist() == val_ids


def test_the_bpe_learns_from_a_sample_of_every_file_when_asked(tmp_path):
    for i in range(3):
        write_text(tmp_path / "corpus" / f"{i}.txt", words_text(2000, seed=i))
    prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="bpe", vocab_size=300, bpe_sample_bytes=6000)
    meta = read_meta(tmp_path / "data")
    training = meta["tokenizer_training"]
    assert training["sample_bytes_limit"] == 6000
    assert training["share_of_each_file"] == pytest.approx(6000 / meta["train_bytes"], rel=0.01)
    # the same share of every file (ASCII here: a byte per character), rounded up per file
    assert 6000 <= training["characters_used"] <= 6003


def test_the_saved_tokenizer_gives_the_same_ids_in_tokenizers_and_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    write_text(tmp_path / "corpus" / "a.txt", CORPUS)
    prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="bpe", vocab_size=400)
    ours = load_tokenizer(tmp_path / "data")
    path = str(tmp_path / "data" / "tokenizer.json")
    theirs = Tokenizer.from_file(path)
    fast = PreTrainedTokenizerFast(tokenizer_file=path)
    for text in (MIXED_TEXT, "The king doth speak 😀 of love\n\nand war", "unseen: Ωμέγα ☃"):
        ids = ours.encode(text)
        assert theirs.encode(text).ids == ids
        assert fast(text)["input_ids"] == ids
        assert fast.decode(ids) == text == theirs.decode(ids)


def test_streaming_never_shows_part_of_a_character():
    bytes_only = train_bpe(iter(["x"]), 256)  # no merges: every byte is its own token
    ids = bytes_only.encode(MIXED_TEXT)
    assert len(ids) == len(MIXED_TEXT.encode("utf-8"))
    stream = TextStream(bytes_only.token_bytes)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == MIXED_TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces.count("") > 0  # the first bytes of a multi-byte character were held back
    # an unfinished character at the end becomes one U+FFFD, never raw bytes
    stream = TextStream(bytes_only.token_bytes)
    assert [stream.feed(i) for i in bytes_only.encode("😀")[:2]] == ["", ""] and stream.flush() == "\ufffd"


def test_stream_text_yields_whole_characters(monkeypatch):
    bytes_only = train_bpe(iter(["x"]), 256)
    wanted = bytes_only.encode("é😀a")

    def scripted(model, prompt, max_new_tokens, **options):
        for token in wanted[:max_new_tokens]:
            yield torch.tensor([token])

    monkeypatch.setattr("tinygpt.generate.generate_ids", scripted)
    steps = list(stream_text(None, bytes_only, "", max_new_tokens=len(wanted)))
    assert [step[0] for step in steps] == ["", "é", "", "", "", "😀", "a"]
    steps = list(stream_text(None, bytes_only, "", max_new_tokens=3))  # stops inside 😀
    assert "".join(step[0] for step in steps) == "é\ufffd"


def tiny_model(vocab_size: int, block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16,
                           dropout=0.0)).eval()


def test_bits_per_byte_is_bits_per_char_times_characters_over_bytes_for_characters(tmp_path):
    write_text(tmp_path / "corpus" / "a.txt", words_text(200, seed=5) + MIXED_TEXT * 4)  # a non-ASCII tail
    prepare([str(tmp_path / "corpus")], tmp_path / "data")
    tokenizer = load_tokenizer(tmp_path / "data")
    assert isinstance(tokenizer, CharTokenizer)
    tokens = load_tokens(tmp_path / "data", "val")
    result = evaluate_tokens(tiny_model(tokenizer.vocab_size), tokens, tokenizer=tokenizer)
    scored = tokenizer.decode(tokens[1:].tolist())
    assert result.tokens == result.characters == len(scored)
    assert result.bytes == len(scored.encode("utf-8")) > result.characters  # non-ASCII text
    assert result.bits_per_char == pytest.approx(result.loss / math.log(2), rel=1e-12)
    assert result.bits_per_byte == pytest.approx(result.bits_per_char * result.characters / result.bytes, rel=1e-12)


def test_bits_per_byte_of_a_bpe_split_counts_its_text(tmp_path):
    write_text(tmp_path / "corpus" / "a.txt", CORPUS)
    prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="bpe", vocab_size=400)
    tokenizer = load_tokenizer(tmp_path / "data")
    tokens = load_tokens(tmp_path / "data", "val")
    result = evaluate_tokens(tiny_model(tokenizer.vocab_size), tokens, tokenizer=tokenizer)
    scored = tokenizer.decode(tokens[1:].tolist())  # every token after the first is predicted
    assert (result.tokens, result.characters, result.bytes) == (len(tokens) - 1, len(scored),
                                                                  len(scored.encode("utf-8")))
    nats = result.loss * result.tokens
    assert result.bits_per_byte == pytest.approx(nats / result.bytes / math.log(2), rel=1e-12)
    assert result.bits_per_char == pytest.approx(nats / result.characters / math.log(2), rel=1e-12)


def test_an_old_data_directory_without_split_sizes_still_trains(tmp_path):
    write_text(tmp_path / "corpus" / "a.txt", CORPUS)
    prepare([str(tmp_path / "corpus")], tmp_path / "data")
    meta = read_meta(tmp_path / "data")
    for key in ("train_bytes", "val_bytes", "train_characters", "val_characters", "tokenizer_kind"):
        del meta[key]
    meta["version"] = 1
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    tokens = load_tokens(tmp_path / "data", "val")
    tokenizer = load_tokenizer(tmp_path / "data")
    text = tokenizer.decode(tokens.tolist())
    assert data.split_sizes(tmp_path / "data", "val", tokenizer, tokens) == (len(text), len(text.encode("utf-8")))
    assert_ok(run_cli("train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--max-iters", 4,
                      "--set", "eval_interval=2", "--set", "eval_iters=1", *TRAIN_ARGS))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_bits_per_byte"] == pytest.approx(row["val_bits_per_char"] * len(text) / len(text.encode()),
                                                     rel=1e-4)


# ----------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bpe")
    write_text(root / "corpus" / "a.txt", CORPUS)
    prepared = assert_ok(run_cli("prepare", root / "corpus", "--out", root / "data", "--tokenizer", "bpe",
                                 "--vocab-size", 400, "--no-progress"))
    assert "byte-level BPE of 400 tokens" in prepared.stdout
    assert_ok(run_cli("train", "--data", root / "data", "--out", root / "run", "--max-iters", 30,
                      "--set", "eval_interval=10", "--seed", 3, *TRAIN_ARGS))
    return root


def test_train_eval_sample_end_to_end(bpe_run):
    root = bpe_run
    assert (root / "run" / "tokenizer.json").read_bytes() == (root / "data" / "tokenizer.json").read_bytes()
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    meta = read_meta(root / "data")
    tokens_per_byte = meta["val_tokens"] / meta["val_bytes"]
    for row in rows:
        assert row["val_bits_per_byte"] == pytest.approx(row["val_loss"] * tokens_per_byte / math.log(2), rel=1e-5)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    scores = json.loads(assert_ok(run_cli("eval", root / "run", "--data", root / "data", "--json",
                                          "--device", "cpu")).stdout)
    assert scores["tokens"] == meta["val_tokens"] - 1
    assert scores["bits_per_byte"] == pytest.approx(scores["bits_per_char"] * scores["characters"] / scores["bytes"],
                                                    rel=1e-9)
    assert scores["bits_per_byte"] < 8  # below a uniform guess over 256 byte values: it learned
    printed = assert_ok(run_cli("sample", root / "run", "--prompt", "Ωμέγα ☃ 😀 ", "--max-new-tokens", 40,
                                "--device", "cpu")).stdout
    assert printed.startswith("Ωμέγα ☃ 😀 ") and len(printed) > len("Ωμέγα ☃ 😀 ") + 10


def corrupt_tokenizer(root: Path, tmp_path: Path) -> list:
    import shutil

    shutil.copytree(root / "data", tmp_path / "data")
    (tmp_path / "data" / "tokenizer.json").write_text('{"model": {"type": "BPE"', encoding="utf-8")
    return ["train", "--data", tmp_path / "data", "--out", tmp_path / "run", *TRAIN_ARGS]


def foreign_tokenizer(root: Path, tmp_path: Path) -> list:
    import shutil

    from tokenizers import Tokenizer, models

    shutil.copytree(root / "data", tmp_path / "data")
    foreign = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).to_str()
    (tmp_path / "data" / "tokenizer.json").write_text(foreign, encoding="utf-8")
    meta = read_meta(tmp_path / "data")
    meta["tokenizer"]["sha256"] = hashlib.sha256(foreign.encode()).hexdigest()
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return ["eval", root / "run", "--data", tmp_path / "data", "--device", "cpu"]


def resume_on_char_data(root: Path, tmp_path: Path) -> list:
    prepare([str(root / "corpus")], tmp_path / "chars")
    return ["train", "--data", tmp_path / "chars", "--out", root / "run", "--resume", *TRAIN_ARGS]


def eval_on_char_data(root: Path, tmp_path: Path) -> list:
    prepare([str(root / "corpus")], tmp_path / "chars")
    return ["eval", root / "run", "--data", tmp_path / "chars", "--device", "cpu", "--no-progress"]


BAD_INPUTS = [
    (lambda root, tmp: ["prepare", root / "corpus", "--out", tmp / "d", "--tokenizer", "bpe", "--vocab-size", 255],
     "--vocab-size must be between 256"),
    (lambda root, tmp: ["prepare", root / "corpus", "--out", tmp / "d", "--tokenizer", "bpe", "--vocab-size", 65537],
     "and 65536"),
    (lambda root, tmp: ["prepare", root / "corpus", "--out", tmp / "d", "--tokenizer", "wordpiece"],
     "--tokenizer must be one of char, bpe"),
    (lambda root, tmp: ["prepare", root / "corpus", "--out", tmp / "d", "--vocab-size", 500],
     "--vocab-size is for --tokenizer bpe"),
    (lambda root, tmp: ["prepare", root / "corpus", "--out", tmp / "d", "--tokenizer", "bpe"],
     "needs --vocab-size"),
    (corrupt_tokenizer, "SHA-256 differs"),
    (foreign_tokenizer, "is a WordPiece tokenizer"),
    (resume_on_char_data, "is tokenized by char, the run"),
    (eval_on_char_data, "tokenizer (char; the run's is bpe)"),
]


@pytest.mark.parametrize(("setup", "message"), BAD_INPUTS, ids=[f"case{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_is_one_line_and_changes_nothing(bpe_run, tmp_path, setup, message):
    before = {p: p.read_bytes() for p in (bpe_run / "run").iterdir() if p.is_file()}
    line = assert_one_line_error(run_cli(*setup(bpe_run, tmp_path)))
    assert message in line
    assert not (tmp_path / "d").exists()
    # a train that stops at the data has written nothing into its run folder (its lock aside)
    assert not (tmp_path / "run").exists() or {p.name for p in (tmp_path / "run").iterdir()} <= {".tinygpt.lock"}
    assert {p: p.read_bytes() for p in (bpe_run / "run").iterdir() if p.is_file()} == before


def test_a_corrupt_tokenizer_json_with_a_matching_checksum_is_one_line(bpe_run, tmp_path):
    args = corrupt_tokenizer(bpe_run, tmp_path)
    text = (tmp_path / "data" / "tokenizer.json").read_bytes()
    meta = read_meta(tmp_path / "data")
    meta["tokenizer"]["sha256"] = hashlib.sha256(text).hexdigest()
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    line = assert_one_line_error(run_cli(*args))
    assert "is not a valid tokenizer.json" in line


def test_a_char_preparation_replaces_a_bpe_one_entirely(tmp_path):
    write_text(tmp_path / "corpus" / "a.txt", CORPUS)
    prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="bpe", vocab_size=300)
    prepare([str(tmp_path / "corpus")], tmp_path / "data")
    assert not (tmp_path / "data" / "tokenizer.json").exists()
    assert isinstance(load_tokenizer(tmp_path / "data"), CharTokenizer)
    assert np.array_equal(load_tokens(tmp_path / "data", "val"),
                          load_tokenizer(tmp_path / "data").encode_array(expected_split([CORPUS], 0.1)[1]))


def test_chat_and_bench_work_on_a_bpe_run(bpe_run, monkeypatch, capsys):
    import io

    from tinygpt import load
    from tinygpt.cli import main
    from tinygpt.generate import generate_text

    run = bpe_run / "run"
    model, tokenizer = load(run)
    monkeypatch.setattr("sys.stdin", io.StringIO("Ωμέγα 😀\nThe king\n"))
    assert main(["chat", str(run), "--max-new-tokens", "12", "--seed", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # text a char vocabulary would refuse is continued; one seed per turn
    assert generate_text(model, tokenizer, "Ωμέγα 😀", 12, temperature=0.8, seed=5) in out
    assert generate_text(model, tokenizer, "The king", 12, temperature=0.8, seed=6) in out
    assert main(["bench", str(run), "--device", "cpu", "--json", "--batch-size", "2", "--repeats", "1",
                 "--new-tokens", "5", "--prepare-mb", "0.02", "--matmul-size", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generation"]["new_tokens"] == 5 and result["training"]["tokens_per_second"] > 0


def test_a_char_preparation_keeps_a_tokenizer_json_that_is_not_prepares(tmp_path):
    write_text(tmp_path / "corpus" / "a.txt", CORPUS)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tokenizer.json").write_text("mine")  # e.g. an exported model's folder
    prepare([str(tmp_path / "corpus")], tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "tokenizer.json").read_text() == "mine"


def test_a_sample_size_that_is_not_a_number_is_one_line(tmp_path):
    write_text(tmp_path / "corpus" / "a.txt", CORPUS)
    for value in ("nan", "inf", "0"):
        line = assert_one_line_error(run_cli("prepare", tmp_path / "corpus", "--out", tmp_path / "d", "--tokenizer",
                                             "bpe", "--vocab-size", 300, "--bpe-sample-mb", value))
        assert "--bpe-sample-mb must be a positive number" in line
    assert not (tmp_path / "d").exists()
