"""int8 weights for decoding on a CPU: every Linear's weight stored as int8 rows.

A batch-1 decode step reads every weight once to make one token, so on a CPU it is bound by
memory, and int8 weights are a quarter of float32's bytes. `int8_model` replaces each
`nn.Linear` of a GPT with an `Int8Linear`: its weight rounded to int8 with one scale per
output row (the row's largest magnitude maps to 127), multiplied by torch's weight-only int8
kernel (`torch._weight_int8pack_mm`, the one torchao uses on CPUs) with bfloat16
activations. The weights alone are quantized: each row of the input is multiplied on its own,
as in float32, so a token's logits do not depend on what else is in the batch, and cached
and uncached decoding agree. (Dynamic quantization, which also rounds the activations with
one scale per call, breaks that: a prefill and a decode step round the same row
differently.) Embeddings and norms stay float32. The text differs from float32's by the
rounding. BENCHMARKS.md ("int8 decoding") has its speed and its cost in bits per character.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from tinygpt.errors import ConfigError
from tinygpt.model import GPT

ACTIVATIONS = torch.bfloat16  # the kernel's input type: its float32 path is the slow one
# The kernel crashes the process (a segmentation fault, torch 2.13 on x86) for some input widths
# that are not a multiple of 8 and for 8 itself; a Linear whose input width is not a multiple of
# this stays in float32.
KERNEL_INPUTS = 32


class Int8Linear(nn.Module):
    """y = x W^T + b, with W held as int8 (out, in) and a bfloat16 scale per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp_min(1e-30) / 127  # (out,); an all-zero row keeps a normal scale
        # round with the scale the kernel will multiply by (bfloat16's), not the exact one
        scales = scales.to(ACTIVATIONS)
        rows = torch.round(weight / scales.float()[:, None]).clamp(-127, 127)  # (out, in)
        self.register_buffer("weight_int8", rows.to(torch.int8).contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(ACTIVATIONS)  # (N, in)
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales).to(x.dtype)  # (N, out)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def int8_model(model: GPT) -> GPT:
    """An inference-only copy of `model` whose Linear layers hold int8 weights (CPU only); a
    Linear whose input width the kernel cannot take (see KERNEL_INPUTS) stays float32."""
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("--int8 decodes on the CPU (torch's int8 kernel for CPUs); pass --device cpu")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise ConfigError(f"--int8 needs torch's weight-only int8 kernel, which torch {torch.__version__} lacks")
    quantized = copy.deepcopy(model).eval().requires_grad_(False)
    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % KERNEL_INPUTS == 0:
                setattr(parent, name, Int8Linear(child))
    quantized.decode_copies = False  # the per-core weight copies (speed.py) are for float weights
    return quantized
