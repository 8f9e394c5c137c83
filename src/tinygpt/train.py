"""Training: start (or resume) a run, then the loop. Alone or under `torchrun` (DDP).

    train() -> start_run(): configs, data, speed plan, model, optimizers, TrainingState
            -> the loop:    train_step() per iteration, evaluate_and_save() every eval_interval

Everything the next iteration depends on is in `TrainingState` (training_state.py), which
the `last` checkpoint saves whole, and dropout masks are seeded from (seed, rank,
iteration), so `--resume` continues bit for bit, even after a SIGKILL, on the same hardware
and thread count. Under torchrun every rank draws the same global batch and keeps its slice
(data.BatchSampler), so 1 and N processes see the same data. `train_step` is also what
`tinygpt bench` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tinygpt import checkpoint, distributed, rundir, speed, training_state
from tinygpt.config import ModelConfig, TrainConfig, config_toml, model_config_from_dict, train_config_from_dict
from tinygpt.data import BatchSampler, load_tokenizer, load_tokens, split_sizes
from tinygpt.distributed import Distributed
from tinygpt.errors import CheckpointError, ConfigError, DataError, TinyGPTError, TrainingDiverged
from tinygpt.evaluate import split_nats
from tinygpt.hardware import Precision, configure_backends, cpu_has_native_bf16
from tinygpt.metrics import append_row, bits, evaluation_row, plot_losses
from tinygpt.model import GPT, CausalSelfAttention
from tinygpt.optim import build_optimizers, learning_rate_at, set_learning_rate
from tinygpt.tokenizer import Tokenizer
from tinygpt.training_state import TrainingState

__all__ = ["train", "train_step", "TrainResult", "TrainingDiverged", "build_optimizers", "learning_rate_at",
           "dropout_seed", "dropout_for_epochs", "RESUMABLE_KEYS"]

LOG_INTERVAL = 10  # iterations between progress-bar updates (the only host syncs)
# what may change when a run continues; anything else would make it a different run
RESUMABLE_KEYS = ("max_iters", "max_time", "eval_interval", "eval_iters", "compile", "processes")
# model options that only shape the initial weights: a resumed run has its weights already
INIT_ONLY_KEYS = ("scaled_residual_init",)
# auto_dropout's rule, from the runs in BENCHMARKS.md (issue 16, "Fifth round"): up to about ten
# passes over the training tokens the model's own dropout is best; beyond that, each pass adds
# AUTO_DROPOUT_PER_EPOCH, up to AUTO_DROPOUT_MAX
AUTO_DROPOUT_FROM_EPOCHS = 10.0
AUTO_DROPOUT_PER_EPOCH = 0.01
AUTO_DROPOUT_MAX = 0.2
# a time-budgeted run foresees its length from the speed of these iterations of its session
AUTO_DROPOUT_PROBE = (5, 25)


@dataclass
class TrainResult:
    iterations: int
    val_loss: float | None
    best_val_loss: float | None
    interrupted: bool
    parameters: int
    precision: str
    rank: int = 0  # this process's rank under torchrun; only rank 0 reports
    val_bits_per_char: float | None = None  # val_loss (nats per token) in bits per character and per byte
    val_bits_per_byte: float | None = None


@dataclass
class Run:
    """Everything the loop reads: set up once by start_run."""

    run_dir: Path
    model_config: ModelConfig
    config: TrainConfig
    tokenizer: Tokenizer
    device: torch.device
    world: Distributed
    plan: speed.SpeedPlan
    state: TrainingState
    step_model: torch.nn.Module  # what the loop calls: the model, DDP-wrapped and/or compiled
    ddp_model: torch.nn.Module  # the DDP wrapper (no_sync), or the model itself
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    resumed: bool
    token_files: dict[Path, int] = dataclasses.field(default_factory=dict)  # memmapped file -> its size
    # each split's (tokens, characters, bytes): a loss per token, as bits per character and per byte
    text_sizes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    init_from: dict | None = None  # the run whose weights this one started from (fine-tuning)

    def check_token_files(self) -> None:
        """A token file that shrinks under its memmap would kill the process with SIGBUS at the
        next read: notice a changed size first (a stat per iteration) and stop with one line."""
        for path, size in self.token_files.items():
            try:
                now = path.stat().st_size
            except OSError:
                now = -1
            if now != size:
                raise DataError(f"{str(path)!r} changed while training ({size:,} bytes at the start, "
                                f"{'gone' if now < 0 else f'{now:,}'} now); the last checkpoint is intact: "
                                f"prepare the data again, then --resume")

    @property
    def precision(self) -> Precision:
        return self.plan.precision

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train(data_dir: str | Path, run_dir: str | Path, model_config: ModelConfig, train_config: TrainConfig,
          device: str = "auto", resume: bool = False, progress: bool = True, log=print,
          overwrite: bool = False, init_from: str | Path | None = None) -> TrainResult:
    """Train a GPT on a prepared data directory, writing checkpoints and metrics to run_dir
    (new, empty, or a run: continued with resume, started over with overwrite). init_from: a
    new run starts from that run's best (else last) weights, with a fresh optimizer and schedule."""
    world, device_ = distributed.setup(device)
    lock = None
    try:
        lock, start_over = _claim_run_dir(Path(run_dir), resume, overwrite, world, device_)
        run = start_run(Path(data_dir), Path(run_dir), model_config, train_config, device_, resume, log, world,
                        start_over, None if init_from is None else Path(init_from))
        with _stop_requests() as stop:
            return _loop(run, stop, progress)
    except (RuntimeError, dist.DistError) as e:
        if not (world.enabled and distributed.is_collective_failure(e)):
            raise
        raise distributed.peer_lost(world, e) from None
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown(world)


