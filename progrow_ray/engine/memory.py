"""Per-device memory of a run under DDP and FSDP2, before it starts: the preflight that refuses a phase that
would not fit instead of an out-of-memory error at τ.

Parameters, gradients and optimizer state are counted exactly: the model is built on the meta device
(shapes, no storage) and every tensor's rows are split over the ranks as FSDP2 splits them (torch.chunk on
dim 0; rank 0 holds the most). Activations are the tensors saved for backward per token, per block:

  GPT block   attention 6d (LN input and output, q, k, v, attention output; SDPA keeps no T x T scores)
              + MLP 2d + 2h (LN output, the hidden before and after GELU), h = 4d: 16d in all
  Llama       6d + 2d + 4h (SwiGLU's gate, up, product)          MoE   8d + 2h x top_k x capacity + experts
  outside     embeddings and final norm 2d, the logits 5V (bf16 logits, their fp32 copy for the loss, its
              gradient)

in the compute dtype (bf16 on CUDA unless train.dtype says float32); with activation checkpointing a block
keeps only its input (d) and one block is recomputed at a time. ResNet's are measured by a meta-device
forward. Newton–Schulz temporaries: the stacked matrices of the largest batch the rank orthogonalises (fp32
input, two bf16 iterates, two square Gram products) plus, owners sharing the work, the whole tensors it
gathers and the results it sends back. A DDP rank also holds gradient buckets (a second fp32 copy of the
gradients) and autocast's bf16 weight copies; an FSDP rank the unsharded weights of the root and of two
blocks (one computing, one prefetched) and one block's unsharded gradients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..core.layouts import layout_from_shape, matrix_layouts
from ..core.models import build_model
from ..core.models.base import LanguageModelConfig
from ..core.optim import newton_schulz_cost, split_matrices
from ..core.owners import assign_owners, dim0_rows
from .config import RunConfig

GB = 1e9
MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class MemoryEstimate:
    mode: str
    world: int
    parameters: int  # bytes per device (the largest rank's share under fsdp)
    gradients: int
    optimizer: int
    unsharded: int  # fsdp: gathered weights / gradients of the units in flight; ddp: buckets + bf16 copies
    activations: int
    newton_schulz: int
    activation_checkpointing: bool

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.unsharded
            + self.activations
            + self.newton_schulz
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _meta_model(model_config):
    with torch.device("meta"):
        return build_model(model_config)


def _rank0_rows_numel(shape: torch.Size, world: int) -> int:
    return dim0_rows(shape[0], world)[0] * math.prod(shape[1:]) if len(shape) else 1


def _activation_elements_per_unit(model_config, image_size: int) -> tuple[float, float, float]:
    """(all blocks, the largest block, outside the blocks) activation elements saved per token / image."""
    if isinstance(model_config, LanguageModelConfig):
        d, V = model_config.n_embd, model_config.vocab_size
        per_block = []
        for i in range(model_config.n_layer):
            if hasattr(model_config, "ffn_hidden"):  # Llama: SwiGLU
                per_block.append(8 * d + 4 * model_config.ffn_hidden)
            elif hasattr(model_config, "n_experts") and model_config.is_moe_layer(i):
                k, cf = model_config.top_k, model_config.capacity_factor
                per_block.append(8 * d + 2 * 4 * d * k * cf + model_config.n_experts)
            else:
                per_block.append(16 * d)
        return float(sum(per_block)), float(max(per_block, default=0)), 2.0 * d + 5.0 * V
    return _measured_image_activations(model_config, image_size)


def _measured_image_activations(model_config, image_size: int) -> tuple[float, float, float]:
    """Convolutional models: the elements a meta-device forward of one image saves for backward."""
    model = _meta_model(model_config)
    params = {id(p) for p in model.parameters()}
    saved = [0.0]

    def pack(t):
        if id(t) not in params:
            saved[0] += t.numel()
        return t

    x = torch.empty(1, 3, image_size, image_size, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.zeros(1, dtype=torch.long, device="meta"))
    n_blocks = max(1, sum(len(b) for b in model.depth_groups().values()))
    return saved[0], saved[0] / n_blocks, 0.0


def _newton_schulz_bytes(model, world: int, mode: str, ns_split: bool = True) -> int:
    """Peak bytes of the Muon step's temporaries on the busiest rank: owners share the work when
    ``world`` > 1 (fsdp: two all-to-all buffers of what it owns; ddp: one all-reduce buffer of every
    update); the stacked batch it orthogonalises and the whole tensors it holds, or its rows of a split
    matrix, whichever is larger."""
    sharing = world > 1
    layouts = matrix_layouts(model)
    mats = [(p, layouts.get(p) or layout_from_shape(p)) for p in model.parameters() if p.ndim >= 2]
    if not mats:
        return 0
    costs = [newton_schulz_cost(lay) for _, lay in mats]
    # optimizer.ns_split (core/optim.py): a matrix heavier than a rank's share, stored (long, short), is
    # split by rows over all ranks; each holds 1/N of it and the short x short Gram products
    if ns_split and sharing:
        split = split_matrices([p for p, _ in mats], [lay for _, lay in mats], costs, world)
    else:
        split = [False] * len(mats)
    split_peak = max(
        (
            (4 + 2 + 2) * p.shape[0] * p.shape[1] // world + 8 * p.shape[1] ** 2
            for s, (p, _) in zip(split, mats)
            if s
        ),
        default=0,
    )
    # ddp: one all-reduce buffer of every update, plus a whole-size copy of each split matrix's rows
    ddp_exchange = 4 * (
        sum(p.numel() for p, _ in mats) + sum(p.numel() for s, (p, _) in zip(split, mats) if s)
    )
    mats = [m for s, m in zip(split, mats) if not s]
    costs = [c for s, c in zip(split, costs) if not s]
    if not mats:
        return int(split_peak + (ddp_exchange if sharing and mode == "ddp" else 0))
    owner = assign_owners(costs, world) if sharing else [0] * len(mats)
    busiest = max(
        range(world if sharing else 1), key=lambda r: sum(c for c, o in zip(costs, owner) if o == r)
    )
    owned = [(p, lay) for (p, lay), o in zip(mats, owner) if o == busiest]
    by_shape: dict[tuple, int] = {}
    for _, lay in owned:
        key = (min(lay.fan_out, lay.fan_in), max(lay.fan_out, lay.fan_in))
        by_shape[key] = by_shape.get(key, 0) + lay.batch
    peak_batch = max(k * (4 * m * n + 2 * 2 * m * n + 2 * 2 * m * m) for (m, n), k in by_shape.items())
    whole = sum(p.numel() for p, _ in owned) * 4  # gathered inputs and results, fp32
    if not sharing:
        exchange = 0
    elif mode == "fsdp":
        exchange = 2 * whole
    else:
        exchange = ddp_exchange
    return int(max(peak_batch + 2 * whole, split_peak) + exchange)


def estimate(
    cfg: RunConfig,
    model_config,
    world: int,
    mode: str,
    *,
    cuda: bool = True,
    activation_checkpointing: bool | None = None,
) -> MemoryEstimate:
    """Bytes per device of ``model_config`` trained by ``cfg`` on ``world`` ranks under ``mode``."""
    ac = cfg.train.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    model = _meta_model(model_config)
    params = list(model.parameters())  # each shared (tied) tensor once
    full = sum(p.numel() for p in params) * 4
    sharded = sum(_rank0_rows_numel(p.shape, world) for p in params) * 4
    state_per_param = 2 if cfg.optimizer.name == "adamw" else 1  # Adam's two moments; Muon-NSGD's momentum
    compute_bytes = 2 if cuda and cfg.train.dtype != "float32" else 4
    blocks = [b for group in model.depth_groups().values() for b in group]
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    root = sum(p.numel() for p in params) - sum(p.numel() for b in blocks for p in b.parameters())
    if mode == "fsdp":
        parameters, gradients = sharded, sharded
        unsharded = (root + 2 * largest_block) * compute_bytes + largest_block * 4
    else:
        parameters, gradients = full, full
        unsharded = full + (full // 4 * 2 if compute_bytes == 2 else 0)  # buckets; autocast's bf16 copies
    units = cfg.train.micro_batch * cfg.units_per_example
    all_blocks, one_block, outside = _activation_elements_per_unit(model_config, cfg.data.image_size)
    if ac:
        d = getattr(model_config, "n_embd", 0) or one_block
        kept = d * len(blocks) + one_block
    else:
        kept = all_blocks
    activations = int((kept + outside) * units * compute_bytes)
    muon = cfg.optimizer.name == "muon_nsgd"
    ns = _newton_schulz_bytes(model, world, mode, cfg.optimizer.ns_split) if muon else 0
    return MemoryEstimate(
        mode=mode,
        world=world,
        parameters=int(parameters),
        gradients=int(gradients),
        optimizer=int(parameters * state_per_param),
        unsharded=int(unsharded),
        activations=activations,
        newton_schulz=ns,
        activation_checkpointing=ac,
    )


def resolve_parallel(cfg: RunConfig, model_config, world: int, limit_bytes: float | None) -> str:
    """``train.parallel`` as a phase holding ``model_config`` on ``world`` ranks runs it: ``auto`` is fsdp
    when DDP's estimate does not fit ``limit_bytes`` (a GPU's memory), ddp otherwise and off GPUs. The
    preflight, the pipeline's phases and the Trainer all decide through here."""
    mode = cfg.train.parallel
    if mode != "auto":
        return mode
    if limit_bytes is None:
        return "ddp"
    return "ddp" if estimate(cfg, model_config, world, "ddp").total <= limit_bytes else "fsdp"


def device_memory_bytes(device: torch.device) -> int | None:
    """A GPU's memory; None on CPU (host memory is not what the preflight guards)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory
