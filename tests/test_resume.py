"""Exact resume: a run killed at any moment and continued with --resume ends bit for bit
where an uninterrupted run ends, and a damaged run directory is refused with one line."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import train_tiny
from tinygpt import checkpoint
from tinygpt.cli import main
from tinygpt.data import prepare
from tinygpt.train import dropout_seed

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
# dropout > 0 so that the RNG streams matter; float32 so that no run-time timing picks bf16
SETTINGS = {"dtype": "float32", "dropout": 0.1, "eval_iters": 2}
_real_replace = os.replace


def _corpus(path: Path, seed: int = 0, alphabet: str | None = None) -> Path:
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(3000))
    if alphabet is not None:
        text += alphabet
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([str(_corpus(root / "corpus.txt"))], root / "data")
    return root / "data"


def _train(data_dir: Path, run_dir: Path, max_iters: int, eval_interval: int, resume: bool = False):
    return train_tiny(data_dir, run_dir, max_iters, eval_interval, SETTINGS, resume=resume)


def _cli_args(data_dir: Path, run_dir: Path, max_iters: int, eval_interval: int,
              settings: dict | None = None) -> list[str]:
    args = ["train", "--data", str(data_dir), "--out", str(run_dir), "--preset", "tiny",
            "--max-iters", str(max_iters), "--set", f"eval_interval={eval_interval}", "--no-progress"]
    for key, value in (settings or SETTINGS).items():
        args += ["--set", f"{key}={value}"]
    return args


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `last` checkpoint: weights, optimizer moments, RNG states."""
    record = checkpoint.read_record(run_dir, "last")
    return {f"{kind}/{name}": t for kind in record["files"]
            for name, t in checkpoint.load_tensors(run_dir, record, kind).items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], context: str) -> None:
    assert a.keys() == b.keys(), context
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{context}: tensors differ: {differing[:5]}"


def _metrics_iterations(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- crashes in-process


class _Crash(BaseException):
    """Stands for SIGKILL: nothing in the library catches it, so the files stay as they are."""


def _crash_at_rename(monkeypatch, crash_index: int, after: bool) -> list[str]:
    """Make the crash_index-th rename of the run (checkpoint files, JSON records, plot) crash,
    before it happens or just after."""
    renames: list[str] = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append(Path(dst).name)
        if len(renames) - 1 == crash_index and not after:
            raise _Crash
        real_replace(src, dst)
        if len(renames) - 1 == crash_index and after:
            raise _Crash

    monkeypatch.setattr(os, "replace", replace)
    return renames


def test_a_crash_at_every_step_of_a_save_resumes_bit_for_bit(data_dir, tmp_path, monkeypatch):
    reference_dir = tmp_path / "reference"
    renames = _crash_at_rename(monkeypatch, -1, after=False)  # records the renames, crashes never
    _train(data_dir, reference_dir, max_iters=12, eval_interval=4)
    reference = _final_state(reference_dir)
    reference_metrics = (reference_dir / "metrics.jsonl").read_bytes()
    plots = [i for i, name in enumerate(renames) if name == "loss.png"]
    assert len(plots) == 3  # evaluations at 4, 8 and 12
    # the first rename of the run (no checkpoint exists yet: --resume starts afresh), then
    # every rename of the second evaluation's save, and the moment after its commit
    crash_points = [(0, False)] + [(i, False) for i in range(plots[1], plots[2])] + [(plots[2] - 1, True)]
    assert renames[plots[2] - 1] == "last.json"
    for crash_index, after in crash_points:
        run_dir = tmp_path / f"crash-{crash_index}-{after}"
        _crash_at_rename(monkeypatch, crash_index, after)
        with pytest.raises(_Crash):
            _train(data_dir, run_dir, max_iters=12, eval_interval=4)
        monkeypatch.setattr(os, "replace", _real_replace)
        where = f"crash {'after' if after else 'before'} renaming {renames[crash_index]} (rename {crash_index})"
        result = _train(data_dir, run_dir, max_iters=12, eval_interval=4, resume=True)
        assert result.iterations == 12, where
        _assert_bitwise_equal(_final_state(run_dir), reference, where)
        assert (run_dir / "metrics.jsonl").read_bytes() == reference_metrics, where
        assert not list(run_dir.glob(".*.tmp")), f"{where}: temporary files left behind"


def test_evaluation_does_not_move_the_training_streams(data_dir, tmp_path):
    _train(data_dir, tmp_path / "often", max_iters=12, eval_interval=2)
    _train(data_dir, tmp_path / "once", max_iters=12, eval_interval=12)
    assert _metrics_iterations(tmp_path / "often") == [2, 4, 6, 8, 10, 12]
    _assert_bitwise_equal(_final_state(tmp_path / "often"), _final_state(tmp_path / "once"),
                          "evaluating every 2 iterations vs once")


def test_dropout_streams_differ_by_rank_and_iteration_and_repeat():
    seeds = {dropout_seed(1337, rank, iteration) for rank in range(4) for iteration in range(50)}
    assert len(seeds) == 200
    assert dropout_seed(1337, 1, 7) == 2579218185859610028  # the stream exact resume depends on
    assert dropout_seed(1338, 1, 7) != dropout_seed(1337, 1, 7)  # the run's seed matters


def test_resume_without_a_checkpoint_starts_from_the_beginning(data_dir, tmp_path):
    _train(data_dir, tmp_path / "fresh", max_iters=4, eval_interval=4)
    (tmp_path / "resumed").mkdir()
    # what a run killed before its first checkpoint leaves: its config, and a row no checkpoint counts
    shutil.copy(tmp_path / "fresh" / "config.json", tmp_path / "resumed" / "config.json")
    (tmp_path / "resumed" / "metrics.jsonl").write_text('{"iteration": 4}\n')
    result = _train(data_dir, tmp_path / "resumed", max_iters=4, eval_interval=4, resume=True)
    assert result.iterations == 4
    assert _metrics_iterations(tmp_path / "resumed") == [4]
    _assert_bitwise_equal(_final_state(tmp_path / "resumed"), _final_state(tmp_path / "fresh"), "fresh vs resumed")


# ----------------------------------------------------------------------------- SIGKILL, for real


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until condition() holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the training process neither progressed nor ended")


def _checkpoint_files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("*last-*")}  # tensor files of `last`, and their .tmp files


