"""Tables (Markdown) and plots (PNG) of an analysed experiment."""

from __future__ import annotations

import io


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or v == 0 else f"{v:.4f}"
    return str(v)


def percent_cols(rows: list[dict]) -> set[str]:
    return {k for k in (rows[0] if rows else {}) if k.startswith(("gap", "FLOPs vs"))}


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    pct = percent_cols(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            (f"{r[c]:+.2%}" if c.startswith("gap") else f"{r[c]:.1%}")
            if c in pct and isinstance(r.get(c), float)
            else fmt(r.get(c))
            for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(exp, scale: str, analysis: dict, meta: dict) -> str:
    return (
        f"# {exp.name} ({exp.figure})\n\n"
        f"Claim: {exp.claim}.\n\n"
        f"**Verdict — {analysis['verdict']}**\n\n"
        + "".join(f"Note: {n}\n\n" for n in analysis.get("notes", []))
        + f"Scale `{scale}`; {meta['trials']} trials; {meta['wall_s']:.0f} s wall on {meta['machine']}; "
        f"{meta['date']}.\n"
        f"Command: `{meta['command']}`\n\n"
        + markdown_table(analysis["rows"])
        + "".join(f"\n![{p['title']}]({name})\n" for name, p in zip(meta["plot_files"], analysis["plots"]))
    )


def plot_png(plot: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for label, pts in plot["series"].items():
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if plot["kind"] == "scatter":
            ax.plot(
                xs, ys, "o-" if len(pts) > 1 and plot.get("xlabel") == "FLOPs" else "o", label=label, ms=4
            )
        else:
            ax.plot(xs, ys, label=label, lw=1.2)
    for y in plot.get("hlines", []):
        ax.axhline(y, color="grey", ls=":", lw=0.8)
    if plot.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(plot["xlabel"])
    ax.set_ylabel(plot["ylabel"])
    ax.set_title(plot["title"], fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
