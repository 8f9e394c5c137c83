"""The training loop, and the small pieces it calls: optimizer, schedule, evaluation
estimates, metrics/plot, checkpoint state. It runs alone or under `torchrun` (DDP).

Everything a run depends on is in its checkpoint (weights, optimizer, iteration, the
batch sampler's RNG state, the torch/CUDA/numpy/python RNG states), and dropout masks are
seeded from (seed, rank, iteration), so `--resume` continues bit for bit, even after a
SIGKILL, on the same hardware and thread count. Under torchrun every rank draws the same
global batch and keeps its slice, so 1 and N processes see the same data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tinygpt import checkpoint
from tinygpt.config import ConfigError, ModelConfig, PeerLost, TinyGPTError, TrainConfig, train_config_from_dict
from tinygpt.data import gather_windows, load_meta, load_tokens
from tinygpt.evaluate import evaluate_tokens
from tinygpt.hardware import Precision, choose_precision, configure_backends, resolve_device
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer

LOG_INTERVAL = 10  # iterations between progress-bar updates (the only host syncs)


class TrainingDiverged(TinyGPTError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- distribution


@dataclass
class Distributed:
    """Where this process sits among the processes `torchrun` started (1 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # a rank that dies makes the others fail at their next collective within this timeout
    timeout = datetime.timedelta(seconds=int(os.environ.get("TINYGPT_DIST_TIMEOUT", "300")))
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except (dist.DistError, RuntimeError, ValueError) as e:  # timeout, refused connection, bad address
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"process {rank} of {world_size}: could not meet the other processes at {where} "
                       f"[{reason}]") from None
    return Distributed(rank, world_size, local_rank), device


def _is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer is gone: c10d raises DistError subclasses
    (NCCL, store, timeouts); gloo's transport raises a RuntimeError naming gloo."""
    return isinstance(error, dist.DistError) or "gloo" in str(error)


def _same_on_all_ranks(value: int, world: Distributed, device: torch.device) -> bool:
    if not world.enabled:
        return True
    low_high = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(low_high, op=dist.ReduceOp.MAX)
    return low_high[0].item() == -low_high[1].item()


def _all_reduce_mean(value: torch.Tensor, world: Distributed) -> torch.Tensor:
    if world.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.world_size
    return value


# ----------------------------------------------------------------------------- optimizer


def build_optimizers(model: GPT, config: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (weight decay on matrices only, unless decay_all_params); with optimizer=muon,
    Muon takes the blocks' hidden matrices and AdamW keeps embeddings, head, norms, biases."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_params = []
    if config.optimizer == "muon":
        muon_params = [p for n, p in named if n.startswith("blocks.") and p.dim() == 2]
    muon_ids = {id(p) for p in muon_params}
    rest = [(n, p) for n, p in named if id(p) not in muon_ids]
    decay = [p for _, p in rest if config.decay_all_params or p.dim() >= 2]
    no_decay = [p for _, p in rest if not (config.decay_all_params or p.dim() >= 2)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = device.type in ("cuda", "cpu")  # one kernel for all parameters; ~7x faster on the CPU
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)
    ]
    if muon_params:
        optimizers.append(
            torch.optim.Muon(muon_params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             adjust_lr_fn="match_rms_adamw")
        )
    return optimizers


def learning_rate_at(iteration: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then constant or cosine decay to min_lr at max_iters (or at max_time
    seconds, whichever comes first, when a time budget is set)."""
    if iteration < config.warmup_iters:
        return config.learning_rate * (iteration + 1) / config.warmup_iters
    if config.schedule == "constant":
        return config.learning_rate
    decay_steps = max(1, config.max_iters - config.warmup_iters)
    progress = min(1.0, (iteration - config.warmup_iters) / decay_steps)
    if config.max_time > 0:
        progress = max(progress, min(1.0, elapsed / config.max_time))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def optimizer_state(optimizers) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten optimizer state dicts into named tensors plus JSON-able parameter groups."""
    tensors, groups = {}, []
    for i, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        for param_id, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"optimizer.{i}.{param_id}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups.append(state["param_groups"])
    return tensors, groups


def load_optimizer_state(optimizers, tensors: dict[str, torch.Tensor], groups: list) -> None:
    for i, optimizer in enumerate(optimizers):
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"optimizer.{i}."
        for name, value in tensors.items():
            if name.startswith(prefix):
                param_id, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(param_id), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups[i]})