def _a_save_began(run_dir: Path, files_before: set[str]) -> bool:
    """A tensor file of `last` appeared (being written, renamed, or just committed)."""
    return bool(_checkpoint_files(run_dir) - files_before)


# with dropout 0 and the precision left to the machine, every per-device choice a process
# could time (precision, attention) must come back from the run, not be measured again
@pytest.mark.parametrize("settings", [pytest.param(SETTINGS, marks=pytest.mark.slow),  # a long one: CI runs it
                                      {"dtype": "auto", "dropout": 0.0, "eval_iters": 2}],
                         ids=["dropout", "no-dropout-auto-precision"])
def test_sigkill_at_random_moments_then_resume_is_bit_for_bit(data_dir, tmp_path, settings):
    max_iters, eval_interval = 40, 5
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(run_dir: Path, log: Path, resume: bool) -> subprocess.Popen:
        args = _cli_args(data_dir, run_dir, max_iters, eval_interval, settings) + (["--resume"] if resume else [])
        return subprocess.Popen([sys.executable, "-m", "tinygpt", *args], env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT)

    reference_dir = tmp_path / "reference"
    reference = start(reference_dir, tmp_path / "reference.log", resume=False)
    run_dir = tmp_path / "killed"
    rng = random.Random()

    def after_a_random_pause_once_saved() -> bool:
        if not (run_dir / "last.json").exists():
            return False
        time.sleep(rng.uniform(0.0, 0.4))
        return True

    kills = [
        # before the first checkpoint: --resume must start from the beginning
        ("before the first save", lambda: "device:" in (tmp_path / "run0.log").read_text()),
        # mid-step: a random moment after a checkpoint exists
        ("mid-step", after_a_random_pause_once_saved),
        # mid-save: as soon as a new checkpoint file shows up
        ("mid-save", lambda: _a_save_began(run_dir, files_before)),
    ]
    observed = []
    for attempt, (moment, condition) in enumerate(kills):
        log = tmp_path / f"run{attempt}.log"
        log.touch()
        files_before = _checkpoint_files(run_dir)
        process = start(run_dir, log, resume=attempt > 0)
        if _wait_for(condition, process):
            process.send_signal(signal.SIGKILL)
            observed.append(moment)
        process.wait()
        if attempt > 0 and "resuming from iteration" not in log.read_text():
            assert "no checkpoint" in log.read_text(), log.read_text()
    final = start(run_dir, tmp_path / "final.log", resume=True)
    assert final.wait() == 0, (tmp_path / "final.log").read_text()
    assert reference.wait() == 0, (tmp_path / "reference.log").read_text()
    assert len(observed) >= 2, f"too few kills landed before the run ended: {observed}"
    context = f"killed {observed}"
    _assert_bitwise_equal(_final_state(run_dir), _final_state(reference_dir), context)
    assert _metrics_iterations(run_dir) == list(range(eval_interval, max_iters + 1, eval_interval)), context
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference_dir / "metrics.jsonl").read_bytes(), context
    assert "no checkpoint" in (tmp_path / "run1.log").read_text()  # the first kill came before any save


