"""Every check of a run config, each in one place. A failed check is a ``ConfigError`` naming the key
and the fix; ``RunConfig.validate`` runs them all, ``Trainer`` again at its own world size."""

from __future__ import annotations

import torch

from ...core.errors import require
from ...core.growth import check_expansion
from ...core.models import MODELS
from ...core.optim import FAMILIES, MUON_SCALES
from .schema import RunConfig

GPT2_VOCAB = 50257  # the data pipeline's tokenizer (progrow_ray.data.tokenizer.VOCAB_SIZE)


def check_run_config(cfg: RunConfig, world_size: int = 1) -> None:
    require(cfg.name and "/" not in cfg.name, f"name must be non-empty without '/', got {cfg.name!r}")
    check_data(cfg)
    check_train(cfg, world_size)
    check_optimizer(cfg)
    check_model(cfg)
    cfg.schedule_fn()  # make_schedule checks the schedule section
    if cfg.growth.enabled:
        check_growth(cfg, world_size)


def check_train(cfg: RunConfig, world_size: int) -> None:
    t = cfg.train
    for key in (
        "total_tokens",
        "batch_tokens",
        "micro_batch",
        "eval_every_tokens",
        "eval_tokens",
        "log_every",
    ):
        require(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
    require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    require(
        t.dtype in ("auto", "float32", "bfloat16"),
        f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}",
    )
    require(
        t.parallel in ("auto", "ddp", "fsdp"), f"train.parallel must be auto, ddp or fsdp, got {t.parallel!r}"
    )
    require(
        not (t.parallel == "fsdp" and cfg.model_kind == "resnet"),
        "train.parallel=fsdp does not train BatchNorm models (resnet): FSDP keeps each rank's running "
        "statistics apart; use train.parallel=ddp (a ResNet fits one GPU)",
    )
    require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    require(
        t.checkpoint_every_tokens is None or t.checkpoint_every_tokens > 0,
        "train.checkpoint_every_tokens must be > 0 or null",
    )
    require(
        t.checkpoint_every_s is None or t.checkpoint_every_s > 0,
        "train.checkpoint_every_s must be > 0 or null",
    )
    check_batch(
        t.batch_tokens,
        cfg.units_per_example,
        "train.batch_tokens",
        micro_batch=t.micro_batch,
        world_size=world_size,
    )


