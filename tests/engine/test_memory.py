"""The memory estimate: exact state bytes from the meta-device model, what each mode and option changes, what
``auto`` picks for the shipped presets. (Per-rank bytes against live FSDP ranks: test_parallel.py.)"""

import pytest

from progrow_ray.engine.config import load_run_config
from progrow_ray.engine.memory import GB, estimate, resolve_parallel
from progrow_ray.orchestration.config import PipelineConfig
from tests.dist import ROOT


def preset(name: str, *sets: str) -> PipelineConfig:
    return load_run_config(ROOT / "jobs" / f"{name}.yaml", list(sets), cls=PipelineConfig)


def test_state_bytes_follow_the_parameter_count_and_the_mode():
    cfg = preset("gpt2-7b-60l")
    target = cfg.target_model_config()
    # blocks, tied wte, wpe, two LayerNorm weights per block and the final one (no biases)
    n = 60 * 12 * 3072**2 + 50304 * 3072 + 1024 * 3072 + (60 * 2 + 1) * 3072
    ddp = estimate(cfg, target, 64, "ddp")
    assert ddp.parameters == ddp.gradients == ddp.optimizer == 4 * n  # fp32 weights, gradients, Muon momentum
    assert ddp.unsharded == 4 * n + 2 * n  # DDP's gradient buckets, autocast's bf16 weight copies
    fsdp = estimate(cfg, target, 64, "fsdp")
    assert fsdp.parameters == pytest.approx(4 * n / 64, rel=0.01)  # rank 0's rows of every tensor
    assert ddp.total / GB > 150 and fsdp.total / GB < 80
    adamw = estimate(preset("gpt2-7b-60l", "optimizer.name=adamw"), target, 64, "fsdp")
    assert adamw.optimizer == 2 * fsdp.optimizer and adamw.newton_schulz == 0


def test_activations_scale_with_the_micro_batch_and_shrink_with_checkpointing():
    cfg = preset("gpt2-124m")
    target = cfg.target_model_config()
    base = estimate(cfg, target, 8, "ddp", activation_checkpointing=False)
    double = estimate(
        preset("gpt2-124m", "train.micro_batch=16"), target, 8, "ddp", activation_checkpointing=False
    )
    assert double.activations == 2 * base.activations
    d, V, T, b = 768, 50304, 1024, cfg.train.micro_batch
    assert base.activations == (12 * 16 * d + 2 * d + 5 * V) * b * T * 2  # bf16 on a GPU
    checkpointed = estimate(cfg, target, 8, "ddp", activation_checkpointing=True)
    assert checkpointed.activations == (12 * d + 16 * d + 2 * d + 5 * V) * b * T * 2
    fp32 = estimate(
        preset("gpt2-124m", "train.dtype=float32"), target, 8, "ddp", activation_checkpointing=False
    )
    assert fp32.activations == 2 * base.activations


def test_owners_share_the_newton_schulz_work():
    cfg = preset("gpt2-24l")
    target = cfg.target_model_config()
    alone, shared = estimate(cfg, target, 1, "fsdp"), estimate(cfg, target, 8, "fsdp")
    assert shared.newton_schulz < alone.newton_schulz
    # the 0-layer model is its vocabulary matrix: split over 8 ranks, each holds ~1/8 of its temporaries
    source = cfg.source_model_config()
    whole = estimate(cfg, source, 8, "fsdp", activation_checkpointing=False)
    unsplit = estimate(preset("gpt2-24l", "optimizer.ns_split=false"), source, 8, "fsdp")
    assert whole.newton_schulz < unsplit.newton_schulz / 4


def test_auto_picks_fsdp_only_where_ddp_does_not_fit():
    small, big = preset("gpt2-124m"), preset("gpt2-7b-60l")
    assert resolve_parallel(small, small.target_model_config(), 8, 80 * GB) == "ddp"
    assert resolve_parallel(big, big.target_model_config(), 64, 80 * GB) == "fsdp"
    assert resolve_parallel(big, big.source_model_config(), 8, 80 * GB) == "ddp"  # phase 1: the 0-layer model
    assert (
        resolve_parallel(big, big.target_model_config(), 64, None) == "ddp"
    )  # on CPU: no GPU limit to guard
    forced = preset("gpt2-124m", "train.parallel=fsdp")
    assert resolve_parallel(forced, forced.target_model_config(), 8, 80 * GB) == "fsdp"
