"""τ search with Ray Tune (the recipe's step 4, automatic, at scale).

Concurrent trials with the main run's hyper-parameters and schedule, sized by the search plan
(``search_plan.py``): the fixed-size target model, the progressive model from 0 layers (optionally also
1) expanded right after warmup, and the source model never expanded (so that mixing only counts once
depth measurably helps). Each reports its loss every ``report_every`` steps; a ``Stopper`` on the driver
feeds a ``MixingWatch`` (amortised O(1) per point) and stops every trial once the curves have mixed (or
at the cap). Then τ = end of stable − t_mix.

Probes checkpoint on a cadence and run under a ``FailureConfig``: a lost probe resumes from its last
checkpoint, and a driver killed mid-search is continued by the same command (``Tuner.restore``).

Optionally Optuna (``OptunaSearch``) first tunes the learning rate on the cheap source model; with
Muon / muP the optimum transfers to the deep model (paper §3.2), so the main run uses it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Any

from ..core.mixing import MixingWatch, MixResult, TauPlan, plan_tau, watch_curves
from ..engine.config import RunConfig
from ..engine.faults import faults_from_env, maybe_inject_fault
from ..integrations.storage import RayStorage
from .records import LrSearchResult, ProbeTrial, SearchResult
from .search_plan import SearchPlan


@dataclass(frozen=True)
class Probe:
    """One trial of the τ search: a role and the engine config it trains for ``cap`` tokens."""

    role: str
    run: RunConfig
    cap: int
    threads: int = 1
    fault: Any = None  # the fault matrix's fault points (engine/faults.py); None outside tests


POINT_KEYS = ("tokens", "step", "flops", "train_loss", "val_loss")


def probe_trainable(config: dict) -> None:
    """One Tune trial: the engine for ``probe.cap`` tokens, reporting its metric events and a checkpoint
    every ``train.checkpoint_every_tokens``; resumed from Tune's checkpoint after a failure or a restore."""
    import torch
    from ray import tune

    from ..engine.checkpoint import read_checkpoint, write_checkpoint
    from ..engine.trainer import Trainer

    probe: Probe = config["trial"]
    torch.set_num_threads(max(1, probe.threads))
    resume, first = None, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            resume = read_checkpoint(path)
        first = {"resumed_from": resume["state.json"]["progress"]["tokens"]}

    def report(event: dict) -> None:
        maybe_inject_fault(probe.fault, "tau-search", 0, event["tokens"], role=probe.role)
        if event["event"] in ("train", "eval"):
            point = {k: event[k] for k in POINT_KEYS if event.get(k) is not None}
            tune.report({**point, "kind": event["event"], **first})
            first.clear()

    def save(trainer: Trainer, files: dict) -> None:
        p = trainer.progress
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "checkpoint")
            write_checkpoint(path, files)
            tune.report(
                {"tokens": p.tokens, "step": p.step, "flops": p.flops, "kind": "checkpoint"},
                checkpoint=tune.Checkpoint.from_directory(path),
            )

    Trainer(probe.run, save_checkpoint=save, resume=resume, on_metrics=report, log=lambda _: None).run(
        until_tokens=probe.cap
    )


class ProbePoints:
    """Each probe's curve, (tokens, train loss, FLOPs) in token order, and where it restarted from: a
    restarted probe reports again what it had after its checkpoint, and the repeats are dropped."""

    def __init__(self):
        self.points: dict[str, list[tuple[float, float, float]]] = {}
        self.restarts: dict[str, list[int]] = {}

    def add(self, role: str, result: dict) -> bool:
        resumed = result.get("resumed_from")
        if resumed is not None and resumed == resumed:  # not NaN (a column other rows lack, read back)
            self.restarts.setdefault(role, []).append(int(resumed))
        loss = result.get("train_loss")
        if loss is None or result.get("kind") != "train":
            return False
        pts = self.points.get(role)
        if pts is None:
            pts = self.points[role] = []
        tokens = result["tokens"]
        if pts and tokens <= pts[-1][0]:
            return False
        pts.append((tokens, loss, result.get("flops", 0.0), int(result.get("step", len(pts) + 1))))
        return True

    def curve(self, role: str) -> tuple[list[float], list[float]]:
        pts = self.points.get(role, [])
        return [p[0] for p in pts], [p[1] for p in pts]


