"""What crosses a boundary above the engine, typed: a phase's result, the searches' results and the
pipeline's state. Frozen; turned into JSON only where they meet the disk (``pipeline_state.json``) or
MLflow, by ``to_json`` / ``from_json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _known(cls, data: dict) -> dict:
    """The keys of ``data`` that are fields of ``cls``: state files of older versions still load."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class TrackedRun:
    """How a phase appears in MLflow: its params and tags, and its run id once it was logged."""

    params: dict
    tags: dict
    run_id: str | None = None  # "disabled" when tracking was off
    live_steps: dict = field(default_factory=dict)  # event kind -> the newest step streamed while it ran
    closed: bool = False  # the run holds the whole phase and is ended


@dataclass(frozen=True)
class PhaseResult:
    """One Ray Train fit of the pipeline (phase1, phase2, fixed, baseline) as the driver keeps it."""

    name: str
    depth: Any
    workers: int
    global_batch_tokens: int
    tokens: int  # this phase's own tokens (phase 2: after τ)
    tokens_end: int  # the run's token count when the phase ended
    flops: float  # this phase's own FLOPs
    flops_end: float
    final_train_loss: float | None
    final_val_loss: float | None
    checkpoint_uri: str | None
    fit_s: float
    end_time: float
    history: list  # this phase's own metric events (engine format)
    mlflow: TrackedRun
    phase_switch_s: float | None = None  # phase 2: from phase 1's end to the expansion
    phase_switch_breakdown: dict | None = None
    # each restart of the worker group (progress.ElasticLog): time, tokens, from/to workers, cause, tokens
    # recomputed, wall time lost
    elastic_events: list = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PhaseResult":
        # state files written before phases kept their MLflow params: tracked again with none
        tracked = dict(data.get("mlflow") or {"params": {}, "tags": {}})
        tracked.setdefault("closed", bool(tracked.get("run_id")))  # older files: a run id meant done
        return cls(**{**_known(cls, data), "mlflow": TrackedRun(**_known(TrackedRun, tracked))})

    # the columns of the report's phase table
    REPORT_KEYS = (
        "name",
        "depth",
        "workers",
        "global_batch_tokens",
        "tokens",
        "flops",
        "final_train_loss",
        "checkpoint_uri",
    )

    def report_row(self) -> dict:
        return {k: getattr(self, k) for k in self.REPORT_KEYS}


@dataclass(frozen=True)
class ProbeTrial:
    """One probe of the τ search: its loss curve by tokens."""

    role: str  # fixed | progressive | progressive-1 | source
    tokens: int
    flops: float
    curve: list  # [{"tokens", "train_loss", "flops"}]
    error: str | None = None
    restarts: list = dataclasses.field(default_factory=list)  # tokens each restart resumed from

    def events(self) -> list[dict]:
        """The curve as engine metric events (what the tracker logs), at the probe's training steps."""
        return [
            {"event": "train", "step": i, **point} for i, point in enumerate(self.curve)
        ]  # older: no step


@dataclass(frozen=True)
class SearchResult:
    """The τ search's outcome: the mixing time measured, the τ planned, the verdict."""

    t_mix_tokens: int | None
    tau_tokens: int | None
    expand: bool  # the main run grows (may be forced by tune.on_no_saving=expand)
    verdict: str
    search_flops: float = 0.0
    trials: tuple = ()  # ProbeTrial per probe
    cap_tokens: int | None = None
    expand_at_tokens: int | None = None
    mix: dict | None = None  # core.mixing.MixResult.to_dict()
    plan: dict | None = None  # core.mixing.TauPlan.to_dict()
    verdict_expand: bool | None = None  # the search's own verdict, when tune.on_no_saving overrode it
    one_layer_t_mix_tokens: int | None = None
    resumed: bool = False  # the search was continued after a driver kill (Tuner.restore)
    search_plan: dict | None = None  # search_plan.SearchPlan, as planned before the probes ran
    registry: dict | None = None  # the registry entry used or written (tmix_registry)
    lr_search_flops: float = 0.0

    @property
    def search_says_expand(self) -> bool:
        return self.expand if self.verdict_expand is None else self.verdict_expand

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["trials"] = [dataclasses.asdict(t) for t in self.trials]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "SearchResult":
        trials = tuple(ProbeTrial(**_known(ProbeTrial, t)) for t in data.get("trials", ()))
        return cls(**{**_known(cls, data), "trials": trials})

    REPORT_KEYS = (
        "t_mix_tokens",
        "tau_tokens",
        "verdict",
        "search_flops",
        "trials",
        "expand",
        "verdict_expand",
        "cap_tokens",
        "expand_at_tokens",
        "registry",
    )

    def report_section(self) -> dict:
        data = self.to_json()
        return {k: data[k] for k in self.REPORT_KEYS}


@dataclass(frozen=True)
class LrSearchResult:
    best_lr: float
    trials: list  # [{"lr", "train_loss", "flops"}]
    flops: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PipelineState:
    """Everything a pipeline run has finished, so that the same command resumes where it stopped."""

    config: dict | None = None  # the run's config as first started (a resumption must match it)
    mlflow_parent_run_id: str | None = None
    lr_search: LrSearchResult | None = None
    tau_search: SearchResult | None = None
    search_plan: dict | None = None  # the τ search's plan once its probes started (a restore keeps it)
    phases: dict = field(default_factory=dict)  # name -> PhaseResult, in the order they finished
    live_runs: dict = field(default_factory=dict)  # name -> the MLflow run a phase streams to from its start
    mlflow_progressive_run_id: str | None = None
    done: bool = False

    def to_json(self) -> dict:
        out = {
            "config": self.config,
            "mlflow_parent_run_id": self.mlflow_parent_run_id,
            "lr_search": self.lr_search.to_json() if self.lr_search else None,
            "tau_search": self.tau_search.to_json() if self.tau_search else None,
            "search_plan": self.search_plan,
            "phases": {k: p.to_json() for k, p in self.phases.items()},
            "live_runs": self.live_runs,
            "mlflow_progressive_run_id": self.mlflow_progressive_run_id,
            "done": self.done,
        }
        return {k: v for k, v in out.items() if v not in (None, {}, False)}  # what has not happened is absent

    @classmethod
    def from_json(cls, data: dict | None) -> "PipelineState":
        data = data or {}
        return cls(
            config=data.get("config"),
            mlflow_parent_run_id=data.get("mlflow_parent_run_id"),
            lr_search=LrSearchResult(**data["lr_search"]) if data.get("lr_search") else None,
            tau_search=SearchResult.from_json(data["tau_search"]) if data.get("tau_search") else None,
            search_plan=data.get("search_plan"),
            phases={k: PhaseResult.from_json(p) for k, p in data.get("phases", {}).items()},
            live_runs=dict(data.get("live_runs") or {}),
            mlflow_progressive_run_id=data.get("mlflow_progressive_run_id"),
            done=bool(data.get("done")),
        )
