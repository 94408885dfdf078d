"""One optimizer step over a global batch: gradient accumulation, DDP no_sync, bf16 autocast.

Shared by the Trainer and the throughput benchmark, so the benchmark times exactly what trains.
No host-device synchronisation: the loss comes back as a device tensor.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..core.models.base import unwrap_model


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (default) or when asked; plain fp32 otherwise (CPU default: exact)."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    accum: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """Forward/backward ``accum`` equal micro-batches of this rank's ``x``/``y``, then step. Trains on
    the model's loss plus its ``auxiliary_loss()`` (MoE router losses); returns the mean micro-batch
    language-model loss (a device tensor), without them."""
    micro = x.size(0) // accum
    if device.type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    # DDP: reduce gradients on the last micro-batch only. FSDP2 reduce-scatters every micro-batch, so each
    # rank only ever holds its shard of the gradients (skipping the sync would keep them all whole)
    no_sync = getattr(model, "no_sync", None)
    total = torch.zeros((), device=device)
    auxiliary = getattr(unwrap_model(model), "auxiliary_loss", None)
    for i in range(accum):
        last = i == accum - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast():
                _, loss = model(x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro])
            objective = loss if auxiliary is None else loss + auxiliary()
            (objective / accum).backward()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accum
