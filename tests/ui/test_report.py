"""The report's plots and wording: the data behind each plot runs forward in x, phases are separate
segments that join, τ is marked in tokens and in FLOPs, and the markdown reads as a person writes."""

import pytest

from progrow_ray.report import markdown, own_events, plot_lines, render_png, t_mix_text


def events(tokens, flops_per_token, depth, loss0, start_step=0, start_flops=0.0, start_tokens=0, every=2):
    """Train events every ``every`` steps and an eval at the end, as the trainer emits them."""
    out, flops, t = [], start_flops, start_tokens
    for i, tok in enumerate(tokens, start=1):
        flops += flops_per_token * (tok - t)
        t = tok
        if i % every == 0 or i == len(tokens):
            out.append(
                {
                    "event": "train",
                    "step": start_step + i,
                    "tokens": tok,
                    "flops": flops,
                    "depth": depth,
                    "train_loss": loss0 - 0.01 * i,
                }
            )
    out.append(
        {
            "event": "eval",
            "step": start_step + len(tokens),
            "tokens": t,
            "flops": flops,
            "depth": depth,
            "val_loss": loss0 - 0.01 * len(tokens) + 0.05,
        }
    )
    return out


@pytest.fixture
def progressive():
    """Phase 2 resumed phase 1's checkpoint and so carries phase 1's history first (what Ray returns)."""
    p1 = events(range(100, 1100, 100), 10.0, 0, 8.0)
    tau_tokens, tau_flops = p1[-1]["tokens"], p1[-1]["flops"]
    expand = {"event": "expand", "step": 10, "tokens": tau_tokens, "flops": tau_flops, "depth": 4}
    p2_own = [expand] + events(
        range(1400, 2300, 300),
        40.0,
        4,
        7.5,
        start_step=10,
        start_flops=tau_flops,
        start_tokens=tau_tokens,
        every=1,
    )
    return [
        {"name": "phase1", "depth": 0, "history": p1},
        {"name": "phase2", "depth": 4, "history": p1 + p2_own},
    ]


def test_phase2_keeps_only_its_own_events(progressive):
    p1, p2 = progressive
    own = own_events(p2["history"], p1["history"])
    assert own[0]["event"] == "expand" and all(e["tokens"] >= p1["history"][-1]["tokens"] for e in own)
    assert len(own) == len(p2["history"]) - len(p1["history"])


@pytest.mark.parametrize("x", ["tokens", "flops"])
def test_every_line_runs_forward_and_tau_is_marked(progressive, x):
    baseline = [{"name": "baseline", "depth": 4, "history": events(range(300, 2300, 300), 40.0, 4, 7.9)}]
    data = plot_lines({"progressive": progressive, "baseline": baseline}, x)
    assert len(data.lines) == 6  # 2 phases + baseline, train and val each
    for line in data.lines:
        assert all(b >= a for a, b in zip(line.x, line.x[1:])), (line.label, line.x)
    p1_train, p2_train = (
        line for line in data.lines if line.label.endswith("train") and "progressive" in line.label
    )
    assert "phase1 (depth 0)" in p1_train.label and "phase2 (depth 4)" in p2_train.label
    assert p2_train.x[0] == p1_train.x[-1] and p1_train.color != p2_train.color  # joined, distinguishable
    tau = progressive[0]["history"][-1][x]
    assert data.markers == [("progressive τ", tau)]
    png = render_png(data, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_fixed_size_run_is_one_unmarked_line():
    run = [{"name": "fixed", "depth": 4, "history": events(range(100, 900, 100), 40.0, 4, 7.9)}]
    data = plot_lines({"fixed-size (main run)": run}, "flops")
    assert [line.label for line in data.lines] == ["fixed-size (main run) train", "fixed-size (main run) val"]
    assert data.markers == []
    with pytest.raises(ValueError, match="'tokens' or 'flops'"):
        plot_lines({}, "steps")


def test_mixing_time_is_written_as_a_person_would():
    assert "caught up with the fixed-size one after 1.5M tokens" in t_mix_text(
        {"t_mix_tokens": 1_500_000}, 10**7
    )
    text = t_mix_text({"t_mix_tokens": None, "trials": [{}], "cap_tokens": 12288}, 10**6)
    assert "did not catch up" in text and "12.3k-token probes" in text and "not mixed" not in text
    report = {
        "config": {"name": "x", "train": {"total_tokens": 1000}},
        "tau_search": {
            "verdict": "v",
            "t_mix_tokens": None,
            "tau_tokens": 500,
            "search_flops": 1.0,
            "trials": [{}],
            "cap_tokens": 100,
            "expand": True,
        },
        "overheads": {"phase_switch_s": 2.0, "search_flops_fraction": 0.05},
        "phases": [],
        "progressive": {"final_val_loss": 3.0, "flops": 2.0},
        "baseline": None,
    }
    md = markdown(report)
    assert "not mixed tokens" not in md and "τ: 500 of 1,000 tokens (50%)" in md
