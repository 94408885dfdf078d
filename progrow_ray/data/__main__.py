"""``python -m progrow_ray.data prepare --source SRC --out DST``."""

from __future__ import annotations

import argparse
import sys

from ..cli import run_cli
from .prepare import PrepareSettings, prepare


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
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = PrepareSettings(args.val_fraction, args.shard_tokens, args.max_source_bytes)
    prepare(args.source, args.out, settings, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
