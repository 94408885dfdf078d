"""Ray Train phases: the engine's loop on N workers, checkpoints through ``ray.train.report``.

Phase 1 trains the small model on ``ray.workers_small`` workers until τ. Phase 2 is a second fit on
``ray.workers_large`` workers that starts from phase 1's checkpoint: the engine expands depth on its
first step (tokens >= τ) and continues with the larger global batch. There is no Ray API to change
the worker count of a running fit on purpose, hence two fits.

Each fit is elastic when its workers are a range: Ray starts it with what the cluster can place, and
after a node is lost (or added) restarts the worker group at the new size from the latest checkpoint;
the engine trains the same global batch at any size (``engine/step.plan_batch``). A worker that dies
is restarted by Ray (``FailureConfig.max_failures``), a drained node (``max_preemption_failures``)
first gets a checkpoint: every ``train.log_every`` steps the ranks poll ``get_preemption_info``
together. The metric history travels inside the checkpoints, so nothing is lost. Rank 0 posts every
logged step, checkpoint and (re)start to the driver while the fit runs (``progress.py``).
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
from .config import WorkerRange
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
    handoff_timeout_s: float = 86400.0


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


def live_event(event: dict) -> dict:
    """An engine event's scalars (the depth of a ResNet is a list: left out), what the driver needs."""
    return {k: v for k, v in event.items() if v is None or isinstance(v, (int, float, str))}


def post(board, phase: str, event: dict, wait: bool = False) -> None:
    """Rank 0's events to the driver, fire-and-forget: never blocks a step, and a lost board stops only
    the live view. (Not ``ray.train.report``: its queue holds one report until the controller's next
    2-s poll, so a report per logged step throttles a fast loop; checkpoints still go through it.)
    ``wait``: until the board has it, and so every earlier post (the fit's last, before the worker exits)."""
    if board is None:
        return
    try:
        ref = board.post.remote(phase, live_event(event))
        if wait:
            import ray

            ray.get(ref, timeout=30)
    except Exception:  # noqa: BLE001
        pass


def told_of_preemption() -> bool:
    """This worker has been told of a node drain (its own view, no barrier): for the fault points only."""
    from ray.train.v2._internal.execution.context import get_train_context

    return get_train_context().preemption_context.preemption_info is not None


class PreemptionPoll:
    """``Trainer(checkpoint_requested=...)``: every rank asks Ray at the same step boundaries (the call
    is a barrier); a node being drained asks for one checkpoint before it goes."""

    def __init__(self):
        self.seen: tuple | None = None

    def __call__(self) -> str | None:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return None
        key = (info.deadline_ms, tuple(info.preempted_node_ids))
        if key == self.seen:  # this drain already has its checkpoint
            return None
        self.seen = key
        return "preemption"


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
    data_open_s: float | None = None  # rank 0 opening the shards (download, verification) in this attempt


def train_loop(config: dict) -> LoopReturn | None:
    """Runs on every Ray Train worker (``config["loop"]`` is a ``LoopConfig``)."""
    loop_start = time.time()
    import ray.train
    import ray.train.torch
    import torch

    from ..data.run_data import open_run_data
    from ..engine.checkpoint import write_checkpoint
    from ..engine.sharded_checkpoint import write_into
    from ..engine.trainer import Trainer

    loop: LoopConfig = config["loop"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    log = print if rank == 0 else (lambda _: None)
    torch.set_num_threads(max(1, loop.threads))
    restart = ray.train.get_checkpoint()  # set after a worker failure (or a re-run of this fit)
    storage = RayStorage(loop.fit_uri)
    start = storage.uri_of(restart.path) if restart is not None else loop.start_from
    handoff_time, files, resumed_from = None, None, None
    staged = None
    if start is None and loop.handoff:  # standby: started early, waits for phase 1's checkpoint
        # the shards it will read, fetched and verified into this node's cache while it waits: nothing of
        # the data is left for the switch at τ
        staged = open_run_data(loop.run.data, loop.run.target_model_config(), loop.run.train.seed)
        start = Handoff(loop.handoff).wait(timeout_s=loop.handoff_timeout_s)
        handoff_time = time.time()
    if start is not None:
        files = load_checkpoint_files(start, loop.fit_uri if restart is not None else None, log=log)
        resumed_from = "restart" if restart is not None else "previous phase"

    def save(trainer: Trainer, ckpt_files: dict) -> None:
        p = trainer.progress
        metrics = {
            "event": "checkpoint",
            "reason": trainer.save_reason,
            "tokens": p.tokens,
            "step": p.step,
            "flops": p.flops,
            "train_loss": p.train_loss,
            "val_loss": p.val_loss,
            "expanded": p.expanded,
            "world_size": world,
            "time": time.time(),
        }
        if rank == 0:
            post(loop.board, loop.phase, metrics)
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
        if rank == 0 and event["event"] in ("train", "eval"):
            post(loop.board, loop.phase, event)
        maybe_inject_fault(
            loop.fault,
            loop.phase,
            rank,
            event["tokens"],
            corrupt=lambda: corrupt_newest_checkpoint(loop.fit_uri),
            preempted=told_of_preemption,
        )

    trainer = Trainer(
        loop.run,
        device=ray.train.torch.get_device(),
        wrap_model=ray.train.torch.prepare_model,
        save_checkpoint=save,
        resume=files,
        on_metrics=on_metrics,
        checkpoint_requested=PreemptionPoll(),
        log=log,
    )
    del staged  # the Trainer has its own (instant) open of the staged shards now
    # where this attempt starts, at which size: the driver derives resizes and lost work from these
    p = trainer.progress
    if files is not None:
        log(f"{loop.phase}: resumed ({resumed_from}) at {p.tokens:,} tokens on {world} worker(s)")
    if rank == 0 and loop.board is not None:  # the driver stops a fit Ray cannot place through it
        from ray.train.v2._internal.execution.context import get_train_context

        loop.board.set_controller.remote(loop.phase, get_train_context().controller_actor)
    if rank == 0:
        post(
            loop.board,
            loop.phase,
            {"event": "start", "tokens": p.tokens, "step": p.step, "world_size": world, "time": loop_start},
        )
    result = trainer.run(until_tokens=loop.until_tokens)
    if rank != 0:
        return None
    post(loop.board, loop.phase, {"event": "end", "tokens": p.tokens, "time": time.time()}, wait=True)
    return LoopReturn(
        result,
        trainer.history,
        resumed_from,
        trainer.world,
        trainer.batch_tokens,
        time.time(),
        loop_start,
        handoff_time,
        trainer.data_open_s,
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
    data_open_s: float | None = None  # rank 0 opening the shards after the handoff (or at the start)


def run_phase(
    name: str,
    run: RunConfig,
    *,
    workers: WorkerRange,
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
        handoff_timeout_s=ray_cfg.handoff_timeout_s,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=workers.num_workers(),
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=ray_cfg.resize_check_s,
        ),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(
                max_failures=ray_cfg.max_failures, max_preemption_failures=ray_cfg.max_preemption_failures
            ),
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
        ret.world_size,  # at the end: an elastic fit may have resized
        ret.batch_tokens,
        time.time() - t0,
        ret.end_time,
        t0,
        ret.loop_start_time,
        ret.handoff_time,
        ret.data_open_s,
    )
