"""Experiments: `compare`, `lr-find` and `train --init-from` (issue 14)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from helpers import MIXED_TEXT, assert_ok, assert_one_line_error, run_cli, words_text, write_text
from tinygpt.checkpoint import load_model
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.data import prepare
from tinygpt.distributed import Distributed
from tinygpt.experiments import PNG_SIGNATURE, suggest_lr
from tinygpt.train import start_run, train

# every speed choice fixed, so that nothing is timed and the runs differ only where a test says
FIXED = dict(dtype="float32", attention="sdpa", dropout_mask="torch", decode_copies="off")
FIXED_SETS = [a for key, value in FIXED.items() for a in ("--set", f"{key}={value}")]


def tiny_configs(n_embd: int = 16, learning_rate: float = 3e-3) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=n_embd, dropout=0.0)
    return model, TrainConfig(batch_size=8, learning_rate=learning_rate, min_lr=1e-4, warmup_iters=2, max_iters=12,
                              eval_interval=6, eval_iters=2, seed=3, **FIXED)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Two data directories (the second has characters the first lacks) and three runs:
    `a` and `b` on the same data differ in n_embd and learning_rate; `other` on the other data."""
    root = tmp_path_factory.mktemp("experiments")
    write_text(root / "corpus" / "a.txt", words_text(500, seed=1))
    prepare([str(root / "corpus")], root / "data", progress=False)
    write_text(root / "corpus2" / "a.txt", words_text(400, seed=2) + MIXED_TEXT * 3)
    prepare([str(root / "corpus2")], root / "data2", progress=False)
    for name, data, (model, config) in (("a", "data", tiny_configs()), ("b", "data", tiny_configs(32, 1e-3)),
                                        ("other", "data2", tiny_configs())):
        train(root / data, root / name, model, config, device="cpu", progress=False, log=lambda *a: None)
    return root


# ----------------------------------------------------------------------------- compare


def test_compare_lists_only_the_differing_keys_and_writes_a_png(workspace, tmp_path):
    png = tmp_path / "compare.png"
    result = assert_ok(run_cli("compare", workspace / "a", workspace / "b", "--json", "--out", png,
                               "--x", "tokens"))
    report = json.loads(result.stdout)
    assert set(report["differing_keys"]) == {"n_embd", "learning_rate"}
    assert report["differing_keys"]["n_embd"] == [16, 32]
    assert report["unit"] == "bits_per_char" and result.stderr == ""
    a, b = report["runs"]
    assert a["config"] == {"n_embd": 16, "learning_rate": 3e-3} and a["iterations"] == 12
    assert b["parameters"] > a["parameters"] > 0
    rows = [json.loads(line) for line in (workspace / "a" / "metrics.jsonl").read_text().splitlines()]
    assert a["best_val_bits_per_char"] == min(r["val_bits_per_char"] for r in rows)
    assert a["tokens_per_second"] > 0 and a["wall_time_seconds"] > 0
    assert png.read_bytes().startswith(PNG_SIGNATURE)

    line = assert_one_line_error(run_cli("compare", workspace / "a", workspace / "b", "--out", png))
    assert "exists; pass --overwrite" in line  # a plot already there is the user's until they say so
    table = assert_ok(run_cli("compare", workspace / "a", workspace / "b", "--out", png, "--x", "seconds",
                              "--overwrite")).stdout
    header = table.splitlines()[0].split()
    assert header[:3] == ["run", "n_embd", "learning_rate"] and "n_layer" not in header
    assert "best val bits/char" in table.splitlines()[0]


def test_compare_warns_once_when_the_data_differs_and_scores_in_bits_per_byte(workspace, tmp_path):
    result = assert_ok(run_cli("compare", workspace / "a", workspace / "other", "--json",
                               "--out", tmp_path / "c.png"))
    assert len(result.stderr.strip().splitlines()) == 1 and "different data" in result.stderr
    report = json.loads(result.stdout)
    assert report["unit"] == "bits_per_byte" and "best_val_bits_per_byte" in report["runs"][0]
    assert set(report["differing_keys"]) == {"vocab_size"}