# ----------------------------------------------------------------------------- refusals, one line


@pytest.fixture
def saved_run(data_dir, tmp_path) -> Path:
    _train(data_dir, tmp_path / "run", max_iters=4, eval_interval=4)
    return tmp_path / "run"


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinygpt", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(returncode: int, stderr: str, expected: str) -> None:
    assert returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr


def test_resume_with_another_model_config_is_refused(data_dir, saved_run):
    result = _run_cli(_cli_args(data_dir, saved_run, 8, 4) + ["--resume", "--set", "n_embd=48"])
    _assert_one_line_error(result.returncode, result.stderr, "different model config (n_embd 32 vs 48)")


def test_resume_on_data_with_another_vocabulary_is_refused(data_dir, saved_run, tmp_path):
    other = tmp_path / "other"
    prepare([str(_corpus(tmp_path / "other.txt", alphabet="XYZ"))], other)
    result = _run_cli(_cli_args(other, saved_run, 8, 4) + ["--resume"])
    _assert_one_line_error(result.returncode, result.stderr, "different vocabulary")


def _damage_truncate(run_dir: Path) -> str:
    path = next(run_dir.glob("last-*.state.safetensors"))
    path.write_bytes(path.read_bytes()[:-100])
    return "truncated or altered (checksum mismatch"


def _damage_foreign_tensors(run_dir: Path) -> str:
    # another checkpoint's file under this one's name: a valid safetensors file, the wrong one
    shutil.copy(next(run_dir.glob("best-*.model.safetensors")), next(run_dir.glob("last-*.state.safetensors")))
    return "truncated or altered (checksum mismatch"


def _damage_truncate_record(run_dir: Path) -> str:
    record = run_dir / "last.json"
    record.write_bytes(record.read_bytes()[:200])
    return "corrupt: not valid JSON"


def _damage_foreign_record(run_dir: Path) -> str:
    shutil.copy(run_dir / "config.json", run_dir / "last.json")
    return "is not a tinygpt checkpoint"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_foreign_tensors, _damage_truncate_record,
                                    _damage_foreign_record])
def test_a_damaged_checkpoint_is_refused_in_one_line(data_dir, saved_run, capsys, damage):
    expected = damage(saved_run)
    capsys.readouterr()
    returncode = main(_cli_args(data_dir, saved_run, 8, 4) + ["--resume"])
    _assert_one_line_error(returncode, capsys.readouterr().err, expected)


def test_a_damaged_best_checkpoint_is_refused_when_sampling(saved_run, capsys):
    path = next(saved_run.glob("best-*.model.safetensors"))
    path.write_bytes(path.read_bytes()[:-1])
    returncode = main(["sample", str(saved_run), "--max-new-tokens", "3", "--device", "cpu"])
    _assert_one_line_error(returncode, capsys.readouterr().err, "checksum mismatch")


def test_resume_refuses_metrics_shorter_than_the_checkpoint_counts(data_dir, saved_run, capsys):
    (saved_run / "metrics.jsonl").write_text("")
    returncode = main(_cli_args(data_dir, saved_run, 8, 4) + ["--resume"])
    _assert_one_line_error(returncode, capsys.readouterr().err, "metrics.jsonl is shorter")


# ----------------------------------------------------------------------------- checkpoint files


