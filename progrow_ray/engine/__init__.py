"""Single-process / single-rank training engine: loop, evaluation, checkpoints, config. No Ray."""

from .checkpoint import CheckpointError, CheckpointManager, read_checkpoint, write_checkpoint
from .config import RunConfig, load_run_config
from .trainer import NonFiniteLossError, Trainer

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "read_checkpoint",
    "write_checkpoint",
    "RunConfig",
    "load_run_config",
    "NonFiniteLossError",
    "Trainer",
]
