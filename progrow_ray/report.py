"""The pipeline's report: report.json (machine-readable), report.md (the table) and PNG plots of loss
against tokens and against FLOPs — the view in which mixing shows (paper §5.1)."""

from __future__ import annotations

import io
from typing import Any


def curve(history: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    rows = [e for e in history if e.get(key) is not None and e.get("event") in ("train", "eval")]
    return [e["tokens"] for e in rows], [e["flops"] for e in rows], [e[key] for e in rows]


def plot_png(series: dict[str, list[dict]], x: str, title: str, tau_tokens: int | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, history in series.items():
        for key, style in (("train_loss", "--"), ("val_loss", "-")):
            tokens, flops, loss = curve(history, key)
            if loss:
                ax.plot(tokens if x == "tokens" else flops, loss, style, label=f"{label} {key.split('_')[0]}")
    if tau_tokens and x == "tokens":
        ax.axvline(tau_tokens, color="grey", lw=0.8, ls=":", label="tau")
    ax.set_xlabel("tokens" if x == "tokens" else "training FLOPs")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown(report: dict[str, Any]) -> str:
    s, p, b = report["tau_search"], report["progressive"], report.get("baseline")
    lines = [f"# progrow_ray report: {report['config']['name']}", "",
             f"**Verdict:** {s['verdict']}", "",
             f"- t_mix: {s['t_mix_tokens'] if s['t_mix_tokens'] is not None else 'not mixed'} tokens; "
             f"tau: {s['tau_tokens']:,} tokens of {report['config']['train']['total_tokens']:,}",
             f"- search FLOPs: {s['search_flops']:.3e} ({report['overheads']['search_flops_fraction']:.1%} of the main run)",
             f"- phase switch: {report['overheads']['phase_switch_s']:.1f} s" if report["overheads"]["phase_switch_s"] is not None
             else "- phase switch: -", "",
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
        lines += ["", f"FLOPs fraction (progressive / baseline): **{sv['flops_fraction']:.1%}**; final val loss gap: "
                      f"**{sv['loss_gap_rel']:+.2%}**"]
    lines += ["", "![loss vs tokens](loss_vs_tokens.png)", "", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    return "\n".join(lines)
