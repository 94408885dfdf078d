"""The run config's schema: one frozen dataclass per section, and ``RunConfig`` with the values derived
from it (model configs, τ in tokens, expansion points, FLOPs, the schedule). Loading lives in
``loading.py``, every check in ``checks.py``; the Ray pipeline extends ``RunConfig`` with its own sections
(``orchestration/config.py``).

Units: ``train.*_tokens`` and ``growth.*_tokens`` count what the model's data is made of: tokens for
language models, images for ResNet (``ModelConfig.unit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ...core.flops import run_flops_by_segments
from ...core.models import make_config, model_config_class
from ...core.schedule import make_schedule


@dataclass(frozen=True)
class GrowthSection:
    enabled: bool = True  # False: a fixed-size run of the target model
    source_depth: Any = 0  # int (language models) or 4 ints (ResNet)
    method: str = "random"
    tau_frac: float | None = (
        0.8  # expansion point as a fraction of train.total_tokens (paper Fig. 1: 0.8 with
    )
    # 10% decay, leaving 0.1 T of the stable phase to mix in) ...
    tau_tokens: int | None = None  # ... or in tokens (wins when set)
    batch_tokens_after: int | None = None  # global batch after τ (default: train.batch_tokens)
    copy_optimizer_state: bool = False
    # Multi-stage (paper §6): earlier expansions before τ, e.g. [{depth: 6, tau_frac: 0.3}] for 0 -> 6 -> 12.
    # Each entry: depth (int) and tau_frac or tau_tokens; depths and taus strictly increase, all before τ.
    stages: list = field(default_factory=list)
    # research only: expand at or after the decay's start, with no stable phase left to mix in (paper Fig. 5
    # sweeps τ up to 0.8 T under both schedules); otherwise τ must come before schedule.decay_frac's start
    allow_tau_in_decay: bool = False


@dataclass(frozen=True)
class DataSection:
    source: str = (
        "stdlib"  # what `prepare` reads: stdlib | dir | glob | s3://... ; synthetic-images for ResNet
    )
    uri: str = "data/stdlib-gpt2"  # prepared token shards: local path or s3://
    seq_len: int = 256
    val_fraction: float = 0.02
    max_source_bytes: int | None = None  # cap on raw text read by `prepare` (None: all)
    verify: bool = True  # check shard sha256 against meta.json on open
    cache_dir: str | None = None  # local copy of remote shards (default ~/.cache/progrow_ray)
    cache_max_gb: float | None = None  # node cache bound: least recently used datasets not open are removed
    # 0: one permutation of every training window (the node caches the whole dataset). K > 0: shuffle in
    # blocks of K shards, and stream remote shards through the node cache (bounded by cache_max_gb) as the
    # blocks are reached: a corpus larger than a node's disk. Part of the data order: fixed for a run.
    block_shards: int = 0
    # image models (source: synthetic-images): side of the square images, pixel noise against unit-std class
    # patterns (the task's difficulty). Their runs count images where language models count tokens.
    image_size: int = 224
    image_noise: float = 2.5


@dataclass(frozen=True)
class TrainSection:
    total_tokens: int = 1_000_000
    batch_tokens: int = 16_384  # global batch, in tokens, before τ
    micro_batch: int = 8  # sequences per rank per micro-step (gradient accumulation fills the rest)
    eval_every_tokens: int = 200_000
    eval_tokens: int = 65_536
    log_every: int = 10
    checkpoint_every_tokens: int | None = None
    # and by wall time: a failure costs at most this much training (rank 0's clock, checked every
    # log_every steps and agreed by every rank)
    checkpoint_every_s: float | None = None
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    seed: int = 0
    # data parallelism over the ranks: ddp (replicated) | fsdp (FSDP2, sharded) | auto (fsdp when the DDP
    # memory estimate does not fit the GPU, core/memory.py); one process trains unwrapped under ddp / auto
    parallel: str = "auto"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute


@dataclass(frozen=True)
class OptimizerSection:
    name: str = "muon_nsgd"
    lr: float = 0.01
    weight_decay: float = 0.1
    momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    ns_steps: int = 5
    muon_scale: str = "jordan"  # Muon update factor: jordan sqrt(max(1, fan_out/fan_in)) | none | spectral
    nesterov: bool = True  # Muon's momentum: Nesterov (Jordan et al.)
    nsgd_nesterov: bool = False  # NSGD's momentum: plain m_t, as the paper's App. B writes it
    # data parallel: split a matrix heavier than a rank's share (a GPT's vocabulary matrix) over all ranks'
    # Newton–Schulz (faster; equal to one process up to float summation order); false: every matrix whole on
    # one owner rank, the one-process arithmetic per matrix (on CPU the same bits at any world size)
    ns_split: bool = True


@dataclass(frozen=True)
class ScheduleSection:
    name: str = "wsd"
    warmup_frac: float = 0.02
    decay_frac: float = 0.1  # the paper's long-run recipe (Fig. 1): 2% warmup, 10% decay
    decay_shape: str = "linear"
    final_frac: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    out: str = "runs"  # local dir or s3:// for checkpoints
    model: dict = field(default_factory=lambda: {"kind": "gpt", "n_layer": 4})
    growth: GrowthSection = GrowthSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()

    # ---- derived ------------------------------------------------------------------------------
    @property
    def model_kind(self) -> str:
        return self.model.get("kind", "gpt")

    def target_model_config(self):
        fields = {k: v for k, v in self.model.items() if k != "kind"}
        if model_config_class(self.model_kind).unit == "token":
            fields.setdefault("block_size", self.data.seq_len)
        return make_config(self.model_kind, **fields)

    def source_model_config(self):
        target = self.target_model_config()
        return target.with_depth(self.growth.source_depth) if self.growth.enabled else target

    def with_model_depth(self, depth: Any) -> "RunConfig":
        """This run with its model at ``depth`` (an int, or a ResNet's blocks per stage)."""
        key = model_config_class(self.model_kind).depth_field
        return replace(
            self, model={**self.model, key: list(depth) if isinstance(depth, (list, tuple)) else depth}
        )

    @property
    def units_per_example(self) -> int:
        """Units (tokens / images) in one training example: a window of ``data.seq_len`` tokens, one image."""
        return self.data.seq_len if model_config_class(self.model_kind).unit == "token" else 1

    def unit_flops(self, model_config, convention: str = "full") -> float:
        """Training FLOPs per unit of ``model_config`` on this run's data (sequence length, image size)."""
        return model_config.train_flops_per_unit(self.data.seq_len, self.data.image_size, convention)

    def flops_per_unit(self, convention: str = "full") -> tuple[float, float]:
        """Training FLOPs per token (per image for ResNet) of the source and the target model, under
        ``convention`` ("full", or the paper's eq. 1.1 "paper": see ``core/flops.py``)."""
        return (
            self.unit_flops(self.source_model_config(), convention),
            self.unit_flops(self.target_model_config(), convention),
        )

    def run_flops(self, convention: str = "full", tau_tokens: int | None = None) -> float:
        """FLOPs of this run as configured (τ = ``tau_tokens`` when given): the source model up to the
        first expansion, each stage's depth up to the next, the target to the end."""
        target = self.target_model_config()
        segments, depth, start = [], self.source_model_config().depth, 0
        points = self.expansion_points()
        if points and tau_tokens is not None:
            points[-1] = (tau_tokens, points[-1][1])
        for tokens, next_depth in points:
            segments.append((depth, tokens - start))
            depth, start = next_depth, tokens
        segments.append((depth, self.train.total_tokens - start))
        return run_flops_by_segments(
            target,
            segments,
            seq_len=self.data.seq_len,
            image_size=self.data.image_size,
            convention=convention,
        )

    def expansion_points(self) -> list[tuple[int, Any]]:
        """[(tokens, depth)] of every expansion in order, the last one at τ to the target depth
        (``growth.stages`` as ``checks.check_growth_stages`` accepts them)."""
        if not self.growth.enabled:
            return []
        points = []
        for st in self.growth.stages:
            tokens = (
                st["tau_tokens"]
                if st.get("tau_tokens") is not None
                else int(st["tau_frac"] * self.train.total_tokens)
            )
            points.append((int(tokens), st["depth"]))
        points.append((self.tau_tokens, self.target_model_config().depth))
        return points

    @property
    def tau_tokens(self) -> int | None:
        """Expansion point in tokens; None for a fixed-size run."""
        if not self.growth.enabled:
            return None
        if self.growth.tau_tokens is not None:
            return self.growth.tau_tokens
        return int(self.growth.tau_frac * self.train.total_tokens)

    def schedule_fn(self):
        s = self.schedule
        return make_schedule(
            s.name, self.train.total_tokens, s.warmup_frac, s.decay_frac, s.decay_shape, s.final_frac
        )

    def validate(self, world_size: int = 1) -> "RunConfig":
        """Every check of ``checks.check_run_config``; returns ``self``."""
        from .checks import check_run_config

        check_run_config(self, world_size)
        return self
