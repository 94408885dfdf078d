"""Depth expansion: the seven methods of the paper (§3.1, §3.3, Table 2), for any ``ExpandableModel``.

=============  ==================================================================  =================
method         new layers                                                          valid sources
=============  ==================================================================  =================
random         fresh random init, as the model's own init at the target depth      any depth
zero           every parameter zero: the new block outputs 0 (function-preserving) any depth
copying        copies of the one source layer: [1] -> [1, 1, 1]                    exactly 1 layer
copying_last   copies of the last layer: [1, 2, 3] -> [1, 2, 3, 3, 3, 3]           >= 1 layer
copying_stack  the stack repeated: [1, 2, 3] -> [1, 2, 3, 1, 2, 3]                 >= 1 layer
copying_inter  each layer repeated in place: [1, 2, 3] -> [1, 1, 2, 2, 3, 3]       >= 1 layer
copying_zero   copying_stack with the normalisation sub-layers zeroed (Shen et     >= 1 layer
               al. 2022), and the copies' linear biases: each copy outputs 0, so the
               function is preserved
=============  ==================================================================  =================

Copying from a zero-layer model is invalid (nothing to copy); from one layer the copying variants are
the same thing; from several layers plain ``copying`` is ambiguous, so an ordering must be chosen.
A ResNet is expanded per stage (each stage's identity-shape blocks are one depth group).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn

from .errors import ConfigError, require
from .models.base import ExpandableModel, unwrap_model
from .optim import sync_param_groups

METHODS = ("random", "zero", "copying", "copying_last", "copying_stack", "copying_inter", "copying_zero")
COPYING = tuple(m for m in METHODS if m.startswith("copying"))
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm)

OriginKind = Literal["kept", "copied", "random", "zero"]


@dataclass(frozen=True)
class Origin:
    """Where the layer now at ``position`` came from; ``source`` indexes the pre-expansion list."""

    position: int
    kind: OriginKind
    source: int | None = None


@dataclass
class GrowthRecord:
    method: str
    source_depths: dict[str, int]
    target_depths: dict[str, int]
    origins: dict[str, list[Origin]] = field(default_factory=dict)
    new_parameters: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def layout(method: str, source: int, target: int) -> list[Origin]:
    """The layer order after expanding ``source`` -> ``target`` layers with ``method``."""
    if method not in METHODS:
        raise ConfigError(f"growth.method must be one of {list(METHODS)}, got {method!r}")
    if target < source:
        raise ConfigError(
            f"target depth {target} is below the source depth {source}: growth only adds layers"
        )
    if method in COPYING and source == 0 and target > 0:
        raise ConfigError(
            f"growth.method={method!r} cannot copy from a 0-layer model (paper Table 2): "
            "use 'random' (the recipe's choice) or 'zero'"
        )
    if method == "copying" and source > 1:
        raise ConfigError(
            f"growth.method='copying' is ambiguous from {source} layers: choose "
            "'copying_stack', 'copying_inter' or 'copying_last' (paper §3.3)"
        )
    kept = [Origin(i, "kept", i) for i in range(source)]
    if method in ("random", "zero"):
        return kept + [Origin(i, method) for i in range(source, target)]
    if method == "copying_last":
        return kept + [Origin(i, "copied", source - 1) for i in range(source, target)]
    if method in ("copying", "copying_stack", "copying_zero"):
        return kept + [Origin(i, "copied", i % source) for i in range(source, target)]
    # copying_inter: position j takes layer floor(j * source / target); the first of each run is the original
    origins, seen = [], set()
    for j in range(target):
        src = j * source // target
        origins.append(Origin(j, "copied" if src in seen else "kept", src))
        seen.add(src)
    return origins


def zero_norms_(block: nn.Module) -> None:
    """copying_zero's surgery on a copy: every normalisation's scale and shift become 0, so each
    sub-layer reads 0; so do the biases of its linear maps and convolutions, so each maps 0 to 0
    (GELU / SiLU / ReLU of 0 is 0, attention over zero values is 0). The copy then adds exactly 0 to
    the residual stream, with or without ``model.bias``; its weight matrices stay copies."""
    for m in block.modules():
        if isinstance(m, NORM_TYPES):
            for p in m.parameters(recurse=False):
                nn.init.zeros_(p)
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def zero_(block: nn.Module) -> None:
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()


def check_expansion(model: nn.Module, target, method: str) -> dict[str, int]:
    """Validate ``target``/``method`` for ``model`` without changing it; returns target depth per group."""
    model = unwrap_model(model)
    if not isinstance(model, ExpandableModel):
        raise ConfigError(f"{type(model).__name__} is not an ExpandableModel")
    targets = model.group_depths_for(target)
    for name, blocks in model.depth_groups().items():
        _check_block_kinds(model, name, layout(method, len(blocks), targets[name]))
    return targets


@torch.no_grad()
def expand_depth(
    model: nn.Module,
    target,
    method: str = "random",
    *,
    optimizer: torch.optim.Optimizer | None = None,
    copy_optimizer_state: bool = False,
    generator_seed: int | None = None,
) -> GrowthRecord:
    """Expand ``model`` in place to ``target`` depth (int, or 4 ints for a ResNet) with ``method``.

    Old blocks are the same module objects afterwards (possibly at new positions), so their
    parameters — and the optimizer state keyed on them — survive. New blocks live on the device and
    dtype of the model. With ``optimizer`` (from ``core.optim.build_optimizer``) the new parameters
    are added to it: fresh state, or the copied layer's state with ``copy_optimizer_state``.
    ``generator_seed`` makes the random init of new layers reproducible independent of the global
    RNG stream. Works on torch.compile / DDP wrappers (it expands the wrapped module; compiled code
    recompiles on the next call, DDP must be re-wrapped).
    """
    model = unwrap_model(model)
    targets = check_expansion(model, target, method)
    record = GrowthRecord(method=method, source_depths=model.group_depths(), target_depths=dict(targets))
    ref = next(model.parameters())
    copied_from: dict[torch.Tensor, torch.Tensor] = {}
    for name, blocks in model.depth_groups().items():
        record.origins[name] = layout(method, len(blocks), targets[name])
    # new blocks one at a time (a 0 -> 60-layer 7B expansion would otherwise hold them all on the CPU)
    fresh = contextlib.closing(fresh_blocks(model, record.origins, targets, method, generator_seed))
    with fresh as new_blocks:
        for name, blocks in model.depth_groups().items():
            _rebuild_group(name, blocks, record.origins[name], method, new_blocks, copied_from, ref)
    model.set_group_depths(model.group_depths())
    record.new_parameters = sum(
        p.numel()
        for name, blocks in model.depth_groups().items()
        for o, b in zip(record.origins[name], blocks)
        if o.kind != "kept"
        for p in b.parameters()
    )
    if optimizer is not None:
        sync_param_groups(optimizer, model, copied_from if copy_optimizer_state else None)
    return record


def _rebuild_group(name, blocks, origins, method, new_blocks, copied_from, ref) -> None:
    """One depth group's new layer list: kept blocks (the same modules), copies, new blocks in order."""
    old = list(blocks)
    new_list = []
    for o in origins:
        if o.kind == "kept":
            block = old[o.source]
        elif o.kind == "copied":
            block = copy.deepcopy(old[o.source])
            if method == "copying_zero":
                zero_norms_(block)
            for p_new, p_src in zip(block.parameters(), old[o.source].parameters()):
                copied_from[p_new] = p_src
        else:
            group, position, block = next(new_blocks)
            require((group, position) == (name, o.position), "expand_depth: new blocks out of order")
            block = block.to(device=ref.device, dtype=ref.dtype)
        new_list.append(block)
    # Replace the contents, not the ModuleList, so references to it stay valid.
    del blocks[:]
    blocks.extend(new_list)


