"""Pure-PyTorch core: models of any depth, depth expansion, Muon-NSGD, WSD, FLOPs, mixing time.

Imports no ray, mlflow or s3fs, so it runs on a laptop, in CI and on a bare GPU box. The names below
are imported on first use (PEP 562), so ``progrow_ray.core.errors`` alone does not import torch: the
tokeniser processes of ``data prepare`` start in a fraction of a second.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ConfigError": "errors",
    "METHODS": "growth",
    "GrowthRecord": "growth",
    "Origin": "growth",
    "check_expansion": "growth",
    "expand_depth": "growth",
    "layout": "growth",
    "build_model": "models",
    "make_config": "models",
    "model_kind": "models",
    "unwrap_model": "models",
    "MuonNSGD": "optim",
    "build_optimizer": "optim",
    "newton_schulz": "optim",
    "sync_param_groups": "optim",
    "WSD": "schedule",
    "Cosine": "schedule",
    "make_schedule": "schedule",
    "step_lr": "schedule",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
