import json
import math
import pickle
import signal
from pathlib import Path

import pytest
import torch

from helpers import words_text, write_text
from tinygpt import checkpoint
from tinygpt import train as train_module
from tinygpt.checkpoint import CheckpointError, load_model
from tinygpt.config import ConfigError, ModelConfig, TrainConfig, get_preset
from tinygpt.data import prepare
from tinygpt.model import GPT
from tinygpt.train import TrainingDiverged, build_optimizers, learning_rate_at, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    write_text(root / "corpus" / "a.txt", words_text(600, seed=1))
    write_text(root / "corpus" / "b.txt", words_text(300, seed=2))
    prepare([str(root / "corpus")], root / "data")
    return root / "data"


def configs(**train_overrides) -> tuple[ModelConfig, TrainConfig]:
    """A tiny model with dropout (so resuming must restore the dropout RNG too), float32."""
    model = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    options = dict(batch_size=8, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, max_iters=30,
                   eval_interval=10, eval_iters=2, dtype="float32", seed=7)
    return model, TrainConfig(**{**options, **train_overrides})


def run(data_dir, run_dir, resume=False, **train_overrides):
    model_config, train_config = configs(**train_overrides)
    return train(data_dir, run_dir, model_config, train_config, device="cpu", resume=resume,
                 progress=False, log=lambda *args: None)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(run_dir: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    record = checkpoint.read_record(run_dir, name)
    return {kind: checkpoint.load_tensors(run_dir, record, kind) for kind in record["files"]}


def test_train_writes_metrics_plot_and_checkpoints(data_dir, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be used")

    for module, name in [(pickle, "dump"), (pickle, "dumps"), (torch, "save"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    run_dir = tmp_path / "run"
    result = run(data_dir, run_dir)
    assert result.iterations == 30 and not result.interrupted

    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [10, 20, 30]  # one line per evaluation
    for row in rows:
        assert {"iteration", "train_loss", "val_loss", "val_bits_per_char", "lr"} <= set(row)
        assert row["val_bits_per_char"] == pytest.approx(row["val_loss"] / math.log(2), abs=1e-5)
    # it learns: an untrained model scores about ln(vocab_size) (3.64 nats here); over seeds 1..8
    # this run falls 0.28 .. 0.31 from its first evaluation to its last, to 0.53 .. 0.60 below ln(vocab)
    vocab_size = len(json.loads((data_dir / "meta.json").read_text())["tokenizer"]["chars"])
    for key in ("train_loss", "val_loss"):
        assert rows[-1][key] < rows[0][key] - 0.15, [r[key] for r in rows]
        assert rows[-1][key] < math.log(vocab_size) - 0.3, [r[key] for r in rows]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = checkpoint.read_record(run_dir, "last")
    best = checkpoint.read_record(run_dir, "best")
    assert last["iteration"] == 30
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in rows), abs=1e-6)  # rows are rounded
    assert best["iteration"] == min(rows, key=lambda r: r["val_loss"])["iteration"]
    assert set(last["files"]) == {"model", "state"} and set(best["files"]) == {"model"}
    assert result.best_val_loss == best["val_loss"]
    for path in run_dir.iterdir():
        assert path.suffix in {".json", ".jsonl", ".png", ".safetensors", ".toml"}, path.name

    model, tokenizer = load_model(run_dir, "last")
    assert model.config.vocab_size == tokenizer.vocab_size == len(json.loads(
        (data_dir / "meta.json").read_text())["tokenizer"]["chars"])


def interrupt_at(monkeypatch, stop_before_iteration: int) -> None:
    """Deliver a real SIGINT to this process while iteration `stop_before_iteration` starts,
    through the handler train() installs (Ctrl-C)."""
    real = train_module.learning_rate_at
    outside_train = signal.getsignal(signal.SIGINT)

    def learning_rate_with_interrupt(iteration, *args, **kwargs):
        if iteration == stop_before_iteration:
            # without train()'s handler this would raise KeyboardInterrupt into pytest
            assert signal.getsignal(signal.SIGINT) is not outside_train, "train() installed no SIGINT handler"
            signal.raise_signal(signal.SIGINT)
        return real(iteration, *args, **kwargs)

    monkeypatch.setattr(train_module, "learning_rate_at", learning_rate_with_interrupt)


@pytest.mark.parametrize("stop_before_iteration", [12, 19])
def test_resume_after_interruption_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch, stop_before_iteration):
    uninterrupted = tmp_path / "a"
    run(data_dir, uninterrupted)

    interrupted = tmp_path / "b"
    outside_train = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, stop_before_iteration)
    result = run(data_dir, interrupted)
    monkeypatch.undo()
    assert result.interrupted
    assert result.iterations == stop_before_iteration + 1  # the current iteration completes
    assert checkpoint.read_record(interrupted, "last")["iteration"] == stop_before_iteration + 1
    assert signal.getsignal(signal.SIGINT) is outside_train  # handler restored

    resumed_iterations = []  # the iterations the resumed run trains: the rest, not all 30 again
    real_learning_rate_at = train_module.learning_rate_at

    def recording_learning_rate_at(iteration, *args, **kwargs):
        resumed_iterations.append(iteration)
        return real_learning_rate_at(iteration, *args, **kwargs)

    monkeypatch.setattr(train_module, "learning_rate_at", recording_learning_rate_at)
    result = run(data_dir, interrupted, resume=True)
    monkeypatch.undo()
    assert result.iterations == 30 and not result.interrupted
    assert resumed_iterations == list(range(stop_before_iteration + 1, 30))

    for name in ("last", "best"):
        expected, actual = checkpoint_tensors(uninterrupted, name), checkpoint_tensors(interrupted, name)
        assert expected.keys() == actual.keys()
        for kind in expected:
            assert expected[kind].keys() == actual[kind].keys()
            for key, tensor in expected[kind].items():
                assert torch.equal(tensor, actual[kind][key]), f"{name} {kind} {key} differs"
    keys = ("iteration", "train_loss", "val_loss", "lr")
    rows = [[r[k] for k in keys] for r in metrics(interrupted)]
    assert rows == [[r[k] for k in keys] for r in metrics(uninterrupted)]


