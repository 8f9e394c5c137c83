"""`tinygpt bench`: how fast this device trains, generates and prepares, measured here and now.

Every figure is the median of several repetitions after a warm-up:

* training tokens/s: forward + backward + optimizer step, as `train` does it, at a preset's
  (or a run's) batch and block size, on random tokens;
* achieved model FLOP/s = tokens/s x FLOPs per token, with FLOPs per token = 6N + 12 L C T
  (N the matmul weights, L layers, C n_embd, T block_size), and that as a fraction of the
  device's matmul ceiling, measured by one large fp32 and one large bf16 matrix multiply;
* generation tokens/s at batch 1 for 1,000 new characters, with and without the KV cache;
* preparation MB/s on a generated, mostly ASCII corpus.

The machine may be shared: compare figures measured in the same run, not across runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinygpt import speed
from tinygpt.config import ConfigError, ModelConfig, TrainConfig, get_preset, train_config_from_dict
from tinygpt.hardware import Precision, configure_backends, cpu_description, measure_matmul
from tinygpt.model import GPT

FLOP_FORMULA = "FLOPs/token = 6N + 12*L*C*T (N matmul weights, L layers, C n_embd, T block_size)"
BENCH_VOCAB_SIZE = 84  # presets have no vocabulary of their own; the seed configuration is measured at 84


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(work: float, run: Callable[[], None], repeats: int, warmup: int,
                device: torch.device) -> tuple[float, list[float]]:
    """Median of `repeats` timings of run() as work per second, after `warmup` untimed runs."""
    for _ in range(warmup):
        run()
    synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        rates.append(work / (time.perf_counter() - start))
    return statistics.median(rates), rates


def matmul_ceilings(device: torch.device, size: int | None = None,
                    repeats: int = 5) -> tuple[dict[str, float], dict[str, int]]:
    """FLOP/s of one large fp32 and one large bf16 matmul: what this device can do at best; and the
    side each had (smaller than asked where it would have taken over a second: hardware.measure_matmul)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    measured = {name: measure_matmul(dtype, size, repeats, device)
                for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    return {name: rate for name, (rate, _) in measured.items()}, {name: side for name, (_, side) in measured.items()}


class FixedBatch:
    """A batch sampler that hands out one random batch of ids again and again."""

    def __init__(self, vocab_size: int, block_size: int):
        self.vocab_size, self.block_size = vocab_size, block_size
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def next(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch is None or self.batch[0].size(0) != batch_size:
            generator = torch.Generator().manual_seed(0)
            shape = (batch_size, self.block_size)
            self.batch = tuple(torch.randint(0, self.vocab_size, shape, generator=generator).to(device)
                               for _ in range(2))
        return self.batch


def training_step(model: GPT, train_config: TrainConfig, precision: Precision, device: torch.device,
                  batch_size: int, step_model: torch.nn.Module | None = None) -> Callable[[], None]:
    """One iteration of `tinygpt train` (train.train_step: gradient accumulation, clipping,
    the learning-rate update, the optimizer step) on a fixed random batch."""
    from tinygpt.distributed import Distributed
    from tinygpt.optim import build_optimizers
    from tinygpt.train import train_step
    from tinygpt.training_state import TrainingState, weight_average

    config = dataclasses.replace(train_config, batch_size=batch_size)
    if batch_size % config.grad_accum:
        config = dataclasses.replace(config, grad_accum=1)
    state = TrainingState(model, build_optimizers(model, config, device),
                          FixedBatch(model.config.vocab_size, model.config.block_size),
                          average=weight_average(model, config.ema, config.ema_horizon))
    step_model = model if step_model is None else step_model
    world = Distributed()

    def step() -> None:
        train_step(step_model, model, state, config, precision, device, world, config.learning_rate)

    return step


@dataclass
class TrainingFigures:
    batch_size: int
    block_size: int
    tokens_per_second: float
    tokens_per_second_runs: list[float]
    flops_per_token: int
    matmul_parameters: int
    achieved_flops: float
    fraction_of_float32_ceiling: float
    fraction_of_bfloat16_ceiling: float
    fraction_of_used_precision_ceiling: float
    compiled: bool
    speed_paths: list[str]


def measure_training(model_config: ModelConfig, train_config: TrainConfig, device: torch.device,
                     plan: speed.SpeedPlan, ceilings: dict[str, float], batch_size: int | None = None,
                     repeats: int = 5, warmup: int = 2, compile: bool = False) -> TrainingFigures:
    batch_size = batch_size or train_config.batch_size
    precision = plan.precision
    torch.manual_seed(0)
    model = speed.apply(GPT(model_config).to(device).train(), plan)
    step_model = torch.compile(model) if compile else model
    step = training_step(model, train_config, precision, device, batch_size, step_model)
    tokens = batch_size * model_config.block_size
    rate, runs = median_rate(tokens, step, repeats, warmup, device)
    flops_per_token = model.flops_per_token()
    achieved = rate * flops_per_token
    used = ceilings[precision.name]
    return TrainingFigures(
        batch_size, model_config.block_size, rate, runs, flops_per_token, model.matmul_parameters(), achieved,
        achieved / ceilings["float32"], achieved / ceilings["bfloat16"], achieved / used, compile,
        plan.describe()[1:],
    )


def measure_generation(model: GPT, new_tokens: int = 1000, use_cache: bool = True,
                       repeats: int = 3) -> tuple[float, list[float]]:
    """Tokens/s generating `new_tokens` characters at batch 1 from a one-character prompt."""
    from tinygpt.generate import generate_ids

    device = next(model.parameters()).device
    model.eval()

    def run(count: int = new_tokens) -> None:
        for _ in generate_ids(model, [0], count, temperature=1.0, seed=0, use_cache=use_cache):
            pass

    run(min(new_tokens, 50))  # warm-up: the first calls allocate and pick kernels
    return median_rate(new_tokens, run, repeats, 0, device)


def write_corpus(directory: Path, megabytes: float, seed: int = 0) -> Path:
    """A mostly-ASCII text of about `megabytes` MB: random words, lines and some accented
    letters and emoji (multi-byte UTF-8), like a web or book corpus."""
    rng = np.random.default_rng(seed)
    words = ("the and to of a I you my in that is not with me it for be his your this but he have as thou "
             "so him will what thy all her no by do shall if are we thee our on lord now king sir come good "
             "café naïve façade — “quoted” déjà-vu 🙂 Ωmega").split()
    path = directory / "corpus.txt"
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = rng.integers(0, len(words), 20000)
            lengths = rng.integers(6, 14, 2000)
            lines, position = [], 0
            for length in lengths:
                lines.append(" ".join(words[i] for i in picks[position:position + length]))
                position += length
            chunk = ".\n".join(lines) + ".\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return path


def measure_preparation(megabytes: float = 16.0, repeats: int = 3) -> tuple[float, list[float]]:
    """MB/s of `tinygpt.data.prepare` on a generated corpus (the text is made once, untimed)."""
    from tinygpt.data import prepare

    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        corpus = write_corpus(Path(tmp), megabytes)
        size_mb = corpus.stat().st_size / 1e6
        out = Path(tmp) / "prepared"
        return median_rate(size_mb, lambda: prepare([str(corpus)], out, progress=False), repeats, 1,
                           torch.device("cpu"))


@dataclass
class BenchResult:
    source: str
    device: str
    cpu: str
    threads: int
    precision: str
    precision_reason: str
    ceilings: dict[str, float]
    training: TrainingFigures
    generation: dict[str, float] = field(default_factory=dict)
    preparation_mb_per_second: float | None = None
    flop_formula: str = FLOP_FORMULA
    omp_wait_policy: str | None = None  # what the command chose, and why (omp.py)
    ceiling_sides: dict[str, int] = field(default_factory=dict)  # each ceiling matmul's side

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def configs_for(preset: str | None, run_dir: str | None) -> tuple[ModelConfig, TrainConfig, str, Path | None]:
    """The model and training configs to measure: a run's, else a preset's (vocabulary 84)."""
    if run_dir is not None:
        from tinygpt.checkpoint import best_or_last, read_record
        from tinygpt.config import model_config_from_dict

        record = read_record(run_dir, best_or_last(run_dir))
        # what was fastest where the run trained says nothing about this device: decide afresh
        train_config = dataclasses.replace(train_config_from_dict(record["train_config"]),
                                           **dict.fromkeys(speed.SPEED_KEYS, "auto"))
        return model_config_from_dict(record["model_config"]), train_config, f"run {run_dir}", Path(run_dir)
    model_config, train_config = get_preset(preset or "cpu")
    model_config.vocab_size = BENCH_VOCAB_SIZE
    return model_config, train_config, f"preset {preset or 'cpu'} (vocabulary {BENCH_VOCAB_SIZE})", None


def run_bench(preset: str | None = None, run_dir: str | None = None, device: str = "auto",
              batch_size: int | None = None, repeats: int = 5, warmup: int = 2, compile: bool = False,
              generation_tokens: int = 1000, generation_repeats: int = 3, prepare_megabytes: float = 16.0,
              threads: int | None = None, dtype: str = "auto", matmul_size: int | None = None,
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure everything `tinygpt bench` prints, for a preset (default `cpu`) or a run."""
    if preset is not None and run_dir is not None:
        raise ConfigError("bench takes a --preset or a RUN_DIR, not both")
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if min(repeats, generation_repeats, generation_tokens) <= 0 or warmup < 0 or not prepare_megabytes > 0:
        raise ConfigError("repetitions, generated tokens and corpus size must be positive (warm-up >= 0)")
    if matmul_size is not None and matmul_size <= 0:
        raise ConfigError(f"--matmul-size must be positive, got {matmul_size}")
    if threads is not None and threads <= 0:
        raise ConfigError(f"--threads must be positive, got {threads}")
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run_bench(preset, run_dir, device, batch_size, repeats, warmup, compile, generation_tokens,
                          generation_repeats, prepare_megabytes, dtype, matmul_size, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(preset, run_dir, device, batch_size, repeats, warmup, compile, generation_tokens,
               generation_repeats, prepare_megabytes, dtype, matmul_size, progress) -> BenchResult:
    from tinygpt.hardware import resolve_device

    say = progress or (lambda message: None)
    device_ = resolve_device(device)
    configure_backends(device_)
    model_config, train_config, source, checkpoint_dir = configs_for(preset, run_dir)
    plan = speed.plan(device_, dataclasses.replace(train_config, dtype=dtype), model_config.dropout)
    precision = plan.precision

    say("matmul ceilings")
    ceilings, sides = matmul_ceilings(device_, matmul_size)
    say(f"training ({precision.name}{', compiled' if compile else ''})")
    training = measure_training(model_config, train_config, device_, plan, ceilings, batch_size,
                                repeats, warmup, compile)

    if checkpoint_dir is not None:
        from tinygpt.checkpoint import load_model

        model, _ = load_model(checkpoint_dir, device=device_)
    else:
        torch.manual_seed(0)
        model = GPT(model_config).to(device_)
    speed.apply(model, plan)  # the decode path this device's plan chose
    generation = {}
    for use_cache in (True, False):
        label = "cached" if use_cache else "uncached"
        say(f"generation, {label}")
        rate, _ = measure_generation(model, generation_tokens, use_cache, generation_repeats)
        generation[f"{label}_tokens_per_second"] = rate
    generation["cache_speedup"] = generation["cached_tokens_per_second"] / generation["uncached_tokens_per_second"]
    generation["new_tokens"] = generation_tokens

    say("preparation")
    preparation, _ = measure_preparation(prepare_megabytes, generation_repeats)
    return BenchResult(source, str(device_), cpu_description() if device_.type == "cpu" else _device_name(device_),
                       torch.get_num_threads(), precision.name, precision.reason, ceilings, training, generation,
                       preparation, ceiling_sides=sides)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _side(result: BenchResult, name: str) -> str:
    side = result.ceiling_sides.get(name)
    return f" ({side:,}^3)" if side else ""


def format_table(result: BenchResult) -> str:
    t, g = result.training, result.generation
    g_flops = 1e9
    threads_matter = result.device == "cpu"
    rows = [
        ("source", result.source),
        ("device", f"{result.device}: {result.cpu}" + (f", {result.threads} threads" if threads_matter else "")),
        ("precision", result.precision_reason),
        *((("OpenMP waits", result.omp_wait_policy),) if result.omp_wait_policy else ()),
        *((f"matmul ceiling {short}", f"{result.ceilings[name] / g_flops:,.0f} GFLOP/s{_side(result, name)}")
          for short, name in (("fp32", "float32"), ("bf16", "bfloat16"))),
        ("training", f"batch {t.batch_size} x block {t.block_size}{', compiled' if t.compiled else ''}"),
        *((f"  {line.split(':', 1)[0]}", line.split(":", 1)[1].strip()) for line in t.speed_paths),
        ("  tokens/s", f"{t.tokens_per_second:,.0f} (median; runs "
                       f"{min(t.tokens_per_second_runs):,.0f}..{max(t.tokens_per_second_runs):,.0f})"),
        ("  FLOPs/token", f"{t.flops_per_token:,} = 6 x {t.matmul_parameters:,} + 12 x L x C x T"),
        ("  achieved", f"{t.achieved_flops / g_flops:,.1f} GFLOP/s = {t.fraction_of_used_precision_ceiling:.0%} "
                       f"of the {result.precision} ceiling ({t.fraction_of_float32_ceiling:.0%} of fp32, "
                       f"{t.fraction_of_bfloat16_ceiling:.0%} of bf16)"),
        (f"generation ({g['new_tokens']:,} new, batch 1)", ""),
        ("  with KV cache", f"{g['cached_tokens_per_second']:,.0f} tokens/s"),
        ("  without cache", f"{g['uncached_tokens_per_second']:,.0f} tokens/s"),
        ("  cache speed-up", f"{g['cache_speedup']:.1f}x"),
        ("preparation", f"{result.preparation_mb_per_second:,.0f} MB/s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}".rstrip() for name, value in rows]
    lines.append(result.flop_formula)
    return "\n".join(lines)
