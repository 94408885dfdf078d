"""Learning-rate schedules as functions of *tokens seen*, returning a multiplier of the peak LR.

Because mixing needs tokens, not iterations (paper §C.3), phase 2 may use a larger global batch;
a schedule indexed by tokens keeps its position across that change. The engine evaluates the
schedule at the middle of each step's token interval, so the first step has a small non-zero LR and
the last step a small non-zero one, whatever the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import require

DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


@dataclass(frozen=True)
class WSD:
    """Warmup-stable-decay: linear warmup, constant, then decay to ``final_frac`` of the peak.

    Paper defaults: 2% warmup; 10% (long runs, its Figure 1 recipe) to 20% decay; decay to 0.
    """

    total_tokens: int
    warmup_frac: float = 0.02
    decay_frac: float = 0.1
    decay_shape: str = "linear"
    final_frac: float = 0.0

    def __post_init__(self) -> None:
        require(self.total_tokens > 0, f"schedule total tokens must be > 0, got {self.total_tokens}")
        require(0 <= self.warmup_frac < 1, f"schedule.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        require(0 < self.decay_frac <= 1, f"schedule.decay_frac must be in (0, 1], got {self.decay_frac}")
        require(
            self.warmup_frac + self.decay_frac <= 1,
            f"schedule.warmup_frac + decay_frac must be <= 1, got {self.warmup_frac} + {self.decay_frac}",
        )
        require(
            self.decay_shape in DECAY_SHAPES,
            f"schedule.decay_shape must be one of {list(DECAY_SHAPES)}, got {self.decay_shape!r}",
        )
        require(0 <= self.final_frac <= 1, f"schedule.final_frac must be in [0, 1], got {self.final_frac}")

    @property
    def warmup_tokens(self) -> float:
        return self.warmup_frac * self.total_tokens

    @property
    def stable_end_tokens(self) -> float:
        """Where the decay starts: warmup + stable. τ must come before it, by the mixing time (paper §5.2)."""
        return (1 - self.decay_frac) * self.total_tokens

    def __call__(self, tokens: float) -> float:
        t = min(max(tokens, 0.0), self.total_tokens)
        if t < self.warmup_tokens:
            return t / self.warmup_tokens
        if t <= self.stable_end_tokens:
            return 1.0
        progress = (t - self.stable_end_tokens) / (self.total_tokens - self.stable_end_tokens)
        return self.final_frac + (1 - self.final_frac) * decay_curve(self.decay_shape, progress)


@dataclass(frozen=True)
class Cosine:
    """Linear warmup then cosine decay to ``final_frac`` of the peak at ``total_tokens``."""

    total_tokens: int
    warmup_frac: float = 0.02
    final_frac: float = 0.0

    def __post_init__(self) -> None:
        require(self.total_tokens > 0, f"schedule total tokens must be > 0, got {self.total_tokens}")
        require(0 <= self.warmup_frac < 1, f"schedule.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        require(0 <= self.final_frac <= 1, f"schedule.final_frac must be in [0, 1], got {self.final_frac}")

    @property
    def warmup_tokens(self) -> float:
        return self.warmup_frac * self.total_tokens

    @property
    def stable_end_tokens(self) -> float:
        """Cosine has no stable phase: the LR starts to fall right after warmup."""
        return self.warmup_tokens

    def __call__(self, tokens: float) -> float:
        t = min(max(tokens, 0.0), self.total_tokens)
        if t < self.warmup_tokens:
            return t / self.warmup_tokens
        progress = (t - self.warmup_tokens) / (self.total_tokens - self.warmup_tokens)
        return self.final_frac + (1 - self.final_frac) * decay_curve("cosine", progress)


def decay_curve(shape: str, progress: float) -> float:
    """1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(
    name: str,
    total_tokens: int,
    warmup_frac: float = 0.02,
    decay_frac: float = 0.1,
    decay_shape: str = "linear",
    final_frac: float = 0.0,
):
    require(name in ("wsd", "cosine"), f"schedule.name must be 'wsd' or 'cosine', got {name!r}")
    if name == "wsd":
        return WSD(total_tokens, warmup_frac, decay_frac, decay_shape, final_frac)
    return Cosine(total_tokens, warmup_frac, final_frac)


def step_lr(schedule, peak_lr: float, tokens_before: int, step_tokens: int) -> float:
    """LR for the step that consumes tokens [tokens_before, tokens_before + step_tokens)."""
    return peak_lr * schedule(tokens_before + step_tokens / 2)
