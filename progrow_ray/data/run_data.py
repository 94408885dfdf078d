"""The data a run trains on, chosen by the unit its model counts in: token windows for language
models, generated images for ResNet. Both give the Trainer the same interface (``TokenData``,
``SyntheticImageData``): ``next_batch(global_examples, rank, world)``, ``eval_batches``, ``units_per_example``,
``vocab_size`` and a resumable ``state_dict``."""

from __future__ import annotations

from ..core.errors import require
from .images import SYNTHETIC_IMAGES, SyntheticImageData
from .sampler import TokenData


def open_run_data(data, model_config, seed: int) -> TokenData | SyntheticImageData:
    """``data`` is a run's ``DataSection``; ``model_config`` the model's config (its ``unit``)."""
    if model_config.unit == "image":
        require(data.source == SYNTHETIC_IMAGES,
                f"data.source for an image model must be {SYNTHETIC_IMAGES!r} (the generated image set; no "
                f"image-file reader ships yet), got {data.source!r}")
        return SyntheticImageData(classes=model_config.num_classes, image_size=data.image_size,
                                  noise=data.image_noise, seed=seed)
    require(data.source != SYNTHETIC_IMAGES, f"data.source={SYNTHETIC_IMAGES!r} needs an image model (model.kind=resnet)")
    return TokenData(data.uri, data.seq_len, seed, data.verify, data.cache_dir, data.cache_max_gb,
                     data.block_shards)
