"""The reproduction suite's analyses on made-up results: verdicts follow the numbers both ways."""

import subprocess
import sys

import numpy as np
import pytest

from progrow_ray.repro.experiments import (
    EXPERIMENTS,
    INIT_TRIALS,
    PARETO_TAUS,
    SOURCES,
    TAUS,
    init_analyse,
    mixing_tokens,
    pareto_analyse,
    pareto_front,
    sweep_analyse,
)
from progrow_ray.repro.render import markdown_table
from progrow_ray.repro.scales import SCALES


def result(tid, val_loss, flops=1.0, curve=None, expansions=(), **meta):
    return {
        "id": tid,
        "val_loss": val_loss,
        "flops": flops,
        "flops_paper": flops,
        "curve": curve or [],
        "evals": [],
        "expansions": list(expansions),
        "meta": meta,
    }


def test_list_names_all_nine():
    out = subprocess.run(
        [sys.executable, "-m", "progrow_ray.repro", "LIST"], capture_output=True, text=True, check=True
    )
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == [
        "init-methods",
        "muP-condition",
        "where-to-expand",
        "schedule-tau-sweep",
        "source-depth-pareto",
        "multi-stage",
        "batch-after-expansion",
        "moe-mixing",
        "resnet",
    ]
    bad = subprocess.run([sys.executable, "-m", "progrow_ray.repro", "fig99"], capture_output=True, text=True)
    assert (
        bad.returncode == 2
        and "unknown experiment 'fig99'" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_experiment_builds_valid_trials_at_every_scale(scale):
    from progrow_ray.engine.config import RunConfig, from_dict, to_dict

    for exp in EXPERIMENTS.values():
        specs = exp.trials(SCALES[scale])
        assert len({s.id for s in specs}) == len(specs) >= 2
        for s in specs:
            if s.run is not None:  # the engine would accept it, also as read back from its params
                assert from_dict(RunConfig, to_dict(s.run.validate())) == s.run
            else:
                assert s.kind == "spectral" and s.spectral.target_depth > s.spectral.source_depth
    kinds = {s.kind for exp in EXPERIMENTS.values() for s in exp.trials(SCALES[scale])}
    assert kinds == {"tokens", "images", "spectral"}


def test_init_methods_verdict_follows_the_numbers():
    fixed = result("fixed", 4.00)
    good = {
        "0L-random": 4.05,
        "1L-random": 4.04,
        "1L-copying": 4.03,
        "0L-zero": 4.60,
        "1L-zero": 4.50,
        "1L-copying_zero": 4.40,
    }
    a = init_analyse([fixed] + [result(k, v) for k, v in good.items()])
    assert (
        a["holds"]
        and a["verdict"].startswith("holds:")
        and "4.0300" in a["verdict"]
        and "4.4000" in a["verdict"]
    )
    assert len(a["rows"]) == 1 + len(INIT_TRIALS)
    flipped = {k: (4.9 if k.endswith(("random", "copying")) else 4.1) for k in good}
    b = init_analyse([fixed] + [result(k, v) for k, v in flipped.items()])
    assert not b["holds"] and b["verdict"].startswith("does not hold at this scale:")


def test_pareto_front_and_verdict():
    pts = [(1.0, 5.0, "a"), (2.0, 4.0, "b"), (2.0, 4.5, "c"), (3.0, 4.0, "d"), (0.5, 6.0, "e")]
    assert pareto_front(pts) == ["a", "b", "e"]
    results = [result("fixed", 4.0, flops=10.0, source=None, tau=None)]
    for s in SOURCES:
        for t in PARETO_TAUS:  # later tau: cheaper, a bit worse; deeper sources: dearer, a bit worse
            results.append(
                result(f"{s}L-tau{t}", 4.0 + 0.1 * t + 0.01 * s, flops=5.0 + s - 3 * t, source=s, tau=t)
            )
    a = pareto_analyse(results)
    assert a["holds"] and "3 from 0 layers" in a["verdict"] and "plus fixed-size" in a["verdict"]
    on_front = {r["trial"] for r in a["rows"] if r["on front"]}
    assert on_front == {"0L-tau0.2", "0L-tau0.5", "0L-tau0.7", "fixed"}


def sweep_curves(shift_per_tau: float):
    """Fixed: 3 + 4 e^{-t/8000}. Expanded at tau: an excess 0.5 e^{-(t - tau)/2000} decaying over ~2k tokens,
    optionally slower for later tau (cosine-like)."""
    t = np.arange(0, 40_001, 500.0)
    fixed = 3 + 4 * np.exp(-t / 8000)
    runs = []
    for sched in ("wsd", "cosine"):
        runs.append(
            result(f"{sched}-fixed", fixed[-1], flops=1.0, curve=[[x, y, 0] for x, y in zip(t, fixed)])
        )
        for tau in TAUS:
            tau_t = tau * 40_000
            scale = 2000 * (1 + (shift_per_tau * tau * 10 if sched == "cosine" else 0))
            excess = np.where(t >= tau_t, 0.5 * np.exp(-(t - tau_t) / scale), 0.8)
            curve = fixed + excess
            runs.append(
                result(
                    f"{sched}-tau{tau:.1f}",
                    curve[-1],
                    flops=0.5,
                    expansions=[tau_t],
                    curve=[[x, y, 0] for x, y in zip(t, curve)],
                )
            )
    return runs


def test_schedule_sweep_reads_t_mix_and_the_latest_catching_tau():
    runs = sweep_curves(shift_per_tau=1.0)
    a = sweep_analyse(runs)
    rows = {(r["schedule"], r["tau"]): r for r in a["rows"]}
    wsd_tmix = [rows[("wsd", t)]["t_mix (tokens)"] for t in TAUS if t <= 0.6]
    assert all(v is not None for v in wsd_tmix) and max(wsd_tmix) - min(wsd_tmix) <= 1000
    # analytic: 0.5 e^{-x/2000} <= 1% of ~3.x (plus EMA lag): a few thousand tokens
    assert 4000 <= float(np.median(wsd_tmix)) <= 12000
    assert "Takeaway 6 holds" in a["verdict"]
    # cosine mixes ever more slowly: its late taus do not catch up at the end
    assert rows[("cosine", 0.8)]["gap vs fixed"] > rows[("wsd", 0.8)]["gap vs fixed"]
    assert "Takeaway 4 holds" in a["verdict"] and a["holds"]


def test_mixing_tokens_none_without_expansion():
    assert mixing_tokens(result("x", 1.0, curve=[[0, 1, 0]]), result("f", 1.0, curve=[[0, 1, 0]])) is None


def test_markdown_table_formats_gaps_as_percent():
    md = markdown_table(
        [{"trial": "a", "gap vs fixed": 0.0123, "FLOPs vs fixed": 0.5, "final val loss": 4.2}]
    )
    assert "| a | +1.23% | 50.0% | 4.2000 |" in md


def test_sweep_doubles_the_cosine_lr_as_the_paper_and_says_so():
    from progrow_ray.repro.experiments import sweep_trials

    scale = SCALES["cpu-tiny"]
    specs = {s.id: s for s in sweep_trials(scale)}
    wsd_lr = scale.lm.optimizer.lr
    assert all(s.run.optimizer.lr == wsd_lr for k, s in specs.items() if k.startswith("wsd"))
    assert all(s.run.optimizer.lr == 2 * wsd_lr for k, s in specs.items() if k.startswith("cosine"))
    runs = sweep_curves(shift_per_tau=1.0)
    for r in runs:
        r["meta"]["lr"] = 2 * wsd_lr if r["id"].startswith("cosine") else wsd_lr
    a = sweep_analyse(runs)
    assert any("twice WSD's" in n for n in a["notes"]) and {r["lr"] for r in a["rows"]} == {
        wsd_lr,
        2 * wsd_lr,
    }
    old = sweep_analyse(sweep_curves(shift_per_tau=1.0))  # results recorded before: said, not hidden
    assert any("WSD's learning rate" in n for n in old["notes"])


def test_reanalysis_counts_the_papers_flops_for_old_results():
    """Results recorded before the paper's count existed get it from their regenerated specs."""
    from progrow_ray.repro.__main__ import fill_paper_flops

    exp = EXPERIMENTS["batch-after-expansion"]
    tokens = 4096
    trials = [
        {**result("fixed", 4.0, flops=9.0, batch_after=None), "tokens": tokens},
        result("batch-1x", 4.1, flops=6.0, expansions=[2048], batch_after=512),
    ]
    for t in trials:
        del t["flops_paper"]
    saved = {
        "scale": "cpu-tiny",
        "meta": {
            "command": f"python -m progrow_ray.repro batch-after-expansion --scale cpu-tiny --tokens {tokens}"
        },
        "trials": trials,
    }
    fill_paper_flops(exp, saved)
    cfg = {k: v for k, v in SCALES["cpu-tiny"].lm.model.items() if k != "kind"}
    from progrow_ray.core.models import GPTConfig

    large = GPTConfig(**cfg, block_size=SCALES["cpu-tiny"].lm.data.seq_len)
    per = large.train_flops_per_unit(convention="paper")
    assert trials[0]["flops_paper"] == pytest.approx(per * tokens)
    assert trials[1]["flops_paper"] == pytest.approx(
        per * 2048
    )  # zero-layer source: no non-embedding weights
    assert large.with_depth(0).train_flops_per_unit(convention="paper") == 0
    four = {
        **result("batch-4x", 4.1, flops=6.0, expansions=[2048], batch_after=2048),
        "flops_paper": per * 2048,
    }
    row = exp.analyse(trials + [four])["rows"]
    assert {r["trial"]: r["FLOPs vs fixed (paper eq. 1.1)"] for r in row}["batch-1x"] == pytest.approx(0.5)


def test_index_keeps_the_hand_written_notes(tmp_path):
    import json

    from progrow_ray.repro.__main__ import write_index

    d = tmp_path / "resnet"
    d.mkdir()
    (d / "results.json").write_text(
        json.dumps(
            {
                "holds": True,
                "verdict": "holds: x",
                "meta": {"trials": 2, "wall_s": 3.0, "machine": "m", "date": "d"},
            }
        )
    )
    (tmp_path / "README.md").write_text("# old table\n\n## Notes\n\nre-analysed, not re-trained\n")
    text = write_index(tmp_path).read_text()
    assert "| [resnet](resnet/resnet.md) |" in text and "old table" not in text
    assert text.endswith("## Notes\n\nre-analysed, not re-trained\n")
