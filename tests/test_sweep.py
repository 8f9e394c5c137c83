"""`tinygpt sweep`, `train --config FILE.toml` and `presets --show` (issue 14)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_ok, run_cli, words_text, write_text
from tinygpt.config import PRESETS, get_preset, load_config_file
from tinygpt.data import prepare
from tinygpt.sweep import SweepPlan, SweepState, plan_sweep, sweep_table, table_rows

FIXED = dict(dtype="float32", attention="sdpa", dropout_mask="torch", decode_copies="off")
# a tiny model, speed choices fixed (nothing timed at start), frequent checkpoints
SWEEP_SETS = [a for key, value in {**FIXED, "eval_interval": 20, "eval_iters": 2}.items()
              for a in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_text(root / "corpus" / "a.txt", words_text(1500, seed=4))
    prepare([str(root / "corpus")], root / "data", progress=False)
    return root / "data"


def fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


def sweep_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tinygpt", "sweep", "--data", str(data), "--preset", "tiny",
            "--grid", "activation=gelu,relu", "--budget", "3", "--out", str(out), "--no-progress", *SWEEP_SETS]


def test_sweep_killed_and_run_again_keeps_finished_runs_and_resumes_the_interrupted_one(data, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    process = subprocess.Popen(sweep_command(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first, second = out / "activation=gelu-s1337", out / "activation=relu-s1337"
    deadline = time.monotonic() + 240
    try:
        # kill it once the first run is scored and the second has saved a checkpoint
        while not ((out / "sweep.json").is_file() and len(json.loads((out / "sweep.json").read_text())["results"]) == 1
                   and (second / "last.json").is_file()):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep did not reach its second run"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = fingerprint(first)
    interrupted_iteration = json.loads((second / "last.json").read_text())["iteration"]

    again = assert_ok(subprocess.run(sweep_command(data, out), capture_output=True, text=True, env=env, timeout=240))
    assert fingerprint(first) == before  # kept as it was: not retrained, not rescored
    assert f"resuming from iteration {interrupted_iteration}" in again.stdout
    assert "run 1 of 2" not in again.stdout and "run 2 of 2" in again.stdout
    results = json.loads((out / "sweep.json").read_text())["results"]
    assert sorted(results) == [first.name, second.name]
    table = (out / "sweep.md").read_text()
    assert "| activation=gelu |" in table and "| activation=relu |" in table
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")

    finished = fingerprint(second)
    third = assert_ok(subprocess.run(sweep_command(data, out), capture_output=True, text=True, env=env, timeout=240))
    assert "sweep: run" not in third.stdout and fingerprint(second) == finished
    assert json.loads((out / "sweep.json").read_text())["results"] == results


def plan_of(grid: list[str], one_at_a_time: bool = False, seeds: int = 1) -> SweepPlan:
    model, train = get_preset("tiny")
    return plan_sweep("data", model, train, grid, seeds=seeds, budget=5, one_at_a_time=one_at_a_time)


def test_grid_product_and_one_at_a_time():
    product = plan_of(["n_layer=1,2", "activation=gelu,relu"], seeds=2)
    assert product.combinations == [{"n_layer": "1", "activation": "gelu"}, {"n_layer": "1", "activation": "relu"},
                                    {"n_layer": "2", "activation": "gelu"}, {"n_layer": "2", "activation": "relu"}]
    names = [name for name, _, _ in product.runs()]
    assert names[0] == "n_layer=1,activation=gelu-s1337" and names[4] == "n_layer=1,activation=gelu-s1338"
    model, train = product.configs({"n_layer": "2", "activation": "relu"}, 1338)
    assert (model.n_layer, model.activation, train.seed, train.max_time) == (2, "relu", 1338, 5.0)
    # each key alone from the preset (tiny: 2 layers, gelu): its own values are the base row
    alone = plan_of(["n_layer=1,2", "activation=gelu,relu"], one_at_a_time=True)
    assert alone.combinations == [{}, {"n_layer": "1"}, {"activation": "relu"}]
    assert [name for name, _, _ in alone.runs()] == ["base-s1337", "n_layer=1-s1337", "activation=relu-s1337"]


def test_one_at_a_time_keeps_a_hand_set_dropout_equal_to_the_base_under_auto_dropout():
    model, train = get_preset("cpu")  # auto_dropout on, its floor 0.05
    plan = plan_sweep("data", model, train, ["dropout=0.05,0.1"], seeds=1, budget=5, one_at_a_time=True)
    assert plan.combinations == [{}, {"dropout": "0.05"}, {"dropout": "0.1"}]
    assert not plan.configs({"dropout": "0.05"}, 1)[1].auto_dropout and plan.configs({}, 1)[1].auto_dropout


def test_table_is_mean_and_sample_deviation_over_seeds():
    plan = plan_of(["activation=gelu,relu"], seeds=2)
    state = SweepState(Path("unused"), plan, {
        "activation=gelu-s1337": {"combination": "activation=gelu", "val_bits_per_char": 2.0, "iterations": 10,
                                  "tokens_per_second": 100.0},
        "activation=gelu-s1338": {"combination": "activation=gelu", "val_bits_per_char": 2.2, "iterations": 20,
                                  "tokens_per_second": 300.0},
        "activation=relu-s1337": {"combination": "activation=relu", "val_bits_per_char": 1.9, "iterations": 12,
                                  "tokens_per_second": 120.0}})
    gelu, relu = table_rows(state)
    assert gelu["val_bits_per_char"] == pytest.approx(2.1) and gelu["spread"] == pytest.approx(0.1414, abs=1e-4)
    assert (gelu["iterations"], gelu["tokens_per_second"], gelu["seeds"]) == (15, 200.0, 2)
    assert relu["spread"] is None and relu["seeds"] == 1
    table = sweep_table(state)
    assert "| activation=gelu | 2.100 ± 0.141 | 2/2 | 15 | 200 |" in table
    assert "| activation=relu | **1.900** | 1/2 | 12 | 120 |" in table


@pytest.mark.parametrize("args, fragments", [
    (["--grid", "n_layers=1,2"], ("unknown grid key 'n_layers'", "known keys:", "n_layer")),
    (["--grid", "n_layer=one,2"], ("n_layer expects an int", "'one'")),
    (["--grid", "n_layer=1,"], ("no empty value",)),
    (["--grid", "seed=1,2"], ("--seeds",)),
    (["--grid", "n_head=3,2"], ("combination n_head=3", "divisible by n_head")),
    (["--grid", "n_layer=1,2", "--budget", "0"], ("--budget must be a positive number",)),
    (["--budget", "5"], ("the grid is empty",)),
])
def test_bad_sweeps_are_one_line_and_write_nothing(data, tmp_path, refused, args, fragments):
    out = tmp_path / "sweep"
    if "--budget" not in args:
        args = [*args, "--budget", "5"]
    refused(["sweep", "--data", data, "--preset", "tiny", "--out", out, *args], *fragments)
    assert not out.exists()


def test_another_sweep_in_the_same_folder_or_a_foreign_folder_is_refused(data, tmp_path, refused):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ["sweep", "--data", data, "--preset", "tiny", "--budget", "5", "--out", out]
    refused([*base, "--grid", "n_layer=1,2"], "not empty and holds no sweep")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    plan = plan_of(["n_layer=1,2"])
    SweepState(out, dataclasses.replace(plan, data=str(Path(data).resolve()))).save()
    saved = (out / "sweep.json").read_bytes()
    refused([*base, "--grid", "n_layer=1,3"], "holds another sweep", "grid")
    assert (out / "sweep.json").read_bytes() == saved


# ----------------------------------------------------------------------------- config files


def test_presets_show_round_trips_every_preset(tmp_path):
    for name in PRESETS:
        result = assert_ok(run_cli("presets", "--show", name))
        path = write_text(tmp_path / f"{name}.toml", result.stdout)
        assert load_config_file(path) == get_preset(name)
    assert "vocab_size" not in result.stdout


def test_train_from_a_config_file_with_set_overriding_it(data, tmp_path):
    shown = assert_ok(run_cli("presets", "--show", "tiny")).stdout
    text = shown.replace("n_embd = 32", "n_embd = 24").replace("max_iters = 100", "max_iters = 6")
    config = write_text(tmp_path / "mine.toml", text)
    run = tmp_path / "run"
    assert_ok(run_cli("train", "--data", data, "--out", run, "--config", config, "--set", "n_layer=1",
                      "--no-progress", *SWEEP_SETS))
    saved = json.loads((run / "config.json").read_text())
    assert (saved["model"]["n_embd"], saved["model"]["n_layer"], saved["train"]["max_iters"]) == (24, 1, 6)
    # the run's own config.toml describes it: training from it gives the same configuration
    model, train = load_config_file(run / "config.toml")
    assert dataclasses.asdict(model) | {"vocab_size": saved["model"]["vocab_size"]} == saved["model"]
    assert dataclasses.asdict(train) == saved["train"]


def test_a_partial_config_file_takes_the_rest_from_its_preset(tmp_path):
    path = write_text(tmp_path / "small.toml", 'preset = "tiny"\n[train]\nlearning_rate = 1\n')
    model, train = load_config_file(path)
    assert model == get_preset("tiny")[0] and train.learning_rate == 1.0 and isinstance(train.learning_rate, float)


@pytest.mark.parametrize("text, fragment", [
    ("[model]\nn_layers = 2\n", "unknown model config keys: n_layers"),
    ("[model]\nn_layer = \"two\"\n", "n_layer must be an int"),
    ("[model]\nvocab_size = 65\n", "comes from the data"),
    ("[training]\nseed = 1\n", "unknown entries training"),
    ("[model\nn_layer = 2\n", "is not valid TOML"),
    ('preset = "huge"\n', "unknown preset 'huge'"),
    ("model = 3\n", "model must be a table"),
])
def test_bad_config_files_are_one_line(data, tmp_path, refused, text, fragment):
    config = write_text(tmp_path / "bad.toml", text)
    refused(["train", "--data", data, "--out", tmp_path / "run", "--config", config], fragment)
    assert not (tmp_path / "run").exists()


def test_config_file_errors_name_missing_and_undecodable_files(data, tmp_path, refused):
    refused(["train", "--data", data, "--out", tmp_path / "run", "--config", tmp_path / "none.toml"],
            "cannot read the config file")
    (tmp_path / "latin1.toml").write_bytes(b'preset = "caf\xe9"\n')
    refused(["train", "--data", data, "--out", tmp_path / "run", "--config", tmp_path / "latin1.toml"],
            "is not UTF-8 text")
    refused(["train", "--data", data, "--out", tmp_path / "run", "--preset", "cpu", "--config",
             write_text(tmp_path / "t.toml", 'preset = "tiny"\n')], "differ: give one")
    refused(["presets", "--show", "huge"], "unknown preset 'huge'")


def in_process_plan(data: Path, grid: list[str]) -> SweepPlan:
    from tinygpt.config import apply_overrides

    model, train = get_preset("tiny")
    apply_overrides(model, train, [f"{k}={v}" for k, v in {**FIXED, "eval_interval": 20, "eval_iters": 2}.items()])
    return plan_sweep(data, model, train, grid, seeds=1, budget=1.5)


def test_a_run_killed_before_its_first_checkpoint_starts_again(data, tmp_path, monkeypatch):
    import tinygpt.train
    from tinygpt.sweep import run_sweep

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill at the first evaluation: before any checkpoint
    plan = in_process_plan(data, ["n_layer=1"])
    monkeypatch.setattr(tinygpt.train, "evaluate_and_save", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, tmp_path / "sweep", device="cpu", progress=False, log=lambda *a: None)
    run = tmp_path / "sweep" / "n_layer=1-s1337"
    assert (run / "config.json").is_file() and not (run / "last.json").exists()
    monkeypatch.undo()
    state = run_sweep(plan, tmp_path / "sweep", device="cpu", progress=False, log=lambda *a: None)
    assert state.results["n_layer=1-s1337"]["val_bits_per_char"] > 0


def test_a_diverging_combination_is_recorded_and_the_sweep_goes_on(data, tmp_path, monkeypatch):
    import tinygpt.train
    from tinygpt.errors import TrainingDiverged
    from tinygpt.sweep import run_sweep

    real_train = tinygpt.train.train

    def train(data_dir, run_dir, model_config, train_config, **kwargs):
        if model_config.n_layer == 1:
            raise TrainingDiverged("the loss became nan near iteration 3")
        return real_train(data_dir, run_dir, model_config, train_config, **kwargs)
    monkeypatch.setattr(tinygpt.train, "train", train)
    plan = in_process_plan(data, ["n_layer=1,2"])
    lines: list[str] = []
    state = run_sweep(plan, tmp_path / "sweep", device="cpu", progress=False, log=lines.append)
    assert state.results["n_layer=1-s1337"]["diverged"] is True
    assert state.results["n_layer=2-s1337"]["val_bits_per_char"] > 0
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| n_layer=1 | - | 1/1 (1 diverged) |" in table and "| n_layer=2 | **" in table
    assert any("n_layer=1-s1337 diverged" in line for line in lines)
    again: list[str] = []
    run_sweep(plan, tmp_path / "sweep", device="cpu", progress=False, log=again.append)
    assert not any(line.startswith("sweep: run") for line in again)  # nothing retried or retrained


def test_init_from_with_a_config_file_takes_training_keys_only(data, tmp_path, refused):
    source = tmp_path / "source"
    assert_ok(run_cli("train", "--data", data, "--out", source, "--preset", "tiny", "--max-iters", "4",
                      "--no-progress", *SWEEP_SETS))
    with_model = write_text(tmp_path / "model.toml", 'preset = "tiny"\n[model]\nn_layer = 1\n')
    refused(["train", "--data", data, "--out", tmp_path / "tuned", "--init-from", source, "--config", with_model],
            "has a [model] table", "--init-from")
    assert not (tmp_path / "tuned").exists()
    train_only = write_text(tmp_path / "train.toml", 'preset = "tiny"\n[train]\nmax_iters = 3\nlearning_rate = 1e-4\n')
    assert_ok(run_cli("train", "--data", data, "--out", tmp_path / "tuned", "--init-from", source, "--config",
                      train_only, "--no-progress", *SWEEP_SETS))
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert saved["train"]["max_iters"] == 3 and saved["train"]["learning_rate"] == 1e-4
    assert f"--init-from {source}" in (tmp_path / "tuned" / "config.toml").read_text()
