"""The optimizers and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from tinygpt.config import TrainConfig


def build_optimizers(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (weight decay on matrices only, unless decay_all_params); with optimizer=muon,
    Muon takes the blocks' hidden matrices and AdamW keeps embeddings, head, norms, biases."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_params = []
    if config.optimizer == "muon":
        muon_params = [p for n, p in named if n.startswith("blocks.") and p.dim() == 2]
    muon_ids = {id(p) for p in muon_params}
    rest = [p for _, p in named if id(p) not in muon_ids]
    decay = [p for p in rest if config.decay_all_params or p.dim() >= 2]
    no_decay = [p for p in rest if not (config.decay_all_params or p.dim() >= 2)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = device.type in ("cuda", "cpu")  # one kernel for all parameters instead of one per tensor
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)
    ]
    if muon_params:
        muon_lr = config.muon_lr or config.learning_rate
        muon = torch.optim.Muon(muon_params, lr=muon_lr, weight_decay=config.weight_decay,
                                adjust_lr_fn="match_rms_adamw")
        muon.param_groups[0]["lr_scale"] = muon_lr / config.learning_rate  # the schedule moves both rates together
        optimizers.append(muon)
    return optimizers


def learning_rate_at(iteration: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then constant, or cosine decay to min_lr at max_iters (or at max_time
    seconds, whichever comes first, when a time budget is set), or wsd (warmup-stable-decay):
    the peak rate until the last decay_fraction of the run, then a straight line to min_lr."""
    if iteration < config.warmup_iters:
        return config.learning_rate * (iteration + 1) / config.warmup_iters
    if config.schedule == "constant":
        return config.learning_rate
    decay_steps = max(1, config.max_iters - config.warmup_iters)
    progress = min(1.0, (iteration - config.warmup_iters) / decay_steps)
    if config.max_time > 0:
        progress = max(progress, min(1.0, elapsed / config.max_time))
    if config.schedule == "wsd":
        decayed = max(0.0, progress - (1 - config.decay_fraction)) / config.decay_fraction  # 0 -> 1
        return config.learning_rate + min(1.0, decayed) * (config.min_lr - config.learning_rate)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    """lr is the schedule's AdamW rate; a group with an lr_scale (Muon's, when muon_lr is set) takes that multiple."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
