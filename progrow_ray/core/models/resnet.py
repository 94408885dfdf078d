"""Bottleneck ResNet with four stages and any number of blocks per stage.

Each stage's first block changes shape (stride / channels, projection shortcut) and is never
expanded; the remaining identity-shape blocks of a stage are its expandable depth group. So the
paper's zero-layer analog is ``[1, 1, 1, 1]`` (ResNet14), one-layer ``[2, 2, 2, 2]`` (ResNet26),
and the target ``[3, 4, 6, 3]`` (ResNet50).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import require
from .base import ExpandableModel, ModelConfig, check_convention, cross_entropy

EXPANSION = 4  # bottleneck output channels = 4 x its width


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int = 1000
    base_width: int = 64  # stage widths are base_width * (1, 2, 4, 8)
    in_channels: int = 3
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": 3x3/1 conv, no pool

    unit = "image"
    depth_field = "blocks"
    width_field = "base_width"
    width_step = 8  # channels

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        require(
            len(self.blocks) == 4 and all(isinstance(b, int) and b >= 1 for b in self.blocks),
            f"model.blocks must be 4 ints >= 1 (e.g. [1, 1, 1, 1] or [3, 4, 6, 3]), got {list(self.blocks)}",
        )
        require(self.num_classes > 0, f"model.num_classes must be > 0, got {self.num_classes}")
        require(self.base_width > 0, f"model.base_width must be > 0, got {self.base_width}")
        require(
            self.stem in ("imagenet", "cifar"), f"model.stem must be 'imagenet' or 'cifar', got {self.stem!r}"
        )

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in (1, 2, 4, 8))

    @property
    def depth(self) -> list[int]:
        """Blocks per stage: what ``expand_depth`` takes (e.g. [1, 1, 1, 1] -> [3, 4, 6, 3])."""
        return list(self.blocks)

    @property
    def conventional_depth(self) -> int:
        """The name's number (ResNet50): 3 convs per bottleneck + stem conv + classifier."""
        return 3 * sum(self.blocks) + 2

    def train_flops_per_unit(
        self, seq_len: int | None = None, image_size: int = 224, convention: str = "full"
    ) -> float:
        """Per image: forward conv + fc FLOPs, times 3 for training, less the stem conv's input gradient
        (images need none). ResNet has no embedding, so both conventions count the same."""
        check_convention(convention)
        s = image_size
        w0 = self.widths[0]
        if self.stem == "imagenet":
            s = (s + 2 * 3 - 7) // 2 + 1
            stem = _conv_flops(self.in_channels, w0, 7, s)
            s = (s + 2 - 3) // 2 + 1
        else:
            stem = _conv_flops(self.in_channels, w0, 3, s)
        fwd, cin = 0.0, w0
        for stage, (n, width) in enumerate(zip(self.blocks, self.widths)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                out = (s + 2 - 3) // stride + 1
                fwd += (
                    _conv_flops(cin, width, 1, s)
                    + _conv_flops(width, width, 3, out)
                    + _conv_flops(width, width * EXPANSION, 1, out)
                )
                if b == 0 and (stride != 1 or cin != width * EXPANSION):
                    fwd += _conv_flops(cin, width * EXPANSION, 1, out)
                cin, s = width * EXPANSION, out
        fwd += 2.0 * cin * self.num_classes
        return 3.0 * (fwd + stem) - stem


def _conv_flops(cin: int, cout: int, k: int, hw: int) -> float:
    return 2.0 * cin * cout * k * k * hw * hw


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class Stage(nn.Module):
    def __init__(self, first: Bottleneck, rest: nn.ModuleList):
        super().__init__()
        self.first = first
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        for block in self.rest:
            x = block(x)
        return x


class ResNet(ExpandableModel):
    config: ResNetConfig

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        w0 = config.widths[0]
        if config.stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_channels, w0, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_channels, w0, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(inplace=True),
            )
        nn.init.kaiming_normal_(self.stem[0].weight, mode="fan_out", nonlinearity="relu")
        stages, in_ch = [], w0
        for s, (n, width) in enumerate(zip(config.blocks, config.widths)):
            first = Bottleneck(in_ch, width, stride=1 if s == 0 else 2)
            in_ch = width * EXPANSION
            rest = nn.ModuleList(self.new_block(f"stage{s + 1}", i, n - 1) for i in range(n - 1))
            stages.append(Stage(first, rest))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(in_ch, config.num_classes)

    # ---- ExpandableModel ------------------------------------------------------------------------
    def depth_groups(self) -> dict[str, nn.ModuleList]:
        return {f"stage{s + 1}": stage.rest for s, stage in enumerate(self.stages)}

    def group_depths_for(self, target) -> dict[str, int]:
        require(
            isinstance(target, Sequence)
            and len(target) == 4
            and all(isinstance(t, int) and t >= 1 for t in target),
            f"target depth for a ResNet must be 4 blocks-per-stage ints, e.g. [3, 4, 6, 3]; got {target!r}",
        )
        return {f"stage{s + 1}": t - 1 for s, t in enumerate(target)}

    def new_block(self, group: str, position: int, group_depth: int) -> nn.Module:
        width = self.config.widths[int(group.removeprefix("stage")) - 1]
        return Bottleneck(width * EXPANSION, width, stride=1)

    def set_group_depths(self, depths: Mapping[str, int]) -> None:
        self.config = replace(self.config, blocks=tuple(depths[f"stage{s + 1}"] + 1 for s in range(4)))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        logits = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return logits, (cross_entropy(logits, targets) if targets is not None else None)
