"""The τ search's plan, priced before anything trains (the recipe's step 4 at the scale it exists for).

A prior t_mix (``tune.t_mix_prior_tokens``, else the mixing-time registry's value, else the paper's for
the family) sets the probes' length: the expansion right after warmup and 1.5x the prior after it, so a
mixing time near the prior can be seen. t_mix transfers across model sizes (paper App. C.1) and is
counted in tokens (App. C.3), so the probes may be narrower than the target: the plan takes the widest
width whose search stays within ``tune.search_fraction`` of the main run's FLOPs *whatever τ the search
then picks*. The probes stop once mixed (plus the confirming window), so a short t_mix costs little
search but leaves a cheap main run (a late τ); the plan takes the worst ratio over every t_mix the cap
can see, and the no-mix case, with the learning-rate search counted too. A search that does not fit at
``tune.min_probe_width`` is refused at start, with the numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from ..core.mixing import PAPER_T_MIX, MixResult, plan_tau
from ..core.models import model_config_class

PRIOR_FACTOR = 1.5  # the probes see this many prior t_mix after the expansion
POINTS_PER_PROBE = 1_000  # reported points per probe when tune.report_every is not set
CHECKPOINTS_PER_PROBE = 20  # probe checkpoints when tune.checkpoint_every_tokens is not set
T_MIX_GRID = 1_000  # mixing times the worst-case fraction is evaluated at


@dataclass(frozen=True)
class Prior:
    tokens: int
    source: str  # where it came from, in words


def paper_prior(kind: str) -> Prior:
    tokens, why = PAPER_T_MIX[kind]
    return Prior(int(tokens), f"paper prior: {why}")


def choose_prior(cfg, registered: Prior | None = None) -> Prior:
    """``tune.t_mix_prior_tokens``, else a registry value, else the paper's for the model family."""
    if cfg.tune.t_mix_prior_tokens:
        return Prior(int(cfg.tune.t_mix_prior_tokens), "tune.t_mix_prior_tokens")
    return registered or paper_prior(cfg.model_kind)


@dataclass(frozen=True)
class SearchPlan:
    prior: Prior
    expand_at: int  # tokens: the end of warmup, on a step boundary
    cap: int  # tokens per probe at most
    window: int  # tokens the mixed gap must hold (tune.window_frac of the probes' span after expanding)
    width: int  # the probes' width (n_embd, or a ResNet's base_width)
    target_width: int
    width_field: str
    width_auto: bool  # chosen by the plan (False: tune.probe_model sets it)
    probe_model: dict  # the model overrides the probes train with (width included)
    roles: tuple[str, ...]
    report_every: int  # probe steps per reported point
    checkpoint_every: int  # tokens between probe checkpoints
    search_flops: float  # every probe run to the cap
    lr_search_flops: float
    predicted_tau: int  # τ the prior predicts (0: fixed-size)
    fraction_at_prior: float  # search FLOPs (stopped at the prior's mixing) / main run's, at that τ
    worst_fraction: float  # the largest fraction over every t_mix the probes can see
    budget: float  # tune.search_fraction
    cap_note: str = ""  # why the cap is not 1.5x the prior
    unit: str = "token"

    @property
    def fits(self) -> bool:
        return self.worst_fraction <= self.budget + 1e-12

    def lines(self) -> list[str]:
        u = f"{self.unit}s"
        width = f"{self.width_field}={self.width}" + (
            f" (of {self.target_width}; the widest that fits the budget)"
            if self.width_auto and self.width != self.target_width
            else " (the target's)"
            if self.width == self.target_width
            else f" (set by tune.probe_model; the target's is {self.target_width})"
        )
        return [
            f"prior t_mix: {self.prior.tokens:,} {u} ({self.prior.source})",
            f"probes: {', '.join(self.roles)}; {width}",
            f"each: expansion at {self.expand_at:,} {u}, at most {self.cap:,} {u} "
            f"({(self.cap - self.expand_at) / max(self.prior.tokens, 1):.2f}x the prior after it"
            f"{self.cap_note}), "
            f"mixed when the gap holds for {self.window:,} {u}",
            f"reports every {self.report_every} steps, checkpoints every {self.checkpoint_every:,} {u}",
            f"search FLOPs: {self.search_flops:.3e} to the cap"
            + (f" + {self.lr_search_flops:.3e} learning-rate search" if self.lr_search_flops else ""),
            f"fraction of the main run: {self.fraction_at_prior:.1%} if t_mix is the prior "
            f"(tau = {self.predicted_tau:,}), at most {self.worst_fraction:.1%} for any t_mix the probes can "
            f"see; budget tune.search_fraction = {self.budget:.1%}: "
            + ("fits" if self.fits else "DOES NOT FIT"),
        ]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SearchPlan":
        return cls(**{**data, "prior": Prior(**data["prior"]), "roles": tuple(data["roles"])})

    def refusal(self) -> str:
        return (
            f"the tau search does not fit its budget: probes at the narrowest allowed width "
            f"({self.width_field}={self.width}) for {self.cap:,} {self.unit}s each (expansion at "
            f"{self.expand_at:,}, then {PRIOR_FACTOR}x the prior t_mix {self.prior.tokens:,}{self.cap_note}) "
            "cost up to "
            f"{self.worst_fraction:.1%} of the main run, over tune.search_fraction={self.budget:.1%}; raise "
            f"tune.search_fraction, lower tune.min_probe_width, give a measured tune.t_mix_prior_tokens "
            f"(or `python -m progrow_ray.tmix add`), or set tune.enabled=false and growth.tau_frac"
        )


