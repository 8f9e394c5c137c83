"""Sampling and the KV cache: the cache changes nothing but speed, far past block_size."""

import sys

import pytest
import torch

from helpers import assert_ok, run_cli, words_text, write_text
from tinygpt import speed
from tinygpt.config import ModelConfig, get_preset
from tinygpt.data import prepare
from tinygpt.generate import KVCache, generate_ids, sample_next
from tinygpt.model import GPT
from tinygpt.train import train

BLOCK = 16
GREEDY = {"temperature": 0}
FILTERED = {"temperature": 0.9, "top_k": 12, "top_p": 0.9}
PLAIN = {"temperature": 1.0}


def small_model(positions: str, n_layer: int = 3, block_size: int = BLOCK, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=40, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32,
                         positions=positions)
    return GPT(config).eval()


def generate(model: GPT, prompt: list[int], steps: int, **options) -> torch.Tensor:
    """Every sample's new ids, (num_samples, steps)."""
    return torch.stack(list(generate_ids(model, prompt, steps, **options)), dim=1)


# ----------------------------------------------------------------------------- cached == uncached


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("options", [GREEDY, FILTERED, PLAIN], ids=["greedy", "top-k-top-p", "temperature"])
def test_cache_changes_nothing_far_past_block_size(positions, num_samples, options):
    model = small_model(positions)
    steps = 5 * BLOCK
    cached = generate(model, [1, 2, 3], steps, seed=7, num_samples=num_samples, use_cache=True, **options)
    uncached = generate(model, [1, 2, 3], steps, seed=7, num_samples=num_samples, use_cache=False, **options)
    assert cached.shape == (num_samples, steps)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0].tolist())) >= 5  # a varied text, not one repeated id: the comparison means something
    if num_samples > 1 and options is not GREEDY:
        assert not torch.equal(cached[0], cached[1])  # the samples of a batch are drawn independently


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cache_changes_nothing_with_a_prompt_longer_than_the_context(positions):
    # rope: the prompt is longer than everything a prediction depends on (3 * 15 + 1 = 46
    # characters), so the prefill fills the rolling buffer out of order
    model = small_model(positions)
    prompt = [(7 * i) % 40 for i in range(3 * BLOCK + 5)]
    cached = generate(model, prompt, 3 * BLOCK, seed=1, use_cache=True, **FILTERED)
    uncached = generate(model, prompt, 3 * BLOCK, seed=1, use_cache=False, **FILTERED)
    assert torch.equal(cached, uncached)


def reference_context(positions: str, tokens: list[int], n_layer: int, block: int, start: int) -> tuple[int, int]:
    """The documented window rule, written out independently: (start, first position)."""
    length = len(tokens)
    if positions == "rope":
        start = max(0, length - (n_layer * (block - 1) + 1))
        return start, start
    if length - start > block:
        start = length - block // 2
    return start, 0


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_each_step_follows_the_documented_window(positions, use_cache):
    # Each step's distribution is the model's full forward pass over the documented context:
    # learned, at most block_size characters and, when full, the last half of them;
    # rope, the last n_layer * (block_size - 1) + 1 characters with a sliding-window mask.
    model = small_model(positions)
    tokens = [1, 2, 3]
    start = 0
    for ids, probs in generate_ids(model, list(tokens), 4 * BLOCK, seed=3, use_cache=use_cache, with_probs=True,
                                   **PLAIN):
        start, first_position = reference_context(positions, tokens, 3, BLOCK, start)
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens[start:]]), start=first_position)
        torch.testing.assert_close(probs[0], logits[0, -1].softmax(-1), rtol=1e-4, atol=1e-6)
        tokens.append(int(ids[0]))


