"""Data-parallel training under torchrun, on CPU: 2 gloo processes on loopback.

The global batch is the same whatever the number of processes, so 2 processes and 1 end
with the same weights up to float32 rounding (the gradient is averaged over the same
samples in a different order). Dropout is 0 here: each process draws its own masks, so with
dropout > 0 the two runs follow different trajectories (see train.dropout_seed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tinygpt.train
from helpers import train_tiny
from tinygpt import checkpoint
from tinygpt.data import BatchSampler, prepare

MAX_ITERS, EVAL_INTERVAL = 24, 8
SETTINGS = {"dtype": "float32", "dropout": 0.0, "eval_iters": 2, "eval_interval": EVAL_INTERVAL}
# Measured after 24 AdamW steps of the tiny preset (largest weight about 1.0): 2 processes vs 1
# differ by at most 5e-6 .. 7e-6, as much as 1 vs 2 OpenMP threads in one process do (7e-6 ..
# 9e-6): summation order, amplified by training. Eval losses agree to about 1e-6.
WEIGHT_TOLERANCE = 5e-5
LOSS_TOLERANCE = 1e-4
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    prepare([str(root / "corpus.txt")], root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _train_here(data_dir, run_dir)
    return run_dir


def _train_here(data_dir: Path, run_dir: Path, resume: bool = False):
    return train_tiny(data_dir, run_dir, MAX_ITERS, EVAL_INTERVAL, SETTINGS, resume=resume)


def _train_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["-m", "tinygpt", "train", "--data", str(data_dir), "--out", str(run_dir), "--preset", "tiny",
            "--max-iters", str(MAX_ITERS), "--no-progress", "--device", "cpu", *extra]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value}"]
    return args


def _torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a private rendezvous on a free port, so parallel test runs cannot meet
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    record = checkpoint.read_record(run_dir, "last")
    return checkpoint.load_tensors(run_dir, record, "model")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run_dir: Path, reference_dir: Path) -> float:
    """Same weights to float32 rounding and the same loss curve; returns the largest weight difference."""
    weights, reference = _weights(run_dir), _weights(reference_dir)
    assert weights.keys() == reference.keys()
    largest = max((weights[name] - reference[name]).abs().max().item() for name in weights)
    assert largest <= WEIGHT_TOLERANCE, f"weights differ by up to {largest:.2e}"
    rows, reference_rows = _metrics(run_dir), _metrics(reference_dir)
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in reference_rows] == [8, 16, 24]
    for row, reference_row in zip(rows, reference_rows, strict=True):
        for key in ("train_loss", "val_loss"):
            assert abs(row[key] - reference_row[key]) <= LOSS_TOLERANCE, (row, reference_row)
        assert row["lr"] == reference_row["lr"] and row["tokens_seen"] == reference_row["tokens_seen"]
    # and training did something: the loss fell
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    return largest


def test_ranks_slice_one_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    whole, _ = BatchSampler(tokens, 8, seed=5).next(12, torch.device("cpu"))
    for world_size in (2, 3, 4):
        slices = [BatchSampler(tokens, 8, seed=5, rank=rank, world_size=world_size).next(12, torch.device("cpu"))[0]
                  for rank in range(world_size)]
        assert torch.equal(torch.cat(slices), whole)


def test_two_processes_match_one_process(data_dir, one_process_run, tmp_path):
    run_dir = tmp_path / "two"
    result = _torchrun(_train_args(data_dir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    assert result.stdout.count("done:") == 1  # only rank 0 reports
    assert checkpoint.read_record(run_dir, "last")["world_size"] == 2
    largest = _assert_same_run(run_dir, one_process_run)
    print(f"2 processes vs 1: largest weight difference {largest:.2e}")


def test_a_one_process_run_resumes_on_two(data_dir, one_process_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "grown"

    class Crash(BaseException):
        pass

    plots = []

    def crash_at_second_evaluation(*args):
        plots.append(args)
        if len(plots) == 2:  # iteration 16: its metrics row is written, its checkpoint is not
            raise Crash

    monkeypatch.setattr(tinygpt.train, "plot_losses", crash_at_second_evaluation)
    with pytest.raises(Crash):
        _train_here(data_dir, run_dir)
    assert checkpoint.read_record(run_dir, "last")["iteration"] == EVAL_INTERVAL
    result = _torchrun(_train_args(data_dir, run_dir, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from iteration 8 (saved by 1 processes, continued by 2" in result.stdout
    largest = _assert_same_run(run_dir, one_process_run)
    print(f"1 process then 2 vs 1: largest weight difference {largest:.2e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure", ["SIGKILL", pytest.param("SIGSTOP", marks=pytest.mark.slow)])
def test_a_lost_process_ends_the_job_with_one_line(data_dir, tmp_path, failure):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP): rank 0 must not wait forever. Launched by
    hand, without torchrun's agent (which would kill rank 0 itself), so rank 0 must notice."""
    timeout_seconds = 5
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "TINYGPT_DIST_TIMEOUT": str(timeout_seconds)}
    run_dir = tmp_path / "run"
    args = _train_args(data_dir, run_dir)
    args[args.index("--max-iters") + 1] = "100000"
    ranks = [subprocess.Popen([sys.executable, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.json").exists():  # training is under way
            assert ranks[0].poll() is None and time.monotonic() < deadline, ranks[0].stderr.read()
            time.sleep(0.05)
        ranks[1].send_signal(getattr(signal, failure))
        start = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60 + timeout_seconds)
        seconds = time.monotonic() - start
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "process 0 of 2: another process of the job crashed or stopped answering" in lines[0]
    print(f"rank 1 {failure}: rank 0 ended after {seconds:.1f} s")


def test_a_process_that_never_arrives_ends_the_job_with_one_line(data_dir, tmp_path):
    """Rank 0 starts alone: after the timeout it names the address it waited at, no traceback."""
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TINYGPT_DIST_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, *_train_args(data_dir, tmp_path / "run")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"process 0 of 2: could not meet the other processes at 127.0.0.1:{port}" in lines[0]


def test_processes_that_see_different_checkpoints_refuse_to_start(data_dir, one_process_run, tmp_path):
    """As on two nodes without a shared filesystem: rank 0 finds the checkpoint, rank 1 does not."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    run_dirs = [tmp_path / "shared", tmp_path / "elsewhere"]
    shutil.copytree(one_process_run, run_dirs[0])
    ranks = [subprocess.Popen([sys.executable, *_train_args(data_dir, run_dirs[r], "--resume")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for process in ranks:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "found different checkpoints" in lines[0], stderr


def test_a_job_on_a_run_another_process_holds_stops_every_rank(data_dir, one_process_run, tmp_path):
    """Rank 0 takes the run's lock; when it cannot, every rank stops at once with one line
    (none waits for a collective that will never come)."""
    import shutil

    from tinygpt.rundir import RunLock

    run_dir = tmp_path / "held"
    shutil.copytree(one_process_run, run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        result = _torchrun(_train_args(data_dir, run_dir, "--resume"))
    finally:
        lock.release()
    assert result.returncode != 0
    assert f"being trained by another process (PID {os.getpid()})" in result.stderr
    assert "process 0 could not claim" in result.stderr
    assert result.stderr.count("tinygpt train: error:") == 2  # one line per rank
    assert "tinygpt/train.py" not in result.stderr  # no traceback of ours (torchrun prints its own summary)


# ----------------------------------------------------------------------------- `train` starting its own job


def test_train_starts_its_own_processes_and_matches_one_process(data_dir, one_process_run, tmp_path):
    """processes=2: `tinygpt train` starts two copies of itself, no torchrun; the same run as one process."""
    run_dir = tmp_path / "own"
    result = subprocess.run([sys.executable, *_train_args(data_dir, run_dir, "--set", "processes=2")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("processes: 2 (processes = 2)") == 1
    assert result.stdout.count("done:") == 1  # only process 0 speaks
    assert checkpoint.read_record(run_dir, "last")["world_size"] == 2
    _assert_same_run(run_dir, one_process_run)


def test_an_error_of_every_process_is_said_once(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tinygpt", "train", "--data", str(tmp_path / "missing"), "--out",
                             str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu", "--set", "processes=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "processes: 2" in result.stdout  # two processes met the error
    assert result.stderr.count("tinygpt train: error:") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "missing" in result.stderr


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stop_reaches_every_process_which_save(data_dir, tmp_path, stop):
    """A terminal's Ctrl-C (SIGINT to the launcher and its workers, one process group) or a
    SIGTERM to the launcher alone (which passes it on): the job saves, exits 130, and resumes."""
    run_dir = tmp_path / "run"
    args = _train_args(data_dir, run_dir, "--set", "processes=2")
    args[args.index("--max-iters") + 1] = "100000"
    job = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.json").exists():  # training is under way
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        if stop == "ctrl-c":
            os.killpg(job.pid, signal.SIGINT)
        else:
            job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, stderr
    assert "interrupted: saved iteration" in stderr and "Traceback" not in stderr, stderr
    saved = checkpoint.read_record(run_dir, "last")["iteration"]
    assert saved > EVAL_INTERVAL and saved % 10 == 0  # both stopped after the same logged iteration
    resumed = subprocess.run([sys.executable, *_train_args(data_dir, run_dir, "--resume", "--max-iters",
                                                           str(saved + 10), "--set", "processes=1")],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from iteration {saved} (saved by 2 processes, continued by 1" in resumed.stdout


def test_how_many_processes_train_starts(monkeypatch):
    from tinygpt import distributed
    from tinygpt.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "physical_cores", lambda: 6)
    assert distributed.local_processes(1, 32, "cpu")[0] == 1
    assert distributed.local_processes(0, 32, "cpu")[0] == 4  # the most cores that divide 32
    assert distributed.local_processes(0, 30, "cpu")[0] == 6
    assert distributed.local_processes(0, 7, "cpu")[0] == 1
    assert distributed.local_processes(3, 30, "cpu") == (3, "processes = 3")
    with pytest.raises(ConfigError, match="must divide among processes = 3"):
        distributed.local_processes(3, 32, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of a job's processes: never a job of jobs
    assert distributed.local_processes(0, 32, "cpu")[0] == 1
    from tinygpt.config import TrainConfig

    with pytest.raises(ConfigError, match="processes must be 0"):
        TrainConfig(processes=-1).validate()


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: one whole core
    ({"cpu.max": "400000 100000\n"}, 4),
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2 without a quota
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still trains
    ({}, None),  # no control group files at all
])
def test_a_containers_cpu_quota_caps_the_cores(tmp_path, monkeypatch, files, cores):
    from tinygpt import distributed

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert distributed.quota_cores(tmp_path) == cores
    monkeypatch.setattr(distributed, "quota_cores", lambda cgroup=tmp_path: None)
    unlimited = distributed.physical_cores()
    monkeypatch.setattr(distributed, "quota_cores", lambda cgroup=tmp_path: cores)
    assert distributed.physical_cores() == (min(unlimited, cores) if cores else unlimited)
