"""How each weight acts as a linear map: the batch of (fan_out, fan_in) matrices it holds.

One definition shared by Muon (which orthogonalises these matrices and scales the update by their
fans) and the muP spectral diagnostics (which compare ||W||_2 with sqrt(fan_out / fan_in)), so both
see a weight the same way whatever order its dims are stored in:

==========  ====================================  ==========================  =====================
role        stored as                             matrices                    fan_out x fan_in
==========  ====================================  ==========================  =====================
linear      (out, in)  — nn.Linear, any 2-D       1                           out x in
embedding   (vocab, d) — nn.Embedding, untied     1                           d x vocab (one-hot input)
experts     (experts, in, out) — applied x @ W_e  one per expert              out x in
conv        (out, in/groups, kh, kw)              one per group               out/groups x in/groups*kh*kw
==========  ====================================  ==========================  =====================

An embedding maps a one-hot vector over the vocabulary (or positions) to d: it is a d x vocab map, whatever
its (vocab, d) storage says, so Jordan's factor sqrt(max(1, fan_out / fan_in)) is 1 for it, not the 8.09 the
stored shape gave at V = 50304, d = 768. Its inputs are one-hot, so the operator norm that measures it is the
largest column norm (the largest token vector), not the spectral norm (``core/diagnostics.py``). A weight
tied to an output head (GPT-2's wte / lm_head) is that Linear: fan_out = vocab, fan_in = d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Role = Literal["linear", "embedding", "experts", "conv"]


@dataclass(frozen=True)
class MatrixLayout:
    role: Role
    batch: int
    fan_out: int
    fan_in: int

    def matrices(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (stored shape) as (batch, rows, cols) matrices that map inputs to outputs; for an
        embedding (d, vocab), whose columns are the tokens' vectors."""
        if self.role == "experts":
            return t.mT  # (E, in, out) -> (E, out, in)
        if self.role == "embedding":
            return t.t().unsqueeze(0)
        return t.reshape(self.batch, t.size(0) // self.batch, -1)

    def stored(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of ``matrices``: (batch, rows, cols) back to ``like``'s stored shape."""
        if self.role == "experts":
            return m.mT
        if self.role == "embedding":
            return m.squeeze(0).t()
        return m.reshape(like.shape)


def layout_from_shape(p: torch.Tensor) -> MatrixLayout:
    """The layout of a weight known only by its shape: 2-D (out, in), 3-D stacked experts
    (experts, in, out), >= 4-D an ungrouped convolution."""
    if p.ndim == 2:
        return MatrixLayout("linear", 1, p.size(0), p.size(1))
    if p.ndim == 3:
        return MatrixLayout("experts", p.size(0), p.size(2), p.size(1))
    return MatrixLayout("conv", 1, p.size(0), p[0].numel())


def matrix_layouts(model: nn.Module) -> dict[torch.Tensor, MatrixLayout]:
    """The layout of every >= 2-D parameter of ``model``, keyed by the parameter itself."""
    out: dict[torch.Tensor, MatrixLayout] = {}
    embeddings = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.ndim < 2:
                continue
            if isinstance(module, nn.Embedding) and name == "weight":
                embeddings.append(p)  # decided after every Linear is seen: a tied head wins
            elif isinstance(module, nn.modules.conv._ConvNd) and name == "weight":
                g = module.groups
                out[p] = MatrixLayout("conv", g, p.size(0) // g, p[0].numel())
            else:
                out[p] = layout_from_shape(p)
    for p in embeddings:
        out.setdefault(p, MatrixLayout("embedding", 1, p.size(1), p.size(0)))
    return out
