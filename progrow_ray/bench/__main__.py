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

``python -m progrow_ray.bench prepare [--mb 12] [--no-ray]``
    ``data prepare`` tokens/s: one process, every local core, Ray Data on a local cluster; ratios to one
    process, and whether the engines wrote identical shards (``prepare.py``).

``python -m progrow_ray.bench savings --config jobs/smoke.yaml --taus 0.25,0.5,0.8 [--json]``
    A fixed-size run and one progressive run per τ through the engine: final val loss, relative gap
    and FLOPs fraction per τ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from ..cli import run_cli
from ..core.errors import require
from ..core.models import GPTConfig, build_model
from ..core.optim import build_optimizer, set_lr
from ..core.schedule import WSD, step_lr
from ..engine.step import autocast_for, plan_batch, train_step
from .reference import RefGPT, reference_step

SHAPES = {
    "tiny": dict(n_layer=4, n_embd=128, head_dim=64),
    "gpt2-124m": dict(n_layer=12, n_embd=768, head_dim=64),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fused_ok(device: torch.device) -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def reference_optimizer(model: torch.nn.Module, device: torch.device):
    """nanoGPT's configure_optimizers: decay >= 2-D, lr 6e-4, betas (0.9, 0.95), fused where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=_fused_ok(device))


def throughput(args) -> dict:
    device = torch.device(args.device)
    require(device.type != "cuda" or torch.cuda.is_available(), "--device cuda but no CUDA device is visible")
    require(args.batch % args.accum == 0, "--batch must be a multiple of --accum")
    torch.manual_seed(0)
    compile_ = device.type == "cuda" if args.compile == "auto" else args.compile == "on"
    cfg = GPTConfig(vocab_size=50304, block_size=args.seq, **SHAPES[args.model])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = lambda: autocast_for(device, args.dtype)  # noqa: E731
    pool = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1)) for _ in range(4)]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in pool]
    tokens_per_step = args.batch * args.seq
    schedule = WSD(10**12)

    runners = {}
    plan = plan_batch(args.batch, args.batch // args.accum, rank=0, world=1, same_count=False)
    optimizers = ["adamw", "muon_nsgd"] if args.optimizer == "both" else [args.optimizer]
    for name in optimizers:
        model = build_model(cfg).to(device)
        opt = build_optimizer(model, name, lr=0.01 if name == "muon_nsgd" else 6e-4)
        step_model = torch.compile(model) if compile_ else model
        state = {"tokens": 0}

        def engine(x, y, model=step_model, opt=opt, state=state):
            set_lr(opt, step_lr(schedule, 0.01, state["tokens"], tokens_per_step))
            state["tokens"] += tokens_per_step
            return train_step(model, opt, x, y, plan, device, autocast)

        runners[f"engine:{name}"] = engine
    ref_model = RefGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.n_head).to(device)
    ref_opt = reference_optimizer(ref_model, device)
    ref_step_model = torch.compile(ref_model) if compile_ else ref_model

    def reference(x, y):
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return reference_step(ref_step_model, ref_opt, x, y, args.accum, autocast)

    runners["reference"] = reference

    def timed(fn, steps: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            loss = fn(*batches[i % len(batches)])
        _sync(device)
        require(torch.isfinite(loss).item(), "benchmark produced a non-finite loss")
        return steps * tokens_per_step / (time.perf_counter() - t0)

    for fn in runners.values():  # warm-up (and compilation) outside the timings
        timed(fn, args.warmup)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(args.repeats):  # interleaved, alternating order, so drift hits everyone alike
        for k in order if r % 2 == 0 else order[::-1]:
            rates[k].append(timed(runners[k], args.steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    main = f"engine:{optimizers[-1] if args.optimizer != 'both' else 'adamw'}"
    flops_per_token = cfg.train_flops_per_unit(seq_len=args.seq)
    peak = args.peak_tflops * 1e12 if device.type == "cuda" else None
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "optimizer": args.optimizer,
        "batch": args.batch,
        "seq": args.seq,
        "accum": args.accum,
        "compile": compile_,
        "dtype": "bfloat16" if device.type == "cuda" and args.dtype != "float32" else args.dtype,
        "tokens_per_s": med[main],
        "reference_tokens_per_s": med["reference"],
        "ratio": med[main] / med["reference"],
        "mfu": (med[main] * flops_per_token / peak) if peak else None,
        "reference_mfu": (med["reference"] * flops_per_token / peak) if peak else None,
        "flops_per_token": flops_per_token,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "torch": torch.__version__,
    }
    if args.optimizer == "both":
        out["muon_nsgd_tokens_per_s"] = med["engine:muon_nsgd"]
        out["muon_nsgd_step_time_over_adamw"] = med["engine:adamw"] / med["engine:muon_nsgd"]
    return out


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
    pr.add_argument("--mb", type=float, default=12.0, help="MB of source text (the standard library's)")
    pr.add_argument("--no-ray", action="store_true")
    pr.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from .prepare import prepare_bench

        result = prepare_bench(args.mb, ray_data=not args.no_ray)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"data prepare, {result['source_mb']:g} MB of source, {result['cores']} cores")
            for r in result["rows"]:
                print(
                    f"{r['engine']:>22}: {r['tokens_per_s'] / 1e6:6.2f} M tokens/s "
                    f"({r['tokens']:,} in {r['seconds']:.1f} s), {r['vs_one_process']:.2f}x one process"
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