def test_rope_window_is_not_a_crop_to_block_size():
    # With two layers or more, cropping the context to the last block_size characters
    # would not give what the rolling cache gives: see generate.py's docstring.
    model = small_model("rope")
    tokens = list(generate(model, [1, 2, 3], 3 * BLOCK, seed=2, **PLAIN)[0].tolist())
    context = torch.tensor([[1, 2, 3] + tokens])
    n = context.size(1)
    with torch.no_grad():
        reach = 3 * (BLOCK - 1) + 1
        windowed, _ = model(context[:, n - reach:], start=n - reach)
        cropped, _ = model(context[:, n - BLOCK:], start=n - BLOCK)
        one_layer = small_model("rope", n_layer=1)
        one_windowed, _ = one_layer(context[:, n - 1 - (BLOCK - 1):], start=n - BLOCK)
        one_full, _ = one_layer(context[:, n - reach:], start=n - reach)
    assert not torch.allclose(windowed[0, -1], cropped[0, -1], atol=1e-4)
    torch.testing.assert_close(one_windowed[0, -1], one_full[0, -1], rtol=1e-4, atol=1e-5)  # one layer: they agree


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("threads", [2])
def test_cache_changes_nothing_with_the_decode_product_split_over_threads(positions, threads):
    """At batch 1 a decode step's matrix products run as one bmm over per-thread chunks."""
    model = small_model(positions)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cached = generate(model, [1, 2, 3], 5 * BLOCK, seed=7, use_cache=True, **PLAIN)
        uncached = generate(model, [1, 2, 3], 5 * BLOCK, seed=7, use_cache=False, **PLAIN)
        with speed.decoding(model):
            assert model.blocks[0].mlp.up.forward.copy.size(0) == threads
    finally:
        torch.set_num_threads(previous)
    assert "forward" not in model.blocks[0].mlp.up.__dict__  # dropped after the generation
    assert torch.equal(cached, uncached)


def test_decoded_logits_match_the_full_forward_pass():
    for positions in ("learned", "rope"):
        model = small_model(positions)
        tokens = torch.randint(0, 40, (2, BLOCK))
        cache = KVCache(model.config, 2, "cpu", torch.float32)
        with torch.no_grad():
            model(tokens[:, :4], cache=cache)
            for length in range(5, BLOCK + 1):
                decoded, _ = model(tokens[:, length - 1:length], start=length - 1, cache=cache)
                full, _ = model(tokens[:, :length])
                torch.testing.assert_close(decoded[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_generation_leaves_the_model_trainable():
    # the rotary tables grow during generation (inference mode); training must still work
    model = small_model("rope")
    generate(model, [1, 2], 5 * BLOCK, seed=0, **PLAIN)
    assert model.rotary_cos.size(0) >= 2 + 5 * BLOCK
    model.train()
    tokens = torch.randint(0, 40, (2, BLOCK + 1))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grad = model.token_embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_rotary_rows_never_change_when_the_tables_grow():
    model = small_model("rope")
    first = model.rotary_cos.clone()
    model.extend_rotary(10 * BLOCK + 3)
    grown = model.rotary_cos.clone()
    model.extend_rotary(40 * BLOCK)
    assert torch.equal(model.rotary_cos[: first.size(0)], first)
    assert torch.equal(model.rotary_cos[: grown.size(0)], grown)
    fresh = small_model("rope")
    fresh.extend_rotary(40 * BLOCK)  # grown in one go: the same numbers
    assert torch.equal(fresh.rotary_cos, model.rotary_cos)
    assert torch.equal(fresh.rotary_sin, model.rotary_sin)


def test_the_token_buffer_grows_past_its_first_size(monkeypatch):
    model = small_model("rope")
    expected = generate(model, [1, 2, 3], 3 * BLOCK, seed=5, **FILTERED)
    # (the module itself: the package's `generate` attribute is the generate_text function)
    monkeypatch.setattr(sys.modules[generate_ids.__module__], "BUFFER_STEPS", 5)  # doubles 4 times in 48 steps
    for use_cache in (True, False):
        assert torch.equal(generate(model, [1, 2, 3], 3 * BLOCK, seed=5, use_cache=use_cache, **FILTERED), expected)


def test_no_cache_state_survives_between_calls():
    model = small_model("rope")
    first = generate(model, [4, 5, 6], 3 * BLOCK, seed=9, **FILTERED)
    generate(model, [9] * 30, 2 * BLOCK, seed=1, **FILTERED)
    again = generate(model, [4, 5, 6], 3 * BLOCK, seed=9, **FILTERED)
    assert torch.equal(first, again)


# ----------------------------------------------------------------------------- sample_next


def draws(logits: torch.Tensor, count: int = 2000, **options) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    batch = logits.expand(count, -1)
    return set(sample_next(batch, generator=generator, **options).tolist())


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8, 0.5]])
    assert draws(logits, temperature=1.0, top_k=3) == {1, 3, 5}
    assert draws(logits, temperature=1.0, top_k=1) == {1}
    assert draws(logits, temperature=1.0) == set(range(7))  # without it every id can come up


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert draws(logits, temperature=1.0, top_p=0.5) == {1}  # 0.5 alone reaches 0.5
    assert draws(logits, temperature=1.0, top_p=0.75) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.75
    assert draws(logits, temperature=1.0, top_p=0.81) == {1, 3, 2}  # 0.8 < 0.81: one more
    assert draws(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_renormalises_what_it_keeps():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    generator = torch.Generator().manual_seed(0)
    picks = sample_next(logits.expand(20000, -1), top_p=0.75, generator=generator)
    share_of_1 = (picks == 1).float().mean().item()
    assert share_of_1 == pytest.approx(0.5 / 0.8, abs=0.02)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0, top_k=3, top_p=0.1), logits.argmax(-1))


