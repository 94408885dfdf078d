"""The pipeline as stages: data -> τ search -> the main run's phases -> baseline -> tracking -> report.

``run_stages`` is the whole job, in order. Every stage reads one ``PipelineRun`` (config, console,
storage, tracker and the state file), skips what an earlier attempt finished, and records what it
finished before the next stage starts: re-running the same command resumes at the first unfinished
stage, and an interrupted phase resumes from its last committed checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from ..console import Console
from ..core.errors import require
from ..engine.config import RunConfig, to_dict
from ..integrations.storage import RayStorage, join, read_json, write_bytes, write_json
from ..integrations.tracking import ARM_TAG, PIPELINE_TAG, Tracker
from ..report import MlflowRefs, Report, build_report, own_events, report_files
from .cluster import CapacityError, CapacityWatch, standby_fits, wait_for_capacity
from .config import PipelineConfig, WorkerRange
from .phases import PhaseOutcome, run_phase
from .preflight import phase_parallel
from .records import PhaseResult, PipelineState, SearchResult, TrackedRun
from .search_plan import SearchPlan, choose_prior, plan_search
from .standby import Handoff, StandbyFit
from .tmix_registry import Hit, Registry, fingerprint, key_of, registry_uri

STATE = "pipeline_state.json"
# Sections that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("ray", "mlflow")
PHASE_TITLES = {
    "phase1": "phase 1: the source model until τ",
    "phase2": "phase 2: expanded to the target depth",
    "fixed": "main run: the target model (fixed size)",
    "baseline": "baseline: the fixed-size target model",
}


class StateFile:
    """The pipeline's one state object and the JSON file that keeps it (written after every change)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.state = PipelineState.from_json(read_json(uri))
        self._lock = threading.RLock()  # a standby phase 2 records from its own thread

    def update(self, **changes) -> PipelineState:
        with self._lock:
            self.state = replace(self.state, **changes)
            write_json(self.uri, self.state.to_json())
            return self.state

    def add_phase(self, phase: PhaseResult) -> None:
        with self._lock:
            self.update(phases={**self.state.phases, phase.name: phase})

    def set_live_run(self, name: str, run_id: str) -> None:
        with self._lock:
            self.update(live_runs={**self.state.live_runs, name: run_id})


def check_same_run(cfg: PipelineConfig, state: PipelineState) -> None:
    """A run directory resumes only the config that started it (``ray`` and ``mlflow`` may change)."""
    saved = state.config
    if not saved:
        return
    now = to_dict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k))
    require(
        not diff,
        f"run {cfg.name!r} in {cfg.out} exists with a different config ({', '.join(diff)} "
        "changed); use another name (--set name=...) or the original config",
    )


@dataclass
class PipelineRun:
    """What every stage reads."""

    cfg: PipelineConfig
    console: Console
    state: StateFile
    storage: RayStorage  # Ray's results and checkpoints: <out>/<name>/ray
    tracker: Tracker
    board: Any = None  # live progress from the workers (orchestration.progress)

    @property
    def root(self) -> str:
        return run_root(self.cfg)

    @property
    def parent(self) -> str | None:
        return self.state.state.mlflow_parent_run_id

    @property
    def pipeline_tag(self) -> str:
        """What the comparison views group by besides the arm: this pipeline run, not every run of its
        name."""
        return f"{self.cfg.name} {self.parent[:8]}" if self.parent else self.cfg.name


def run_root(cfg: PipelineConfig) -> str:
    return join(cfg.out, cfg.name)


def read_state(cfg: PipelineConfig) -> StateFile:
    return StateFile(join(run_root(cfg), STATE))


def open_run(cfg: PipelineConfig, console: Console, tracking_uri: str) -> PipelineRun:
    """The run's state (new, or what an earlier attempt finished), its MLflow parent run and progress
    board."""
    from .progress import make_board

    state = read_state(cfg)
    check_same_run(cfg, state.state)
    if state.state.config is None:
        state.update(config=to_dict(cfg))
    tracker = Tracker(tracking_uri, cfg.mlflow.experiment, log=console.info)
    if not state.state.mlflow_parent_run_id:
        state.update(
            mlflow_parent_run_id=tracker.start_run(
                cfg.name, tags={"progrow.kind": "pipeline"}, params=to_dict(cfg)
            )
        )
    return PipelineRun(cfg, console, state, RayStorage(join(run_root(cfg), "ray")), tracker, make_board())