def test_saving_an_iteration_again_never_overwrites_the_committed_files(tmp_path):
    tensors = {"model": {"w": torch.zeros(3)}}
    checkpoint.save_checkpoint(tmp_path, "last", {"iteration": 7}, tensors)
    record = json.loads((tmp_path / "last.json").read_text())
    first = record["files"]["model"]["file"]
    checkpoint.save_checkpoint(tmp_path, "last", {"iteration": 7}, {"model": {"w": torch.ones(3)}})
    record = json.loads((tmp_path / "last.json").read_text())
    assert record["files"]["model"]["file"] != first
    assert torch.equal(checkpoint.load_tensors(tmp_path, record, "model")["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [record["files"]["model"]["file"], "last.json"]


def test_leftovers_of_a_killed_save_go_and_nothing_else(tmp_path):
    from tinygpt import rundir

    checkpoint.save_checkpoint(tmp_path, "last", {"iteration": 7}, {"model": {"w": torch.zeros(3)}})
    kept = sorted(p.name for p in tmp_path.iterdir())
    leftovers = [".last-00000009.model.safetensors.x1y2.tmp", ".last.json.abc.tmp", "last-00000009.model.safetensors"]
    mine = ["last-00000009.model.safetensors.bak", "notes.txt", "best-1.model.safetensors", ".last.json.tmp.old"]
    for name in leftovers + mine:
        (tmp_path / name).write_bytes(b"x")
    rundir.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + mine)


def test_resume_honours_the_keys_that_may_change(data_dir, saved_run):
    """--set and --max-iters on --resume: eval_interval, eval_iters, max_time and compile take
    effect; the saved run's other settings stay."""
    result = _run_cli(["train", "--data", str(data_dir), "--out", str(saved_run), "--resume", "--max-iters", "8",
                       "--set", "eval_interval=2", "--set", "eval_iters=3", "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert _metrics_iterations(saved_run) == [4, 6, 8]
    saved = checkpoint.read_record(saved_run, "last")["train_config"]
    assert (saved["eval_interval"], saved["eval_iters"], saved["max_iters"]) == (2, 3, 8)
    assert saved["dtype"] == "float32"  # from the run, not the default preset


@pytest.mark.parametrize("change", ["learning_rate=0.5", "batch_size=4", "seed=3", "weight_decay=0.5"])
def test_resume_refuses_a_change_that_would_make_another_run(data_dir, saved_run, change):
    result = _run_cli(["train", "--data", str(data_dir), "--out", str(saved_run), "--resume", "--max-iters", "8",
                       "--set", change, "--no-progress"])
    key = change.split("=")[0]
    _assert_one_line_error(result.returncode, result.stderr, f"--resume: {key} cannot change")


def test_resume_honours_compile(data_dir, saved_run, monkeypatch):
    import tinygpt.train

    compiled = []
    monkeypatch.setattr(tinygpt.train.torch, "compile", lambda module: compiled.append(module) or module)
    assert main(["train", "--data", str(data_dir), "--out", str(saved_run), "--resume", "--max-iters", "6",
                 "--compile", "--no-progress"]) == 0
    assert compiled and checkpoint.read_record(saved_run, "last")["train_config"]["compile"] is True


def test_a_run_saved_before_an_init_option_existed_still_resumes(data_dir, saved_run):
    """scaled_residual_init only shapes the first weights: a record without it (older runs)
    resumes under a preset that sets it either way."""
    path = saved_run / "last.json"
    record = json.loads(path.read_text())
    del record["model_config"]["scaled_residual_init"]
    path.write_text(json.dumps(record))
    result = _run_cli(_cli_args(data_dir, saved_run, 6, 2) + ["--resume", "--set", "scaled_residual_init=false"])
    assert result.returncode == 0, result.stderr
    assert _metrics_iterations(saved_run) == [4, 6]


def test_resume_may_change_a_speed_choice(data_dir, saved_run):
    """A run moved to another machine may need another precision or attention path."""
    result = _run_cli(["train", "--data", str(data_dir), "--out", str(saved_run), "--resume", "--max-iters", "8",
                       "--set", "attention=sdpa", "--set", "dtype=float32", "--no-progress"])
    assert result.returncode == 0, result.stderr
    saved = checkpoint.read_record(saved_run, "last")["train_config"]
    assert (saved["attention"], saved["dtype"], saved["max_iters"]) == ("sdpa", "float32", 8)


def test_a_bf16_run_on_a_cpu_without_bf16_is_told_to_use_float32(data_dir, saved_run, monkeypatch):
    import tinygpt.train

    path = saved_run / "last.json"
    record = json.loads(path.read_text())
    record["train_config"]["dtype"], record["precision"] = "bfloat16", "bfloat16"
    path.write_text(json.dumps(record))
    monkeypatch.setattr(tinygpt.train, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(tinygpt.train.ConfigError, match="--set dtype=float32"):
        train_tiny(data_dir, saved_run, 8, 4, {**SETTINGS, "dtype": "auto"}, resume=True)
