"""Sizes of the reproduction runs. Each scale gives the base run of every testbed as a ``RunConfig`` —
the same config type as the presets in ``jobs/`` — and the experiments change only what their figure
varies (``dataclasses.replace``).

cpu-tiny   each experiment <= 15 min on 2 CPU cores: d=64 GPT-2 (GPT-2 BPE, 64-token context) on the
           standard library's source, 32k tokens per run; ResNet base width 8 on 32x32 generated images.
gpu-small  each experiment <= 10 min on one H100: d=256, 256-token context, 4M tokens per run.
paper      the paper's GPT-2 124M setting (App. A: batch 512 x 1024, WSD 2% / 20%, lr 0.01) on the
           prepared corpus you point data.uri at; sized for a cluster, not a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..engine.config import (
    DataSection,
    GrowthSection,
    OptimizerSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
)

# The paper's recipe at every scale (App. B): Muon-NSGD lr 0.01, weight decay 0.1, WSD 2% warmup / 20% decay.
OPTIMIZER = OptimizerSection(name="muon_nsgd", lr=0.01, weight_decay=0.1)
SCHEDULE = ScheduleSection(name="wsd", warmup_frac=0.02, decay_frac=0.2)
FIXED = GrowthSection(
    enabled=False, source_depth=0, method="random", tau_frac=0.5
)  # experiments switch it on
STDLIB = DataSection(source="stdlib", uri="data/stdlib-gpt2", max_source_bytes=8_000_000)
RESNET_FIXED = GrowthSection(enabled=False, source_depth=[1, 1, 1, 1], method="random", tau_frac=0.5)


@dataclass(frozen=True)
class Scale:
    name: str
    lm: RunConfig  # the GPT testbed (target depth = model n_layer)
    deep_layers: int  # the target depth of experiments that need room for multi-layer sources
    moe: dict  # model fields of the MoE testbed
    image: RunConfig  # the ResNet testbed on generated images (its units are images)
    cpus_per_trial: float
    gpus_per_trial: float


def gpt_run(
    *,
    n_layer: int,
    n_embd: int,
    head_dim: int,
    seq_len: int,
    total_tokens: int,
    batch_tokens: int,
    micro_batch: int,
    eval_tokens: int,
    log_every: int,
    device: str,
    evals: int = 4,
) -> RunConfig:
    return RunConfig(
        model={"kind": "gpt", "n_layer": n_layer, "n_embd": n_embd, "head_dim": head_dim},
        growth=FIXED,
        data=replace(STDLIB, seq_len=seq_len),
        train=TrainSection(
            total_tokens=total_tokens,
            batch_tokens=batch_tokens,
            micro_batch=micro_batch,
            eval_every_tokens=total_tokens // evals,
            eval_tokens=eval_tokens,
            log_every=log_every,
            checkpoint_every_tokens=None,
            device=device,
            seed=0,
        ),
        optimizer=OPTIMIZER,
        schedule=SCHEDULE,
    )


def resnet_run(
    *,
    base_width: int,
    total_images: int,
    batch: int,
    val_images: int,
    eval_every: int,
    noise: float = 2.5,
    device: str = "auto",
) -> RunConfig:
    """ResNet50's stage shape [3, 4, 6, 3] (CIFAR stem, 10 classes) on 32x32 generated images, one
    micro-batch per step, the train loss logged every step."""
    return RunConfig(
        model={
            "kind": "resnet",
            "blocks": [3, 4, 6, 3],
            "num_classes": 10,
            "base_width": base_width,
            "stem": "cifar",
        },
        growth=RESNET_FIXED,
        data=DataSection(source="synthetic-images", image_size=32, image_noise=noise),
        train=TrainSection(
            total_tokens=total_images,
            batch_tokens=batch,
            micro_batch=batch,
            eval_every_tokens=eval_every,
            eval_tokens=val_images,
            log_every=1,
            checkpoint_every_tokens=None,
            device=device,
            seed=0,
        ),
        optimizer=OPTIMIZER,
        schedule=SCHEDULE,
    )


MOE = {"kind": "moe", "n_experts": 8, "top_k": 2, "moe_every": 1}

SCALES = {
    "cpu-tiny": Scale(
        "cpu-tiny",
        lm=gpt_run(
            n_layer=4,
            n_embd=64,
            head_dim=32,
            seq_len=64,
            total_tokens=32_768,
            batch_tokens=512,
            micro_batch=8,
            eval_tokens=4_096,
            log_every=2,
            device="cpu",
            evals=2,
        ),
        deep_layers=8,
        moe=MOE,
        image=resnet_run(
            base_width=8, total_images=4096, batch=64, val_images=1024, eval_every=1024, device="cpu"
        ),
        cpus_per_trial=1,
        gpus_per_trial=0,
    ),
    "gpu-small": Scale(
        "gpu-small",
        lm=gpt_run(
            n_layer=8,
            n_embd=256,
            head_dim=64,
            seq_len=256,
            total_tokens=4_194_304,
            batch_tokens=32_768,
            micro_batch=64,
            eval_tokens=262_144,
            log_every=4,
            device="cuda",
        ),
        deep_layers=12,
        moe=MOE,
        image=resnet_run(
            base_width=32, total_images=65_536, batch=256, val_images=4096, eval_every=16_384, noise=4.0
        ),
        cpus_per_trial=2,
        gpus_per_trial=1,
    ),
    "paper": Scale(
        "paper",
        lm=gpt_run(
            n_layer=12,
            n_embd=768,
            head_dim=64,
            seq_len=1024,
            total_tokens=13_107_200_000,
            batch_tokens=524_288,
            micro_batch=16,
            eval_tokens=10_485_760,
            log_every=10,
            device="cuda",
        ),
        deep_layers=24,
        moe=MOE,
        image=resnet_run(
            base_width=64, total_images=5_120_000, batch=512, val_images=10_000, eval_every=512_000
        ),
        cpus_per_trial=8,
        gpus_per_trial=1,
    ),
}
