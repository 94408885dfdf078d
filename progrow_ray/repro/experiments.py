"""The paper's takeaways as experiments: each one a grid of trial specs and an analysis that turns the
measured numbers into a table, plots and a verdict line ("holds" / "does not hold at this scale").

Pure Python over the trial results: no Ray, no MLflow, so the analysis is unit-testable on made-up
numbers and runs the same on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..core.mixing import t_mix
from .scales import Scale
from .trial import SpectralProbe, TrialSpec

TOL = 0.01  # "catches up" / "mixes": within 1% of the fixed-size loss
SMOOTH = 0.8  # EMA weight of the past on train-loss curves (mixing and plots)


@dataclass(frozen=True)
class Experiment:
    name: str
    figure: str
    claim: str
    trials: Callable[[Scale], list[TrialSpec]]
    analyse: Callable[[list[dict]], dict]


# ---- spec helpers -----------------------------------------------------------------------------------
def make_trial(
    base,
    tid: str,
    meta: dict,
    *,
    model: dict | None = None,
    growth: dict | None = None,
    schedule: dict | None = None,
    optimizer: dict | None = None,
) -> TrialSpec:
    """A training trial: the scale's ``base`` run with the sections' fields the experiment varies."""
    run = replace(
        base,
        name=tid,
        model={**base.model, **(model or {})},
        growth=replace(base.growth, **(growth or {})),
        schedule=replace(base.schedule, **(schedule or {})),
        optimizer=replace(base.optimizer, **(optimizer or {})),
    )
    return TrialSpec(tid, run=run, meta=meta)


def lm(scale: Scale, tid: str, meta: dict, **sections) -> TrialSpec:
    return make_trial(scale.lm, tid, meta, **sections)


def grow(source, method: str = "random", tau: float = 0.25, **extra) -> dict:
    """The growth fields of a progressive trial."""
    return {"enabled": True, "source_depth": source, "method": method, "tau_frac": tau, **extra}


def by_id(results: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in results}


def rel(a: float, b: float) -> float:
    return (a - b) / b


def curve_series(results: list[dict], ids=None) -> dict:
    """Smoothed train loss vs tokens per trial, for plots."""
    from ..core.mixing import ema

    out = {}
    for r in results:
        if (ids is None or r["id"] in ids) and r["curve"]:
            c = np.array(r["curve"], dtype=float)
            out[r["id"]] = np.stack([c[:, 0], ema(c[:, 1], SMOOTH)], axis=1).tolist()
    return out


def mixing_tokens(prog: dict, fixed: dict) -> int | None:
    """t_mix of a progressive trial against its fixed-size reference (train-loss curves), or None."""
    if not prog["expansions"] or not prog["curve"]:
        return None
    p, f = np.array(prog["curve"], float), np.array(fixed["curve"], float)
    r = t_mix(
        f[:, 0],
        f[:, 1],
        p[:, 0],
        p[:, 1],
        prog["expansions"][-1],
        rel_tol=TOL,
        window_tokens=0.05 * f[-1, 0],
        smoothing=SMOOTH,
    )
    return r.t_mix_tokens


def loss_row(r: dict, fixed: dict, **extra) -> dict:
    """FLOPs both ways: every matmul (head, attention), and the paper's eq. 1.1 (non-embedding weights)."""
    return {
        "trial": r["id"],
        **extra,
        "final val loss": r["val_loss"],
        "gap vs fixed": rel(r["val_loss"], fixed["val_loss"]),
        "FLOPs vs fixed": r["flops"] / fixed["flops"],
        "FLOPs vs fixed (paper eq. 1.1)": r["flops_paper"] / fixed["flops_paper"],
    }


def line_plot(title: str, series: dict, vlines=None) -> dict:
    return {
        "title": title,
        "kind": "line",
        "xlabel": "tokens",
        "ylabel": "train loss (EMA)",
        "series": series,
        "vlines": vlines or [],
    }


def verdict(holds: bool, text: str) -> str:
    return ("holds: " if holds else "does not hold at this scale: ") + text


# ---- 1. init methods (Fig. 2, Takeaway 1) -------------------------------------------------------------
INIT_TRIALS = [(0, "random"), (0, "zero"), (1, "random"), (1, "copying"), (1, "zero"), (1, "copying_zero")]


