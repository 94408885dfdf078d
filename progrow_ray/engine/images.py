"""ResNet on images: a generated image set and a training loop with the same optimizer, schedule and
depth expansion as the token engine, counted in images instead of tokens.

No image set ships with our dependencies and nothing may download, so ``synthetic_images`` makes
one: each class is a fixed random low-frequency colour pattern; an image is its class pattern, shifted
by up to ``size // 8`` pixels, scaled in contrast, plus Gaussian noise. Hard enough that a deeper
ResNet learns faster than [1, 1, 1, 1], cheap enough for two CPU cores.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..core.flops import train_flops_per_image
from ..core.growth import expand_depth
from ..core.models import ResNetConfig, build_model
from ..core.optim import build_optimizer, set_lr
from ..core.schedule import make_schedule, step_lr
from ..core.errors import require


def synthetic_images(n: int, *, classes: int = 10, size: int = 32, noise: float = 2.5, seed: int = 0,
                     pattern_seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) and labels; the class patterns depend on ``pattern_seed`` only,
    so train and validation sets drawn with different ``seed`` share them."""
    g = torch.Generator().manual_seed(pattern_seed)
    low = torch.randn(classes, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    patterns = patterns / patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    shift = size // 8
    dx = torch.randint(-shift, shift + 1, (n,), generator=g)
    dy = torch.randint(-shift, shift + 1, (n,), generator=g)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    images = torch.stack([torch.roll(patterns[c], (int(a), int(b)), dims=(1, 2)) for c, a, b in zip(labels, dx, dy)])
    images = contrast * images + noise * torch.randn(images.shape, generator=g)
    return images, labels


@dataclass(frozen=True)
class ImageRun:
    target: ResNetConfig
    source_blocks: tuple[int, ...] | None = (1, 1, 1, 1)  # None: fixed-size
    method: str = "random"
    tau_frac: float = 0.5
    total_images: int = 8192
    batch: int = 64
    lr: float = 0.01
    weight_decay: float = 0.1
    optimizer: str = "muon_nsgd"
    schedule: str = "wsd"
    warmup_frac: float = 0.02
    decay_frac: float = 0.2
    image_size: int = 32
    val_images: int = 1024
    eval_every: int = 2048
    noise: float = 2.5  # pixel noise std against unit-std class patterns: the task's difficulty
    seed: int = 0


def train_images(run: ImageRun, *, device: str = "cpu", on_metrics=None) -> dict:
    """Train (and grow) a ResNet on ``synthetic_images``; returns final val loss / accuracy, FLOPs and
    the metric history (``tokens`` holds images, so curves read like the token engine's)."""
    require(run.total_images % run.batch == 0, "total_images must be a multiple of batch")
    dev = torch.device(device)
    torch.manual_seed(run.seed)
    train_x, train_y = synthetic_images(run.total_images, size=run.image_size, noise=run.noise, seed=run.seed + 1)
    val_x, val_y = synthetic_images(run.val_images, size=run.image_size, noise=run.noise, seed=10_000 + run.seed)
    cfg = run.target if run.source_blocks is None else dataclasses.replace(run.target, blocks=tuple(run.source_blocks))
    model = build_model(cfg).to(dev)
    opt = build_optimizer(model, run.optimizer, lr=run.lr, weight_decay=run.weight_decay)
    schedule = make_schedule(run.schedule, run.total_images, run.warmup_frac, run.decay_frac)
    tau = int(run.tau_frac * run.total_images) // run.batch * run.batch
    history, seen, flops, started = [], 0, 0.0, time.time()

    def emit(event: dict) -> None:
        history.append(event)
        if on_metrics:
            on_metrics(event)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        losses, correct = [], 0
        for i in range(0, run.val_images, 256):
            logits, loss = model(val_x[i:i + 256].to(dev), val_y[i:i + 256].to(dev))
            losses.append(loss.item() * len(logits))
            correct += (logits.argmax(-1).cpu() == val_y[i:i + 256]).sum().item()
        model.train()
        return sum(losses) / run.val_images, correct / run.val_images

    step = 0
    while seen < run.total_images:
        if run.source_blocks is not None and seen >= tau and tuple(model.config.blocks) != tuple(run.target.blocks):
            expand_depth(model, list(run.target.blocks), run.method, optimizer=opt, generator_seed=run.seed + 17)
            emit({"event": "expand", "step": step, "tokens": seen, "flops": flops, "depth": list(model.config.blocks)})
        set_lr(opt, step_lr(schedule, run.lr, seen, run.batch))
        x, y = train_x[seen:seen + run.batch].to(dev), train_y[seen:seen + run.batch].to(dev)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += run.batch
        step += 1
        flops += train_flops_per_image(model.config, run.image_size) * run.batch
        emit({"event": "train", "step": step, "tokens": seen, "flops": flops, "train_loss": loss.item(),
              "depth": list(model.config.blocks)})
        if seen % run.eval_every == 0 or seen >= run.total_images:
            val_loss, acc = evaluate()
            emit({"event": "eval", "step": step, "tokens": seen, "flops": flops, "val_loss": val_loss,
                  "val_accuracy": acc})
    val_loss, acc = evaluate()
    return {"val_loss": val_loss, "val_accuracy": acc, "flops": flops, "tokens": seen, "history": history,
            "wall_s": time.time() - started}
