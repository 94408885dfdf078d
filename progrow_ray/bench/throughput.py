"""The train-step benchmark: tokens/s (and MFU on CUDA) of the engine's step vs a nanoGPT-style
reference loop (``reference.py``); interleaved repeats, medians. ``python -m progrow_ray.bench
throughput``."""

from __future__ import annotations

import statistics
import time

import torch

from ..core.errors import require
from ..core.models import GPTConfig, build_model
from ..core.optim import build_optimizer, set_lr
from ..core.schedule import WSD, step_lr
from ..engine.step import autocast_for, plan_batch, train_step
from .reference import RefGPT, reference_step
from .shapes import SHAPES


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