@dataclass(frozen=True)
class MixSettings:
    expand_at: int
    rel_tol: float
    window_tokens: float
    smoothing: float
    min_advantage: float = 0.0  # > 0: a "source" curve is probed and gates where mixing may start

    def watch(self) -> MixingWatch:
        return MixingWatch(
            self.expand_at,
            self.rel_tol,
            self.window_tokens,
            self.smoothing,
            self.min_advantage,
            with_source=self.min_advantage > 0,
        )

    def mix(self, points: ProbePoints, role: str = "progressive") -> MixResult | None:
        """t_mix of ``role`` against the fixed curve, on every point so far (None: too few points)."""
        curves = {"fixed": points.curve("fixed"), "progressive": points.curve(role)}
        if self.min_advantage > 0:
            curves["source"] = points.curve("source")
        if any(len(t) < 2 for t, _ in curves.values()):
            return None
        if curves["progressive"][0][-1] <= self.expand_at or curves["fixed"][0][-1] <= self.expand_at:
            return None
        return watch_curves(self.watch(), curves)


# Tune pickles the stopper with the Tuner (tuner.pkl). A pickled stopper stands for the live one the
# driver registers here under the search's name, so a restored search (Tuner.restore) is stopped by
# the object that holds its curves, not by an empty copy from the Tuner's first start.
_LIVE_STOPPERS: dict[str, Any] = {}


def _live_stopper(key: str):
    return _LIVE_STOPPERS.get(key) or make_stopper(key, None)


def make_stopper(key: str, settings: MixSettings | None, on_result=None):
    from ray.tune import Stopper

    class MixingStopper(Stopper):
        """Stops all trials once the progressive curve has mixed with the fixed one (amortised O(1)
        per result). Also the driver's live view of the probes (``on_result(role, result)``)."""

        def __init__(self):
            self.key, self.on_result = key, on_result
            self.points = ProbePoints()
            self.watch = settings.watch() if settings is not None else None

        def __reduce__(self):
            return _live_stopper, (self.key,)

        def add(self, role: str, result: dict) -> bool:
            if not self.points.add(role, result):
                return False
            if self.watch is not None and role in MixingWatch.ROLES:
                self.watch.add(role, result["tokens"], result["train_loss"])
            return True

        def __call__(self, trial_id, result):
            role = result["config"]["trial"].role
            if self.add(role, result) and self.on_result is not None:
                self.on_result(role, result)
            return False

        def stop_all(self):
            return self.watch is not None and self.watch.mixed

    stopper = MixingStopper()
    if settings is not None:
        _LIVE_STOPPERS[key] = stopper
    return stopper


def probe_runs(cfg, plan: SearchPlan) -> dict[str, RunConfig]:
    """The engine config of each probe: the main run's, at the plan's probe model, logging every
    ``report_every`` steps (the curves t_mix is read from), checkpointing on the plan's cadence and
    evaluating only at the very end."""
    base = cfg.run_config()
    base = replace(
        base,
        model={**base.model, **plan.probe_model},
        train=replace(
            base.train,
            checkpoint_every_tokens=plan.checkpoint_every,
            checkpoint_every_s=None,
            log_every=plan.report_every,
            eval_every_tokens=cfg.train.total_tokens,
            parallel="auto",  # a probe is one process: unwrapped, whatever the phases use
        ),
    )
    fixed = replace(base, growth=replace(base.growth, enabled=False))
    # the main run's source depth and method; the same batch as the fixed probe
    grown = replace(
        base.growth, enabled=True, tau_tokens=plan.expand_at, tau_frac=None, batch_tokens_after=None
    )
    runs = {"fixed": fixed, "progressive": replace(base, growth=grown)}
    if "progressive-1" in plan.roles:
        runs["progressive-1"] = replace(base, growth=replace(grown, source_depth=1, method="random"))
    if "source" in plan.roles:  # the source model, never expanded
        runs["source"] = fixed.with_model_depth(cfg.growth.source_depth)
    return runs


