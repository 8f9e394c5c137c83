"""Experiments on one machine, no tracking service: compare finished runs, find a learning rate.

    compare_runs(): each run's record and metrics.jsonl -> the config keys that differ, speed,
                    best validation score, and one PNG of every run's curves (bits per byte)
    lr_find():      the learning-rate range test: a fresh model, the LR raised exponentially
                    every step (train.train_step), the loss smoothed, a suggested LR

Fine-tuning from a run (`train --init-from`) lives in train.start_run: it is a way to start a run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tinygpt.checkpoint import best_or_last, build_model, read_record
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.errors import CheckpointError, ConfigError
from tinygpt.metrics import read_rows, save_plot
from tinygpt.rundir import holds_run

X_AXES = ("iterations", "tokens", "seconds")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the loss's exponential moving average: weight of the past. Its lag is about
# SMOOTHING / (1 - SMOOTHING) = 9 steps: a fifth of a decade of LR at 200 steps over 6 decades
SMOOTHING = 0.9
DIVERGED = 4.0  # the range test stops once the smoothed loss exceeds this multiple of its minimum
SUGGESTION_RULE = ("steepest descent: the LR where the smoothed loss falls fastest per log-step of LR, "
                   "before its minimum")


# ----------------------------------------------------------------------------- compare


@dataclass
class RunSummary:
    """What compare reads of one run."""

    run_dir: Path
    model_config: dict
    train_config: dict
    tokenizer: dict
    parameters: int
    iterations: int
    wall_time: float  # seconds of training, every session of a resumed run included
    tokens_seen: int
    best_val_bits_per_char: float | None
    best_val_bits_per_byte: float | None
    rows: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_seen / self.wall_time if self.wall_time > 0 else None

    def split_fingerprint(self) -> tuple[float, float] | None:
        """(characters per byte, tokens per character) of the validation split, from the ratios
        of one metrics row's scores: equal for runs on the same data and tokenizer."""
        for row in self.rows:
            per_char, per_byte, nats = row.get("val_bits_per_char"), row.get("val_bits_per_byte"), row.get("val_loss")
            if per_char and per_byte and nats:
                return per_byte / per_char, per_char * math.log(2) / nats
        return None


def summarize_run(run_dir: str | Path) -> RunSummary:
    """One run's configs, size, speed and best validation score; one line if it is no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not holds_run(run_dir):
        raise CheckpointError(f"{str(run_dir)!r} is not a tinyGPT run (no config.json, last.json or best.json of one)")
    record = read_record(run_dir, "last" if (run_dir / "last.json").is_file() else best_or_last(run_dir))
    shapes, _, _ = build_model(record, allocate=False)
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_rows(metrics_path) if metrics_path.is_file() else []
    train_config = record.get("train_config") or {}
    tokens_seen = rows[-1]["tokens_seen"] if rows else (
        record["iteration"] * train_config.get("batch_size", 0) * record["model_config"]["block_size"])
    best = {}
    for unit in ("char", "byte"):
        scores = [r[f"val_bits_per_{unit}"] for r in rows if f"val_bits_per_{unit}" in r]
        best[unit] = min(scores) if scores else None
    return RunSummary(run_dir, dict(record["model_config"]), dict(train_config), record["tokenizer"],
                      shapes.num_parameters(), record["iteration"], float(record.get("elapsed", 0.0)), tokens_seen,
                      best["char"], best["byte"], rows)


@dataclass
class Comparison:
    runs: list[RunSummary]
    differing: dict[str, list]  # config key -> each run's value, for the keys whose values differ
    unit: str  # "bits_per_char", or "bits_per_byte" when the runs' tokenizers differ
    warnings: list[str]
    png: Path

    def as_dict(self) -> dict:
        return {"unit": self.unit, "png": str(self.png), "warnings": self.warnings,
                "differing_keys": self.differing,
                "runs": [{"run": str(s.run_dir), "config": {k: v[i] for k, v in self.differing.items()},
                          "parameters": s.parameters, "tokens_per_second": s.tokens_per_second,
                          "iterations": s.iterations, "wall_time_seconds": s.wall_time,
                          f"best_val_{self.unit}": getattr(s, f"best_val_{self.unit}")}
                         for i, s in enumerate(self.runs)]}

    def table(self) -> str:
        """A plain-text table: one row per run, a column per differing key."""
        header = ["run", *self.differing, "parameters", "tokens/s", "iterations", "wall time",
                  f"best val {self.unit.replace('_per_', '/')}"]
        lines = [header]
        for i, s in enumerate(self.runs):
            best = getattr(s, f"best_val_{self.unit}")
            lines.append([str(s.run_dir), *(str(v[i]) for v in self.differing.values()), f"{s.parameters:,}",
                          "-" if s.tokens_per_second is None else f"{s.tokens_per_second:,.0f}",
                          f"{s.iterations:,}", f"{s.wall_time:.1f} s", "-" if best is None else f"{best:.4f}"])
        widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                         for line in lines)


def compare_runs(run_dirs: list[str | Path], out: str | Path = "compare.png", x: str = "iterations",
                 overwrite: bool = False) -> Comparison:
    """Summarize the runs, find the config keys that differ, and plot every run's curves."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}; got {x!r}")
    if not run_dirs:
        raise ConfigError("compare needs at least one RUN")
    out = Path(out)
    check_png_target(out, overwrite)
    runs = [summarize_run(r) for r in run_dirs]
    keys = list(dict.fromkeys(k for s in runs for k in (*s.model_config, *s.train_config)))
    differing = {}
    for key in keys:
        values = [s.model_config.get(key, s.train_config.get(key)) for s in runs]
        if any(v != values[0] for v in values):
            differing[key] = values
    same_tokenizer = all(s.tokenizer == runs[0].tokenizer for s in runs)
    fingerprints = [s.split_fingerprint() for s in runs]
    same_splits = None in fingerprints or all(
        math.isclose(a, b, rel_tol=1e-4) for f in fingerprints for a, b in zip(f, fingerprints[0], strict=True))
    warnings = []
    if not (same_tokenizer and same_splits):
        why = "their tokenizers differ" if not same_tokenizer else "their validation splits have different sizes"
        warnings.append(f"warning: these runs were trained on different data ({why}); "
                        f"compare their bits per byte, not their losses per token")
    unit = "bits_per_char" if same_tokenizer else "bits_per_byte"
    plot_comparison(runs, out, x)
    return Comparison(runs, differing, unit, warnings, out)


