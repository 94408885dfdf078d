"""GPT-2, nanoGPT-style: pre-LN blocks, SDPA attention, tied token embedding / head, any depth >= 0.

Depth 0 is the paper's *zero-layer model*: token + position embeddings -> final LayerNorm -> head.
For the 124M target (d=768, V=50304, T=1024) it has 39M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import require
from .base import ExpandableModel, LanguageModelConfig, cross_entropy, init_normal_, residual_std


@dataclass(frozen=True)
class GPTConfig(LanguageModelConfig):
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    block_size: int = 1024
    n_layer: int = 12
    n_embd: int = 768
    head_dim: int = 64  # the paper keeps n_embd / n_head = 64 at every size
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        require(self.vocab_size > 0, f"model.vocab_size must be > 0, got {self.vocab_size}")
        require(self.block_size > 0, f"model.block_size must be > 0, got {self.block_size}")
        require(self.n_layer >= 0, f"model.n_layer must be >= 0 (0 = zero-layer model), got {self.n_layer}")
        require(self.n_embd > 0, f"model.n_embd must be > 0, got {self.n_embd}")
        require(
            self.head_dim > 0 and self.n_embd % self.head_dim == 0,
            f"model.n_embd ({self.n_embd}) must be a multiple of model.head_dim ({self.head_dim})",
        )
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_dim

    def matmul_params_per_token(self) -> int:
        return self.n_layer * 12 * self.n_embd**2 + self.vocab_size * self.n_embd


def dropout(p: float) -> nn.Module:
    """No module call at all when dropout is off (the paper's setting): a free step on every layer."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig, mlp: nn.Module | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = mlp if mlp is not None else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(ExpandableModel):
    config: GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = dropout(config.dropout)
        self.blocks = nn.ModuleList(
            self.new_block("blocks", i, config.n_layer) for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (V, d) tensor, counted once
        init_normal_(self.wte)
        init_normal_(self.wpe)

    # ---- ExpandableModel ------------------------------------------------------------------------
    def depth_groups(self) -> dict[str, nn.ModuleList]:
        return {"blocks": self.blocks}

    def group_depths_for(self, target) -> dict[str, int]:
        require(
            isinstance(target, int) and not isinstance(target, bool),
            f"target depth for a GPT must be an int number of layers, got {target!r}",
        )
        return {"blocks": target}

    def _make_block(self, position: int) -> nn.Module:
        return Block(self.config)

    def new_block(self, group: str, position: int, group_depth: int) -> nn.Module:
        block = self._make_block(position)
        block.apply(init_normal_)
        for name, p in block.named_parameters():
            if name.endswith("c_proj.weight"):  # residual outputs, scaled for the *target* depth
                nn.init.normal_(p, mean=0.0, std=residual_std(group_depth))
        return block

    def set_group_depths(self, depths: Mapping[str, int]) -> None:
        self.config = replace(self.config, n_layer=depths["blocks"])

    # ---- forward --------------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        require(
            T <= self.config.block_size,
            f"sequence length {T} exceeds model.block_size {self.config.block_size}",
        )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns ``(logits, loss)``: the language-model cross-entropy, the loss every model reports
        (an MoE's router losses are ``auxiliary_loss()``, added for training only); loss is None
        without targets, when only the last position's logits are computed (generation)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, cross_entropy(logits, targets)
