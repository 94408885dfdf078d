"""Benchmarks that report ratios against a reference measured in the same run.

``python -m progrow_ray.bench throughput --device cpu --model tiny [--optimizer adamw|muon_nsgd|both]
[--json]``
    Tokens/s (and MFU on CUDA) of the engine's train step vs a nanoGPT-style reference loop in this
    file's sibling ``reference.py``; interleaved repeats, medians.

``python -m progrow_ray.bench optimizer --world 1,2,4 [--model tiny|gpt2-124m] [--parallel fsdp|ddp]``
    The Muon-NSGD step per rank on 1, 2, 4 ... ranks (owners share the Newton–Schulz work), wall-clock and
    CPU time, as ratios to the first world size (``optimizer.py``).

``python -m progrow_ray.bench stopper [--points 500000]``
    The τ search's stopper: total CPU for the reported points of three probes, against the old
    recompute-everything stopper measured at a few sizes in the same run (``stopper.py``).

``python -m progrow_ray.bench prepare [--mb 96] [--repeat 3] [--no-ray]``
    ``data prepare`` tokens/s: one process, every local core, Ray Data on a local cluster; ratios to one
    process, and whether the engines wrote identical shards (``prepare.py``).

``python -m progrow_ray.bench savings --config jobs/smoke.yaml --taus 0.25,0.5,0.8 [--json]``
    A fixed-size run and one progressive run per τ through the engine: final val loss, relative gap
    and FLOPs fraction per τ.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ..cli import run_cli
from .shapes import SHAPES

# No torch here: ``bench prepare``'s tokeniser processes are spawned, and each imports this module again.


def savings(args) -> dict:
    from ..data.prepare import prepare_run_data
    from ..engine.trainer import Trainer
    from ..orchestration.config import load_single_run

    taus = [float(t) for t in args.taus.split(",")]
    base = load_single_run(args.config, args.set + [f"out={args.out}"])
    prepare_run_data(base.data, log=lambda _: None)

    def one(name: str, **growth) -> dict:
        cfg = replace(base, name=name, growth=replace(base.growth, **growth))
        cfg.validate()
        result = Trainer(cfg, log=lambda _: None).run(progress_bar=not args.json)
        return {"val_loss": result.val_loss, "flops": result.flops, "wall_s": result.wall_s}

    fixed = one("savings-fixed", enabled=False)
    rows = []
    for tau in taus:
        r = one(f"savings-tau{tau:g}", enabled=True, tau_frac=tau, tau_tokens=None)
        rows.append(
            {
                "tau_frac": tau,
                **r,
                "loss_gap_rel": (r["val_loss"] - fixed["val_loss"]) / fixed["val_loss"],
                "flops_fraction": r["flops"] / fixed["flops"],
            }
        )
    return {"config": args.config, "fixed": fixed, "progressive": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="engine train step vs a nanoGPT-style reference loop")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    t.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "muon_nsgd", "both"])
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    t.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument(
        "--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H100 measured: 790)"
    )
    t.add_argument("--json", action="store_true")
    o = sub.add_parser("optimizer", help="the Muon-NSGD step per rank on 1, 2, 4 ... ranks")
    o.add_argument("--world", default="1,2,4", help="world sizes, comma-separated")
    o.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    o.add_argument("--seq", type=int, default=256, help="context (the position embedding's rows)")
    o.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp"])
    o.add_argument("--steps", type=int, default=5)
    o.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    o.add_argument("--json", action="store_true")
    s = sub.add_parser("savings", help="fixed vs progressive through the engine, per tau")
    s.add_argument("--config", default="jobs/smoke.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--taus", default="0.25,0.5,0.8")
    s.add_argument("--out", default="runs/bench-savings")
    s.add_argument("--json", action="store_true")
    st = sub.add_parser("stopper", help="the tau search's stopper: CPU per reported point")
    st.add_argument("--points", type=int, default=500_000)
    st.add_argument("--json", action="store_true")
    pr = sub.add_parser("prepare", help="data prepare tokens/s: one process, all cores, Ray Data")
    pr.add_argument(
        "--mb", type=float, default=96.0, help="MB of source text (copies of the standard library's)"
    )
    pr.add_argument("--no-ray", action="store_true")
    pr.add_argument("--repeat", type=int, default=3, help="local engines: alternate runs, best time of each")
    pr.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from .prepare import prepare_bench

        result = prepare_bench(args.mb, ray_data=not args.no_ray, repeat=args.repeat)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"data prepare, {result['source_mb']:g} MB of source, {result['cores']} cores, "
                f"best of {result['repeat']} alternate runs (Ray Data: one)"
            )
            for r in result["rows"]:
                print(
                    f"{r['engine']:>22}: {r['tokens_per_s'] / 1e6:6.2f} M tokens/s "
                    f"({r['tokens']:,} in {r['seconds']:.2f} s; runs "
                    f"{', '.join(f'{x:.2f}' for x in r['runs'])} s), {r['vs_one_process']:.2f}x one process"
                )
            print(f"shards identical across engines: {result['identical']}")
        return 0
    if args.command == "stopper":
        from .stopper import stopper_bench

        result = stopper_bench(args.points)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"stopper: {result['points']:,} reported points in {result['stopper_cpu_s']:.3f} s CPU "
                f"({result['us_per_point']:.2f} us per point; {result['judged']:,} judged, "
                f"mixed: {result['mixed']})"
            )
            calls = ", ".join(
                f"{int(n):,} points {c * 1e3:.1f} ms" for n, c in result["reference_call_s"].items()
            )
            print(
                f"reference (t_mix over every point at each report): {calls} per call (~n^"
                f"{result['reference_growth_exponent']:.2f}); about "
                f"{result['reference_total_s_estimated']:,.0f} s "
                f"for the same run: {result['speedup']:,.0f}x"
            )
        return 0
    if args.command == "optimizer":
        from .optimizer import optimizer_bench

        result = optimizer_bench(args)
    else:
        from .throughput import throughput

        result = throughput(args) if args.command == "throughput" else savings(args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "optimizer":
        print(
            f"Muon-NSGD step, {result['model']}, {result['parallel']}, "
            f"{result['threads_per_rank']} thread(s) per rank (slowest rank, median)"
        )
        print(f"{'ranks':>5} {'wall s':>9} {'vs 1st':>7} {'CPU s':>9} {'vs 1st':>7}")
        for r in result["rows"]:
            print(
                f"{r['world']:>5} {r['step_s']:>9.4f} {r['vs_first_wall']:>6.2f}x "
                f"{r['step_cpu_s']:>9.4f} {r['vs_first_cpu']:>6.2f}x"
            )
    elif args.command == "throughput":
        for k, v in result.items():
            print(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")
    else:
        f = result["fixed"]
        print(f"fixed-size: val loss {f['val_loss']:.4f}, FLOPs {f['flops']:.3e}")
        print(f"{'tau/T':>6} {'val loss':>9} {'gap':>8} {'FLOPs':>7}")
        for r in result["progressive"]:
            print(
                f"{r['tau_frac']:>6.2f} {r['val_loss']:>9.4f} {r['loss_gap_rel']:>+8.2%} "
                f"{r['flops_fraction']:>7.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
