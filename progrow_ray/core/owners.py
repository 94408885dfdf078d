"""Newton–Schulz once per matrix in a data-parallel group: owner ranks and the two exchanges around them.

Every rank of a group holds either a dim-0 shard of each tensor (FSDP2 / DTensor ``Shard(0)``, torch.chunk's
split) or all of it (DDP). Each tensor is assigned an *owner* rank, balanced by the cost of orthogonalising
it; the owner assembles the whole tensor, orthogonalises it, and every rank gets back what it holds:

sharded      ``gather_to_owners``: one all-to-all sends each rank's shards to the owners;
             ``scatter_from_owners``: one all-to-all sends each owner's results back, shard by shard.
replicated   ``share_from_owners``: every rank already holds the whole tensor; one all-reduce of a buffer
             in which each owner wrote only its own results gives every rank all of them, exactly.

Pure torch.distributed: no Ray; all ranks call these with the same tensor list, in the same order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist


def dim0_rows(n: int, world: int) -> list[int]:
    """Rows of each rank's shard of an ``n``-row tensor under torch.chunk's rule (FSDP2, DTensor
    ``Shard(0)``): ceil(n / world) each, the last ones fewer or none."""
    size = -(-n // world) if n else 0
    return [max(0, min(size, n - r * size)) for r in range(world)]


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: largest first, each to the least-loaded rank (lowest rank on ties).
    Deterministic, so every rank computes the same assignment without talking."""
    load, owner = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


def _row_numel(shape: torch.Size) -> int:
    return math.prod(shape[1:])


def gather_to_owners(
    shards: Sequence[torch.Tensor],
    shapes: Sequence[torch.Size],
    owner: Sequence[int],
    group: dist.ProcessGroup | None,
) -> dict[int, torch.Tensor]:
    """Each rank passes its dim-0 shard of every tensor; returns ``{i: whole tensor i}`` for the tensors
    this rank owns. All shards share one dtype and device."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = [i for i in range(len(shards)) if owner[i] == rank]
    rows = [dim0_rows(s[0], world) for s in shapes]
    for i, t in enumerate(shards):
        if t.shape[0] != rows[i][rank]:
            raise RuntimeError(f"shard {i} has {t.shape[0]} rows, torch.chunk gives {rows[i][rank]}")
    send = [[shards[i].reshape(-1) for i in range(len(shards)) if owner[i] == r] for r in range(world)]
    in_splits = [sum(x.numel() for x in s) for s in send]
    out_splits = [sum(rows[i][s] * _row_numel(shapes[i]) for i in mine) for s in range(world)]
    ref = shards[0]
    inp = torch.cat([x for s in send for x in s]) if sum(in_splits) else ref.new_empty(0)
    out = ref.new_empty(sum(out_splits))
    dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in mine}
    for s, buf in enumerate(out.split(out_splits)):
        sizes = [rows[i][s] * _row_numel(shapes[i]) for i in mine]
        for i, x in zip(mine, buf.split(sizes)):
            parts[i].append(x.view(rows[i][s], *shapes[i][1:]))
    return {i: torch.cat(parts[i]) for i in mine}


def scatter_from_owners(
    results: dict[int, torch.Tensor],
    shapes: Sequence[torch.Size],
    owner: Sequence[int],
    group: dist.ProcessGroup | None,
    like: torch.Tensor,
) -> list[torch.Tensor]:
    """Inverse of ``gather_to_owners``: owners pass ``{i: whole result i}``; every rank gets its dim-0
    shard of every result, in order. ``like`` gives the dtype and device."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = len(shapes)
    rows = [dim0_rows(s[0], world) for s in shapes]
    mine = [i for i in range(n) if owner[i] == rank]
    send, in_splits = [], []
    for s in range(world):
        start = [sum(rows[i][:s]) for i in mine]
        pieces = [results[i].narrow(0, st, rows[i][s]).reshape(-1) for i, st in zip(mine, start)]
        send.extend(pieces)
        in_splits.append(sum(p.numel() for p in pieces))
    out_splits = [
        sum(rows[i][rank] * _row_numel(shapes[i]) for i in range(n) if owner[i] == r) for r in range(world)
    ]
    inp = torch.cat(send) if sum(in_splits) else like.new_empty(0)
    out = like.new_empty(sum(out_splits))
    dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
    local: list[torch.Tensor | None] = [None] * n
    for r, buf in enumerate(out.split(out_splits)):
        owned = [i for i in range(n) if owner[i] == r]
        sizes = [rows[i][rank] * _row_numel(shapes[i]) for i in owned]
        for i, x in zip(owned, buf.split(sizes)):
            local[i] = x.view(rows[i][rank], *shapes[i][1:])
    return local  # type: ignore[return-value]


def share_from_owners(
    results: dict[int, torch.Tensor],
    shapes: Sequence[torch.Size],
    group: dist.ProcessGroup | None,
    like: torch.Tensor,
) -> list[torch.Tensor]:
    """Replicated tensors: owners pass ``{i: result i}``; every rank gets every result. One all-reduce
    of a buffer in which each rank wrote only its own results (the others stay 0, so the sum is exact)."""
    numels = [math.prod(s) for s in shapes]
    flat = like.new_zeros(sum(numels))
    views = [v.view(s) for v, s in zip(flat.split(numels), shapes)]
    for i, u in results.items():
        views[i].copy_(u)
    dist.all_reduce(flat, group=group)
    return views