# ----------------------------------------------------------------------------- batches


class BatchSampler:
    """Random windows from the memmap. Every rank draws the same global batch from one
    seeded stream and keeps its own slice, so the data does not depend on the world size."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int, world: Distributed):
        self.tokens = tokens
        self.block_size = block_size
        self.world = world
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, global_batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.block_size, (global_batch,), generator=self.generator)
        per_rank = global_batch // self.world.world_size
        mine = starts[self.world.rank * per_rank:(self.world.rank + 1) * per_rank].numpy()
        window = gather_windows(self.tokens, mine, self.block_size + 1)  # (B, T+1)
        if device.type == "cuda":
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
        return window[:, :-1], window[:, 1:]  # inputs, next-character targets: (B, T) each


@torch.no_grad()
def estimate_loss(model, tokens, config: TrainConfig, block_size: int, seed: int, world: Distributed,
                  device: torch.device, precision: Precision) -> float:
    """Mean loss over eval_iters random batches, from a generator of its own so that
    evaluating never moves the training stream."""
    was_training = model.training
    model.eval()
    sampler = BatchSampler(tokens, block_size, seed, world)
    losses = torch.zeros((), device=device)
    micro_batch = config.batch_size // config.grad_accum
    for _ in range(config.eval_iters):
        x, y = sampler.next(micro_batch, device)
        with precision.autocast(device):
            _, loss = model(x, y)
        losses += loss.float()
    mean = _all_reduce_mean(losses / config.eval_iters, world)
    model.train(was_training)
    return mean.item()


@torch.no_grad()
def validation_loss(model: GPT, tokens, config: TrainConfig, seed: int, world: Distributed,
                    device: torch.device, precision: Precision) -> float:
    """The loss over the whole validation split, with the windows of `tinygpt eval` (at the
    training precision), when that costs no more than the two random-batch estimates of an
    evaluation together; otherwise the random-batch estimate. The best checkpoint is then
    picked by the real score rather than by a sample's noise: on tinyshakespeare (111,538 val
    characters, cpu preset) 20 random batches missed the best checkpoint by 0.007 bits/char.
    Every process scores the whole split; the mean keeps them in agreement."""
    block_size = model.config.block_size
    micro_batch = config.batch_size // config.grad_accum
    if len(tokens) - 1 > 2 * config.eval_iters * micro_batch * block_size:
        return estimate_loss(model, tokens, config, block_size, seed, world, device, precision)
    was_training = model.training
    with precision.autocast(device):
        loss = evaluate_tokens(model, tokens, batch_size=micro_batch, device=device).loss
    model.train(was_training)
    return _all_reduce_mean(torch.tensor(loss, dtype=torch.float64, device=device), world).item()


# ----------------------------------------------------------------------------- metrics


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
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
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------- checkpoints


def _rng_tensors(sampler: BatchSampler, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.sampler": sampler.generator.get_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor], record: dict, sampler: BatchSampler, device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    sampler.generator.set_state(tensors["rng.sampler"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = record["numpy_rng"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))


def _save_last(run_dir, model, optimizers, sampler, device, record_fields) -> None:
    tensors, groups = optimizer_state(optimizers)
    tensors.update(_rng_tensors(sampler, device))
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    record = {
        **record_fields,
        "optimizer_groups": groups,
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(),
                      *[float(x) if isinstance(x, float) else int(x) for x in numpy_state[2:]]],
    }
    checkpoint.save_checkpoint(run_dir, "last", record, {"model": checkpoint.model_tensors(model), "state": tensors})


# ----------------------------------------------------------------------------- the loop


def dropout_seed(seed: int, rank: int, iteration: int) -> int:
    """The torch seed for one rank's dropout masks in one iteration. Derived, not carried
    along, so a resumed run draws exactly the masks it would have drawn, and each rank draws
    its own (the samples differ). The masks do depend on the world size: with dropout > 0,
    1 and 2 processes follow different (equally valid) trajectories."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0])


