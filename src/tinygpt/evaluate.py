"""Loss over a whole split: every token after the first is predicted exactly once.

By default the split is cut into consecutive windows of block_size tokens; each window
predicts its own next tokens, so a token's context is what precedes it in its window: 1 to
block_size tokens, about block_size / 2 on average, as when training batches are scored.
With a stride below block_size the windows overlap: each starts `stride` tokens after the
previous one and scores only its last `stride` predictions, so every token after the first
window is predicted from at least block_size - stride + 1 tokens (stride 1: from a full
window), at block_size / stride times the cost.

The summed loss (nats) is reported three ways: per token (the cross-entropy, and the
perplexity e^loss), and in bits per character and bits per byte: the same total divided by
the characters, or the UTF-8 bytes, of the predicted tokens' text, over ln 2. With the
character tokenizer a token is a character, so bits per byte = bits per char x characters /
bytes exactly; bits per byte compares runs of any tokenizer on the same text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.config import TinyGPTError
from tinygpt.data import gather_windows, text_sizes
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer


@dataclass
class EvalResult:
    loss: float  # nats per token
    bits_per_char: float
    bits_per_byte: float
    perplexity: float  # per token
    tokens: int  # predictions scored: every token after the first
    characters: int  # characters of their text
    bytes: int  # UTF-8 bytes of their text
    stride: int  # tokens between window starts (block_size: consecutive windows)

    def as_dict(self) -> dict:
        return asdict(self)


def window_losses(model: GPT, tokens: np.ndarray, starts: np.ndarray, length: int,
                  device: torch.device | str) -> torch.Tensor:
    """The loss of each of the `length` predictions of the windows starting at `starts`: (B, length)."""
    window = gather_windows(tokens, starts, length + 1).to(device)  # (B, T+1)
    logits, _ = model(window[:, :-1])
    return F.cross_entropy(logits.float().transpose(1, 2), window[:, 1:], reduction="none")  # (B, T)


@torch.no_grad()
def evaluate_tokens(
    model: GPT, tokens: np.ndarray, batch_size: int = 32, device: torch.device | str = "cpu",
    progress=None, stride: int | None = None, tokenizer: Tokenizer | None = None,
) -> EvalResult:
    """The loss over every prediction in `tokens` (see the module docstring). Without a
    tokenizer each token counts as one character of one byte."""
    stride = model.config.block_size if stride is None else stride
    predicted = len(tokens) - 1
    total = split_nats(model, tokens, batch_size, device, progress, stride)
    characters, size = text_sizes(tokens[1:], tokenizer) if tokenizer is not None else (predicted, predicted)
    loss = total / predicted
    return EvalResult(loss, total / characters / math.log(2), total / size / math.log(2), math.exp(loss),
                      predicted, characters, size, stride)


@torch.no_grad()
def split_nats(
    model: GPT, tokens: np.ndarray, batch_size: int = 32, device: torch.device | str = "cpu",
    progress=None, stride: int | None = None, shard: tuple[int, int] = (0, 1),
) -> float:
    """The summed loss (nats) of every prediction in `tokens`; with shard=(rank, shards),
    only that shard's share of the windows, so the shards' sums add up to the whole
    (several processes split one evaluation this way). The model is in eval mode meanwhile."""
    block = model.config.block_size
    stride = block if stride is None else stride
    predicted = len(tokens) - 1
    if predicted < 1:
        raise TinyGPTError("the split has fewer than 2 tokens: nothing to evaluate")
    if batch_size < 1:
        raise TinyGPTError(f"the evaluation batch size must be at least 1, got {batch_size}")
    if not 1 <= stride <= block:
        raise TinyGPTError(f"the stride must be between 1 and the block size ({block}), got {stride}")
    rank, shards = shard
    was_training = model.training
    model.eval()
    skip = block - stride  # a window's first predictions, already made by the one before
    total = 0.0
    windows = np.arange(0, predicted - block + 1, stride)  # full windows' first characters
    mine = windows[rank::shards]
    for first in range(0, len(mine), batch_size):
        losses = window_losses(model, tokens, mine[first:first + batch_size], block, device)  # (B, T)
        scored = losses[:, skip:]
        total += scored.sum().item()
        opens_split = rank == 0 and first == 0  # the split's first window scores all it predicts
        if opens_split:
            total += losses[0, :skip].sum().item()
        if progress is not None:
            progress(scored.numel() + (skip if opens_split else 0))
    covered = int(windows[-1]) + block if len(windows) else 0  # predictions the full windows make
    if covered < predicted and rank == shards - 1:  # the rest, fewer than stride: a last, shorter window
        start = max(0, covered - skip)
        losses = window_losses(model, tokens, np.array([start]), predicted - start, device)  # (1, T')
        total += losses[0, covered - start:].sum().item()
        if progress is not None:
            progress(predicted - covered)
    model.train(was_training)
    return total