def run_stages(run: PipelineRun) -> Report:
    """The job, stage by stage (the data stage ran before anything of the run was written)."""
    search = search_stage(run)
    phases = main_run_stage(run, search)
    baseline = baseline_stage(run)
    tracking_stage(run)
    report = report_stage(run, search, phases, baseline)
    record_outcome(run, search, report)
    run.state.update(done=True)
    run.tracker.end(run.parent)
    return report


# ---- data -----------------------------------------------------------------------------------------
def data_stage(cfg: PipelineConfig, log) -> None:
    """The token shards the run reads, prepared once (a no-op when they are up to date)."""
    from ..data.prepare import prepare_run_data

    prepare_run_data(cfg.data, log=log)


# ---- search ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSetup:
    """What the τ search will do, decided before anything trains."""

    fingerprint: dict
    registry: Registry
    hit: Hit | None  # a measured t_mix to reuse instead of searching
    plan: SearchPlan | None  # else the probes to run

    def lines(self) -> list[str]:
        if self.hit is not None:
            return [f"t_mix {self.hit.t_mix_tokens:,} from the {self.hit.describe()}: no search"]
        return self.plan.lines()


def plan_tau_search(cfg: PipelineConfig) -> SearchSetup:
    """Reuse a registry value (``tune.reuse``), or plan the probes; refuses (exit 2) a search that does
    not fit ``tune.search_fraction``, and ``tune.reuse=only`` without a value."""
    registry = Registry(registry_uri(cfg))
    fp = fingerprint(cfg)
    target = cfg.target_model_config()
    found = registry.lookup(fp, getattr(target, type(target).width_field))
    if found is not None and cfg.tune.reuse != "never":
        return SearchSetup(fp, registry, found, None)
    require(
        cfg.tune.reuse != "only",
        f"tune.reuse=only: the mixing-time registry {registry.uri} has no t_mix for this run's fingerprint "
        f"{key_of(fp)} (`python -m progrow_ray.tmix list --registry {registry.uri}`); run the search "
        "(tune.reuse=auto) or seed it (`python -m progrow_ray.tmix add`)",
    )
    plan = plan_search(cfg, choose_prior(cfg, found.prior() if found else None))
    require(plan.fits, plan.refusal())
    return SearchSetup(fp, registry, None, plan)


def search_stage(run: PipelineRun) -> SearchResult:
    """The τ search's plan (or a registry value to reuse), the learning-rate search (optional), then τ: from
    the registry, from the probes, or as configured; then the no-saving policy."""
    from .tune_tau import search_lr

    cfg, state = run.cfg, run.state
    if state.state.tau_search is not None:
        return state.state.tau_search
    setup = None
    if cfg.tune.enabled:  # refusals first, before anything trains; a search in progress keeps its plan
        saved = state.state.search_plan
        setup = (
            SearchSetup(fingerprint(cfg), Registry(registry_uri(cfg)), None, SearchPlan.from_json(saved))
            if saved
            else plan_tau_search(cfg)
        )
    if cfg.tune.lr_search.enabled and state.state.lr_search is None:
        cap = setup.plan.cap if setup and setup.plan else plan_search(cfg, choose_prior(cfg)).cap
        lr = search_lr(
            cfg,
            cfg.tune.lr_search.tokens or cap,
            storage=run.storage,
            run_name=f"{cfg.name}-lr-search",
            log=run.console.info,
        )
        state.update(lr_search=lr)
        run.console.info(f"lr search: best lr {lr.best_lr:.4g}")
    if state.state.lr_search is not None:
        cfg = replace(cfg, optimizer=replace(cfg.optimizer, lr=state.state.lr_search.best_lr))
    if setup is not None:
        if setup.hit is not None:
            result = reuse_t_mix(cfg, setup.hit)
        else:
            run.console.stage("τ search (Ray Tune): probes measure the mixing time")
            for line in setup.plan.lines():
                run.console.note(line)
            state.update(search_plan=setup.plan.to_json())
            result = record_measurement(run, cfg, setup, measure_tau(run, cfg, setup.plan))
        track_search(run, setup, result)
    else:
        tau = cfg.tau_tokens
        verdict = (
            f"tau set by the config: {tau:,} tokens (no search)"
            if tau
            else "growth.enabled=false: the target model trains at full depth from the start (no search)"
        )
        result = SearchResult(
            t_mix_tokens=None, tau_tokens=tau, expand=tau is not None and tau > 0, verdict=verdict
        )
    if state.state.lr_search is not None:
        result = replace(result, lr_search_flops=state.state.lr_search.flops)
    run.console.info(f"verdict: {result.verdict}")
    result = apply_no_saving_policy(cfg, result, run.console.info)
    state.update(tau_search=result, search_plan=None)
    return result


