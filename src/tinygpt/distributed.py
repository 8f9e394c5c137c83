"""Running as one of several processes under `torchrun`: joining, agreeing, failing clearly.

`tinygpt train` can also start such a job itself on one CPU machine (`local_processes`,
`run_local_workers`): one process per core, the cores shared out among them. The training loop never
asks how many processes there are; it calls these helpers, which
do nothing when the process is alone. DDP itself wraps the model (`wrap`); the model never
knows about ranks.
"""

from __future__ import annotations

import collections
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tinygpt.errors import ConfigError, PeerLost
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


def rank0_value(value: float, world: Distributed, device: torch.device) -> float:
    """Rank 0's number on every rank."""
    if not world.enabled:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


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


# ----------------------------------------------------------------------------- a job on this machine

MOST_LOCAL_PROCESSES = 8  # processes=0 stops here: past it, each process's share of a batch gets small


CGROUP = Path("/sys/fs/cgroup")  # this process's control group, as a container sees its own


def quota_cores(cgroup: Path = CGROUP) -> int | None:
    """The whole CPUs a control group's CPU quota allows (at least 1), or None without a quota.
    A container limited to fewer CPUs than the machine shows it has one: cgroup v2's cpu.max
    ("QUOTA PERIOD", or "max ..."), else cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # v1's controller folder, by its names
            try:
                quota = (cgroup / folder / "cpu.cfs_quota_us").read_text().strip()
                period = (cgroup / folder / "cpu.cfs_period_us").read_text().strip()
                break
            except OSError:
                continue
        else:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for no quota
        return None
    return max(1, quota_us // period_us)


def physical_cores() -> int:
    """The cores this process may run on, each counted once however many hardware threads it
    has, and no more than its control group's CPU quota allows."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:  # no topology to read: count the hardware thread as a core
            cores.add(str(cpu))
    quota = quota_cores()
    return max(1, min(len(cores), quota) if quota else len(cores))


def local_processes(requested: int, micro_batch: int, device_name: str) -> tuple[int, str]:
    """How many training processes `tinygpt train` starts here (1: it trains itself), and why.

    On a CPU, one process per core, each with one thread, keeps the cores busier than one
    process whose OpenMP threads meet at every operation (README.md, "All of a CPU's cores")."""
    if "WORLD_SIZE" in os.environ:
        return 1, "already one of a job's processes"
    if requested == 1:
        return 1, "processes = 1"
    device = resolve_device(device_name)
    if device.type != "cpu":
        if requested > 1:
            raise ConfigError(f"processes = {requested} is for training on CPU cores; on {device.type}, "
                              f"start the processes with torchrun")
        return 1, f"training on {device.type}"
    if requested > 1:
        if micro_batch % requested:
            raise ConfigError(f"the micro-batch ({micro_batch} = batch_size / grad_accum) must divide among "
                              f"processes = {requested}")
        return requested, f"processes = {requested}"
    cores = physical_cores()
    count = max(n for n in range(1, min(cores, MOST_LOCAL_PROCESSES) + 1) if micro_batch % n == 0)
    return count, f"one per core ({cores} physical cores, as many as divide the micro-batch of {micro_batch})"


def run_local_workers(argv: list[str], processes: int, environment: dict[str, str]) -> int:
    """Run `tinygpt ARGV` as `processes` processes of one job on this machine, as `torchrun
    --standalone` would, in `environment`: the cores shared out among them (unless
    OMP_NUM_THREADS is set), process 0 speaking for the job on the terminal. Ctrl-C and SIGTERM
    reach every process, which stop together after saving. Returns the job's exit status:
    process 0's, else the first failing process's. Another process's last lines are printed
    when it failed in a way process 0 cannot have said (a crash, a signal)."""
    port = _free_port()
    threads = environment.get("OMP_NUM_THREADS") or str(max(1, physical_cores() // processes))
    workers: list[subprocess.Popen] = []
    tails = []
    forwarded = {signum: signal.signal(signum, lambda number, frame: _forward(workers, number))
                 for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(processes):
            env = dict(environment, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                       LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=threads)
            quiet = rank > 0  # the others' errors repeat process 0's, or follow from its failure
            worker = subprocess.Popen([sys.executable, "-m", "tinygpt", *argv], env=env,
                                      stdout=subprocess.DEVNULL if quiet else None,
                                      stderr=subprocess.PIPE if quiet else None, text=True)
            workers.append(worker)
            tails.append(_keep_tail(worker.stderr) if quiet else None)
        codes = [worker.wait() for worker in workers]
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
    for rank, code in enumerate(codes):
        if code < 0:
            print(f"tinygpt train: process {rank} of {processes} was killed by signal {-code}", file=sys.stderr)
        if rank > 0 and code not in (0, 130):  # 130: stopped by Ctrl-C, as process 0 said
            tails[rank][1].join(timeout=5)
            said = "".join(tails[rank][0])
            if "tinygpt train: error:" not in said and said.strip():
                print(f"tinygpt train: process {rank} of {processes} failed (exit {code}):", file=sys.stderr)
                sys.stderr.write(said)
    failed = [code for code in codes if code]
    code = codes[0] or (failed[0] if failed else 0)
    return 128 - code if code < 0 else code


def _forward(workers: list[subprocess.Popen], signum: int) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signum)


def _keep_tail(stream) -> tuple[collections.deque, threading.Thread]:
    """Read a process's stderr as it comes (so it never blocks on a full pipe), keeping its last lines."""
    lines: collections.deque = collections.deque(maxlen=20)
    reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    reader.start()
    return lines, reader


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
