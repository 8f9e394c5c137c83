"""Recipe options (issue 16): ReLU², QK-norm, zero-initialised output projections, logit
soft-capping and the warmup-stable-decay schedule each do what they say."""

from __future__ import annotations

import math

import pytest
import torch

from tinygpt.config import ConfigError, ModelConfig, TrainConfig
from tinygpt.errors import ExportError
from tinygpt.export import hf_target
from tinygpt.generate import generate_ids
from tinygpt.gguf_export import architecture_for
from tinygpt.model import GPT
from tinygpt.optim import learning_rate_at

SIZES = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def model_of(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**SIZES, **options})).eval()


def test_relu2_is_relu_squared():
    model = model_of(activation="relu2")
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(model.blocks[0].mlp.activation(x), torch.relu(x) ** 2)


def test_zero_init_projections_make_every_block_the_identity_at_init():
    model = model_of(zero_init_proj=True)
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.down.weight.any()
    x = torch.randn(2, 5, 32)
    assert torch.equal(model.blocks[0](x), x)  # pre-norm: x + 0 + 0
    assert model_of().blocks[0].attn.proj.weight.any()  # the default init is not zero


def test_logit_softcap_bounds_the_logits_and_is_tanh():
    plain, capped = model_of(), model_of(logit_softcap=0.5)
    idx = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        raw, _ = plain(idx)
        bounded, _ = capped(idx)
    assert bounded.abs().max() < 0.5
    assert torch.allclose(bounded, 0.5 * torch.tanh(raw / 0.5), atol=1e-6)


def test_qk_norm_gives_unit_rms_queries_and_a_different_model():
    model = model_of(qk_norm=True)
    attention = model.blocks[0].attn
    q = torch.randn(2, 2, 5, 16) * 7
    assert torch.allclose(attention.qk_norm(q).pow(2).mean(-1), torch.ones(2, 2, 5), atol=1e-3)
    idx = torch.randint(0, 20, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0], model_of()(idx)[0])


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(logit_softcap=30.0), dict(activation="relu2"),
                                     dict(zero_init_proj=True)])
def test_options_keep_cached_equal_to_uncached(options):
    model = model_of(positions="rope", **options)
    with torch.no_grad():  # weights away from a zero init, so every path does some work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    text = [[int(i[0]) for i in generate_ids(model, [1, 2], 40, temperature=0.8, seed=3, use_cache=c)]
            for c in (True, False)]
    assert text[0] == text[1]


def test_wsd_schedule_is_flat_then_a_straight_line_to_min_lr():
    config = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, schedule="wsd",
                         decay_fraction=0.5)
    assert learning_rate_at(4, config) == pytest.approx(5e-4)  # warmup
    assert learning_rate_at(10, config) == learning_rate_at(60, config) == 1e-3  # stable until the last half
    assert learning_rate_at(85, config) == pytest.approx(5.5e-4)  # half way down the line
    assert learning_rate_at(110, config) == pytest.approx(1e-4)
    timed = TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_iters=0, max_iters=10**9, max_time=100.0,
                        schedule="wsd", decay_fraction=0.2)
    assert learning_rate_at(5, timed, elapsed=79.0) == 1e-3
    assert learning_rate_at(5, timed, elapsed=90.0) == pytest.approx(5e-4)
    assert math.isclose(learning_rate_at(5, timed, elapsed=100.0), 0.0, abs_tol=1e-12)


@pytest.mark.parametrize("config, fragment", [
    (ModelConfig(activation="swish"), "activation must be one of gelu, relu, relu2"),
    (ModelConfig(logit_softcap=-1.0), "logit_softcap must be >= 0"),
])
def test_bad_model_options(config, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config.validate()


def test_bad_decay_fraction():
    with pytest.raises(ConfigError, match="decay_fraction must be in"):
        TrainConfig(schedule="wsd", decay_fraction=0.0).validate()


@pytest.mark.parametrize("options, fragment", [(dict(qk_norm=True), "qk_norm=true"),
                                               (dict(logit_softcap=30.0), "logit_softcap=30")])
def test_exports_refuse_options_their_targets_lack(options, fragment):
    config = ModelConfig(**{**SIZES, "positions": "rope", **options})
    with pytest.raises(ExportError, match=fragment):
        hf_target(config)
    with pytest.raises(ExportError, match=fragment):
        architecture_for(config)


def test_muon_lr_gives_muon_its_own_peak_and_the_schedule_moves_both_rates():
    from tinygpt.optim import build_optimizers, set_learning_rate

    config = TrainConfig(optimizer="muon", learning_rate=2e-3, muon_lr=6e-3)
    adamw, muon = build_optimizers(model_of(), config, torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and muon.param_groups[0]["lr"] == pytest.approx(6e-3)
    set_learning_rate([adamw, muon], 1e-3)  # the schedule at half its peak
    assert [g["lr"] for g in adamw.param_groups] == [1e-3] * len(adamw.param_groups)
    assert muon.param_groups[0]["lr"] == pytest.approx(3e-3)
    _, same = build_optimizers(model_of(), TrainConfig(optimizer="muon", learning_rate=2e-3), torch.device("cpu"))
    assert same.param_groups[0]["lr"] == pytest.approx(2e-3)  # muon_lr 0: Muon follows learning_rate


def test_bad_muon_lr():
    with pytest.raises(ConfigError, match="muon_lr must be >= 0"):
        TrainConfig(optimizer="muon", muon_lr=-1.0).validate()


def test_the_previous_preset_file_keeps_every_later_option_off():
    """benchmarks/configs/cpu_before_issue16.toml is the `cpu` preset before issue 16: keys it
    leaves out would come from today's preset, so every training key is written out, each
    later option off."""
    import dataclasses
    from pathlib import Path

    import tomllib

    from tinygpt.config import load_config_file

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "cpu_before_issue16.toml"
    written = tomllib.loads(path.read_text())
    assert set(written["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = load_config_file(path)
    assert (model.activation, model.dropout, train.schedule, train.processes) == ("gelu", 0.05, "cosine", 1)
    assert (train.auto_dropout, train.ema, train.ema_horizon, train.muon_lr) == (False, 0.0, 0.0, 0.0)