def reuse_t_mix(cfg: PipelineConfig, hit: Hit) -> SearchResult:
    """τ from a registry measurement: no probes run."""
    from ..core.mixing import MixResult
    from .tune_tau import tau_from_mixing

    m = hit.measurement
    mix = MixResult(True, hit.t_mix_tokens, None, m.get("gap_after_mix_rel"), float("nan"))
    result = tau_from_mixing(cfg, mix, registry=hit.to_json())
    return replace(result, verdict=f"t_mix {hit.t_mix_tokens:,} from the {hit.describe()}; {result.verdict}")


def record_measurement(run: PipelineRun, cfg: PipelineConfig, setup: SearchSetup, result) -> SearchResult:
    """The measured t_mix (or "did not mix within the cap") into the registry, with its fingerprint."""
    plan, mix = setup.plan, result.mix or {}
    key, mid = setup.registry.record(
        setup.fingerprint,
        t_mix_tokens=result.t_mix_tokens,
        gap_after_mix_rel=mix.get("gap_after_mix_rel"),
        last_gap_rel=mix.get("last_gap_rel"),
        cap_tokens=plan.cap,
        expand_at_tokens=plan.expand_at,
        probe_width=plan.width,
        target_width=plan.target_width,
        width_field=plan.width_field,
        search_flops=result.search_flops,
        lr_used=cfg.optimizer.lr,
        source="measured",
        run=cfg.name,
        out=cfg.out,
        mlflow_parent_run_id=run.parent,
    )
    run.console.info(f"t_mix recorded in the registry: {setup.registry.uri} {key}/{mid}")
    registry = {
        "key": key,
        "measurement": mid,
        "t_mix_tokens": result.t_mix_tokens,
        "reused": False,
        "transferred": plan.width != plan.target_width,
        "source": f"measured by this run's search at {plan.width_field}={plan.width}",
    }
    return replace(result, registry=registry, search_plan=plan.to_json())


def track_search(run: PipelineRun, setup: SearchSetup, result: SearchResult) -> None:
    """The search as one MLflow child run: the fingerprint and where t_mix came from as tags, the numbers as
    metrics (the probes have their own runs)."""
    reg = result.registry or {}
    rid = run.tracker.start_run(
        "tau-search",
        parent_id=run.parent,
        tags={
            "progrow.phase": "tau-search-summary",
            PIPELINE_TAG: run.pipeline_tag,
            "progrow.tmix.key": reg.get("key", key_of(setup.fingerprint)),
            "progrow.tmix.fingerprint": json.dumps(setup.fingerprint, sort_keys=True),
            "progrow.tmix.reused": str(bool(reg.get("reused"))).lower(),
            "progrow.tmix.transferred": str(bool(reg.get("transferred"))).lower(),
            "progrow.tmix.source": reg.get("source", ""),
        },
    )
    plan = setup.plan
    run.tracker.log_metrics(
        rid,
        {
            "t_mix_tokens": result.t_mix_tokens,
            "tau_tokens": result.tau_tokens,
            "search_flops": result.search_flops,
            "probe_width": plan.width if plan else None,
            "cap_tokens": plan.cap if plan else None,
            "prior_t_mix_tokens": plan.prior.tokens if plan else None,
        },
    )
    run.tracker.end(rid)