def has_experiment_state(uri: str) -> bool:
    """Whether Tune saved the search's experiment state: ``tuner.pkl`` is written as soon as a Tuner is
    built, so a driver killed before the first save leaves a search that cannot be restored (it starts
    over)."""
    from ..integrations.storage import filesystem

    fs, path = filesystem(uri)
    try:
        return bool(fs.glob(f"{path.rstrip('/')}/experiment_state-*.json"))
    except FileNotFoundError:
        return False


def search_tau(
    cfg,
    plan: SearchPlan,
    *,
    storage: RayStorage,
    run_name: str,
    log=print,
    on_start=None,
    on_result=None,
) -> SearchResult:
    """Run (or continue) the probes, return mixing, τ plan, FLOPs and per-trial curves.
    ``on_start(roles, cap, points)`` (``points``: what a continued search already has) and
    ``on_result(role, result)`` let the driver show live progress."""
    from ray import tune

    roles = probe_runs(cfg, plan)
    settings = MixSettings(
        plan.expand_at, cfg.tune.rel_tol, plan.window, cfg.tune.smoothing, cfg.tune.min_depth_advantage
    )
    stopper = make_stopper(f"{storage.uri}/{run_name}", settings, on_result)
    trainable = tune.with_resources(
        probe_trainable, {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    )
    path = f"{storage.path}/{run_name}"  # what Tune wants beside a filesystem: no s3:// scheme
    resumed = tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem) and has_experiment_state(
        storage.child(run_name)
    )
    if resumed:  # a driver killed mid-search: every probe continues from its last checkpoint
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage.filesystem,
        )
        for res in tuner.get_results():  # what the probes reported before the driver went away
            df = res.metrics_dataframe
            for row in [] if df is None else df.to_dict("records"):
                stopper.add(res.config["trial"].role, row)
        log(f"continuing the search from its probes' checkpoints ({path})")
    else:
        trials = [
            Probe(role, run, plan.cap, max(1, int(cfg.tune.cpus_per_trial)), faults_from_env())
            for role, run in roles.items()
        ]
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=len(trials)),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=storage.path,
                storage_filesystem=storage.filesystem,
                stop=stopper,
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=0,
            ),
        )
    log(
        f"{len(roles)} probes ({', '.join(roles)}) x <= {plan.cap:,} tokens at {plan.width_field}="
        f"{plan.width}, expansion at {plan.expand_at:,} tokens"
    )
    if on_start is not None:
        on_start(list(roles), plan.cap, stopper.points)
    try:
        grid = tuner.fit()
    finally:
        _LIVE_STOPPERS.pop(stopper.key, None)
    points = stopper.points
    summaries, search_flops = [], 0.0
    for res in grid:
        role = res.config["trial"].role
        pts = points.points.get(role, [])
        flops = max((p[2] for p in pts), default=0.0)
        search_flops += flops
        summaries.append(
            ProbeTrial(
                role,
                int(max((p[0] for p in pts), default=0)),
                flops,
                [
                    {"tokens": int(t), "train_loss": float(loss), "flops": float(f), "step": step}
                    for t, loss, f, step in pts
                ],
                str(res.error) if res.error else None,
                restarts=points.restarts.get(role, []),
            )
        )
    failed = [s for s in summaries if s.error]
    if failed:
        raise RuntimeError(f"tau search trial {failed[0].role} failed: {failed[0].error}")
    mix = settings.mix(points) or MixResult(False, None, None, None, float("nan"))
    one_layer = settings.mix(points, "progressive-1") if "progressive-1" in roles else None
    return tau_from_mixing(
        cfg,
        mix,
        search_flops=search_flops,
        trials=tuple(summaries),
        cap_tokens=plan.cap,
        expand_at_tokens=plan.expand_at,
        one_layer_t_mix_tokens=one_layer.t_mix_tokens if one_layer else None,
        resumed=resumed,
    )


