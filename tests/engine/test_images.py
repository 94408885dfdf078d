"""ResNet on the generated image set: the data has class structure, and growth at tau works by images."""

import pytest
import torch

from progrow_ray.core.flops import train_flops_per_image
from progrow_ray.core.models import ResNetConfig
from progrow_ray.engine.images import ImageRun, synthetic_images, train_images


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


def test_resnet_grows_at_tau_counted_in_images():
    torch.set_num_threads(1)
    target = ResNetConfig(blocks=(2, 2, 1, 1), num_classes=10, base_width=4, stem="cifar")
    run = ImageRun(target=target, source_blocks=(1, 1, 1, 1), method="random", tau_frac=0.5, total_images=512,
                   batch=64, val_images=128, eval_every=256, noise=1.0)
    r = train_images(run)
    expand = [e for e in r["history"] if e["event"] == "expand"]
    assert [(e["tokens"], e["depth"]) for e in expand] == [(256, [2, 2, 1, 1])]
    small = train_flops_per_image(ResNetConfig(**{**target.__dict__, "blocks": (1, 1, 1, 1)}), 32)
    large = train_flops_per_image(target, 32)
    assert r["flops"] == pytest.approx(small * 256 + large * 256)
    losses = [e["train_loss"] for e in r["history"] if e["event"] == "train"]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    assert 0 <= r["val_accuracy"] <= 1 and r["tokens"] == 512
