import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import safetensors
import torch

from tinygpt import checkpoint
from tinygpt.checkpoint import CheckpointError, load_model, model_tensors, read_record, save_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer

CHARS = sorted(set("abcdefghij klmnop,.\n😀é"))


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    options = dict(vocab_size=len(CHARS), block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(ModelConfig(**{**options, **overrides})).eval()


def save(model: GPT, run_dir: Path, name: str = "last", iteration: int = 10) -> None:
    record = {
        "iteration": iteration,
        "model_config": dataclasses.asdict(model.config),
        "tokenizer": CharTokenizer(CHARS).to_dict(),
    }
    save_checkpoint(run_dir, name, record, {"model": model_tensors(model)})


def logits_of(model: GPT) -> torch.Tensor:
    idx = torch.arange(12)[None] % len(CHARS)
    with torch.no_grad():
        return model(idx)[0]


def tensor_file(run_dir: Path, name: str = "last") -> Path:
    record = json.loads((run_dir / f"{name}.json").read_text())
    return run_dir / record["files"]["model"]["file"]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": True}, {"positions": "rope", "norm": "post", "bias": False, "lm_head_bias": True}],
)
def test_save_load_gives_identical_logits(tmp_path, overrides):
    model = make_model(**overrides)
    save(model, tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert tokenizer.chars == CHARS
    assert loaded.config == model.config
    assert not loaded.training
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert logits_of(make_model(seed=1, **overrides)).ne(logits_of(model)).any()  # a fresh model differs
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.token_embedding.weight
        with safetensors.safe_open(tensor_file(tmp_path), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()  # stored once


def test_files_are_safetensors_and_json_only(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be used")

    for module, name in [(pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
                         (torch, "save"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    model = make_model()
    save(model, tmp_path, "best")
    save(model, tmp_path, "last")
    loaded, _ = load_model(tmp_path)
    assert torch.equal(logits_of(loaded), logits_of(model))

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best-00000010.model.safetensors", "best.json", "last-00000010.model.safetensors", "last.json"]
    for path in tmp_path.glob("*.safetensors"):
        with safetensors.safe_open(path, framework="pt") as f:
            assert f.metadata()["format"] == "tinygpt-checkpoint"
            assert set(f.keys()) == set(model.state_dict())
    for path in tmp_path.glob("*.json"):
        record = json.loads(path.read_text())
        assert record["format"] == "tinygpt-checkpoint" and record["iteration"] == 10


def test_new_save_replaces_old_files(tmp_path):
    save(make_model(seed=0), tmp_path, iteration=10)
    newer = make_model(seed=1)
    save(newer, tmp_path, iteration=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-00000020.model.safetensors", "last.json"]
    assert read_record(tmp_path, "last")["iteration"] == 20
    assert torch.equal(logits_of(load_model(tmp_path)[0]), logits_of(newer))


def test_crash_before_commit_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = make_model(seed=0)
    save(old, tmp_path, iteration=10)
    real_write = checkpoint.atomic_write_bytes

    def crash_on_record(path, data):
        if path.name == "last.json":
            raise OSError("simulated crash")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", crash_on_record)
    with pytest.raises(CheckpointError, match="could not write .*last.json.*simulated crash.*intact"):
        save(make_model(seed=1), tmp_path, iteration=20)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*00000020*")) and not list(tmp_path.glob(".*.tmp"))  # nothing of it is left
    assert read_record(tmp_path, "last")["iteration"] == 10
    assert torch.equal(logits_of(load_model(tmp_path)[0]), logits_of(old))


def truncate(run_dir: Path) -> None:
    path = tensor_file(run_dir)
    path.write_bytes(path.read_bytes()[:-100])


def alter_byte(run_dir: Path) -> None:
    path = tensor_file(run_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete_tensors(run_dir: Path) -> None:
    tensor_file(run_dir).unlink()


def garbage_record(run_dir: Path) -> None:
    (run_dir / "last.json").write_bytes(b"\x00{not json at all")


def foreign_record(run_dir: Path) -> None:
    (run_dir / "last.json").write_text(json.dumps({"name": "someone else's file", "iteration": 3}))


def list_record(run_dir: Path) -> None:
    (run_dir / "last.json").write_text("[1, 2, 3]")


def future_version(run_dir: Path) -> None:
    record = json.loads((run_dir / "last.json").read_text())
    (run_dir / "last.json").write_text(json.dumps({**record, "version": 99}))


def wrong_shapes(run_dir: Path) -> None:
    record = json.loads((run_dir / "last.json").read_text())
    record["model_config"]["n_embd"] = 32
    (run_dir / "last.json").write_text(json.dumps(record))


def incomplete_record(run_dir: Path) -> None:
    record = json.loads((run_dir / "last.json").read_text())
    del record["tokenizer"]
    (run_dir / "last.json").write_text(json.dumps(record))


def valid_checksum_bad_header(run_dir: Path) -> None:
    """A file whose recorded checksum matches but which is not safetensors."""
    import hashlib

    path = tensor_file(run_dir)
    data = b"\xff" * 64
    path.write_bytes(data)
    record = json.loads((run_dir / "last.json").read_text())
    record["files"]["model"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run_dir / "last.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate, "truncated or altered"),
        (alter_byte, "truncated or altered"),
        (delete_tensors, "is missing"),
        (garbage_record, "corrupt: not valid JSON"),
        (foreign_record, "not a tinygpt checkpoint"),
        (list_record, "not a tinygpt checkpoint"),
        (future_version, "version 99"),
        (wrong_shapes, "do not fit the model config"),
        (incomplete_record, "incomplete"),
        (valid_checksum_bad_header, "not a valid safetensors file"),
    ],
)
def test_damaged_checkpoints_raise_checkpoint_error(tmp_path, damage, message):
    save(make_model(), tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)  # one line for the CLI


def test_missing_run_dir_and_empty_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no best.json or last.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="missing best.json"):
        load_model(tmp_path, "best")


def test_best_is_preferred_over_last(tmp_path):
    best, last = make_model(seed=0), make_model(seed=1)
    save(best, tmp_path, "best")
    save(last, tmp_path, "last")
    assert torch.equal(logits_of(load_model(tmp_path)[0]), logits_of(best))
    assert torch.equal(logits_of(load_model(tmp_path, "last")[0]), logits_of(last))
