"""Training FLOPs from a model config (no model needed), and the cost of fixed vs progressive runs.

Counts matrix multiplications only (what ``torch.utils.flop_counter.FlopCounterMode`` counts, and
what dominates): a training step is forward (2 FLOPs per multiply-add) + backward (2x forward), so
``6 N`` per token for the ``N`` weights used in matmuls (the tied head counts, embedding lookups do
not; for MoE only the ``top_k`` active experts), plus attention's ``12 L T d`` (QK^T and AV, full
square, the nanoGPT / PaLM MFU convention). A ResNet is counted per image, conv by conv.

The "unit" of a run is what its data is measured in: tokens for language models, images for ResNet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError, require
from .models.gpt import GPTConfig
from .models.llama import LlamaConfig
from .models.moe import MoEConfig
from .models.resnet import EXPANSION, ResNetConfig


def matmul_params_per_token(cfg) -> int:
    """Weights a token passes through in matmuls, forward (language models)."""
    d = cfg.n_embd
    if isinstance(cfg, MoEConfig):
        per_layer = [4 * d * d + (d * cfg.n_experts + cfg.top_k * 8 * d * d if cfg.is_moe_layer(i) else 8 * d * d)
                     for i in range(cfg.n_layer)]
        return sum(per_layer) + cfg.vocab_size * d
    if isinstance(cfg, GPTConfig):
        return cfg.n_layer * 12 * d * d + cfg.vocab_size * d
    if isinstance(cfg, LlamaConfig):
        kv = cfg.n_kv_head * cfg.head_dim
        attn = 2 * d * d + 2 * d * kv
        return cfg.n_layer * (attn + 3 * d * cfg.ffn_hidden) + cfg.vocab_size * d
    raise ConfigError(f"no token FLOPs model for {type(cfg).__name__}")


def train_flops_per_token(cfg, seq_len: int | None = None) -> float:
    T = cfg.block_size if seq_len is None else seq_len
    return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.n_layer * T * cfg.n_embd


def _conv(cin: int, cout: int, k: int, hw: int) -> float:
    return 2.0 * cin * cout * k * k * hw * hw


def train_flops_per_image(cfg: ResNetConfig, image_size: int = 224) -> float:
    """Forward conv + fc FLOPs, times 3 for training, less the stem conv's input gradient (images
    need none)."""
    s = image_size
    w0 = cfg.widths[0]
    if cfg.stem == "imagenet":
        s = (s + 2 * 3 - 7) // 2 + 1
        stem = _conv(cfg.in_channels, w0, 7, s)
        s = (s + 2 - 3) // 2 + 1
    else:
        stem = _conv(cfg.in_channels, w0, 3, s)
    fwd, cin = 0.0, w0
    for stage, (n, width) in enumerate(zip(cfg.blocks, cfg.widths)):
        for b in range(n):
            stride = 2 if (stage > 0 and b == 0) else 1
            out = (s + 2 - 3) // stride + 1
            fwd += _conv(cin, width, 1, s) + _conv(width, width, 3, out) + _conv(width, width * EXPANSION, 1, out)
            if b == 0 and (stride != 1 or cin != width * EXPANSION):
                fwd += _conv(cin, width * EXPANSION, 1, out)
            cin, s = width * EXPANSION, out
    fwd += 2.0 * cin * cfg.num_classes
    return 3.0 * (fwd + stem) - stem


def train_flops_per_unit(cfg, seq_len: int | None = None, image_size: int = 224) -> float:
    """FLOPs per token (language models) or per image (ResNet) of one training step."""
    if isinstance(cfg, ResNetConfig):
        return train_flops_per_image(cfg, image_size)
    return train_flops_per_token(cfg, seq_len)


def with_depth(cfg, depth):
    """The same architecture at another depth: an int for language models, 4 ints for ResNet."""
    if isinstance(cfg, ResNetConfig):
        return dataclasses.replace(cfg, blocks=tuple(depth))
    return dataclasses.replace(cfg, n_layer=depth)


def run_flops(small_per_unit: float, large_per_unit: float, total_units: float, tau_units: float) -> float:
    """FLOPs of a run that trains the small model for ``tau_units`` and the large one afterwards."""
    require(0 <= tau_units <= total_units, f"tau ({tau_units}) must be within [0, total ({total_units})]")
    return small_per_unit * tau_units + large_per_unit * (total_units - tau_units)


@dataclass(frozen=True)
class SavingsRow:
    tau_frac: float
    tau_units: int
    progressive_flops: float
    fixed_flops: float

    @property
    def flops_fraction(self) -> float:
        return self.progressive_flops / self.fixed_flops

    @property
    def speedup(self) -> float:
        return self.fixed_flops / self.progressive_flops


def plan_savings(large_cfg, source_depth, total_units: int, tau_fracs: Sequence[float],
                 seq_len: int | None = None, image_size: int = 224) -> list[SavingsRow]:
    """FLOPs of progressive training from ``source_depth`` vs fixed-size training of ``large_cfg``,
    for each expansion point τ = ``tau_frac`` × horizon (the paper's eq. 1.1)."""
    require(total_units > 0, f"total tokens/images must be > 0, got {total_units}")
    small = train_flops_per_unit(with_depth(large_cfg, source_depth), seq_len, image_size)
    large = train_flops_per_unit(large_cfg, seq_len, image_size)
    rows = []
    for f in tau_fracs:
        require(0 <= f <= 1, f"tau fractions must be in [0, 1], got {f}")
        tau = int(round(f * total_units))
        rows.append(SavingsRow(f, tau, run_flops(small, large, total_units, tau), large * total_units))
    return rows