def tau_from_mixing(cfg, mix: MixResult, *, search_flops: float = 0.0, **fields) -> SearchResult:
    """τ, the verdict and the saving from a mixing result (measured now, or from the registry)."""
    sched = cfg.schedule_fn()
    small, large = cfg.flops_per_unit()
    b = cfg.train.batch_tokens
    plan: TauPlan = plan_tau(
        mix,
        total_tokens=cfg.train.total_tokens,
        warmup_tokens=sched.warmup_tokens,
        stable_end_tokens=sched.stable_end_tokens,
        small_flops_per_token=small,
        large_flops_per_token=large,
        search_flops=search_flops,
        safety=cfg.tune.safety,
        align=lambda t: align_tau(t, b, cfg.phase2_batch_tokens, cfg.train.total_tokens),
    )
    return SearchResult(
        t_mix_tokens=mix.t_mix_tokens,
        tau_tokens=plan.tau_tokens,
        expand=plan.expand,
        verdict=plan.verdict,
        search_flops=search_flops,
        mix=mix.to_dict(),
        plan=plan.to_dict(),
        **fields,
    )


def align_tau(tau: int, batch1: int, batch2: int, total: int) -> int:
    """The step boundary at or before τ from which phase 2 (global batch ``batch2``) ends exactly at
    ``total`` when it can, and which is a whole number of phase-1 batches."""
    tau = total - math.ceil((total - tau) / batch2) * batch2
    return max(batch1, (tau // batch1) * batch1)


def search_lr(cfg, tokens: int, *, storage: RayStorage, run_name: str, log=print) -> LrSearchResult:
    """Optuna over the LR on the source model (fixed size, the cheap one) for ``tokens`` per trial
    (``tune.lr_search.tokens``, else the probes' cap); returns the best LR."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    ls = cfg.tune.lr_search
    source_depth = cfg.growth.source_depth
    base = cfg.run_config()
    base = replace(
        base,
        growth=replace(base.growth, enabled=False),
        train=replace(base.train, checkpoint_every_tokens=None),
    ).with_model_depth(source_depth)

    def trainable(config: dict) -> None:
        import torch

        from ..engine.trainer import Trainer

        torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))
        run = replace(base, optimizer=replace(base.optimizer, lr=config["lr"]))
        result = Trainer(run, save_checkpoint=lambda *_: None, log=lambda _: None).run(until_tokens=tokens)
        tune.report({"train_loss": result.train_loss, "flops": result.flops})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}),
        param_space={"lr": tune.loguniform(ls.lr_min, ls.lr_max)},
        tune_config=tune.TuneConfig(
            metric="train_loss",
            mode="min",
            num_samples=ls.num_samples,
            search_alg=OptunaSearch(seed=cfg.train.seed),
            max_concurrent_trials=2,
        ),
        run_config=tune.RunConfig(
            name=run_name, storage_path=storage.path, storage_filesystem=storage.filesystem, verbose=0
        ),
    )
    log(f"lr search: Optuna, {ls.num_samples} trials x {tokens:,} tokens on the {source_depth}-layer model")
    grid = tuner.fit()
    best = grid.get_best_result()
    trials = [
        {
            "lr": r.config["lr"],
            "train_loss": r.metrics.get("train_loss"),
            "flops": r.metrics.get("flops", 0.0),
        }
        for r in grid
        if r.metrics
    ]
    return LrSearchResult(float(best.config["lr"]), trials, float(sum(t["flops"] for t in trials)))
