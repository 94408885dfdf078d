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
from ..engine.faults import faults_from_env, maybe_inject_fault



def run_config_dict(cfg, **overrides) -> dict:
    """The RunConfig part of a pipeline config (what the engine on a worker needs), with overrides."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    base = {k: v for k, v in to_dict(cfg).items() if k in names}
    return deep_merge(base, overrides)


def write_handoff(path: str, filesystem, obj: dict) -> None:
    """Tell standby phase-2 workers where phase 1's checkpoint is (or that phase 1 failed). One
    object written whole: an atomic rename locally, a single PUT on S3."""
    data = json.dumps(obj).encode()
    if filesystem is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    with filesystem.open_output_stream(path) as fh:
        fh.write(data)


def read_handoff(path: str, filesystem) -> dict | None:
    if filesystem is None:
        if not os.path.exists(path):
            return None
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    import pyarrow.fs

    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as fh:
        return json.loads(fh.read())


def wait_for_handoff(handoff: dict, poll_s: float = 0.1):
    """Standby: block until the driver hands over phase 1's checkpoint; return it as a Checkpoint."""
    import ray.train

    while True:
        msg = read_handoff(handoff["path"], handoff["filesystem"])
        if msg is not None:
            if "abort" in msg:
                raise RuntimeError(f"standby phase 2 released without a checkpoint: {msg['abort']}")
            return ray.train.Checkpoint(msg["checkpoint_path"], handoff["filesystem"])
        time.sleep(poll_s)


def corrupt_latest(fit_dir: dict | None) -> str | None:
    """A ``corrupt_latest`` fault: tear the newest committed checkpoint of this fit (the restart must
    fall back to the previous one). Returns the damaged directory."""
    ckpts = checkpoint_dirs(fit_dir["path"], fit_dir["filesystem"]) if fit_dir else []
    if not ckpts:
        return None
    _overwrite(f"{ckpts[0]}/model.pt", fit_dir["filesystem"], b"torn write")
    return ckpts[0]


def checkpoint_dirs(fit_path: str, filesystem) -> list[str]:
    """This fit's committed checkpoint directories, newest first (Ray names them by time)."""
    if filesystem is None:
        if not os.path.isdir(fit_path):
            return []
        names = [n for n in os.listdir(fit_path)
                 if n.startswith("checkpoint_") and os.path.isdir(os.path.join(fit_path, n))]
        return [f"{fit_path}/{n}" for n in sorted(names, reverse=True)]
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(fit_path, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and os.path.basename(i.path).startswith("checkpoint_")), reverse=True)


def _overwrite(path: str, filesystem, data: bytes) -> None:
    if filesystem is None:
        with open(path, "wb") as fh:
            fh.write(data)
    else:
        with filesystem.open_output_stream(path) as fh:
            fh.write(data)


def load_checkpoint_files(checkpoint, fit_dir: dict | None, log=print) -> dict:
    """The checkpoint's files, verified; if it is corrupted or partial, the newest older checkpoint of
    the same fit that verifies (Ray keeps ``num_to_keep``), with a warning."""
    import ray.train

    from ..engine.checkpoint import CheckpointError, read_checkpoint

    def load(ckpt) -> dict:
        with ckpt.as_directory() as d:
            return read_checkpoint(d)

    try:
        return load(checkpoint)
    except CheckpointError as e:
        if fit_dir is None:
            raise
        log(f"warning: {e}; trying the previous checkpoint")
        first_error = e
    newest = os.path.basename(checkpoint.path.rstrip("/"))
    for path in checkpoint_dirs(fit_dir["path"], fit_dir["filesystem"]):
        if os.path.basename(path) >= newest:
            continue
        try:
            files = load(ray.train.Checkpoint(path, fit_dir["filesystem"]))
            log(f"warning: resumed from the older checkpoint {path}")
            return files
        except CheckpointError as e:
            log(f"warning: {e}")
    raise first_error


def train_loop(config: dict) -> dict | None:
    """Runs on every Ray Train worker."""
    loop_start = time.time()
    import ray.train
    import ray.train.torch
    import torch

    from ..engine.checkpoint import write_checkpoint
    from ..engine.trainer import Trainer
    from .progress import post

    cfg = from_dict(RunConfig, config["run"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    files, resumed_from = None, None
    restart = ray.train.get_checkpoint()  # set after a worker failure (or a re-run of this fit)
    start = restart or config.get("start_from")
    handoff_time = None
    if start is None and config.get("handoff"):  # standby: started early, waits for phase 1's checkpoint
        start = wait_for_handoff(config["handoff"])
        handoff_time = time.time()
    if start is not None:
        files = load_checkpoint_files(start, config.get("fit_dir") if restart is not None else None,
                                      log=print if rank == 0 else (lambda _: None))
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

    world = ray.train.get_context().get_world_size()

    def on_metrics(event: dict) -> None:
        if rank == 0:
            post(config.get("board"), phase, event, world)
        maybe_inject_fault(fault, phase, rank, event["tokens"], corrupt=lambda: corrupt_latest(config.get("fit_dir")))

    trainer = Trainer(cfg, device=ray.train.torch.get_device(), wrap_model=ray.train.torch.prepare_model,
                      save_checkpoint=save, resume=files, on_metrics=on_metrics,
                      log=print if rank == 0 else (lambda _: None))
    result = trainer.run(until_tokens=config.get("until_tokens"))
    if rank != 0:
        return None
    return {"result": result, "history": trainer.history, "resumed_from": resumed_from,
            "world_size": trainer.world, "batch_tokens": trainer.batch_tokens, "end_time": time.time(),
            "loop_start_time": loop_start, "handoff_time": handoff_time}


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
    fit_start_time: float  # the driver called fit()
    loop_start_time: float  # rank 0 entered the train loop (of the last attempt)
    handoff_time: float | None  # standby: rank 0 saw phase 1's checkpoint


def run_phase(name: str, run: dict, *, workers: int, storage_path: str, storage_filesystem, ray_cfg,
              until_tokens: int | None = None, start_from: Any = None, handoff: dict | None = None,
              run_name: str, board=None) -> PhaseOutcome:
    """One Ray Train fit of the engine. Re-running with the same ``run_name`` and storage resumes
    from that fit's last committed checkpoint (Ray restores it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fault = faults_from_env()
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": run, "phase": name, "until_tokens": until_tokens, "start_from": start_from,
                           "handoff": handoff, "fit_dir": {"path": f"{storage_path}/{run_name}",
                                                           "filesystem": storage_filesystem},
                           "threads": max(1, int(ray_cfg.cpus_per_worker)), "fault": fault, "board": board},
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
                        ret["batch_tokens"], time.time() - t0, ret["end_time"], t0, ret["loop_start_time"],
                        ret.get("handoff_time"))