def check_png_target(out: Path, overwrite: bool = False) -> None:
    """A plot goes to a new file, or replaces a PNG when asked (overwrite), never anything else,
    never into a run."""
    if out.parent.is_dir() and holds_run(out.parent):
        raise ConfigError(f"--out {str(out)!r} is inside a tinyGPT run; write the plot somewhere else")
    if out.exists():
        try:
            with open(out, "rb") as f:
                is_png = out.is_file() and f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
        except OSError:
            is_png = False
        if not is_png:
            raise ConfigError(f"--out {str(out)!r} exists and is not a PNG; nothing was overwritten")
        if not overwrite:
            raise ConfigError(f"--out {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")


def _x_values(summary: RunSummary, x: str) -> list[float]:
    rows = summary.rows
    if x == "iterations":
        return [r["iteration"] for r in rows]
    if x == "tokens":
        return [r["tokens_seen"] for r in rows]
    # rows carry no time of their own (a resumed run's rows must match an uninterrupted one's
    # byte for byte): the run's wall time, spread evenly over its iterations
    per_iteration = summary.wall_time / max(1, summary.iterations)
    return [r["iteration"] * per_iteration for r in rows]


def plot_comparison(runs: list[RunSummary], out: Path, x: str) -> None:
    """Each run's validation curve (solid) and training curve (dashed, one colour per run),
    in bits per byte: the one unit comparable across tokenizers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, summary in enumerate(runs):
        colour = f"C{i % 10}"
        xs = _x_values(summary, x)
        for split, style in (("val", "-"), ("train", "--")):  # rows of older runs may lack a score
            points = [(x_, r[f"{split}_bits_per_byte"]) for x_, r in zip(xs, summary.rows, strict=True)
                      if f"{split}_bits_per_byte" in r]
            if split == "val" and not points and summary.rows:
                print(f"warning: {summary.run_dir}'s metrics predate bits per byte: it has no curve in the plot",
                      file=sys.stderr)
            if points:
                ax.plot(*zip(*points, strict=True), color=colour, linestyle=style, alpha=1 if split == "val" else 0.7,
                        label=f"{summary.run_dir} {split}")
    ax.set_xlabel({"iterations": "iteration", "tokens": "training tokens seen",
                   "seconds": "seconds of training (each run's wall time spread evenly over its iterations)"}[x])
    ax.set_ylabel("loss (bits per byte, comparable across tokenizers)")
    ax.set_title("validation (solid) and training (dashed) loss")
    save_plot(fig, ax, out, legend_fontsize="small")


# ----------------------------------------------------------------------------- lr-find


@dataclass
class LRFindResult:
    learning_rates: list[float]
    losses: list[float]  # each step's loss, nats per token
    smoothed: list[float]  # exponential moving average, bias-corrected
    suggested_lr: float
    rule: str
    stopped_early: bool
    png: Path


def check_lr_find_args(steps: int, min_lr: float, max_lr: float) -> None:
    if steps < 2:
        raise ConfigError(f"--steps must be at least 2, got {steps}")
    if not (0 < min_lr < max_lr and math.isfinite(max_lr)):
        raise ConfigError(f"--min-lr must be positive and below --max-lr (got {min_lr:g} and {max_lr:g})")


def lr_find(data_dir: str | Path, model_config: ModelConfig, train_config: TrainConfig, steps: int = 200,
            min_lr: float = 1e-6, max_lr: float = 1.0, out: str | Path = "lr_find.png", device: str = "auto",
            log=print, progress: bool = True, overwrite: bool = False) -> LRFindResult:
    """The learning-rate range test, from a fresh model: step i trains at
    min_lr * (max_lr / min_lr) ** (i / (steps - 1)); it stops early once the smoothed loss
    exceeds DIVERGED times its minimum. Writes only the PNG at `out`."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from tinygpt import speed
    from tinygpt.data import BatchSampler, load_tokenizer, load_tokens
    from tinygpt.distributed import Distributed
    from tinygpt.hardware import configure_backends, resolve_device
    from tinygpt.model import GPT
    from tinygpt.optim import build_optimizers
    from tinygpt.train import train_step
    from tinygpt.training_state import TrainingState

    check_lr_find_args(steps, min_lr, max_lr)
    out = Path(out)
    check_png_target(out, overwrite)
    device_ = resolve_device(device)
    model_config = dataclasses.replace(model_config, vocab_size=load_tokenizer(data_dir).vocab_size)
    model_config.validate()
    train_config.validate()
    tokens = load_tokens(data_dir, "train")
    if len(tokens) <= model_config.block_size + 1:
        raise ConfigError(f"block_size {model_config.block_size} is larger than the train split ({len(tokens)} tokens)")
    torch.manual_seed(train_config.seed)
    configure_backends(device_)
    plan = speed.plan(device_, train_config, model_config.dropout)
    for line in plan.describe():
        log(f"  {line}")
    model = speed.apply(GPT(model_config).to(device_), plan)
    state = TrainingState(model, build_optimizers(model, train_config, device_),
                          BatchSampler(tokens, model_config.block_size, train_config.seed))
    rates = min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))
    lrs, losses, smoothed, average, stopped = [], [], [], 0.0, False
    for i, lr in enumerate(tqdm(rates.tolist(), desc="lr-find", unit="step", disable=not progress, leave=False)):
        loss = train_step(model, model, state, train_config, plan.precision, device_, Distributed(), lr).item()
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        value = average / (1 - SMOOTHING ** (i + 1))  # bias correction: the average starts at 0
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(value)
        if not math.isfinite(value) or value > DIVERGED * min(smoothed):
            stopped = True
            break
    suggested = suggest_lr(lrs, smoothed)
    plot_lr_find(lrs, losses, smoothed, suggested, out)
    return LRFindResult(lrs, losses, smoothed, suggested, SUGGESTION_RULE, stopped, out)


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """SUGGESTION_RULE: the most negative slope of the smoothed loss against log(LR), among
    the steps up to its minimum (past the minimum the loss is diverging, not learning)."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    lowest = min(finite, key=lambda i: smoothed[i])
    last = max(1, lowest)
    slopes = [(smoothed[i + 1] - smoothed[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(last)
              if math.isfinite(smoothed[i + 1])]
    if not slopes:
        return lrs[0]
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggested: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses, color="C0", alpha=0.3, label="loss per step")
    ax.plot(lrs, smoothed, color="C0", label="smoothed (EMA, bias-corrected)")
    ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested {suggested:.2e} (steepest descent)")
    ax.set_xscale("log")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:  # from the lowest loss to where the test stops: the raw loss's spikes beyond are cut off
        lowest = min(v for v in losses + finite if math.isfinite(v))
        ax.set_ylim(lowest * 0.95, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title("learning-rate range test")
    save_plot(fig, ax, out, legend_fontsize="small")
