"""``python -m progrow_ray.plan jobs/X.yaml [--taus ...] [--gpu h100] [--mfu 0.4] [--t-mix TOKENS]``

Prices a preset without training, and sizes its memory: FLOPs of fixed-size vs progressive training for
a range of τ, GPU-hours at a given MFU on a given GPU, and the predicted saving — from the core's FLOPs
model (6N + attention per token, active experts only for MoE, conv by conv per image for ResNet), and the
fraction under the paper's eq. 1.1 convention too (6 x non-embedding parameters per token: the "5x" of its
Figure 1). GPU-hours use the full count: it is what the GPU executes. With ``--t-mix`` it also applies the
τ planner (τ = end of stable − t_mix). Then the τ search's plan (``orchestration/search_plan.py``): the
prior t_mix, the probes' width, length and cadences, their FLOPs and the fraction of the main run, which
the pipeline refuses at start when it exceeds ``tune.search_fraction``. Last, each phase's per-GPU memory
under ddp and fsdp, and what ``train.parallel: auto`` picks (``orchestration/preflight.py``).
"""

from __future__ import annotations

import argparse
import sys

from .cli import run_cli
from .core.errors import require
from .core.flops import GPU_PEAK_TFLOPS, plan_savings
from .core.mixing import MixResult, plan_tau
from .engine.config import load_run_config
from .orchestration.config import PipelineConfig
from .orchestration.preflight import format_plan, memory_plan
from .orchestration.search_plan import Prior, choose_prior, plan_search

# Dense bf16 tensor-core peaks (vendor datasheets); H100/H200 measured here at ~790 TF/s (see README).


def plan(cfg: PipelineConfig, taus: list[float], gpu: str, mfu: float, t_mix_tokens: int | None) -> dict:
    require(gpu in GPU_PEAK_TFLOPS, f"--gpu must be one of {sorted(GPU_PEAK_TFLOPS)}, got {gpu!r}")
    require(0 < mfu <= 1, f"--mfu must be in (0, 1], got {mfu}")
    target = cfg.target_model_config()
    kw = {"seq_len": cfg.data.seq_len, "image_size": cfg.data.image_size}
    total = cfg.train.total_tokens
    rows = plan_savings(target, cfg.growth.source_depth, total, taus, **kw)
    paper_rows = plan_savings(target, cfg.growth.source_depth, total, taus, convention="paper", **kw)
    rate = GPU_PEAK_TFLOPS[gpu] * 1e12 * mfu
    sched = cfg.schedule_fn()
    source_flops, target_flops = cfg.flops_per_unit()
    out = {
        "name": cfg.name,
        "units": f"{target.unit}s",
        "total_units": total,
        "source_flops_per_unit": source_flops,
        "target_flops_per_unit": target_flops,
        "gpu": gpu,
        "mfu": mfu,
        "decay_starts_at": sched.stable_end_tokens / total,
        "rows": [
            {
                "tau_frac": r.tau_frac,
                "progressive_flops": r.progressive_flops,
                "fixed_flops": r.fixed_flops,
                "flops_fraction": r.flops_fraction,
                "speedup": r.speedup,
                "flops_fraction_paper": pr.flops_fraction,
                "speedup_paper": pr.speedup,
                "gpu_hours": r.progressive_flops / rate / 3600,
                "fixed_gpu_hours": r.fixed_flops / rate / 3600,
                "valid": r.tau_frac * total < sched.stable_end_tokens,
            }
            for r, pr in zip(rows, paper_rows)
        ],
    }
    if t_mix_tokens is not None:
        p = plan_tau(
            MixResult(True, t_mix_tokens, None, None, 0.0),
            total_tokens=total,
            warmup_tokens=sched.warmup_tokens,
            stable_end_tokens=sched.stable_end_tokens,
            small_flops_per_token=out["source_flops_per_unit"],
            large_flops_per_token=out["target_flops_per_unit"],
        )
        out["tau_plan"] = p.to_dict()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a preset, e.g. jobs/gpt2-7b-60l.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--taus", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--gpu", default="h100", help=f"one of {sorted(GPU_PEAK_TFLOPS)}")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--t-mix", type=int, default=None, help="measured mixing time in tokens (or images)")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.set, cls=PipelineConfig)
    taus = [float(t) for t in args.taus.split(",")]
    p = plan(cfg, taus, args.gpu, args.mfu, args.t_mix)
    u = p["units"]
    print(
        f"{p['name']}: {p['total_units']:,} {u}; {p['source_flops_per_unit']:.3e} (source) vs "
        f"{p['target_flops_per_unit']:.3e} (target) training FLOPs per {u[:-1]}"
    )
    print(
        f"GPU-hours on {args.gpu} at {args.mfu:.0%} MFU ({GPU_PEAK_TFLOPS[args.gpu]:.0f} TF/s dense bf16 "
        f"peak)\n"
    )
    fixed = p["rows"][0]
    print("FLOPs fraction and speedup of progressive vs fixed-size training under two counts:")
    print("  full   head + attention included: what the GPU executes (GPU-hours use it)")
    print("  paper  the paper's eq. 1.1: 6 x non-embedding parameters per token (its Figure 1 '5x')\n")
    print(f"{'':>6} {'':>11} {'---- full ----':>18} {'--- paper ---':>17}")
    print(
        f"{'tau/T':>6} {'FLOPs':>11} {'fraction':>9} {'speedup':>8} {'fraction':>9} {'speedup':>7} "
        f"{'GPU-hours':>10} {'saved GPU-h':>12}"
    )
    print(
        f"{'fixed':>6} {fixed['fixed_flops']:>11.3e} {1:>9.1%} {1:>7.2f}x {1:>9.1%} {1:>6.2f}x "
        f"{fixed['fixed_gpu_hours']:>10,.0f} {0:>12,.0f}"
    )
    for r in p["rows"]:
        note = "" if r["valid"] else "  (no stable phase left to mix in: mixing fails, paper §5.2)"
        print(
            f"{r['tau_frac']:>6.2f} {r['progressive_flops']:>11.3e} {r['flops_fraction']:>9.1%} "
            f"{r['speedup']:>7.2f}x "
            f"{r['flops_fraction_paper']:>9.1%} {r['speedup_paper']:>6.2f}x "
            f"{r['gpu_hours']:>10,.0f} {r['fixed_gpu_hours'] - r['gpu_hours']:>12,.0f}{note}"
        )
    if "tau_plan" in p:
        print(f"\nwith t_mix = {args.t_mix:,} {u}: {p['tau_plan']['verdict']}")
    print()
    if cfg.tune.enabled:
        prior = Prior(args.t_mix, "--t-mix") if args.t_mix else choose_prior(cfg)
        search = plan_search(cfg, prior)
        print(
            "tau search plan (a t_mix in the registry for this run's fingerprint skips it: "
            "`python -m progrow_ray.tmix list`):"
        )
        print("\n".join(f"  {line}" for line in search.lines()))
        print()
    print("\n".join(format_plan(memory_plan(cfg), cfg.ray.gpu_memory_gb)))
    print(
        "train.parallel=auto runs a phase under ddp when its ddp estimate fits, else fsdp; the pipeline "
        "refuses at start a phase whose mode does not fit (ray.use_gpu)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
