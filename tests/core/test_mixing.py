import math

import numpy as np
import pytest

from progrow_ray.core import ConfigError
from progrow_ray.core.mixing import MixingWatch, MixResult, plan_tau, t_mix

TAU = 2_000


def curves(gap0=0.5, scale=3_000.0, n=400, end=40_000, noise=0.0, seed=0):
    """Fixed: 3 + 4 e^{-t/8000}. Progressive: worse by gap0 e^{-(t - TAU)/scale} after TAU."""
    t = np.linspace(0, end, n)
    fixed = 3 + 4 * np.exp(-t / 8000)
    prog = fixed + np.where(t >= TAU, gap0 * np.exp(-(t - TAU) / scale), 1.0)
    rng = np.random.default_rng(seed)
    return t, fixed + noise * rng.standard_normal(n), prog + noise * rng.standard_normal(n)


def analytic_t_mix(rel_tol, gap0=0.5, scale=3_000.0):
    # first t with gap0 e^{-(t-TAU)/scale} <= rel_tol * fixed(t); solve numerically on a fine grid
    t = np.linspace(TAU, 60_000, 2_000_001)
    ok = gap0 * np.exp(-(t - TAU) / scale) <= rel_tol * (3 + 4 * np.exp(-t / 8000))
    return t[np.argmax(ok)] - TAU


def test_t_mix_on_curves_with_a_known_crossing():
    t, fixed, prog = curves()
    r = t_mix(t, fixed, t, prog, expand_at_tokens=TAU, rel_tol=0.01)
    assert r.mixed
    step = t[1] - t[0]
    assert abs(r.t_mix_tokens - analytic_t_mix(0.01)) <= step
    assert r.gap_after_mix_rel <= 0.01 and r.last_gap_rel < 0.01


def test_window_must_hold_and_be_observed():
    t, fixed, prog = curves()
    # a spike right after the crossing resets the window
    spike = (t > TAU + analytic_t_mix(0.01) + 500) & (t < TAU + analytic_t_mix(0.01) + 700)
    prog_spiky = prog + 0.3 * spike
    plain = t_mix(t, fixed, t, prog_spiky, TAU, rel_tol=0.01)
    windowed = t_mix(t, fixed, t, prog_spiky, TAU, rel_tol=0.01, window_tokens=2_000)
    assert windowed.t_mix_tokens > plain.t_mix_tokens + 600
    # a window longer than what was observed after the crossing cannot be confirmed
    assert not t_mix(t, fixed, t, prog, TAU, rel_tol=0.01, window_tokens=39_000).mixed


def test_noisy_curves_need_smoothing():
    t, fixed, prog = curves(noise=0.05, n=2000)
    raw = t_mix(t, fixed, t, prog, TAU, rel_tol=0.01, window_tokens=4_000)
    smooth = t_mix(t, fixed, t, prog, TAU, rel_tol=0.01, window_tokens=4_000, smoothing=0.95)
    assert smooth.mixed
    assert abs(smooth.t_mix_tokens - analytic_t_mix(0.01)) < 3_000
    assert not raw.mixed or raw.t_mix_tokens > smooth.t_mix_tokens


def test_curves_that_never_meet_are_not_mixed():
    t = np.linspace(0, 10_000, 100)
    fixed = 3 + np.exp(-t / 2000)
    prog = fixed * 1.05  # a constant 5% gap
    r = t_mix(t, fixed, t, prog, 500, rel_tol=0.01)
    assert not r.mixed and r.t_mix_tokens is None
    assert r.last_gap_rel == pytest.approx(0.05)


def test_curves_on_different_token_grids():
    t, fixed, prog = curves(n=400)
    t2 = t[::3] + 17.0  # progressive logged less often, at other token counts
    prog2 = np.interp(t2, t, prog)
    r = t_mix(t, fixed, t2[:-1], prog2[:-1], TAU, rel_tol=0.01)
    assert abs(r.t_mix_tokens - analytic_t_mix(0.01)) <= 3 * (t[1] - t[0]) + 17


def test_bad_curves():
    with pytest.raises(ConfigError, match="equal-length"):
        t_mix([1, 2], [3.0], [1, 2], [3.0, 2.0], 0)
    with pytest.raises(ConfigError, match="finite"):
        t_mix([1, 2], [3.0, math.nan], [1, 2], [3.0, 2.0], 0)
    with pytest.raises(ConfigError, match="share no point"):
        t_mix([1, 2], [3.0, 2.0], [5, 6], [3.0, 2.0], 5)


def mixed(t_mix_tokens, gap=0.004):
    return MixResult(True, t_mix_tokens, 100 + t_mix_tokens, gap, gap / 2)


PLAN = dict(
    total_tokens=1_000_000,
    warmup_tokens=20_000,
    stable_end_tokens=800_000,
    small_flops_per_token=1.0,
    large_flops_per_token=10.0,
)


