"""Shared test helpers: small corpora written into tmp_path, token files decoded back to
text, and the `tinygpt` command run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Latin with accents, CJK, Hangul, Greek, Cyrillic, Hebrew, Arabic and emoji (4-byte UTF-8).
MIXED_TEXT = (
    "Hello, world! Ça va? Déjà vu, naïve café.\n"
    "日本語のテキスト。中文字符。한국어 텍스트.\n"
    "Ελληνικά, Русский, עברית, العربية.\n"
    "emoji: 😀🎉🐍 and a family 👩‍👩‍👧 and a flag 🇫🇷.\n"
)


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 bytes exactly (no newline translation), creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def words_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: enough structure for a tiny model to learn a little."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "my", "lord",
             "thou", "art", "a", "fool", "to", "be", "or", "not", "sweet", "night", "day"]
    lines, line = [], []
    for index in rng.integers(0, len(words), n_words):
        line.append(words[index])
        if len(line) == 8:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def read_meta(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))


def read_split(data_dir: Path, split: str) -> str:
    """Decode DATA_DIR/{split}.bin back to text with the vocabulary in meta.json."""
    meta = read_meta(data_dir)
    chars = meta["tokenizer"]["chars"]
    ids = np.fromfile(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
    return "".join(chars[i] for i in ids.tolist())


def expected_split(texts: list[str], val_fraction: float) -> tuple[str, str]:
    """The documented split: the last val_fraction of each file's characters is validation."""
    train, val = [], []
    for text in texts:
        n_val = int(len(text) * val_fraction)
        train.append(text[: len(text) - n_val])
        val.append(text[len(text) - n_val:])
    return "".join(train), "".join(val)


def run_cli(*args, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m tinygpt ARGS...` with the test interpreter; output decoded as UTF-8."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "tinygpt", *[str(a) for a in args]],
        capture_output=True, text=True, encoding="utf-8", env=env, cwd=cwd, timeout=timeout,
    )


def assert_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """A user error: non-zero exit, exactly one line on stderr, no traceback. Returns the line."""
    assert result.returncode != 0, f"expected a failure; stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    return lines[0]


def train_tiny(data_dir: Path, run_dir: Path, max_iters: int, eval_interval: int, settings: dict,
               resume: bool = False):
    """Train the tiny preset in-process and quietly: the model's dropout, dtype and eval_iters from
    `settings` (which must hold them), and any other training key it holds."""
    from tinygpt.config import get_preset
    from tinygpt.train import train

    model_config, train_config = get_preset("tiny")
    model_config.dropout = settings["dropout"]
    train_config.dtype = settings["dtype"]
    train_config.eval_iters = settings["eval_iters"]
    for key, value in settings.items():
        if key != "dropout":
            assert hasattr(train_config, key), f"no training key {key!r}"
            setattr(train_config, key, value)
    train_config.eval_interval = eval_interval
    train_config.max_iters = max_iters
    return train(data_dir, run_dir, model_config, train_config, device="cpu", resume=resume,
                 progress=False, log=lambda *args: None)


def random_run(run_dir: Path, tokenizer, sizes: dict, seed: int = 0, **options):
    """A run (a `best` checkpoint) of a random model whose every weight, norms and biases
    included, is far from its init, so a norm weight or bias put in the wrong place by an
    export cannot go unnoticed. Returns the model."""
    import dataclasses

    import torch

    from tinygpt.checkpoint import model_tensors, save_checkpoint
    from tinygpt.config import ModelConfig
    from tinygpt.model import GPT

    torch.manual_seed(seed)
    config = ModelConfig(**{**sizes, **options, "vocab_size": tokenizer.vocab_size})
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"iteration": 7, "model_config": dataclasses.asdict(config), "tokenizer": tokenizer.to_dict()}
    save_checkpoint(run_dir, "best", record, {"model": model_tensors(model)})
    return model
