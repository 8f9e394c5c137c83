"""`tinygpt bench` at tiny sizes: every figure present, consistent with the FLOP formula,
and measured on the same training step `tinygpt train` takes (the speed paths themselves
are tested in test_speed.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import words_text, write_text
from tinygpt import bench, speed
from tinygpt.cli import main
from tinygpt.config import ConfigError, get_preset
from tinygpt.data import prepare
from tinygpt.hardware import Precision
from tinygpt.model import GPT
from tinygpt.train import train


def _plan(dtype: torch.dtype = torch.float32) -> speed.SpeedPlan:
    reasons = dict.fromkeys(("attention", "dropout_mask", "decode_copies"), "test")
    return speed.SpeedPlan(Precision(dtype, "test"), "sdpa", "torch", "on", reasons)

TINY = dict(batch_size=2, repeats=1, warmup=1, generation_tokens=5, generation_repeats=1,
            prepare_megabytes=0.02, matmul_size=64)


def _positive_numbers(value, path="result"):
    """Every number in a nested dict/list is positive (ints and floats; strings skipped)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _positive_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _positive_numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value) and value > 0, f"{path} = {value}"


def test_bench_json_has_every_figure_and_they_are_positive(capsys):
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--json", "--batch-size", "2", "--repeats", "1",
                 "--new-tokens", "5", "--prepare-mb", "0.02", "--matmul-size", "64"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"source", "device", "cpu", "threads", "precision", "precision_reason", "ceilings",
                           "training", "generation", "preparation_mb_per_second", "flop_formula"}
    assert set(result["ceilings"]) == {"float32", "bfloat16"}
    assert set(result["training"]) >= {"tokens_per_second", "achieved_flops", "flops_per_token",
                                       "fraction_of_float32_ceiling", "fraction_of_bfloat16_ceiling",
                                       "fraction_of_used_precision_ceiling", "batch_size", "block_size"}
    assert set(result["generation"]) == {"cached_tokens_per_second", "uncached_tokens_per_second",
                                         "cache_speedup", "new_tokens"}
    assert result["training"]["batch_size"] == 2 and result["generation"]["new_tokens"] == 5
    assert result["precision"] in ("float32", "bfloat16") and result["precision_reason"].startswith(
        result["precision"])
    _positive_numbers({k: v for k, v in result.items() if k not in ("training",)})
    _positive_numbers({k: v for k, v in result["training"].items() if k != "compiled"})


def test_bench_figures_follow_the_flop_formula():
    model_config, train_config = get_preset("tiny")
    model_config.vocab_size = 20
    ceilings = {"float32": 1e9, "bfloat16": 4e9}
    figures = bench.measure_training(model_config, train_config, torch.device("cpu"), _plan(), ceilings,
                                     batch_size=2, repeats=2, warmup=0)
    model = GPT(model_config)
    L, C, T = model_config.n_layer, model_config.n_embd, model_config.block_size
    assert figures.flops_per_token == 6 * model.matmul_parameters() + 12 * L * C * T
    assert figures.achieved_flops == pytest.approx(figures.tokens_per_second * figures.flops_per_token)
    assert figures.fraction_of_bfloat16_ceiling == pytest.approx(figures.achieved_flops / 4e9)
    assert figures.fraction_of_used_precision_ceiling == pytest.approx(figures.achieved_flops / 1e9)
    assert len(figures.tokens_per_second_runs) == 2


def test_bench_table_names_the_formula_and_the_precision():
    result = bench.run_bench(preset="tiny", device="cpu", dtype="float32", **TINY)
    table = bench.format_table(result)
    assert "6N + 12*L*C*T" in table and "float32: as configured" in table
    assert "with KV cache" in table and "MB/s" in table


