"""``python -m progrow_ray.train --config jobs/smoke.yaml [--set key=value ...]``

One fixed-size or progressive run in one process (laptop, GPU box; no Ray). Prepares the data if
needed, resumes from the run's newest valid checkpoint, shows a progress bar and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import run_cli
from .data.prepare import prepare_run_data
from .engine.config import RunConfig
from .engine.faults import faults_from_env, maybe_inject_fault
from .engine.trainer import NonFiniteLossError, RunResult, Trainer, default_manager, run_dir
from .integrations.storage import filesystem
from .orchestration.config import load_single_run


def metrics_writer(cfg: RunConfig):
    """Append every metrics event to ``<out>/<name>/metrics.jsonl`` (what plots and reports read)."""
    fs, path = filesystem(run_dir(cfg))
    fs.makedirs(path, exist_ok=True)
    fh = fs.open(f"{path}/metrics.jsonl", "a")

    def write(m: dict) -> None:
        fh.write(json.dumps(m) + "\n")
        fh.flush()

    return write, fh


def summary_lines(result: RunResult, cfg: RunConfig) -> list[str]:
    rows = [
        ("run", cfg.name),
        (
            "depth",
            f"{result.depth}"
            + (
                f" (expanded at {result.expanded_at_tokens:,} tokens)"
                if result.expanded_at_tokens is not None
                else ""
            ),
        ),
        ("tokens", f"{result.tokens:,}"),
        ("steps", f"{result.step:,}"),
        ("train FLOPs", f"{result.flops:.3e}"),
        ("final train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-"),
        ("final val loss", f"{result.val_loss:.4f}" if result.val_loss is not None else "-"),
        ("wall time", f"{result.wall_s:.1f} s"),
        ("checkpoint", str(result.checkpoint)),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset, e.g. jobs/smoke.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--out", help="output directory (overrides `out`)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this run")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    cfg = load_single_run(args.config, overrides)
    prepare_run_data(cfg.data)
    resume = None
    if not args.fresh:
        found = default_manager(cfg).load_latest()
        if found:
            print(f"resuming from {found[0]}")
            resume = found[1]
    write, fh = metrics_writer(cfg)
    faults = faults_from_env()  # tests only (engine/faults.py)

    def on_metrics(event: dict) -> None:
        write(event)
        maybe_inject_fault(faults, "train", 0, event["tokens"])

    try:
        trainer = Trainer(cfg, resume=resume, on_metrics=on_metrics)
        result = trainer.run(progress_bar=not args.no_progress)
    except NonFiniteLossError as e:  # a setting to fix (lr, data), like any other bad input: exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        fh.close()
    print("\n".join(["summary:"] + summary_lines(result, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
