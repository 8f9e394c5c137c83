"""Sampling: temperature, top-k, top-p, seeded, streamed, with or without the KV cache.

The KV cache changes nothing but speed: with the same seed, the cached and the uncached
paths produce the same text, however long. For that both follow one rule for the context
window once the text outgrows block_size:

* learned positions: the embedding of position i is learned for i < block_size only, and
  every position shifts when the window slides, so cached keys would go stale after each
  slide. Rule: the context is at most block_size characters; when it is full, keep its
  last half and go on (a new character then sees at least block_size/2 before it). The
  cache starts over at that moment (one prefill of block_size/2 characters) and decodes
  one character at a time until the context is full again. The uncached path recomputes
  the same context from scratch every step.
* rotary positions: attention depends on the distance between positions only, so the
  window slides one character per step and, at every layer, a position attends to the
  block_size most recent positions (itself included). The cache rolls: the new key
  overwrites the one block_size back. In the cache, a layer's key at position p was made
  when p was the newest character, from a context that itself reached block_size - 1
  positions back at every layer below, so the next prediction depends on the last
  n_layer * (block_size - 1) + 1 characters. The uncached path recomputes exactly that:
  those characters, with the same sliding-window mask at every layer. (Cropping to the
  last block_size characters instead, as a single-layer intuition suggests, would differ
  from the cache as soon as there are two layers: there, the deeper layers' keys near the
  start of the crop would be computed from truncated contexts.)

Floating point is the one thing the rule cannot share: the two paths add the same
numbers in a different order (a matrix-vector product instead of a row of a matrix
product), so in float32 their probabilities differ in the last bits. A character can only
differ when the random draw lands that close to the edge between two characters, which
the tests (5x past block_size, both position options, sampled and greedy) never see.

A decode step reads every weight once for one character, so on a CPU it is bound by
memory bandwidth, not arithmetic: within speed.decoding() the products read a re-laid-out
copy of each weight there, split across the cores, and the loop allocates next to nothing
per step (the token buffer and the cache are preallocated, the rotary angles precomputed)
and runs under inference_mode.

Generation leaves the caller's world as it found it: the model's train/eval mode and the
global random number generators (an unseeded generation seeds a generator of its own).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

from tinygpt import speed
from tinygpt.config import ModelConfig
from tinygpt.errors import ConfigError
from tinygpt.model import GPT

BUFFER_STEPS = 4096  # new characters the token buffer has room for before it first doubles


class KVCache:
    """Preallocated keys and values of every layer, for generation one token at a time.

    A prefill stores a whole context; then each decode step stores one new position and
    its query attends to every position held. The buffer holds block_size positions and
    rolls: position p lives in slot (p - first) % block_size, `first` being the first
    position of the last prefill, so a new position overwrites the one block_size back:
    exactly the key that leaves a rotary model's sliding window. With learned positions,
    generate.py starts over (reset + prefill) before the context outgrows block_size, so
    there the buffer never rolls. Nothing is allocated after __init__.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.use(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @classmethod
    def sharing(cls, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
        """A cache held in the given buffers (L, B, nh, block, hd): views into a larger one
        (batching.py prefills a request straight into its rows of the batch's cache)."""
        cache = cls.__new__(cls)
        cache.use(keys, values)
        return cache

    def use(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (L, B, nh, block, hd)
        self.layer_keys = keys.unbind(0)  # per-layer views (B, nh, block, hd): no indexing per step
        self.layer_values = values.unbind(0)
        self.size = keys.size(3)
        self.first = 0  # the first position of the last prefill

    def reset(self, first_position: int = 0) -> None:
        """Forget what is held: the next store is the prefill of positions from first_position."""
        self.first = first_position

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              start: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Store keys/values (B, nh, T, hd) of positions start..start+T-1 and return what the
        new queries attend to: when prefilling (T > 1, right after reset), the new keys
        themselves (the caller masks them); when decoding (T == 1), every key held. The
        third item, a mask of the keys each row holds, is None: every row holds them all."""
        T = k.size(2)
        keys, values = self.layer_keys[layer], self.layer_values[layer]
        offset = start - self.first  # positions stored before these since the prefill
        if T > 1:
            keep = min(T, self.size)  # only the last block_size positions can be attended to later
            slot = (offset + T - keep) % self.size
            if slot + keep <= self.size:
                keys[:, :, slot:slot + keep].copy_(k[:, :, T - keep:])
                values[:, :, slot:slot + keep].copy_(v[:, :, T - keep:])
            else:  # a prompt longer than the buffer wraps around it
                slots = torch.arange(offset + T - keep, offset + T, device=k.device) % self.size
                keys.index_copy_(2, slots, k[:, :, T - keep:].to(keys.dtype))
                values.index_copy_(2, slots, v[:, :, T - keep:].to(values.dtype))
            return k, v, None
        slot = offset % self.size
        keys[:, :, slot:slot + 1].copy_(k)
        values[:, :, slot:slot + 1].copy_(v)
        held = min(offset + 1, self.size)
        # slot order is not position order once the buffer rolls; one query attending to
        # every key needs no mask, and the softmax does not care about the order
        return keys[:, :, :held], values[:, :, :held], None  # (B, nh, held, hd)


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next id for each row of logits (B, V): keep the top_k most likely ids,
    then the smallest set whose probability reaches top_p, and draw from what is left at
    this temperature. Temperature 0 is greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    probs = sampling_probs(logits, temperature, top_k, top_p)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution (B, V) sample_next draws from, for float logits (B, V) and a
    temperature above 0. Row by row: batching.py computes it once for many requests' rows."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop an id when the ones before it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): what torch.Generator.manual_seed takes without wrapping


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None, num_samples: int = 1) -> None:
    """Raise ConfigError unless these are arguments generation can honour as asked. The one
    check behind `generate_ids` and `tinygpt sample`, so the two say the same thing."""
    if not (num_samples >= 1 and max_new_tokens >= 0):
        raise ConfigError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    # written as `not (... ok ...)` so that NaN fails too
    if not (temperature >= 0) or (top_k is not None and not top_k >= 1) or (
        top_p is not None and not 0 < top_p <= 1
    ):
        raise ConfigError("--temperature must be >= 0, --top-k >= 1 and --top-p in (0, 1]")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ConfigError("--seed must be >= 0 and < 2**63")


def generate_ids(
    model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    num_samples: int = 1, use_cache: bool = True, with_probs: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next ids (num_samples,) one step at a time; with_probs also yields each
    step's probability distribution (num_samples, V) as (ids, probs). The model runs in
    eval mode meanwhile and returns to its mode when the generation ends or is closed.
    Arguments out of range (see check_sampling) raise ConfigError when iteration starts."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed, num_samples)
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh random seed for this generator alone: the global RNG is not touched
    else:
        generator.manual_seed(seed)
    def choose(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        return sample_next(logits, temperature, top_k, top_p, generator)

    # batch-1 steps may read per-core weight copies, dropped at the end
    with eval_mode(model), speed.decoding(model):
        for next_ids, next_logits in _steps(model, prompt, max_new_tokens, num_samples, use_cache, choose):
            yield (next_ids, next_logits.float().softmax(dim=-1)) if with_probs else next_ids


_generating: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [open generations, mode]


@contextlib.contextmanager
def eval_mode(model: GPT):
    """Eval mode while any generation on the model is open; the mode the model had before
    the first one opened comes back when the last one closes (generations may interleave)."""
    depth, mode = _generating.get(model, (0, model.training))
    _generating[model] = (depth + 1, mode)
    model.eval()
    try:
        yield
    finally:
        depth, mode = _generating[model]
        if depth == 1:
            del _generating[model]
            model.train(mode)
        else:
            _generating[model] = (depth - 1, mode)


def window_start(config: ModelConfig, length: int, start: int) -> tuple[int, bool]:
    """Where the context that predicts token `length` starts, given where the previous one
    started (this module's window rule), and whether it moved in a way a cache cannot follow
    (learned positions when the context is full: every position shifts, so prefill again)."""
    block = config.block_size
    if config.positions == "rope":
        return max(0, length - (config.n_layer * (block - 1) + 1)), False  # the characters a prediction depends on
    if length - start > block:  # learned: the context is full, keep its last half
        return length - max(1, block // 2), True
    return start, False


def first_start(config: ModelConfig, prompt_length: int) -> int:
    """Where the context starts for the first prediction after a prompt of this many tokens."""
    if config.positions == "rope":
        return window_start(config, prompt_length, 0)[0]
    return max(0, prompt_length - config.block_size)


@torch.inference_mode()
def _steps(model: GPT, prompt: list[int], max_new_tokens: int, num_samples: int, use_cache: bool, choose):
    """Each step's chosen ids (B,) and the logits (B, V) they were chosen from, following the
    context window rule of this module's docstring, with or without the cache."""
    config = model.config
    parameter = next(model.parameters())
    device = parameter.device
    rotary = config.positions == "rope"
    n = len(prompt)
    # every character of every sample: a step writes one column in place; the buffer
    # doubles when full (rarely: max_new_tokens may be far more than a caller reads)
    tokens = torch.empty((num_samples, n + min(max_new_tokens, BUFFER_STEPS)), dtype=torch.long, device=device)
    tokens[:, :n] = torch.tensor(prompt, dtype=torch.long, device=device)
    cache = KVCache(config, num_samples, device, parameter.dtype) if use_cache else None
    start = first_start(config, n)  # the context is tokens[:, start:length]
    prefilled = False
    for length in range(n, n + max_new_tokens):
        start, moved = window_start(config, length, start)
        prefilled = prefilled and not moved
        # rotary positions are absolute (only distances matter); learned ones count from start
        offset = 0 if rotary else start
        if cache is None:
            logits, _ = model(tokens[:, start:length], start=start - offset, last_only=True)
        elif not prefilled:
            cache.reset(start - offset)
            logits, _ = model(tokens[:, start:length], start=start - offset, cache=cache, last_only=True)
            prefilled = True
        else:  # decode: only the newest character goes through the model
            logits, _ = model(tokens[:, length - 1:length], start=length - 1 - offset, cache=cache)
        next_logits = logits[:, -1, :]  # (B, V)
        next_ids = choose(next_logits)  # (B,)
        if length == tokens.size(1):
            tokens = torch.cat([tokens, torch.empty_like(tokens)], dim=1)
        tokens[:, length] = next_ids
        yield next_ids, next_logits


def stream_text(
    model: GPT, tokenizer, prompt: str, max_new_tokens: int = 500, **options
) -> Iterator[list[str]]:
    """Yield the new text of every sample, step by step: one token's text per step, except
    that a token ending inside a multi-byte character (BPE) yields "" and its bytes come with
    the token that completes the character; a last step may yield what is left over.
    max_new_tokens counts tokens. Unknown prompt characters (char tokenizer) raise
    UnknownCharacterError; an empty prompt starts from a newline (or the first symbol of a
    character vocabulary that has none)."""
    ids = tokenizer.encode(prompt) if prompt else tokenizer.start_ids()
    streams = None
    for next_ids in generate_ids(model, ids, max_new_tokens, **options):
        if streams is None:
            streams = [tokenizer.stream() for _ in range(len(next_ids))]
        yield [stream.feed(i) for stream, i in zip(streams, next_ids.tolist(), strict=True)]
    rest = [stream.flush() for stream in streams or []]
    if any(rest):
        yield rest


def generate_text(model: GPT, tokenizer, prompt: str = "", max_new_tokens: int = 500, **options) -> str:
    """The prompt followed by the text of max_new_tokens generated tokens (the first sample)."""
    return prompt + "".join(step[0] for step in stream_text(model, tokenizer, prompt, max_new_tokens, **options))
