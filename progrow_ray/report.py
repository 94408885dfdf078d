"""The pipeline's report: report.json (machine-readable), report.md (the table) and PNG plots of loss
against tokens and against FLOPs — the view in which mixing shows (paper §5.1).

Plots are built in two steps: ``plot_lines`` turns phase histories into the data behind a plot (what
the tests check: every line runs forward in x), ``render_png`` draws it."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

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
                pts = [(e[x], e[key]) for e in events if e.get(key) is not None and e.get("event") in ("train", "eval")]
                if key in last_point and pts:
                    pts.insert(0, last_point[key])
                if pts:
                    last_point[key] = pts[-1]
                    data.lines.append(Line(f"{name} {short}", style, [p[0] for p in pts], [p[1] for p in pts], color))
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
        ax.plot(line.x, line.y, line.style, color=line.color, label=line.label, lw=1.2,
                marker="o" if line.style == "-" else None, ms=2.5)
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
    return f"the expanded model did not catch up with the fixed-size one{within}, so no mixing time was measured"


def markdown(report: dict[str, Any]) -> str:
    s, p, b = report["tau_search"], report["progressive"], report.get("baseline")
    total = report["config"]["train"]["total_tokens"]
    o = report["overheads"]
    lines = [f"# progrow_ray report: {report['config']['name']}", "",
             f"**Verdict:** {s['verdict']}", "",
             f"- Mixing: {t_mix_text(s, total)}.",
             f"- τ: {s['tau_tokens']:,} of {total:,} tokens ({s['tau_tokens'] / total:.0%})" if s.get("expand")
             else f"- τ: none, the target model trained from the start ({total:,} tokens)",
             f"- τ search cost: {s['search_flops']:.3e} FLOPs ({o['search_flops_fraction']:.1%} of the main run)",
             f"- Phase switch: {o['phase_switch_s']:.1f} s" if o["phase_switch_s"] is not None else "- Phase switch: -", "",
             "| phase | depth | workers | global batch (tokens) | tokens | FLOPs | final train loss |",
             "|---|---|---|---|---|---|---|"]
    for ph in report["phases"]:
        lines.append(f"| {ph['name']} | {ph['depth']} | {ph['workers']} | {ph['global_batch_tokens']:,} | "
                     f"{ph['tokens']:,} | {ph['flops']:.3e} | {ph['final_train_loss']:.4f} |")
    lines += ["", "| run | final val loss | FLOPs |", "|---|---|---|",
              f"| progressive | {p['final_val_loss']:.4f} | {p['flops']:.3e} |"]
    if b:
        lines.append(f"| fixed-size baseline | {b['final_val_loss']:.4f} | {b['flops']:.3e} |")
    sv = report.get("savings")
    if sv:
        lines += ["", f"FLOPs fraction (progressive / baseline): **{sv['flops_fraction']:.1%}** counting every matmul "
                      f"(head and attention included), **{sv['flops_fraction_paper']:.1%}** as the paper's eq. 1.1 counts "
                      f"(6 x non-embedding parameters per token); final val loss gap: **{sv['loss_gap_rel']:+.2%}**"]
    if report.get("horizon_note"):
        lines += ["", f"**Why no saving here:** {report['horizon_note']}"]
    lines += ["", "![loss vs tokens](loss_vs_tokens.png)", "", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    return "\n".join(lines)
