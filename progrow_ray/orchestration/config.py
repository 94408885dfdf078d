"""The pipeline's config: a ``RunConfig`` (the main run) plus how to search τ, place the phases on
Ray, run the baseline and track in MLflow."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..core.errors import require
from ..engine.config import RunConfig, check_batch, load_config


@dataclass(frozen=True)
class LrSearchSection:
    enabled: bool = False  # Optuna tunes the LR on the cheap source model; the main run uses the best
    num_samples: int = 6
    lr_min: float = 1e-3
    lr_max: float = 0.1
    tokens: int | None = None  # per trial (default: the search token cap)


REUSE = ("auto", "never", "only")


@dataclass(frozen=True)
class TuneSection:
    enabled: bool = True  # False: use growth.tau_frac / growth.tau_tokens as given
    # The search plan (orchestration/search_plan.py): the probes run to expansion + 1.5 x the prior t_mix,
    # at the widest width whose FLOPs stay within search_fraction of the main run for any τ the search
    # may choose; a search that cannot fit is refused at start.
    search_fraction: float = 0.1
    t_mix_prior_tokens: int | None = None  # None: the registry's value, else the paper's for the family
    min_probe_width: int | None = None  # narrowest probe width (n_embd / base_width); None: one width step
    max_search_tokens: int | None = None  # an explicit cap instead (tokens per probe)
    report_every: int | None = None  # probe steps per reported point; None: about 1,000 points per probe
    checkpoint_every_tokens: int | None = None  # probe checkpoints; None: 20 per probe
    max_failures: int = 2  # probe restarts (from its checkpoint) before the search fails
    # The mixing-time registry (orchestration/tmix_registry.py): "auto" reuses a measured t_mix whose
    # fingerprint matches and searches otherwise, "never" always searches, "only" fails without one.
    reuse: str = "auto"
    registry: str | None = None  # where it lives: local dir or s3://; None: <out>/tmix-registry
    rel_tol: float = 0.01  # mixed when (prog - fixed) / fixed <= rel_tol ...
    window_frac: float = 0.1  # ... for this share of the probe horizon after the expansion
    smoothing: float = 0.6  # EMA weight of the past on the loss curves
    safety: float = (
        0.0  # tau = stable end - t_mix * (1 + safety); 0.5 reproduces the paper's tau = 480k (README)
    )
    # A third probe, the source model never expanded: mixing counts only where the fixed model beats it by
    # this much (relative), so the trivial early agreement of every depth is not taken for mixing.
    # 0: no probe.
    min_depth_advantage: float = 0.02
    on_no_saving: str = "fixed"  # verdict "no saving": "fixed" trains fixed-size; "expand" still expands at
    # growth.tau_frac / tau_tokens (demos, ablations) and the report says the verdict was overridden
    one_layer_probe: bool = False  # also probe a one-layer source (reported, not used for tau)
    probe_model: dict = field(default_factory=dict)  # model overrides for the probes: "two small-scale runs"
    # (paper §7); t_mix transfers across model sizes (App. C.1), so a narrower target keeps the search cheap
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    lr_search: LrSearchSection = LrSearchSection()


@dataclass(frozen=True)
class WorkerRange:
    """A phase's workers: ``min == max`` is a fixed-size fit; otherwise an elastic one, which starts
    with what the cluster can place (at least ``min``) and resizes as nodes come and go."""

    min: int
    max: int

    @property
    def elastic(self) -> bool:
        return self.min != self.max

    def num_workers(self) -> int | tuple[int, int]:
        """What Ray Train's ``ScalingConfig(num_workers=...)`` takes."""
        return (self.min, self.max) if self.elastic else self.max

    def __str__(self) -> str:
        return f"{self.min}-{self.max}" if self.elastic else str(self.max)


def worker_range(value: int | tuple[int, int], key: str) -> WorkerRange:
    lo, hi = (value, value) if isinstance(value, int) else value
    shown = value if isinstance(value, int) else list(value)  # as the YAML said it
    require(1 <= lo <= hi, f"{key} must be a count >= 1 or [min, max] with 1 <= min <= max, got {shown}")
    return WorkerRange(lo, hi)


@dataclass(frozen=True)
class RaySection:
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a local cluster
    local_cpus: int = 4  # logical CPUs of the local cluster started when no address is given
    # Workers: a count, or [min, max] for an elastic fit that survives losing nodes (the global batch
    # stays the same at every size in the range).
    workers_small: int | tuple[int, int] = 1  # phase 1 (the small model)
    workers_large: int | tuple[int, int] = 2  # phase 2 and the baseline
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # worker or node failures a fit survives (each resumes from a checkpoint)
    max_preemption_failures: int = 8  # node drains (spot reclaims) a fit survives, counted apart; -1: any
    num_to_keep: int = 2
    prewarm: bool = True  # hold a pending phase-2 placement group during phase 1 (when standby is off)
    # Start phase 2's workers during phase 1; they wait for its checkpoint, so the switch at tau skips the
    # worker-group start. Used only where the cluster (or its autoscaler) can hold both phases' maximum
    # workers at once; otherwise the pre-warm placement group.
    standby: bool = True
    worker_start_timeout_s: float = 120.0  # fail fast when workers cannot be placed
    # A phase whose minimum workers the cluster cannot hold (nor autoscale to) for this long stops the
    # pipeline with exit 2 and its state kept: the same command resumes once capacity is back.
    capacity_timeout_s: float = 600.0
    handoff_timeout_s: float = 86400.0  # standby phase 2 gives up waiting for phase 1's checkpoint
    resize_check_s: float = 60.0  # an elastic fit looks for room to grow this often
    gpu_memory_gb: float = 80.0  # per GPU: the memory preflight refuses a phase whose estimate exceeds it

    @property
    def small(self) -> WorkerRange:
        return worker_range(self.workers_small, "ray.workers_small")

    @property
    def large(self) -> WorkerRange:
        return worker_range(self.workers_large, "ray.workers_large")