def probe_roles(cfg) -> tuple[str, ...]:
    roles = ["fixed", "progressive"]
    if cfg.tune.one_layer_probe and cfg.growth.source_depth != 1:
        roles.append("progressive-1")
    if cfg.tune.min_depth_advantage > 0:
        roles.append("source")
    return tuple(roles)


def expansion_point(cfg) -> int:
    """The probes' expansion: the end of warmup, on a step boundary (recipe step 4)."""
    b = cfg.train.batch_tokens
    return int(math.ceil(cfg.schedule_fn().warmup_tokens / b)) * b


def _flops_per_token(cfg, probe_model: dict, roles) -> dict[str, float]:
    run = cfg.run_config()
    run = replace(run, model={**run.model, **probe_model})
    source, target = run.flops_per_unit()
    one = 0.0
    if "progressive-1" in roles:
        one = replace(run, growth=replace(run.growth, source_depth=1)).flops_per_unit()[0]
    return {"source": source, "target": target, "one": one}


def _probe_flops(roles, f: dict, expand_at: int, stop: float) -> float:
    grown = max(0.0, stop - expand_at)
    before = min(stop, expand_at)
    per_role = {
        "fixed": f["target"] * stop,
        "progressive": f["source"] * before + f["target"] * grown,
        "progressive-1": f["one"] * before + f["target"] * grown,
        "source": f["source"] * stop,
    }
    return sum(per_role[r] for r in roles)


def _main_flops(cfg, t_mix: int | None) -> tuple[float, int]:
    """The main run's FLOPs and τ when the search measures ``t_mix`` (None: did not mix)."""
    from .tune_tau import align_tau

    sched = cfg.schedule_fn()
    small, large = cfg.flops_per_unit()
    b = cfg.train.batch_tokens
    total = cfg.train.total_tokens
    mix = MixResult(t_mix is not None, t_mix, None, 0.0, 0.0)
    p = plan_tau(
        mix,
        total_tokens=total,
        warmup_tokens=sched.warmup_tokens,
        stable_end_tokens=sched.stable_end_tokens,
        small_flops_per_token=small,
        large_flops_per_token=large,
        safety=cfg.tune.safety,
        align=lambda t: align_tau(t, b, cfg.phase2_batch_tokens, total),
    )
    tau = p.tau_tokens if p.expand else 0
    return small * tau + large * (total - tau), tau


def lr_search_flops(cfg, cap: int) -> float:
    ls = cfg.tune.lr_search
    if not ls.enabled:
        return 0.0
    return ls.num_samples * (ls.tokens or cap) * cfg.flops_per_unit()[0]


