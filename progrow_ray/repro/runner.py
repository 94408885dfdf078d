"""Run an experiment's trials as one Ray Tune grid (trials in parallel as the cluster's resources
allow), or in-process one after another (``--runner local``: a GPU machine without Ray)."""

from __future__ import annotations

import json


def tune_trainable(config: dict, specs: dict) -> None:
    from ray import tune

    from .trial import run_trial

    result = run_trial(specs[config["trial"]], threads=int(config["threads"]))
    tune.report({"val_loss": result["val_loss"], "flops": result["flops"], "result_json": json.dumps(result)})


def run_with_tune(
    specs: list, *, name: str, storage_path: str, cpus: float, gpus: float, log=print
) -> list[dict]:
    from ray import tune

    # the grid runs over trial ids (Tune's config stays plain JSON); the typed specs travel with the trainable
    by_id = {s.id: s for s in specs}
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, specs=by_id), {"cpu": cpus, "gpu": gpus}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(by_id)), "threads": max(1, int(cpus))},
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: f"{t.trial_id}-{t.config['trial']}"),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0),
    )
    log(f"{name}: {len(specs)} trials on Ray Tune ({cpus:g} CPU, {gpus:g} GPU each)")
    grid = tuner.fit()
    results, failed = [], []
    for res in grid:
        if res.error or not res.metrics or "result_json" not in res.metrics:
            failed.append(f"{res.config['trial']}: {res.error}")
            continue
        results.append(json.loads(res.metrics["result_json"]))
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} trial(s) failed: " + "; ".join(failed))
    order = {s.id: i for i, s in enumerate(specs)}
    return sorted(results, key=lambda r: order[r["id"]])


def run_local(specs: list, *, name: str, threads: int, device: str | None = None, log=print) -> list[dict]:
    from .trial import run_trial

    results = []
    for i, spec in enumerate(specs):
        r = run_trial(spec, threads=threads, device=device)
        loss = f"val loss {r['val_loss']:.4f}" if r["val_loss"] is not None else "done"
        log(f"{name}: [{i + 1}/{len(specs)}] {spec.id}: {loss} ({r['wall_s']:.0f} s)")
        results.append(r)
    return results