def init_trials(s: Scale) -> list[TrialSpec]:
    return [lm(s, "fixed", {"source": None})] + [
        lm(s, f"{src}L-{m}", {"source": src, "method": m}, growth=grow(src, m, 0.25))
        for src, m in INIT_TRIALS
    ]


def init_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed = r["fixed"]
    rows = [loss_row(fixed, fixed, source="-", method="fixed-size")]
    rows += [loss_row(r[f"{s}L-{m}"], fixed, source=s, method=m) for s, m in INIT_TRIALS]
    mup = min(r[i]["val_loss"] for i in ("0L-random", "1L-random", "1L-copying"))
    fpi = min(r[i]["val_loss"] for i in ("0L-zero", "1L-zero", "1L-copying_zero"))
    zero_gap = rel(r["0L-zero"]["val_loss"], r["0L-random"]["val_loss"])
    holds = rel(fpi, mup) >= 0.005 and zero_gap >= 0.005
    text = (
        f"random/copying reach val loss {mup:.4f}, zero/copying_zero {fpi:.4f} ({rel(fpi, mup):+.2%}); "
        f"from 0 layers zero is {zero_gap:+.2%} worse than random"
    )
    return {
        "rows": rows,
        "holds": holds,
        "verdict": verdict(holds, text),
        "plots": [line_plot("init methods: loss vs tokens (expansion at 25%)", curve_series(results))],
    }


# ---- 2. muP condition (Table 1, Takeaway 2) -----------------------------------------------------------
MUP_TRIALS = INIT_TRIALS


def mup_trials(s: Scale) -> list[TrialSpec]:
    model = {**s.lm.model, "block_size": s.lm.data.seq_len}
    return [
        TrialSpec(
            f"{src}L-{m}",
            spectral=SpectralProbe(model, src, model["n_layer"], m),
            meta={"source": src, "method": m},
        )
        for src, m in MUP_TRIALS
    ]


def mup_analyse(results: list[dict]) -> dict:
    rows, share = [], {}
    for r in results:
        ratios = [x["ratio"] for x in r["rows"]]
        ok = sum(x["satisfies_mup"] for x in r["rows"])
        share[r["id"]] = ok / len(ratios)
        rows.append(
            {
                "trial": r["id"],
                "method": r["meta"]["method"],
                "new weights": len(ratios),
                "satisfy muP": f"{ok}/{len(ratios)}",
                "min ratio": min(ratios),
                "max ratio": max(ratios),
            }
        )
    mup = [k for k in share if k.endswith(("-random", "-copying"))]
    fpi = [k for k in share if k.endswith(("-zero", "-copying_zero"))]
    holds = all(share[k] == 1.0 for k in mup) and all(share[k] < 1.0 for k in fpi)
    text = (
        f"random/copying new layers satisfy ‖W‖₂ ~ √(fan_out/fan_in) for {min(share[k] for k in mup):.0%} "
        f"of their "
        f"weights; zero/copying_zero for at most {max(share[k] for k in fpi):.0%} (zeroed weights have norm "
        f"0)"
    )
    series = {r["id"]: [[i, max(x["ratio"], 1e-3)] for i, x in enumerate(r["rows"])] for r in results}
    plot = {
        "title": "muP condition: ‖W‖₂ / √(fan_out/fan_in) of new weights (0 drawn at 1e-3)",
        "kind": "scatter",
        "xlabel": "weight index",
        "ylabel": "ratio",
        "series": series,
        "logy": True,
        "hlines": [0.1, 10.0],
    }
    return {"rows": rows, "holds": holds, "verdict": verdict(holds, text), "plots": [plot]}


# ---- 3. where to expand (Fig. 4, Takeaway 3) ---------------------------------------------------------
WHERE = ("copying_last", "copying_stack", "copying_inter", "random")


def where_trials(s: Scale) -> list[TrialSpec]:
    depth = {"n_layer": 6}
    return [lm(s, "fixed-6L", {"method": "fixed"}, model=depth)] + [
        lm(s, f"2L-{m}", {"method": m}, model=depth, growth=grow(2, m, 0.25)) for m in WHERE
    ]


