"""What every expandable model shares: depth lives in named ``nn.ModuleList``s of same-shape blocks.

The growth code (``core/growth.py``) only talks to this interface, so it is model-agnostic:

* ``depth_groups()``  -> ``{name: ModuleList}``: the lists whose length is the expandable depth
  (GPT: one list ``blocks``; ResNet: the identity-shape blocks of each of the four stages).
* ``group_depths_for(target)`` -> ``{name: int}``: turns a user-facing target depth (``12`` for a
  GPT, ``[3, 4, 6, 3]`` for a ResNet) into a length per group.
* ``new_block(group, position, group_depth)`` -> a freshly, randomly initialised block, exactly as
  the model's own ``__init__`` would create it for a model of that depth.
* ``set_group_depths(depths)``: keeps ``model.config`` in step with the lists after growth, so a
  checkpoint can rebuild the model at its current depth from the config alone.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class ExpandableModel(nn.Module):
    """Base class of the testbed models. Subclasses fill in the four methods above."""

    def depth_groups(self) -> dict[str, nn.ModuleList]:
        raise NotImplementedError

    def group_depths_for(self, target) -> dict[str, int]:
        raise NotImplementedError

    def new_block(self, group: str, position: int, group_depth: int) -> nn.Module:
        raise NotImplementedError

    def set_group_depths(self, depths: Mapping[str, int]) -> None:
        raise NotImplementedError

    def auxiliary_loss(self) -> torch.Tensor | float:
        """Regularisers of the last forward that training adds to ``forward``'s loss (an MoE's router
        losses); never part of the reported train / validation loss."""
        return 0.0

    def block_kind(self, group: str, position: int) -> str:
        """Blocks of one group are interchangeable unless a model says otherwise (MoE interleaving)."""
        return "block"

    # ---- shared helpers -------------------------------------------------------------------------
    def group_depths(self) -> dict[str, int]:
        return {name: len(blocks) for name, blocks in self.depth_groups().items()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) and DDP/FSDP (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            type(model).__name__ in {"DistributedDataParallel", "FullyShardedDataParallel"}
            and hasattr(model, "module")
        ):
            model = model.module
        else:
            return model


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """nanoGPT init: N(0, std) for Linear/Embedding weights, zero biases, unit norm scales."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


def residual_std(n_layer: int, std: float = 0.02) -> float:
    """GPT-2's scaled init of residual output projections: std / sqrt(2 L). Depth 0 has none."""
    return std / (2 * max(n_layer, 1)) ** 0.5


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
    )
