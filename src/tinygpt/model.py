"""The GPT: a decoder-only transformer, in one file.

    token ids (B, T)
      -> token embedding (+ learned position embedding, unless positions are rotary)
      -> n_layer x Block: causal self-attention and an MLP, each with a residual and a norm
      -> final norm -> LM head -> logits over the vocabulary (B, T, V)

Shapes in comments use B = batch, T = time (characters), C = n_embd, nh = n_head,
hd = head size (C / nh), V = vocab_size. Options are plain `if`s on `ModelConfig`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.config import ModelConfig
from tinygpt.hardware import cpu_prefers_explicit_attention


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotary_cos_sin(positions: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotation angles, (T, hd/2) each."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2, device=positions.device) / head_size))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1[i], x2[i]) of the two halves of the head by its angle."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hd)
    return rotated.type_as(x)


class KVCache:
    """Preallocated keys and values of every layer, for generation one token at a time.

    A prefill stores a whole context; then each decode step stores one new position and
    its query attends to every position held. The buffer holds block_size positions and
    rolls: position p lives in slot (p - first) % block_size, `first` being the first
    position of the last prefill, so a new position overwrites the one block_size back:
    exactly the key that leaves a rotary model's sliding window. With learned positions,
    generate.py starts over (reset + prefill) before the context outgrows block_size, so
    there the buffer never rolls. Nothing is allocated after __init__.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, block, hd)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.layer_keys = self.keys.unbind(0)  # per-layer views (B, nh, block, hd): no indexing per step
        self.layer_values = self.values.unbind(0)
        self.size = config.block_size
        self.first = 0  # the first position of the last prefill

    def reset(self, first_position: int = 0) -> None:
        """Forget what is held: the next store is the prefill of positions from first_position."""
        self.first = first_position

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, nh, T, hd) of positions start..start+T-1 and return what the
        new queries attend to: when prefilling (T > 1, right after reset), the new keys
        themselves (the caller masks them); when decoding (T == 1), every key held."""
        T = k.size(2)
        keys, values = self.layer_keys[layer], self.layer_values[layer]
        offset = start - self.first  # positions stored before these since the prefill
        if T > 1:
            keep = min(T, self.size)  # only the last block_size positions can be attended to later
            slot = (offset + T - keep) % self.size
            if slot + keep <= self.size:
                keys[:, :, slot:slot + keep].copy_(k[:, :, T - keep:])
                values[:, :, slot:slot + keep].copy_(v[:, :, T - keep:])
            else:  # a prompt longer than the buffer wraps around it
                slots = torch.arange(offset + T - keep, offset + T, device=k.device) % self.size
                keys.index_copy_(2, slots, k[:, :, T - keep:].to(keys.dtype))
                values.index_copy_(2, slots, v[:, :, T - keep:].to(values.dtype))
            return k, v
        slot = offset % self.size
        keys[:, :, slot:slot + 1].copy_(k)
        values[:, :, slot:slot + 1].copy_(v)
        held = min(offset + 1, self.size)
        # slot order is not position order once the buffer rolls; one query attending to
        # every key needs no mask, and the softmax does not care about the order
        return keys[:, :, :held], values[:, :, :held]  # (B, nh, held, hd)


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0 with probability ~p, else 1 / (1 - p): a CPU dropout mask from 16 random bits per element.

    PyTorch's CPU dropout draws one random number per element, ~6 ns each here: about a sixth
    of a training step at the seed sizes. One 64-bit random word decides four elements instead
    (each 16-bit quarter is dropped below p * 65536), ~4x cheaper forward and backward. The
    rate is p rounded to a multiple of 1/65536 and the scale uses that rate, so the expected
    value is exactly unchanged.
    """
    drop = min(round(p * 65536), 65535)  # of 65536 equally likely values, this many are dropped
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64)  # 64 random bits
    quarters = words.view(torch.int16)[:count].view(shape)  # uniform over -32768..32767
    mask = torch.empty(shape, dtype=dtype)
    torch.ge(quarters, drop - 32768, out=mask)  # 1 where kept; straight into `dtype`, ~6x faster than via bool
    return mask.mul_(65536 / (65536 - drop))


