"""`tinygpt bench` at tiny sizes, and the training fast paths it measures: the cheap CPU
dropout mask and the explicit attention must change nothing but speed."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import words_text, write_text
from tinygpt import bench
from tinygpt.cli import main
from tinygpt.config import ConfigError, ModelConfig, get_preset
from tinygpt.data import prepare
from tinygpt.hardware import Precision, cpu_prefers_explicit_attention
from tinygpt.model import GPT, CausalSelfAttention, Dropout, dropout_mask
from tinygpt.train import train

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
    figures = bench.measure_training(model_config, train_config, torch.device("cpu"),
                                     Precision(torch.float32, "float32: test"), ceilings, batch_size=2,
                                     repeats=2, warmup=0)
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
    assert "6N + 12*L*C*T" in table and "float32: requested" in table
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


def test_bench_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    bench.run_bench(preset="tiny", device="cpu", threads=1, **TINY)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- fast paths


def test_dropout_mask_rate_scale_and_dtype():
    torch.manual_seed(0)
    for p, dtype in ((0.2, torch.float32), (0.5, torch.bfloat16), (0.05, torch.float32)):
        mask = dropout_mask(torch.Size([300, 1000]), p, dtype)
        assert mask.dtype == dtype and mask.shape == (300, 1000)
        dropped = (mask == 0).float().mean().item()
        assert abs(dropped - p) < 0.005, (p, dropped)
        kept_value = 65536 / (65536 - round(p * 65536))
        values = mask.unique().float()
        assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(kept_value, rel=1e-2)
        assert mask.float().mean().item() == pytest.approx(1.0, abs=0.01)


def test_dropout_is_identity_in_eval_and_at_zero_and_seeded():
    x = torch.randn(4, 8, 16)
    layer = Dropout(0.3)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / 0.7, rtol=1e-4)


def test_explicit_attention_matches_sdpa():
    torch.manual_seed(0)
    config = ModelConfig(n_embd=32, n_head=4, block_size=16, dropout=0.0)
    attention = CausalSelfAttention(config)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(attention.explicit_attention(q, k, v, None, True), expected, atol=1e-5)
    window = torch.ones(16, 16, dtype=torch.bool).tril() & ~torch.ones(16, 16, dtype=torch.bool).tril(-4)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=window)
    assert torch.allclose(attention.explicit_attention(q, k, v, window, False), expected, atol=1e-5)


@pytest.mark.parametrize("preset", ["seed", "gpt"])
def test_training_forward_is_the_same_function_on_either_attention_path(preset):
    """With dropout off, the explicit path (taken in training) and SDPA agree to 1e-5 in fp32."""
    model_config, _ = get_preset(preset)
    model_config.vocab_size, model_config.n_layer, model_config.dropout = 30, 2, 0.0
    torch.manual_seed(0)
    model = GPT(model_config).train()
    x = torch.randint(0, 30, (3, model_config.block_size))
    with torch.no_grad():  # no backward to pay for: SDPA
        sdpa_logits, _ = model(x)
    for block in model.blocks:
        block.attn.record_attention = True  # forces the explicit path
    explicit_logits, _ = model(x)
    assert torch.allclose(explicit_logits, sdpa_logits, atol=1e-5)


def test_training_with_dropout_stays_causal():
    model_config, _ = get_preset("seed")
    model_config.vocab_size, model_config.n_layer = 30, 2
    model = GPT(model_config).train()
    x = torch.randint(0, 30, (2, 64))
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 30
    torch.manual_seed(7)
    a, _ = model(x)
    torch.manual_seed(7)
    b, _ = model(changed)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.equal(a[:, 40:], b[:, 40:])


def test_attention_choice_is_measured_once_per_dtype():
    first = cpu_prefers_explicit_attention(torch.float32)
    assert isinstance(first, bool) and cpu_prefers_explicit_attention(torch.float32) is first


@pytest.mark.slow
def test_compiled_training_runs_on_cpu():
    model_config, train_config = get_preset("tiny")
    model_config.vocab_size, model_config.dropout = 20, 0.1
    figures = bench.measure_training(model_config, train_config, torch.device("cpu"),
                                     Precision(torch.bfloat16, "bfloat16: test"),
                                     {"float32": 1e9, "bfloat16": 1e9}, batch_size=2, repeats=1, warmup=1,
                                     compile=True)
    assert figures.compiled and figures.tokens_per_second > 0
