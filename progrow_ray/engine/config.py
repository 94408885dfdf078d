"""Run configuration: typed sections, strict YAML loading and ``--set key=value`` overrides.

One ``RunConfig`` describes one fixed-size or progressive run; the Ray pipeline adds its own
sections on top. Every mistake is a ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.errors import ConfigError, require
from ..core.flops import run_flops_by_segments, train_flops_per_unit, with_depth
from ..core.growth import check_expansion
from ..core.models import MODELS, make_config
from ..core.schedule import make_schedule


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
GPT2_VOCAB = 50257  # the data pipeline's tokenizer (progrow_ray.data.tokenizer.VOCAB_SIZE)


@dataclass(frozen=True)
class GrowthSection:
    enabled: bool = True  # False: a fixed-size run of the target model
    source_depth: Any = 0  # int (language models) or 4 ints (ResNet)
    method: str = "random"
    tau_frac: float | None = 0.8  # expansion point as a fraction of train.total_tokens (paper Fig. 1: 0.8 with
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
    source: str = "stdlib"  # what `prepare` reads: stdlib | dir | glob | s3://...
    uri: str = "data/stdlib-gpt2"  # prepared token shards: local path or s3://
    seq_len: int = 256
    val_fraction: float = 0.02
    max_source_bytes: int | None = None  # cap on raw text read by `prepare` (None: all)
    verify: bool = True  # check shard sha256 against meta.json on open
    cache_dir: str | None = None  # local copy of remote shards (default ~/.cache/progrow_ray)


@dataclass(frozen=True)
class TrainSection:
    total_tokens: int = 1_000_000
    batch_tokens: int = 16_384  # global batch, in tokens, before τ
    micro_batch: int = 8  # sequences per rank per micro-step (gradient accumulation fills the rest)
    eval_every_tokens: int = 200_000
    eval_tokens: int = 65_536
    log_every: int = 10
    checkpoint_every_tokens: int | None = None
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    seed: int = 0


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
    def target_model_config(self):
        fields = {k: v for k, v in self.model.items() if k != "kind"}
        if self.model.get("kind", "gpt") != "resnet":
            fields.setdefault("block_size", self.data.seq_len)
        return make_config(self.model.get("kind", "gpt"), **fields)

    def source_model_config(self):
        target = self.target_model_config()
        return with_depth(target, self.growth.source_depth) if self.growth.enabled else target

    def flops_per_unit(self, convention: str = "full") -> tuple[float, float]:
        """Training FLOPs per token (per image for ResNet) of the source and the target model, under
        ``convention`` ("full", or the paper's eq. 1.1 "paper": see ``core/flops.py``)."""
        return (train_flops_per_unit(self.source_model_config(), seq_len=self.data.seq_len, convention=convention),
                train_flops_per_unit(self.target_model_config(), seq_len=self.data.seq_len, convention=convention))

    def run_flops(self, convention: str = "full", tau_tokens: int | None = None) -> float:
        """FLOPs of this run as configured (τ = ``tau_tokens`` when given): the source model up to the
        first expansion, each stage's depth up to the next, the target to the end."""
        target = self.target_model_config()
        segments, depth, start = [], self.growth.source_depth if self.growth.enabled else None, 0
        points = self.expansion_points()
        if points and tau_tokens is not None:
            points[-1] = (tau_tokens, points[-1][1])
        for tokens, next_depth in points:
            segments.append((depth, tokens - start))
            depth, start = next_depth, tokens
        segments.append((depth, self.train.total_tokens - start))
        return run_flops_by_segments(lambda d: target if d is None else with_depth(target, d), segments,
                                     seq_len=self.data.seq_len, convention=convention)

    def expansion_points(self) -> list[tuple[int, Any]]:
        """[(tokens, depth)] of every expansion in order, the last one at τ to the target depth."""
        if not self.growth.enabled:
            return []
        target = self.target_model_config()
        points = []
        for i, st in enumerate(self.growth.stages):
            require(isinstance(st, dict) and set(st) <= {"depth", "tau_frac", "tau_tokens"} and "depth" in st
                    and ("tau_frac" in st or "tau_tokens" in st),
                    f"growth.stages[{i}] must be {{depth: N, tau_frac: F}} or {{depth: N, tau_tokens: T}}, got {st!r}")
            tokens = st["tau_tokens"] if st.get("tau_tokens") is not None else int(st["tau_frac"] * self.train.total_tokens)
            points.append((int(tokens), st["depth"]))
        points.append((self.tau_tokens, list(target.blocks) if hasattr(target, "blocks") else target.n_layer))
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
        return make_schedule(s.name, self.train.total_tokens, s.warmup_frac, s.decay_frac, s.decay_shape, s.final_frac)

    def validate(self, world_size: int = 1) -> "RunConfig":
        t, g, d = self.train, self.growth, self.data
        require(self.name and "/" not in self.name, f"name must be non-empty without '/', got {self.name!r}")
        for key in ("total_tokens", "batch_tokens", "micro_batch", "eval_every_tokens", "eval_tokens", "log_every"):
            require(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
        require(d.seq_len > 0, f"data.seq_len must be > 0, got {d.seq_len}")
        require(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
        require(t.dtype in ("auto", "float32", "bfloat16"), f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
        require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
        require(t.checkpoint_every_tokens is None or t.checkpoint_every_tokens > 0,
                "train.checkpoint_every_tokens must be > 0 or null")
        check_batch(t.batch_tokens, world_size, t.micro_batch, d.seq_len, "train.batch_tokens")
        o = self.optimizer
        from ..core.optim import FAMILIES, MUON_SCALES

        require(o.name in FAMILIES, f"optimizer.name must be one of {list(FAMILIES)}, got {o.name!r}")
        require(o.muon_scale in MUON_SCALES, f"optimizer.muon_scale must be one of {list(MUON_SCALES)}, got {o.muon_scale!r}")
        require(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
        require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
        require(0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}")
        target = self.target_model_config()
        vocab = getattr(target, "vocab_size", None)
        require(vocab is None or vocab >= GPT2_VOCAB,
                f"model.vocab_size ({vocab}) is smaller than the GPT-2 tokenizer's ({GPT2_VOCAB}); use >= {GPT2_VOCAB} "
                "(50304 pads it to a multiple of 64)")
        require(getattr(target, "block_size", d.seq_len) >= d.seq_len,
                f"data.seq_len ({d.seq_len}) exceeds model.block_size ({getattr(target, 'block_size', None)})")
        schedule = self.schedule_fn()
        if g.enabled:
            require(g.tau_tokens is not None or (g.tau_frac is not None and 0 <= g.tau_frac <= 1),
                    f"growth.tau_frac must be in [0, 1] (or set growth.tau_tokens), got {g.tau_frac}")
            tau = self.tau_tokens
            if g.allow_tau_in_decay:
                require(0 <= tau <= t.total_tokens, f"growth tau ({tau:,} tokens) is beyond train.total_tokens")
            else:
                require(0 <= tau < schedule.stable_end_tokens,
                        f"growth tau ({tau:,} tokens) is not before the decay start ({schedule.stable_end_tokens:,.0f} "
                        f"tokens, schedule.decay_frac={self.schedule.decay_frac}): the expanded model needs stable-phase "
                        "tokens to mix (paper §5.2); lower growth.tau_frac, or set growth.allow_tau_in_decay: true "
                        "for a research sweep")
            if g.batch_tokens_after is not None:
                require(g.batch_tokens_after >= t.batch_tokens,
                        f"growth.batch_tokens_after ({g.batch_tokens_after}) must be >= train.batch_tokens ({t.batch_tokens})")
            self.check_growth()
            points = self.expansion_points()
            depths = [self.growth.source_depth] + [d for _, d in points]
            require(all(isinstance(d, int) for d in depths) or len(points) == 1,
                    "growth.stages needs integer depths (language models)")
            require(all(a < b for a, b in zip([t for t, _ in points], [t for t, _ in points][1:])),
                    f"growth.stages: expansion points must come before tau and strictly increase, got "
                    f"{[t for t, _ in points]} tokens")
            require(len(points) == 1 or all(a < b for a, b in zip(depths, depths[1:])),
                    f"growth.stages: depths must strictly increase from the source to model.n_layer, got {depths}")
        return self

    def check_growth(self) -> None:
        """Source depth / method against the target (Table 2), without building any weights."""
        target, source = self.target_model_config(), self.source_model_config()
        with torch.device("meta"):  # depth groups only: no memory, no init cost
            model = MODELS[self.model.get("kind", "gpt")][1](source)
        target_depth = list(target.blocks) if hasattr(target, "blocks") else target.n_layer
        check_expansion(model, target_depth, self.growth.method)


def check_batch(batch_tokens: int, world_size: int, micro_batch: int, seq_len: int, key: str) -> int:
    """Gradient-accumulation steps for a global batch; it must split evenly over ranks and micro-batches."""
    per_micro = world_size * micro_batch * seq_len
    require(batch_tokens % per_micro == 0,
            f"{key} ({batch_tokens}) must be a multiple of workers x train.micro_batch x data.seq_len "
            f"= {world_size} x {micro_batch} x {seq_len} = {per_micro}; e.g. {max(1, round(batch_tokens / per_micro)) * per_micro}")
    return batch_tokens // per_micro


# ---- loading -------------------------------------------------------------------------------------

def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        require(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        require(len(value) == len(args), f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_check_type(v, a, key) for v, a in zip(value, args))
    if tp is list:
        require(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        return list(value)
    if tp is dict:
        require(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        require(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, str) and tp in (int, float) and SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e6 (no dot) as a string; users mean the number
        if tp is int and value.is_integer():
            value = int(value)
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        require(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    require(isinstance(data, dict), f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known under "
                          f"{prefix.rstrip('.') or 'top level'}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, key + ".")
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(out)


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.total_tokens=1e6", "model.n_layer=2"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        require("=" in pair, f"--set takes key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, float) and value.is_integer() and ("e" in raw.lower()):
            value = int(value)  # 1e6 tokens -> 1000000
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            require(isinstance(node, dict), f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    require(p.is_file(), f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    require(isinstance(data, dict), f"--config {path}: the top level must be a mapping")
    return data


# Sections only the Ray pipeline reads; single-process tools load presets without them.
PIPELINE_SECTIONS = ("tune", "ray", "baseline", "mlflow")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    cls=RunConfig, world_size: int = 1, ignore_sections: tuple[str, ...] = ()):
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    for section in ignore_sections:
        data.pop(section, None)
    cfg = from_dict(cls, data)
    return cfg.validate(world_size=world_size) if hasattr(cfg, "validate") else cfg

