"""``python -m progrow_ray.bench stopper [--points 500000]``: the τ search's stopper per reported point.

Three probes' curves (fixed, progressive, source) that never mix, interleaved as Tune delivers them, go
through what the stopper does for each result (``ProbePoints`` + ``MixingWatch``); the total CPU time is
the number the issue sets (< 1 s for 500k points). The reference, measured in the same run, is what the
old stopper did: ``t_mix`` recomputed over every point so far at each report, timed at a few sizes and
summed over the run by its measured growth.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..core.mixing import t_mix
from ..orchestration.tune_tau import MixSettings, ProbePoints

ROLES = ("fixed", "progressive", "source")


def _curves(n: int, batch: int = 512):
    t = np.arange(1, n + 1, dtype=float) * batch
    fixed = 3 + 4 * np.exp(-t / (n * batch / 4))
    return t, {"fixed": fixed, "progressive": fixed * 1.05, "source": fixed * 1.2}


def stopper_bench(points: int = 500_000, reference_sizes=(1_000, 2_000, 4_000)) -> dict:
    per_role = points // len(ROLES)
    t, losses = _curves(per_role)
    settings = MixSettings(
        expand_at=int(t[per_role // 50]),
        rel_tol=0.01,
        window_tokens=0.1 * t[-1],
        smoothing=0.9,
        min_advantage=0.02,
    )
    results = [
        (role, {"kind": "train", "tokens": float(t[i]), "train_loss": float(losses[role][i]), "flops": 0.0})
        for i in range(per_role)
        for role in ROLES
    ]
    watch, store = settings.watch(), ProbePoints()
    start = time.process_time()
    for role, r in results:  # the stopper's work per Tune result
        if store.add(role, r):
            watch.add(role, r["tokens"], r["train_loss"])
    total = time.process_time() - start
    # the old stopper: t_mix over all points at every report; per-call cost c(n) ~ n^k, fitted here
    calls = []
    for n in reference_sizes:
        tn, ln = _curves(n)
        expand = tn[n // 50]
        s0 = time.process_time()
        t_mix(tn, ln["fixed"], tn, ln["progressive"], expand, 0.01, 0.1 * tn[-1], 0.9, tn, ln["source"], 0.02)
        calls.append((n, time.process_time() - s0))
    (n1, c1), (n2, c2) = calls[-2], calls[-1]
    k = math.log(max(c2, 1e-9) / max(c1, 1e-9)) / math.log(n2 / n1)
    # sum over the run's reports: 3 reports per curve point, the call at curve length m costs c2 (m/n2)^k
    reference = (
        len(ROLES)
        * c2
        * sum((m / n2) ** k for m in range(1, per_role + 1, max(1, per_role // 2000)))
        * max(1, per_role // 2000)
    )
    return {
        "points": per_role * len(ROLES),
        "stopper_cpu_s": total,
        "us_per_point": total / (per_role * len(ROLES)) * 1e6,
        "mixed": watch.mixed,
        "judged": watch.judged,
        "reference_call_s": {str(n): c for n, c in calls},
        "reference_growth_exponent": k,
        "reference_total_s_estimated": reference,
        "speedup": reference / max(total, 1e-9),
    }
