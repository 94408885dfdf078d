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

from dataclasses import replace
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import require

# How training FLOPs are counted (see ``core/flops.py``): every matmul the hardware runs, or the paper's
# eq. 1.1 (6 x non-embedding parameters per token).
CONVENTIONS = ("full", "paper")


def check_convention(convention: str) -> None:
    require(
        convention in CONVENTIONS, f"FLOPs convention must be one of {list(CONVENTIONS)}, got {convention!r}"
    )


class ModelConfig:
    """What a model's config dataclass tells the rest of the code, so nothing above the models needs
    to know which model it holds: the expandable depth, the same model at another depth, the unit its
    data is counted in, and the training FLOPs per unit."""

    unit: ClassVar[str]  # "token" (language models) or "image" (ResNet): what train.total_tokens counts
    depth_field: ClassVar[str]  # the dataclass field holding the depth (n_layer, blocks)
    width_field: ClassVar[str]  # the dataclass field holding the width (n_embd, base_width)

    @property
    def width_step(self) -> int:
        """The smallest width change that keeps the architecture valid (one attention head, ...): the
        τ search narrows its probes in these steps."""
        raise NotImplementedError

    @property
    def depth(self) -> Any:
        """The user-facing depth ``expand_depth`` takes: an int, or a ResNet's blocks per stage (a list)."""
        raise NotImplementedError

    def with_depth(self, depth: Any):
        """The same architecture at ``depth``."""
        return replace(self, **{self.depth_field: depth})

    def train_flops_per_unit(
        self, seq_len: int | None = None, image_size: int = 224, convention: str = "full"
    ) -> float:
        """FLOPs of one training step per token (per image), forward + backward, under ``convention``."""
        raise NotImplementedError


class LanguageModelConfig(ModelConfig):
    """Decoder language models (fields n_layer, n_embd, vocab_size, block_size): depth is the number
    of blocks; a token passes through ``matmul_params_per_token`` weights plus attention."""

    unit = "token"
    depth_field = "n_layer"
    width_field = "n_embd"

    @property
    def width_step(self) -> int:
        return self.head_dim  # one head (the paper keeps the head dimension at every width)

    @property
    def depth(self) -> int:
        return self.n_layer

    def matmul_params_per_token(self) -> int:
        """Weights a token passes through in matmuls, forward: blocks (active experts only) + the head."""
        raise NotImplementedError

    def non_embedding_params_per_token(self) -> int:
        """The paper's N (eq. 1.1): the matmul weights less the head (tied or not)."""
        return self.matmul_params_per_token() - self.vocab_size * self.n_embd

    def train_flops_per_unit(
        self, seq_len: int | None = None, image_size: int = 224, convention: str = "full"
    ) -> float:
        check_convention(convention)
        if convention == "paper":
            return 6.0 * self.non_embedding_params_per_token()
        T = self.block_size if seq_len is None else seq_len
        return 6.0 * self.matmul_params_per_token() + 12.0 * self.n_layer * T * self.n_embd


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