def where_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed = r["fixed-6L"]
    rows = [loss_row(r[k], fixed, method=r[k]["meta"]["method"]) for k in r]
    last, stack, inter = (r[f"2L-{m}"]["val_loss"] for m in WHERE[:3])
    close = abs(rel(stack, inter))
    holds = close <= TOL and min(stack, inter) < last
    text = (
        f"stack {stack:.4f} vs inter {inter:.4f} ({close:.2%} apart, tolerance {TOL:.0%}); "
        f"copying_last {last:.4f} ({rel(last, min(stack, inter)):+.2%} vs the better of the two)"
    )
    return {
        "rows": rows,
        "holds": holds,
        "verdict": verdict(holds, text),
        "plots": [line_plot("where to expand: 2 -> 6 layers at 25%", curve_series(results))],
    }


# ---- 4. schedule x tau sweep (Fig. 5, Takeaways 4 and 6) ------------------------------------------------
TAUS = tuple(round(0.1 * i, 1) for i in range(1, 9))
# Fig. 12's caption: "For cosine schedule, the learning rates are doubled" (App. B's text gives 0.05 for
# cosine instead; the figure that compares the schedules is the one followed here)
COSINE_LR_FACTOR = 2.0


def sweep_lr(s: Scale, sched: str) -> float:
    return s.lm.optimizer.lr * (COSINE_LR_FACTOR if sched == "cosine" else 1.0)


def sweep_trials(s: Scale) -> list[TrialSpec]:
    out = []
    for sched in ("wsd", "cosine"):
        lr = sweep_lr(s, sched)
        sch = {"schedule": {"name": sched}, "optimizer": {"lr": lr}}
        out.append(lm(s, f"{sched}-fixed", {"schedule": sched, "tau": None, "lr": lr}, **sch))
        for tau in TAUS:  # the sweep reaches the decay on purpose (WSD's starts at 0.8 T here)
            out.append(
                lm(
                    s,
                    f"{sched}-tau{tau:.1f}",
                    {"schedule": sched, "tau": tau, "lr": lr},
                    **sch,
                    growth=grow(0, "random", tau, allow_tau_in_decay=True),
                )
            )
    return out


def sweep_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    rows, latest, tmix = [], {}, {}
    for sched in ("wsd", "cosine"):
        fixed = r[f"{sched}-fixed"]
        lr = fixed["meta"].get("lr")  # results from before the lr was recorded: WSD's lr for both
        rows.append(loss_row(fixed, fixed, schedule=sched, lr=lr, tau="-", **{"t_mix (tokens)": None}))
        latest[sched], tmix[sched] = None, {}
        for tau in TAUS:
            p = r[f"{sched}-tau{tau:.1f}"]
            tm = mixing_tokens(p, fixed)
            tmix[sched][tau] = tm
            rows.append(loss_row(p, fixed, schedule=sched, lr=lr, tau=tau, **{"t_mix (tokens)": tm}))
            if rel(p["val_loss"], fixed["val_loss"]) <= TOL:
                latest[sched] = tau
    w, c = latest["wsd"], latest["cosine"]
    wsd_better = sum(
        rel(r[f"wsd-tau{t:.1f}"]["val_loss"], r["wsd-fixed"]["val_loss"])
        < rel(r[f"cosine-tau{t:.1f}"]["val_loss"], r["cosine-fixed"]["val_loss"])
        for t in TAUS
    )
    # WSD forgives later expansions: it catches up at least as late as cosine, and its gap to its own
    # fixed-size run is the smaller one at most tau
    t4 = (w or 0) >= (c or 0) and wsd_better > len(TAUS) / 2
    stable = [v for tau, v in tmix["wsd"].items() if v is not None and tau <= 0.6]
    spread = (max(stable) - min(stable)) / float(np.median(stable)) if len(stable) >= 2 else None
    t6 = spread is not None and spread <= 0.5
    fmt = lambda x: f"tau = {x:.1f} T" if x is not None else "none"  # noqa: E731
    text = (
        f"Takeaway 4 {'holds' if t4 else 'does not hold'}: the latest tau within {TOL:.0%} of fixed is "
        f"{fmt(w)} under WSD and {fmt(c)} under cosine, and WSD's gap is the smaller at {wsd_better} of "
        f"{len(TAUS)} taus; Takeaway 6 {'holds' if t6 else 'does not hold'}: "
        f"WSD t_mix over tau <= 0.6 T "
        + (
            f"spreads {spread:.0%} of its median ({len(stable)} mixed runs)"
            if spread is not None
            else f"measured on {len(stable)} run(s) only"
        )
    )
    holds = t4 and t6
    cos_lr, wsd_lr = r["cosine-fixed"]["meta"].get("lr"), r["wsd-fixed"]["meta"].get("lr")
    notes = [
        f"cosine runs train at lr {cos_lr:g}, twice WSD's {wsd_lr:g}, as the paper's Fig. 12 caption "
        "does for cosine (its App. B text says 0.05)"
        if cos_lr is not None
        else "these cosine runs trained at WSD's learning rate (recorded before the repro followed the "
        "paper's "
        "doubled cosine lr, Fig. 12 caption); re-run the experiment to follow it"
    ]
    plots = [
        line_plot(
            f"{s}: zero-layer expansion at every 10% vs fixed",
            curve_series(results, [k for k in r if k.startswith(s)]),
        )
        for s in ("wsd", "cosine")
    ]
    return {
        "rows": rows,
        "holds": holds,
        "verdict": ("holds: " if holds else "does not hold at this scale: ") + text,
        "plots": plots,
        "notes": notes,
    }


