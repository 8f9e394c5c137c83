import math

import numpy as np
import pytest
import torch

from tinygpt.config import ConfigError, ModelConfig, TinyGPTError, TrainConfig, get_preset
from tinygpt.evaluate import evaluate_tokens
from tinygpt.model import GPT, rotary_cos_sin


def small_config(**overrides) -> ModelConfig:
    options = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return ModelConfig(**{**options, **overrides})


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causal(norm, positions):
    """Changing token t changes the logits at t and later, never before."""
    torch.manual_seed(0)
    model = GPT(small_config(norm=norm, positions=positions, activation="relu")).eval()
    idx = torch.randint(0, 23, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 23
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert (before[:, 9:] - after[:, 9:]).abs().amax() > 1e-3


def test_causal_sliding_window_past_block_size():
    """Rotary positions may run past block_size: each query sees its block_size latest keys."""
    torch.manual_seed(0)
    model = GPT(small_config(positions="rope", block_size=8)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the init so distant tokens matter
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    idx = torch.randint(0, 23, (1, 20))
    changed = idx.clone()
    changed[:, 12] = (idx[:, 12] + 1) % 23
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
        # the last prediction sees n_layer * (block_size - 1) + 1 = 15 tokens back through the layers
        window, _ = model(idx[:, 5:], start=5)
    assert torch.equal(before[:, :12], after[:, :12])
    assert (before[:, 12:] - after[:, 12:]).abs().amax() > 1e-3
    torch.testing.assert_close(before[:, -1], window[:, -1], rtol=0, atol=1e-4)
    shorter, _ = model(idx[:, 6:], start=6)  # one token less: the last prediction changes
    assert (before[:, -1] - shorter[:, -1]).abs().amax() > 1e-3


def naive_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate pair (x[i], x[i + hd/2]) by angle position / 10000^(2i/hd), one pair at a time."""
    half = x.size(-1) // 2
    out = x.clone()
    for i in range(half):
        angle = positions.double() / 10000 ** (2 * i / x.size(-1))  # (T,)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        out[..., i] = x[..., i] * cos - x[..., i + half] * sin
        out[..., i + half] = x[..., i] * sin + x[..., i + half] * cos
    return out


def naive_attention(attn, x: torch.Tensor, rotary: bool = False) -> torch.Tensor:
    """Per-head attention with an explicit softmax and a lower-triangular mask, from the
    module's own fused QKV and output projection weights."""
    B, T, C = x.shape
    head_size = C // attn.n_head
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    heads = []
    for h in range(attn.n_head):
        part = slice(h * head_size, (h + 1) * head_size)
        qh, kh, vh = q[..., part], k[..., part], v[..., part]  # (B, T, hd)
        if rotary:
            qh, kh = naive_rotary(qh, torch.arange(T)), naive_rotary(kh, torch.arange(T))
        scores = qh @ kh.transpose(1, 2) / math.sqrt(head_size)  # (B, T, T)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        heads.append(weights @ vh)
    y = torch.cat(heads, dim=-1) @ attn.proj.weight.T
    if attn.proj.bias is not None:
        y = y + attn.proj.bias
    return y


@pytest.mark.parametrize(
    ("qkv_bias", "bias", "rotary"), [(True, True, False), (False, True, False), (False, False, True)]
)
def test_fused_attention_equals_naive(qkv_bias, bias, rotary):
    torch.manual_seed(0)
    model = GPT(small_config(n_embd=32, n_head=4, qkv_bias=qkv_bias, bias=bias,
                             positions="rope" if rotary else "learned")).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        for parameter in attn.parameters():  # larger than the init so attention is far from uniform
            parameter.normal_(0.0, 0.3)
        x = torch.randn(3, 16, 32)
        rotary_angles = rotary_cos_sin(torch.arange(16), 8) if rotary else None
        fused = attn(x, rotary_angles)
        naive = naive_attention(attn, x, rotary)
    assert fused.shape == (3, 16, 32)
    assert naive.abs().amax() > 0.5  # not a trivially small comparison
    assert (fused - naive).abs().amax() <= 1e-5


def test_seed_preset_parameter_count():
    model_config, _ = get_preset("seed")
    model_config.vocab_size = 145
    model = GPT(model_config)
    assert model.num_parameters() == 21_416_593
    # the notebook's choices: post-LN, ReLU, no QKV bias, biased LM head, untied
    block = model.blocks[0]
    assert not block.pre_norm
    assert isinstance(block.mlp.activation, torch.nn.ReLU)
    assert block.attn.qkv.bias is None
    assert model.lm_head.bias is not None and model.lm_head.bias.shape == (145,)
    assert model.lm_head.weight is not model.token_embedding.weight


def test_tied_embeddings_share_storage():
    torch.manual_seed(0)
    untied = GPT(small_config())
    tied = GPT(small_config(tie_embeddings=True))
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert tied.lm_head.weight.data_ptr() == tied.token_embedding.weight.data_ptr()
    assert tied.num_parameters() == untied.num_parameters() - 23 * 16  # the shared matrix counted once
    with torch.no_grad():
        tied.token_embedding.weight[3].fill_(1.0)
    assert torch.equal(tied.lm_head.weight[3], torch.ones(16))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"n_embd": 0}, "n_embd must be a positive"),
        ({"n_head": 0}, "n_head must be a positive"),
        ({"n_layer": -1}, "n_layer must be a positive"),
        ({"block_size": 0}, "block_size must be a positive"),
        ({"vocab_size": 0}, "vocab_size must be a positive"),
        ({"n_embd": 16.0}, "n_embd must be a positive integer"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"norm": "middle"}, "norm must be one of pre, post"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"positions": "alibi"}, "positions must be one of"),
        ({"norm_type": "batchnorm"}, "norm_type must be one of"),
        ({"positions": "rope", "n_embd": 18, "n_head": 2}, "even head size"),
    ],
)
def test_invalid_model_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        GPT(small_config(**overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_iters": 0}, "max_iters"),
        ({"batch_size": 10, "grad_accum": 3}, "divisible by grad_accum"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"dtype": "float16"}, "dtype must be one of"),
    ],
)
def test_invalid_train_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**overrides).validate()


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_tiny_model_overfits_short_text(norm):
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs! 0123456789"
    chars = sorted(set(text))
    ids = torch.tensor([[chars.index(c) for c in text]])  # (1, 96)
    model = GPT(small_config(vocab_size=len(chars), block_size=128, n_embd=32, norm=norm))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(len(chars)) - 0.5  # starts near chance
    assert losses[-1] < 0.3
    model.eval()
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    # it now predicts (almost) every next character of the text
    assert (logits.argmax(-1) == ids[:, 1:]).float().mean() > 0.95