def plan_search(cfg, prior: Prior) -> SearchPlan:
    """The probes' length, width, cadences and cost for ``cfg`` (a ``PipelineConfig``) and ``prior``."""
    t, b = cfg.tune, cfg.train.batch_tokens
    target = cfg.target_model_config()
    field = type(target).width_field
    target_width = getattr(target, field)
    # the width step of the probes' own architecture (tune.probe_model may change heads or depth)
    step = replace(cfg, model={**cfg.model, **t.probe_model}).target_model_config().width_step
    expand_at = expansion_point(cfg)
    floor = expand_at + 4 * b  # the shortest probe that can time anything
    # a t_mix longer than the stable phase after warmup means "no saving" whatever it is, and the probes
    # (on the main run's schedule) would be in the decay: no need to look further
    useful = int(cfg.schedule_fn().stable_end_tokens // b) * b
    wanted = expand_at + int(math.ceil(PRIOR_FACTOR * prior.tokens / b)) * b
    cap, cap_note = min(useful, wanted), "" if wanted <= useful else "; capped at the end of the stable phase"
    if t.max_search_tokens:
        cap, cap_note = (t.max_search_tokens // b) * b, "; tune.max_search_tokens"
    if cap < floor:
        cap, cap_note = floor, "; raised to warmup + 4 steps, the shortest probe that can time anything"
    window = int(t.window_frac * (cap - expand_at))
    roles = probe_roles(cfg)
    steps = cap // b
    report_every = t.report_every or max(1, steps // POINTS_PER_PROBE)
    checkpoint_every = t.checkpoint_every_tokens or max(b, (cap // CHECKPOINTS_PER_PROBE // b) * b)
    fixed_main = _main_flops(cfg, None)[0]
    # the worst ratio sits where the stopped search first reaches the cap: that t_mix is evaluated exactly
    reaches_cap = max(0, cap - expand_at - window)
    grid = {int(x) for x in _linspace(0, cap - expand_at, T_MIX_GRID)} | {prior.tokens, reaches_cap}
    grid |= {max(0, reaches_cap - d) for d in (1, b)}
    mains = {tm: _main_flops(cfg, tm)[0] for tm in sorted(grid) if tm <= cap - expand_at}
    main_at_prior, tau = _main_flops(cfg, prior.tokens)

    lr = lr_search_flops(cfg, cap)

    def price(width: int) -> tuple[dict, float, float, float]:
        model = {**t.probe_model, field: width}
        f = _flops_per_token(cfg, model, roles)

        def search(t_mix: int) -> float:  # the probes stop once the window confirms the mixing
            return _probe_flops(roles, f, expand_at, min(cap, expand_at + t_mix + window)) + lr

        worst = (_probe_flops(roles, f, expand_at, cap) + lr) / fixed_main  # did not mix: fixed-size
        worst = max([worst, *(search(tm) / main for tm, main in mains.items())])
        return model, _probe_flops(roles, f, expand_at, cap), search(prior.tokens) / main_at_prior, worst

    explicit = field in t.probe_model
    if explicit:
        widths = [int(t.probe_model[field])]
    else:
        narrowest = max(step, t.min_probe_width or step)
        widths = list(range(target_width, narrowest - 1, -step)) or [target_width]
    for width in widths:  # the widest that fits; else the narrowest, refused
        model, flops, at_prior, worst = price(width)
        if worst <= t.search_fraction:
            break
    return SearchPlan(
        prior=prior,
        expand_at=expand_at,
        cap=cap,
        window=window,
        width=width,
        target_width=target_width,
        width_field=field,
        width_auto=not explicit,
        probe_model=model,
        roles=roles,
        report_every=report_every,
        checkpoint_every=checkpoint_every,
        search_flops=flops,
        lr_search_flops=lr,
        predicted_tau=tau,
        fraction_at_prior=at_prior,
        worst_fraction=worst,
        budget=t.search_fraction,
        cap_note=cap_note,
        unit=model_config_class(cfg.model_kind).unit,
    )


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