def test_resume_checks(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", max_iters=10)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "last.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        run(data_dir, tmp_path / "broken", resume=True)
    model_config, train_config = configs(max_iters=20)
    model_config.n_embd = 32
    with pytest.raises(ConfigError, match="different model config.*n_embd"):
        train(data_dir, tmp_path / "run", model_config, train_config, device="cpu", resume=True,
              progress=False, log=lambda *args: None)


def test_block_size_larger_than_data(tmp_path):
    write_text(tmp_path / "corpus" / "short.txt", "a short text, far shorter than the block\n" * 3)
    prepare([str(tmp_path / "corpus")], tmp_path / "data")
    model_config, train_config = configs()
    model_config.block_size = 64
    with pytest.raises(ConfigError, match="block_size 64 is larger than the .* split"):
        train(tmp_path / "data", tmp_path / "run", model_config, train_config, device="cpu",
              progress=False, log=lambda *args: None)
    assert not (tmp_path / "run" / "last.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = train_module.learning_rate_at

    def explode_after_20(iteration, *args, **kwargs):
        return 1e30 if iteration >= 20 else real(iteration, *args, **kwargs)

    monkeypatch.setattr(train_module, "learning_rate_at", explode_after_20)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="(nan|inf).*last good checkpoint is intact"):
        run(data_dir, run_dir, max_iters=40, grad_clip=0.0)
    assert checkpoint.read_record(run_dir, "last")["iteration"] == 20
    model, _ = load_model(run_dir, "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, 16, dtype=torch.long))
    assert torch.isfinite(logits).all()
    assert [r["iteration"] for r in metrics(run_dir)] == [10, 20]


def test_learning_rate_schedule():
    _, config = configs(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert learning_rate_at(0, config) == pytest.approx(1e-4)
    assert learning_rate_at(9, config) == pytest.approx(1e-3)
    assert learning_rate_at(10, config) == pytest.approx(1e-3)
    assert learning_rate_at(60, config) == pytest.approx(5.5e-4)  # half way down the cosine
    assert learning_rate_at(110, config) == pytest.approx(1e-4)
    _, seed = get_preset("seed")
    assert {learning_rate_at(i, seed) for i in (0, 500, 9999)} == {3e-4}  # constant


def test_weight_decay_groups():
    model_config, train_config = configs()
    model_config.vocab_size = 20
    model = GPT(model_config)
    (optimizer,) = build_optimizers(model, train_config, torch.device("cpu"))
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in undecayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))
    train_config.decay_all_params = True  # the seed preset: plain AdamW on everything
    (optimizer,) = build_optimizers(model, train_config, torch.device("cpu"))
    assert len(optimizer.param_groups) == 1


def test_a_small_val_split_is_scored_whole(data_dir, tmp_path):
    """When the train and val estimates (eval_iters random batches each) would read at least as
    many characters as the val split has, the logged val loss is the whole-split score of
    `tinygpt eval`; with fewer batches it stays an estimate."""
    from tinygpt.data import load_tokens
    from tinygpt.evaluate import evaluate_tokens

    val_tokens = load_tokens(data_dir, "val")
    model_config, _ = configs()
    batch_characters = 8 * model_config.block_size
    assert 2 * 1 * batch_characters < len(val_tokens) - 1 <= 2 * 2 * batch_characters
    scores = {}
    for eval_iters in (2, 1):  # 2: the two estimates would read more than the split, 1: fewer
        run_dir = tmp_path / f"run{eval_iters}"
        run(data_dir, run_dir, eval_iters=eval_iters, max_iters=10)
        model, _ = load_model(run_dir, "last")
        scores[eval_iters] = (metrics(run_dir)[-1]["val_loss"], evaluate_tokens(model, val_tokens).loss)
    logged, exact = scores[2]
    assert logged == pytest.approx(exact, abs=2e-6)
    estimated, exact_again = scores[1]
    assert exact_again == pytest.approx(exact, abs=1e-6)  # the same training either way
    assert abs(estimated - exact) > 1e-4