def test_bench_rejects_bad_requests(tmp_path, capsys):
    with pytest.raises(ConfigError):
        bench.run_bench(preset="tiny", run_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError):
        bench.run_bench(preset="tiny", **{**TINY, "batch_size": 0})
    assert main(["bench", "--preset", "tiny", "--repeats", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinygpt bench: error:") and len(err.strip().splitlines()) == 1


def test_bench_measures_a_trained_run(tmp_path):
    prepare([str(write_text(tmp_path / "corpus.txt", words_text(3000)))], tmp_path / "data", progress=False)
    model_config, train_config = get_preset("tiny")
    train_config.max_iters, train_config.eval_interval, train_config.eval_iters = 2, 2, 1
    train(tmp_path / "data", tmp_path / "run", model_config, train_config, device="cpu", progress=False,
          log=lambda message: None)
    result = bench.run_bench(run_dir=str(tmp_path / "run"), device="cpu", **TINY)
    assert result.source == f"run {tmp_path / 'run'}"
    assert result.training.block_size == model_config.block_size
    assert result.generation["cached_tokens_per_second"] > 0


def test_bench_times_the_training_step_of_train(monkeypatch):
    """bench calls train.train_step itself: gradient accumulation and the learning rate included."""
    import tinygpt.train

    calls = []
    real = tinygpt.train.train_step

    def recording(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(tinygpt.train, "train_step", recording)
    model_config, train_config = get_preset("tiny")
    model_config.vocab_size = 20
    train_config.grad_accum, train_config.learning_rate = 2, 0.0  # lr 0: the weights must not move
    torch.manual_seed(0)
    model = GPT(model_config)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    step = bench.training_step(model, train_config, Precision(torch.float32, "test"), torch.device("cpu"), 4)
    step()
    assert len(calls) == 1 and calls[0][3].grad_accum == 2 and calls[0][-1] == 0.0
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_bench_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not the 1 conftest sets, nor the 1 asked for below
    try:
        bench.run_bench(preset="tiny", device="cpu", threads=1, **TINY)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_compiled_training_runs_on_cpu():
    model_config, train_config = get_preset("tiny")
    model_config.vocab_size, model_config.dropout = 20, 0.1
    figures = bench.measure_training(model_config, train_config, torch.device("cpu"), _plan(torch.bfloat16),
                                     {"float32": 1e9, "bfloat16": 1e9}, batch_size=2, repeats=1, warmup=1,
                                     compile=True)
    assert figures.compiled and figures.tokens_per_second > 0


def test_a_matmul_too_slow_for_its_time_budget_is_measured_smaller(monkeypatch):
    # an emulated bf16 on a CPU without it: a 2048 multiply would take a minute; measuring its ceiling must not
    from tinygpt import hardware

    sides = []

    def slow_multiply(a, b):
        sides.append(a.shape[0])
        return 1e-9 * a.shape[0] ** 3  # compute-bound: 2048^3 -> 8.6 s

    monkeypatch.setattr(hardware, "_timed_multiply", slow_multiply)
    fitting = hardware.fitting_size(torch.float32, 2048, "cpu", seconds=1.0)
    assert fitting == 960  # 2048 * (1 s / 8.6 s) ** (1/3) = 1000, rounded down to a multiple of 64
    assert sides == [128, 256, 512]  # probes double until one takes 50 ms (512^3: 134 ms)
    assert hardware.fitting_size(torch.float32, 2048, "cpu", seconds=10.0) == 2048
    assert hardware.fitting_size(torch.float32, 2048, "cpu", seconds=1e-9) == 128
    sides.clear()
    hardware.matmul_flops_per_second(torch.float32, 2048, repeats=2, seconds=1.0)
    assert sides == [128, 256, 512, fitting, fitting]  # the probes, then two timed repeats at the fitting side


def test_a_launch_bound_probe_does_not_shrink_a_multiply_that_fits(monkeypatch):
    # on a GPU a small multiply takes its launch time whatever its side: scaled by the cube, a
    # 128-sided probe of 10 microseconds would make an 8192 multiply look 2.6 s long
    from tinygpt import hardware

    sides = []
    monkeypatch.setattr(hardware, "_timed_multiply", lambda a, b: sides.append(a.shape[0]) or 1e-5)
    assert hardware.fitting_size(torch.float32, 8192, "cpu", seconds=1.0) == 8192
    assert sides == [128, 256]  # 256: 1e-5 s * 32^3 = 0.33 s fits
    with pytest.raises(ValueError):
        hardware.fitting_size(torch.float32, 0, "cpu", seconds=1.0)


def test_train_speed_benchmark_times_the_model_train_builds(monkeypatch):
    """benchmarks/train_speed.py's `ours` takes the speed paths `tinygpt train` decides for this
    CPU (attention form, dropout mask), not the bare model: a bare model is not what users train."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    train_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_speed)
    model_config, train_config = get_preset("seed")
    model_config.vocab_size = train_speed.SEED_SIZES["vocab_size"]
    expected = speed.plan(torch.device("cpu"), train_config, model_config.dropout)
    assert expected.dropout_mask == "bits16"  # the seed preset has dropout 0.2: the CPU's cheaper mask
    stepped = []
    real_step = bench.training_step

    def capture(model, *args, **kwargs):
        stepped.append(model)
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(bench, "training_step", capture)
    _, described = train_speed.build("ours", 2)
    assert f"attention: {expected.attention} " in described
    (model,) = stepped
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is speed.Bits16Dropout for m in dropouts)
    assert all(block.attn.explicit == (expected.attention == "explicit") for block in model.blocks)
