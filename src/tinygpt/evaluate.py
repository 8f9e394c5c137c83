"""Loss over a whole split: every character after the first is predicted exactly once.

The split is cut into consecutive windows of block_size characters; each window predicts
its own next characters, so a character's context is what precedes it in its window.
The result is reported as nats/char (the cross-entropy), bits/char (nats / ln 2) and
perplexity (e^nats).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.config import TinyGPTError
from tinygpt.data import gather_windows
from tinygpt.model import GPT


@dataclass
class EvalResult:
    loss: float  # nats per character
    bits_per_char: float
    perplexity: float
    characters: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_tokens(
    model: GPT, tokens: np.ndarray, batch_size: int = 32, device: torch.device | str = "cpu",
    progress=None,
) -> EvalResult:
    block = model.config.block_size
    predicted = len(tokens) - 1
    if predicted < 1:
        raise TinyGPTError("the split has fewer than 2 characters: nothing to evaluate")
    if batch_size < 1:
        raise TinyGPTError(f"the evaluation batch size must be at least 1, got {batch_size}")
    model.eval()
    full_windows = predicted // block
    total = 0.0
    windows = np.arange(full_windows) * block
    for first in range(0, full_windows, batch_size):
        starts = windows[first:first + batch_size]
        window = gather_windows(tokens, starts, block + 1).to(device)  # (B, T+1)
        logits, _ = model(window[:, :-1])
        total += F.cross_entropy(
            logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum"
        ).item()
        if progress is not None:
            progress(len(starts) * block)
    tail = predicted - full_windows * block  # the last, shorter window
    if tail:
        window = torch.from_numpy(np.asarray(tokens[full_windows * block:]).astype(np.int64)).to(device)[None]
        logits, _ = model(window[:, :-1])
        total += F.cross_entropy(logits.float()[0], window[0, 1:], reduction="sum").item()
        if progress is not None:
            progress(tail)
    loss = total / predicted
    return EvalResult(loss, loss / math.log(2), math.exp(loss), predicted)
