"""The testbed models, each a config dataclass + an ``ExpandableModel`` (see ``base.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError
from .base import ExpandableModel, LanguageModelConfig, ModelConfig, unwrap_model
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .moe import MoEConfig, MoEGPT
from .resnet import ResNet, ResNetConfig

MODELS: dict[str, tuple[type[ModelConfig], type[ExpandableModel]]] = {
    "gpt": (GPTConfig, GPT),
    "moe": (MoEConfig, MoEGPT),
    "resnet": (ResNetConfig, ResNet),
    "llama": (LlamaConfig, Llama),
}


def model_config_class(kind: str) -> type[ModelConfig]:
    if kind not in MODELS:
        raise ConfigError(f"model.kind must be one of {sorted(MODELS)}, got {kind!r}")
    return MODELS[kind][0]


def make_config(kind: str, **fields: Any):
    """Config dataclass of model ``kind`` from plain fields; unknown kinds or fields are ConfigErrors."""
    config_cls = model_config_class(kind)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown model field(s) {unknown} for model.kind={kind!r}; known: {sorted(known)}")
    return config_cls(**fields)


def build_model(kind_or_config, **fields: Any) -> ExpandableModel:
    """``build_model("gpt", n_layer=0)`` or ``build_model(GPTConfig(...))``."""
    if isinstance(kind_or_config, str):
        config = make_config(kind_or_config, **fields)
    else:
        config = kind_or_config
    for config_cls, model_cls in MODELS.values():
        if type(config) is config_cls:
            return model_cls(config)
    raise ConfigError(f"no model for config type {type(config).__name__}")


def model_kind(config) -> str:
    for kind, (config_cls, _) in MODELS.items():
        if type(config) is config_cls:
            return kind
    raise ConfigError(f"no model kind for config type {type(config).__name__}")


__all__ = [
    "MODELS",
    "ExpandableModel",
    "GPT",
    "GPTConfig",
    "LanguageModelConfig",
    "Llama",
    "LlamaConfig",
    "ModelConfig",
    "MoEConfig",
    "MoEGPT",
    "ResNet",
    "ResNetConfig",
    "build_model",
    "make_config",
    "model_config_class",
    "model_kind",
    "unwrap_model",
]
