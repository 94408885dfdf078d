"""The training loop for fixed-size and progressive runs, in one process or one DDP rank.

Everything is indexed by tokens (images for ResNet: the data source, ``data/run_data.py``, decides):
the schedule position, the expansion point τ, evaluation and checkpoint cadence. So phase 2 may run on
more workers with a larger global batch and continue
exactly where phase 1 stopped. No Ray here: the Ray layer passes hooks (``wrap_model``,
``save_checkpoint``, ``on_metrics``) and otherwise runs this same loop on every worker.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..core.errors import require
from ..core.flops import peak_flops
from ..core.growth import expand_depth
from ..core.models import build_model, make_config, model_kind
from ..core.optim import build_optimizer, set_lr
from ..core.schedule import step_lr
from ..data.run_data import open_run_data
from .checkpoint import CheckpointManager
from .config import RunConfig, check_batch, to_dict
from .parallel import (
    checkpoint_blocks,
    empty_sharded_model,
    expand_sharded,
    require_process_group,
    reshard,
    shard_model,
)
from .sharded_checkpoint import load_sharded_state, shard_reader, sharded_state
from .state import load_model_state, load_optimizer_state
from .step import autocast_for, plan_batch, train_step

MetricsFn = Callable[[dict], None]
SaveFn = Callable[["Trainer", dict], "str | None"]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    expanded: bool = False
    expanded_at_tokens: int | None = None
    growth: list = field(default_factory=list)
    train_loss: float | None = None
    val_loss: float | None = None
    val_loss_tokens: int | None = None
    val_accuracy: float | None = None  # image models (top-1 on the validation images)


@dataclass(frozen=True)
class RunResult:
    """What one ``Trainer.run`` did: where it stopped, at which depth, with which losses."""

    step: int
    tokens: int
    flops: float
    depth: Any  # int, or a ResNet's blocks per stage
    expanded: bool
    expanded_at_tokens: int | None
    growth: list  # one GrowthRecord dict (with tokens and step) per expansion
    train_loss: float | None
    val_loss: float | None
    val_loss_tokens: int | None
    val_accuracy: float | None
    checkpoint: str | None  # where the last checkpoint went (None when the save hook keeps no path)
    wall_s: float
    finished: bool  # reached train.total_tokens (not only a phase boundary)


def model_state(model) -> dict:
    return {
        "kind": model_kind(model.config),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model.config).items()},
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        require(
            torch.cuda.is_available(), "train.device=cuda but no CUDA device is visible; use train.device=cpu"
        )
        index = (
            dist.get_rank() % torch.cuda.device_count()
            if dist.is_initialized()
            else torch.cuda.current_device()
        )
        return torch.device("cuda", index)
    return torch.device(name)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        device: torch.device | None = None,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        save_checkpoint: SaveFn | None = None,
        resume: dict | None = None,
        on_metrics: MetricsFn | None = None,
        checkpoint_requested: Callable[[], str | None] | None = None,
        log: Callable[[str], None] = print,
    ):
        """``checkpoint_requested``: called on every rank at the same step boundaries (every
        ``train.log_every`` steps); a reason ("preemption") makes every rank checkpoint there."""
        self.cfg, self.log, self.on_metrics = cfg, log, on_metrics
        self.checkpoint_requested = checkpoint_requested
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        cfg.validate(world_size=self.world)
        self.device = device or resolve_device(cfg.train.device)
        self.parallel = self._resolve_parallel()  # "none" (one process), "ddp" or "fsdp"
        self.wrap_model = wrap_model
        self.save_fn = save_checkpoint
        self.schedule = cfg.schedule_fn()
        started = time.perf_counter()
        self.data = open_run_data(cfg.data, cfg.target_model_config(), cfg.train.seed)
        self.data_open_s = time.perf_counter() - started  # download / verification, if not staged before
        self.progress = Progress()
        self.history: list[dict] = []  # every metrics event; saved in checkpoints, so restarts keep it
        torch.manual_seed(cfg.train.seed)  # same init on every rank

        if resume is not None:
            state = resume["state.json"]
            model_fields = dict(state["model"])
            model_config = make_config(model_fields.pop("kind"), **model_fields)
        else:
            model_config = cfg.source_model_config() if self._expands_later() else cfg.target_model_config()
        if self.data.vocab_size is not None:
            require(
                model_config.vocab_size >= self.data.vocab_size,
                f"model.vocab_size ({model_config.vocab_size}) is smaller than the tokenizer's "
                f"({self.data.vocab_size})",
            )
        self.model = self._new_model(model_config, resuming=resume is not None)
        self.optimizer = self._build_optimizer(self.model)
        if resume is not None:
            self._restore(resume)
        self._prepare_step_model()
        self._interval_loss = torch.zeros((), device=self.device)
        self._interval_steps = 0
        self._interval_start = self._last_save = time.perf_counter()
        self._interval_flops = self.progress.flops
        self._peak_flops = peak_flops(self.device)
        self._interval_tokens = self.progress.tokens

    # ---- setup ----------------------------------------------------------------------------------
    def _expands_later(self) -> bool:
        return self.cfg.growth.enabled and not self.progress.expanded

    def _resolve_parallel(self) -> str:
        mode = self.cfg.train.parallel
        if mode == "fsdp":
            require_process_group()
            return "fsdp"
        if not self.distributed:
            return "none"
        if mode == "auto":  # the pipeline and train decide before; a library caller gets the same rule here
            from .memory import device_memory_bytes, resolve_parallel

            choice = [
                resolve_parallel(
                    self.cfg, self.cfg.target_model_config(), self.world, device_memory_bytes(self.device)
                )
            ]
            dist.broadcast_object_list(choice, src=0)  # one mode for all ranks, whatever their GPUs
            return choice[0]
        return "ddp"

    def _new_model(self, model_config, resuming: bool):
        """The model on this rank's device, sharded under fsdp. A resumed sharded model is built on the meta
        device and filled by the checkpoint: no rank materialises the whole model."""
        if self.parallel == "fsdp" and resuming:
            model = empty_sharded_model(model_config, self._shard, self.device)
            if model is not None:
                return model
        return self._shard(build_model(model_config).to(self.device))

    def _shard(self, model):
        """FSDP2 (``parallel.py``) under fsdp, with activation checkpointing first when asked."""
        if self.parallel != "fsdp":
            return model
        if self.cfg.train.activation_checkpointing:
            checkpoint_blocks(model)
        mixed = self.device.type == "cuda" and self.cfg.train.dtype != "float32"
        return shard_model(model, mixed_precision=mixed)

    def _build_optimizer(self, model):
        o = self.cfg.optimizer
        optimizer = build_optimizer(
            model,
            o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            betas=tuple(o.betas),
            ns_steps=o.ns_steps,
            muon_scale=o.muon_scale,
            nesterov=o.nesterov,
            nsgd_nesterov=o.nsgd_nesterov,
            ns_split=o.ns_split,
        )
        if self.parallel == "ddp" and hasattr(optimizer, "share_work"):
            optimizer.share_work()  # each matrix's Newton–Schulz once in the group, not on every rank
        return optimizer

    def _prepare_step_model(self) -> None:
        """The module the step calls: DDP / Ray-wrapped (FSDP shards in place), then compiled. Redone
        after expansion."""
        m = self.model
        if self.parallel != "fsdp" and self.cfg.train.activation_checkpointing:
            checkpoint_blocks(m)  # idempotent: after an expansion, the new blocks
        if self.parallel == "fsdp":
            pass
        elif self.wrap_model is not None:
            m = self.wrap_model(m)
        elif self.distributed:
            m = torch.nn.parallel.DistributedDataParallel(
                m, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.cfg.train.compile:
            m = torch.compile(m)
        self.step_model = m

    def _autocast(self):
        return autocast_for(self.device, self.cfg.train.dtype)

    # ---- state ----------------------------------------------------------------------------------
    def checkpoint_files(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.parallel == "fsdp":  # every rank writes its own shards (sharded_checkpoint.py)
            tensors, optimizer_rest = sharded_state(self.model, self.optimizer)
            weights = {"shards": tensors, "optimizer.json": optimizer_rest}
        else:
            weights = {
                "model.pt": self.model.state_dict(),
                "optimizer.pt": self.optimizer.state_dict(),
            }
        return {
            **weights,
            "rng.pt": rng,
            "metrics.json": self.history,
            "state.json": {
                "progress": dataclasses.asdict(self.progress),
                "sampler": self.data.state_dict(),
                "model": model_state(self.model),
                "config": to_dict(self.cfg),
                "world_size": self.world,
                "parallel": self.parallel,  # what wrote it; any mode and world size can resume it
            },
        }

    def _restore(self, files: dict) -> None:
        state = files["state.json"]
        self.progress = Progress(**state["progress"])
        if "shards" in files:  # sharded (FSDP) checkpoint: DCP reshards it to this world and mode
            load_sharded_state(
                self.model, self.optimizer, shard_reader(files["shards"]), files["optimizer.json"]
            )
        else:
            load_model_state(self.model, files["model.pt"], self.parallel == "fsdp")
            load_optimizer_state(self.model, self.optimizer, files["optimizer.pt"], self.parallel == "fsdp")
        self.data.load_state_dict(state["sampler"])
        self.history = list(files.get("metrics.json", []))
        torch.set_rng_state(files["rng.pt"]["cpu"])
        if self.device.type == "cuda" and "cuda" in files["rng.pt"]:
            torch.cuda.set_rng_state(files["rng.pt"]["cuda"], self.device)

    def save(self, reason: str = "periodic") -> str | None:
        """Checkpoint through the hook (Ray) or the run's own CheckpointManager (rank 0 writes)."""
        self._check_finite()
        files = self.checkpoint_files()
        self._last_save, self.save_reason = time.perf_counter(), reason
        if self.save_fn is not None:
            return self.save_fn(self, files)
        if self.rank != 0 and "shards" not in files:
            return None
        return default_manager(self.cfg, self.log).save(self.progress.step, files)

    # ---- schedule -------------------------------------------------------------------------------
    @property
    def batch_tokens(self) -> int:
        g = self.cfg.growth
        if self.progress.expanded and g.batch_tokens_after:
            return g.batch_tokens_after
        return self.cfg.train.batch_tokens

    @property
    def depth(self):
        return self.model.config.depth

    def _maybe_expand(self) -> None:
        cfg = self.cfg
        points = cfg.expansion_points()
        done = len(self.progress.growth)  # expansions so far (multi-stage: more than one)
        if not self._expands_later() or done >= len(points) or self.progress.tokens < points[done][0]:
            return
        target_depth = points[done][1]
        seed = cfg.train.seed * 1_000_003 + 17 + done
        if self.parallel == "fsdp":
            self.model, self.optimizer, record = expand_sharded(
                self.model,
                self.optimizer,
                target_depth,
                cfg.growth.method,
                device=self.device,
                shard=self._shard,
                build_optimizer=self._build_optimizer,
                copy_optimizer_state=cfg.growth.copy_optimizer_state,
                generator_seed=seed,
            )
        else:
            record = expand_depth(
                self.model,
                target_depth,
                cfg.growth.method,
                optimizer=self.optimizer,
                copy_optimizer_state=cfg.growth.copy_optimizer_state,
                generator_seed=seed,
            )
        self.progress.expanded = done + 1 == len(points)
        self.progress.expanded_at_tokens = self.progress.tokens
        self.progress.growth.append(
            {**record.to_dict(), "tokens": self.progress.tokens, "step": self.progress.step}
        )
        self._prepare_step_model()
        self.log(
            f"expanded depth {record.source_depths} -> {record.target_depths} ({cfg.growth.method}) at "
            f"{self.progress.tokens:,} tokens; global batch now {self.batch_tokens:,} tokens"
        )
        self._emit(
            {
                "event": "expand",
                "source_depth": record.source_depths,
                "target_depth": record.target_depths,
                "new_parameters": record.new_parameters,
            }
        )

    # ---- steps ----------------------------------------------------------------------------------
    def train_step(self) -> None:
        batch_tokens = self.batch_tokens
        units = self.data.units_per_example
        examples = check_batch(batch_tokens, units, "global batch")
        plan = plan_batch(
            examples, self.cfg.train.micro_batch, self.rank, self.world, same_count=self.parallel == "fsdp"
        )
        set_lr(
            self.optimizer, step_lr(self.schedule, self.cfg.optimizer.lr, self.progress.tokens, batch_tokens)
        )
        x, y = self.data.next_batch(examples, *plan.reads)
        self._interval_loss += train_step(
            self.step_model, self.optimizer, x, y, plan, self.device, self._autocast
        )
        self.progress.step += 1
        self.progress.tokens += batch_tokens
        self.progress.flops += self.cfg.unit_flops(self.model.config) * batch_tokens
        self._interval_steps += 1

    def _check_finite(self) -> None:
        if self._interval_steps and not torch.isfinite(self._interval_loss).item():
            raise NonFiniteLossError(
                f"non-finite training loss by step {self.progress.step} ({self.progress.tokens:,} tokens): "
                "stopped; the last good checkpoint is kept. Lower optimizer.lr or check the data."
            )

    def _sum_over_ranks(self, values: torch.Tensor) -> list[float]:
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values)
        return values.tolist()

    def _log_interval(self) -> bool:
        """Log the interval's metrics; returns whether a checkpoint is due by wall time (rank 0's clock,
        summed with the loss, so every rank agrees)."""
        self._check_finite()
        now = time.perf_counter()
        every_s = self.cfg.train.checkpoint_every_s
        due = float(self.rank == 0 and every_s is not None and now - self._last_save >= every_s)
        mine = torch.stack(
            [self._interval_loss / max(self._interval_steps, 1), torch.tensor(due, device=self.device)]
        )
        loss, due = self._sum_over_ranks(mine)  # the loss: the ranks' shares of the mean
        self.progress.train_loss = loss
        seconds = now - self._interval_start
        flops_per_s = (self.progress.flops - self._interval_flops) / max(seconds, 1e-9)
        metrics = {
            "event": "train",
            "train_loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "batch_tokens": self.batch_tokens,
            "tokens_per_s": (self.progress.tokens - self._interval_tokens) / max(seconds, 1e-9),
            "flops_per_s": flops_per_s,
            "world_size": self.world,
        }
        if self._peak_flops:  # a GPU whose peak is known: model FLOPs utilisation over all ranks
            metrics["mfu"] = flops_per_s / (self._peak_flops * self.world)
        router = getattr(self.model, "router_metrics", None)
        if router is not None:
            metrics.update(router())
        self._emit(metrics)
        self._interval_loss.zero_()
        self._interval_steps, self._interval_start, self._interval_tokens = 0, now, self.progress.tokens
        self._interval_flops = self.progress.flops
        return due > 0

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        classifier = self.model.config.unit == "image"
        total = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss x targets, targets, correct
        batches = list(
            self.data.eval_batches(
                self.cfg.train.eval_tokens, self.cfg.train.micro_batch, self.rank, self.world
            )
        )
        weights = [1.0] * len(batches)
        if self.parallel == "fsdp":  # every rank runs as many forwards (each gathers weights from all)
            most = torch.tensor([len(batches)], device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            padding = int(most.item()) - len(batches)
            if padding:
                filler = batches[0] if batches else self._filler_batch()
                batches, weights = batches + [filler] * padding, weights + [0.0] * padding
        for (x, y), weight in zip(batches, weights):
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits, loss = self.model(x, y)
            correct = (logits.argmax(-1) == y).sum().item() if classifier else 0
            total += weight * torch.tensor(
                [loss.item() * y.numel(), y.numel(), correct], device=self.device, dtype=torch.float64
            )
        if self.distributed:
            dist.all_reduce(total)
        if self.parallel == "fsdp":
            reshard(self.model)  # a forward without backward leaves the root's weights gathered
        self.model.train()
        val = (total[0] / total[1]).item()
        require(math.isfinite(val), f"non-finite validation loss at {self.progress.tokens:,} tokens")
        self.progress.val_loss, self.progress.val_loss_tokens = val, self.progress.tokens
        metrics = {"event": "eval", "val_loss": val}
        if classifier:
            self.progress.val_accuracy = metrics["val_accuracy"] = (total[2] / total[1]).item()
        self._emit(metrics)
        return val

    def _filler_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One example of rank 0's first validation micro-batch, for a rank that has none (its loss is
        weighted 0)."""
        x, y = next(iter(self.data.eval_batches(self.cfg.train.eval_tokens, 1, 0, 1)))
        return x[:1], y[:1]

    def _emit(self, metrics: dict) -> None:
        p = self.progress
        event = {
            "step": p.step,
            "tokens": p.tokens,
            "flops": p.flops,
            "depth": self.depth,
            "time": time.time(),
            **metrics,
        }
        self.history.append(event)
        if self.on_metrics is not None:
            self.on_metrics(event)

    # ---- loop -----------------------------------------------------------------------------------
    def run(self, until_tokens: int | None = None, progress_bar: bool = False) -> RunResult:
        """Train until ``until_tokens`` (a phase boundary) or the end; checkpoint when stopping."""
        cfg, p = self.cfg, self.progress
        stop = cfg.train.total_tokens if until_tokens is None else min(until_tokens, cfg.train.total_tokens)
        bar = None
        if progress_bar and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop, initial=min(p.tokens, stop), unit="tok", unit_scale=True, desc=cfg.name)
        started = time.perf_counter()
        try:  # the bar ends its line even when training stops with an error
            while p.tokens < stop:
                self._maybe_expand()
                before = p.tokens
                self.train_step()
                if bar is not None:
                    bar.update(p.tokens - before)
                    bar.set_postfix(depth=self.depth, loss=p.train_loss, refresh=False)
                checkpoint_now = None
                if p.step % cfg.train.log_every == 0 or p.tokens >= stop:
                    checkpoint_now = "time" if self._log_interval() else None
                    if self.checkpoint_requested is not None:  # every rank, same steps (Ray: a barrier)
                        checkpoint_now = self.checkpoint_requested() or checkpoint_now
                if (
                    crossed(before, p.tokens, cfg.train.eval_every_tokens)
                    or p.tokens >= cfg.train.total_tokens
                ):
                    self.evaluate()
                every = cfg.train.checkpoint_every_tokens
                periodic = bool(every) and crossed(before, p.tokens, every)
                if (periodic or checkpoint_now) and p.tokens < stop:
                    if checkpoint_now:
                        self.log(f"checkpoint at {p.tokens:,} tokens ({checkpoint_now})")
                    self.save(checkpoint_now or "periodic")
        finally:
            if bar is not None:
                bar.close()
        if p.tokens >= cfg.train.total_tokens and p.val_loss_tokens != p.tokens:
            self.evaluate()
        checkpoint = self.save("end" if p.tokens >= cfg.train.total_tokens else "phase")
        return RunResult(
            **dataclasses.asdict(p),
            depth=self.depth,
            checkpoint=checkpoint,
            wall_s=time.perf_counter() - started,
            finished=p.tokens >= cfg.train.total_tokens,
        )


def crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def run_dir(cfg: RunConfig) -> str:
    return f"{cfg.out.rstrip('/')}/{cfg.name}"


def default_manager(cfg: RunConfig, log=print) -> CheckpointManager:
    return CheckpointManager(f"{run_dir(cfg)}/checkpoints", keep=cfg.train.keep_checkpoints, log=log)
