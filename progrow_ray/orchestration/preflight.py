"""Memory preflight: the per-GPU estimate of every phase a run will go through, under ddp and fsdp, and a
refusal at start (one line, exit 2) when the mode a phase would run in does not fit ``ray.gpu_memory_gb`` —
never an out-of-memory error at τ, after phase 1 has spent its tokens. Estimates: ``engine/memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError
from ..engine.memory import GB, MemoryEstimate, estimate, resolve_parallel
from .config import PipelineConfig


@dataclass(frozen=True)
class PhaseMemory:
    phase: str
    depth: Any
    world: int
    ddp: MemoryEstimate
    fsdp: MemoryEstimate
    fsdp_checkpointed: MemoryEstimate  # fsdp with activation checkpointing
    mode: str  # what the phase runs under: train.parallel, auto resolved against the limit

    @property
    def chosen(self) -> MemoryEstimate:
        return self.ddp if self.mode == "ddp" else self.fsdp


def phases(cfg: PipelineConfig, world: int | None = None) -> list[tuple[str, Any, int]]:
    """(phase, model config, workers) of each training phase of ``cfg``: the deepest model before τ on
    ``ray.workers_small``, the target on ``ray.workers_large`` (and the baseline). An elastic phase at its
    minimum, where each rank holds the most under fsdp. ``world``: one run of that many ranks
    (``progrow_ray.train``)."""
    target = cfg.target_model_config()
    if world is not None:
        return [("train", target, world)]
    r, out = cfg.ray, []
    if cfg.growth.enabled:
        stages = cfg.growth.stages
        before = stages[-1]["depth"] if stages else cfg.growth.source_depth
        out.append(("phase 1", target.with_depth(before), r.small.min))
        out.append(("phase 2", target, r.large.min))
        if cfg.baseline.enabled:
            out.append(("baseline", target, cfg.fixed_size_workers().min))
    else:
        out.append(("fixed-size", target, cfg.fixed_size_workers().min))
    return out


def memory_plan(cfg: PipelineConfig, world: int | None = None) -> list[PhaseMemory]:
    limit = cfg.ray.gpu_memory_gb * GB
    rows = []
    for phase, model_config, workers in phases(cfg, world):
        ddp = estimate(cfg, model_config, workers, "ddp")
        fsdp = estimate(cfg, model_config, workers, "fsdp")
        ac = estimate(cfg, model_config, workers, "fsdp", activation_checkpointing=True)
        mode = resolve_parallel(cfg, model_config, workers, limit)
        rows.append(PhaseMemory(phase, model_config.depth, workers, ddp, fsdp, ac, mode))
    return rows


def check_memory(cfg: PipelineConfig, world: int | None = None) -> list[PhaseMemory]:
    """Raise ``ConfigError`` naming the phase, the estimate, the limit and the fix when a phase's mode does
    not fit ``ray.gpu_memory_gb``."""
    limit_gb = cfg.ray.gpu_memory_gb
    rows = memory_plan(cfg, world)
    for row in rows:
        need = row.chosen.total / GB
        if need <= limit_gb:
            continue
        if row.mode == "ddp" and row.fsdp.total / GB <= limit_gb:
            fix = "set train.parallel=fsdp (or auto)"
        elif not cfg.train.activation_checkpointing and row.fsdp_checkpointed.total / GB <= limit_gb:
            fix = "set train.parallel=fsdp and train.activation_checkpointing=true"
        else:
            fix = "lower train.micro_batch, add workers, or use GPUs with more memory (ray.gpu_memory_gb)"
        raise ConfigError(
            f"memory preflight: {row.phase} (depth {row.depth} on {row.world} GPUs, {row.mode}) needs "
            f"{need:.3g} GB per GPU, over ray.gpu_memory_gb={limit_gb:g}; {fix} "
            f"(see python -m progrow_ray.plan)"
        )
    return rows


def phase_parallel(cfg: PipelineConfig, run_cfg, phase: str, workers):
    """``run_cfg`` with ``train.parallel`` decided for ``phase`` on ``workers`` (a ``WorkerRange``; the
    preflight's choice at its minimum on GPUs, ddp otherwise), so every rank of the phase, at every size
    an elastic fit takes, runs the same mode."""
    from dataclasses import replace

    names = {"phase1": "phase 1", "phase2": "phase 2", "baseline": "baseline", "fixed": "fixed-size"}
    models = {p: m for p, m, _ in phases(cfg)}
    model_config = models.get(names.get(phase, phase), run_cfg.target_model_config())
    limit = cfg.ray.gpu_memory_gb * GB if cfg.ray.use_gpu else None
    mode = resolve_parallel(run_cfg, model_config, workers.min, limit)
    return replace(run_cfg, train=replace(run_cfg.train, parallel=mode))


def format_plan(rows: list[PhaseMemory], limit_gb: float) -> list[str]:
    lines = [
        f"Per-GPU memory estimate (GB; limit ray.gpu_memory_gb = {limit_gb:g}); "
        "'ac': activation checkpointing",
        f"{'phase':<10} {'depth':>6} {'GPUs':>5} {'mode':<8} {'params':>7} {'grads':>6} {'optim':>6} "
        f"{'unshard':>7} {'activ':>7} {'NS':>6} {'total':>7}",
    ]
    for row in rows:
        for label, e in (("ddp", row.ddp), ("fsdp", row.fsdp), ("fsdp+ac", row.fsdp_checkpointed)):
            mark = " <- runs" if label == row.mode else ""
            over = "  (over the limit)" if e.total / GB > limit_gb else ""
            lines.append(
                f"{row.phase:<10} {str(row.depth):>6} {row.world:>5} {label:<8} {e.parameters / GB:>7.2f} "
                f"{e.gradients / GB:>6.2f} {e.optimizer / GB:>6.2f} {e.unsharded / GB:>7.2f} "
                f"{e.activations / GB:>7.2f} {e.newton_schulz / GB:>6.2f} {e.total / GB:>7.2f}{mark}{over}"
            )
    return lines
