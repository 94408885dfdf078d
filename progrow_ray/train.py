"""``python -m progrow_ray.train --config jobs/smoke.yaml [--set key=value ...]``

One fixed-size or progressive run (laptop, GPU box; no Ray): one process, or one rank of
``torchrun --nproc_per_node N -m progrow_ray.train ...`` (DDP or FSDP2 by ``train.parallel``). Prepares the
data if needed, resumes from the run's newest valid checkpoint, shows a progress bar and prints a summary.
On a GPU it first checks that the run fits ``ray.gpu_memory_gb`` (``orchestration/preflight.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from .cli import run_cli
from .data.prepare import prepare_run_data
from .engine.config import RunConfig
from .engine.faults import faults_from_env, maybe_inject_fault
from .engine.parallel import end_process_group
from .engine.trainer import NonFiniteLossError, RunResult, Trainer, default_manager, run_dir
from .integrations.storage import filesystem
from .orchestration.config import load_single_run
from .orchestration.preflight import check_memory


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
    cfg, full = load_single_run(args.config, overrides, with_pipeline=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cuda:  # the run must fit the GPU: refused now, not out of memory at τ; auto decided here
        mode = check_memory(full, world=world)[0].mode
        cfg = replace(cfg, train=replace(cfg.train, parallel=mode))
    started_group = start_process_group(cfg, world, cuda)
    code = 1
    try:
        code = train(cfg, args)  # returns with the Trainer freed, so the group can go now
        return code
    finally:
        if started_group:
            end_process_group(clean=code == 0)


def start_process_group(cfg: RunConfig, world: int, cuda: bool) -> bool:
    """torchrun's ranks join one group (NCCL on GPUs, gloo on CPU); one process under fsdp gets a group of
    its own. Returns whether a group was started here."""
    backend = "nccl" if cuda else "gloo"
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if world > 1:
        dist.init_process_group(backend)
        return True
    if cfg.train.parallel == "fsdp":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return True
    return False


def train(cfg: RunConfig, args: argparse.Namespace) -> int:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        prepare_run_data(cfg.data)
    if dist.is_initialized():
        dist.barrier()  # the data is prepared before any rank opens it
    resume = None
    if not args.fresh:
        found = default_manager(cfg, log=print if rank == 0 else _quiet).load_latest()
        if found:
            if rank == 0:
                print(f"resuming from {found[0]}")
            resume = found[1]
    write, fh = metrics_writer(cfg) if rank == 0 else (None, None)
    faults = faults_from_env()  # tests only (engine/faults.py)

    def on_metrics(event: dict) -> None:
        if write is not None:
            write(event)
        maybe_inject_fault(faults, "train", rank, event["tokens"])

    try:
        trainer = Trainer(cfg, resume=resume, on_metrics=on_metrics, log=print if rank == 0 else _quiet)
        result = trainer.run(progress_bar=not args.no_progress)
    except NonFiniteLossError as e:  # a setting to fix (lr, data), like any other bad input: exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if fh is not None:
            fh.close()
    if rank == 0:
        print("\n".join(["summary:"] + summary_lines(result, cfg)))
    return 0


def _quiet(_: str) -> None:
    pass


if __name__ == "__main__":
    sys.exit(run_cli(main))
