"""Ray Train phases: the engine's loop on N workers, checkpoints through ``ray.train.report``.

Phase 1 trains the small model on ``ray.workers_small`` workers until τ. Phase 2 is a second fit on
``ray.workers_large`` workers that starts from phase 1's checkpoint: the engine expands depth on its
first step (tokens >= τ) and continues with the larger global batch. There is no Ray API to change
the worker count of a running fit on purpose, hence two fits. A worker that dies is restarted by
Ray (``FailureConfig.max_failures``) and the loop resumes from ``ray.train.get_checkpoint()``; the
metric history travels inside the checkpoints, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ..engine.config import RunConfig, deep_merge, from_dict, to_dict

FAULT_ENV = "PROGROW_FAULT"  # JSON {"phase": ..., "at_tokens": N, "rank": r, "marker": path}: tests kill a worker


def run_config_dict(cfg, **overrides) -> dict:
    """The RunConfig part of a pipeline config (what the engine on a worker needs), with overrides."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    base = {k: v for k, v in to_dict(cfg).items() if k in names}
    return deep_merge(base, overrides)


def _maybe_inject_fault(fault: dict | None, phase: str, rank: int, tokens: int) -> None:
    if not fault or fault.get("phase") != phase or fault.get("rank", 0) != rank or tokens < fault["at_tokens"]:
        return
    marker = fault["marker"]
    if os.path.exists(marker):
        return  # once
    with open(marker, "w") as fh:
        fh.write(json.dumps({"phase": phase, "rank": rank, "tokens": tokens, "pid": os.getpid()}))
    os._exit(1)  # an abrupt worker death, as a preempted or OOM-killed process


def train_loop(config: dict) -> dict | None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from ..engine.checkpoint import read_checkpoint, write_checkpoint
    from ..engine.trainer import Trainer

    cfg = from_dict(RunConfig, config["run"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    files, resumed_from = None, None
    restart = ray.train.get_checkpoint()  # set after a worker failure (or a re-run of this fit)
    start = restart or config.get("start_from")
    if start is not None:
        with start.as_directory() as d:
            files = read_checkpoint(d)
        resumed_from = "restart" if restart is not None else "previous phase"

    def save(trainer: Trainer, ckpt_files: dict) -> None:
        p = trainer.progress
        metrics = {"tokens": p.tokens, "step": p.step, "flops": p.flops, "train_loss": p.train_loss,
                   "val_loss": p.val_loss, "expanded": p.expanded}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "checkpoint")
                write_checkpoint(path, ckpt_files)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
        else:
            ray.train.report(metrics)  # every rank reports the same number of times

    fault = config.get("fault")
    phase = config["phase"]

    def on_metrics(event: dict) -> None:
        _maybe_inject_fault(fault, phase, rank, event["tokens"])

    trainer = Trainer(cfg, device=ray.train.torch.get_device(), wrap_model=ray.train.torch.prepare_model,
                      save_checkpoint=save, resume=files, on_metrics=on_metrics,
                      log=print if rank == 0 else (lambda _: None))
    result = trainer.run(until_tokens=config.get("until_tokens"))
    if rank != 0:
        return None
    return {"result": result, "history": trainer.history, "resumed_from": resumed_from,
            "world_size": trainer.world, "batch_tokens": trainer.batch_tokens, "end_time": time.time()}


@dataclass
class PhaseOutcome:
    name: str
    result: dict
    history: list
    checkpoint_path: str | None
    workers: int
    batch_tokens: int
    fit_s: float
    end_time: float


def run_phase(name: str, run: dict, *, workers: int, storage_path: str, storage_filesystem, ray_cfg,
              until_tokens: int | None = None, start_from: Any = None, run_name: str) -> PhaseOutcome:
    """One Ray Train fit of the engine. Re-running with the same ``run_name`` and storage resumes
    from that fit's last committed checkpoint (Ray restores it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fault = json.loads(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": run, "phase": name, "until_tokens": until_tokens, "start_from": start_from,
                           "threads": max(1, int(ray_cfg.cpus_per_worker)), "fault": fault},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.num_to_keep)),
    )
    t0 = time.time()
    result = trainer.fit()
    ret = result.return_value
    if ret is None:
        raise RuntimeError(f"{name}: the fit returned no result from rank 0")
    checkpoint = result.checkpoint
    return PhaseOutcome(name, ret["result"], ret["history"], checkpoint.path if checkpoint else None, workers,
                        ret["batch_tokens"], time.time() - t0, ret["end_time"])