def _run_precision(device: torch.device, requested: str, record: dict | None, world: Distributed) -> Precision:
    """The autocast dtype. A resumed run keeps the one it started with (`auto` on a CPU
    times matmuls, and a loaded machine could tip the choice), and every rank uses rank 0's."""
    if record is not None and requested == "auto" and record.get("device_type") == device.type:
        name = record["precision"]
        precision = Precision(getattr(torch, name), f"{name}: as the run started")
    else:
        precision = choose_precision(device, requested)
    if world.enabled:
        bf16 = _agree(precision.dtype == torch.bfloat16, world, device)
        if bf16 != (precision.dtype == torch.bfloat16):
            precision = Precision(torch.bfloat16 if bf16 else torch.float32, "rank 0's choice")
    return precision


@dataclass
class TrainResult:
    iterations: int
    val_loss: float | None
    best_val_loss: float | None
    interrupted: bool
    parameters: int
    precision: str
    rank: int = 0  # this process's rank under torchrun; only rank 0 reports


def train(
    data_dir: str | Path,
    run_dir: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> TrainResult:
    """Train a GPT on a prepared data directory, writing checkpoints and metrics to run_dir."""
    world, device_ = setup_distributed(device)
    try:
        return _train(data_dir, Path(run_dir), model_config, train_config, device_, resume, progress, log, world)
    except (RuntimeError, dist.DistError) as e:
        if not (world.enabled and _is_collective_failure(e)):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(
            f"process {world.rank} of {world.world_size}: another process of the job crashed or stopped "
            f"answering (see its own error); the last checkpoint is intact, rerun with --resume [{reason}]"
        ) from None
    finally:
        if world.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(data_dir, run_dir: Path, model_config: ModelConfig, config: TrainConfig, device: torch.device,
           resume: bool, progress: bool, log, world: Distributed) -> TrainResult:
    meta = load_meta(data_dir)
    tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
    record = None
    if resume and not (run_dir / "last.json").exists():
        # a job that always passes --resume (requeued by a scheduler, restarted by torchrun
        # --max-restarts) may have died before its first checkpoint: it starts from the beginning
        if world.is_main:
            log(f"--resume: no checkpoint in {run_dir} yet (no last.json); starting from iteration 0")
        resume = False
    if resume:
        record = checkpoint.read_record(run_dir, "last")
        saved_model = record["model_config"]
        if dataclasses.asdict(model_config) | {"vocab_size": saved_model["vocab_size"]} != saved_model:
            differences = ", ".join(
                f"{k} {saved_model.get(k)!r} vs {v!r}" for k, v in dataclasses.asdict(model_config).items()
                if k != "vocab_size" and saved_model.get(k) != v
            )
            raise ConfigError(f"--resume: the run in {run_dir} has a different model config ({differences})")
        if record["tokenizer"] != tokenizer.to_dict():
            raise ConfigError(f"--resume: the data in {data_dir} has a different vocabulary than the run in {run_dir}")
        saved_train = train_config_from_dict(record["train_config"])
        config = dataclasses.replace(saved_train, max_iters=config.max_iters)
    if not _same_on_all_ranks(-1 if record is None else record["iteration"], world, device):
        raise ConfigError(f"the processes of this job found different checkpoints in {run_dir}; "
                          f"on several nodes the run directory must be on a filesystem they all share")
    model_config.vocab_size = tokenizer.vocab_size
    model_config.validate()
    config.validate()
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % world.world_size != 0:
        raise ConfigError(
            f"the micro-batch ({micro_batch} = batch_size / grad_accum) must divide among {world.world_size} processes"
        )
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= model_config.block_size + 1:
            raise ConfigError(
                f"block_size {model_config.block_size} is larger than the {split} split "
                f"({len(tokens)} characters); use a smaller block_size or more data"
            )

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    configure_backends(device)
    precision = _run_precision(device, config.dtype, record, world)
    model = GPT(model_config).to(device)
    optimizers = build_optimizers(model, config, device)
    sampler = BatchSampler(train_tokens, model_config.block_size, config.seed, world)
    start_iteration, best_val_loss = 0, None
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    if record is not None:
        checkpoint.load_weights(model, checkpoint.load_tensors(run_dir, record, "model"))
        model.to(device)
        state = checkpoint.load_tensors(run_dir, record, "state")
        load_optimizer_state(optimizers, state, record["optimizer_groups"])
        _restore_rng(state, record, sampler, device)
        start_iteration, best_val_loss = record["iteration"], record["best_val_loss"]
        if world.is_main:
            # drop lines written after this checkpoint: they will be written again
            size = metrics_path.stat().st_size if metrics_path.exists() else 0
            if size < record["metrics_bytes"]:
                raise checkpoint.CheckpointError(
                    f"{metrics_path} is shorter than when iteration {start_iteration} was saved; "
                    f"it was altered, so the run cannot continue it")
            with open(metrics_path, "r+b") as f:
                f.truncate(record["metrics_bytes"])
    elif world.is_main:
        metrics_path.write_text("")
        for name in ("last", "best"):
            (run_dir / f"{name}.json").unlink(missing_ok=True)
    if world.is_main:
        (run_dir / "config.json").write_text(json.dumps(
            {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config)}, indent=1))
        tokenizer.save(run_dir / "tokenizer.json")

    step_model = ddp_model = model
    if world.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_model = ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)

    parameters = model.num_parameters()
    tokens_per_iteration = config.batch_size * model_config.block_size
    if world.is_main:
        log(f"model: {parameters:,} parameters ({parameters / 1e6:.2f} M); "
            f"{model.flops_per_token() / 1e6:.1f} MFLOP per training token")
        log(f"device: {device}; precision: {precision.reason}; processes: {world.world_size}")
        if record is not None:
            saved_world = record.get("world_size", 1)
            log(f"resuming from iteration {start_iteration}" + (
                f" (saved by {saved_world} processes, continued by {world.world_size}: the same global batches)"
                if saved_world != world.world_size else ""))
            if start_iteration >= config.max_iters:
                log(f"the run is already at max_iters ({config.max_iters}): nothing to train; "
                    f"pass a larger --max-iters to extend it")

    stop_signal: list[int] = []

    def request_stop(signum, frame):
        stop_signal.append(signum)

    previous_handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous_handlers[signum] = signal.signal(signum, request_stop)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def record_fields(iteration: int, val_loss):
        return {
            "iteration": iteration,
            "model_config": dataclasses.asdict(model_config),
            "train_config": dataclasses.asdict(config),
            "tokenizer": tokenizer.to_dict(),
            "best_val_loss": best_val_loss,
            "val_loss": val_loss,
            "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
            "precision": precision.name,
            "device_type": device.type,
            "world_size": world.world_size,
            "elapsed": elapsed(),
        }

    # with a time budget the iteration count is only an upper bound: the bar shows time left instead
    bar = tqdm(total=None if config.max_time > 0 else config.max_iters, initial=start_iteration,
               desc=f"train ({config.max_time:.0f} s budget)" if config.max_time > 0 else "train", unit="it",
               disable=not (progress and world.is_main), dynamic_ncols=True)
    model.train()
    iteration = start_iteration
    last_val_loss = None
    interrupted = False
    window_loss = torch.zeros((), device=device)
    window_start, window_iterations = time.perf_counter(), 0
    # wall-clock seconds spent in this run so far, earlier sessions of a resumed run included
    elapsed_before = record.get("elapsed", 0.0) if record is not None else 0.0
    loop_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - loop_start

    time_up = False
    try:
        while iteration < config.max_iters and not time_up:
            if model_config.dropout > 0:
                torch.manual_seed(dropout_seed(config.seed, world.rank, iteration))
            lr = learning_rate_at(iteration, config, elapsed())
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            for micro_step in range(config.grad_accum):
                x, y = sampler.next(micro_batch, device)
                last_micro_step = micro_step == config.grad_accum - 1
                # only the last micro-step all-reduces the gradients
                sync = ddp_model.no_sync() if world.enabled and not last_micro_step else contextlib.nullcontext()
                with sync, precision.autocast(device):
                    _, loss = step_model(x, y)
                    loss = loss / config.grad_accum
                loss.backward()
                window_loss += loss.detach()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            iteration += 1
            window_iterations += 1

            # time-budgeted runs are not bit-for-bit reproducible: where they stop depends on speed
            time_up = config.max_time > 0 and _agree(elapsed() >= config.max_time, world, device)
            if iteration % LOG_INTERVAL == 0 or iteration == config.max_iters or time_up:
                mean_loss = window_loss.item() / window_iterations  # the one host sync
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"the loss became {mean_loss} near iteration {iteration}; stopped without saving. "
                        f"The last good checkpoint is intact; lower learning_rate and --resume or start again"
                    )
                window_seconds = time.perf_counter() - window_start
                postfix = {"loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}",
                           "tok_s": f"{window_iterations * tokens_per_iteration / window_seconds:,.0f}"}
                if config.max_time > 0:
                    postfix["left"] = f"{max(0.0, config.max_time - elapsed()):.0f}s"
                bar.set_postfix(postfix)
                bar.update(window_iterations)
                window_loss.zero_()
                window_start, window_iterations = time.perf_counter(), 0

            if iteration % config.eval_interval == 0 or iteration == config.max_iters or time_up:
                train_loss = estimate_loss(model, train_tokens, config, model_config.block_size,
                                           config.seed + iteration, world, device, precision)
                last_val_loss = validation_loss(model, val_tokens, config, config.seed + iteration + 1, world,
                                                device, precision)
                if not (math.isfinite(train_loss) and math.isfinite(last_val_loss)):
                    raise TrainingDiverged(f"the evaluation loss became non-finite at iteration {iteration}; "
                                           f"the last good checkpoint is intact")
                improved = best_val_loss is None or last_val_loss < best_val_loss
                if improved:
                    best_val_loss = last_val_loss
                if world.is_main:
                    row = {
                        "iteration": iteration, "train_loss": round(train_loss, 6), "val_loss": round(last_val_loss, 6),
                        "val_bits_per_char": round(last_val_loss / math.log(2), 6), "lr": lr,
                        "tokens_seen": iteration * tokens_per_iteration,
                    }
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        os.fsync(f.fileno())  # on disk before the checkpoint that counts its bytes
                    plot_losses(metrics_path, run_dir / "loss.png")
                    bar.write(f"iteration {iteration}: train loss {train_loss:.4f}, val loss {last_val_loss:.4f} "
                              f"({last_val_loss / math.log(2):.3f} bits/char)")
                    if improved:
                        checkpoint.save_checkpoint(run_dir, "best", record_fields(iteration, last_val_loss),
                                                   {"model": checkpoint.model_tensors(model)})
                    _save_last(run_dir, model, optimizers, sampler, device, record_fields(iteration, last_val_loss))
                if world.enabled:
                    dist.barrier()
            if _should_stop(stop_signal, iteration, world, device):
                interrupted = True
                break
    finally:
        bar.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    if interrupted:
        if world.is_main:
            _save_last(run_dir, model, optimizers, sampler, device, record_fields(iteration, last_val_loss))
            print(f"interrupted: saved iteration {iteration} to {run_dir}; continue with --resume",
                  file=sys.stderr)
        if world.enabled:
            dist.barrier()
    return TrainResult(iteration, last_val_loss, best_val_loss, interrupted, parameters, precision.name, world.rank)




def _should_stop(stop_signal: list, iteration: int, world: Distributed, device: torch.device) -> bool:
    """True once Ctrl-C or SIGTERM arrived. Ranks agree at the logging cadence, so all of
    them stop after the same iteration."""
    if not world.enabled:
        return bool(stop_signal)
    if iteration % LOG_INTERVAL != 0:
        return False
    flag = torch.tensor(float(bool(stop_signal)), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _agree(flag: bool, world: Distributed, device: torch.device) -> bool:
    """The same decision on every rank (rank 0's)."""
    if not world.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
