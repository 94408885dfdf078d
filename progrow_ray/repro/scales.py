"""Sizes of the reproduction runs. Each scale gives the base run config of every testbed; the
experiments change only what their figure varies.

cpu-tiny   each experiment <= 15 min on 2 CPU cores: d=64 GPT-2 (GPT-2 BPE, 64-token context) on the
           standard library's source, 32k tokens per run; ResNet base width 8 on 32x32 generated images.
gpu-small  each experiment <= 10 min on one H100: d=256, 256-token context, 4M tokens per run.
paper      the paper's GPT-2 124M setting (App. A: batch 512 x 1024, WSD 2% / 20%, lr 0.01) on the
           prepared corpus you point data.uri at; sized for a cluster, not a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    lm: dict  # a RunConfig dict for the GPT testbed (target depth = model.n_layer)
    deep_layers: int  # the target depth of experiments that need room for multi-layer sources
    moe: dict  # model overrides for the MoE testbed
    image: dict  # ImageRun fields for the ResNet testbed
    cpus_per_trial: float
    gpus_per_trial: float


def _lm(n_layer, n_embd, head_dim, seq, total, batch, micro, eval_tokens, log_every, device="auto", evals=4):
    return {
        "model": {"kind": "gpt", "n_layer": n_layer, "n_embd": n_embd, "head_dim": head_dim},
        "growth": {"enabled": False, "source_depth": 0, "method": "random", "tau_frac": 0.5},
        "data": {"source": "stdlib", "uri": "data/stdlib-gpt2", "seq_len": seq, "max_source_bytes": 8_000_000},
        "train": {"total_tokens": total, "batch_tokens": batch, "micro_batch": micro, "eval_every_tokens": total // evals,
                  "eval_tokens": eval_tokens, "log_every": log_every, "checkpoint_every_tokens": None,
                  "device": device, "seed": 0},
        "optimizer": {"name": "muon_nsgd", "lr": 0.01, "weight_decay": 0.1},
        "schedule": {"name": "wsd", "warmup_frac": 0.02, "decay_frac": 0.2},
    }


SCALES = {
    "cpu-tiny": Scale(
        "cpu-tiny",
        lm=_lm(4, 64, 32, 64, 32_768, 512, 8, 4_096, 2, device="cpu", evals=2),
        deep_layers=8,
        moe={"kind": "moe", "n_experts": 8, "top_k": 2, "moe_every": 1},
        image={"target": {"blocks": [3, 4, 6, 3], "num_classes": 10, "base_width": 8, "stem": "cifar"},
               "total_images": 4096, "batch": 64, "image_size": 32, "val_images": 1024, "eval_every": 1024},
        cpus_per_trial=1, gpus_per_trial=0),
    "gpu-small": Scale(
        "gpu-small",
        lm=_lm(8, 256, 64, 256, 4_194_304, 32_768, 64, 262_144, 4, device="cuda"),
        deep_layers=12,
        moe={"kind": "moe", "n_experts": 8, "top_k": 2, "moe_every": 1},
        image={"target": {"blocks": [3, 4, 6, 3], "num_classes": 10, "base_width": 32, "stem": "cifar"},
               "total_images": 65_536, "batch": 256, "image_size": 32, "val_images": 4096, "eval_every": 16_384,
               "noise": 4.0},
        cpus_per_trial=2, gpus_per_trial=1),
    "paper": Scale(
        "paper",
        lm=_lm(12, 768, 64, 1024, 13_107_200_000, 524_288, 16, 10_485_760, 10, device="cuda"),
        deep_layers=24,
        moe={"kind": "moe", "n_experts": 8, "top_k": 2, "moe_every": 1},
        image={"target": {"blocks": [3, 4, 6, 3], "num_classes": 10, "base_width": 64, "stem": "cifar"},
               "total_images": 5_120_000, "batch": 512, "image_size": 32, "val_images": 10_000, "eval_every": 512_000},
        cpus_per_trial=8, gpus_per_trial=1),
}