def record_outcome(run: PipelineRun, search: SearchResult, report: Report) -> None:
    """After a main run with a baseline: the predicted and the measured final loss gap, back into the
    registry entry whose t_mix chose τ."""
    reg, savings = search.registry, report.savings
    if not reg or savings is None or savings.loss_gap_rel is None or not search.expand:
        return
    outcome = {
        "run": run.cfg.name,
        "tau_tokens": search.tau_tokens,
        "predicted_gap_rel": (search.plan or {}).get("predicted_gap_rel"),
        "measured_gap_rel": savings.loss_gap_rel,
        "flops_fraction": savings.flops_fraction,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if Registry(registry_uri(run.cfg)).record_outcome(reg["key"], reg["measurement"], outcome):
        run.console.info(
            f"registry {reg['key']}/{reg['measurement']}: predicted gap "
            f"{outcome['predicted_gap_rel'] or 0:+.2%}, measured {outcome['measured_gap_rel']:+.2%}"
        )


def measure_tau(run: PipelineRun, cfg: PipelineConfig, plan: SearchPlan) -> SearchResult:
    """The probes on Ray Tune, with a live line on the console and one MLflow child run per probe that
    receives its loss curve while it runs (at most once a second)."""
    from .tune_tau import search_tau

    live: dict = {}
    probes = ProbeRuns(run)

    def on_start(roles: list[str], cap: int, points) -> None:
        live["tokens"] = {r: int(points.points[r][-1][0]) if points.points.get(r) else 0 for r in roles}
        live["line"] = run.console.progress("search", cap * len(roles))
        live["note"] = f"{len(roles)} probes"
        probes.start(roles, points)

    def on_result(role: str, r: dict) -> None:
        live["tokens"][role] = max(live["tokens"][role], r.get("tokens", 0))
        loss = r.get("train_loss") if role == "fixed" else None
        live["line"].update(sum(live["tokens"].values()), loss=loss, note=live["note"])
        probes.add(role, r)

    try:
        result = search_tau(
            cfg,
            plan,
            storage=run.storage,
            run_name=f"{cfg.name}-tau-search",
            log=run.console.note,
            on_start=on_start,
            on_result=on_result,
        )
    finally:
        if "line" in live:
            live["line"].close()
    probes.finish(result.trials)
    return result


class ProbeRuns:
    """The τ search's MLflow child runs, one per probe, created when the probes start (kept in the state
    file, so a continued search feeds the same runs) and fed their curves at the probes' training steps as
    Tune's results arrive (buffered, flushed at most once a second); ``finish`` logs what was not streamed
    and ends them. A point at or below a run's last logged step is not logged again."""

    def __init__(self, run: PipelineRun, flush_s: float = 1.0):
        self.run, self.flush_s = run, flush_s
        self.ids: dict[str, str | None] = {}
        self.sent: dict[str, int] = {}  # the last step streamed per probe
        self.buffer: dict[str, list] = {}
        self.last_flush = 0.0

    def _start_run(self, role: str) -> str | None:
        return self.run.tracker.start_run(
            f"search-{role}",
            parent_id=self.run.parent,
            tags={
                "progrow.phase": "tau-search",
                "progrow.role": role,
                ARM_TAG: f"search-{role}",
                PIPELINE_TAG: self.run.pipeline_tag,
            },
        )

    def start(self, roles: list[str], points=None) -> None:
        """Each probe's run: the one an earlier attempt of this search started, or a new one; what a
        continued search already has and its run has not is queued."""
        for role in roles:
            name = f"search-{role}"
            rid = self.run.state.state.live_runs.get(name)
            self.sent[role] = self.run.tracker.last_step(rid, "train_loss") if rid else -1
            if not rid:
                rid = self._start_run(role)
                if rid:
                    self.run.state.set_live_run(name, rid)
            self.ids[role], self.buffer[role] = rid, []
            for tokens, loss, flops, step in points.points.get(role, []) if points is not None else []:
                self.add(
                    role, {"tokens": tokens, "train_loss": loss, "flops": flops, "step": step}, flush=False
                )

    def add(self, role: str, result: dict, flush: bool = True) -> None:
        if role not in self.ids or result["step"] <= self.sent[role]:
            return
        point = {k: result.get(k) for k in ("tokens", "train_loss", "flops")}
        self.buffer[role].append({"event": "train", "step": int(result["step"]), **point})
        if flush and time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        for role, points in self.buffer.items():
            if points and self.ids.get(role):
                self.run.tracker.log_history(self.ids[role], points)
                self.sent[role] = points[-1]["step"]
            self.buffer[role] = []

    def finish(self, trials) -> None:
        """Each probe's curve as the search kept it (``ProbeTrial.events``): the points not streamed yet."""
        self.flush()
        for trial in trials:
            rid = self.ids.get(trial.role) or self._start_run(trial.role)
            done = self.sent.get(trial.role, -1)
            self.run.tracker.log_history(rid, [e for e in trial.events() if e["step"] > done])
            self.run.tracker.end(rid)


def apply_no_saving_policy(cfg: PipelineConfig, result: SearchResult, log) -> SearchResult:
    """``tune.on_no_saving=expand``: expand at the configured τ although the verdict says fixed-size."""
    if result.expand or cfg.tune.on_no_saving != "expand":
        return result
    from .tune_tau import align_tau

    tau = align_tau(cfg.tau_tokens, cfg.train.batch_tokens, cfg.phase2_batch_tokens, cfg.train.total_tokens)
    note = (
        f"tune.on_no_saving=expand: expanding anyway at the configured tau = {tau:,} tokens "
        f"({tau / cfg.train.total_tokens:.0%} of the horizon)"
    )
    log(note)
    return replace(
        result, expand=True, tau_tokens=tau, verdict_expand=False, verdict=f"{result.verdict} -- {note}"
    )


# ---- the main run ---------------------------------------------------------------------------------
def searched_run_config(run: PipelineRun) -> RunConfig:
    """The config's engine sections with the searched learning rate, if there was a search."""
    base = run.cfg.run_config()
    lr = run.state.state.lr_search
    return replace(base, optimizer=replace(base.optimizer, lr=lr.best_lr)) if lr else base


def main_run_config(run: PipelineRun, search: SearchResult) -> RunConfig:
    """The engine config of the progressive phases: τ from the search."""
    base = searched_run_config(run)
    return replace(base, growth=replace(base.growth, tau_tokens=search.tau_tokens, tau_frac=None))


def fixed_size_config(run: PipelineRun) -> RunConfig:
    """The target model from the start (the fixed-size main run, the baseline): growth off, the config's
    own growth section otherwise, as its MLflow params show."""
    base = searched_run_config(run)
    return replace(base, growth=replace(base.growth, enabled=False))


def main_run_stage(run: PipelineRun, search: SearchResult) -> list[PhaseResult]:
    """Phase 1 then phase 2 when the search says expand; else the target model, fixed-size, throughout."""
    if not search.expand:
        return [train_phase(run, "fixed", fixed_size_config(run), workers=run.cfg.fixed_size_workers())]
    run_cfg = main_run_config(run, search)
    done = run.state.state.phases
    if run.cfg.ray.standby and "phase1" not in done and "phase2" not in done:
        if standby_fits(run.cfg):
            return progressive_with_standby(run, run_cfg, search.tau_tokens)
        run.console.info(
            f"standby off: the cluster cannot hold phase 1's {run.cfg.ray.small.max} and phase 2's "
            f"{run.cfg.ray.large.max} worker(s) at once; phase 2's workers are pre-warmed instead"
        )
    # phase 1 is closed in MLflow once phase 2 runs: nothing but Ray stands between τ and phase 2
    p1 = train_phase(
        run,
        "phase1",
        run_cfg,
        workers=run.cfg.ray.small,
        until=search.tau_tokens,
        prewarm=True,
        track=False,
    )
    p2 = train_phase(run, "phase2", run_cfg, workers=run.cfg.ray.large, start_from=p1.checkpoint_uri)
    return [p1, p2]


def progressive_with_standby(run: PipelineRun, run_cfg: RunConfig, tau: int) -> list[PhaseResult]:
    """Phase 2's fit starts alongside phase 1 and waits for its checkpoint (``standby.py``)."""
    cfg = run.cfg
    handoff = Handoff(run.storage.child(f"{cfg.name}-phase2-handoff.json"))
    standby = StandbyFit(
        lambda: train_phase(
            run, "phase2", run_cfg, workers=cfg.ray.large, handoff=handoff.uri, announce=False
        )
    )
    try:
        p1 = train_phase(
            run,
            "phase1",
            run_cfg,
            workers=cfg.ray.small,
            until=tau,
            track=False,
            note=f"phase 2 waits on {cfg.ray.large} standby worker(s)",
        )
    except BaseException as e:
        handoff.abort(f"phase 1 failed: {type(e).__name__}")
        standby.release(timeout_s=60)  # phase 1's own error is the one to report
        raise
    handoff.give(p1.checkpoint_uri)
    announce_phase(run, "phase2", run_cfg, cfg.ray.large)
    return [p1, standby.result()]


def baseline_stage(run: PipelineRun) -> PhaseResult | None:
    """The fixed-size target model on the same tokens, on the large worker group: what the saving is
    measured against."""
    if not run.cfg.baseline.enabled:
        return None
    return train_phase(
        run,
        "baseline",
        fixed_size_config(run),
        workers=run.cfg.fixed_size_workers(),
        tags={"progrow.phase": "baseline"},
    )


# ---- one phase ------------------------------------------------------------------------------------
def announce_phase(
    run: PipelineRun, name: str, run_cfg: RunConfig, workers: WorkerRange, note: str = ""
) -> None:
    """The stage header of a phase: what trains where, on which batch, up to where."""
    batch = (run_cfg.growth.batch_tokens_after if name == "phase2" else None) or run_cfg.train.batch_tokens
    run.console.stage(
        f"{PHASE_TITLES.get(name, name)} -- {workers} worker(s), global batch {batch:,} tokens"
        + (f"; {note}" if note else "")
    )


def train_phase(
    run: PipelineRun,
    name: str,
    run_cfg: RunConfig,
    *,
    workers: WorkerRange,
    until: int | None = None,
    start_from: str | None = None,
    handoff: str | None = None,
    prewarm: bool = False,
    tags: dict | None = None,
    track: bool = True,
    announce: bool = True,
    note: str = "",
) -> PhaseResult:
    """One Ray Train fit (skipped when an earlier attempt finished it), recorded in the state file. Its
    MLflow run exists from the start and receives the metrics while the fit runs; ``track``: close it
    (with the params, tags and anything not streamed) when the fit ends, else in the tracking stage."""
    from .prewarm import PhaseTwoPrewarm
    from .progress import watch

    done = run.state.state.phases
    if name in done:
        run.console.info(f"{name}: done earlier, skipped")
        return done[name]
    cfg = run.cfg
    run_cfg = phase_parallel(cfg, run_cfg, name, workers)  # every rank of the phase runs the same mode
    if announce:
        announce_phase(run, name, run_cfg, workers, note)
    phase1 = done.get("phase1") if name == "phase2" else None
    # standby: phase 1 has not finished yet, phase 2 starts at τ
    first = phase1.tokens_end if phase1 else (run_cfg.growth.tau_tokens or 0) if name == "phase2" else 0
    wait_for_capacity(cfg, name, workers, log=run.console.info)
    live_run = live_mlflow_run(run, name, run_cfg)
    warm: list = []  # the phase-2 pre-warm, asked for at phase 1's first step

    def on_first_step() -> None:
        if prewarm and cfg.ray.prewarm and not warm:
            warm.append(PhaseTwoPrewarm(cfg))

    capacity = CapacityWatch(cfg, name, workers, run.board, log=run.console.info)
    try:
        with (
            watch(
                run.board,
                name,
                run.console,
                start_tokens=first,
                end_tokens=until or cfg.train.total_tokens,
                tracker=run.tracker,
                run_id=live_run,
                on_first_step=on_first_step,
            ) as live,
            capacity,
        ):
            outcome = run_phase(
                name,
                run_cfg,
                workers=workers,
                storage=run.storage,
                ray_cfg=cfg.ray,
                run_name=f"{cfg.name}-{name}",
                until_tokens=until,
                start_from=start_from,
                handoff=handoff,
                board=run.board,
            )
    except BaseException as e:
        if capacity.fired:  # the watch stopped a fit that could not go on: one line, exit 2, state kept
            raise CapacityError(capacity.fired) from e
        raise
    finally:
        for w in warm:
            w.release()
    phase1 = run.state.state.phases.get("phase1") if name == "phase2" else None
    result = phase_result(
        outcome,
        phase1,
        TrackedRun(
            to_dict(run_cfg),
            {
                "progrow.phase": name,
                "progrow.depth": outcome.result.depth,
                **arm_tags(run, name),
                "progrow.workers": outcome.workers,
                "progrow.worker_range": str(workers),
                **(tags or {}),
            },
            run_id=live_run,
            live_steps=dict(live.streamed),
        ),
        live.elastic.events,
    )
    run.state.add_phase(result)
    if track:
        track_phase(run, name)
    r = outcome.result
    val = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
    run.console.detail(
        f"{name}: {r.tokens:,} tokens, depth {r.depth}, train loss {r.train_loss:.4f}, "
        f"val loss {val} ({outcome.fit_s:.0f} s)"
    )
    return result


def arm_tags(run: PipelineRun, name: str) -> dict:
    """The arm a saved view groups by: phase 1 and 2 form the "progressive" run (``track_progressive``);
    the rest stays out of the views."""
    arm = {"fixed": "fixed-size", "baseline": "baseline"}.get(name)
    return {ARM_TAG: arm, PIPELINE_TAG: run.pipeline_tag} if arm else {}


def live_mlflow_run(run: PipelineRun, name: str, run_cfg: RunConfig) -> str | None:
    """The phase's MLflow child run, created when the phase starts (and reused when it resumes), so its
    metrics are visible while it trains."""
    rid = run.state.state.live_runs.get(name)
    if rid is None:
        rid = run.tracker.start_run(
            name,
            parent_id=run.parent,
            params=to_dict(run_cfg),
            tags={"progrow.phase": name, **arm_tags(run, name)},
        )
        run.state.set_live_run(name, rid or "disabled")
    return None if rid in (None, "disabled") else rid


def phase_result(
    outcome: PhaseOutcome, phase1: PhaseResult | None, mlflow: TrackedRun, elastic_events: list
) -> PhaseResult:
    """A fit's outcome as the pipeline keeps it; phase 2 counts only its own tokens, FLOPs and events
    (it resumes phase 1's checkpoint, whose history it carries)."""
    r = outcome.result
    tokens0, flops0 = (phase1.tokens_end, phase1.flops_end) if phase1 else (0, 0.0)
    switch_s, breakdown = switch_timing(outcome, phase1) if phase1 else (None, None)
    return PhaseResult(
        name=outcome.name,
        depth=r.depth,
        workers=outcome.workers,
        global_batch_tokens=outcome.batch_tokens,
        tokens=r.tokens - tokens0,
        tokens_end=r.tokens,
        flops=r.flops - flops0,
        flops_end=r.flops,
        final_train_loss=r.train_loss,
        final_val_loss=r.val_loss,
        checkpoint_uri=outcome.checkpoint_uri,
        fit_s=outcome.fit_s,
        end_time=outcome.end_time,
        history=own_events(outcome.history, phase1.history if phase1 else []),
        mlflow=mlflow,
        phase_switch_s=switch_s,
        phase_switch_breakdown=breakdown,
        elastic_events=elastic_events,
    )


def switch_timing(outcome: PhaseOutcome, phase1: PhaseResult) -> tuple[float | None, dict | None]:
    """Seconds from phase 1's end to the expansion in phase 2, and where they went."""
    expand = [e for e in outcome.history if e.get("event") == "expand"]
    if not expand:
        return None, None
    expanded = expand[-1]["time"]
    # of the restore: opening the data (downloading and verifying shards that were not staged)
    data = {"data_s": outcome.data_open_s} if outcome.data_open_s is not None else {}
    if outcome.handoff_time:  # standby: phase 1's fit ends + handoff, then restore + expand
        return expanded - phase1.end_time, {
            "handoff_s": outcome.handoff_time - phase1.end_time,
            "restore_and_expand_s": expanded - outcome.handoff_time,
            **data,
        }
    # the driver between fits, worker start-up, restore + expand
    return expanded - phase1.end_time, {
        "between_fits_s": outcome.fit_start_time - phase1.end_time,
        "workers_start_s": outcome.loop_start_time - outcome.fit_start_time,
        "restore_and_expand_s": expanded - outcome.loop_start_time,
        **data,
    }


# ---- tracking -------------------------------------------------------------------------------------
def tracking_stage(run: PipelineRun) -> None:
    """Every phase as an MLflow child run (once), and the progressive arm with both phases' curves."""
    for name in run.state.state.phases:
        track_phase(run, name)
    track_progressive(run)


def track_phase(run: PipelineRun, name: str) -> None:
    """Close the phase's MLflow child run, once: its tags, what was not streamed live (the whole history
    when it did not stream), the elastic events; the run id is kept in the state file."""
    phase = run.state.state.phases[name]
    tracked = phase.mlflow
    if tracked.closed:
        return
    rid = tracked.run_id
    if rid in (None, "disabled"):
        rid = run.tracker.start_run(name, parent_id=run.parent, params=tracked.params, tags=tracked.tags)
        history = phase.history
    else:
        run.tracker.set_tags(rid, tracked.tags)
        done = tracked.live_steps
        history = [e for e in phase.history if e["step"] > done.get(e.get("event"), -1)]
    run.tracker.log_history(rid, history)
    if phase.elastic_events:
        run.tracker.log_files(
            rid, {"elastic_events.json": json.dumps(phase.elastic_events, indent=1).encode()}
        )
    run.tracker.log_metrics(rid, elastic_summary(phase.elastic_events))
    run.tracker.end(rid)
    run.state.add_phase(replace(phase, mlflow=replace(tracked, run_id=rid or "disabled", closed=True)))


def elastic_summary(events: list) -> dict:
    """What the elastic events cost a phase, as MLflow metrics."""
    return {
        "elastic_restarts": len(events),
        "tokens_recomputed": sum(e["tokens_recomputed"] for e in events),
        "restart_wall_lost_s": sum(e["wall_lost_s"] or 0.0 for e in events),
    }


def track_progressive(run: PipelineRun) -> None:
    """One child run "progressive" with both phases' curves: the progressive arm of the comparison
    views (phase1 and phase2 keep their own runs, with their params and workers)."""
    phases = run.state.state.phases
    if "phase2" not in phases or run.state.state.mlflow_progressive_run_id:
        return
    p1, p2 = phases["phase1"], phases["phase2"]
    rid = run.tracker.start_run(
        "progressive",
        parent_id=run.parent,
        params=p2.mlflow.params,
        tags={
            "progrow.phase": "phase1+phase2",
            ARM_TAG: "progressive",
            PIPELINE_TAG: run.pipeline_tag,
            "progrow.depth": f"{p1.depth} -> {p2.depth}",
            "progrow.workers": f"{p1.workers} -> {p2.workers}",
        },
    )
    run.tracker.log_history(rid, p1.history + own_events(p2.history, p1.history))
    run.tracker.end(rid)
    run.state.update(mlflow_progressive_run_id=rid or "disabled")


# ---- report ---------------------------------------------------------------------------------------
def report_stage(
    run: PipelineRun, search: SearchResult, phases: list[PhaseResult], baseline: PhaseResult | None
) -> Report:
    """report.json / .md, config.yaml and the plots, in the run directory and on the MLflow parent run."""
    refs = MlflowRefs(run.tracker.tracking_uri, run.tracker.experiment_id, run.parent)
    report = build_report(run.cfg, search, phases, baseline, run.state.state.lr_search, refs)
    files = report_files(report, run.cfg, phases, baseline)
    for x in ("tokens", "flops"):
        run.tracker.log_image(run.parent, files[f"loss_vs_{x}.png"], key=f"loss_vs_{x}")
    for name, data in files.items():
        write_bytes(join(run.root, name), data)
    run.tracker.log_files(run.parent, files)
    s = report.savings
    run.tracker.log_metrics(
        run.parent,
        {
            "final_val_loss": report.progressive.final_val_loss,
            "flops": report.progressive.flops,
            "baseline_final_val_loss": report.baseline.final_val_loss if report.baseline else None,
            "flops_fraction": s.flops_fraction if s else None,
            "flops_fraction_paper": s.flops_fraction_paper if s else None,
            "loss_gap_rel": s.loss_gap_rel if s else None,
            "tau_tokens": search.tau_tokens,
            "search_flops": search.search_flops,
        },
    )
    return report
