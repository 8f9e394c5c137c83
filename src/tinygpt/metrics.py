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


def evaluation_row(iteration: int, train_loss: float, val_loss: float, lr: float, tokens_seen: int) -> dict:
    return {"iteration": iteration, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
            "val_bits_per_char": round(val_loss / math.log(2), 6), "lr": lr, "tokens_seen": tokens_seen}


def read_rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_path)
    if not rows:
        return
    iterations = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(iterations, [r["train_loss"] for r in rows], label="train")
    ax.plot(iterations, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(f"val {rows[-1]['val_bits_per_char']:.3f} bits/char at iteration {iterations[-1]}")
    ax.grid(alpha=0.3)
    ax.legend()
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
