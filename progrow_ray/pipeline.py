"""``python -m progrow_ray.pipeline [--config jobs/X.yaml] [--set key=value ...] [--out DIR]``

The product's main job (also ``ray job submit -- python -m progrow_ray.pipeline ...``):
data -> τ search (Ray Tune) -> phase 1 (Ray Train, small model, few workers) -> expand + scale
-> phase 2 (more workers, larger batch) -> fixed-size baseline -> report + MLflow.

Re-running the same command (same ``name`` and ``out``) resumes: finished stages are skipped and an
interrupted phase resumes from its last committed checkpoint.

Where to read on: ``orchestration/job.py`` (the job on the driver), ``orchestration/stages.py`` (the
stages, in order), ``orchestration/phases.py`` (one Ray Train fit), ``engine/trainer.py`` (the loop).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli import run_cli
from .engine.config import load_run_config
from .orchestration.config import PipelineConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "smoke.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m progrow_ray.pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", default=None, help=f"YAML preset (default: {DEFAULT_CONFIG.name})")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--out", help="output directory or s3:// prefix (overrides `out`)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Tune's and the workers' own output on the console (else: in the log file)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .orchestration.job import run_job

    args = parse_args(argv)
    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides, cls=PipelineConfig)
    label = args.config or os.path.relpath(DEFAULT_CONFIG)
    return run_job(cfg, label=label, address=args.address, mlflow_uri=args.mlflow_uri, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(run_cli(main))
