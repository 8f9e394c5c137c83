"""Per-device speed paths, and the one place where a run decides which of them it uses.

model.py is the math. What is fastest for that math differs by device, so a run decides,
once when it starts, four things and records them in its saved config and checkpoint:

* precision: bf16 autocast or float32 (hardware.choose_precision; on a CPU with native
  bf16 it times one matmul in each);
* attention: for training, SDPA or the attention written out as matmuls and a softmax
  (CausalSelfAttention.explicit). SDPA's CPU kernels have no fused dropout, and their bf16
  backward can be slower than the written-out form, so on a CPU this is timed once;
* dropout_mask: nn.Dropout, or a mask made from 16 random bits per element (`Bits16Dropout`),
  cheaper on a CPU where torch draws one random number per element;
* decode_copies: whether a batch-1 decode step reads per-core re-laid-out copies of the
  weights (`decoding`), which a memory-bound CPU matrix-vector product reads faster.

`plan()` makes those choices, each with its reason; the TrainConfig's "auto" values are
replaced by the choices (`SpeedPlan.resolved`), so a resumed run or a loaded checkpoint
reads them back and never re-times anything. `--set attention=sdpa` (etc.) overrides a choice. Nothing here draws from
the global random number generator: timers use their own.
BENCHMARKS.md ("Training speed", "Generation speed") has the measurements behind each rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.config import TrainConfig
from tinygpt.hardware import Precision, choose_precision

SPEED_KEYS = ("dtype", "attention", "dropout_mask", "decode_copies")


@dataclass
class SpeedPlan:
    precision: Precision
    attention: str  # "sdpa" or "explicit"
    dropout_mask: str  # "torch" or "bits16"
    decode_copies: str  # "on" or "off"
    reasons: dict[str, str]

    def resolved(self, config: TrainConfig) -> TrainConfig:
        """`config` with every "auto" speed choice replaced by this plan's."""
        return dataclasses.replace(config, dtype=self.precision.name, attention=self.attention,
                                   dropout_mask=self.dropout_mask, decode_copies=self.decode_copies)

    def describe(self) -> list[str]:
        return [f"precision: {self.precision.reason}",
                *(f"{key}: {getattr(self, key)} ({self.reasons[key]})"
                  for key in ("attention", "dropout_mask", "decode_copies"))]


def plan(device: torch.device, config: TrainConfig, dropout: float, given: str = "as configured") -> SpeedPlan:
    """Resolve the config's "auto" speed choices for this device; values already chosen are
    kept, with `given` as their reason (a resumed run passes "as the run started")."""
    if config.dtype == "auto":
        precision = choose_precision(device, "auto")
    else:
        precision = Precision(getattr(torch, config.dtype), f"{config.dtype}: {given}")
    reasons = {}
    attention = config.attention
    if attention != "auto":
        reasons["attention"] = given
    elif device.type == "cuda":
        attention, reasons["attention"] = "sdpa", "fused kernels on CUDA, dropout included"
    elif dropout > 0:
        attention, reasons["attention"] = "explicit", f"SDPA has no fused dropout on {device.type}"
    elif device.type == "cpu" and explicit_attention_is_faster(precision.dtype):
        attention, reasons["attention"] = "explicit", f"timed faster than SDPA in {precision.name} on this CPU"
    elif device.type == "cpu":
        attention, reasons["attention"] = "sdpa", f"timed no slower than the explicit form in {precision.name}"
    else:
        attention, reasons["attention"] = "sdpa", f"torch's own kernels on {device.type}"
    dropout_mask = config.dropout_mask
    if dropout_mask != "auto":
        reasons["dropout_mask"] = given
    elif device.type == "cpu" and dropout > 0:
        dropout_mask, reasons["dropout_mask"] = "bits16", "one 64-bit draw per 4 elements on the CPU"
    else:
        dropout_mask = "torch"
        reasons["dropout_mask"] = "no dropout" if dropout == 0 else f"torch's own kernel on {device.type}"
    decode_copies = config.decode_copies
    if decode_copies != "auto":
        reasons["decode_copies"] = given
    elif device.type == "cpu":
        decode_copies, reasons["decode_copies"] = "on", "a CPU decode step is bound by memory bandwidth"
    else:
        decode_copies, reasons["decode_copies"] = "off", f"{device.type} kernels read the weights as they are"
    return SpeedPlan(precision, attention, dropout_mask, decode_copies, reasons)


def apply(model: nn.Module, speed: SpeedPlan) -> nn.Module:
    """Switch the model onto the plan's paths: attention form, dropout masks, decode copies."""
    for module in model.modules():
        if hasattr(module, "explicit"):
            module.explicit = speed.attention == "explicit"
        for name, child in module.named_children():
            if speed.dropout_mask == "bits16" and type(child) is nn.Dropout:
                setattr(module, name, Bits16Dropout(child.p))
            elif speed.dropout_mask == "torch" and type(child) is Bits16Dropout:
                setattr(module, name, nn.Dropout(child.p))
    model.decode_copies = speed.decode_copies == "on"
    return model


