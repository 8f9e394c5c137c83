"""The per-device speed paths (speed.py) change nothing but speed, and a run decides which
of them it uses once: recorded, read back on resume, overridable, never re-timed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import train_tiny, words_text, write_text
from tinygpt import speed
from tinygpt.checkpoint import load_model, read_record
from tinygpt.config import ModelConfig, TrainConfig, get_preset
from tinygpt.data import prepare
from tinygpt.hardware import Precision
from tinygpt.model import GPT, CausalSelfAttention

CPU = torch.device("cpu")


def _plan(**choices) -> speed.SpeedPlan:
    reasons = dict.fromkeys(("attention", "dropout_mask", "decode_copies"), "test")
    values = {"attention": "sdpa", "dropout_mask": "torch", "decode_copies": "on", **choices}
    return speed.SpeedPlan(Precision(torch.float32, "float32: test"), reasons=reasons, **values)


# ----------------------------------------------------------------------------- the plan


def test_the_plan_decides_each_auto_choice_with_a_reason(monkeypatch):
    monkeypatch.setattr(speed, "explicit_attention_is_faster", lambda dtype: False)
    config = TrainConfig(dtype="float32")
    with_dropout = speed.plan(CPU, config, dropout=0.1)
    assert (with_dropout.attention, with_dropout.dropout_mask, with_dropout.decode_copies) == (
        "explicit", "bits16", "on")
    without = speed.plan(CPU, config, dropout=0.0)
    assert (without.attention, without.dropout_mask) == ("sdpa", "torch")
    assert all(without.reasons[key] for key in ("attention", "dropout_mask", "decode_copies"))
    resolved = with_dropout.resolved(config)
    assert (resolved.dtype, resolved.attention, resolved.dropout_mask, resolved.decode_copies) == (
        "float32", "explicit", "bits16", "on")
    assert len(with_dropout.describe()) == 4 and with_dropout.describe()[1].startswith("attention: explicit")


def test_a_chosen_value_is_kept_and_nothing_is_timed(monkeypatch):
    def no_timing(dtype):
        raise AssertionError("timed a choice that was already made")

    monkeypatch.setattr(speed, "explicit_attention_is_faster", no_timing)
    config = TrainConfig(dtype="bfloat16", attention="sdpa", dropout_mask="torch", decode_copies="off")
    chosen = speed.plan(CPU, config, dropout=0.0, given="as the run started")
    assert (chosen.precision.name, chosen.attention, chosen.dropout_mask, chosen.decode_copies) == (
        "bfloat16", "sdpa", "torch", "off")
    assert chosen.reasons["attention"] == "as the run started"
    assert chosen.precision.reason == "bfloat16: as the run started"


def test_timing_the_attention_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    speed.explicit_attention_is_faster(torch.float32)
    assert torch.equal(torch.get_rng_state(), before)


def test_apply_switches_attention_dropout_and_decode_paths():
    model_config, _ = get_preset("tiny")
    model_config.vocab_size, model_config.dropout = 20, 0.1
    model = GPT(model_config)
    speed.apply(model, _plan(attention="explicit", dropout_mask="bits16", decode_copies="off"))
    assert all(block.attn.explicit for block in model.blocks)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is speed.Bits16Dropout for m in dropouts)
    assert model.decode_copies is False
    speed.apply(model, _plan())
    assert not any(block.attn.explicit for block in model.blocks)
    assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speed")
    prepare([str(write_text(root / "corpus.txt", words_text(2000)))], root / "data", progress=False)
    return root / "data"


def test_a_run_records_its_choices_and_a_resume_reads_them_back(data_dir, tmp_path, monkeypatch):
    settings = {"dtype": "auto", "dropout": 0.0, "eval_iters": 1}
    train_tiny(data_dir, tmp_path / "run", 4, 4, settings)
    saved = read_record(tmp_path / "run", "last")["train_config"]
    assert saved["dtype"] in ("float32", "bfloat16")
    assert saved["attention"] in ("sdpa", "explicit") and saved["dropout_mask"] == "torch"
    assert saved["decode_copies"] == "on"

    def no_timing(*args, **kwargs):
        raise AssertionError("a resumed run timed a choice again")

    monkeypatch.setattr(speed, "explicit_attention_is_faster", no_timing)
    monkeypatch.setattr(speed, "choose_precision", no_timing)
    train_tiny(data_dir, tmp_path / "run", 8, 4, settings, resume=True)
    assert read_record(tmp_path / "run", "last")["train_config"]["attention"] == saved["attention"]
    model, _ = load_model(tmp_path / "run")  # loading times nothing either, and keeps the decode choice
    assert model.decode_copies is True


def test_set_overrides_a_choice(data_dir, tmp_path):
    from tinygpt.cli import main

    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--max-iters", "2", "--set", "eval_interval=2", "--set", "eval_iters=1", "--set", "dropout=0.1",
                 "--set", "attention=sdpa", "--set", "dropout_mask=torch", "--no-progress"])
    assert code == 0
    saved = read_record(tmp_path / "run", "last")["train_config"]
    assert (saved["attention"], saved["dropout_mask"]) == ("sdpa", "torch")


# ----------------------------------------------------------------------------- dropout masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])  # the cpu and seed presets' rates, and a large one
def test_dropout_mask_keeps_the_expected_value(p, dtype):
    torch.manual_seed(0)
    mask = speed.dropout_mask(torch.Size([4000, 2000]), p, dtype)
    assert mask.dtype == dtype and mask.shape == (4000, 2000)
    values = mask.unique().float()
    assert len(values) == 2 and values[0] == 0
    # E[mask] = 1: in bf16 the kept value rounds (1/0.95 -> 1.0547), so the rate follows it
    assert mask.double().mean().item() == pytest.approx(1.0, abs=1e-3)
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < (0.003 if dtype == torch.float32 else 0.01), (p, dropped)


def test_bits16_dropout_is_identity_in_eval_and_at_zero_and_seeded():
    x = torch.randn(4, 8, 16)
    layer = speed.Bits16Dropout(0.3)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(speed.Bits16Dropout(0.0).train()(x), x)
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / 0.7, rtol=1e-4)


# ----------------------------------------------------------------------------- attention


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
    """With dropout off, the explicit path and SDPA agree to 1e-5 in fp32, and the explicit
    one is really taken in training."""
    model_config, _ = get_preset(preset)
    model_config.vocab_size, model_config.n_layer, model_config.dropout = 30, 2, 0.0
    torch.manual_seed(0)
    model = GPT(model_config).train()
    x = torch.randint(0, 30, (3, model_config.block_size))
    sdpa_logits, _ = model(x)
    speed.apply(model, _plan(attention="explicit"))
    taken = []
    model.blocks[0].attn.explicit_attention = lambda *a, f=model.blocks[0].attn.explicit_attention: (
        taken.append(1) or f(*a))
    explicit_logits, _ = model(x)
    assert taken and torch.allclose(explicit_logits, sdpa_logits, atol=1e-5)


def test_training_with_bits16_dropout_stays_causal():
    model_config, _ = get_preset("seed")
    model_config.vocab_size, model_config.n_layer = 30, 2
    model = speed.apply(GPT(model_config), _plan(attention="explicit", dropout_mask="bits16")).train()
    x = torch.randint(0, 30, (2, 64))
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 30
    torch.manual_seed(7)
    a, _ = model(x)
    torch.manual_seed(7)
    b, _ = model(changed)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.equal(a[:, 40:], b[:, 40:])


# ----------------------------------------------------------------------------- decode copies


def _small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_product_equals_linear(threads, bias):
    """The decode-step product (a re-laid-out copy of the weight, one bmm) gives F.linear's
    numbers for any thread count; with autograd, F.linear runs."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 96, bias=bias)
    x = torch.randn(1, 1, 48)
    product = speed._DecodeProduct(layer, threads)
    assert product.copy.size(0) == (threads if 96 % threads == 0 else 1)
    with torch.no_grad():
        assert torch.allclose(product(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        product.copy.zero_()  # proves which path runs
        assert not torch.allclose(product(x), F.linear(x, layer.weight, layer.bias))
    y = product(x)  # with autograd: the plain path, gradients flow
    assert torch.allclose(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(96, 1) @ x.reshape(1, 48))


def test_decode_copies_live_only_inside_decoding():
    """A fused AdamW step does not move a weight's version counter, so the copies cannot be
    kept across generations: decoding() makes them and drops them, nested or interleaved."""
    model = _small_model()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with speed.decoding(model):
        assert all(isinstance(m.__dict__.get("forward"), speed._DecodeProduct) for m in linears)
        with speed.decoding(model):
            pass
        assert all("forward" in m.__dict__ for m in linears)  # the outer context still holds them
    assert not any("forward" in m.__dict__ for m in linears)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x = torch.randint(0, 23, (1, 1))
    with torch.no_grad(), speed.decoding(model):
        before, _ = model(x)
    model(torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16)))[1].backward()
    optimizer.step()
    with torch.no_grad(), speed.decoding(model):
        after, _ = model(x)
    with torch.no_grad():
        plain, _ = model(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, plain, rtol=1e-5, atol=1e-5)


def test_decode_copies_off_keeps_the_plain_product():
    model = _small_model()
    model.decode_copies = False
    with speed.decoding(model):
        assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))


def test_the_speed_keys_are_training_config_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(speed.SPEED_KEYS) <= names


@pytest.mark.parametrize(("p", "dtype"), [(0.001, torch.bfloat16), (1e-6, torch.float32), (0.999, torch.float32)])
def test_dropout_mask_at_extreme_rates(p, dtype):
    """A scale that rounds to 1 keeps every element; a rate near 1 keeps a few."""
    torch.manual_seed(0)
    mask = speed.dropout_mask(torch.Size([1000, 1000]), p, dtype)
    assert mask.double().mean().item() == pytest.approx(1.0, abs=0.05)
    assert abs((mask == 0).double().mean().item() - p) < 0.005
