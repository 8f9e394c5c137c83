"""The device and its precision: which device, what the CPU is, whether bf16 pays.

CPUs differ: one with avx512_bf16 (or AMX) multiplies bf16 matrices faster than fp32,
one without it emulates bf16 and is several times slower. So on a CPU we look at the
flags and, where native bf16 exists, time one matmul in each precision before choosing.
speed.py records the choice with the run's other per-device choices.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from tinygpt.errors import TinyGPTError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TinyGPTError("--device cuda: no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TinyGPTError("--device mps: Apple's MPS backend is not available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise TinyGPTError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def cpu_description() -> str:
    """The CPU's name, family/model numbers and the flags that decide the precision."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = cpu_flags()
    relevant = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    numbers = f", family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    return f"{cpu_model_name()}{numbers}; {' '.join(relevant) or 'no AVX2/AVX-512'}; {os.cpu_count()} CPUs"


def matmul_flops_per_second(dtype: torch.dtype, size: int = 1024, repeats: int = 5,
                            device: torch.device | str = "cpu", seconds: float = 1.0) -> float:
    """Best-of-`repeats` FLOP/s of a size x size matmul (or of a smaller one: see measure_matmul)."""
    return measure_matmul(dtype, size, repeats, device, seconds)[0]


def measure_matmul(dtype: torch.dtype, size: int, repeats: int = 5, device: torch.device | str = "cpu",
                   seconds: float = 1.0) -> tuple[float, int]:
    """Best-of-`repeats` FLOP/s of a square matmul, and the side it had.

    A CPU without native bf16 emulates it so slowly that one large bf16 multiply can take a minute.
    So smaller multiplies are timed first, and where the asked-for side would take longer than
    `seconds` the measured one is cut to fit (fitting_size); the callers report the side used.
    """
    side = fitting_size(dtype, size, device, seconds)
    a, b = _random_pair(side, dtype, device)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        best = min(best, _timed_multiply(a, b))
    return 2 * side**3 / best, side


def fitting_size(dtype: torch.dtype, size: int, device: torch.device | str, seconds: float,
                 probe_seconds: float = 0.05) -> int:
    """The side up to `size` whose multiply fits `seconds`, estimated from a smaller one by the cube
    of the sides, rounded down to a multiple of 64 (the fast paths' tiles), and at least
    min(size, 128). A tiny multiply costs its launch more than its arithmetic (on a GPU most of
    all), so the probe's side doubles, from 128, until its own time reaches `probe_seconds`."""
    if size <= 0 or not seconds > 0:
        raise ValueError(f"a matmul side and a time budget must be positive, got {size} and {seconds}")
    floor = min(size, 128)
    probe = floor
    while True:
        a, b = _random_pair(probe, dtype, device)
        a @ b  # warm up
        taken = _timed_multiply(a, b)
        estimate = taken * (size / probe) ** 3
        if estimate <= seconds:
            return size
        if taken >= probe_seconds or probe * 2 > size:
            return max(floor, int(size * (seconds / estimate) ** (1 / 3)) // 64 * 64)
        probe *= 2


def _random_pair(size: int, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # not the global one: timing moves no run's RNG
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    return a, b


def _timed_multiply(a: torch.Tensor, b: torch.Tensor) -> float:
    cuda = a.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(a.device)
    start = time.perf_counter()
    a @ b
    if cuda:
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - start


@dataclass
class Precision:
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    reason: str

    @property
    def name(self) -> str:
        return "bfloat16" if self.dtype == torch.bfloat16 else "float32"

    def autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@cache
def _cpu_bf16_choice() -> Precision:
    flags = cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not native:
        return Precision(torch.float32, "float32: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)")
    bf16, side = measure_matmul(torch.bfloat16, 1024)
    fp32 = matmul_flops_per_second(torch.float32, side)  # the same side (cut only if bf16 is that slow)
    ratio = bf16 / fp32
    summary = f"{'/'.join(native)}; {side}^3 matmul bf16 {bf16 / 1e9:.0f} vs fp32 {fp32 / 1e9:.0f} GFLOP/s"
    if ratio > 1.2:
        return Precision(torch.bfloat16, f"bfloat16 autocast: {summary} ({ratio:.1f}x)")
    return Precision(torch.float32, f"float32: {summary}, bf16 not faster ({ratio:.2f}x)")


def choose_precision(device: torch.device, requested: str = "auto") -> Precision:
    if requested == "float32":
        return Precision(torch.float32, "float32: requested")
    if requested == "bfloat16":
        return Precision(torch.bfloat16, "bfloat16 autocast: requested")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "bfloat16 autocast: the GPU supports bf16")
        return Precision(torch.float32, "float32: the GPU lacks bf16")
    if device.type == "cpu":
        return _cpu_bf16_choice()
    return Precision(torch.float32, f"float32: the default on {device.type}")


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls on Ampere and newer GPUs: ~fp32 accuracy for training, far faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
