"""auto_dropout (issue 16): a run that will see its training tokens many times gets more
dropout, decided once, recorded in the run, and kept by a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
import torch

from helpers import words_text, write_text
from tinygpt import checkpoint
from tinygpt.config import get_preset
from tinygpt.data import load_tokens, prepare
from tinygpt.train import dropout_for_epochs, train

FLOOR = 0.05


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small text: 40 tiny-preset iterations (16 windows of 32) see its training split ~15 times."""
    root = tmp_path_factory.mktemp("data")
    prepare([str(write_text(root / "corpus.txt", words_text(300)))], root / "data", progress=False)
    return root / "data"


def train_auto(data_dir: Path, run_dir: Path, resume: bool = False, **train_keys):
    model_config, train_config = get_preset("tiny")
    model_config.dropout = FLOOR
    settings = {"auto_dropout": True, "dtype": "float32", "eval_iters": 2, "eval_interval": 20, "max_iters": 40,
                **train_keys}
    for key, value in settings.items():
        setattr(train_config, key, value)
    return train(data_dir, run_dir, model_config, train_config, device="cpu", resume=resume, progress=False,
                 log=lambda *args: None)


def expected_dropout(data_dir: Path, iterations: int) -> float:
    return dropout_for_epochs(iterations * 16 * 32 / len(load_tokens(data_dir, "train")), FLOOR)


def test_the_rule_keeps_the_floor_until_ten_passes_then_rises_to_a_cap():
    assert dropout_for_epochs(3, 0.05) == 0.05
    assert dropout_for_epochs(10, 0.05) == 0.05
    assert dropout_for_epochs(20, 0.05) == pytest.approx(0.15)
    assert dropout_for_epochs(1000, 0.05) == 0.2
    assert dropout_for_epochs(1000, 0.3) == 0.3  # never below the model's own
    assert dropout_for_epochs(15, 0.0) == pytest.approx(0.05)


def test_a_run_of_many_passes_records_the_dropout_it_chose(data_dir, tmp_path):
    chosen = expected_dropout(data_dir, 40)
    assert chosen > FLOOR + 0.02  # the corpus is small enough that the rule raises it
    train_auto(data_dir, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["dropout"] == chosen and saved["train"]["auto_dropout"] is False
    toml = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert toml["model"]["dropout"] == chosen and toml["train"]["auto_dropout"] is False
    for name in ("last", "best"):
        record = checkpoint.read_record(tmp_path / "run", name)
        assert record["model_config"]["dropout"] == chosen
        assert record["train_config"]["auto_dropout"] is False


def test_the_chosen_dropout_is_what_the_model_trains_with(data_dir, tmp_path, monkeypatch):
    seen = dropout_rates_seen(monkeypatch)
    train_auto(data_dir, tmp_path / "run")
    assert seen and all(rates == [expected_dropout(data_dir, 40)] for rates in seen)


def test_a_time_budget_decides_from_the_speed_of_its_first_iterations(data_dir, tmp_path):
    result = train_auto(data_dir, tmp_path / "run", max_time=6.0, max_iters=100_000)
    assert result.iterations > 25  # past the iterations it times
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["auto_dropout"] is False
    # thousands of iterations foreseen in 6 s of a tiny model on a tiny text: the cap
    assert saved["model"]["dropout"] == 0.2


def test_without_auto_dropout_the_model_keeps_its_own(data_dir, tmp_path):
    train_auto(data_dir, tmp_path / "run", auto_dropout=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["dropout"] == FLOOR and saved["train"]["auto_dropout"] is False


def dropout_rates_seen(monkeypatch) -> list[list[float]]:
    """The dropout rates of the model at every training step of the runs that follow."""
    import tinygpt.train as train_module

    seen = []
    real_step = train_module.train_step

    def spy(step_model, *args, **kwargs):
        seen.append(sorted({m.p for m in step_model.modules() if isinstance(m, torch.nn.Dropout)}))
        return real_step(step_model, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", spy)
    return seen


def test_a_resumed_run_keeps_the_dropout_it_chose(data_dir, tmp_path, monkeypatch):
    train_auto(data_dir, tmp_path / "run", max_iters=20)  # foresees 20 iterations: less dropout
    first = expected_dropout(data_dir, 20)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["dropout"] == first
    assert first < expected_dropout(data_dir, 40)
    seen = dropout_rates_seen(monkeypatch)
    # asked again as it was first asked (the floor, auto_dropout on), now for 40 iterations
    train_auto(data_dir, tmp_path / "run", resume=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["dropout"] == first and saved["train"]["auto_dropout"] is False
    assert len(seen) == 20 and all(rates == [first] for rates in seen)


def test_an_interrupted_run_resumes_bit_for_bit(data_dir, tmp_path, monkeypatch):
    import tinygpt.train as train_module

    train_auto(data_dir, tmp_path / "whole")
    monkeypatch.setattr(train_module, "_stop_agreed", lambda requests, iteration, world, device: iteration == 25)
    result = train_auto(data_dir, tmp_path / "cut")
    assert result.interrupted and result.iterations == 25
    monkeypatch.undo()
    train_auto(data_dir, tmp_path / "cut", resume=True)
    records = {name: checkpoint.read_record(tmp_path / name, "last") for name in ("whole", "cut")}
    assert records["cut"]["iteration"] == 40
    a, b = (checkpoint.load_tensors(tmp_path / name, records[name], "model") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records["cut"]["model_config"]["dropout"] == expected_dropout(data_dir, 40)


def test_a_dropout_given_by_hand_turns_auto_dropout_off(tmp_path):
    from tinygpt.config import apply_overrides, load_config_file

    model, train_config = get_preset("cpu")
    assert train_config.auto_dropout
    apply_overrides(model, train_config, ["dropout=0.2"])
    assert model.dropout == 0.2 and not train_config.auto_dropout
    model, train_config = get_preset("cpu")
    apply_overrides(model, train_config, ["dropout=0.1", "auto_dropout=true"])  # as a floor, asked for
    assert model.dropout == 0.1 and train_config.auto_dropout
    model, train_config = get_preset("cpu")
    apply_overrides(model, train_config, ["n_embd=128"])
    assert train_config.auto_dropout
    (tmp_path / "a.toml").write_text('preset = "cpu"\n[model]\ndropout = 0.2\n')
    assert not load_config_file(tmp_path / "a.toml")[1].auto_dropout
    (tmp_path / "b.toml").write_text('preset = "cpu"\n[model]\nn_layer = 2\n')
    assert load_config_file(tmp_path / "b.toml")[1].auto_dropout
