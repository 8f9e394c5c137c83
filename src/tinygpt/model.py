"""The GPT: a decoder-only transformer, in one file, in the order a forward pass runs.

    token ids (B, T)
      -> token embedding (+ learned position embedding, unless positions are rotary)
      -> n_layer x Block: causal self-attention and an MLP, each with a residual and a norm
      -> final norm -> LM head -> logits over the vocabulary (B, T, V)

Shapes in comments use B = batch, T = time (tokens), C = n_embd, nh = n_head,
hd = head size (C / nh), V = vocab_size. Options are plain `if`s on `ModelConfig`.

This file is the math only. How fast it runs on a given device is decided elsewhere
(speed.py), once per run: that module may switch a layer's training attention to the
written-out form below or swap in a cheaper dropout mask, but never changes what is computed.
Generation's key/value cache lives in generate.py; here a layer only hands it its new
keys and values and attends to what it gives back.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.config import ModelConfig

# ----------------------------------------------------------------------------- positions


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


# ----------------------------------------------------------------------------- attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        # one matmul makes the queries, keys and values of every head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)  # on the attention weights (explicit form)
        self.resid_dropout = nn.Dropout(config.dropout)
        # queries and keys at unit RMS per head: attention logits cannot grow with the weights
        self.qk_norm = nn.RMSNorm(self.head_size, eps=1e-6) if config.qk_norm else None
        self.explicit = False  # train with the written-out form below (speed.py decides, per device)
        self.record_attention = False  # keep the weights for GPT.attention_maps()
        self.last_attention: torch.Tensor | None = None

    def forward(self, x, rotary=None, mask=None, cache=None, layer=0, start=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hd)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            # (B, nh, S, hd): the S keys the queries see; held (B, 1, 1, S) marks the keys each
            # row holds when rows hold different numbers (batched decoding), else None
            k, v, held = cache.store(layer, k, v, start)
            if held is not None:
                mask = held
        causal = mask is None and T > 1  # a single decoded query attends to every key: no mask
        if self.record_attention or (self.explicit and self.training):
            y = self.explicit_attention(q, k, v, mask, causal)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads: (B, T, C)
        return self.resid_dropout(self.proj(y))

    def explicit_attention(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(hd)) v, step by step: what SDPA computes, with the weights
        at hand to record and to drop out."""
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


# ----------------------------------------------------------------------------- MLP and block


class ReLUSquared(nn.Module):
    """relu(x)^2: as sparse as ReLU, smooth at zero."""

    def forward(self, x):
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.activation = {"gelu": nn.GELU, "relu": nn.ReLU, "relu2": ReLUSquared}[config.activation]()
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(self.activation(self.up(x))))  # (B, T, C)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


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


# ----------------------------------------------------------------------------- the GPT


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
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights and zero biases. With scaled_residual_init (GPT-2's rule),
        the projections that write into the residual stream start at 0.02 / sqrt(2 n_layer):
        2 n_layer of them add up there, so the stream's scale at init does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp.down):
                if self.config.zero_init_proj:  # each block starts as the identity: x + 0
                    nn.init.zeros_(projection.weight)
                elif self.config.scaled_residual_init:
                    nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of final-normed states (B, T, C): the LM head, soft-capped if asked."""
        logits = self.lm_head(x)  # (B, T, V)
        cap = self.config.logit_softcap
        if cap > 0:  # smoothly bounded to (-cap, cap)
            logits = cap * torch.tanh(logits / cap)
        return logits

    def num_parameters(self) -> int:
        """Every trainable number, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def matmul_parameters(self) -> int:
        """N in the FLOP formula: weights of the matrix multiplies (blocks and LM head)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus
        12 * n_layer * n_embd * T for the attention scores and their weighted sum."""
        T = context or self.config.block_size
        return 6 * self.matmul_parameters() + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(self, idx, targets=None, *, start: int | torch.Tensor = 0, cache=None, last_only: bool = False):
        """Logits (B, T, V) for tokens idx (B, T) at positions start..start+T-1 (only the last
        position's, (B, 1, V), with last_only); with targets (B, T), also the mean cross-entropy.
        start may be a tensor (B,): each row at its own positions (batched decoding, T == 1)."""
        B, T = idx.shape
        config = self.config
        per_row = isinstance(start, torch.Tensor)
        if per_row:
            positions = start[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            end = int(start.max()) + T
        else:
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
            end = start + T
        x = self.token_embedding(idx)  # (B, T, C)
        rotary = None
        if config.positions == "learned":
            if end > config.block_size:
                raise ValueError(f"positions up to {end} exceed block_size {config.block_size}")
            x = x + self.position_embedding(positions)  # (B, T, C) + (T, C) or (B, T, C)
        elif per_row:
            cos, sin = self.rotary_tables(0, end)  # (end, hd/2): the tables cover every row's positions
            rotary = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, hd/2): each row its angles
        else:
            rotary = self.rotary_tables(start, T)
        mask = None
        if T > config.block_size:
            if per_row:
                raise ValueError("per-row positions are for decoding: at most block_size tokens per row")
            # rotary only: each query sees the block_size most recent keys (itself included),
            # the same window a rolling KV cache keeps
            distance = positions[:, None] - positions[None, :]  # (T, T)
            mask = (distance >= 0) & (distance < config.block_size)
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, mask, cache, layer, start)
        x = self.final_norm(x)
        if last_only:
            if targets is not None:
                raise ValueError("last_only gives one position's logits: there is no loss to compute")
            x = x[:, -1:, :]  # generation needs the next token's logits only: (B, 1, C)
        logits = self.head(x)  # (B, T, V)
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

    @torch.no_grad()
    def attention_maps(self, idx) -> torch.Tensor:
        """Attention weights of every layer and head for idx (1, T): (L, nh, T, T)."""
        was_training = self.training
        self.eval()
        for block in self.blocks:
            block.attn.record_attention = True
        try:
            self(idx)
            maps = [block.attn.last_attention[0] for block in self.blocks]
        finally:
            for block in self.blocks:
                block.attn.record_attention = False
                block.attn.last_attention = None
            self.train(was_training)
        return torch.stack(maps)
