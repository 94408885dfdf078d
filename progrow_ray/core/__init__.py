"""Pure-PyTorch core: models of any depth, depth expansion, Muon-NSGD, WSD, FLOPs, mixing time.

Imports no ray, mlflow or s3fs, so it runs on a laptop, in CI and on a bare GPU box.
"""

from .errors import ConfigError
from .growth import METHODS, GrowthRecord, Origin, check_expansion, expand_depth, layout
from .models import build_model, make_config, model_kind, unwrap_model
from .optim import MuonNSGD, build_optimizer, newton_schulz, sync_param_groups
from .schedule import WSD, Cosine, make_schedule, step_lr

__all__ = [
    "ConfigError",
    "METHODS",
    "GrowthRecord",
    "Origin",
    "check_expansion",
    "expand_depth",
    "layout",
    "build_model",
    "make_config",
    "model_kind",
    "unwrap_model",
    "MuonNSGD",
    "build_optimizer",
    "newton_schulz",
    "sync_param_groups",
    "WSD",
    "Cosine",
    "make_schedule",
    "step_lr",
]