def test_tau_is_stable_end_minus_t_mix_with_flops_and_verdict():
    p = plan_tau(mixed(100_000), **PLAN)
    assert p.expand and p.tau_tokens == 700_000
    expected = (1.0 * 700_000 + 10.0 * 300_000) / (10.0 * 1_000_000)
    assert p.flops_fraction == pytest.approx(expected)
    assert "saves 63.0% FLOPs (63.0% net of the search)" in p.verdict and "0.40%" in p.verdict
    with_search = plan_tau(mixed(100_000), search_flops=0.5e6, **PLAN)
    assert with_search.flops_fraction == pytest.approx(expected + 0.05)
    assert plan_tau(mixed(100_000), safety=0.5, **PLAN).tau_tokens == 650_000


def test_no_saving_cases_train_fixed_size():
    too_slow = plan_tau(mixed(790_000), **PLAN)
    assert not too_slow.expand and too_slow.tau_tokens == 0
    assert too_slow.verdict.startswith("no saving at this horizon") and "780,000" in too_slow.verdict
    never = plan_tau(MixResult(False, None, None, None, 0.031), **PLAN)
    assert not never.expand and "did not mix" in never.verdict and "+3.10%" in never.verdict
    # the search is sunk when tau is chosen: still expand, but the verdict says it did not pay off here
    pricey = plan_tau(mixed(100_000), search_flops=1e7, **PLAN)
    assert pricey.expand and pricey.tau_tokens == 700_000 and pricey.flops_fraction > 1
    assert "saves 63.0% FLOPs" in pricey.verdict and "more than this run saves" in pricey.verdict
    same_cost = plan_tau(mixed(100_000), **{**PLAN, "small_flops_per_token": 10.0})
    assert not same_cost.expand


def deep_advantage_curves(scale=15_000.0, end=80_000, n=800):
    """Depth pays off slowly: source - fixed = A(t) grows from 0; the expanded model's excess over the
    fixed one decays as A(t) e^{-(t - TAU)/scale}. Early on every curve agrees (trivial mixing)."""
    t = np.linspace(0, end, n)
    fixed = 3 + 4 * np.exp(-t / 8000)
    advantage = 0.5 * np.minimum(1.0, (t / 30_000) ** 2)
    source = fixed + advantage
    prog = np.where(t >= TAU, fixed + advantage * np.exp(-(t - TAU) / scale), source)
    return t, fixed, source, prog


def test_source_curve_ignores_the_trivial_early_meeting():
    t, fixed, source, prog = deep_advantage_curves()
    naive = t_mix(t, fixed, t, prog, TAU, rel_tol=0.01, window_tokens=2_000)
    aware = t_mix(
        t,
        fixed,
        t,
        prog,
        TAU,
        rel_tol=0.01,
        window_tokens=2_000,
        source_tokens=t,
        source_loss=source,
        min_advantage_rel=0.02,
    )
    assert naive.mixed and naive.t_mix_tokens < 3_000  # fooled: A(t) is still tiny there
    assert aware.mixed
    # from the first point where A/fixed >= 2% and the excess A e^{-x/scale} <= 1% of fixed: x >= scale ln 2
    assert aware.t_mix_tokens >= 15_000 * math.log(2) - 200
    assert aware.depth_advantage_rel >= 0.02 and aware.gap_after_mix_rel <= 0.01
    # the exact first admissible start, on the curves' own grid
    adv, gap = (source - fixed) / fixed, (prog - fixed) / fixed
    ok = (t >= TAU) & (adv >= 0.02) & (gap <= 0.01)
    assert aware.mixed_at_tokens == int(round(t[np.argmax(ok)]))


def test_no_depth_advantage_means_no_tau():
    t, fixed, _, prog = deep_advantage_curves()
    flat_source = fixed * 1.005  # depth buys 0.5%: below the 2% needed to time anything
    r = t_mix(
        t, fixed, t, prog, TAU, rel_tol=0.01, source_tokens=t, source_loss=flat_source, min_advantage_rel=0.02
    )
    assert not r.mixed and "no measurable advantage" in r.note
    assert abs(r.depth_advantage_rel - 0.005) < 1e-3
    plan = plan_tau(
        r,
        total_tokens=100_000,
        warmup_tokens=2_000,
        stable_end_tokens=80_000,
        small_flops_per_token=1.0,
        large_flops_per_token=4.0,
    )
    assert not plan.expand and "no measurable advantage" in plan.verdict


def test_safety_reproduces_the_papers_worked_example():
    """Paper §5.2: 600k iterations, 2% warmup, 10% decay (528k at constant lr, the stable phase ends at
    540k), t_mix ~ 40k, tau = 480k: a 60k margin, t_mix x 1.5 -> tune.safety = 0.5 (README)."""
    kw = dict(
        total_tokens=600_000,
        warmup_tokens=12_000,
        stable_end_tokens=540_000,
        small_flops_per_token=1.0,
        large_flops_per_token=10.0,
    )
    mix = MixResult(True, 40_000, 500_000, 0.0, 0.0)
    assert plan_tau(mix, safety=0.5, **kw).tau_tokens == 480_000
    assert plan_tau(mix, **kw).tau_tokens == 500_000
    assert (
        plan_tau(MixResult(True, 0, 540_000, 0.0, 0.0), **kw).tau_tokens < 540_000
    )  # never at the decay's start