@dataclass(frozen=True)
class BaselineSection:
    enabled: bool = True  # a fixed-size run of the target model on the same token budget


@dataclass(frozen=True)
class MlflowSection:
    tracking_uri: str | None = None  # None: sqlite:///<out>/mlflow.db
    experiment: str = "progrow_ray"


@dataclass(frozen=True)
class PipelineConfig(RunConfig):
    tune: TuneSection = TuneSection()
    ray: RaySection = RaySection()
    baseline: BaselineSection = BaselineSection()
    mlflow: MlflowSection = MlflowSection()

    def validate(self, world_size: int = 1) -> "PipelineConfig":
        super().validate(world_size=self.ray.small.max)
        r, t = self.ray, self.tune
        small, large = r.small, r.large
        require(
            large.max >= small.max,
            f"ray.workers_large ({large}) must reach at least ray.workers_small ({small})",
        )
        require(
            r.capacity_timeout_s > 0 and r.handoff_timeout_s > 0 and r.resize_check_s > 0,
            "ray.capacity_timeout_s, ray.handoff_timeout_s and ray.resize_check_s must be > 0",
        )
        require(
            r.max_preemption_failures >= -1, "ray.max_preemption_failures must be >= 0, or -1 for no limit"
        )
        require(r.cpus_per_worker > 0, f"ray.cpus_per_worker must be > 0, got {r.cpus_per_worker}")
        require(
            r.max_failures >= 0 and r.num_to_keep >= 1,
            "ray.max_failures must be >= 0 and ray.num_to_keep >= 1",
        )
        require(
            0 < t.search_fraction <= 1, f"tune.search_fraction must be in (0, 1], got {t.search_fraction}"
        )
        require(t.reuse in REUSE, f"tune.reuse must be one of {list(REUSE)}, got {t.reuse!r}")
        require(
            t.t_mix_prior_tokens is None or t.t_mix_prior_tokens > 0,
            f"tune.t_mix_prior_tokens must be > 0, got {t.t_mix_prior_tokens}",
        )
        require(
            all(v is None or v >= 1 for v in (t.min_probe_width, t.report_every, t.checkpoint_every_tokens))
            and t.max_failures >= 0,
            "tune.min_probe_width, tune.report_every and tune.checkpoint_every_tokens must be >= 1, "
            "tune.max_failures >= 0",
        )
        require(
            t.rel_tol >= 0 and 0 <= t.window_frac < 1 and 0 <= t.smoothing < 1,
            "tune.rel_tol must be >= 0, tune.window_frac and tune.smoothing in [0, 1)",
        )
        require(
            t.min_depth_advantage >= 0, f"tune.min_depth_advantage must be >= 0, got {t.min_depth_advantage}"
        )
        require(
            t.on_no_saving in ("fixed", "expand"),
            f"tune.on_no_saving must be 'fixed' or 'expand', got {t.on_no_saving!r}",
        )
        require(
            t.on_no_saving == "fixed" or self.tau_tokens,
            "tune.on_no_saving=expand needs growth.tau_frac or growth.tau_tokens (where to expand anyway)",
        )
        require(self.growth.enabled or not t.enabled, "tune.enabled needs growth.enabled (nothing to expand)")
        if self.growth.enabled:
            check_batch(
                self.phase2_batch_tokens,
                self.units_per_example,
                "growth.batch_tokens_after",
                micro_batch=self.train.micro_batch,
                world_size=large.max,
            )
        ls = t.lr_search
        require(
            not ls.enabled or (0 < ls.lr_min < ls.lr_max and ls.num_samples >= 1),
            "tune.lr_search needs 0 < lr_min < lr_max and num_samples >= 1",
        )
        return self

    def run_config(self) -> RunConfig:
        """The main run's engine config: the ``RunConfig`` sections of this one, without the pipeline's.
        Phases and probes derive theirs from it with ``dataclasses.replace``."""
        return RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})

    def fixed_size_workers(self) -> WorkerRange:
        """Workers for a fixed-size run at ``train.batch_tokens`` (the baseline, or the no-saving verdict):
        ``ray.workers_large``, at most one per micro-batch of that (smaller) batch."""
        large = self.ray.large
        per_worker = self.train.micro_batch * self.units_per_example
        most = max(1, -(-self.train.batch_tokens // per_worker))
        return WorkerRange(min(large.min, most), min(large.max, most))

    @property
    def phase2_batch_tokens(self) -> int:
        return self.growth.batch_tokens_after or self.train.batch_tokens


def load_single_run(path, overrides: list[str] | None = None, with_pipeline: bool = False):
    """A preset as the single-process run it describes (``progrow_ray.train``, benchmarks, tests): every
    section's keys and types are checked, the pipeline's are then dropped, and the run is validated.
    ``with_pipeline``: (run, the whole preset), for what reads the other sections (the memory preflight)."""
    full = load_config(path, overrides, cls=PipelineConfig)
    run = full.run_config().validate()
    return (run, full) if with_pipeline else run
