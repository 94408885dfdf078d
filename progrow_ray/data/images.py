"""Generated images for the ResNet testbed, as a stream the Trainer reads like token windows.

No image set ships with our dependencies and nothing may download, so the images are made: each class
is a fixed random low-frequency colour pattern; an image is its class pattern, shifted by up to
``size // 8`` pixels, scaled in contrast, plus Gaussian noise. Hard enough that a deeper ResNet learns
faster than [1, 1, 1, 1], cheap enough for two CPU cores.

Image ``i`` of a stream depends only on (seed, i), so — like the token sampler — every global batch holds
the same images whatever the world size, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np
import torch

from ..core.errors import require

SYNTHETIC_IMAGES = "synthetic-images"  # the data.source of image runs
VAL_SEED_OFFSET = 10_000  # the validation stream: disjoint seeds from the training stream's
PATTERN_SEED = 1234  # class patterns are shared by the train and validation streams


@lru_cache(maxsize=4)
def class_patterns(classes: int, size: int, pattern_seed: int = PATTERN_SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(pattern_seed)
    low = torch.randn(classes, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return patterns / patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)


def synthetic_images(n: int, *, classes: int = 10, size: int = 32, noise: float = 2.5, seed: int = 0,
                     start: int = 0, pattern_seed: int = PATTERN_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start .. start + n`` of stream ``seed`` ((n, 3, size, size) floats) and their labels."""
    patterns = class_patterns(classes, size, pattern_seed)
    shift = size // 8
    images, labels = [], []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        label = int(torch.randint(0, classes, (1,), generator=g))
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
        contrast = 0.5 + float(torch.rand(1, generator=g))
        image = contrast * torch.roll(patterns[label], (dx, dy), dims=(1, 2))
        images.append(image + noise * torch.randn(image.shape, generator=g))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class SyntheticImageData:
    """The Trainer's data for image models: a training stream (state = images consumed) and a fixed
    validation set. Counts in images: one example is one unit."""

    units_per_example = 1
    vocab_size = None

    def __init__(self, *, classes: int, image_size: int, noise: float, seed: int):
        require(image_size >= 8, f"data.image_size must be >= 8, got {image_size}")
        require(noise >= 0, f"data.image_noise must be >= 0, got {noise}")
        self.classes, self.size, self.noise, self.seed = classes, image_size, noise, seed
        self.consumed = 0

    def _images(self, n: int, start: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return synthetic_images(n, classes=self.classes, size=self.size, noise=self.noise, seed=seed, start=start)

    def next_batch(self, global_examples: int, first: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``first .. first + count`` of the next global batch (default: all of it); every rank
        advances by the global amount."""
        count = global_examples - first if count is None else count
        require(0 <= first and count >= 1 and first + count <= global_examples,
                f"images {first}..{first + count} are not in a global batch of {global_examples}")
        start = self.consumed + first
        self.consumed += global_examples
        return self._images(count, start, self.seed)

    def eval_batches(self, max_units: int, micro_batch: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``max_units`` images of the validation stream; rank ``r`` takes every W-th micro-batch."""
        starts = list(range(0, max_units, micro_batch))[rank::world_size]
        for s in starts:
            yield self._images(min(micro_batch, max_units - s), s, self.seed + VAL_SEED_OFFSET)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "image_size": self.size, "consumed_images": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        require(state.get("seed") == self.seed and state.get("image_size") == self.size,
                f"checkpoint image stream ({state}) does not match the run (seed {self.seed}, size {self.size})")
        self.consumed = int(state["consumed_images"])
