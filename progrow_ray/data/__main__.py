"""``python -m progrow_ray.data prepare --source SRC --out DST [--engine ray|local|auto]``.

``local`` tokenises on this machine, one process per core (``--workers``); ``ray`` on Ray Data across the
cluster at ``RAY_ADDRESS`` (a local one when unset); ``auto`` (default) uses Ray when ``RAY_ADDRESS`` is
set (``ray job submit``), else local. Both write the same bytes."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import run_cli
from ..core.errors import require
from .prepare import PrepareSettings, prepare

ENGINES = ("auto", "local", "ray")


def engine_for(choice: str) -> str:
    require(choice in ENGINES, f"--engine must be one of {list(ENGINES)}, got {choice!r}")
    if choice == "auto":
        return "ray" if os.environ.get("RAY_ADDRESS") else "local"
    return choice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.data")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise a text source into uint16 GPT-2 token shards")
    p.add_argument("--source", default="stdlib",
                   help="stdlib (default), a directory or glob of .txt/.md/.jsonl/.parquet, local or s3://")
    p.add_argument("--out", required=True, help="output directory, local or s3://")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--shard-tokens", type=int, default=50_000_000)
    p.add_argument("--max-source-bytes", type=int, default=None)
    p.add_argument("--engine", default="auto", help="auto (Ray when RAY_ADDRESS is set), local or ray")
    p.add_argument("--workers", type=int, default=None, help="local engine: tokeniser processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = PrepareSettings(args.val_fraction, args.shard_tokens, args.max_source_bytes)
    engine = engine_for(args.engine)
    tokens = None
    if engine == "ray":  # the CLI sits above the layers: Ray only here, and only when asked for
        import ray

        from ..orchestration.prepare_ray import ray_tokens

        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="ERROR", log_to_driver=False)
        tokens = ray_tokens
    prepare(args.source, args.out, settings, progress=not args.no_progress, tokens=tokens, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
