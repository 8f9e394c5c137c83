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
product), so in float32 their probabilities differ by about 1e-8. A character can only
differ when the random draw lands that close to the edge between two characters, which
the tests (5x past block_size, both position options, sampled and greedy) never see.

A decode step reads every weight once for one character, so on a CPU it is bound by
memory bandwidth, not arithmetic: model.Linear reads a re-laid-out copy of each weight
there, split across the cores, and the loop allocates next to nothing per step (the
token buffer and the cache are preallocated, the rotary angles precomputed) and runs
under inference_mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tinygpt.model import GPT, KVCache

BUFFER_STEPS = 4096  # new characters the token buffer has room for before it first doubles


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
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


@torch.inference_mode()
def generate_ids(
    model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    num_samples: int = 1, use_cache: bool = True, with_probs: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next ids (num_samples,) one step at a time; with_probs also yields each
    step's probability distribution (num_samples, V) as (ids, probs)."""
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    model.eval()
    config = model.config
    parameter = next(model.parameters())
    device = parameter.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    block = config.block_size
    rotary = config.positions == "rope"
    reach = config.n_layer * (block - 1) + 1  # characters a rotary prediction depends on
    n = len(prompt)
    # every character of every sample: a step writes one column in place; the buffer
    # doubles when full (rarely: max_new_tokens may be far more than a caller reads)
    tokens = torch.empty((num_samples, n + min(max_new_tokens, BUFFER_STEPS)), dtype=torch.long, device=device)
    tokens[:, :n] = torch.tensor(prompt, dtype=torch.long, device=device)
    cache = KVCache(config, num_samples, device, parameter.dtype) if use_cache else None
    start = max(0, n - (reach if rotary else block))  # the context is tokens[:, start:length]
    prefilled = False
    with model.decoding():  # batch-1 steps read per-core weight copies, dropped at the end
        for length in range(n, n + max_new_tokens):
            if rotary:
                start = max(0, length - reach)
            elif length - start > block:  # learned: the context is full, keep its last half
                start, prefilled = length - max(1, block // 2), False
            # rotary positions are absolute (only distances matter); learned ones count from start
            offset = 0 if rotary else start
            if cache is None:
                logits, _ = model(tokens[:, start:length], start=start - offset)
            elif not prefilled:
                cache.reset(start - offset)
                logits, _ = model(tokens[:, start:length], start=start - offset, cache=cache)
                prefilled = True
            else:  # decode: only the newest character goes through the model
                logits, _ = model(tokens[:, length - 1:length], start=length - 1 - offset, cache=cache)
            next_logits = logits[:, -1, :]  # (B, V)
            next_ids = sample_next(next_logits, temperature, top_k, top_p, generator)  # (B,)
            if length == tokens.size(1):
                tokens = torch.cat([tokens, torch.empty_like(tokens)], dim=1)
            tokens[:, length] = next_ids
            if with_probs:
                yield next_ids, next_logits.float().softmax(dim=-1)
            else:
                yield next_ids


def stream_text(
    model: GPT, tokenizer, prompt: str, max_new_tokens: int = 500, **options
) -> Iterator[list[str]]:
    """Yield the next character of every sample, step by step. Unknown prompt characters
    raise UnknownCharacterError; an empty prompt starts from a newline (or the first
    symbol of the vocabulary when it has no newline)."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.index.get("\n", 0)]
    for next_ids in generate_ids(model, ids, max_new_tokens, **options):
        yield [tokenizer.chars[i] for i in next_ids.tolist()]


def generate_text(model: GPT, tokenizer, prompt: str = "", max_new_tokens: int = 500, **options) -> str:
    """The prompt followed by max_new_tokens generated characters (the first sample)."""
    return prompt + "".join(step[0] for step in stream_text(model, tokenizer, prompt, max_new_tokens, **options))
