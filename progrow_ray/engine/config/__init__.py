"""Run configuration: the schema (``schema.py``), loading and overrides (``loading.py``) and the checks
(``checks.py``). One ``RunConfig`` describes one fixed-size or progressive run; the Ray pipeline adds
its own sections on top (``orchestration/config.py``)."""

from .checks import GPT2_VOCAB, check_batch, check_run_config
from .loading import deep_merge, from_dict, load_config, load_run_config, parse_overrides, read_yaml, to_dict
from .schema import DataSection, GrowthSection, OptimizerSection, RunConfig, ScheduleSection, TrainSection

__all__ = [
    "GPT2_VOCAB",
    "DataSection",
    "GrowthSection",
    "OptimizerSection",
    "RunConfig",
    "ScheduleSection",
    "TrainSection",
    "check_batch",
    "check_run_config",
    "deep_merge",
    "from_dict",
    "load_config",
    "load_run_config",
    "parse_overrides",
    "read_yaml",
    "to_dict",
]
