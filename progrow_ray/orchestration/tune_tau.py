"""τ search with Ray Tune (the recipe's step 4, automatic).

Concurrent trials with the main run's hyper-parameters and schedule: the fixed-size target model,
the progressive model from 0 layers (optionally also 1) expanded right after warmup, and the source
model never expanded (so that mixing only counts once depth measurably helps). Each reports its loss
by tokens; a ``Stopper`` on the driver computes the mixing time as results arrive and stops every
trial once the curves have mixed (or at the token cap). Then τ = end of stable − t_mix.

Optionally Optuna (``OptunaSearch``) first tunes the learning rate on the cheap source model; with
Muon / muP the optimum transfers to the deep model (paper §3.2), so the main run uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.mixing import MixResult, TauPlan, plan_tau, t_mix
from ..engine.config import RunConfig
from ..engine.faults import faults_from_env, maybe_inject_fault
from ..integrations.storage import RayStorage
from .records import LrSearchResult, ProbeTrial, SearchResult


@dataclass(frozen=True)
class Probe:
    """One trial of the τ search: a role and the engine config it trains for ``cap`` tokens."""

    role: str
    run: RunConfig
    cap: int
    threads: int = 1
    fault: Any = None  # the fault matrix's fault points (engine/faults.py); None outside tests


def probe_trainable(config: dict) -> None:
    """One Tune trial: the engine for ``probe.cap`` tokens, reporting every metric event."""
    import torch
    from ray import tune

    from ..engine.trainer import Trainer

    probe: Probe = config["trial"]
    torch.set_num_threads(max(1, probe.threads))

    def report(event: dict) -> None:
        maybe_inject_fault(probe.fault, "tau-search", 0, event["tokens"], role=probe.role)
        if event["event"] in ("train", "eval"):
            tune.report(
                {
                    k: event.get(k)
                    for k in ("tokens", "step", "flops", "train_loss", "val_loss")
                    if event.get(k) is not None
                }
                | {"kind": event["event"]}
            )

    Trainer(probe.run, save_checkpoint=lambda *_: None, on_metrics=report, log=lambda _: None).run(
        until_tokens=probe.cap
    )


class Curves:
    """Loss-vs-tokens curves per trial role, fed by Tune results."""

    def __init__(self):
        self.points: dict[str, list[tuple[float, float, float]]] = {}

    def add(self, role: str, result: dict) -> None:
        if result.get("kind") == "train" and result.get("train_loss") is not None:
            self.points.setdefault(role, []).append(
                (result["tokens"], result["train_loss"], result.get("flops", 0.0))
            )

    def curve(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        pts = self.points.get(role, [])
        return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


@dataclass(frozen=True)
class MixSettings:
    expand_at: int
    rel_tol: float
    window_tokens: float
    smoothing: float
    min_advantage: float = 0.0  # > 0: a "source" curve is probed and gates where mixing may start

    def mix(self, curves: Curves, role: str = "progressive") -> MixResult | None:
        ft, fl = curves.curve("fixed")
        pt, pl = curves.curve(role)
        if len(ft) < 2 or len(pt) < 2 or pt[-1] <= self.expand_at or ft[-1] <= self.expand_at:
            return None
        source = {}
        if self.min_advantage > 0:
            st, sl = curves.curve("source")
            if len(st) < 2:
                return None
            source = dict(source_tokens=st, source_loss=sl, min_advantage_rel=self.min_advantage)
        return t_mix(
            ft, fl, pt, pl, self.expand_at, self.rel_tol, self.window_tokens, self.smoothing, **source
        )


def make_stopper(curves: Curves, settings: MixSettings, on_result=None):
    from ray.tune import Stopper

    class MixingStopper(Stopper):
        """Stops all trials as soon as the progressive curve has mixed with the fixed one. Also the
        driver's live view of the probes (``on_result(role, result)``). Tune pickles it with its
        experiment state, so the class closes over nothing and the callback is not pickled."""

        def __init__(self, curves: Curves, settings: MixSettings, on_result):
            self.curves, self.settings, self.on_result, self.mixed = curves, settings, on_result, False

        def __getstate__(self):
            return {**self.__dict__, "on_result": None}

        def __call__(self, trial_id, result):
            role = result["config"]["trial"].role
            self.curves.add(role, result)
            if self.on_result is not None:
                self.on_result(role, result)
            r = self.settings.mix(self.curves)
            self.mixed = self.mixed or bool(r and r.mixed)
            return False

        def stop_all(self):
            return self.mixed

    return MixingStopper(curves, settings, on_result)


def probe_flops_per_token(cfg) -> tuple[float, float]:
    """(source, target) FLOPs per token of the probes' models (``tune.probe_model`` applied)."""
    run = cfg.run_config()
    return replace(run, model={**run.model, **cfg.tune.probe_model}).flops_per_unit()


