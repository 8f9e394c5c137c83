"""Fault injection for runs and checkpoints: a user's folders are never lost, two processes
never share a run, a full disk leaves the last checkpoint and nothing else, and a damaged
or hostile checkpoint is one line, never a traceback or a huge allocation."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, train_tiny, words_text, write_text
from tinygpt import checkpoint
from tinygpt.data import prepare

SETTINGS = {"dtype": "float32", "dropout": 0.0, "eval_iters": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    prepare([str(write_text(root / "corpus.txt", words_text(3000)))], root / "data", progress=False)
    return root / "data"


@pytest.fixture
def run_dir(data_dir, tmp_path) -> Path:
    train_tiny(data_dir, tmp_path / "run", 4, 2, SETTINGS)
    return tmp_path / "run"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinygpt", *args], capture_output=True, text=True, timeout=timeout)


def _train_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data_dir), "--out", str(run_dir), "--preset", "tiny", "--max-iters", "4",
            "--set", "eval_interval=2", "--set", "eval_iters=1", "--set", "dtype=float32", "--no-progress", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- the user's folders


def test_a_run_is_not_restarted_without_overwrite(data_dir, run_dir):
    before = _snapshot(run_dir)
    line = assert_one_line_error(_cli(*_train_args(data_dir, run_dir)))
    assert "--resume" in line and "--overwrite" in line
    assert _snapshot(run_dir) == before  # metrics, records, tensors: untouched


def test_overwrite_starts_over_and_keeps_what_is_not_tinygpts(data_dir, run_dir):
    (run_dir / "notes.txt").write_text("mine")
    old_tensors = {p.name for p in run_dir.glob("*.safetensors")}
    result = _cli(*_train_args(data_dir, run_dir, "--overwrite", "--max-iters", "2"))
    assert result.returncode == 0, result.stderr
    assert (run_dir / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [2]
    assert not old_tensors & {p.name for p in run_dir.glob("*.safetensors")} - {"last-00000002.model.safetensors",
                                                                                   "last-00000002.state.safetensors",
                                                                                   "best-00000002.model.safetensors"}


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_of_the_users_files_is_refused_and_left_alone(data_dir, tmp_path, resume):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_text(folder / "config.json", '{"theme": "dark"}')
    (folder / "best-1.safetensors").write_bytes(b"my own tensors")
    (folder / "last-2.safetensors").write_bytes(b"more of mine")
    before = _snapshot(folder)
    line = assert_one_line_error(_cli(*_train_args(data_dir, folder, *(["--resume"] if resume else []))))
    assert "holds no tinyGPT run" in line
    assert _snapshot(folder) == before


def test_resume_and_overwrite_together_are_refused(data_dir, run_dir):
    line = assert_one_line_error(_cli(*_train_args(data_dir, run_dir, "--resume", "--overwrite")))
    assert "choose one" in line


# ----------------------------------------------------------------------------- two writers


def test_a_second_process_on_a_run_stops_at_once_naming_the_first(data_dir, tmp_path):
    run_dir = tmp_path / "shared"
    args = ["train", "--data", str(data_dir), "--out", str(run_dir), "--preset", "tiny", "--max-iters", "400",
            "--set", "eval_interval=100", "--set", "eval_iters=1", "--set", "dtype=float32", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "tinygpt", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".tinygpt.lock").exists() or not (run_dir / "config.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = _cli(*args, "--resume")
        line = assert_one_line_error(second)
        assert f"PID {first.pid}" in line
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    iterations = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [100, 200, 300, 400]  # one writer: no duplicated or interleaved rows
    assert not (run_dir / ".tinygpt.lock").exists()


def test_the_lock_goes_with_a_killed_holder(data_dir, run_dir):
    from tinygpt.rundir import RunLock

    lock = RunLock(run_dir)
    lock.acquire()
    with pytest.raises(checkpoint.TinyGPTError, match=f"PID {os.getpid()}"):
        RunLock(run_dir).acquire()
    lock.release()  # what the kernel does for a killed process
    again = RunLock(run_dir)
    again.acquire()
    again.release()


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_nothing_else(data_dir, run_dir, monkeypatch):
    before = checkpoint.read_record(run_dir, "last")
    real_write = checkpoint.atomic_write_bytes
    calls = []

    def full_disk(path, data):
        if path.name in ("tokenizer.json", "config.toml"):  # written beside config.json when the run starts
            return real_write(path, data)
        calls.append(path.name)
        if len(calls) == 2:  # the second file of the save: the first one is already renamed into place
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write '.*': No space left on device.*intact"):
        train_tiny(data_dir, run_dir, 6, 2, SETTINGS, resume=True)
    monkeypatch.undo()
    record = checkpoint.read_record(run_dir, "last")
    assert record["iteration"] == before["iteration"]
    referenced = {entry["file"] for name in ("last", "best")
                  for entry in checkpoint.read_record(run_dir, name)["files"].values()}
    tensors = {p.name for p in run_dir.glob("*.safetensors")}
    assert tensors == referenced  # nothing of the failed save is left
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    checkpoint.load_model(run_dir, "last")


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "last.json"
    target.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        checkpoint.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.json"]


# ----------------------------------------------------------------------------- hostile checkpoints


def _edit_record(run_dir: Path, name: str, change) -> None:
    path = run_dir / f"{name}.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("name", ["../outside.model.safetensors", "/etc/passwd", "last-00000004.model.safetensors/x"])
def test_tensor_files_outside_the_run_are_refused(run_dir, name):
    _edit_record(run_dir, "best", lambda r: r["files"]["model"].update(file=name))
    line = assert_one_line_error(_cli("sample", str(run_dir), "--max-new-tokens", "3"))
    assert "malformed: files.model.file" in line


def test_a_size_mismatch_is_refused_before_reading(run_dir, monkeypatch):
    record = checkpoint.read_record(run_dir, "best")
    path = run_dir / record["files"]["model"]["file"]
    with open(path, "r+b") as f:
        f.truncate(6 << 30)  # a sparse 6 GiB file: reading it whole would take GBs of memory
    opened = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    with pytest.raises(checkpoint.CheckpointError, match="truncated or altered"):
        checkpoint.load_tensors(run_dir, record, "model")
    assert str(path) not in opened


@pytest.mark.parametrize(("change", "expected"), [
    (lambda r: r.update(iteration="fifty"), "iteration"),
    (lambda r: r.update(iteration=-5), "iteration"),
    (lambda r: r.update(metrics_bytes="x"), "metrics_bytes"),
    (lambda r: r.update(metrics_bytes=-1), "metrics_bytes"),
    (lambda r: r.update(best_val_loss="x"), "best_val_loss"),
    (lambda r: r.update(python_rng=[]), "python_rng"),
    (lambda r: r.update(optimizer_groups={}), "optimizer_groups"),
    (lambda r: r.pop("train_config"), "lacks the training state"),
    (lambda r: r.update(precision="__class__"), "precision"),
    (lambda r: r["model_config"].update(dropout="high"), "dropout must be a float"),
    (lambda r: r["model_config"].update(n_layer=100000), "does not fit its weights"),
    (lambda r: r["model_config"].update(n_embd=2**20, n_head=1), "does not fit its weights"),
])
def test_a_malformed_record_is_one_line(data_dir, run_dir, change, expected):
    _edit_record(run_dir, "last", change)
    line = assert_one_line_error(_cli(*_train_args(data_dir, run_dir, "--resume", "--max-iters", "6"), timeout=60))
    assert expected in line


def test_an_absurd_model_config_is_not_allocated_by_info(run_dir):
    _edit_record(run_dir, "best", lambda r: r["model_config"].update(n_layer=100000, n_embd=4096, n_head=8))
    line = assert_one_line_error(_cli("info", str(run_dir), timeout=60))
    assert "does not fit its weights" in line


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_tensors_of_another_dtype_are_refused(run_dir, dtype):
    import hashlib

    import safetensors.torch

    record = checkpoint.read_record(run_dir, "best")
    path = run_dir / record["files"]["model"]["file"]
    tensors = {name: t.to(dtype) for name, t in safetensors.torch.load(path.read_bytes()).items()}
    data = safetensors.torch.save(tensors, metadata={"format": "tinygpt-checkpoint", "kind": "model"})
    path.write_bytes(data)
    entry = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _edit_record(run_dir, "best", lambda r: r["files"].update(model=entry))
    with pytest.raises(checkpoint.CheckpointError, match=f"is {dtype}"):
        checkpoint.load_model(run_dir, "best")


# ----------------------------------------------------------------------------- the data under a run


def test_a_token_file_that_changes_under_training_stops_it_in_one_line(data_dir, tmp_path, monkeypatch):
    import shutil

    import tinygpt.train

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    real_step = tinygpt.train.train_step
    steps = []

    def step_then_truncate(*args):
        steps.append(1)
        loss = real_step(*args)
        if len(steps) == 3:  # another process truncates the file between two iterations
            with open(data / "train.bin", "r+b") as f:
                f.truncate(100)
        return loss

    monkeypatch.setattr(tinygpt.train, "train_step", step_then_truncate)
    with pytest.raises(tinygpt.train.DataError, match="train.bin' changed while training"):
        train_tiny(data, tmp_path / "run", 10, 5, SETTINGS)
    assert len(steps) == 3  # stopped before the next read of the shrunken file


def test_a_users_config_with_model_and_train_keys_is_not_a_run(data_dir, tmp_path):
    folder = tmp_path / "tool"
    folder.mkdir()
    write_text(folder / "config.json", json.dumps({"model": {"layers": 3}, "train": {"epochs": 2}}))
    write_text(folder / "tokenizer.json", "{}")
    before = _snapshot(folder)
    for flags in ([], ["--resume"], ["--overwrite"]):
        line = assert_one_line_error(_cli(*_train_args(data_dir, folder, *flags)))
        assert "holds no tinyGPT run" in line
    assert _snapshot(folder) == before


def test_overwrite_with_bad_data_deletes_nothing(data_dir, run_dir, tmp_path):
    before = _snapshot(run_dir)
    (tmp_path / "nodata").mkdir()
    result = _cli(*_train_args(data_dir, run_dir, "--overwrite")[:2], str(tmp_path / "nodata"),
                  *_train_args(data_dir, run_dir, "--overwrite")[3:])
    assert_one_line_error(result)
    assert _snapshot(run_dir) == before


def test_an_unreadable_record_keeps_the_files_it_may_name(data_dir, run_dir):
    best = checkpoint.read_record(run_dir, "best")["files"]["model"]["file"]
    (run_dir / "best.json").write_text('{"format": "tinygpt-checkpoint", "files": {"model": {"fi')  # truncated
    result = _cli(*_train_args(data_dir, run_dir, "--resume", "--max-iters", "6"))
    assert (run_dir / best).exists(), result.stderr