def test_loss_is_cross_entropy():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 23, (2, 10))
    targets = torch.randint(0, 23, (2, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 23)
    log_probs = logits.log_softmax(-1)
    manual = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, manual)


@pytest.mark.parametrize("length", [2, 16, 17, 50])
def test_evaluate_predicts_every_character_once(length):
    """Whole-split loss: consecutive block_size windows, each character after the first
    predicted exactly once from what precedes it in its window; batching changes nothing."""
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    tokens = np.random.default_rng(length).integers(0, 23, length).astype(np.uint8)
    total = 0.0
    with torch.no_grad():
        for start in range(0, length - 1, 16):
            window = torch.from_numpy(tokens[start:start + 17].astype(np.int64))[None]  # (1, <= T+1)
            logits, _ = model(window[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    for batch_size in (1, 3, 32):
        result = evaluate_tokens(model, tokens, batch_size=batch_size)
        assert result.characters == length - 1
        assert result.loss == pytest.approx(total / (length - 1), rel=1e-5)
        assert result.bits_per_char == pytest.approx(result.loss / math.log(2))
        assert result.perplexity == pytest.approx(math.exp(result.loss))
    for bad_batch in (0, -3):
        with pytest.raises(TinyGPTError, match="batch size"):
            evaluate_tokens(model, tokens, batch_size=bad_batch)


@pytest.mark.parametrize("stride", [1, 5, 11, 16])
@pytest.mark.parametrize("length", [10, 17, 60, 61])
def test_strided_evaluate_gives_each_character_its_rule_context(stride, length):
    """With overlapping windows, character j (its index in the split) is predicted from the
    characters its window starts at: 0 inside the first window, else the last full window
    start s * ceil((j - block) / s); the characters after the last full window come from
    one window starting block - stride before them. Checked one character at a time."""
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    block = model.config.block_size
    tokens = np.random.default_rng(length).integers(0, 23, length).astype(np.uint8)
    predicted = length - 1
    last_full = (predicted - block) // stride * stride if predicted >= block else None
    covered = last_full + block if last_full is not None else 0
    total = 0.0
    with torch.no_grad():
        for j in range(1, length):
            if j <= block:
                start = 0
            elif j <= covered:
                start = stride * math.ceil((j - block) / stride)
            else:
                start = max(0, covered - (block - stride))
            assert j - start <= block and (j <= block or j - start >= block - stride)
            context = torch.from_numpy(tokens[start:j].astype(np.int64))[None]
            logits, _ = model(context)
            total += torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([int(tokens[j])])).item()
    for batch_size in (1, 4):
        result = evaluate_tokens(model, tokens, batch_size=batch_size, stride=stride)
        assert result.characters == predicted and result.stride == stride
        assert result.loss == pytest.approx(total / predicted, rel=1e-5)
    for bad_stride in (0, block + 1):
        with pytest.raises(TinyGPTError, match="stride"):
            evaluate_tokens(model, tokens, stride=bad_stride)


@pytest.mark.parametrize(("preset", "scaled"), [("cpu", True), ("gpt", True), ("seed", False)])
def test_residual_projections_start_at_gpt2_scale(preset, scaled):
    """0.02 / sqrt(2 n_layer) for the projections into the residual stream (GPT-2's init),
    0.02 elsewhere; the seed preset keeps the notebook's plain 0.02 everywhere."""
    from tinygpt.config import get_preset

    model_config, _ = get_preset(preset)
    model_config.vocab_size = 50
    torch.manual_seed(0)
    model = GPT(model_config)
    residual = 0.02 / math.sqrt(2 * model_config.n_layer) if scaled else 0.02
    for block in model.blocks:
        for projection in (block.attn.proj, block.mlp.down):
            assert projection.weight.std().item() == pytest.approx(residual, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
