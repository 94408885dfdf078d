"""``python -m progrow_ray.repro LIST | NAME | all [--scale cpu-tiny|gpu-small|paper] [--out DIR]``

Reproduces one of the paper's takeaways: the experiment's trials as one Ray Tune grid, then a
Markdown table with a verdict computed from the numbers, PNG plots, results.json, and an MLflow
parent run (one child per trial, metrics by step / tokens / FLOPs, the table and plots as artifacts).
``--runner local`` runs the same trials in-process, one after another (machines without Ray).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from ..cli import run_cli
from ..core.errors import require
from .experiments import EXPERIMENTS
from .scales import SCALES
from .trial import TrialSpec


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


def absolute_data(specs: list[TrialSpec], data_uri: str | None) -> list[TrialSpec]:
    """Token trials read ``data_uri`` (default: the scale's), as an absolute path: Ray trials run
    elsewhere."""
    out = []
    for s in specs:
        uri = data_uri or (s.run.data.uri if s.run is not None else "")
        out.append(s.with_data_uri(uri if "://" in uri else os.path.abspath(uri)))
    return out


def prepare(specs: list[TrialSpec], log) -> None:
    from ..data.prepare import prepare_run_data

    tokens = [s for s in specs if s.kind == "tokens"]
    if tokens:
        prepare_run_data(tokens[0].run.data, log=log)


def track(
    uri: str,
    name: str,
    scale: str,
    specs: list[TrialSpec],
    results: list[dict],
    analysis: dict,
    files: dict,
    log,
) -> dict:
    from dataclasses import asdict

    from ..engine.config import to_dict
    from ..integrations.tracking import Tracker

    tracker = Tracker(uri, "progrow_ray-repro", log=log)
    parent = tracker.start_run(
        f"{name} [{scale}]",
        tags={
            "progrow.kind": "repro",
            "progrow.experiment": name,
            "progrow.scale": scale,
            "progrow.verdict": analysis["verdict"][:500],
        },
        params={"experiment": name, "scale": scale, "trials": len(specs)},
    )
    for spec, r in zip(specs, results):
        params = to_dict(spec.run) if spec.run is not None else asdict(spec.spectral)
        rid = tracker.start_run(
            r["id"],
            parent_id=parent,
            params=params,
            tags={"progrow.phase": "repro-trial", **{f"progrow.{k}": v for k, v in r["meta"].items()}},
        )
        tracker.log_history(rid, trial_events(r))
        if r.get("val_loss") is not None:
            tracker.log_metrics(rid, {"final_val_loss": r["val_loss"], "flops_total": r["flops"]})
        tracker.end(rid)
    tracker.log_files(parent, files)
    tracker.log_metrics(parent, {"holds": 1.0 if analysis["holds"] else 0.0})
    tracker.end(parent)
    return {"tracking_uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent}


def trial_events(r: dict) -> list[dict]:
    """A trial's curves (``[tokens, loss, flops]`` rows) as engine metric events, for the tracker."""
    events = [
        {"event": "train", "step": i, "tokens": t, "flops": f, "train_loss": loss}
        for i, (t, loss, f) in enumerate(r["curve"])
    ]
    return events + [
        {"event": "eval", "step": len(r["curve"]), "tokens": t, "flops": f, "val_loss": loss}
        for t, loss, f in r["evals"]
    ]


def resized(scale, tokens: int | None):
    """The scale with ``tokens`` per language-model run (and as many images per ResNet run): quick looks."""
    from dataclasses import replace

    if not tokens:
        return scale
    train, images = scale.lm.train, scale.image.train
    require(
        tokens % train.batch_tokens == 0 and tokens >= 8 * train.batch_tokens,
        f"--tokens must be a multiple of the scale's batch ({train.batch_tokens:,} tokens) and >= 8 batches",
    )
    lm = replace(scale.lm, train=replace(train, total_tokens=tokens, eval_every_tokens=tokens // 4))
    batch = images.batch_tokens
    image = replace(
        scale.image,
        train=replace(
            images,
            total_tokens=tokens // batch * batch,
            eval_every_tokens=max(batch, tokens // 4 // batch * batch),
        ),
    )
    return replace(scale, lm=lm, image=image)


def write_outputs(
    exp, scale: str, analysis: dict, meta: dict, results: list[dict], out: Path
) -> dict[str, bytes]:
    from .render import plot_png, report_markdown

    meta = {**meta, "plot_files": [f"{exp.name}-{i + 1}.png" for i in range(len(analysis["plots"]))]}
    files = {f"{exp.name}.md": report_markdown(exp, scale, analysis, meta).encode()}
    files.update({f: plot_png(p) for f, p in zip(meta["plot_files"], analysis["plots"])})
    files["results.json"] = json.dumps(
        {
            "experiment": exp.name,
            "scale": scale,
            "meta": meta,
            "verdict": analysis["verdict"],
            "holds": analysis["holds"],
            "rows": analysis["rows"],
            "trials": results,
        },
        default=str,
    ).encode()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{exp.name}-*.png"):  # plots of an earlier analysis
        old.unlink()
    for fname, data in files.items():
        (out / fname).write_bytes(data)
    return files


def fill_paper_flops(exp, saved: dict) -> None:
    """Trials recorded before the paper's FLOPs count was: count it from their regenerated specs."""
    from .trial import paper_flops

    missing = [t for t in saved["trials"] if "flops_paper" not in t]
    if not missing:
        return
    words = saved["meta"].get("command", "").split()
    tokens = int(words[words.index("--tokens") + 1]) if "--tokens" in words else None
    specs = {s.id: s for s in exp.trials(resized(SCALES[saved["scale"]], tokens))}
    for t in missing:
        t["flops_paper"] = paper_flops(specs[t["id"]], t)


def reanalyse(name: str, args, log=print) -> dict:
    """Table, plots and verdict again from a finished experiment's results.json (no training)."""
    exp, out = EXPERIMENTS[name], Path(args.out) / name
    saved = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    require(
        saved is not None, f"--reanalyse: {out / 'results.json'} does not exist; run the experiment first"
    )
    fill_paper_flops(exp, saved)
    analysis = exp.analyse(saved["trials"])
    write_outputs(exp, saved["scale"], analysis, saved["meta"], saved["trials"], out)
    log(f"{name}: {analysis['verdict']}")
    return {
        "name": name,
        "verdict": analysis["verdict"],
        "holds": analysis["holds"],
        "dir": str(out),
        "mlflow": None,
    }


def run_experiment(name: str, args, log=print) -> dict:
    exp, scale = EXPERIMENTS[name], resized(SCALES[args.scale], args.tokens)
    specs = absolute_data(exp.trials(scale), args.data_uri)
    if not args.data_uri:  # given shards are used as they are
        prepare(specs, log)
    started = time.time()
    if args.runner == "local":
        from .runner import run_local

        results = run_local(specs, name=name, threads=max(1, int(scale.cpus_per_trial)), log=log)
    else:
        from .runner import run_with_tune

        results = run_with_tune(
            specs,
            name=f"repro-{name}",
            storage_path=os.path.abspath(os.path.join(args.out, "ray")),
            cpus=scale.cpus_per_trial,
            gpus=scale.gpus_per_trial,
            log=log,
        )
    wall = time.time() - started
    analysis = exp.analyse(results)
    meta = {
        "trials": len(specs),
        "wall_s": wall,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": f"python -m progrow_ray.repro {name} --scale {args.scale}"
        + (f" --tokens {args.tokens}" if args.tokens else "")
        + (" --runner local" if args.runner == "local" else ""),
    }
    out = Path(args.out) / name
    files = write_outputs(exp, args.scale, analysis, meta, results, out)
    mlflow = None
    if not args.no_mlflow:
        from ..integrations.tracking import default_tracking_uri

        mlflow = track(
            default_tracking_uri(args.mlflow_uri, args.out),
            name,
            args.scale,
            specs,
            results,
            analysis,
            files,
            log,
        )
    log(f"{name}: {analysis['verdict']}")
    log(
        f"{name}: {out / (name + '.md')} ({wall:.0f} s)"
        + (f"; MLflow {mlflow['tracking_uri']} run {mlflow['parent_run_id']}" if mlflow else "")
    )
    return {
        "name": name,
        "verdict": analysis["verdict"],
        "holds": analysis["holds"],
        "dir": str(out),
        "mlflow": mlflow,
    }


NOTES_HEADING = "## Notes"


def write_index(out: Path) -> Path:
    """``<out>/README.md``: one row per finished experiment under ``out`` (its verdict, scale, machine,
    date)."""
    rows = []
    for name in EXPERIMENTS:
        f = out / name / "results.json"
        if f.exists():
            r = json.loads(f.read_text())
            m = r["meta"]
            rows.append(
                f"| [{name}]({name}/{name}.md) | {EXPERIMENTS[name].figure} | "
                f"{'holds' if r['holds'] else 'no'} | "
                f"{r['verdict']} | {m['trials']} | {m['wall_s']:.0f} s | {m['machine']}, {m['date']} |"
            )
    require(rows, f"no finished experiment under {out}")
    text = (
        f"# Reproduction results ({out.name})\n\nEach row links the experiment's table and plots; the "
        f"verdict is "
        "computed from the measured numbers.\n\n| experiment | paper | holds | verdict | trials | wall | "
        "machine |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    old = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    if NOTES_HEADING in old:  # hand-written notes on these results survive a new index
        text += "\n" + old[old.index(NOTES_HEADING) :]
    (out / "README.md").write_text(text)
    return out / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.repro", description=__doc__.splitlines()[0])
    parser.add_argument(
        "name", help="LIST, an experiment name, all, or index (a README.md of the results in --out)"
    )
    parser.add_argument("--scale", default="cpu-tiny", choices=sorted(SCALES))
    parser.add_argument("--out", default="runs/repro")
    parser.add_argument("--runner", default="tune", choices=["tune", "local"])
    parser.add_argument(
        "--tokens", type=int, help="tokens per run instead of the scale's (images for ResNet)"
    )
    parser.add_argument(
        "--data-uri",
        help="prepared token shards, used as they are (default: the scale's, prepared from the stdlib)",
    )
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="redo table, plots and verdict from <out>/<name>/results.json, without training",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow (machines without it)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--local-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    if args.name == "index":
        print(write_index(Path(args.out)))
        return 0
    if args.name.upper() == "LIST":
        width = max(len(n) for n in EXPERIMENTS)
        for e in EXPERIMENTS.values():
            print(f"{e.name:<{width}}  {e.figure:<34} {e.claim}")
        return 0
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    require(
        all(n in EXPERIMENTS for n in names),
        f"unknown experiment {args.name!r}; `python -m progrow_ray.repro LIST` shows: "
        f"{', '.join(EXPERIMENTS)}",
    )
    if args.reanalyse:
        for n in names:
            reanalyse(n, args)
        return 0
    if args.runner == "tune":
        from ..orchestration.cluster import RaySession

        with RaySession(args.address, args.local_cpus or os.cpu_count() or 1):
            summaries = [run_experiment(n, args) for n in names]
    else:
        summaries = [run_experiment(n, args) for n in names]
    print("\nsummary:")
    for s in summaries:
        print(f"  {s['name']:<22} {s['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
