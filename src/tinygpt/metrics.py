"""A run's metrics: one JSON line per evaluation in `metrics.jsonl`, and the loss plot."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def append_row(metrics_path: Path, row: dict) -> None:
    """Append one evaluation's row; on disk before the checkpoint that counts its bytes."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def bits(loss: float, sizes: tuple[int, int, int] | None, per: str) -> float:
    """A loss in nats per token as bits per "char" or per "byte", with a split's (tokens,
    characters, bytes); without sizes, one token is taken as one character and one byte."""
    if not sizes:
        return loss / math.log(2)
    tokens, characters, size = sizes
    return loss * tokens / max(1, characters if per == "char" else size) / math.log(2)


def evaluation_row(iteration: int, train_loss: float, val_loss: float, lr: float, tokens_seen: int,
                   text_sizes: dict[str, tuple[int, int, int]] | None = None) -> dict:
    """One evaluation: the losses per token (train_loss, val_loss, in nats) and the validation
    loss in bits per character and per byte, which compare across tokenizers."""
    val_sizes = (text_sizes or {}).get("val")
    return {"iteration": iteration, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
            "val_bits_per_char": round(bits(val_loss, val_sizes, "char"), 6),
            "val_bits_per_byte": round(bits(val_loss, val_sizes, "byte"), 6),
            "train_bits_per_byte": round(bits(train_loss, (text_sizes or {}).get("train"), "byte"), 6),
            "lr": lr, "tokens_seen": tokens_seen}


def read_rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path, text_sizes: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Train and validation loss in bits per byte (comparable across tokenizers), from each
    row's loss per token and the splits' sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_path)
    if not rows:
        return
    iterations = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = text_sizes or {}
    ax.plot(iterations, [bits(r["train_loss"], sizes.get("train"), "byte") for r in rows], label="train")
    ax.plot(iterations, [bits(r["val_loss"], sizes.get("val"), "byte") for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (bits/byte)")
    last = rows[-1]
    ax.set_title(f"val {bits(last['val_loss'], sizes.get('val'), 'byte'):.3f} bits/byte, "
                 f"{bits(last['val_loss'], sizes.get('val'), 'char'):.3f} bits/char at iteration {iterations[-1]}")
    save_plot(fig, ax, png_path)


def save_plot(fig, ax, png_path: Path, legend_fontsize: str = "medium") -> None:
    """Finish a figure of one axes as every tinyGPT plot is (a light grid, a legend, a tight
    layout), write it as a PNG atomically (a temporary file renamed over `png_path`), close it."""
    import matplotlib.pyplot as plt

    try:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".tmp")
        try:
            with open(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=100)
            os.replace(tmp, png_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
