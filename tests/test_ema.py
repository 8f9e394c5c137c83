"""ema and ema_horizon (issue 16): evaluations and the `best` checkpoint use a moving average of
the weights (exponential at a fixed decay, or a power-function average whose span grows with
the run); training goes on from the raw weights, and a resumed run continues the average bit
for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import train_tiny, words_text, write_text
from tinygpt import checkpoint, training_state
from tinygpt.config import ConfigError, ModelConfig, TrainConfig, get_preset
from tinygpt.data import prepare
from tinygpt.model import GPT


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([str(write_text(root / "corpus.txt", words_text(3000)))], root / "data", progress=False)
    return root / "data"


def train_ema(data_dir: Path, run_dir: Path, ema: float, max_iters: int = 12, resume: bool = False,
              ema_horizon: float = 0.0):
    # dropout > 0: the dropout stream must continue exactly too; a constant rate after warmup: a
    # run stopped at 8 and resumed to 12 is the 12-iteration run
    settings = {"dropout": 0.1, "dtype": "float32", "eval_iters": 2, "ema": ema, "ema_horizon": ema_horizon,
                "schedule": "constant", "warmup_iters": 2}
    return train_tiny(data_dir, run_dir, max_iters, 4, settings, resume=resume)


def tensors(run_dir: Path, name: str, kind: str) -> dict[str, torch.Tensor]:
    return checkpoint.load_tensors(run_dir, checkpoint.read_record(run_dir, name), kind)


def val_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ema_must_be_a_decay_below_one():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="ema must be in"):
            TrainConfig(ema=bad).validate()
    TrainConfig(ema=0.0).validate()
    TrainConfig(ema=0.999).validate()
    for bad in (0.6, -0.1):
        with pytest.raises(ConfigError, match="ema_horizon must be in"):
            TrainConfig(ema_horizon=bad).validate()
    with pytest.raises(ConfigError, match="set one of them"):
        TrainConfig(ema=0.99, ema_horizon=0.25).validate()
    TrainConfig(ema_horizon=0.5).validate()


@pytest.mark.parametrize("horizon", [0.25, 0.1, 0.5])
def test_the_power_average_weighs_iterate_s_as_s_to_the_power_and_spans_its_share_of_the_run(horizon):
    """Averaging the iterates 1, 2, ..., T (each a scalar equal to its iteration) gives the mean
    of s under weights s^(g+1) - (s-1)^(g+1), g = 1/horizon - 2 (about s^g): its age is `horizon`
    of the run (0.5: the plain mean)."""
    model = torch.nn.Linear(1, 1, bias=False).double()
    average = training_state.weight_average(model, 0.0, horizon)
    T = 300
    for s in range(1, T + 1):  # the first update copies iterate 1
        with torch.no_grad():
            model.weight.fill_(float(s))
        average.update(model)
    mean = average.module.weight.item()
    s = torch.arange(1, T + 1, dtype=torch.float64)
    weights = s ** (1 / horizon - 1) - (s - 1) ** (1 / horizon - 1)
    assert mean == pytest.approx(float((weights * s).sum() / weights.sum()), rel=1e-9)
    assert (T - mean) / T == pytest.approx(horizon, abs=0.01)
    assert average.updates == T


def test_the_average_is_exponential_and_starts_from_the_first_weights():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    average = training_state.weight_average(model, 0.75)
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    average.update(model)  # the first update copies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    for name, p in average.module.named_parameters():
        assert torch.allclose(p, 0.75 * first[name] + 0.25 * (first[name] + 1.0)), name
    assert training_state.weight_average(model, 0.0) is None


def test_ema_changes_what_is_scored_and_kept_not_how_the_run_trains(data_dir, tmp_path):
    train_ema(data_dir, tmp_path / "plain", ema=0.0)
    train_ema(data_dir, tmp_path / "ema", ema=0.8)
    # the raw weights follow the same trajectory with or without the average
    plain_last, ema_last = tensors(tmp_path / "plain", "last", "model"), tensors(tmp_path / "ema", "last", "model")
    assert all(torch.equal(plain_last[name], ema_last[name]) for name in plain_last)
    # what is scored differs: the average's losses, not the raw weights'
    assert val_losses(tmp_path / "plain") != val_losses(tmp_path / "ema")
    # `best` holds the weights its evaluation scored, and says which; `last` carries both
    best_record = checkpoint.read_record(tmp_path / "ema", "best")
    assert best_record["iteration"] == 12  # the loss still falls: the last evaluation is the best
    best, state = tensors(tmp_path / "ema", "best", "model"), tensors(tmp_path / "ema", "last", "state")
    kept = {"weight average": {name: state[f"ema.{name}"] for name in best}, "raw": ema_last}
    assert all(torch.equal(best[name], kept[best_record["weights"]][name]) for name in best)
    assert not all(torch.equal(state[f"ema.{name}"], ema_last[name]) for name in best)
    assert int(state["ema_updates"]) == 12
    assert not any(name.startswith("ema") for name in tensors(tmp_path / "plain", "last", "state"))


@pytest.mark.parametrize("average", [{"ema": 0.8}, {"ema": 0.0, "ema_horizon": 0.25}], ids=["ema", "ema_horizon"])
def test_a_resumed_run_continues_the_average_bit_for_bit(data_dir, tmp_path, average):
    train_ema(data_dir, tmp_path / "straight", max_iters=12, **average)
    train_ema(data_dir, tmp_path / "resumed", max_iters=8, **average)
    train_ema(data_dir, tmp_path / "resumed", max_iters=12, resume=True, **average)
    for name, kind in (("last", "model"), ("last", "state"), ("best", "model")):
        straight, resumed = tensors(tmp_path / "straight", name, kind), tensors(tmp_path / "resumed", name, kind)
        assert straight.keys() == resumed.keys()
        differing = [key for key in straight if not torch.equal(straight[key], resumed[key])]
        assert not differing, f"{name} {kind}: {differing[:5]}"
    assert val_losses(tmp_path / "straight") == val_losses(tmp_path / "resumed")


def test_ema_cannot_change_when_a_run_continues(data_dir, tmp_path):
    train_ema(data_dir, tmp_path / "run", ema=0.8, max_iters=4)
    with pytest.raises(ConfigError, match="ema cannot change"):
        train_ema(data_dir, tmp_path / "run", ema=0.0, max_iters=8, resume=True)


def test_one_average_given_by_hand_replaces_the_presets_other():
    from tinygpt.config import apply_overrides

    model, train_config = get_preset("cpu")
    assert train_config.ema_horizon > 0  # the preset's own average
    apply_overrides(model, train_config, ["ema=0.995"])
    assert (train_config.ema, train_config.ema_horizon) == (0.995, 0.0)
    train_config.validate()
    apply_overrides(model, train_config, ["ema_horizon=0.1"])
    assert (train_config.ema, train_config.ema_horizon) == (0.0, 0.1)
    apply_overrides(model, train_config, ["ema=0.9", "ema_horizon=0.2"])  # both by hand: refused
    with pytest.raises(ConfigError, match="set one of them"):
        train_config.validate()


def test_a_run_recorded_before_the_average_existed_resumes_without_it(data_dir, tmp_path):
    """A run whose record predates ema/ema_horizon continues under a preset that now sets one."""
    run_dir = tmp_path / "run"
    train_ema(data_dir, run_dir, ema=0.0, max_iters=4)
    path = run_dir / "last.json"
    record = json.loads(path.read_text())
    for key in ("ema", "ema_horizon"):
        del record["train_config"][key]
    path.write_text(json.dumps(record))
    result = train_ema(data_dir, run_dir, ema=0.0, ema_horizon=0.25, max_iters=8, resume=True)
    assert result.iterations == 8
    assert json.loads((run_dir / "config.json").read_text())["train"]["ema_horizon"] == 0.0
    assert not any(name.startswith("ema") for name in tensors(run_dir, "last", "state"))


def test_the_last_evaluation_keeps_the_raw_weights_when_the_average_lags(data_dir, tmp_path):
    """At 0.99 per iteration, 12 iterations leave the average near the initial weights: the
    loss has fallen since, so the raw weights score better, and `best` keeps them."""
    train_ema(data_dir, tmp_path / "run", ema=0.99)
    record = checkpoint.read_record(tmp_path / "run", "best")
    assert (record["iteration"], record["weights"]) == (12, "raw")
    best, last = tensors(tmp_path / "run", "best", "model"), tensors(tmp_path / "run", "last", "model")
    assert all(torch.equal(best[name], last[name]) for name in best)
    assert record["best_val_loss"] < val_losses(tmp_path / "run")[-1]  # the row is the average's


@pytest.mark.parametrize("raw_loss, final, kept", [
    (1.9, True, "raw"),  # the average (2.0) lags: the raw weights count
    (2.1, True, "average"),
    (1.9, False, "average"),  # before the last evaluation the raw weights are not scored
])
def test_kept_weights_picks_the_better_at_the_last_evaluation_only(monkeypatch, raw_loss, final, kept):
    from types import SimpleNamespace

    from tinygpt import train
    from tinygpt.distributed import Distributed

    raw, average = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    state = SimpleNamespace(model=raw, average=SimpleNamespace(module=average), evaluated=average)
    run = SimpleNamespace(state=state, world=Distributed(rank=0, world_size=1))
    scored = []
    monkeypatch.setattr(train, "validation_loss", lambda run, seed, model: scored.append(model) or raw_loss)
    lines = []
    weights, loss = train.kept_weights(run, 0, 2.0, final, SimpleNamespace(write=lines.append))
    assert (weights, loss) == ((raw, raw_loss) if kept == "raw" else (average, 2.0))
    assert scored == ([raw] if final else [])
    assert len(lines) == int(final)
