"""``python -m progrow_ray.tmix list|show|add|forget``: the mixing-time registry.

    list   [--config JOB | --registry URI]           one line per fingerprint: its newest t_mix
    show   KEY [--config JOB | --registry URI]       the fingerprint, every measurement and its outcomes
    add    --config JOB --t-mix TOKENS [--width W]   seed a measured value for JOB's fingerprint
    forget KEY [--measurement ID] [...]              remove an entry, or one measurement

The registry is ``tune.registry`` of the config (default ``<out>/tmix-registry``) or ``--registry``.
A pipeline whose fingerprint matches an entry (``tune.reuse: auto``) uses its newest t_mix and skips the
search (``orchestration/tmix_registry.py``).
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import run_cli
from .core.errors import require
from .engine.config import load_run_config
from .orchestration.config import PipelineConfig
from .orchestration.tmix_registry import Registry, fingerprint, registry_uri


def _registry(args) -> tuple[Registry, PipelineConfig | None]:
    require(bool(args.config) or bool(args.registry), "give --config JOB.yaml or --registry URI")
    cfg = load_run_config(args.config, args.set, cls=PipelineConfig) if args.config else None
    return Registry(args.registry or registry_uri(cfg)), cfg


def _depths(fp: dict) -> str:
    return " -> ".join(str(d) for d in fp["depths"])


def cmd_list(args) -> int:
    registry, _ = _registry(args)
    entries = registry.entries()
    if not entries:
        print(f"{registry.uri}: no entries")
        return 0
    print(f"{registry.uri}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    print(
        f"{'key':12} {'family':7} {'depths':>9} {'lr':>8} {'batch':>9} {'t_mix':>16} {'width':>6} "
        f"{'n':>3}  source"
    )
    for e in entries:
        fp, ms = e["fingerprint"], e["measurements"]
        last = ms[-1] if ms else {}
        t = last.get("t_mix_tokens")
        shown = (
            f"{t:,}" if t is not None else f">{last.get('cap_tokens', 0) - last.get('expand_at_tokens', 0):,}"
        )
        print(
            f"{e['key']:12} {fp['family']:7} {_depths(fp):>9} {fp['optimizer']['lr']:>8.3g} "
            f"{fp['batch_tokens']:>9,} {shown:>16} {last.get('probe_width', '?')!s:>6} {len(ms):>3}  "
            f"{last.get('source', '?')} {last.get('run', '')} {last.get('time', '')[:10]}"
        )
    return 0


def cmd_show(args) -> int:
    registry, _ = _registry(args)
    entry = registry.get(args.key)
    require(entry is not None, f"no registry entry {args.key!r} in {registry.uri}")
    print(json.dumps(entry, indent=2))
    return 0


def cmd_add(args) -> int:
    require(bool(args.config), "add needs --config JOB.yaml (the fingerprint is the job's)")
    registry, cfg = _registry(args)
    require(args.t_mix > 0, f"--t-mix must be > 0, got {args.t_mix}")
    target = cfg.target_model_config()
    field = type(target).width_field
    width = args.width or getattr(target, field)
    fp = fingerprint(cfg)
    key, mid = registry.record(
        fp,
        t_mix_tokens=int(args.t_mix),
        gap_after_mix_rel=None,
        cap_tokens=None,
        expand_at_tokens=None,
        probe_width=width,
        target_width=getattr(target, field),
        width_field=field,
        source="seeded",
        run=cfg.name,
        note=args.note,
    )
    print(f"{registry.uri}: {key}/{mid} t_mix {int(args.t_mix):,} for {cfg.name}'s fingerprint")
    return 0


def cmd_forget(args) -> int:
    registry, _ = _registry(args)
    gone = registry.forget(args.key, args.measurement)
    require(gone > 0, f"nothing to forget: {args.key}{'/' + args.measurement if args.measurement else ''}")
    print(f"{registry.uri}: forgot {gone} measurement(s) of {args.key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.tmix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def where(p):
        p.add_argument(
            "--config", help="a job YAML: the registry is its tune.registry (or <out>/tmix-registry)"
        )
        p.add_argument("--registry", help="the registry's location (local dir or s3://)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        return p

    where(sub.add_parser("list", help="one line per fingerprint")).set_defaults(fn=cmd_list)
    p = where(sub.add_parser("show", help="an entry in full"))
    p.add_argument("key")
    p.set_defaults(fn=cmd_show)
    p = where(sub.add_parser("add", help="seed a measured t_mix for a job's fingerprint"))
    p.add_argument(
        "--t-mix", type=float, required=True, help="tokens (images for ResNet) after the expansion"
    )
    p.add_argument(
        "--width", type=int, default=None, help="the width it was measured at (default: the target's)"
    )
    p.add_argument("--note", default="", help="where the value comes from")
    p.set_defaults(fn=cmd_add)
    p = where(sub.add_parser("forget", help="remove an entry or one measurement"))
    p.add_argument("key")
    p.add_argument("--measurement", default=None)
    p.set_defaults(fn=cmd_forget)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