# ----------------------------------------------------------------------------- attention timing


def _attention_seconds(attention, dtype: torch.dtype, shape=(8, 8, 64, 48), repeats: int = 3) -> float:
    """Best time of one forward + backward of a causal attention on random (B, nh, T, hd) inputs."""
    generator = torch.Generator().manual_seed(0)  # not the global one: timing moves no run's RNG
    inputs = [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        start = time.perf_counter()
        attention(q, k, v).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with a causal mask, as plain matmuls and a softmax."""
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v  # (B, nh, T, hd)


def explicit_attention_is_faster(dtype: torch.dtype) -> bool:
    """Whether, for training on this CPU in `dtype`, the written-out attention beats SDPA's
    flash kernel forward + backward, at seed-like sizes. Called once, when a run starts."""
    with torch.enable_grad():
        flash = _attention_seconds(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype)
        explicit = _attention_seconds(explicit_causal_attention, dtype)
    return explicit < flash


# ----------------------------------------------------------------------------- dropout masks


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0 with probability ~p, else `scale`: a CPU dropout mask from 16 random bits per element.

    Torch's CPU dropout draws one random number per element; here one 64-bit random word
    decides four elements (each 16-bit quarter is kept below a threshold). The kept value
    `scale` is 1 / (1 - p) as `dtype` stores it (bf16 rounds it to 8 significant bits), and
    the keep rate is chosen to match that scale, so the mask's expected value is 1 to within
    half a step of 1/65536 times the scale; the drop rate is then p moved by that rounding
    (bf16: at most about 0.4 % of the scale, so 0.05 becomes 0.0519; float32: 1/65536).
    """
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype).item()
    keep = min(65536, max(1, round(65536 / scale)))  # of 65536 equally likely values, this many kept
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64)  # 64 random bits
    quarters = words.view(torch.int16)[:count].view(shape)  # uniform over -32768..32767
    mask = torch.empty(shape, dtype=dtype)
    # straight into `dtype`: a bool mask converted afterwards costs several times more;
    # the `keep` lowest of the 65536 values are kept (the bound stays inside int16)
    torch.le(quarters, keep - 32769, out=mask)
    return mask.mul_(scale)


class Bits16Dropout(nn.Dropout):
    """nn.Dropout with `dropout_mask` on the CPU (other devices keep torch's kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * dropout_mask(x.shape, self.p, x.dtype)


# ----------------------------------------------------------------------------- decode copies


class _DecodeProduct:
    """A Linear's forward for decoding on the CPU: a single row (batch 1, one position) is
    multiplied by a copy of the weight laid out (chunks, in, out / chunks), one chunk per
    core, in one bmm; a plain F.linear reads the (out, in) weight with one core. Each output
    is still one dot product over `in`. Anything else takes F.linear."""

    def __init__(self, linear: nn.Linear, chunks: int):
        self.linear = linear
        out, inputs = linear.out_features, linear.in_features
        chunks = chunks if out % chunks == 0 else 1
        self.copy = linear.weight.detach().view(chunks, out // chunks, inputs).transpose(1, 2).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear, copy = self.linear, self.copy
        if x.numel() == linear.in_features and x.dtype == copy.dtype and not torch.is_grad_enabled():
            y = torch.bmm(x.reshape(1, 1, -1).expand(copy.size(0), 1, -1), copy)  # (chunks, 1, out / chunks)
            y = y.view(*x.shape[:-1], linear.out_features)
            return y if linear.bias is None else y + linear.bias
        return F.linear(x, linear.weight, linear.bias)


_open_decodings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> open contexts


@contextlib.contextmanager
def decoding(model: nn.Module):
    """Within: batch-1 products read per-core weight copies (when the model's plan says so,
    by default on a CPU). The first open context makes them, the last one to close drops
    them: nothing tells reliably when weights change (a fused optimizer step moves no
    version counter), so copies must not outlive a generation. Contexts may nest or
    interleave (the server runs several generations on one model)."""
    weight = next(model.parameters())
    enabled = getattr(model, "decode_copies", weight.device.type == "cpu") and weight.device.type == "cpu"
    depth = _open_decodings.get(model, 0)
    _open_decodings[model] = depth + 1
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        if depth == 0 and enabled:
            with torch.no_grad():
                for linear in linears:
                    linear.forward = _DecodeProduct(linear, torch.get_num_threads())
        yield
    finally:
        _open_decodings[model] -= 1
        if _open_decodings[model] == 0:
            for linear in linears:
                linear.__dict__.pop("forward", None)
