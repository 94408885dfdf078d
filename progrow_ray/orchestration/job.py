"""The pipeline as a job on the driver: checks that fail in seconds, the data stage, the console and its
log file, Ray for the job's duration, the stages, and the closing summary."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from ..cli import RunFailed
from ..console import Console
from ..core.errors import ConfigError
from ..integrations.storage import check_writable, is_s3, join, read_json, write_bytes
from ..integrations.tracking import comparison_url, default_tracking_uri
from ..report import summary_table
from .cluster import RaySession, check_capacity
from .config import PipelineConfig
from .preflight import check_memory
from .stages import check_same_run, data_stage, open_run, plan_tau_search, read_state, run_root, run_stages


def absolutize(cfg: PipelineConfig) -> PipelineConfig:
    """Workers run in other directories (and on other nodes): local paths must be absolute."""
    from dataclasses import replace

    from ..data.images import SYNTHETIC_IMAGES

    data = cfg.data
    if "://" not in data.uri:
        data = replace(data, uri=os.path.abspath(data.uri))
    if data.source not in ("stdlib", SYNTHETIC_IMAGES) and "://" not in data.source:  # named sources stay
        data = replace(data, source=os.path.abspath(data.source))
    out = cfg.out if is_s3(cfg.out) else os.path.abspath(cfg.out)
    return replace(cfg, data=data, out=out)


def log_path_for(cfg: PipelineConfig) -> str:
    """The run's log file: in the run directory when it is local, else a local file (S3 gets a copy)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = (
        run_root(cfg) if not is_s3(cfg.out) else os.path.join(tempfile.gettempdir(), "progrow_ray", cfg.name)
    )
    return os.path.join(base, "logs", f"pipeline-{stamp}.log")


def run_job(
    cfg: PipelineConfig,
    *,
    label: str,
    address: str | None = None,
    mlflow_uri: str | None = None,
    verbose: bool = False,
) -> int:
    """``python -m progrow_ray.pipeline``'s body: the run ``cfg`` from start (or from where it stopped)
    to its report."""
    cfg = absolutize(cfg)
    started = time.time()
    print(f"progrow_ray pipeline: {cfg.name} ({label}) -> {run_root(cfg)}", flush=True)
    if cfg.ray.use_gpu:  # every phase must fit its GPUs: refused now, not out of memory at τ
        check_memory(cfg)
    check_writable(cfg.out)  # cheap, so first: an unreachable store fails in seconds
    # the data is checked (and prepared once) before anything of the run is written
    data_stage(cfg, log=lambda m: print(f"data: {m}", flush=True))
    state = read_state(cfg)
    check_same_run(cfg, state.state)
    if state.state.done:
        print(f"run {cfg.name!r} already finished; its report: {join(run_root(cfg), 'report.json')}")
        print_summary(read_json(join(run_root(cfg), "report.json")), cfg, started)
        return 0
    if cfg.tune.enabled and state.state.tau_search is None and state.state.search_plan is None:
        # priced before anything trains: refused (exit 2) when it cannot fit its budget
        for line in plan_tau_search(cfg).lines():
            print(f"τ search: {line}", flush=True)
    log_path = log_path_for(cfg)
    console = Console(log_path, verbose=verbose)
    run_started = False
    try:
        with console:
            console.info(
                f"log: {log_path}" + ("" if verbose else " (Ray's own output; --verbose shows it here)")
            )
            # inside the console: what Ray prints while shutting down goes to the log too
            with RaySession(
                address or cfg.ray.address, cfg.ray.local_cpus, console, cfg.ray.worker_start_timeout_s
            ) as ray_session:
                check_capacity(cfg, ray_session.local)
                run_started = True
                run = open_run(
                    cfg, console, default_tracking_uri(mlflow_uri or cfg.mlflow.tracking_uri, cfg.out)
                )
                report = run_stages(run)
    except ConfigError:
        if not run_started:  # a refused run leaves nothing behind, not even its log
            remove_log(log_path)
        raise
    except Exception as e:  # noqa: BLE001  (one line for the user; the traceback is in the log)
        import traceback

        with open(log_path, "a") as fh:
            traceback.print_exc(file=fh)
        raise RunFailed(f"{type(e).__name__}: {e}".splitlines()[0] + f" (full log: {log_path})") from e
    finally:
        if run_started and is_s3(cfg.out):
            upload_log(log_path, join(run_root(cfg), "logs", os.path.basename(log_path)))
    print_summary(report.to_json(), cfg, started)
    return 0


def remove_log(log_path: str) -> None:
    Path(log_path).unlink(missing_ok=True)
    for d in (Path(log_path).parent, Path(log_path).parent.parent):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def upload_log(local: str, remote: str) -> None:
    """S3 runs keep their log beside the report, also when they failed; never changes the outcome."""
    try:
        write_bytes(remote, Path(local).read_bytes())
    except Exception as e:  # noqa: BLE001
        print(
            f"warning: could not copy the run log to {remote} ({type(e).__name__}); it stays at {local}",
            file=sys.stderr,
        )


def print_summary(report: dict, cfg: PipelineConfig, started: float) -> None:
    print(f"\nsummary ({time.time() - started:.0f} s):")
    print(summary_table(report, join(run_root(cfg), "report.json")))
    uri, exp = report["mlflow"]["tracking_uri"], report["mlflow"]["experiment_id"]
    if uri.startswith("sqlite:"):
        print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        base = "http://127.0.0.1:5000"
    else:
        print(f"\nMLflow runs: {uri} (experiment {exp})")
        base = uri
    if exp is not None:
        print(f"compare progressive vs baseline on FLOPs: {comparison_url(base, exp)}")
