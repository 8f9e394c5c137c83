"""Log-probabilities of tokens: a prompt's, scored by the model, and a generation's, step by step.

What `/v1/completions` returns for `logprobs` (and `echo`) comes from here, as plain tensors;
serve.py shapes them into OpenAI's lists. Both are the model's own distribution: the softmax of
its logits at temperature 1, before any temperature, top-k or top-p of the sampler, so that a
text's logprobs do not depend on how it was sampled, and a generated text scored again as a
prompt gets the same numbers (while it fits in one block_size window).

A prompt is scored with `tinygpt eval`'s default window rule (evaluate.py): consecutive windows
of block_size tokens, each predicting its own next tokens, so token i (i >= 1) is predicted from
the tokens from block_size * ((i - 1) // block_size) up to i - 1. Its summed loss is therefore
exactly what `tinygpt eval` sums over the same tokens; the first token has no prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from tinygpt.data import gather_windows
from tinygpt.model import GPT

WINDOWS_PER_BATCH = 32  # full windows scored in one forward pass, as evaluate_tokens batches them


def _top(logprobs: torch.Tensor, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each row's logprob of its id (B,), the top ids (B, k) and their logprobs (B, k)) from logprobs (B, V)."""
    chosen = logprobs.gather(-1, ids[:, None])[:, 0]  # (B,)
    best = logprobs.topk(min(top, logprobs.size(-1)), dim=-1)
    return chosen, best.indices, best.values


@torch.inference_mode()
def prompt_logprobs(model: GPT, ids: list[int], top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logprob of every token of ids after the first (P,), with P = len(ids) - 1, and the
    `top` most likely tokens at each of those positions: ids (P, top) and logprobs (P, top);
    windows as in this module's docstring. Runs on the caller's thread (the engine's model thread)."""
    block = model.config.block_size
    device = next(model.parameters()).device
    tokens = np.asarray(ids, dtype=np.int64)
    predicted = len(tokens) - 1
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    full = np.arange(0, predicted - block + 1, block)  # starts of the full windows (block + 1 tokens each)
    for first in range(0, len(full), WINDOWS_PER_BATCH):
        window = gather_windows(tokens, full[first:first + WINDOWS_PER_BATCH], block + 1).to(device)  # (B, T+1)
        parts.append(_window_logprobs(model, window, top))
    covered = int(full[-1]) + block if len(full) else 0
    if covered < predicted:  # the rest: one shorter window, as evaluate's last one
        window = torch.as_tensor(tokens[covered:], device=device)[None]  # (1, T'+1)
        parts.append(_window_logprobs(model, window, top))
    if not parts:
        k = min(top, model.config.vocab_size)
        return torch.empty(0), torch.empty((0, k), dtype=torch.long), torch.empty((0, k))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


def _window_logprobs(model: GPT, window: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, _ = model(window[:, :-1])  # (B, T, V)
    logprobs = logits.float().log_softmax(dim=-1).flatten(0, 1)  # (B*T, V)
    chosen, best_ids, best = _top(logprobs, window[:, 1:].flatten(), top)
    return chosen.cpu(), best_ids.cpu(), best.cpu()


def step_logprobs(ids: torch.Tensor, probs: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One generated step's logprobs: each row's chosen id (B,), and its `top` most likely ids
    (B, top) with their logprobs, from the step's probabilities (B, V) (the engine hands out
    the model's softmax, not its logits). A probability that underflowed to 0 counts as the
    smallest positive float, so that every logprob is a finite number (JSON has no -Infinity)."""
    logprobs = probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()  # (B, V)
    chosen, best_ids, best = _top(logprobs, ids.to(probs.device), top)
    return chosen.cpu(), best_ids.cpu(), best.cpu()