# ---- 5. source depth x tau Pareto (Fig. 8, Takeaway 7 I) ------------------------------------------------
SOURCES = (0, 1, 2, 6)
PARETO_TAUS = (0.2, 0.5, 0.7)


def pareto_trials(s: Scale) -> list[TrialSpec]:
    depth = {"n_layer": s.deep_layers}
    out = [lm(s, "fixed", {"source": None, "tau": None}, model=depth)]
    for src in SOURCES:
        for tau in PARETO_TAUS:
            out.append(
                lm(
                    s,
                    f"{src}L-tau{tau}",
                    {"source": src, "tau": tau},
                    model=depth,
                    growth=grow(src, "random", tau),
                )
            )
    return out


def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Ids of the points no other point beats in both FLOPs and loss (lower is better)."""
    return [
        i
        for f, loss, i in points
        if not any((f2 <= f and l2 <= loss) and (f2 < f or l2 < loss) for f2, l2, _ in points)
    ]


def pareto_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed = r["fixed"]
    rows = [loss_row(x, fixed, source=x["meta"]["source"], tau=x["meta"]["tau"]) for x in results]
    front = pareto_front([(x["flops"], x["val_loss"], x["id"]) for x in results])
    for row in rows:
        row["on front"] = row["trial"] in front
    by_source = {s: sum(1 for i in front if i.startswith(f"{s}L-")) for s in SOURCES}
    # zero-layer sources own the front: at least as many points as one layer, more than any deeper source
    holds = by_source[0] >= by_source[1] and all(by_source[0] > by_source[s] for s in SOURCES if s >= 2)
    text = (
        f"Pareto front (val loss vs FLOPs) holds {len(front)} runs: "
        + ", ".join(f"{n} from {s} layers" for s, n in by_source.items())
        + (", plus fixed-size" if "fixed" in front else "")
    )
    series = {
        f"{s} layers": [[r[f"{s}L-tau{t}"]["flops"], r[f"{s}L-tau{t}"]["val_loss"]] for t in PARETO_TAUS]
        for s in SOURCES
    }
    series["fixed-size"] = [[fixed["flops"], fixed["val_loss"]]]
    plot = {
        "title": "loss vs compute by source depth (tau in 0.2, 0.5, 0.7)",
        "kind": "scatter",
        "xlabel": "FLOPs",
        "ylabel": "final val loss",
        "series": series,
    }
    return {"rows": rows, "holds": holds, "verdict": verdict(holds, text), "plots": [plot]}


# ---- 6. multi-stage (§6, Takeaway 7 II) ---------------------------------------------------------------
def multi_trials(s: Scale) -> list[TrialSpec]:
    L = s.lm.model["n_layer"]
    return [
        lm(s, "fixed", {}),
        lm(s, "single-0.5", {}, growth=grow(0, "random", 0.5)),
        lm(s, "single-0.25", {}, growth=grow(0, "random", 0.25)),
        lm(
            s,
            "multi-0.25-0.5",
            {},
            growth=grow(0, "random", 0.5, stages=[{"depth": L // 2, "tau_frac": 0.25}]),
        ),
    ]


def multi_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed, single, multi = r["fixed"], r["single-0.5"], r["multi-0.25-0.5"]
    rows = [loss_row(x, fixed) for x in results]
    holds = single["flops"] < multi["flops"] and single["val_loss"] <= multi["val_loss"] * (1 + TOL / 2)
    text = (
        f"single stage 0 -> L at 0.5 T: val loss {single['val_loss']:.4f} at "
        f"{single['flops'] / fixed['flops']:.1%} "
        f"of fixed FLOPs; 0 -> L/2 -> L: {multi['val_loss']:.4f} at {multi['flops'] / fixed['flops']:.1%}"
    )
    return {
        "rows": rows,
        "holds": holds,
        "verdict": verdict(holds, text),
        "plots": [line_plot("single vs multi-stage expansion", curve_series(results))],
    }


# ---- 7. batch after expansion (Fig. 13, App. C.3) -----------------------------------------------------
def batch_trials(s: Scale) -> list[TrialSpec]:
    b = s.lm.train.batch_tokens
    return [
        lm(s, "fixed", {"batch_after": None}),
        lm(s, "batch-1x", {"batch_after": b}, growth=grow(0, "random", 0.5)),
        lm(s, "batch-4x", {"batch_after": 4 * b}, growth=grow(0, "random", 0.5, batch_tokens_after=4 * b)),
    ]


def batch_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed, one, four = r["fixed"], r["batch-1x"], r["batch-4x"]
    steps = {k: len(r[k]["curve"]) for k in r}
    rows = [loss_row(x, fixed, **{"batch after tau": x["meta"]["batch_after"]}) for x in results]
    diff = rel(four["val_loss"], one["val_loss"])
    holds = abs(diff) <= TOL
    text = (
        f"4x batch after tau ends at val loss {four['val_loss']:.4f} vs {one['val_loss']:.4f} with 1x "
        f"({diff:+.2%}, tolerance {TOL:.0%}) on the same tokens"
    )
    for row in rows:
        row["logged steps"] = steps[row["trial"]]
    return {
        "rows": rows,
        "holds": holds,
        "verdict": verdict(holds, text),
        "plots": [line_plot("same tokens, 1x vs 4x batch after tau = 0.5 T", curve_series(results))],
    }


# ---- 8. MoE (Fig. 9, Takeaway 8) ---------------------------------------------------------------------
MOE_TAUS = (0.25, 0.5, 0.75)


def moe_trials(s: Scale) -> list[TrialSpec]:
    return [lm(s, "moe-fixed", {"tau": None}, model=s.moe)] + [
        lm(s, f"moe-tau{t}", {"tau": t}, model=s.moe, growth=grow(0, "random", t)) for t in MOE_TAUS
    ]


def moe_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed = r["moe-fixed"]
    rows = []
    ok = []
    for t in MOE_TAUS:
        p = r[f"moe-tau{t}"]
        tm = mixing_tokens(p, fixed)
        rows.append(loss_row(p, fixed, tau=t, **{"t_mix (tokens)": tm}))
        if rel(p["val_loss"], fixed["val_loss"]) <= TOL and p["flops"] < fixed["flops"]:
            ok.append(t)
    rows.insert(0, loss_row(fixed, fixed, tau="-", **{"t_mix (tokens)": None}))
    best = min((r[f"moe-tau{t}"] for t in MOE_TAUS), key=lambda p: p["val_loss"])
    holds = bool(ok)
    text = (
        f"zero-layer MoE expanded at tau in {list(ok) or 'none'} ends within {TOL:.0%} of the fixed MoE "
        f"({fixed['val_loss']:.4f}); best progressive {best['val_loss']:.4f} at "
        f"{best['flops'] / fixed['flops']:.1%} FLOPs"
    )
    return {
        "rows": rows,
        "holds": holds,
        "verdict": verdict(holds, text),
        "plots": [line_plot("MoE (8 experts, top-2): zero-layer expansion vs fixed", curve_series(results))],
    }


# ---- 9. ResNet (Fig. 2 left / Fig. 5 left) ------------------------------------------------------------
# (source blocks, method, tau): [1,1,1,1] is the zero-layer analog (only random / zero can fill a stage
# from it);
# [2,2,2,2] the one-layer analog, which copying needs (paper §3.1, footnote 1)
RESNET_TRIALS = (
    ((1, 1, 1, 1), "random", 0.25),
    ((1, 1, 1, 1), "random", 0.5),
    ((2, 2, 2, 2), "copying", 0.25),
    ((2, 2, 2, 2), "copying", 0.5),
)


def resnet_id(src, m, t) -> str:
    return f"resnet-{''.join(map(str, src))}-{m}-tau{t}"


def resnet_trials(s: Scale) -> list[TrialSpec]:
    return [make_trial(s.image, "resnet-fixed", {"source_blocks": None})] + [
        make_trial(
            s.image,
            resnet_id(src, m, t),
            {"source_blocks": list(src), "method": m, "tau_frac": t},
            growth=grow(list(src), m, t),
        )
        for src, m, t in RESNET_TRIALS
    ]


def resnet_analyse(results: list[dict]) -> dict:
    r = by_id(results)
    fixed = r["resnet-fixed"]
    rows = [{**loss_row(x, fixed), "val accuracy": x.get("val_accuracy")} for x in results]
    prog = [r[resnet_id(*x)] for x in RESNET_TRIALS]
    best = max(prog, key=lambda p: p["val_accuracy"])
    holds = best["val_accuracy"] >= fixed["val_accuracy"] - 0.01 and best["flops"] < fixed["flops"]
    text = (
        f"best grown run ({best['id']}, -> [3,4,6,3]) reaches {best['val_accuracy']:.1%} val accuracy at "
        f"{best['flops'] / fixed['flops']:.1%} of the FLOPs vs {fixed['val_accuracy']:.1%} fixed-size "
        f"(tolerance 1 pt)"
    )
    plot = line_plot("ResNet: [1,1,1,1] -> ResNet50 shape vs fixed", curve_series(results))
    plot["xlabel"] = "images"
    return {"rows": rows, "holds": holds, "verdict": verdict(holds, text), "plots": [plot]}


EXPERIMENTS = {
    e.name: e
    for e in [
        Experiment(
            "init-methods",
            "Fig. 2, Takeaway 1",
            "random and copying beat zero and copying_zero",
            init_trials,
            init_analyse,
        ),
        Experiment(
            "muP-condition",
            "Table 1, Takeaway 2",
            "only random and copying satisfy the muP spectral condition",
            mup_trials,
            mup_analyse,
        ),
        Experiment(
            "where-to-expand",
            "Fig. 4, Takeaway 3",
            "copying_stack ~ copying_inter, both better than copying_last",
            where_trials,
            where_analyse,
        ),
        Experiment(
            "schedule-tau-sweep",
            "Fig. 5, Takeaways 4 and 6",
            "WSD tolerates later tau than cosine; under WSD t_mix hardly depends on tau",
            sweep_trials,
            sweep_analyse,
        ),
        Experiment(
            "source-depth-pareto",
            "Fig. 8, Takeaway 7",
            "zero-layer sources dominate the loss-FLOPs Pareto front",
            pareto_trials,
            pareto_analyse,
        ),
        Experiment(
            "multi-stage",
            "Section 6, Takeaway 7",
            "single-stage 0 -> L beats 0 -> L/2 -> L per FLOP",
            multi_trials,
            multi_analyse,
        ),
        Experiment(
            "batch-after-expansion",
            "Fig. 13, App. C.3",
            "mixing needs tokens, not steps: 4x batch after tau ends alike",
            batch_trials,
            batch_analyse,
        ),
        Experiment(
            "moe-mixing",
            "Fig. 9, Takeaway 8",
            "a zero-layer MoE mixes with the fixed MoE",
            moe_trials,
            moe_analyse,
        ),
        Experiment(
            "resnet",
            "Fig. 2 / Fig. 5 left, Takeaway 8",
            "ResNet [1,1,1,1] grows to the ResNet50 shape and mixes",
            resnet_trials,
            resnet_analyse,
        ),
    ]
}
