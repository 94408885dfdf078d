"""The muP spectral condition (paper §3.2): each weight's spectral norm ||W||_2 should be of order
sqrt(fan_out / fan_in). Random and copied layers satisfy it; zero and copying_zero layers do not
(a zero sub-layer has norm 0) — the conflict between function preservation and feature learning.

Normalisation scales are included as the diagonal maps they are (||diag(g)||_2 = max |g|, target 1),
which is how copying_zero's zeroed norms show up: its copied matrices are intact.

Fans come from ``core/layouts.py``, as Muon reads them: per expert for stacked MoE weights, per group
for convolutions. An untied embedding only ever sees one-hot inputs, so its norm is the largest column
norm (largest token vector: the operator norm on one-hot inputs), against sqrt(d / vocab): an N(0, 0.02)
embedding sits at 0.02 sqrt(vocab), inside the band for vocabularies of 25 to 250k, where its spectral
norm (which adds a sqrt(vocab) no one-hot input can excite) called it 40-67x too large.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .growth import NORM_TYPES
from .layouts import matrix_layouts
from .models.base import unwrap_model

# "Of order 1": a ratio outside this band means the layer is far from the muP scaling.
RATIO_BAND = (0.1, 10.0)


@dataclass(frozen=True)
class SpectralRow:
    name: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    spectral_norm: float  # the largest over stacked experts / conv groups; an embedding's largest column norm
    target: float  # sqrt(fan_out / fan_in)
    role: str = "linear"  # layouts.MatrixLayout.role, or "norm"

    @property
    def ratio(self) -> float:
        return self.spectral_norm / self.target

    @property
    def satisfies_mup(self) -> bool:
        return RATIO_BAND[0] <= self.ratio <= RATIO_BAND[1]

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "satisfies_mup": self.satisfies_mup}


@torch.no_grad()
def spectral_report(model: nn.Module, prefix: str = "") -> list[SpectralRow]:
    """One row per >= 2-D weight and per normalisation scale whose name starts with ``prefix``
    (e.g. ``"blocks.3."``)."""
    model = unwrap_model(model)
    layouts = matrix_layouts(model)
    rows, seen = [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            is_scale = isinstance(module, NORM_TYPES) and p_name == "weight"
            if (p.ndim < 2 and not is_scale) or id(p) in seen or not name.startswith(prefix):
                continue
            seen.add(id(p))
            if is_scale:
                W, fan_out, fan_in, role = torch.diag(p.detach().float()), p.numel(), p.numel(), "norm"
            else:
                layout = layouts[p]
                W, fan_out, fan_in, role = (
                    layout.matrices(p.detach().float()),
                    layout.fan_out,
                    layout.fan_in,
                    layout.role,
                )
            if role == "embedding":  # one-hot inputs: ||W e_i|| is column i's norm
                sigma = W.norm(dim=-2).max().item()
            else:
                sigma = torch.linalg.matrix_norm(W, ord=2).max().item()
            rows.append(
                SpectralRow(name, tuple(p.shape), fan_in, fan_out, sigma, (fan_out / fan_in) ** 0.5, role)
            )
    return rows


def mup_violations(rows: list[SpectralRow]) -> list[SpectralRow]:
    return [r for r in rows if not r.satisfies_mup]
