"""Mixture-of-experts GPT (the paper's MoE testbed): GPT-2 blocks whose MLP is a top-k routed set of
experts with a capacity factor, a load-balancing auxiliary loss (Switch Transformer) and a router
z-loss (ST-MoE). Expert weights are stored as 3-D tensors ``(experts, in, out)`` so one batched
matmul runs every expert; Muon orthogonalises them per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import require
from .base import residual_std
from .gpt import GPT, MLP, Block, GPTConfig, dropout


@dataclass(frozen=True)
class MoEConfig(GPTConfig):
    n_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25  # slots per expert = ceil(cf * tokens * top_k / n_experts)
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    moe_every: int = 1  # 1: every layer is MoE; 2: layers 0, 2, 4, ... are MoE, the rest dense

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_experts >= 1, f"model.n_experts must be >= 1, got {self.n_experts}")
        require(
            1 <= self.top_k <= self.n_experts,
            f"model.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}",
        )
        require(self.capacity_factor > 0, f"model.capacity_factor must be > 0, got {self.capacity_factor}")
        require(self.aux_loss_weight >= 0 and self.z_loss_weight >= 0, "model.*_loss_weight must be >= 0")
        require(self.moe_every >= 1, f"model.moe_every must be >= 1, got {self.moe_every}")

    def is_moe_layer(self, position: int) -> bool:
        return position % self.moe_every == 0

    def matmul_params_per_token(self) -> int:
        """Attention, plus the router and the ``top_k`` active experts on MoE layers (dense MLP elsewhere)."""
        d = self.n_embd
        per_layer = [
            4 * d * d + (d * self.n_experts + self.top_k * 8 * d * d if self.is_moe_layer(i) else 8 * d * d)
            for i in range(self.n_layer)
        ]
        return sum(per_layer) + self.vocab_size * d


class MoEMLP(nn.Module):
    """Top-k routed experts with a fixed capacity per expert; overflowing assignments are dropped
    (the token still flows through the residual stream)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        d, h, E = cfg.n_embd, 4 * cfg.n_embd, cfg.n_experts
        self.cfg = cfg
        self.router = nn.Linear(d, E, bias=False)
        self.w_fc = nn.Parameter(torch.empty(E, d, h))
        self.w_proj = nn.Parameter(torch.empty(E, h, d))
        self.dropout = dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.expert_fraction: torch.Tensor | None = None  # share of assignments per expert (metrics)

    def __getstate__(self):
        # deepcopy (layer copying) must not try to copy the last forward's autograd graph
        state = self.__dict__.copy()
        state.update(aux_loss=None, z_loss=None, expert_fraction=None)
        return state

    def capacity(self, n_tokens: int) -> int:
        c = self.cfg
        return max(1, math.ceil(c.capacity_factor * n_tokens * c.top_k / c.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        E, k = self.cfg.n_experts, self.cfg.top_k
        tokens = x.reshape(-1, d)
        N = tokens.size(0)
        logits = self.router(tokens).float()  # router in fp32 for stable softmax / z-loss
        probs = logits.softmax(dim=-1)
        gate, expert = probs.topk(k, dim=-1)  # (N, k)
        gate = gate / gate.sum(dim=-1, keepdim=True)

        # Slot of each assignment inside its expert's buffer: first choices of all tokens are served
        # before second choices (GShard priority), then in token order.
        assign = F.one_hot(expert.t().reshape(-1), E)  # (k*N, E), choice-major
        position = (assign.cumsum(0) - 1) * assign
        position = position.sum(-1)  # (k*N,)
        C = self.capacity(N)
        keep = position < C
        flat_expert = expert.t().reshape(-1)
        slot = (flat_expert * C + position)[keep]
        token_index = torch.arange(N, device=x.device).repeat(k)[keep]
        weight = gate.t().reshape(-1)[keep]

        buffer = tokens.new_zeros(E * C, d).index_copy(0, slot, tokens[token_index])
        hidden = F.gelu(torch.bmm(buffer.view(E, C, d), self.w_fc))
        out_slots = torch.bmm(hidden, self.w_proj).view(E * C, d)
        out = tokens.new_zeros(N, d).index_add(
            0, token_index, out_slots[slot] * weight.unsqueeze(-1).to(x.dtype)
        )

        # Switch load-balancing loss: E * sum_i f_i * P_i, f_i = share of assignments to expert i.
        fraction = assign.float().mean(0)  # over all k*N assignments, dropped ones included
        self.expert_fraction = fraction.detach()
        self.aux_loss = E * (fraction * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return self.dropout(out.view(B, T, d))


class MoEGPT(GPT):
    config: MoEConfig

    def __init__(self, config: MoEConfig):
        require(isinstance(config, MoEConfig), "MoEGPT needs a MoEConfig")
        super().__init__(config)

    def _make_block(self, position: int) -> nn.Module:
        if self.config.is_moe_layer(position):
            return Block(self.config, mlp=MoEMLP(self.config))
        return Block(self.config, mlp=MLP(self.config))

    def block_kind(self, group: str, position: int) -> str:
        return "moe" if self.config.is_moe_layer(position) else "dense"

    def new_block(self, group: str, position: int, group_depth: int) -> nn.Module:
        block = super().new_block(group, position, group_depth)
        if isinstance(block.mlp, MoEMLP):
            nn.init.normal_(block.mlp.w_fc, mean=0.0, std=0.02)
            nn.init.normal_(block.mlp.w_proj, mean=0.0, std=residual_std(group_depth))
        return block

    def moe_layers(self) -> list[MoEMLP]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoEMLP)]

    def auxiliary_loss(self) -> torch.Tensor | float:
        """aux_loss_weight x mean load-balancing loss + z_loss_weight x mean router z-loss."""
        layers = self.moe_layers()
        if not layers:
            return 0.0
        aux = torch.stack([m.aux_loss for m in layers]).mean()
        z = torch.stack([m.z_loss for m in layers]).mean()
        return self.config.aux_loss_weight * aux + self.config.z_loss_weight * z

    def router_metrics(self) -> dict[str, float]:
        """Mean aux / z loss and the busiest expert's share of assignments, from the last forward."""
        layers = self.moe_layers()
        if not layers or layers[0].aux_loss is None:
            return {}
        with torch.no_grad():
            return {
                "moe_aux_loss": float(torch.stack([m.aux_loss for m in layers]).mean()),
                "moe_z_loss": float(torch.stack([m.z_loss for m in layers]).mean()),
                "moe_max_expert_fraction": float(torch.stack([m.expert_fraction for m in layers]).max()),
            }
