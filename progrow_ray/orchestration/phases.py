"""Ray Train phases: the engine's loop on N workers, checkpoints through ``ray.train.report``.

Phase 1 trains the small model on ``ray.workers_small`` workers until τ. Phase 2 is a second fit on
``ray.workers_large`` workers that starts from phase 1's checkpoint: the engine expands depth on its
first step (tokens >= τ) and continues with the larger global batch. There is no Ray API to change
the worker count of a running fit on purpose, hence two fits. A worker that dies is restarted by
Ray (``FailureConfig.max_failures``) and the loop resumes from ``ray.train.get_checkpoint()``; the
metric history travels inside the checkpoints, so nothing is lost.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ..engine.config import RunConfig
from ..engine.faults import corrupt_newest_checkpoint, faults_from_env, maybe_inject_fault
from ..engine.trainer import RunResult
from ..integrations.storage import RayStorage, list_dirs
from .standby import Handoff


@dataclass(frozen=True)
class LoopConfig:
    """What every worker of a phase's fit receives."""

    run: RunConfig
    phase: str
    fit_uri: str  # this fit's directory in run storage (its committed checkpoints)
    until_tokens: int | None = None
    start_from: str | None = None  # URI of the checkpoint the phase starts from (phase 2 without standby)
    handoff: str | None = None  # standby: URI of the handoff file to wait on
    threads: int = 1
    fault: Any = None  # the fault matrix's fault points (engine/faults.py); None outside tests
    board: Any = None  # the driver's live progress board (orchestration/progress.py)


def load_checkpoint_files(checkpoint_uri: str, fit_uri: str | None, log=print) -> dict:
    """The checkpoint's files, verified; if it is corrupted or partial, the newest older checkpoint of
    the same fit that verifies (Ray keeps ``num_to_keep``), with a warning."""
    from ..engine.checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(checkpoint_uri)
    except CheckpointError as e:
        if fit_uri is None:
            raise
        log(f"warning: {e}; trying the previous checkpoint")
        first_error = e
    newest = os.path.basename(checkpoint_uri.rstrip("/"))
    for uri in reversed(list_dirs(fit_uri, "checkpoint_")):
        if os.path.basename(uri) >= newest:
            continue
        try:
            files = read_checkpoint(uri)
            log(f"warning: resumed from the older checkpoint {uri}")
            return files
        except CheckpointError as e:
            log(f"warning: {e}")
    raise first_error


@dataclass(frozen=True)
class LoopReturn:
    """What rank 0 hands back to the driver at the end of a fit."""

    result: RunResult
    history: list
    resumed_from: str | None  # "restart" | "previous phase" | None
    world_size: int
    batch_tokens: int
    end_time: float
    loop_start_time: float  # rank 0 entered the train loop (of the last attempt)
    handoff_time: float | None  # standby: rank 0 saw phase 1's checkpoint


def train_loop(config: dict) -> LoopReturn | None:
    """Runs on every Ray Train worker (``config["loop"]`` is a ``LoopConfig``)."""
    loop_start = time.time()
    import ray.train
    import ray.train.torch
    import torch

    from ..engine.checkpoint import write_checkpoint
    from ..engine.sharded_checkpoint import write_into
    from ..engine.trainer import Trainer
    from .progress import post

    loop: LoopConfig = config["loop"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    log = print if rank == 0 else (lambda _: None)
    torch.set_num_threads(max(1, loop.threads))
    restart = ray.train.get_checkpoint()  # set after a worker failure (or a re-run of this fit)
    storage = RayStorage(loop.fit_uri)
    start = storage.uri_of(restart.path) if restart is not None else loop.start_from
    handoff_time, files, resumed_from = None, None, None
    if start is None and loop.handoff:  # standby: started early, waits for phase 1's checkpoint
        start = Handoff(loop.handoff).wait()
        handoff_time = time.time()
    if start is not None:
        files = load_checkpoint_files(start, loop.fit_uri if restart is not None else None, log=log)
        resumed_from = "restart" if restart is not None else "previous phase"

    def save(trainer: Trainer, ckpt_files: dict) -> None:
        p = trainer.progress
        metrics = {
            "tokens": p.tokens,
            "step": p.step,
            "flops": p.flops,
            "train_loss": p.train_loss,
            "val_loss": p.val_loss,
            "expanded": p.expanded,
        }
        if "shards" in ckpt_files:
            # FSDP: every rank reports its own shards and Ray merges the directories. Uploaded in the
            # background while training goes on (Ray deletes the local copy after the upload and waits for
            # every upload before the fit returns); the checkpoint counts once all ranks' uploads are in.
            path = tempfile.mkdtemp(prefix="progrow-ckpt-")
            small = {k: v for k, v in ckpt_files.items() if k != "shards"}
            write_into(path, small, ckpt_files["shards"])
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(path),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            )
        elif rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "checkpoint")
                write_checkpoint(path, ckpt_files)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
        else:
            ray.train.report(metrics)  # every rank reports the same number of times

    def on_metrics(event: dict) -> None:
        if rank == 0:
            post(loop.board, loop.phase, event, world)
        maybe_inject_fault(
            loop.fault,
            loop.phase,
            rank,
            event["tokens"],
            corrupt=lambda: corrupt_newest_checkpoint(loop.fit_uri),
        )

    trainer = Trainer(
        loop.run,
        device=ray.train.torch.get_device(),
        wrap_model=ray.train.torch.prepare_model,
        save_checkpoint=save,
        resume=files,
        on_metrics=on_metrics,
        log=log,
    )
    result = trainer.run(until_tokens=loop.until_tokens)
    if rank != 0:
        return None
    return LoopReturn(
        result,
        trainer.history,
        resumed_from,
        trainer.world,
        trainer.batch_tokens,
        time.time(),
        loop_start,
        handoff_time,
    )


@dataclass(frozen=True)
class PhaseOutcome:
    name: str
    result: RunResult
    history: list
    checkpoint_uri: str | None
    workers: int
    batch_tokens: int
    fit_s: float
    end_time: float
    fit_start_time: float  # the driver called fit()
    loop_start_time: float  # rank 0 entered the train loop (of the last attempt)
    handoff_time: float | None  # standby: rank 0 saw phase 1's checkpoint


def run_phase(
    name: str,
    run: RunConfig,
    *,
    workers: int,
    storage: RayStorage,
    ray_cfg,
    run_name: str,
    until_tokens: int | None = None,
    start_from: str | None = None,
    handoff: str | None = None,
    board=None,
) -> PhaseOutcome:
    """One Ray Train fit of the engine. Re-running with the same ``run_name`` and storage resumes
    from that fit's last committed checkpoint (Ray restores it)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = 1
    loop = LoopConfig(
        run=run,
        phase=name,
        fit_uri=storage.child(run_name),
        until_tokens=until_tokens,
        start_from=start_from,
        handoff=handoff,
        threads=max(1, int(ray_cfg.cpus_per_worker)),
        fault=faults_from_env(),
        board=board,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.num_to_keep),
        ),
    )
    t0 = time.time()
    fit = trainer.fit()
    ret: LoopReturn | None = fit.return_value
    if ret is None:
        raise RuntimeError(f"{name}: the fit returned no result from rank 0")
    checkpoint = storage.uri_of(fit.checkpoint.path) if fit.checkpoint else None
    return PhaseOutcome(
        name,
        ret.result,
        ret.history,
        checkpoint,
        workers,
        ret.batch_tokens,
        time.time() - t0,
        ret.end_time,
        t0,
        ret.loop_start_time,
        ret.handoff_time,
    )