def _claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, world: Distributed,
                   device: torch.device) -> tuple[rundir.RunLock | None, bool]:
    """Rank 0 checks and locks the run directory for the whole run; the others learn whether
    it could (every process stops if not)."""
    lock, start_over, error = None, False, None
    if world.is_main:
        try:
            lock, start_over = rundir.claim(run_dir, resume, overwrite)
        except TinyGPTError as e:
            error = e
    if not distributed.agree(error is None, world, device):
        raise error or ConfigError(f"process 0 could not claim {str(run_dir)!r} (see its error)")
    return lock, start_over


# ----------------------------------------------------------------------------- the loop


def _loop(run: Run, stop: list[int], progress: bool) -> TrainResult:
    state, config, world, device = run.state, run.config, run.world, run.device
    clock = _Clock(state.elapsed_before)
    bar = _progress_bar(run, progress)
    window = _LossWindow(device)
    auto_dropout = _AutoDropout(run, bar) if config.auto_dropout else None
    val_loss, interrupted = None, False
    try:
        while state.iteration < config.max_iters:
            run.check_token_files()
            if run.model_config.dropout > 0:
                torch.manual_seed(dropout_seed(config.seed, world.rank, state.iteration))
            # a time budget makes the schedule follow the clock: every process follows process
            # 0's, so all of them set the same learning rate and stop after the same step
            lr = learning_rate_at(state.iteration, config, _shared_elapsed(clock, config, world, device))
            window.add(train_step(run.step_model, run.ddp_model, state, config, run.precision, device, world, lr))
            state.iteration += 1
            if run.config.auto_dropout:  # not yet decided
                auto_dropout.after_step(clock)
            # time-budgeted runs are not bit-for-bit reproducible: where they stop depends on speed
            time_up = config.max_time > 0 and _shared_elapsed(clock, config, world, device) >= config.max_time
            done = time_up or state.iteration == config.max_iters
            if state.iteration % LOG_INTERVAL == 0 or done:
                window.report(bar, state.iteration, lr, config, clock, run.model_config.block_size)
            if state.iteration % config.eval_interval == 0 or done:
                val_loss = evaluate_and_save(run, lr, clock, bar, final=done)
            if done:
                break
            if _stop_agreed(stop, state.iteration, world, device):
                interrupted = True
                break
    finally:
        bar.close()
    if interrupted:
        if world.is_main:
            training_state.save(run.run_dir, state, device, _record_fields(run, val_loss, clock))
            print(f"interrupted: saved iteration {state.iteration} to {run.run_dir}; continue with --resume",
                  file=sys.stderr)
        if world.enabled:
            dist.barrier()
    val_bits = {} if val_loss is None else {
        "val_bits_per_char": bits(val_loss, run.text_sizes["val"], "char"),
        "val_bits_per_byte": bits(val_loss, run.text_sizes["val"], "byte")}
    return TrainResult(state.iteration, val_loss, state.best_val_loss, interrupted, state.model.num_parameters(),
                       run.precision.name, world.rank, **val_bits)


