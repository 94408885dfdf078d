"""The pipeline's report: report.json (machine-readable), report.md (the table) and PNG plots of loss
against tokens and against FLOPs — the view in which mixing shows (paper §5.1).

Plots are built in two steps: ``plot_lines`` turns phase histories into the data behind a plot (what
the tests check: every line runs forward in x), ``render_png`` draws it."""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from .console import fmt_count

LOSS_KEYS = (("train_loss", "--", "train"), ("val_loss", "-", "val"))


def event_key(e: dict) -> tuple:
    return e.get("event"), e.get("step"), e.get("tokens")


def own_events(history: list[dict], earlier: list[dict]) -> list[dict]:
    """The events of a phase that are not an earlier phase's: a phase restored from the previous
    phase's checkpoint carries that phase's history in front of its own."""
    seen = {event_key(e) for e in earlier}
    return [e for e in history if event_key(e) not in seen]


@dataclass
class Line:
    label: str
    style: str
    x: list[float]
    y: list[float]
    color: str | None = None


@dataclass
class PlotData:
    x: str  # "tokens" or "flops"
    lines: list[Line] = field(default_factory=list)
    markers: list[tuple[str, float]] = field(default_factory=list)  # (label, x): τ of each expanded run


def plot_lines(runs: dict[str, list[dict]], x: str) -> PlotData:
    """``runs``: label -> that run's phases in order, each ``{"name", "depth", "history"}``. One line per
    phase and loss key; a later phase's line starts at the previous phase's last point, so a run reads
    as one curve whose segments differ by colour. τ (the expand event) is a marker in either x."""
    if x not in ("tokens", "flops"):
        raise ValueError(f"x must be 'tokens' or 'flops', not {x!r}")
    data = PlotData(x)
    colors = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"])
    for label, phases in runs.items():
        earlier: list[dict] = []
        last_point: dict[str, tuple[float, float]] = {}
        for phase in phases:
            events = own_events(phase["history"], earlier)
            earlier = earlier + events
            color = next(colors)
            name = label if len(phases) == 1 else f"{label} {phase['name']} (depth {_depth(phase['depth'])})"
            for key, style, short in LOSS_KEYS:
                pts = [
                    (e[x], e[key])
                    for e in events
                    if e.get(key) is not None and e.get("event") in ("train", "eval")
                ]
                if key in last_point and pts:
                    pts.insert(0, last_point[key])
                if pts:
                    last_point[key] = pts[-1]
                    data.lines.append(
                        Line(f"{name} {short}", style, [p[0] for p in pts], [p[1] for p in pts], color)
                    )
            for e in events:
                if e.get("event") == "expand":
                    data.markers.append((f"{label} τ", e[x]))
    return data


def _depth(depth) -> str:
    return "+".join(map(str, depth)) if isinstance(depth, (list, tuple)) else str(depth)


