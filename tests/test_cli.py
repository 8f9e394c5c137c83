"""The `tinygpt` command end to end, in subprocesses, on a tiny corpus."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import assert_ok, assert_one_line_error, read_meta, run_cli, words_text, write_text
from tinygpt.checkpoint import load_model
from tinygpt.config import get_preset
from tinygpt.data import load_tokens, prepare
from tinygpt.evaluate import evaluate_tokens
from tinygpt.generate import generate_text
from tinygpt.model import GPT

TRAIN_ARGS = ["--preset", "tiny", "--set", "dtype=float32", "--device", "cpu", "--no-progress"]


@dataclass
class Trained:
    corpus: Path
    data: Path
    run: Path
    prepare_output: subprocess.CompletedProcess
    train_output: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    write_text(corpus / "one.txt", words_text(500, seed=3))
    write_text(corpus / "nested" / "two.txt", words_text(300, seed=4))
    prepared = assert_ok(run_cli("prepare", corpus, "--out", root / "data", "--no-progress", cwd=root))
    trained = assert_ok(run_cli("train", "--data", root / "data", "--out", root / "run", "--max-iters", 20,
                                "--set", "eval_interval=10", "--seed", 3, *TRAIN_ARGS, cwd=root))
    return Trained(corpus, root / "data", root / "run", prepared, trained)


def sample(trained: Trained, *args) -> str:
    result = assert_ok(run_cli("sample", trained.run, "--device", "cpu", *args))
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def test_prepare_and_train(trained):
    meta = read_meta(trained.data)
    assert "prepared 2 file(s)" in trained.prepare_output.stdout
    assert f"vocabulary {meta['vocab_size']} symbols" in trained.prepare_output.stdout
    assert trained.prepare_output.stderr == ""
    assert "done: 20 iterations" in trained.train_output.stdout
    assert "bits/char" in trained.train_output.stdout
    assert trained.train_output.stderr == ""  # --no-progress: no bars, and nothing else either
    rows = [json.loads(line) for line in (trained.run / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [10, 20]
    assert f"done: 20 iterations; val loss {rows[-1]['val_loss']:.4f} " in trained.train_output.stdout
    # the command trains: from ln(vocab_size) (3.64 nats, untrained) this run reaches 2.78 in 20
    # iterations, down 0.37 from its first evaluation
    assert rows[-1]["val_loss"] < math.log(meta["vocab_size"]) - 0.4
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.15
    for name in ("best.json", "last.json", "loss.png"):
        assert (trained.run / name).is_file()


def test_eval_json(trained):
    result = assert_ok(run_cli("eval", trained.run, "--data", trained.data, "--json", "--device", "cpu"))
    values = json.loads(result.stdout)
    assert set(values) == {"loss", "bits_per_char", "bits_per_byte", "perplexity", "tokens", "characters", "bytes",
                           "stride"}
    assert values["bits_per_char"] == pytest.approx(values["loss"] / math.log(2), rel=1e-9)
    assert values["perplexity"] == pytest.approx(math.exp(values["loss"]), rel=1e-9)
    block_size = json.loads((trained.run / "config.json").read_text())["model"]["block_size"]
    assert values["stride"] == block_size  # by default, consecutive windows
    strided = json.loads(assert_ok(run_cli("eval", trained.run, "--data", trained.data, "--json", "--device", "cpu",
                                           "--stride", "3")).stdout)
    assert strided["stride"] == 3 and strided["characters"] == values["characters"]
    assert values["characters"] == read_meta(trained.data)["val_tokens"] - 1  # every character after the first
    # the scores are the library's, of the run's best checkpoint, on the whole split
    model, _ = load_model(trained.run)
    val_tokens = load_tokens(trained.data, "val")
    assert values["loss"] == pytest.approx(evaluate_tokens(model, val_tokens).loss, rel=1e-5)
    assert strided["loss"] == pytest.approx(evaluate_tokens(model, val_tokens, stride=3).loss, rel=1e-5)
    assert strided["loss"] != values["loss"]  # more context per character: a different score
    assert values["loss"] < math.log(read_meta(trained.data)["vocab_size"]) - 0.4  # trained: 2.78 vs 3.64
    assert result.stderr == ""

    lines = assert_ok(run_cli("eval", trained.run, "--data", trained.data, "--split", "train", "--device", "cpu",
                              "--no-progress")).stdout.splitlines()
    assert lines[0].startswith("train loss: ")
    predicted = read_meta(trained.data)['train_tokens'] - 1
    assert lines[0].endswith(f" nats/token over {predicted:,} tokens ({predicted:,} characters, {predicted:,} bytes)")
    assert lines[1].startswith("train bits/byte: ") and lines[2].startswith("train bits/char: ")
    assert lines[3].startswith("train perplexity: ")
    # the library's numbers, to the printed precision (4 and 3 decimals); recomputing bits/char and
    # perplexity from the printed loss instead could differ in the last printed digit
    expected = evaluate_tokens(model, load_tokens(trained.data, "train"))
    assert float(lines[0].split()[2]) == pytest.approx(expected.loss, abs=6e-5)
    assert float(lines[2].split()[-1]) == pytest.approx(expected.bits_per_char, abs=6e-4)
    assert float(lines[3].split()[2]) == pytest.approx(expected.perplexity, abs=6e-4)


def test_sample_same_seed_same_text(trained):
    first = sample(trained, "--prompt", "The king", "--max-new-tokens", 60, "--seed", 5)
    second = sample(trained, "--prompt", "The king", "--max-new-tokens", 60, "--seed", 5)
    others = sample(trained, "--prompt", "The king", "--max-new-tokens", 60, "--seed", 6, "--num-samples", 2)
    assert first == second
    assert first.startswith("The king") and len(first) == len("The king") + 60
    empty, *samples = re.split(r"^--- sample \d ---\n", others + "\n", flags=re.MULTILINE)
    assert empty == "" and len(samples) == 2
    samples = [text[:-1] for text in samples]  # each sample is printed with its own newline
    assert all(text.startswith("The king") and len(text) == len("The king") + 60 for text in samples)
    assert first not in samples and samples[0] != samples[1]  # another seed, and two different samples
    # the library's text for these options (the command's default temperature is 0.8)
    model, tokenizer = load_model(trained.run)
    assert first == generate_text(model, tokenizer, "The king", 60, temperature=0.8, seed=5)


def test_greedy_is_deterministic_and_slides_past_block_size(trained):
    prompt, new = "The queen", 80  # 89 characters: well past block_size 32
    cached = sample(trained, "--prompt", prompt, "--max-new-tokens", new, "--temperature", 0, "--seed", 1)
    uncached = sample(trained, "--prompt", prompt, "--max-new-tokens", new, "--temperature", 0, "--seed", 2,
                      "--no-cache")
    assert cached == uncached
    assert len(cached) == len(prompt) + new

    # within the block, greedy is the argmax of the model's own logits, step by step
    model, tokenizer = load_model(trained.run)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        while len(ids) < model.config.block_size:
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert cached[: len(ids)] == tokenizer.decode(ids)


def test_info_run_json(trained):
    values = json.loads(assert_ok(run_cli("info", trained.run, "--json")).stdout)
    model_config, _ = get_preset("tiny")
    model_config.vocab_size = read_meta(trained.data)["vocab_size"]
    assert values["parameters"] == GPT(model_config).num_parameters()
    assert values["model_config"]["vocab_size"] == model_config.vocab_size
    assert values["model_config"]["n_embd"] == model_config.n_embd


def test_info_seed_preset():
    lines = assert_ok(run_cli("info", "--preset", "seed", "--vocab-size", 145)).stdout.splitlines()
    assert lines[0] == "parameters: 21,416,593 (21.42 M)"
    for setting in ("vocab_size = 145", "n_embd = 384", "norm = post", "activation = relu", "learning_rate = 0.0003"):
        assert f"  {setting}" in lines


def test_presets():
    lines = assert_ok(run_cli("presets")).stdout.splitlines()
    names = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert {"seed", "gpt", "cpu", "tiny"} <= set(names)
    assert "n_layer 12, n_head 8, n_embd 384, block_size 64, batch 256" in "\n".join(lines)


def test_skip_policy_reports_on_stderr(tmp_path):
    write_text(tmp_path / "corpus" / "good.txt", "good text\n" * 5)
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"bad \xff text")
    result = assert_ok(run_cli("prepare", tmp_path / "corpus", "--out", tmp_path / "data",
                               "--encoding-errors", "skip", "--no-progress"))
    assert "skipping" in result.stderr and "bad.txt" in result.stderr and "byte offset 4" in result.stderr
    assert read_meta(tmp_path / "data")["skipped_files"] == [str(tmp_path / "corpus" / "bad.txt")]
    assert "prepared 1 file(s)" in result.stdout


def test_ctrl_c_saves_and_resume_continues(trained, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "tinygpt", "train", "--data", str(trained.data), "--out", str(run_dir),
               "--max-iters", "100000", "--set", "eval_interval=10", *TRAIN_ARGS]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.json").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().startswith("interrupted: saved iteration ")
    stopped = json.loads((run_dir / "last.json").read_text())["iteration"]
    assert 10 <= stopped < 100000
    assert load_model(run_dir, "last")[0].config.n_embd == 32

    resumed = assert_ok(run_cli("train", "--data", trained.data, "--out", run_dir, "--resume",
                                "--max-iters", stopped + 10, *TRAIN_ARGS))
    assert f"resuming from iteration {stopped}" in resumed.stdout
    assert json.loads((run_dir / "last.json").read_text())["iteration"] == stopped + 10
    iterations = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert iterations == sorted(set(iterations)) and iterations[-1] == stopped + 10


# ----------------------------------------------------------------------------- bad input


def missing_input(tmp_path, trained):
    return ["prepare", tmp_path / "no-such-corpus", "--out", tmp_path / "data", "--no-progress"]


def no_matching_files(tmp_path, trained):
    write_text(tmp_path / "corpus" / "notes.md", "not a txt file\n")
    return ["prepare", tmp_path / "corpus", "--out", tmp_path / "data", "--no-progress"]


def empty_corpus(tmp_path, trained):
    write_text(tmp_path / "corpus" / "empty.txt", "")
    return ["prepare", tmp_path / "corpus", "--out", tmp_path / "data", "--no-progress"]


def undecodable_strict(tmp_path, trained):
    write_text(tmp_path / "corpus" / "good.txt", "fine\n")
    (tmp_path / "corpus" / "bad.txt").write_bytes("héllo ".encode() + b"\xff")
    return ["prepare", tmp_path / "corpus", "--out", tmp_path / "data", "--no-progress"]


def vocabulary_too_large(tmp_path, trained):
    write_text(tmp_path / "corpus" / "huge.txt", "".join(chr(0x10000 + i) for i in range(65537)))
    return ["prepare", tmp_path / "corpus", "--out", tmp_path / "data", "--no-progress"]


def train_args(trained, tmp_path, *extra):
    return ["train", "--data", trained.data, "--out", tmp_path / "run", "--max-iters", 5, *TRAIN_ARGS, *extra]


def unknown_set_key(tmp_path, trained):
    return train_args(trained, tmp_path, "--set", "colour=blue")


def bad_set_value(tmp_path, trained):
    return train_args(trained, tmp_path, "--set", "n_layer=two")


def n_embd_not_divisible(tmp_path, trained):
    return train_args(trained, tmp_path, "--set", "n_embd=30", "--set", "n_head=4")


def dropout_too_large(tmp_path, trained):
    return train_args(trained, tmp_path, "--set", "dropout=1.5")


def block_larger_than_data(tmp_path, trained):
    return train_args(trained, tmp_path, "--set", "block_size=100000")


def copy_run(tmp_path, trained) -> Path:
    return Path(shutil.copytree(trained.run, tmp_path / "run"))


def resume_corrupt_checkpoint(tmp_path, trained):
    run_dir = copy_run(tmp_path, trained)
    (run_dir / "last.json").write_text('{"format": "something else"}')
    return ["train", "--data", trained.data, "--out", run_dir, "--resume", *TRAIN_ARGS]


def unknown_preset(tmp_path, trained):
    return ["train", "--data", trained.data, "--out", tmp_path / "run", "--preset", "huge"]


def eval_missing_run(tmp_path, trained):
    return ["eval", tmp_path / "no-run", "--data", trained.data, "--no-progress"]


def sample_missing_run(tmp_path, trained):
    return ["sample", tmp_path / "no-run", "--max-new-tokens", 5]


def eval_corrupt_checkpoint(tmp_path, trained):
    run_dir = copy_run(tmp_path, trained)
    path = run_dir / json.loads((run_dir / "best.json").read_text())["files"]["model"]["file"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return ["eval", run_dir, "--data", trained.data, "--no-progress"]


def sample_corrupt_record(tmp_path, trained):
    run_dir = copy_run(tmp_path, trained)
    (run_dir / "best.json").write_text("{ this is not json")
    return ["sample", run_dir, "--max-new-tokens", 5]


def prompt_outside_vocabulary(tmp_path, trained):
    return ["sample", trained.run, "--prompt", "The ☃ and 😀", "--max-new-tokens", 5, "--device", "cpu"]


def eval_other_vocabulary(tmp_path, trained):
    write_text(tmp_path / "other" / "x.txt", "completely different symbols: ΑΒΓΔ 12345\n" * 20)
    prepare([str(tmp_path / "other")], tmp_path / "other-data")
    return ["eval", trained.run, "--data", tmp_path / "other-data", "--no-progress"]


def info_vocabulary_too_large(tmp_path, trained):
    return ["info", "--preset", "seed", "--vocab-size", 100_000_000]


def eval_batch_size_zero(tmp_path, trained):
    return ["eval", trained.run, "--data", trained.data, "--batch-size", 0, "--device", "cpu", "--no-progress"]


BAD_INPUTS = [
    (missing_input, "no such file or directory"),
    (no_matching_files, "no files matching '*.txt'"),
    (empty_corpus, "empty"),
    (undecodable_strict, "bad.txt: invalid UTF-8 at byte offset 7"),
    (vocabulary_too_large, "65537 distinct characters"),
    (unknown_set_key, "unknown config key 'colour'; known keys: "),
    (bad_set_value, "n_layer expects an int"),
    (n_embd_not_divisible, "n_embd (30) must be divisible by n_head (4)"),
    (dropout_too_large, "dropout must be in [0, 1), got 1.5"),
    (block_larger_than_data, "block_size 100000 is larger than the train split"),
    (resume_corrupt_checkpoint, "is not a tinygpt checkpoint"),
    (unknown_preset, "invalid choice: 'huge'"),
    (eval_missing_run, "no such run directory"),
    (sample_missing_run, "no such run directory"),
    (eval_corrupt_checkpoint, "truncated or altered"),
    (sample_corrupt_record, "not valid JSON"),
    (prompt_outside_vocabulary, "characters not in the vocabulary: '☃', '😀'"),
    (eval_other_vocabulary, "vocabulary"),
    (info_vocabulary_too_large, "--vocab-size must be at most 65536"),
    (eval_batch_size_zero, "batch size must be at least 1, got 0"),
]


@pytest.mark.parametrize(("setup", "message"), BAD_INPUTS, ids=[setup.__name__ for setup, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_non_zero_exit(tmp_path, trained, setup, message):
    result = run_cli(*setup(tmp_path, trained), cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line.startswith("tinygpt ")
    assert message in line
    if setup is unknown_set_key:
        for key in ("n_embd", "n_layer", "learning_rate", "dropout", "max_iters"):
            assert key in line
    if setup is undecodable_strict:
        assert str(tmp_path / "corpus" / "bad.txt") in line