def test_low_temperature_sharpens():
    logits = torch.tensor([[1.0, 1.5, 0.5]])
    assert draws(logits, temperature=0.01) == {1}
    assert draws(logits, temperature=1.0) == {0, 1, 2}


def test_same_seed_same_ids():
    logits = torch.randn(8, 50)
    first = sample_next(logits, top_k=20, generator=torch.Generator().manual_seed(3))
    again = sample_next(logits, top_k=20, generator=torch.Generator().manual_seed(3))
    other = sample_next(logits, top_k=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_same_seed_same_generation():
    model = small_model("learned")
    first = generate(model, [1, 2, 3], 40, seed=11, num_samples=2, **FILTERED)
    again = generate(model, [1, 2, 3], 40, seed=11, num_samples=2, **FILTERED)
    other = generate(model, [1, 2, 3], 40, seed=12, num_samples=2, **FILTERED)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs, learned and rotary positions (block_size 32)."""
    root = tmp_path_factory.mktemp("generate")
    write_text(root / "corpus.txt", words_text(600, seed=5))
    prepare([str(root / "corpus.txt")], root / "data", progress=False)
    runs = {}
    for positions in ("learned", "rope"):
        model_config, train_config = get_preset("tiny")
        model_config.positions = positions
        train_config.max_iters, train_config.eval_interval, train_config.dtype = 30, 30, "float32"
        train(root / "data", root / positions, model_config, train_config, device="cpu", progress=False,
              log=lambda *args, **kwargs: None)
        runs[positions] = root / positions
    return runs


@pytest.mark.parametrize(("positions", "extra"), [
    ("learned", []),
    ("rope", ["--num-samples", "2", "--top-k", "10", "--top-p", "0.95"]),
], ids=["learned-one", "rope-batch"])
def test_sample_prints_the_same_text_without_the_cache(runs, positions, extra):
    args = ["sample", runs[positions], "--prompt", "The king", "--max-new-tokens", 160, "--seed", 4,
            "--device", "cpu", *extra]  # 168 characters: 5x block_size
    cached = assert_ok(run_cli(*args)).stdout
    uncached = assert_ok(run_cli(*args, "--no-cache")).stdout
    assert cached == uncached
    first = cached.split("--- sample 2 ---")[0]
    assert "The king" in first and len(first) > 160


def test_generation_leaves_the_global_rng_and_the_model_mode_alone():
    """An unseeded generation seeds a generator of its own; a model in training mode is
    back in training mode afterwards (and generated in eval mode: no dropout)."""
    model = small_model("rope")
    model.config.dropout = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    first = list(generate_ids(model, [1, 2], 20, temperature=0.0))
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    second = list(generate_ids(model, [1, 2], 20, temperature=0.0))  # greedy: dropout would change it
    assert [int(t) for t in first] == [int(t) for t in second]
    steps = generate_ids(model, [1, 2], 20)
    next(steps)
    assert not model.training  # eval mode while generating
    steps.close()
    assert model.training


def test_generation_runs_the_lm_head_on_the_last_position_only():
    model = small_model("rope")
    rows = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[1]))
    prompt = list(range(1, 30))
    for use_cache in (True, False):
        rows.clear()
        list(generate_ids(model, prompt, 5, seed=0, use_cache=use_cache))
        assert rows == [1] * 5, (use_cache, rows)


# ----------------------------------------------------------------------------- arguments out of range

COUNTS = "--num-samples must be >= 1 and --max-new-tokens >= 0"
FILTERS = "--temperature must be >= 0, --top-k >= 1 and --top-p in (0, 1]"
SEEDS = "--seed must be >= 0 and < 2**63"


@pytest.mark.parametrize(("options", "message"), [
    ({"max_new_tokens": -1}, COUNTS),
    ({"num_samples": 0}, COUNTS),
    ({"num_samples": -1}, COUNTS),
    ({"top_p": 0.0}, FILTERS),
    ({"top_p": 1.5}, FILTERS),
    ({"top_k": 0}, FILTERS),
    ({"top_k": -3}, FILTERS),
    ({"temperature": -0.5}, FILTERS),
    ({"temperature": float("nan")}, FILTERS),
    ({"seed": -1}, SEEDS),
    ({"seed": 2**63}, SEEDS),
    ({"seed": 2**64}, SEEDS),
])
def test_the_library_refuses_what_the_cli_refuses(options, message):
    from tinygpt.errors import ConfigError
    from tinygpt.generate import generate_text
    from tinygpt.tokenizer import CharTokenizer

    model = small_model("rope")
    options = {"max_new_tokens": 5, **options}
    with pytest.raises(ConfigError) as refused:
        next(generate_ids(model, [1, 2], **options))
    assert str(refused.value) == message
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(40)])
    with pytest.raises(ConfigError) as refused_text:
        generate_text(model, tokenizer, "ab", **options)
    assert str(refused_text.value) == message


def test_the_edges_of_each_range_are_accepted():
    model = small_model("rope")
    assert list(generate_ids(model, [1, 2], 0)) == []
    for options in ({"top_p": 1.0, "top_k": 1}, {"temperature": 0.0}, {"seed": 0}, {"seed": 2**63 - 1}):
        steps = list(generate_ids(model, [1, 2], 3, **options))
        assert len(steps) == 3 and all(0 <= int(t) < 40 for t in steps)


@pytest.mark.parametrize(("flags", "options"), [
    (["--top-p", "1.5"], {"top_p": 1.5}),
    (["--top-k", "0"], {"top_k": 0}),
    (["--num-samples", "0"], {"num_samples": 0}),
    (["--seed", "-1"], {"seed": -1}),
    (["--seed", str(2**64)], {"seed": 2**64}),
])
def test_sample_and_the_library_share_one_check(flags, options, capsys, tmp_path):
    from tinygpt.cli import main
    from tinygpt.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        next(generate_ids(small_model("rope"), [1], 5, **options))
    # the check comes before the run is read: a missing run directory is never reached
    assert main(["sample", str(tmp_path / "no-run"), *flags]) == 1
    assert capsys.readouterr().err == f"tinygpt sample: error: {refused.value}\n"


def test_interleaved_generations_keep_eval_mode_and_restore_the_first_mode():
    model = small_model("rope").train()
    first, second = generate_ids(model, [1, 2], 10, seed=1), generate_ids(model, [3, 4], 10, seed=2)
    next(first)
    next(second)
    first.close()
    assert not model.training  # the second is still generating: no dropout for it
    list(second)
    assert model.training
