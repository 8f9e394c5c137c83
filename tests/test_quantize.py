"""int8 decoding (`tinygpt sample --int8`, issue 13): every Linear quantized, the original
untouched, cached == uncached within int8, and the CLI path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import assert_ok, run_cli
from tinygpt.config import ModelConfig
from tinygpt.generate import generate_ids
from tinygpt.model import GPT
from tinygpt.quantize import Int8Linear, int8_model
from tinygpt.tokenizer import CharTokenizer

SIZES = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def model_of(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=20, **{**SIZES, **options})).eval()


def test_every_linear_is_quantized_and_the_original_is_untouched():
    model = model_of()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    quantized = int8_model(model)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2 * 4 + 1
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    x = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        exact, _ = model(x)
        rounded, _ = quantized(x)
    # int8 rounding moves the logits a little, not a lot
    assert not torch.equal(exact, rounded)
    assert (exact - rounded).abs().max() < 0.05 * exact.abs().max()


def test_layers_the_kernel_cannot_take_stay_float32():
    # n_embd 40: Linears reading 40 inputs stay float32; the MLP's down projection reads 160
    quantized = int8_model(GPT(ModelConfig(vocab_size=20, **{**SIZES, "n_embd": 40})).eval())
    block = quantized.blocks[0]
    assert all(isinstance(m, nn.Linear) for m in (block.attn.qkv, block.attn.proj, block.mlp.up, quantized.lm_head))
    assert isinstance(block.mlp.down, Int8Linear)
    with torch.no_grad():
        assert quantized(torch.randint(0, 20, (1, 8)))[0].isfinite().all()


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_int8_cached_equals_int8_uncached_past_the_block(positions, tie_embeddings):
    quantized = int8_model(model_of(positions=positions, tie_embeddings=tie_embeddings))
    prompt = [1, 2, 3]

    def text(use_cache: bool) -> list[int]:
        return [int(ids[0]) for ids in generate_ids(quantized, prompt, 40, temperature=0.8, seed=5,
                                                    use_cache=use_cache)]
    cached = text(True)
    assert len(cached) == 40 and cached == text(False)  # 40 tokens: well past block_size 16


def test_sample_int8_from_the_cli(tmp_path):
    from helpers import random_run

    tokenizer = CharTokenizer(sorted(set("abcdefgh ROMEO:\n")))
    random_run(tmp_path / "run", tokenizer, SIZES)
    fp32 = assert_ok(run_cli("sample", tmp_path / "run", "--prompt", "ROMEO:", "--max-new-tokens", "30"))
    int8 = assert_ok(run_cli("sample", tmp_path / "run", "--prompt", "ROMEO:", "--max-new-tokens", "30", "--int8"))
    for result in (fp32, int8):
        assert result.stdout.startswith("ROMEO:") and len(result.stdout.rstrip("\n")) == len("ROMEO:") + 30