def check_data(cfg: RunConfig) -> None:
    d = cfg.data
    require(d.seq_len > 0, f"data.seq_len must be > 0, got {d.seq_len}")
    require(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    require(
        d.cache_max_gb is None or d.cache_max_gb > 0, f"data.cache_max_gb must be > 0, got {d.cache_max_gb}"
    )
    require(d.block_shards >= 0, f"data.block_shards must be >= 0 (0: one permutation), got {d.block_shards}")
    require(
        d.block_shards == 0 or d.cache_max_gb is not None,
        "data.block_shards streams shards through the node cache: "
        "set data.cache_max_gb, the most it may hold",
    )


def check_optimizer(cfg: RunConfig) -> None:
    o = cfg.optimizer
    require(o.name in FAMILIES, f"optimizer.name must be one of {list(FAMILIES)}, got {o.name!r}")
    require(
        o.muon_scale in MUON_SCALES,
        f"optimizer.muon_scale must be one of {list(MUON_SCALES)}, got {o.muon_scale!r}",
    )
    require(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    require(0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}")


def check_model(cfg: RunConfig) -> None:
    """The model's own fields are checked by its config dataclass; here, what it must agree with."""
    target = cfg.target_model_config()
    if target.unit == "token":
        require(
            target.vocab_size >= GPT2_VOCAB,
            f"model.vocab_size ({target.vocab_size}) is smaller than the GPT-2 tokenizer's ({GPT2_VOCAB}); "
            f"use "
            f">= {GPT2_VOCAB} (50304 pads it to a multiple of 64)",
        )
        require(
            target.block_size >= cfg.data.seq_len,
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.block_size ({target.block_size})",
        )


def check_growth(cfg: RunConfig, world_size: int) -> None:
    g, t = cfg.growth, cfg.train
    require(
        g.tau_tokens is not None or (g.tau_frac is not None and 0 <= g.tau_frac <= 1),
        f"growth.tau_frac must be in [0, 1] (or set growth.tau_tokens), got {g.tau_frac}",
    )
    tau, stable_end = cfg.tau_tokens, cfg.schedule_fn().stable_end_tokens
    if g.allow_tau_in_decay:
        require(0 <= tau <= t.total_tokens, f"growth tau ({tau:,} tokens) is beyond train.total_tokens")
    else:
        require(
            0 <= tau < stable_end,
            f"growth tau ({tau:,} tokens) is not before the decay start ({stable_end:,.0f} tokens, "
            f"schedule.decay_frac={cfg.schedule.decay_frac}): the expanded model needs stable-phase tokens "
            f"to "
            "mix (paper §5.2); lower growth.tau_frac, or set growth.allow_tau_in_decay: true for a research "
            "sweep",
        )
    if g.batch_tokens_after is not None:
        require(
            g.batch_tokens_after >= t.batch_tokens,
            f"growth.batch_tokens_after ({g.batch_tokens_after}) must be >= train.batch_tokens "
            f"({t.batch_tokens})",
        )
        check_batch(
            g.batch_tokens_after,
            cfg.units_per_example,
            "growth.batch_tokens_after",
            micro_batch=t.micro_batch,
            world_size=world_size,
        )
    check_expansion_method(cfg)
    check_growth_stages(cfg)


def check_expansion_method(cfg: RunConfig) -> None:
    """Source depth / method against the target (Table 2), without building any weights."""
    target, source = cfg.target_model_config(), cfg.source_model_config()
    with torch.device("meta"):  # depth groups only: no memory, no init cost
        model = MODELS[cfg.model_kind][1](source)
    check_expansion(model, target.depth, cfg.growth.method)


def check_growth_stages(cfg: RunConfig) -> None:
    """Multi-stage growth (paper §6): integer depths and expansion points, both strictly increasing."""
    for i, st in enumerate(cfg.growth.stages):
        require(
            isinstance(st, dict)
            and set(st) <= {"depth", "tau_frac", "tau_tokens"}
            and "depth" in st
            and ("tau_frac" in st or "tau_tokens" in st),
            f"growth.stages[{i}] must be {{depth: N, tau_frac: F}} or {{depth: N, tau_tokens: T}}, "
            f"got {st!r}",
        )
    points = cfg.expansion_points()
    if len(points) == 1:
        return
    depths = [cfg.growth.source_depth] + [d for _, d in points]
    tokens = [t for t, _ in points]
    require(all(isinstance(d, int) for d in depths), "growth.stages needs integer depths (language models)")
    require(
        all(a < b for a, b in zip(tokens, tokens[1:])),
        f"growth.stages: expansion points must come before tau and strictly increase, got {tokens} tokens",
    )
    require(
        all(a < b for a, b in zip(depths, depths[1:])),
        f"growth.stages: depths must strictly increase from the source to model.n_layer, got {depths}",
    )


def check_batch(
    batch_tokens: int, units_per_example: int, key: str, *, micro_batch: int = 1, world_size: int = 1
) -> int:
    """Examples (sequences, images) in a global batch. It must be whole examples; any world size trains it
    (``engine/step.plan_batch`` deals micro-batches unevenly), but every one of ``world_size`` workers
    must get a micro-batch, or workers would idle."""
    require(
        batch_tokens % units_per_example == 0,
        f"{key} ({batch_tokens}) must be a multiple of data.seq_len ({units_per_example}); e.g. "
        f"{max(1, round(batch_tokens / units_per_example)) * units_per_example}",
    )
    examples = batch_tokens // units_per_example
    micro_batches = -(-examples // micro_batch)
    require(
        micro_batches >= world_size,
        f"{key} ({batch_tokens}) has {micro_batches} micro-batch(es) of train.micro_batch={micro_batch} x "
        f"data.seq_len={units_per_example} tokens, fewer than the {world_size} workers; raise it to at "
        f"least {world_size * micro_batch * units_per_example} or lower train.micro_batch",
    )
    return examples
