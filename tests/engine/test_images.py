"""ResNet on the generated image set, through the same Trainer as the language models: the data has
class structure, growth at tau works by images, a resumed run repeats the uninterrupted one, and the
image stream is the same for any world size."""

import pytest
import torch

from progrow_ray.core.models import ResNetConfig
from progrow_ray.data.images import SyntheticImageData, synthetic_images
from progrow_ray.engine import Trainer
from progrow_ray.engine.config import RunConfig, from_dict
from progrow_ray.engine.step import plan_batch
from progrow_ray.engine.trainer import default_manager


def test_synthetic_images_are_deterministic_and_learnable():
    x, y = synthetic_images(512, seed=1, noise=1.0)
    x2, y2 = synthetic_images(512, seed=1, noise=1.0)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (512, 3, 32, 32)
    vx, vy = synthetic_images(256, seed=2, noise=1.0)
    assert not torch.equal(x[:256], vx)
    # nearest class mean (from the train split) classifies the val split far above chance (10%)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(vx.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == vy).float().mean() > 0.5
    # image i depends on (seed, i) only: a slice of the stream is the stream's slice
    part, labels = synthetic_images(8, seed=1, noise=1.0, start=100)
    assert torch.equal(part, x[100:108]) and torch.equal(labels, y[100:108])


def test_every_rank_takes_its_slice_of_the_same_global_batch():
    one = SyntheticImageData(classes=10, image_size=16, noise=1.0, seed=0)
    whole = [one.next_batch(8)[0] for _ in range(2)]
    for world in (2, 3, 4):
        ranks = [SyntheticImageData(classes=10, image_size=16, noise=1.0, seed=0) for _ in range(world)]
        plans = [plan_batch(8, 2, rank, world, same_count=False) for rank in range(world)]
        for step in range(2):
            parts = [r.next_batch(8, p.first, p.count)[0] for r, p in zip(ranks, plans) if p.sizes]
            assert torch.equal(torch.cat(parts), whole[step])


def image_run(out: str, **train) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "name": "resnet",
            "out": out,
            "model": {
                "kind": "resnet",
                "blocks": [2, 2, 1, 1],
                "num_classes": 10,
                "base_width": 4,
                "stem": "cifar",
            },
            "growth": {"enabled": True, "source_depth": [1, 1, 1, 1], "method": "random", "tau_frac": 0.5},
            "data": {"source": "synthetic-images", "image_size": 32, "image_noise": 1.0},
            "train": {
                "total_tokens": 512,
                "batch_tokens": 64,
                "micro_batch": 32,
                "eval_every_tokens": 256,
                "eval_tokens": 128,
                "log_every": 1,
                "device": "cpu",
                **train,
            },
            "schedule": {"warmup_frac": 0.02, "decay_frac": 0.2},
        },
    ).validate()


def test_resnet_grows_at_tau_counted_in_images(tmp_path):
    torch.set_num_threads(1)
    cfg = image_run(str(tmp_path))
    trainer = Trainer(cfg, log=lambda _: None)
    r = trainer.run()
    expand = [e for e in trainer.history if e["event"] == "expand"]
    assert [(e["tokens"], e["depth"]) for e in expand] == [(256, [2, 2, 1, 1])]
    target = cfg.target_model_config()
    small = target.with_depth([1, 1, 1, 1]).train_flops_per_unit(image_size=32)
    large = target.train_flops_per_unit(image_size=32)
    assert isinstance(target, ResNetConfig) and r.flops == pytest.approx(small * 256 + large * 256)
    losses = [e["train_loss"] for e in trainer.history if e["event"] == "train"]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    assert 0 <= r.val_accuracy <= 1 and r.tokens == 512 and r.depth == [2, 2, 1, 1]
    evals = [e for e in trainer.history if e["event"] == "eval"]
    assert [e["tokens"] for e in evals] == [256, 512] and all("val_accuracy" in e for e in evals)


def test_resumed_image_run_repeats_the_uninterrupted_one(tmp_path):
    torch.set_num_threads(1)
    full = Trainer(image_run(str(tmp_path / "full")), log=lambda _: None)
    full_result = full.run()
    cfg = image_run(str(tmp_path / "split"))
    Trainer(cfg, log=lambda _: None).run(until_tokens=192)
    _, files = default_manager(cfg).load_latest()
    second = Trainer(cfg, resume=files, log=lambda _: None)
    result = second.run()
    train = [(e["step"], e["train_loss"]) for e in second.history if e["event"] == "train"]
    assert train == [(e["step"], e["train_loss"]) for e in full.history if e["event"] == "train"]
    assert (result.val_loss, result.val_accuracy, result.flops) == (
        full_result.val_loss,
        full_result.val_accuracy,
        full_result.flops,
    )
