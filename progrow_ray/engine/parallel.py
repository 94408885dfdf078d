"""Data parallelism for the Trainer: DDP, or FSDP2 (``fully_shard`` per block, then the root), and depth
expansion of a sharded model.

``train.parallel``: ``ddp`` replicates the model (every rank holds all weights, gradients and momenta);
``fsdp`` shards them over the ranks (each holds 1/N and gathers one block's weights at a time); ``auto``
picks fsdp when the DDP estimate of ``core/memory.py`` does not fit the device (CUDA), ddp otherwise.

Expansion under FSDP is a transform from the sharded source model to a sharded target model: the target
is built on the meta device and sharded the same way, then each rank fills its own shards — kept and copied
layers from the source's shards (same global shapes, so the same local rows), new layers from the very
blocks ``core.growth.expand_depth`` would create (same seeded RNG stream), one block at a time. The result
equals the one-process expansion for every method, optimizer state included. No Ray here.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import require
from ..core.growth import GrowthRecord, check_expansion, fresh_blocks, layout, zero_norms_
from ..core.models import build_model
from ..core.models.base import ExpandableModel
from ..core.owners import dim0_rows

PARALLEL_MODES = ("auto", "ddp", "fsdp")


def checkpoint_blocks(model: ExpandableModel) -> None:
    """Activation checkpointing per block (recompute the block in backward): keeps only each block's
    input alive. Composable (hooks, no wrapper module), so parameter names and the blocks stay as they are."""
    from torch.distributed._composable import checkpoint

    for blocks in model.depth_groups().values():
        for block in blocks:
            if not getattr(block, "_progrow_checkpointed", False):
                checkpoint(block)
                block._progrow_checkpointed = True


def shard_model(model: ExpandableModel, *, mixed_precision: bool) -> ExpandableModel:
    """FSDP2 in place: each block is its own unit (gathered for its forward / backward, freed after),
    the root holds the rest (embeddings, final norm, head). ``mixed_precision``: bf16 weights in compute,
    fp32 gradient reduction (CUDA); fp32 throughout otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for blocks in model.depth_groups().values():
        for block in blocks:
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def empty_sharded_model(
    model_config, shard: Callable[[ExpandableModel], ExpandableModel], device: torch.device
) -> ExpandableModel | None:
    """A sharded model with storage but no values, for a checkpoint to fill: built on the meta device and
    sharded before any storage exists, so no rank holds the whole model. Buffers a checkpoint does not carry
    (non-persistent: RoPE tables) come from a 0-layer build. None for a model with such buffers inside its
    blocks (build it whole instead)."""
    with torch.device("meta"):
        model = build_model(model_config)
    loose = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    small = dict(build_model(model_config.with_depth(0)).named_buffers()) if loose else {}
    if not loose <= set(small):
        return None
    shard(model)
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        if name in small:
            b.copy_(small[name])
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered weight: FSDP2 keeps the root's gathered after a forward (for the backward that
    training brings), so after an evaluation the model's parameters would not be its shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _my_rows(full: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 shard of ``full`` (torch.chunk's rule, as FSDP2)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = dim0_rows(full.size(0), world)
    return full.narrow(0, sum(rows[:rank]), rows[rank])


def _copy_into(target: nn.Module, source: nn.Module, moved: dict) -> None:
    """Every parameter shard and buffer of ``target`` from the same-named one of ``source``: a sharded
    module of the same shapes (its local shard is this rank's rows), or a whole one (cut to this rank's
    rows). ``moved`` records target parameter -> source parameter, for the optimizer state."""
    from torch.distributed.tensor import DTensor

    params = dict(source.named_parameters())
    for name, p in target.named_parameters():
        src, local = params[name], p.to_local()
        if isinstance(src, DTensor):
            local.copy_(src.to_local())
        else:
            local.copy_(_my_rows(src.to(device=local.device, dtype=local.dtype)))
        moved[p] = src
    buffers = dict(source.named_buffers())
    for name, b in target.named_buffers():
        b.copy_(buffers[name])