def fresh_blocks(
    model: ExpandableModel,
    origins: dict[str, list[Origin]],
    targets: dict[str, int],
    method: str,
    generator_seed: int | None,
) -> Iterator[tuple[str, int, nn.Module]]:
    """The new blocks of an expansion — (group, position, block) for each ``random`` / ``zero`` origin, in
    order, on the CPU — from one RNG stream seeded by ``generator_seed`` (the global RNG otherwise, left
    as it was either way when seeded). ``expand_depth`` and the sharded expansion
    (``engine/parallel.py``) both take their new blocks from here, so they hold the same weights."""
    fork = torch.random.fork_rng(devices=[]) if generator_seed is not None else contextlib.nullcontext()
    with fork:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        for name, group_origins in origins.items():
            for o in group_origins:
                if o.kind in ("random", "zero"):
                    block = model.new_block(name, o.position, targets[name])
                    if o.kind == "zero":
                        zero_(block)
                    yield name, o.position, block


def _check_block_kinds(model: ExpandableModel, group: str, origins: list[Origin]) -> None:
    """A layer copied or moved to another position must be of the kind that position holds
    (an MoE model with ``moe_every=2`` alternates MoE and dense blocks)."""
    for o in origins:
        if o.source is not None and model.block_kind(group, o.source) != model.block_kind(group, o.position):
            raise ConfigError(
                f"cannot place {group}[{o.source}] ({model.block_kind(group, o.source)}) at position "
                f"{o.position} "
                f"({model.block_kind(group, o.position)}): use growth.method='random', or a model whose "
                f"blocks are all alike"
            )