def test_compare_bad_input_is_one_line_and_overwrites_nothing(workspace, tmp_path, refused):
    not_a_run = tmp_path / "notes"
    write_text(not_a_run / "todo.txt", "mine\n")
    refused(["compare", workspace / "a", not_a_run, "--out", tmp_path / "c.png"], "not a tinyGPT run")
    refused(["compare", workspace / "a", "--x", "epochs", "--out", tmp_path / "c.png"], "--x")
    mine = write_text(tmp_path / "mine.png", "not a picture")
    refused(["compare", workspace / "a", "--out", mine], "not a PNG")
    assert mine.read_text() == "not a picture"
    assert not (tmp_path / "c.png").exists()


# ----------------------------------------------------------------------------- lr-find


def test_lr_find_suggests_a_finite_rate_inside_the_range_and_writes_its_png(workspace, tmp_path):
    png = tmp_path / "lr.png"
    result = assert_ok(run_cli("lr-find", "--data", workspace / "data", "--preset", "tiny", *FIXED_SETS,
                               "--set", "n_layer=1", "--set", "batch_size=8", "--steps", "40",
                               "--min-lr", "1e-5", "--max-lr", "3", "--out", png, "--no-progress"))
    match = re.search(r"suggested learning_rate: (\S+) \(rule: steepest descent", result.stdout)
    assert match, result.stdout
    suggested = float(match.group(1))
    assert math.isfinite(suggested) and 1e-5 <= suggested <= 3
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]


def test_suggest_lr_takes_the_steepest_descent_before_the_minimum():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    # falls slowly, then fast (1e-2 -> 1e-1), then diverges past 1e-1
    assert suggest_lr(lrs, [3.0, 2.9, 2.8, 1.0, 9.0]) == 1e-2


def test_lr_find_bad_input_is_one_line(workspace, refused):
    data = workspace / "data"
    refused(["lr-find", "--data", data, "--preset", "tiny", "--steps", "1"], "--steps")
    refused(["lr-find", "--data", data, "--preset", "tiny", "--min-lr", "1", "--max-lr", "0.1"],
                   "--min-lr")
    before = sorted(p.name for p in (workspace / "a").iterdir())
    refused(["lr-find", "--data", data, "--preset", "tiny", "--out", workspace / "a" / "lr.png"],
                   "inside a tinyGPT run")
    assert sorted(p.name for p in (workspace / "a").iterdir()) == before


# ----------------------------------------------------------------------------- train --init-from


def test_init_from_starts_from_the_runs_weights(workspace, tmp_path):
    old, _ = load_model(workspace / "a")
    model_config, train_config = tiny_configs()
    (tmp_path / "new").mkdir()
    run = start_run(workspace / "data", tmp_path / "new", model_config, train_config, torch.device("cpu"), False,
                    lambda *a: None, Distributed(), init_from=workspace / "a")
    x = torch.randint(0, old.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    new = run.state.model.eval()
    with torch.no_grad():
        assert torch.equal(new(x)[0], old(x)[0])
    assert run.state.iteration == 0 and not run.state.optimizers[0].state  # a fresh optimizer
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["init_from"]["run"] == str((workspace / "a").resolve())


def test_train_init_from_on_the_command_line_records_its_origin(workspace, tmp_path):
    out = tmp_path / "tuned"
    assert_ok(run_cli("train", "--init-from", workspace / "a", "--data", workspace / "data", "--out", out,
                      "--max-iters", "2", "--set", "eval_interval=2", "--set", "learning_rate=1e-4",
                      "--no-progress"))
    record = json.loads((out / "last.json").read_text())
    assert record["init_from"]["checkpoint"] == "best" and record["iteration"] == 2
    assert record["model_config"]["n_embd"] == 16 and record["train_config"]["learning_rate"] == 1e-4
    assert record["train_config"]["batch_size"] == 8  # the run's training config, not the cpu preset's


def test_init_from_bad_input_is_one_line(workspace, tmp_path, refused):
    a = workspace / "a"
    refused(["train", "--init-from", a, "--data", workspace / "data2", "--out", tmp_path / "x", "--no-progress"],
            "does not know", "Ç")
    assert not (tmp_path / "x" / "config.json").exists()
    refused(["train", "--init-from", a, "--data", workspace / "data", "--out", tmp_path / "y",
                           "--set", "n_layer=3"], "n_layer")
    refused(["train", "--init-from", tmp_path, "--data", workspace / "data", "--out", tmp_path / "z"],
                   "not a tinyGPT run")