@torch.no_grad()
def expand_sharded(
    model: ExpandableModel,
    optimizer: torch.optim.Optimizer,
    target,
    method: str,
    *,
    device: torch.device,
    shard: Callable[[ExpandableModel], ExpandableModel],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    copy_optimizer_state: bool = False,
    generator_seed: int | None = None,
) -> tuple[ExpandableModel, torch.optim.Optimizer, GrowthRecord]:
    """``core.growth.expand_depth`` for a model sharded by ``shard``: returns the expanded model (sharded
    alike), a new optimizer over it carrying the kept parameters' state (and the copied layers' with
    ``copy_optimizer_state``), and the growth record. Every rank calls it; no rank ever holds more than
    one whole block."""
    targets = check_expansion(model, target, method)
    record = GrowthRecord(method=method, source_depths=model.group_depths(), target_depths=dict(targets))
    groups = model.depth_groups()
    for name, blocks in groups.items():
        record.origins[name] = layout(method, len(blocks), targets[name])

    with torch.device("meta"):
        new_model = build_model(model.config.with_depth(target))
    shard(new_model)
    new_model.to_empty(device=device)

    # the root (embeddings, final norm, head, a ResNet's stem and stage-opening blocks): everything outside
    # the depth groups, with the same names and shapes in both models
    in_blocks = {
        id(t) for g in new_model.depth_groups().values() for b in g for t in (*b.parameters(), *b.buffers())
    }
    kept: dict[torch.Tensor, torch.Tensor] = {}
    root_params = dict(model.named_parameters())
    root_buffers = dict(model.named_buffers())
    for name, p in new_model.named_parameters():
        if id(p) not in in_blocks:
            p.to_local().copy_(root_params[name].to_local())
            kept[p] = root_params[name]
    for name, b in new_model.named_buffers():
        if id(b) not in in_blocks:
            b.copy_(root_buffers[name])

    copied: dict[torch.Tensor, torch.Tensor] = {}
    # new blocks one at a time, from the RNG stream expand_depth uses; closing() restores the global RNG
    with contextlib.closing(fresh_blocks(model, record.origins, targets, method, generator_seed)) as fresh:
        for name, origins in record.origins.items():
            for o, block in zip(origins, new_model.depth_groups()[name]):
                if o.source is None:
                    _, position, whole = next(fresh)
                    require(position == o.position, "expand_sharded: new blocks out of order")
                    _copy_into(block, whole, {})
                    continue
                _copy_into(block, groups[name][o.source], kept if o.kind == "kept" else copied)
                if o.kind == "copied" and method == "copying_zero":
                    zero_norms_(block)

    new_optimizer = build_optimizer(new_model)
    for new, old in kept.items():
        if old in optimizer.state:
            new_optimizer.state[new] = optimizer.state[old]
    if copy_optimizer_state:
        for new, old in copied.items():
            if old in optimizer.state:
                new_optimizer.state[new] = {
                    k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[old].items()
                }
    record.new_parameters = sum(
        p.numel()  # a DTensor's numel is the whole tensor's
        for name, blocks in new_model.depth_groups().items()
        for o, b in zip(record.origins[name], blocks)
        if o.kind != "kept"
        for p in b.parameters()
    )
    return new_model, new_optimizer, record


def require_process_group() -> None:
    require(
        dist.is_available() and dist.is_initialized(),
        "train.parallel=fsdp needs a torch.distributed process group (torchrun, Ray Train, or "
        "progrow_ray.train, which starts a one-process group)",
    )


def end_process_group(clean: bool = True) -> None:
    """Destroy the default group while the interpreter is fully alive. Whatever still holds the group or
    its work handles (FSDP's state, a finished Trainer) is collected first, and a clean end waits for every
    rank: a gloo group freed later, during interpreter finalisation, aborts the process (SIGABRT,
    "terminate called without an active exception") although its work was done."""
    import gc

    gc.collect()
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()
