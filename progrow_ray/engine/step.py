"""One optimizer step over a global batch: micro-batches dealt over the ranks, gradient accumulation,
DDP no_sync, bf16 autocast.

Any world size trains the same global batch with the same update: the batch is cut into micro-batches
of ``train.micro_batch`` examples (the last may be smaller) whatever the world size, the ranks take
contiguous runs of them (some one more than others), and every micro-batch's loss is weighted by its
share of the batch's examples. So an elastic phase that resizes to 3 workers keeps a batch that does
not divide by 3. Shared by the Trainer and the throughput benchmark, so the benchmark times exactly what
trains. No host-device synchronisation: the loss comes back as a device tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BatchPlan:
    """One rank's part of a global batch of ``examples`` (sequences or images)."""

    examples: int  # in the global batch
    world: int
    first: int  # this rank's first example in the global batch
    sizes: tuple[int, ...]  # this rank's micro-batches, in examples (empty: none this step)
    padding: int  # zero-weight micro-batches to run as well (FSDP: every rank runs as many)

    @property
    def count(self) -> int:
        return sum(self.sizes)

    @property
    def reads(self) -> tuple[int, int]:
        """(first, count) examples this rank reads: its own, or one filler example when it has none."""
        return (self.first, self.count) if self.sizes else (0, 1)

    def weight(self, size: int) -> float:
        """A micro-batch's loss weight. DDP and FSDP average gradients over the ranks, hence x world: the
        summed weights of all ranks' micro-batches are then exactly one global mean."""
        return size / self.examples * self.world


def plan_batch(examples: int, micro_batch: int, rank: int, world: int, same_count: bool) -> BatchPlan:
    """Micro-batches of ``micro_batch`` examples (the last smaller when it does not divide), in order;
    with n of them, rank r takes a contiguous run of n // world, the first n % world ranks one more, so
    rank 0 always has one. ``same_count`` (FSDP, whose every micro-batch is a collective) pads ranks with
    fewer to the same number of forward/backward passes with zero-weight micro-batches."""
    sizes = [min(micro_batch, examples - s) for s in range(0, examples, micro_batch)]
    base, extra = divmod(len(sizes), world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    mine = tuple(sizes[lo:hi])
    most = base + (1 if extra else 0)
    padding = most - len(mine) if same_count else (0 if mine else 1)  # DDP: every rank syncs once
    return BatchPlan(examples, world, sum(sizes[:lo]), mine, padding)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: BatchPlan,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """Forward/backward this rank's micro-batches of ``x``/``y`` (its ``plan.count`` examples; one filler
    example when it has none), then step. Trains on the model's loss plus its ``auxiliary_loss()`` (MoE
    router losses), weighted by examples; returns this rank's share of the global batch's mean
    language-model loss (a device tensor; the ranks' shares sum to the mean), without them."""
    if device.type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    # DDP: reduce gradients on the last micro-batch only. FSDP2 reduce-scatters every micro-batch, so each
    # rank only ever holds its shard of the gradients (skipping the sync would keep them all whole)
    no_sync = getattr(model, "no_sync", None)
    total = torch.zeros((), device=device)
    auxiliary = getattr(unwrap_model(model), "auxiliary_loss", None)
    # (start, size, weight) per pass; a filler repeats the first example with weight 0: it only takes part
    # in the collectives, its gradient is exactly zero
    passes, start = [], 0
    for size in plan.sizes:
        passes.append((start, size, plan.weight(size)))
        start += size
    passes += [(0, 1, 0.0)] * plan.padding
    for i, (start, size, weight) in enumerate(passes):
        last = i == len(passes) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast():
                _, loss = model(x[start : start + size], y[start : start + size])
            objective = loss if auxiliary is None else loss + auxiliary()
            (objective * weight).backward()
        total += loss.detach() * (weight / plan.world)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
