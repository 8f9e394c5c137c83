"""What a training run is at one moment, and how the `last` checkpoint saves and restores it.

`TrainingState` holds everything the next iteration depends on: the weights, the optimizer
state, the batch sampler's position, the iteration, the best validation loss, the
wall-clock time spent so far and, with `ema` or `ema_horizon`, the moving average of the
weights. Together with the global RNG states (torch, CUDA, numpy, python) that is exactly
what `save` writes and `restore` reads back, so a resumed run continues bit for bit.
Dropout masks need no state: they are seeded from (seed, rank, iteration) each iteration
(train.dropout_seed).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygpt import checkpoint
from tinygpt.data import BatchSampler
from tinygpt.model import GPT


@dataclass
class TrainingState:
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    sampler: BatchSampler
    iteration: int = 0
    best_val_loss: float | None = None
    elapsed_before: float = 0.0  # wall-clock seconds of the run's earlier sessions
    average: WeightAverage | None = None  # the moving average of the weights (ema, ema_horizon), or None

    @property
    def evaluated(self) -> GPT:
        """The weights evaluations score and `best` keeps: the average when there is one."""
        return self.model if self.average is None else self.average.module


class WeightAverage:
    """A moving average of a model's weights, in a copy of the model (`module`) that evaluations
    score. Its first update copies the weights; after that, the t-th update moves each averaged
    weight towards the model's by `weight(t)`. Its update count is a Python int, so an update
    costs no host sync on a GPU."""

    def __init__(self, model: GPT, weight):
        self.module = copy.deepcopy(model)  # tied embeddings stay tied: deepcopy keeps shared tensors
        self.module.requires_grad_(False)
        self.weight = weight
        self.updates = 0

    @torch.no_grad()
    def update(self, model: GPT) -> None:
        self.updates += 1
        share = 1.0 if self.updates == 1 else self.weight(self.updates)
        for mean, value in zip(self.module.parameters(), model.parameters(), strict=True):
            mean.lerp_(value, share)


def weight_average(model: GPT, decay: float, horizon: float = 0.0) -> WeightAverage | None:
    """The average TrainConfig.ema (a fixed decay per update) or ema_horizon (power_weight)
    asks for, or None when both are 0."""
    if decay > 0:
        return WeightAverage(model, lambda t: 1.0 - decay)
    if horizon > 0:
        return WeightAverage(model, power_weight(horizon))
    return None


def power_weight(horizon: float):
    """The update share of a power-function average (Karras et al., 2024, "Analyzing and Improving
    the Training Dynamics of Diffusion Models"): the t-th update keeps (1 - 1/t)^(g+1) of the
    average, g = 1/horizon - 2, so that iterate s ends up weighing s^(g+1) - (s-1)^(g+1), about
    (g+1) s^g, and the mean age of what is averaged is `horizon` times t, however long the run
    turns out to be."""
    exponent = 1.0 / horizon - 1.0  # g + 1
    return lambda t: 1.0 - (1.0 - 1.0 / t) ** exponent


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


def save(run_dir: Path, state: TrainingState, device: torch.device, record_fields: dict) -> None:
    """Write the `last` checkpoint: weights, optimizer, sampler and every RNG state."""
    tensors, groups = optimizer_state(state.optimizers)
    tensors.update({"rng.torch": torch.get_rng_state(), "rng.sampler": state.sampler.generator.get_state()})
    if state.average is not None:
        tensors.update({f"ema.{name}": t for name, t in checkpoint.model_tensors(state.average.module).items()})
        tensors["ema_updates"] = torch.tensor(state.average.updates, dtype=torch.int64)
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    record = {
        **record_fields,
        "iteration": state.iteration,
        "best_val_loss": state.best_val_loss,
        "optimizer_groups": groups,
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(),
                      *[float(x) if isinstance(x, float) else int(x) for x in numpy_state[2:]]],
    }
    checkpoint.save_checkpoint(run_dir, "last", record,
                               {"model": checkpoint.model_tensors(state.model), "state": tensors})


def check_resumable(run_dir: Path, record: dict) -> None:
    """A `last` record can be resumed only if it carries the training state besides the weights."""
    if None in (record.get("train_config"), record.get("optimizer_groups"), record.get("python_rng"),
                record.get("numpy_rng")):
        raise checkpoint.CheckpointError(f"the `last` checkpoint in {str(run_dir)!r} lacks the training state "
                                         f"(configs, optimizer groups, RNG states): it cannot be resumed")


def restore(run_dir: Path, record: dict, state: TrainingState, device: torch.device) -> None:
    """Load the `last` checkpoint described by `record` into `state` and the global RNGs."""
    check_resumable(run_dir, record)
    checkpoint.load_weights(state.model, checkpoint.load_tensors(run_dir, record, "model"))
    state.model.to(device)
    tensors = checkpoint.load_tensors(run_dir, record, "state")
    try:
        _restore_state_tensors(state, tensors, record, device)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise checkpoint.CheckpointError(f"the `last` checkpoint in {str(run_dir)!r} holds a training state that "
                                         f"does not fit this run ({type(e).__name__}: {reason})") from None
    state.iteration, state.best_val_loss = record["iteration"], record["best_val_loss"]
    state.elapsed_before = record.get("elapsed", 0.0)


def _restore_state_tensors(state: TrainingState, tensors: dict, record: dict, device: torch.device) -> None:
    load_optimizer_state(state.optimizers, tensors, record["optimizer_groups"])
    if state.average is not None:
        if "ema_updates" not in tensors:
            raise checkpoint.CheckpointError("the `last` checkpoint holds no weight average, but the run averages "
                                             "its weights (ema, ema_horizon)")
        checkpoint.load_weights(state.average.module, {name[len("ema."):]: t for name, t in tensors.items()
                                                       if name.startswith("ema.")})
        state.average.updates = int(tensors["ema_updates"])
    for name in ("rng.torch", "rng.sampler"):
        if tensors[name].dtype != torch.uint8:
            raise TypeError(f"{name} is {tensors[name].dtype}, not torch.uint8")
    torch.set_rng_state(tensors["rng.torch"])
    state.sampler.generator.set_state(tensors["rng.sampler"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = record["numpy_rng"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
