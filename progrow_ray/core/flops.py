"""Training FLOPs from a model config (no model needed), and the cost of fixed vs progressive runs.

Counts matrix multiplications only (what ``torch.utils.flop_counter.FlopCounterMode`` counts, and
what dominates): a training step is forward (2 FLOPs per multiply-add) + backward (2x forward), so
``6 N`` per token for the ``N`` weights used in matmuls (the tied head counts, embedding lookups do
not; for MoE only the ``top_k`` active experts), plus attention's ``12 L T d`` (QK^T and AV, full
square, the nanoGPT / PaLM MFU convention). A ResNet is counted per image, conv by conv.

The "unit" of a run is what its data is measured in: tokens for language models, images for ResNet.
Each model config counts its own FLOPs per unit (``ModelConfig.train_flops_per_unit`` in ``models/``);
this module prices whole runs from them.

Two conventions, both legitimate, both reported (``CONVENTIONS``):

full   the above: what the hardware executes (head and attention included); ``FlopCounterMode`` agrees.
paper  the paper's eq. 1.1, 6 B T N with N the *non-embedding* parameters (Kaplan et al. 2020): no head,
       no attention. A zero-layer source then costs 0, so expanding at 0.8 T costs 0.2 of the fixed run
       — the paper's "5x" — where the full count, which charges the zero-layer model its 39M-weight
       head, gives 0.417 (2.4x) at 124M. The gap closes with size: from zero layers at 0.8 T to the 7B
       preset, 4.6x (full) vs 5.0x (paper). ResNet has no embedding: both conventions are the conv count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import require
from .models.base import CONVENTIONS, ModelConfig

__all__ = ["CONVENTIONS", "SavingsRow", "plan_savings", "run_flops", "run_flops_by_segments"]


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


def plan_savings(
    large_cfg: ModelConfig,
    source_depth,
    total_units: int,
    tau_fracs: Sequence[float],
    seq_len: int | None = None,
    image_size: int = 224,
    convention: str = "full",
) -> list[SavingsRow]:
    """FLOPs of progressive training from ``source_depth`` vs fixed-size training of ``large_cfg``,
    for each expansion point τ = ``tau_frac`` × horizon (the paper's eq. 1.1), under ``convention``."""
    require(total_units > 0, f"total tokens/images must be > 0, got {total_units}")
    small = large_cfg.with_depth(source_depth).train_flops_per_unit(seq_len, image_size, convention)
    large = large_cfg.train_flops_per_unit(seq_len, image_size, convention)
    rows = []
    for f in tau_fracs:
        require(0 <= f <= 1, f"tau fractions must be in [0, 1], got {f}")
        tau = int(round(f * total_units))
        rows.append(SavingsRow(f, tau, run_flops(small, large, total_units, tau), large * total_units))
    return rows


def run_flops_by_segments(
    target: ModelConfig,
    segments: Sequence[tuple[object, float]],
    seq_len: int | None = None,
    image_size: int = 224,
    convention: str = "full",
) -> float:
    """FLOPs of a run given as ``[(depth, units trained at that depth), ...]`` of ``target``'s architecture.
    Reports use it to count a finished run both ways."""
    return sum(
        target.with_depth(d).train_flops_per_unit(seq_len, image_size, convention) * units
        for d, units in segments
    )


# Dense bf16 peak per device, TFLOP/s (vendor figures): what MFU is measured against.
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0, "b200": 2250.0}


def peak_flops(device) -> float | None:
    """The dense bf16 peak of a CUDA device in FLOP/s, from its name; None on CPU or an unknown GPU."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # "l40s" before "l4"
        if key in name:
            return GPU_PEAK_TFLOPS[key] * 1e12
    return None
