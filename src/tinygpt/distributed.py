"""Running as one of several processes under `torchrun`: joining, agreeing, failing clearly.

The training loop never asks how many processes there are; it calls these helpers, which
do nothing when the process is alone. DDP itself wraps the model (`wrap`); the model never
knows about ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygpt.errors import PeerLost
from tinygpt.hardware import resolve_device


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


def setup(device_name: str) -> tuple[Distributed, torch.device]:
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
        raise PeerLost(f"process {rank} of {world_size}: could not meet the other processes at {where} "
                       f"[{first_line(e)}]") from None
    return Distributed(rank, world_size, local_rank), device


def teardown(world: Distributed) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer is gone: c10d raises DistError subclasses
    (NCCL, store, timeouts); gloo's transport raises a RuntimeError naming gloo."""
    return isinstance(error, dist.DistError) or "gloo" in str(error)


def peer_lost(world: Distributed, error: BaseException) -> PeerLost:
    return PeerLost(
        f"process {world.rank} of {world.world_size}: another process of the job crashed or stopped "
        f"answering (see its own error); the last checkpoint is intact, rerun with --resume [{first_line(error)}]")


def wrap(model: torch.nn.Module, world: Distributed, device: torch.device) -> torch.nn.Module:
    """The model as the processes train it together: DDP averages gradients in backward."""
    if not world.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def same_on_all_ranks(value: int, world: Distributed, device: torch.device) -> bool:
    if not world.enabled:
        return True
    low_high = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(low_high, op=dist.ReduceOp.MAX)
    return low_high[0].item() == -low_high[1].item()


def all_reduce_mean(value: torch.Tensor, world: Distributed) -> torch.Tensor:
    if world.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.world_size
    return value


def all_reduce_sum(value: float, world: Distributed, device: torch.device) -> float:
    if not world.enabled:
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item()


def rank0_choices(values: list[int], world: Distributed, device: torch.device) -> list[int]:
    """Rank 0's values on every rank: one decision for the whole job."""
    if not world.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def agree(flag: bool, world: Distributed, device: torch.device) -> bool:
    """The same decision on every rank (rank 0's)."""
    return bool(rank0_choices([int(flag)], world, device)[0])


def any_rank(flag: bool, world: Distributed, device: torch.device) -> bool:
    """True on every rank if it is true on one."""
    if not world.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