# ---- the incremental watch (the τ search's stopper) -----------------------------------------------
def watched(
    t_f, fixed, t_p, prog, expand, rel_tol, window, smoothing, src=None, min_adv=0.0, interleave=True
):
    """Feed a MixingWatch as Tune would: the curves interleaved point by point (or one after another)."""
    w = MixingWatch(expand, rel_tol, window, smoothing, min_adv, with_source=src is not None)
    streams = [("fixed", t_f, fixed), ("progressive", t_p, prog)] + ([("source", *src)] if src else [])
    if interleave:
        for i in range(max(len(s[1]) for s in streams)):
            for role, t, loss in streams:
                if i < len(t):
                    w.add(role, float(t[i]), float(loss[i]))
    else:
        for role, t, loss in streams:
            for x, y in zip(t, loss):
                w.add(role, float(x), float(y))
    return w


@pytest.mark.parametrize("seed", range(8))
def test_watch_gives_t_mix_s_answer_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    t, fixed, prog = curves(
        gap0=rng.uniform(0.2, 0.8), scale=rng.uniform(1_000, 6_000), noise=0.02, seed=seed
    )
    source = fixed * (1 + rng.uniform(0.01, 0.06) * (1 - np.exp(-t / 5_000)))
    short = int(rng.uniform(0.3, 1.0) * len(t))  # a source probe that ended (or failed) early
    kw = dict(rel_tol=0.01, window_tokens=float(rng.uniform(0, 5_000)), smoothing=float(rng.uniform(0, 0.9)))
    for src, adv in ((None, 0.0), ((t, source), 0.02), ((t[:short], source[:short]), 0.02)):
        extra = dict(source_tokens=src[0], source_loss=src[1], min_advantage_rel=adv) if src else {}
        batch = t_mix(t, fixed, t, prog, TAU, **kw, **extra)
        for interleave in (True, False):
            w = watched(
                t,
                fixed,
                t,
                prog,
                TAU,
                kw["rel_tol"],
                kw["window_tokens"],
                kw["smoothing"],
                src,
                adv,
                interleave,
            )
            got = w.finish()
            assert got.mixed == batch.mixed and got.note == batch.note
            assert got.t_mix_tokens == batch.t_mix_tokens and got.mixed_at_tokens == batch.mixed_at_tokens
            assert got.last_gap_rel == pytest.approx(batch.last_gap_rel, rel=1e-9)
            if batch.mixed:
                assert got.gap_after_mix_rel == pytest.approx(batch.gap_after_mix_rel, rel=1e-9)


def test_the_watch_knows_at_the_first_point_after_the_window():
    t, fixed, prog = curves()
    batch = t_mix(t, fixed, t, prog, TAU, rel_tol=0.01, window_tokens=2_000)
    w = MixingWatch(TAU, 0.01, 2_000)
    for i in range(len(t)):
        w.add("fixed", t[i], fixed[i])
        w.add("progressive", t[i], prog[i])
        if w.mixed:
            break
    assert w.result.t_mix_tokens == batch.t_mix_tokens
    assert t[i] <= batch.mixed_at_tokens + 2_000 + (t[1] - t[0])  # no later than one report after the window


def test_watch_recovers_a_known_t_mix_within_5_percent_on_noisy_curves():
    for scale in (2_000.0, 4_000.0, 8_000.0):
        t, fixed, prog = curves(scale=scale, n=4_000, end=80_000, noise=0.002, seed=int(scale))
        w = watched(t, fixed, t, prog, TAU, 0.01, 1_000, 0.8)
        known = analytic_t_mix(0.01, scale=scale)
        assert w.mixed and abs(w.result.t_mix_tokens - known) <= 0.05 * known, (scale, w.result, known)


def test_watch_work_is_constant_per_point_and_restarts_are_ignored():
    t, fixed, prog = curves(n=20_000, end=400_000, gap0=0.5, scale=1e9)  # never mixes: every point judged
    w = MixingWatch(TAU, 0.01, 1_000, 0.5)
    for i in range(len(t)):
        w.add("fixed", t[i], fixed[i])
        w.add("progressive", t[i], prog[i])
        if i == 10_000:  # a restarted probe repeats what it reported since its checkpoint
            assert not w.add("progressive", t[i - 5], prog[i - 5])
    assert not w.mixed and w.judged == int(np.sum(t >= TAU))
    # the interpolation cursor moved once per fixed point: amortised O(1), not a scan per report
    assert w._fixed.j <= len(t)
    assert "did not mix" in w.outcome().note
    with pytest.raises(ConfigError, match="finite"):
        w.add("fixed", t[-1] + 1, math.nan)