class Dropout(nn.Module):
    """nn.Dropout, with the cheaper mask of `dropout_mask` on the CPU (GPUs keep F.dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * dropout_mask(x.shape, self.p, x.dtype)


class Linear(nn.Linear):
    """nn.Linear, with a faster product for a single row on the CPU: a batch-1 decode step.

    There the product reads every weight once for one row, so it is bound by memory
    bandwidth. F.linear reads the (out, in) weight with one core at ~14 GB/s on this
    project's CPUs; a copy laid out (chunks, in, out / chunks) and one bmm read it at
    ~20 GB/s per core, one chunk per core. Each output is still one dot product over `in`.
    The copy exists only inside GPT.decoding() (generation), which makes it on entry and
    drops it on exit: nothing can tell reliably when weights change (a fused optimizer step
    does not move a tensor's version counter), so the copy must not outlive a generation.
    """

    decode_copy: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copy = self.decode_copy
        if (copy is not None and x.numel() == self.in_features and x.dtype == copy.dtype
                and x.device == copy.device and not torch.is_grad_enabled()):
            y = torch.bmm(x.reshape(1, 1, -1).expand(copy.size(0), 1, -1), copy)  # (chunks, 1, out / chunks)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def make_decode_copy(self, chunks: int) -> None:
        chunks = chunks if self.out_features % chunks == 0 else 1
        self.decode_copy = (self.weight.detach().view(chunks, self.out_features // chunks, self.in_features)
                            .transpose(1, 2).contiguous())  # (chunks, in, out / chunks)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        # one matmul makes the queries, keys and values of every head
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = Dropout(config.dropout)  # on the attention weights
        self.resid_dropout = Dropout(config.dropout)
        self.record_attention = False  # set by attention_maps(); costs nothing when off
        self.last_attention: torch.Tensor | None = None

    def forward(self, x, rotary=None, mask=None, cache: KVCache | None = None, layer=0, start=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hd)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.store(layer, k, v, start)  # (B, nh, S, hd): the S keys the queries see
        # a single decoded query attends to every key in its window: no mask needed
        causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        if self.record_attention or self.explicit_is_faster(x.device, q.dtype, dropout):
            y = self.explicit_attention(q, k, v, mask, causal)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads: (B, T, C)
        return self.resid_dropout(self.proj(y))

    @staticmethod
    def explicit_is_faster(device: torch.device, dtype: torch.dtype, dropout: float) -> bool:
        """Whether explicit_attention beats SDPA here: a per-device choice for training."""
        if device.type == "cuda" or not torch.is_grad_enabled():
            return False  # fused kernels (dropout included) on CUDA; no backward to pay for otherwise
        if dropout > 0:
            return True  # no fused kernel with dropout: SDPA would do the same with a slower mask
        return device.type == "cpu" and cpu_prefers_explicit_attention(dtype)

    def explicit_attention(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(hd)) v, step by step: what SDPA computes, with the weights
        kept for attention_maps() and dropped out in training."""
        T, S = q.size(2), k.size(2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))  # (B, nh, T, S)
        if causal:  # query i sees keys 0..i, as SDPA's is_causal
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)  # (B, nh, T, S)
        if self.record_attention:
            self.last_attention = weights
        return self.attn_dropout(weights) @ v  # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.activation = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.down = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(self.activation(self.up(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, mask=None, cache=None, layer=0, start=0):
        if self.pre_norm:  # x + f(norm(x)): the residual stream is never normalised
            x = x + self.attn(self.norm1(x), rotary, mask, cache, layer, start)
            x = x + self.mlp(self.norm2(x))
        else:  # norm(x + f(x)): the original transformer's and the notebook's order
            x = self.norm1(x + self.attn(x, rotary, mask, cache, layer, start))
            x = self.norm2(x + self.mlp(x))
        return x  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        else:
            # cos/sin of every position's angles, computed once (not saved: not a weight)
            cos, sin = rotary_cos_sin(torch.arange(config.block_size), config.n_embd // config.n_head)
            self.register_buffer("rotary_cos", cos, persistent=False)  # (positions, hd/2)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.decode_depth = 0  # how many decoding() contexts are open
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Every trainable number, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def matmul_parameters(self) -> int:
        """N in the FLOP formula: weights of the matrix multiplies (blocks and LM head)."""
        return sum(
            m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)
        )

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus
        12 * n_layer * n_embd * T for the attention scores and their weighted sum."""
        T = context or self.config.block_size
        return 6 * self.matmul_parameters() + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(self, idx, targets=None, *, start: int = 0, cache: KVCache | None = None):
        """Logits (B, T, V) for tokens idx (B, T) at positions start..start+T-1; with targets
        (B, T), also the mean cross-entropy loss."""
        B, T = idx.shape
        config = self.config
        positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.token_embedding(idx)  # (B, T, C)
        rotary = None
        if config.positions == "learned":
            if start + T > config.block_size:
                raise ValueError(f"positions up to {start + T} exceed block_size {config.block_size}")
            x = x + self.position_embedding(positions)  # (B, T, C) + (T, C)
        else:
            rotary = self.rotary_tables(start, T)
        mask = None
        if T > config.block_size:
            # rotary only: each query sees the block_size most recent keys (itself included),
            # the same window a rolling KV cache keeps
            distance = positions[:, None] - positions[None, :]  # (T, T)
            mask = (distance >= 0) & (distance < config.block_size)
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, mask, cache, layer, start)
        x = self.final_norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def rotary_tables(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, hd/2) of positions start..start+T-1, from tables computed once."""
        end = start + T
        if end > self.rotary_cos.size(0):  # generation past the tables: grow them (doubling)
            self.extend_rotary(max(end, 2 * self.rotary_cos.size(0)))
        return self.rotary_cos[start:end], self.rotary_sin[start:end]

    def extend_rotary(self, length: int) -> None:
        """Make the rotary tables cover positions 0..length-1. New rows are computed a
        block_size at a time, each chunk exactly as the first was, so a row's numbers never
        depend on when it was computed (the cached and uncached paths read the same ones)."""
        block = self.config.block_size
        cos_chunks, sin_chunks = [self.rotary_cos], [self.rotary_sin]
        # the tables must stay usable for training, even when grown during generation
        with torch.inference_mode(False), torch.no_grad():
            for first in range(self.rotary_cos.size(0), length, block):
                positions = torch.arange(first, first + block, device=self.rotary_cos.device)
                cos, sin = rotary_cos_sin(positions, self.config.n_embd // self.config.n_head)
                cos_chunks.append(cos)
                sin_chunks.append(sin)
            self.rotary_cos, self.rotary_sin = torch.cat(cos_chunks), torch.cat(sin_chunks)

    @contextlib.contextmanager
    def decoding(self):
        """Within: on the CPU, batch-1 matrix products read per-core copies of the weights
        (see Linear), made by the first open context and dropped when the last one closes,
        so the weights must not change inside (generations may interleave: serve)."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        self.decode_depth += 1
        try:
            if self.decode_depth == 1 and self.lm_head.weight.device.type == "cpu":
                with torch.no_grad():
                    for linear in linears:
                        linear.make_decode_copy(torch.get_num_threads())
            yield
        finally:
            self.decode_depth -= 1
            if self.decode_depth == 0:
                for linear in linears:
                    linear.decode_copy = None

    @torch.no_grad()
    def attention_maps(self, idx) -> torch.Tensor:
        """Attention weights of every layer and head for idx (1, T): (L, nh, T, T)."""
        maps = []
        for block in self.blocks:
            block.attn.record_attention = True
        try:
            self(idx)
            maps = [block.attn.last_attention[0] for block in self.blocks]
        finally:
            for block in self.blocks:
                block.attn.record_attention = False
                block.attn.last_attention = None
        return torch.stack(maps)