def render_png(data: PlotData, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    for line in data.lines:
        ax.plot(
            line.x,
            line.y,
            line.style,
            color=line.color,
            label=line.label,
            lw=1.2,
            marker="o" if line.style == "-" else None,
            ms=2.5,
        )
    for label, xv in data.markers:
        ax.axvline(xv, color="grey", lw=0.9, ls=":", label=label)
    ax.set_xlabel("tokens" if data.x == "tokens" else "training FLOPs")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def t_mix_text(search: dict, total_tokens: int) -> str:
    """The mixing time as a person would say it."""
    t = search.get("t_mix_tokens")
    if t is not None:
        return f"the expanded model caught up with the fixed-size one after {fmt_count(t)} tokens (t_mix)"
    if not search.get("trials"):
        return "not measured (no τ search ran)"
    cap = search.get("cap_tokens")
    within = f" within the {fmt_count(cap)}-token probes" if cap else ""
    return (
        f"the expanded model did not catch up with the fixed-size one{within}, so no mixing time was measured"
    )


def markdown(report: dict[str, Any]) -> str:
    s, p, b = report["tau_search"], report["progressive"], report.get("baseline")
    total = report["config"]["train"]["total_tokens"]
    o = report["overheads"]
    lines = [
        f"# progrow_ray report: {report['config']['name']}",
        "",
        f"**Verdict:** {s['verdict']}",
        "",
        f"- Mixing: {t_mix_text(s, total)}.",
        f"- τ: {s['tau_tokens']:,} of {total:,} tokens ({s['tau_tokens'] / total:.0%})"
        if s.get("expand")
        else f"- τ: none, the target model trained from the start ({total:,} tokens)",
        f"- τ search cost: {s['search_flops']:.3e} FLOPs; {o['search_flops_fraction']:.1%} of the main run "
        "with any learning-rate search",
        *(
            [f"- t_mix source: {s['registry']['source']} (registry entry {s['registry']['key']})"]
            if s.get("registry")
            else []
        ),
        f"- Phase switch: {o['phase_switch_s']:.1f} s"
        if o["phase_switch_s"] is not None
        else "- Phase switch: -",
        "",
        "| phase | depth | workers | global batch (tokens) | tokens | FLOPs | final train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for ph in report["phases"]:
        lines.append(
            f"| {ph['name']} | {ph['depth']} | {ph['workers']} | {ph['global_batch_tokens']:,} | "
            f"{ph['tokens']:,} | {ph['flops']:.3e} | {ph['final_train_loss']:.4f} |"
        )
    lines += [
        "",
        "| run | final val loss | FLOPs |",
        "|---|---|---|",
        f"| progressive | {p['final_val_loss']:.4f} | {p['flops']:.3e} |",
    ]
    if b:
        lines.append(f"| fixed-size baseline | {b['final_val_loss']:.4f} | {b['flops']:.3e} |")
    sv = report.get("savings")
    if sv:
        lines += [
            "",
            f"FLOPs fraction (progressive / baseline): **{sv['flops_fraction']:.1%}** counting every matmul "
            f"(head and attention included), **{sv['flops_fraction_paper']:.1%}** as the paper's eq. 1.1 "
            f"counts "
            f"(6 x non-embedding parameters per token); final val loss gap: **{sv['loss_gap_rel']:+.2%}**",
        ]
    if report.get("horizon_note"):
        lines += ["", f"**Why no saving here:** {report['horizon_note']}"]
    lines += elastic_lines(report.get("elastic_events") or [])
    lines += ["", "![loss vs tokens](loss_vs_tokens.png)", "", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    return "\n".join(lines)


def elastic_lines(events: list) -> list[str]:
    """The worker-group restarts as a table, with what they cost."""
    if not events:
        return []
    lost = sum(e["wall_lost_s"] or 0.0 for e in events)
    lines = [
        "",
        f"**Elastic events:** {len(events)} restart(s) of a worker group; "
        f"{sum(e['tokens_recomputed'] for e in events):,} tokens recomputed, {lost:.0f} s of training lost",
        "",
        "| phase | at tokens | workers | cause | tokens recomputed | first step at the new size (s) |",
        "|---|---|---|---|---|---|",
    ]
    for e in events:
        lines.append(
            f"| {e['phase']} | {e['tokens']:,} | {e['from_workers']} -> {e['to_workers']} | {e['cause']} | "
            f"{e['tokens_recomputed']:,} | {e['first_step_s']:.1f} |"
        )
    return lines


# ---- the report's record ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Totals:
    final_val_loss: float | None
    flops: float


@dataclass(frozen=True)
class Savings:
    flops_fraction: float  # progressive / baseline, every matmul counted
    flops_fraction_paper: float  # the same as the paper's eq. 1.1 counts (non-embedding weights)
    loss_gap_rel: float  # (progressive - baseline) / baseline final val loss


@dataclass(frozen=True)
class Overheads:
    phase_switch_s: float | None
    phase_switch_breakdown: dict | None
    search_flops_fraction: float


@dataclass(frozen=True)
class MlflowRefs:
    tracking_uri: str
    experiment_id: str | None
    parent_run_id: str | None


@dataclass(frozen=True)
class Report:
    """What a pipeline run measured; ``report.json`` is its ``to_json()``."""

    config: dict
    tau_search: dict  # SearchResult.report_section()
    lr_search: dict | None
    horizon_note: str | None  # why this setting cannot save, when the search found no τ
    phases: list  # PhaseResult.report_row() of the main run's phases
    progressive: Totals
    baseline: Totals | None
    savings: Savings | None
    overheads: Overheads
    mlflow: MlflowRefs
    # every restart of a phase's worker group (resize, preemption, failure): phase, time, tokens, from/to
    # workers, cause, tokens recomputed, wall time lost (orchestration/progress.ElasticLog)
    elastic_events: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def build_report(cfg, search, phases: list, baseline, lr_search, mlflow: MlflowRefs) -> Report:
    """The report of a finished pipeline run (``search``: SearchResult, ``phases`` / ``baseline``:
    PhaseResult) -- the numbers only; ``report_files`` renders them."""
    last = phases[-1]
    prog_flops = sum(p.flops for p in phases)
    progressive = Totals(last.final_val_loss, prog_flops)
    base = Totals(baseline.final_val_loss, baseline.flops) if baseline else None
    savings = None
    if base:
        # the paper's eq. 1.1 count (non-embedding parameters only) of the same two runs, from the config
        fixed_cfg = dataclasses.replace(cfg, growth=dataclasses.replace(cfg.growth, enabled=False))
        main_cfg = cfg if len(phases) > 1 else fixed_cfg
        paper = main_cfg.run_flops("paper", tau_tokens=search.tau_tokens) / fixed_cfg.run_flops("paper")
        savings = Savings(
            prog_flops / base.flops,
            paper,
            (progressive.final_val_loss - base.final_val_loss) / base.final_val_loss,
        )
    grown = len(phases) > 1
    from .engine.config import to_dict

    return Report(
        config=to_dict(cfg),
        tau_search=search.report_section(),
        lr_search=lr_search.to_json() if lr_search else None,
        horizon_note=no_saving_reason(cfg, search),
        phases=[p.report_row() for p in phases],
        progressive=progressive,
        baseline=base,
        savings=savings,
        overheads=Overheads(
            last.phase_switch_s if grown else None,
            last.phase_switch_breakdown if grown else None,
            (search.search_flops + search.lr_search_flops) / prog_flops,  # at the τ actually chosen
        ),
        mlflow=mlflow,
        elastic_events=[
            {"phase": p.name, **e}
            for p in [*phases, *([baseline] if baseline else [])]
            for e in p.elastic_events
        ],
    )


def report_files(report: Report, cfg, phases: list, baseline) -> dict[str, bytes]:
    """report.json, report.md, config.yaml and the two loss plots."""
    data = report.to_json()
    files = {
        "report.json": json.dumps(data, indent=2, default=str).encode(),
        "report.md": markdown(data).encode(),
        "config.yaml": yaml.safe_dump(data["config"], sort_keys=False).encode(),
    }
    runs = plot_runs(phases, baseline)
    for x in ("tokens", "flops"):
        files[f"loss_vs_{x}.png"] = render_png(
            plot_lines(runs, x), f"{cfg.name}: loss vs {x if x == 'tokens' else 'FLOPs'}"
        )
    return files


def plot_runs(phases: list, baseline) -> dict[str, list[dict]]:
    """What the plots draw: the main run's phases (progressive, or fixed-size) and the baseline."""
    main = "progressive" if len(phases) > 1 else "fixed-size (main run)"
    runs = {main: [p.to_json() for p in phases]}
    if baseline:
        runs["baseline"] = [baseline.to_json()]
    return runs


# Paper §5: GPT-2 1 -> 12 layers under WSD mixes in about 16B tokens; t_mix is counted in tokens and
# hardly depends on the model's size (App. C.1), so it is the yardstick for a horizon that can save.
PAPER_T_MIX_TOKENS = 16e9


def no_saving_reason(cfg, search) -> str | None:
    """When the search found no τ: one plain line on why this setting cannot show a saving, from the
    numbers (depth's share of the FLOPs, what the probes measured), and what would."""
    if search.search_says_expand or not search.trials:
        return None
    small, large = cfg.flops_per_unit()
    depth_share = 1 - small / large
    mix = search.mix or {}
    measured = (
        f"within the probes' {search.cap_tokens:,} tokens the target model beat the source model by only "
        f"{mix['depth_advantage_rel']:.1%}"
        if mix.get("depth_advantage_rel") is not None and search.cap_tokens
        else "the probes measured no mixing"
    )
    vocab = getattr(cfg.target_model_config(), "vocab_size", None)
    rest = f"embeddings and the {vocab:,}-token head" if vocab else "the stem and the head"
    return (
        f"the layers are {depth_share:.0%} of this model's training FLOPs (the rest is {rest}), "
        f"so growing depth can save at most that share "
        f"of the compute before τ, and {measured}; a saving needs depth to dominate the FLOPs (a wider, "
        f"deeper model) and a horizon well past the mixing time (the paper measures "
        f"≈{PAPER_T_MIX_TOKENS / 1e9:.0f}B "
        f"tokens for GPT-2 1 -> 12 layers), not {cfg.train.total_tokens:,} tokens"
    )


def summary_table(report: dict, report_uri: str) -> str:
    """The console's closing summary, from ``report.json``'s contents."""
    rows = [("verdict", report["tau_search"]["verdict"])]
    if report.get("horizon_note"):
        rows.append(("why", report["horizon_note"]))
    for p in report["phases"]:
        rows.append(
            (
                p["name"],
                f"depth {p['depth']}, {p['workers']} worker(s), batch {p['global_batch_tokens']:,} tokens, "
                f"{p['tokens']:,} tokens, train loss {p['final_train_loss']:.4f}",
            )
        )
    rows.append(
        (
            "progressive",
            f"val loss {report['progressive']['final_val_loss']:.4f}, FLOPs "
            f"{report['progressive']['flops']:.3e}",
        )
    )
    if report["baseline"]:
        b, s = report["baseline"], report["savings"]
        rows.append(("baseline", f"val loss {b['final_val_loss']:.4f}, FLOPs {b['flops']:.3e}"))
        rows.append(
            (
                "savings",
                f"FLOPs fraction {s['flops_fraction']:.1%} ({s['flops_fraction_paper']:.1%} as the paper "
                f"counts: non-embedding weights), val loss gap {s['loss_gap_rel']:+.2%}",
            )
        )
    o = report["overheads"]
    rows.append(
        (
            "overheads",
            f"search {o['search_flops_fraction']:.1%} of FLOPs, phase switch "
            + (f"{o['phase_switch_s']:.1f} s" if o["phase_switch_s"] is not None else "-"),
        )
    )
    rows.append(("report", report_uri))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
