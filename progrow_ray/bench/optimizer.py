"""``python -m progrow_ray.bench optimizer --world 1,2,4 [--model tiny|gpt2-124m] [--parallel fsdp|ddp]``

The Muon-NSGD step on 1, 2, 4 ... ranks of one machine (gloo on CPU, NCCL on GPUs), the same model and the
same gradients everywhere: the step time of the slowest rank, wall-clock and its own CPU time, and the ratio
to one rank. Owners share the Newton–Schulz work (``core/owners.py``), so a rank's work shrinks about as 1/N;
the CPU time shows it even where the ranks share fewer cores than there are ranks (wall time cannot).
Each rank runs one thread (``--threads``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..core.models import GPTConfig, build_model
from ..core.optim import build_optimizer


def _set_grads(model: torch.nn.Module, seed: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g).to(p.device if not isinstance(p, DTensor) else "cpu")
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
        else:
            p.grad = full


def _rank(rank: int, world: int, port: int, shape: dict, parallel: str, steps: int, threads: int, out: str):
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        if cuda:
            torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = build_model(GPTConfig(**shape)).to(device)
    if world > 1 and parallel == "fsdp":
        from ..engine.parallel import shard_model

        shard_model(model, mixed_precision=False)
    optimizer = build_optimizer(model, "muon_nsgd")
    if world > 1 and parallel == "ddp":
        optimizer.share_work()
    wall, cpu = [], []
    for step in range(steps + 2):  # two warm-up steps
        _set_grads(model, step)
        if world > 1:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    result = torch.tensor([statistics.median(wall), statistics.median(cpu)], dtype=torch.float64)
    if world > 1:
        gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(gathered, result.to(device))
        result = torch.stack(gathered).max(0).values.cpu()  # the slowest rank sets the pace
        del model, optimizer
        from ..engine.parallel import end_process_group

        end_process_group()
    if rank == 0:
        torch.save(result, out)


def optimizer_bench(args) -> dict:
    from .shapes import SHAPES

    worlds = [int(w) for w in args.world.split(",")]
    shape = {**SHAPES[args.model], "block_size": args.seq}
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.pt")
            port = _free_port()
            mp.spawn(
                _rank,
                args=(world, port, shape, args.parallel, args.steps, args.threads, out),
                nprocs=world,
                join=True,
            )
            wall, cpu = torch.load(out, weights_only=True).tolist()
        rows.append({"world": world, "step_s": wall, "step_cpu_s": cpu})
    base = rows[0]
    for r in rows:
        r["vs_first_wall"] = r["step_s"] / base["step_s"]
        r["vs_first_cpu"] = r["step_cpu_s"] / base["step_cpu_s"]
    return {"model": args.model, "parallel": args.parallel, "threads_per_rank": args.threads, "rows": rows}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
