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


@dataclass(frozen=True)
class TuneSection:
    enabled: bool = True  # False: use growth.tau_frac / growth.tau_tokens as given
    search_fraction: float = 0.1  # token cap of the probes: their FLOPs <= this share of the main run's
    max_search_tokens: int | None = None  # an explicit cap instead (tokens per probe)
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
class RaySection:
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a local cluster
    local_cpus: int = 4  # logical CPUs of the local cluster started when no address is given
    workers_small: int = 1  # phase 1 (the small model)
    workers_large: int = 2  # phase 2 and the baseline
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    num_to_keep: int = 2
    prewarm: bool = True  # hold a pending phase-2 placement group during phase 1 (when standby is off)
    # Start phase 2's workers during phase 1; they wait for its checkpoint, so the switch at tau skips the
    # worker-group start. Holds workers_small + workers_large workers' resources at once during phase 1.
    standby: bool = True
    worker_start_timeout_s: float = 120.0  # fail fast when workers cannot be placed
    gpu_memory_gb: float = 80.0  # per GPU: the memory preflight refuses a phase whose estimate exceeds it


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
        super().validate(world_size=self.ray.workers_small)
        r, t = self.ray, self.tune
        require(r.workers_small >= 1, f"ray.workers_small must be >= 1, got {r.workers_small}")
        require(
            r.workers_large >= r.workers_small,
            f"ray.workers_large ({r.workers_large}) must be >= ray.workers_small ({r.workers_small})",
        )
        require(r.cpus_per_worker > 0, f"ray.cpus_per_worker must be > 0, got {r.cpus_per_worker}")
        require(
            r.max_failures >= 0 and r.num_to_keep >= 1,
            "ray.max_failures must be >= 0 and ray.num_to_keep >= 1",
        )
        require(
            0 < t.search_fraction <= 1, f"tune.search_fraction must be in (0, 1], got {t.search_fraction}"
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
                r.workers_large,
                self.train.micro_batch,
                self.units_per_example,
                "growth.batch_tokens_after",
            )
        if self.baseline.enabled:
            check_batch(
                self.train.batch_tokens,
                r.workers_large,
                self.train.micro_batch,
                self.units_per_example,
                "train.batch_tokens (the baseline runs on ray.workers_large)",
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

    def fixed_size_workers(self) -> int:
        """Workers for a fixed-size run at ``train.batch_tokens`` (baseline, or the no-saving verdict):
        the most, up to ``ray.workers_large``, that split the batch evenly."""
        per_worker = self.train.micro_batch * self.units_per_example
        return max(
            w for w in range(1, self.ray.workers_large + 1) if self.train.batch_tokens % (w * per_worker) == 0
        )

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
