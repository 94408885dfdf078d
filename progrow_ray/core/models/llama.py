"""Llama-3-style decoder (the abstract's scaling-law family): RMSNorm, rotary position embeddings,
SwiGLU MLP and grouped-query attention, untied embedding and head, any depth >= 0."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import require
from .base import ExpandableModel, LanguageModelConfig, cross_entropy, init_normal_, residual_std


@dataclass(frozen=True)
class LlamaConfig(LanguageModelConfig):
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_embd: int = 768
    head_dim: int = 64
    n_kv_head: int = 4  # grouped-query attention: n_head / n_kv_head query heads share one K/V head
    multiple_of: int = 256  # SwiGLU hidden size is 8/3 * n_embd rounded up to this
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        require(
            self.vocab_size > 0 and self.block_size > 0, "model.vocab_size and model.block_size must be > 0"
        )
        require(self.n_layer >= 0, f"model.n_layer must be >= 0, got {self.n_layer}")
        require(
            self.head_dim > 0 and self.n_embd % self.head_dim == 0 and self.head_dim % 2 == 0,
            f"model.n_embd ({self.n_embd}) must be a multiple of an even model.head_dim ({self.head_dim})",
        )
        require(
            self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0,
            f"model.n_kv_head ({self.n_kv_head}) must divide the number of heads ({self.n_head})",
        )
        require(self.multiple_of >= 1, "model.multiple_of must be >= 1")

    @property
    def width_step(self) -> int:
        return self.head_dim * self.n_kv_head  # one query head per K/V head

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_dim

    @property
    def ffn_hidden(self) -> int:
        hidden = int(8 * self.n_embd / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def matmul_params_per_token(self) -> int:
        """Grouped-query attention (K/V at n_kv_head heads), SwiGLU's three matrices, the untied head."""
        d, kv = self.n_embd, self.n_kv_head * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        return self.n_layer * (attn + 3 * d * self.ffn_hidden) + self.vocab_size * d


def rope_tables(cfg: LlamaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    )
    angles = torch.outer(torch.arange(cfg.block_size, device=device).float(), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of each head by position-dependent angles; x: (B, H, T, hd)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[: x.size(-2)], sin[: x.size(-2)]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(ExpandableModel):
    config: LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(
            self.new_block("layers", i, config.n_layer) for i in range(config.n_layer)
        )
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_normal_(self.tok_embeddings)
        init_normal_(self.output)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def depth_groups(self) -> dict[str, nn.ModuleList]:
        return {"layers": self.layers}

    def group_depths_for(self, target) -> dict[str, int]:
        require(
            isinstance(target, int) and not isinstance(target, bool),
            f"target depth for a Llama model must be an int number of layers, got {target!r}",
        )
        return {"layers": target}

    def new_block(self, group: str, position: int, group_depth: int) -> nn.Module:
        block = LlamaBlock(self.config)
        block.apply(init_normal_)
        for p in (block.attention.wo.weight, block.feed_forward.w2.weight):
            nn.init.normal_(p, mean=0.0, std=residual_std(group_depth))
        return block

    def set_group_depths(self, depths: Mapping[str, int]) -> None:
        self.config = replace(self.config, n_layer=depths["layers"])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.size(1)
        require(
            T <= self.config.block_size,
            f"sequence length {T} exceeds model.block_size {self.config.block_size}",
        )
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)
        if targets is None:
            return self.output(x[:, [-1], :]), None
        logits = self.output(x)
        return logits, cross_entropy(logits, targets)
