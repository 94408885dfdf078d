"""Training FLOPs from a model config (no model needed), and the cost of fixed vs progressive runs.

Counts matrix multiplications only (what ``torch.utils.flop_counter.FlopCounterMode`` counts, and
what dominates): a training step is forward (2 FLOPs per multiply-add) + backward (2x forward), so
``6 N`` per token for the ``N`` weights used in matmuls (the tied head counts, embedding lookups do
not; for MoE only the ``top_k`` active experts), plus attention's ``12 L T d`` (QK^T and AV, full
square, the nanoGPT / PaLM MFU convention). A ResNet is counted per image, conv by conv.

The "unit" of a run is what its data is measured in: tokens for language models, images for ResNet.

Two conventions, both legitimate, both reported (``CONVENTIONS``):

full   the above: what the hardware executes (head and attention included); ``FlopCounterMode`` agrees.
paper  the paper's eq. 1.1, 6 B T N with N the *non-embedding* parameters (Kaplan et al. 2020): no head,
       no attention. A zero-layer source then costs 0, so expanding at 0.8 T costs 0.2 of the fixed run
       — the paper's "5x" — where the full count, which charges the zero-layer model its 39M-weight
       head, gives 0.417 (2.4x) at 124M. The gap closes with size: from zero layers at 0.8 T to the 7B
       preset, 4.6x (full) vs 5.0x (paper). ResNet has no embedding: both conventions are the conv count.
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


CONVENTIONS = ("full", "paper")


def non_embedding_params_per_token(cfg) -> int:
    """The paper's N (eq. 1.1): matmul weights a token passes through, less the head (tied or not)."""
    return matmul_params_per_token(cfg) - cfg.vocab_size * cfg.n_embd


def train_flops_per_token(cfg, seq_len: int | None = None, convention: str = "full") -> float:
    if convention == "paper":
        return 6.0 * non_embedding_params_per_token(cfg)
    require(convention == "full", f"FLOPs convention must be one of {list(CONVENTIONS)}, got {convention!r}")
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


def train_flops_per_unit(cfg, seq_len: int | None = None, image_size: int = 224, convention: str = "full") -> float:
    """FLOPs per token (language models) or per image (ResNet) of one training step."""
    if isinstance(cfg, ResNetConfig):
        require(convention in CONVENTIONS, f"FLOPs convention must be one of {list(CONVENTIONS)}, got {convention!r}")
        return train_flops_per_image(cfg, image_size)
    return train_flops_per_token(cfg, seq_len, convention)


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
    def speedup(self) -> float:  # inf: a zero-layer source costs nothing under the paper's count at tau = T
        return self.fixed_flops / self.progressive_flops if self.progressive_flops else float("inf")


def plan_savings(large_cfg, source_depth, total_units: int, tau_fracs: Sequence[float],
                 seq_len: int | None = None, image_size: int = 224, convention: str = "full") -> list[SavingsRow]:
    """FLOPs of progressive training from ``source_depth`` vs fixed-size training of ``large_cfg``,
    for each expansion point τ = ``tau_frac`` × horizon (the paper's eq. 1.1), under ``convention``."""
    require(total_units > 0, f"total tokens/images must be > 0, got {total_units}")
    small = train_flops_per_unit(with_depth(large_cfg, source_depth), seq_len, image_size, convention)
    large = train_flops_per_unit(large_cfg, seq_len, image_size, convention)
    rows = []
    for f in tau_fracs:
        require(0 <= f <= 1, f"tau fractions must be in [0, 1], got {f}")
        tau = int(round(f * total_units))
        rows.append(SavingsRow(f, tau, run_flops(small, large, total_units, tau), large * total_units))
    return rows


def run_flops_by_segments(cfg_at_depth, segments: Sequence[tuple[object, float]], seq_len: int | None = None,
                          image_size: int = 224, convention: str = "full") -> float:
    """FLOPs of a run given as ``[(depth, units trained at that depth), ...]``; ``cfg_at_depth(depth)``
    gives the model config at each depth. Reports use it to count a finished run both ways."""
    return sum(train_flops_per_unit(cfg_at_depth(d), seq_len, image_size, convention) * units for d, units in segments)