def train_step(step_model: torch.nn.Module, ddp_model: torch.nn.Module, state: TrainingState, config: TrainConfig,
               precision: Precision, device: torch.device, world: Distributed, lr: float) -> torch.Tensor:
    """One optimizer step over batch_size windows in grad_accum micro-batches; the mean loss
    (a 0-dim tensor, not synced to the host)."""
    set_learning_rate(state.optimizers, lr)
    micro_batch = config.batch_size // config.grad_accum
    total = torch.zeros((), device=device)
    for micro_step in range(config.grad_accum):
        x, y = state.sampler.next(micro_batch, device)
        # only the last micro-step all-reduces the gradients
        last = micro_step == config.grad_accum - 1
        sync = ddp_model.no_sync() if world.enabled and not last else contextlib.nullcontext()
        with sync, precision.autocast(device):
            _, loss = step_model(x, y)
            loss = loss / config.grad_accum
        loss.backward()
        total += loss.detach()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    for optimizer in state.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if state.average is not None:
        state.average.update(state.model)
    return total


def evaluate_and_save(run: Run, lr: float, clock: _Clock, bar, final: bool = False) -> float:
    """Estimate train and val loss, log a metrics row, save `best` (if improved) and `last`."""
    state, world, config = run.state, run.world, run.config
    train_loss = estimate_loss(run, run.train_tokens, config.seed + state.iteration)
    seed = config.seed + state.iteration + 1
    val_loss = validation_loss(run, seed, state.evaluated)  # the metrics row's: the curve of one set of weights
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        raise TrainingDiverged(f"the evaluation loss became non-finite at iteration {state.iteration}; "
                               f"the last good checkpoint is intact")
    kept, kept_loss = kept_weights(run, seed, val_loss, final, bar)
    improved = state.best_val_loss is None or kept_loss < state.best_val_loss
    if improved:
        state.best_val_loss = kept_loss
    if world.is_main:
        tokens_seen = state.iteration * config.batch_size * run.model_config.block_size
        row = evaluation_row(state.iteration, train_loss, val_loss, lr, tokens_seen, run.text_sizes)
        try:
            append_row(run.metrics_path, row)
            plot_losses(run.metrics_path, run.run_dir / "loss.png", run.text_sizes)
        except OSError as e:
            raise CheckpointError(f"could not write {str(e.filename or run.metrics_path)!r}: {e.strerror or e}; "
                                  f"the last checkpoint is intact, --resume continues from it") from None
        bar.write(f"iteration {state.iteration}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                  f"({row['val_bits_per_byte']:.3f} bits/byte, {row['val_bits_per_char']:.3f} bits/char)")
        record = _record_fields(run, val_loss, clock)
        if improved:  # the weights this evaluation scored, and which they are
            weights = "raw" if kept is state.model else "weight average"
            checkpoint.save_checkpoint(run.run_dir, "best", {**record, "weights": weights},
                                       {"model": checkpoint.model_tensors(kept)})
        training_state.save(run.run_dir, state, run.device, record)
    if world.enabled:
        dist.barrier()
    return val_loss


def kept_weights(run: Run, seed: int, val_loss: float, final: bool, bar) -> tuple[torch.nn.Module, float]:
    """The weights an evaluation may keep as `best`, and their val loss: the ones it scored
    (val_loss; the weight average when there is one). At a run's last evaluation the raw
    weights are scored too and the better of the two counts: when the loss still falls fast at
    the end of a short run, the average lags behind it."""
    state = run.state
    if not final or state.average is None:
        return state.evaluated, val_loss
    raw_loss = validation_loss(run, seed, state.model)
    if run.world.is_main:
        kept = "the raw weights" if raw_loss < val_loss else "the average"
        bar.write(f"last evaluation: val loss {val_loss:.4f} with the weight average, {raw_loss:.4f} with the "
                  f"raw weights; `best` may keep {kept}")
    return (state.model, raw_loss) if raw_loss < val_loss else (state.evaluated, val_loss)


def dropout_seed(seed: int, rank: int, iteration: int) -> int:
    """The torch seed for one rank's dropout masks in one iteration. Derived, not carried
    along, so a resumed run draws exactly the masks it would have drawn, and each rank draws
    its own (the samples differ). The masks do depend on the world size: with dropout > 0,
    1 and 2 processes follow different (equally valid) trajectories."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0])


def dropout_for_epochs(epochs: float, floor: float) -> float:
    """auto_dropout's dropout for a run that will see its training tokens `epochs` times:
    `floor` (the model's own dropout) up to AUTO_DROPOUT_FROM_EPOCHS passes, then more with every
    pass, never above AUTO_DROPOUT_MAX (nor below the floor)."""
    extra = AUTO_DROPOUT_PER_EPOCH * max(0.0, epochs - AUTO_DROPOUT_FROM_EPOCHS)
    return round(max(floor, min(AUTO_DROPOUT_MAX, floor + extra)), 4)


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of the model (the attention's included) at rate p."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.dropout = p


class _AutoDropout:
    """auto_dropout: foresee how many iterations the run will train (max_iters, or, under a time
    budget, the speed of a few early iterations), hence how many times it will see its training
    tokens, and set its dropout from that once (dropout_for_epochs). The choice replaces the
    model's dropout and turns auto_dropout off in the run's config, so a resumed run, or one
    trained again from its config.toml, keeps it."""

    def __init__(self, run: Run, bar):
        self.run, self.bar = run, bar
        self.first, self.timed_from = run.state.iteration, 0.0
        if run.config.max_time <= 0:
            self.decide(run.config.max_iters)

    def after_step(self, clock: _Clock) -> None:
        """Called after each iteration until it has decided."""
        run = self.run
        done = run.state.iteration - self.first
        start, end = AUTO_DROPOUT_PROBE
        if done not in (start, end):
            return
        elapsed = _shared_elapsed(clock, run.config, run.world, run.device)  # process 0's on every process
        if done == start:
            self.timed_from = elapsed
        else:
            per_second = (end - start) / max(elapsed - self.timed_from, 1e-9)
            left = max(0.0, run.config.max_time - elapsed)
            self.decide(min(run.config.max_iters, run.state.iteration + per_second * left))

    def decide(self, iterations: float) -> None:
        run = self.run
        tokens = len(run.train_tokens)
        epochs = iterations * run.config.batch_size * run.model_config.block_size / tokens
        floor = run.model_config.dropout
        p = dropout_for_epochs(epochs, floor)
        set_dropout(run.state.model, p)
        run.model_config.dropout = p  # the model's own config object: every record of the run says p
        run.config = dataclasses.replace(run.config, auto_dropout=False)
        if run.world.is_main:
            _write_configs(run)
            self.bar.write(f"auto_dropout: dropout {p:g} (the model's own: {floor:g}): about {iterations:,.0f} "
                           f"iterations foreseen, {epochs:.1f} passes over the {tokens:,} training tokens")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def estimate_loss(run: Run, tokens: np.ndarray, seed: int, model: torch.nn.Module | None = None) -> float:
    """Mean loss over eval_iters random batches, from a sampler of its own so that
    evaluating never moves the training stream; averaged over processes. `model`: the
    weights evaluations score unless given."""
    model = run.state.evaluated if model is None else model
    config, device = run.config, run.device
    was_training = model.training
    model.eval()
    sampler = BatchSampler(tokens, run.model_config.block_size, seed, run.world.rank, run.world.world_size)
    losses = torch.zeros((), device=device)
    micro_batch = config.batch_size // config.grad_accum
    for _ in range(config.eval_iters):
        x, y = sampler.next(micro_batch, device)
        with run.precision.autocast(device):
            _, loss = model(x, y)
        losses += loss.float()
    mean = distributed.all_reduce_mean(losses / config.eval_iters, run.world)
    model.train(was_training)
    return mean.item()


def validation_loss(run: Run, seed: int, model: torch.nn.Module) -> float:
    """The loss over the whole validation split, with the windows of `tinygpt eval` (at the
    training precision), when that costs no more than the two random-batch estimates of an
    evaluation together; otherwise the random-batch estimate. The best checkpoint is then
    picked by the real score rather than by a sample's noise. Under torchrun each process
    scores its share of the windows and the sums are added."""
    config, block_size = run.config, run.model_config.block_size
    micro_batch = config.batch_size // config.grad_accum
    tokens = run.val_tokens
    if len(tokens) - 1 > 2 * config.eval_iters * micro_batch * block_size:
        return estimate_loss(run, tokens, seed, model)
    with run.precision.autocast(run.device):
        nats = split_nats(model, tokens, batch_size=micro_batch, device=run.device,
                          shard=(run.world.rank, run.world.world_size))
    return distributed.all_reduce_sum(nats, run.world, run.device) / (len(tokens) - 1)


# ----------------------------------------------------------------------------- starting a run


def start_run(data_dir: Path, run_dir: Path, model_config: ModelConfig, config: TrainConfig,
              device: torch.device, resume: bool, log, world: Distributed, start_over: bool = False,
              init_from: Path | None = None) -> Run:
    """Check the configs against the data (and the run being resumed, or fine-tuned from),
    decide the speed plan, build the model and optimizers, and restore the training state
    when resuming (or load the weights of the run it starts from)."""
    tokenizer = load_tokenizer(data_dir)
    record = _resume_record(run_dir, resume, world, log)
    source = None
    if record is not None:
        if config.auto_dropout:  # the dropout it chose (or, not yet chosen, its floor) is the run's
            model_config = dataclasses.replace(model_config, dropout=record["model_config"].get("dropout", 0.0))
        config = resumed_config(record, model_config, config, tokenizer, data_dir, run_dir)
    elif init_from is not None:
        if init_from.resolve() == run_dir.resolve():
            raise ConfigError("--init-from and --out are the same run; fine-tune into a new --out")
        source = init_source(init_from, model_config, tokenizer, data_dir)
    if not distributed.same_on_all_ranks(-1 if record is None else record["iteration"], world, device):
        raise ConfigError(f"the processes of this job found different checkpoints in {run_dir}; "
                          f"on several nodes the run directory must be on a filesystem they all share")
    model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    model_config.validate()
    config.validate()
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % world.world_size != 0:
        raise ConfigError(
            f"the micro-batch ({micro_batch} = batch_size / grad_accum) must divide among {world.world_size} processes")
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= model_config.block_size + 1:
            raise ConfigError(f"block_size {model_config.block_size} is larger than the {split} split "
                              f"({len(tokens)} tokens); use a smaller block_size or more data")
    if start_over and world.is_main:  # --overwrite: only now that data and configs are known good
        rundir.remove_run_files(run_dir)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    configure_backends(device)
    plan = _speed_plan(config, model_config, device, record, world)
    config = plan.resolved(config)
    model = GPT(model_config)
    if source is not None:
        checkpoint.load_weights(model, checkpoint.load_tensors(init_from, source, "model"))
    model = speed.apply(model.to(device), plan)
    sampler = BatchSampler(train_tokens, model_config.block_size, config.seed, world.rank, world.world_size)
    state = TrainingState(model, build_optimizers(model, config, device), sampler,
                          average=training_state.weight_average(model, config.ema, config.ema_horizon))
    if record is not None:
        training_state.restore(run_dir, record, state, device)
    origin = record.get("init_from") if record is not None else None if source is None else {
        "run": str(init_from.resolve()), "checkpoint": source["name"], "iteration": source["iteration"]}
    step_model = ddp_model = distributed.wrap(model, world, device)
    if config.compile:
        step_model = torch.compile(ddp_model)
    run = Run(run_dir, model_config, config, tokenizer, device, world, plan, state, step_model, ddp_model,
              train_tokens, val_tokens, record is not None,
              {data_dir / f"{split}.bin": (data_dir / f"{split}.bin").stat().st_size for split in ("train", "val")},
              {split: (len(tokens), *split_sizes(data_dir, split, tokenizer, tokens))
               for split, tokens in (("train", train_tokens), ("val", val_tokens))},
              origin)
    if world.is_main:
        _write_run_files(run, record)
        _log_start(run, record, log)
    return run


def init_from_configs(source_dir: Path, train_config: TrainConfig | None,
                      overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a run that starts from `source_dir`'s weights: its model config (a
    `--set` of a model key is refused, naming it); `train_config` (a preset's), else the
    run's own training config with its speed choices decided afresh. The caller applies
    `overrides` (training keys) to them."""
    if not source_dir.is_dir() or not rundir.holds_run(source_dir):
        raise ConfigError(f"--init-from {str(source_dir)!r} is not a tinyGPT run")
    model_keys = {f.name for f in fields(ModelConfig)}
    for pair in overrides:
        key = pair.partition("=")[0].strip()
        if key in model_keys:
            raise ConfigError(f"--init-from: the model config comes from {source_dir}; --set {key} cannot "
                              f"change it (training keys can)")
    record = checkpoint.read_record(source_dir, checkpoint.best_or_last(source_dir))
    model_config = model_config_from_dict(record["model_config"])
    if train_config is None:
        saved = record.get("train_config")
        train_config = TrainConfig() if saved is None else dataclasses.replace(
            train_config_from_dict(saved), **dict.fromkeys(speed.SPEED_KEYS, "auto"))
    return model_config, train_config


def init_source(source_dir: Path, model_config: ModelConfig, tokenizer: Tokenizer, data_dir: Path) -> dict:
    """The record of the best (else last) checkpoint of the run a new run starts from, once
    its model config is the one asked for and the data is tokenized exactly as it was."""
    if not source_dir.is_dir() or not rundir.holds_run(source_dir):
        raise ConfigError(f"--init-from {str(source_dir)!r} is not a tinyGPT run")
    source = checkpoint.read_record(source_dir, checkpoint.best_or_last(source_dir))
    checkpoint.build_model(source, allocate=False)  # the record fits its weights file: nothing huge
    saved = model_config_from_dict(source["model_config"])
    for f in fields(ModelConfig):
        if f.name != "vocab_size" and getattr(model_config, f.name) != getattr(saved, f.name):
            raise ConfigError(f"--init-from: the model config comes from {source_dir}; {f.name} cannot change "
                              f"(the run has {getattr(saved, f.name)!r}, asked {getattr(model_config, f.name)!r})")
    theirs = source["tokenizer"]
    if theirs != tokenizer.to_dict():
        kind = theirs.get("type")
        if kind != tokenizer.kind:
            raise ConfigError(f"--init-from: the data in {data_dir} is tokenized by {tokenizer.kind}, the run in "
                              f"{source_dir} by {kind}; the tokenizers must be the same")
        if kind != "char":
            raise ConfigError(f"--init-from: the data in {data_dir} has a different tokenizer.json than the run in "
                              f"{source_dir}; the tokenizers must be the same")
        known = set(theirs.get("chars", []))
        missing = "".join(sorted(c for c in tokenizer.to_dict()["chars"] if c not in known))
        raise ConfigError(f"--init-from: the data in {data_dir} " + (
            f"has characters the run in {source_dir} does not know: {missing!r}" if missing else
            f"numbers its characters differently than the run in {source_dir}") +
            "; the data's vocabulary must be exactly the run's")
    return source


def _resume_record(run_dir: Path, resume: bool, world: Distributed, log) -> dict | None:
    if not resume:
        return None
    if not (run_dir / "last.json").exists():
        # a job that always passes --resume (requeued by a scheduler, restarted by torchrun
        # --max-restarts) may have died before its first checkpoint: it starts from the beginning
        if world.is_main:
            log(f"--resume: no checkpoint in {run_dir} yet (no last.json); starting from iteration 0")
        return None
    record = checkpoint.read_record(run_dir, "last")
    training_state.check_resumable(run_dir, record)
    checkpoint.build_model(record, allocate=False)  # the record's model fits its weights file: nothing huge
    return record


def resumed_config(record: dict, model_config: ModelConfig, config: TrainConfig, tokenizer: Tokenizer,
                   data_dir: Path, run_dir: Path) -> TrainConfig:
    """The saved training config, with the changes a continuing run may make (RESUMABLE_KEYS,
    and the speed choices: a run moved to another machine may need float32, say, though it
    then no longer continues bit for bit); any other difference from the saved run is refused
    with the key named. A speed choice asked for as "auto" keeps the run's recorded one, and so
    does auto_dropout asked for again (start_run gave the model config the run's dropout), and
    an option newer than the run (a preset that now sets it): the run goes on without it."""
    saved_model = model_config_from_dict(record["model_config"])
    differences = ", ".join(f"{f.name} {getattr(saved_model, f.name)!r} vs {getattr(model_config, f.name)!r}"
                            for f in fields(ModelConfig)
                            if f.name not in ("vocab_size", *INIT_ONLY_KEYS)
                            and getattr(model_config, f.name) != getattr(saved_model, f.name))
    if differences:
        raise ConfigError(f"--resume: the run in {run_dir} has a different model config ({differences})")
    if record["tokenizer"] != tokenizer.to_dict():
        kind = (record["tokenizer"] or {}).get("type") if isinstance(record["tokenizer"], dict) else None
        if kind != tokenizer.kind:
            raise ConfigError(f"--resume: the data in {data_dir} is tokenized by {tokenizer.kind}, the run in "
                              f"{run_dir} by {kind}; resume it on data prepared with --tokenizer {kind}")
        raise ConfigError(f"--resume: the data in {data_dir} has a different vocabulary than the run in {run_dir}")
    saved = train_config_from_dict(record["train_config"])
    recorded = set(record["train_config"])  # an option newer than the run is not in its record
    changes = {}
    for f in fields(TrainConfig):
        asked, kept = getattr(config, f.name), getattr(saved, f.name)
        if asked == kept or (f.name in speed.SPEED_KEYS and asked == "auto") or (f.name == "auto_dropout" and asked):
            continue
        if f.name not in recorded:  # the run trained without it (its default): it continues so
            continue
        if f.name not in RESUMABLE_KEYS + speed.SPEED_KEYS:
            raise ConfigError(f"--resume: {f.name} cannot change when a run continues (the run has {kept!r}, "
                              f"asked {asked!r}); only {', '.join(RESUMABLE_KEYS)} can")
        changes[f.name] = asked
    return dataclasses.replace(saved, **changes)


def _speed_plan(config: TrainConfig, model_config: ModelConfig, device: torch.device, record: dict | None,
                world: Distributed) -> speed.SpeedPlan:
    """The run's speed plan: decided (and timed) once when it starts, read back on resume
    (unless it resumes on another kind of device), and rank 0's for every process."""
    if record is None:
        plan = speed.plan(device, config, model_config.dropout)
    elif device.type == "cpu" and config.dtype == "bfloat16" and not cpu_has_native_bf16():
        raise ConfigError("this run trained in bfloat16, which this CPU only emulates (several times slower); "
                          "resume it with --set dtype=float32 (it then continues, but not bit for bit)")
    elif record.get("device_type") == device.type:
        # runs saved before the speed choices were recorded have their precision in the record
        dtype = record.get("precision", "float32") if config.dtype == "auto" else config.dtype
        plan = speed.plan(device, dataclasses.replace(config, dtype=dtype), model_config.dropout,
                          given="as the run started")
    else:  # resumed on another kind of device: what was fastest there says nothing here
        plan = speed.plan(device, dataclasses.replace(config, **dict.fromkeys(speed.SPEED_KEYS, "auto")),
                          model_config.dropout)
    if world.enabled:
        options = (("float32", "bfloat16"), ("sdpa", "explicit"), ("torch", "bits16"), ("off", "on"))
        mine = [plan.precision.name, plan.attention, plan.dropout_mask, plan.decode_copies]
        chosen = distributed.rank0_choices([o.index(v) for o, v in zip(options, mine, strict=True)], world, device)
        names = [o[i] for o, i in zip(options, chosen, strict=True)]
        if names != mine:
            plan = speed.SpeedPlan(Precision(getattr(torch, names[0]), f"{names[0]}: rank 0's choice"), *names[1:],
                                   dict.fromkeys(("attention", "dropout_mask", "decode_copies"), "rank 0's choice"))
    return plan


def _write_run_files(run: Run, record: dict | None) -> None:
    """The run's configs (config.json first: it marks the folder as a run), tokenizer.json; a
    fresh run starts its metrics, a resumed one cuts them back to what its checkpoint had seen
    (later rows will be written again)."""
    _write_configs(run)
    checkpoint.atomic_write_bytes(run.run_dir / "tokenizer.json", run.tokenizer.file_text().encode("utf-8"))
    metrics_path = run.metrics_path
    if record is not None:
        size = metrics_path.stat().st_size if metrics_path.exists() else 0
        if size < record["metrics_bytes"]:
            raise CheckpointError(f"{metrics_path} is shorter than when iteration {record['iteration']} was saved; "
                                  f"it was altered, so the run cannot continue it")
        with open(metrics_path, "ab") as f:
            f.truncate(record["metrics_bytes"])
    else:  # a new run (rundir.claim made sure nothing of anyone else's is here)
        metrics_path.write_text("")
        for name in ("last", "best"):
            (run.run_dir / f"{name}.json").unlink(missing_ok=True)


def _write_configs(run: Run) -> None:
    """config.json and the same as config.toml: the run's resolved configuration (written again
    when auto_dropout decides)."""
    checkpoint.atomic_write_bytes(run.run_dir / "config.json", json.dumps(
        {"format": rundir.RUN_FORMAT, "model": dataclasses.asdict(run.model_config),
         "train": dataclasses.asdict(run.config),
         **({"init_from": run.init_from} if run.init_from else {})}, indent=1).encode())
    source = run.init_from
    checkpoint.atomic_write_bytes(run.run_dir / "config.toml", config_toml(
        run.model_config, run.config, comment="the resolved configuration of this run: "
        "`tinygpt train --config` with this file trains it again" + (
            f"\nstarted from the weights of {source['run']} ({source['checkpoint']} checkpoint, iteration "
            f"{source['iteration']}): add --init-from {source['run']} and drop [model]" if source else "")).encode())


def _log_start(run: Run, record: dict | None, log) -> None:
    model, world = run.state.model, run.world
    parameters = model.num_parameters()
    log(f"model: {parameters:,} parameters ({parameters / 1e6:.2f} M); "
        f"{model.flops_per_token() / 1e6:.1f} MFLOP per training token")
    log(f"device: {run.device}; processes: {world.world_size}")
    for line in run.plan.describe():
        log(f"  {line}")
    if run.state.average is not None:
        how = (f"{run.config.ema:g} per iteration" if run.config.ema > 0 else
               f"its mean age {run.config.ema_horizon:g} of the iterations so far")
        log(f"weight average: evaluations and `best` use a moving average of the weights ({how}); "
            f"`last` keeps the raw weights too")
    if record is None:
        if run.init_from:
            log(f"starting from the weights of {run.init_from['run']} ({run.init_from['checkpoint']} checkpoint, "
                f"iteration {run.init_from['iteration']}) with a fresh optimizer and schedule")
        return
    saved_world = record.get("world_size", 1)
    log(f"resuming from iteration {run.state.iteration}" + (
        f" (saved by {saved_world} processes, continued by {world.world_size}: the same global batches)"
        if saved_world != world.world_size else ""))
    if run.state.iteration >= run.config.max_iters:
        log(f"the run is already at max_iters ({run.config.max_iters}): nothing to train; "
            f"pass a larger --max-iters to extend it")


def _record_fields(run: Run, val_loss: float | None, clock: _Clock) -> dict:
    """What every checkpoint record of this run says besides its tensors."""
    return {
        "iteration": run.state.iteration,
        "model_config": dataclasses.asdict(run.model_config),
        "train_config": dataclasses.asdict(run.config),
        "tokenizer": run.tokenizer.to_dict(),
        "best_val_loss": run.state.best_val_loss,
        "val_loss": val_loss,
        "metrics_bytes": run.metrics_path.stat().st_size if run.metrics_path.exists() else 0,
        "precision": run.precision.name,
        "device_type": run.device.type,
        "world_size": run.world.world_size,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "elapsed": clock.elapsed(),
        **({"init_from": run.init_from} if run.init_from else {}),
    }


# ----------------------------------------------------------------------------- small pieces


def _shared_elapsed(clock: _Clock, config: TrainConfig, world: Distributed, device: torch.device) -> float:
    """The run's seconds so far, process 0's on every process when the schedule depends on them."""
    if config.max_time > 0:
        return distributed.rank0_value(clock.elapsed(), world, device)
    return clock.elapsed()


class _Clock:
    """Wall-clock seconds spent in this run, earlier sessions of a resumed run included."""

    def __init__(self, before: float):
        self.before, self.start = before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start


class _LossWindow:
    """The training loss summed on the device between progress-bar updates (the one host sync)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.iterations, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.iterations += 1

    def report(self, bar, iteration: int, lr: float, config: TrainConfig, clock: _Clock, block_size: int) -> None:  # noqa: E501
        mean_loss = self.loss.item() / self.iterations
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"the loss became {mean_loss} near iteration {iteration}; stopped without saving. "
                f"The last good checkpoint is intact; lower learning_rate and --resume or start again")
        seconds = time.perf_counter() - self.start
        postfix = {"loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}",
                   "tok_s": f"{self.iterations * config.batch_size * block_size / seconds:,.0f}"}
        if config.max_time > 0:
            postfix["left"] = f"{max(0.0, config.max_time - clock.elapsed()):.0f}s"
        bar.set_postfix(postfix)
        bar.update(self.iterations)
        self.loss.zero_()
        self.iterations, self.start = 0, time.perf_counter()


def _progress_bar(run: Run, progress: bool):
    # with a time budget the iteration count is only an upper bound: the bar shows time left instead
    budget = run.config.max_time
    return tqdm(total=None if budget > 0 else run.config.max_iters, initial=run.state.iteration,
                desc=f"train ({budget:.0f} s budget)" if budget > 0 else "train", unit="it",
                disable=not (progress and run.world.is_main), dynamic_ncols=True)


@contextlib.contextmanager
def _stop_requests():
    """Ctrl-C and SIGTERM, noted instead of raised, so the loop can save and stop cleanly."""
    requests: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, lambda number, frame: requests.append(number))
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_agreed(requests: list[int], iteration: int, world: Distributed, device: torch.device) -> bool:
    """True once Ctrl-C or SIGTERM arrived. Ranks agree at the logging cadence, so all of
    them stop after the same iteration."""
    if not world.enabled:
        return bool(requests)
    return iteration % LOG_INTERVAL == 0 and distributed.any_rank(bool(requests), world, device)