def search_cap_tokens(cfg) -> int:
    """Tokens per probe so that the probes' FLOPs stay within ``tune.search_fraction`` of the main run
    (estimated at the configured τ), rounded down to whole global batches, at least warmup + 4 batches."""
    t = cfg.tune
    small, large = cfg.flops_per_unit()
    total = cfg.train.total_tokens
    tau = cfg.tau_tokens or 0
    main = small * tau + large * (total - tau)
    warmup = cfg.schedule_fn().warmup_tokens
    probe_small, probe_large = probe_flops_per_token(cfg)
    n_small = 1 + int(t.one_layer_probe) + int(t.min_depth_advantage > 0)
    probes = probe_large + probe_small * n_small  # per token, all probes together
    cap = t.max_search_tokens or int(t.search_fraction * main / probes)
    b = cfg.train.batch_tokens
    floor = int(math.ceil(warmup / b) + 4) * b
    return max(floor, (cap // b) * b)


def probe_runs(cfg, expand_at: int) -> dict[str, RunConfig]:
    """The engine config of each probe: the main run's, at ``tune.probe_model``'s width, logging every step
    (the curves t_mix is read from) and evaluating only at the very end."""
    base = cfg.run_config()
    base = replace(
        base,
        model={**base.model, **cfg.tune.probe_model},
        train=replace(
            base.train,
            checkpoint_every_tokens=None,
            log_every=1,
            eval_every_tokens=cfg.train.total_tokens,
            parallel="auto",  # a probe is one process: unwrapped, whatever the phases use
        ),
    )
    fixed = replace(base, growth=replace(base.growth, enabled=False))
    # the main run's source depth and method; the same batch as the fixed probe
    grown = replace(base.growth, enabled=True, tau_tokens=expand_at, batch_tokens_after=None)
    runs = {"fixed": fixed, "progressive": replace(base, growth=grown)}
    if cfg.tune.one_layer_probe and cfg.growth.source_depth != 1:
        runs["progressive-1"] = replace(base, growth=replace(grown, source_depth=1, method="random"))
    if cfg.tune.min_depth_advantage > 0:  # the source model, never expanded
        runs["source"] = fixed.with_model_depth(cfg.growth.source_depth)
    return runs


def search_tau(
    cfg, *, storage: RayStorage, run_name: str, log=print, on_start=None, on_result=None
) -> SearchResult:
    """Run the probes, return mixing, τ plan, FLOPs and per-trial curves. ``on_start(roles, cap)`` and
    ``on_result(role, result)`` let the driver show live progress."""
    from ray import tune

    cap = search_cap_tokens(cfg)
    warmup = cfg.schedule_fn().warmup_tokens
    b = cfg.train.batch_tokens
    expand_at = int(math.ceil(warmup / b)) * b  # end of warmup, on a step boundary
    roles = probe_runs(cfg, expand_at)
    trials = [
        Probe(role, run, cap, max(1, int(cfg.tune.cpus_per_trial)), faults_from_env())
        for role, run in roles.items()
    ]
    settings = MixSettings(
        expand_at,
        cfg.tune.rel_tol,
        cfg.tune.window_frac * (cap - expand_at),
        cfg.tune.smoothing,
        cfg.tune.min_depth_advantage,
    )
    curves = Curves()
    trainable = tune.with_resources(
        probe_trainable, {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=len(trials)),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            stop=make_stopper(curves, settings, on_result),
            verbose=0,
        ),
    )
    log(f"{len(trials)} probes ({', '.join(roles)}) x <= {cap:,} tokens, expansion at {expand_at:,} tokens")
    if cap == int(math.ceil(warmup / b) + 4) * b and not cfg.tune.max_search_tokens:
        log("warning: tune.search_fraction leaves less than warmup + 4 steps per probe; using that minimum")
    if on_start is not None:
        on_start(list(roles), cap)
    grid = tuner.fit()
    summaries, search_flops = [], 0.0
    for res in grid:
        role = res.config["trial"].role
        df = res.metrics_dataframe
        rows = [] if df is None else df.to_dict("records")
        train_rows = [r for r in rows if r.get("kind") == "train"]
        curves.points[role] = [(r["tokens"], r["train_loss"], r["flops"]) for r in train_rows]
        flops = float(max((r["flops"] for r in rows), default=0.0))
        search_flops += flops
        summaries.append(
            ProbeTrial(
                role,
                int(max((r["tokens"] for r in rows), default=0)),
                flops,
                [
                    {"tokens": int(t), "train_loss": float(loss), "flops": float(f)}
                    for t, loss, f in curves.points[role]
                ],
                str(res.error) if res.error else None,
            )
        )
    failed = [s for s in summaries if s.error]
    if failed:
        raise RuntimeError(f"tau search trial {failed[0].role} failed: {failed[0].error}")
    mix = settings.mix(curves) or MixResult(False, None, None, None, float("nan"))
    one_layer = settings.mix(curves, "progressive-1") if cfg.tune.one_layer_probe else None
    sched = cfg.schedule_fn()
    small, large = cfg.flops_per_unit()
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
        trials=tuple(summaries),
        cap_tokens=cap,
        expand_at_tokens=expand_at,
        mix=mix.to_dict(),
        plan=plan.to_dict(),
        one_layer_t_mix_tokens=one_layer.t_mix_tokens if one_layer else None,
    )


def align_tau(tau: int, batch1: int, batch2: int, total: int) -> int:
    """The step boundary at or before τ from which phase 2 (global batch ``batch2``) ends exactly at
    ``total`` when it can, and which is a whole number of phase-1 batches."""
    tau = total - math.ceil((total - tau) / batch2) * batch2
    return max(batch1, (tau // batch1) * batch1)


def search_lr(cfg, *, storage: RayStorage, run_name: str, log=print) -> LrSearchResult:
    """Optuna over the LR on the source model (fixed size, the cheap one); returns the best LR."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    ls = cfg.tune.lr_search
    tokens = ls.tokens or search_cap_tokens(cfg)
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
