"""Sampling: temperature, top-k, top-p, seeded, streamed, with or without the KV cache.

Generating past block_size needs a rule for the context window, and the cached and
uncached paths follow the same one, so they print the same text:

* learned positions: every position shifts when the window slides, so cached keys would
  be stale. Rule: the context is at most block_size characters; when it is full, keep its
  last half and go on. The cache starts over at that moment (one prefill of block_size/2
  characters), and decoding continues one character at a time.
* rotary positions: attention depends on the distance between positions only, so the
  window slides one character per step and every layer attends to the block_size most
  recent positions. The cache rolls (the oldest key is overwritten). The uncached path
  recomputes the same thing from scratch: the last n_layer * (block_size - 1) + 1
  characters (everything the next prediction can see through the layers), with the same
  sliding-window mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tinygpt.model import GPT, KVCache


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next id for each row of logits (B, V); temperature 0 is greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the ones before it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def _learned_window_start(length: int, start: int, block_size: int) -> int:
    """Where the context starts once it holds `length` characters (learned positions)."""
    if length - start > block_size:
        return length - max(1, block_size // 2)
    return start


@torch.no_grad()
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
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    tokens = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (B, n)
    block = config.block_size
    rotary = config.positions == "rope"
    reach = config.n_layer * (block - 1) + 1  # how far back a prediction can see (rotary)
    cache = KVCache(config, num_samples, device, next(model.parameters()).dtype) if use_cache else None
    start = max(0, tokens.size(1) - (reach if rotary else block))
    cached_upto = None  # the length of `tokens` the cache has seen, or None: prefill next
    for _ in range(max_new_tokens):
        length = tokens.size(1)
        if rotary:
            start = max(0, length - reach)
        else:
            new_start = _learned_window_start(length, start, block)
            if new_start != start:
                start, cached_upto = new_start, None  # positions shifted: the cache starts over
        if cache is None:
            logits, _ = model(tokens[:, start:], start=start if rotary else 0)
        elif cached_upto is None:  # prefill the whole context
            logits, _ = model(tokens[:, start:], start=start if rotary else 0, cache=cache)
        else:  # decode: only the newest character goes through the model
            position = length - 1 if rotary else length - 1 - start
            logits, _ = model(tokens[:, -1:], start=position, cache=cache)
        cached_upto = length
        next_logits = logits[:, -1, :]  # (B, V)
        next_ids = sample_next(next_logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
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
