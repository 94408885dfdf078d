"""Mixing time and the choice of τ (paper §5 and recipe step 4).

t_mix is the number of tokens after the expansion that the progressive run needs until its loss
meets the fixed-size run's: here, until the smoothed relative gap (prog - fixed) / fixed falls to
``rel_tol`` and stays there for ``window_tokens``. Under WSD it hardly depends on when the expansion
happens during the stable phase (Takeaway 6), so two short runs with the expansion right after
warmup measure it, and the full run expands at τ = end of the stable phase − t_mix.

Early in training every depth learns the same unigram statistics, so a freshly expanded model "meets"
the fixed one almost at once — a meeting that says nothing about how long depth takes to pay off.
Given a third curve, the source model never expanded, mixing only counts from a point where depth
has a measurable advantage: (source - fixed) / fixed >= ``min_advantage_rel``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import require


@dataclass(frozen=True)
class MixResult:
    mixed: bool
    t_mix_tokens: int | None  # tokens after the expansion until mixed; None if never
    mixed_at_tokens: int | None  # absolute token count where the mixed window starts
    gap_after_mix_rel: float | None  # worst smoothed relative gap inside the mixed window
    last_gap_rel: float  # smoothed relative gap at the last common point
    depth_advantage_rel: float | None = (
        None  # (source - fixed) / fixed at the last point, if a source curve was given
    )
    note: str = ""  # why it did not mix, in words

    def to_dict(self) -> dict:
        return asdict(self)


def ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Bias-corrected exponential moving average; ``alpha`` = weight of the past (0 = none)."""
    require(0 <= alpha < 1, f"smoothing must be in [0, 1), got {alpha}")
    if alpha == 0 or len(values) == 0:
        return values.astype(float)
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out[i] = acc / (1 - alpha ** (i + 1))
    return out


def _curve(tokens: Sequence[float], losses: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    t, loss = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    require(
        t.ndim == 1 and t.shape == loss.shape and len(t) > 0,
        f"{name}: tokens and losses must be equal-length 1-D, non-empty",
    )
    require(bool(np.all(np.isfinite(loss))), f"{name}: losses must be finite")
    order = np.argsort(t, kind="stable")
    return t[order], loss[order]


def t_mix(
    fixed_tokens: Sequence[float],
    fixed_loss: Sequence[float],
    prog_tokens: Sequence[float],
    prog_loss: Sequence[float],
    expand_at_tokens: float,
    rel_tol: float = 0.01,
    window_tokens: float = 0.0,
    smoothing: float = 0.0,
    source_tokens: Sequence[float] | None = None,
    source_loss: Sequence[float] | None = None,
    min_advantage_rel: float = 0.0,
) -> MixResult:
    """Mixing time of a progressive curve against a fixed-size one (both loss vs tokens).

    The fixed curve is interpolated at the progressive curve's points after the expansion; a point
    counts as mixed when every gap from it to ``window_tokens`` later is <= ``rel_tol`` — and that
    whole window must have been observed. With a ``source`` curve (the small model, never expanded),
    the window must also start where the fixed model beats the source by ``min_advantage_rel``.
    """
    require(rel_tol >= 0, f"rel_tol must be >= 0, got {rel_tol}")
    require(min_advantage_rel >= 0, f"min_advantage_rel must be >= 0, got {min_advantage_rel}")
    require(window_tokens >= 0, f"window_tokens must be >= 0, got {window_tokens}")
    ft, fl = _curve(fixed_tokens, fixed_loss, "fixed curve")
    pt, pl = _curve(prog_tokens, prog_loss, "progressive curve")
    fl, pl = ema(fl, smoothing), ema(pl, smoothing)
    keep = (pt >= expand_at_tokens) & (pt >= ft[0]) & (pt <= ft[-1])
    require(bool(keep.any()), "the curves share no point after the expansion: run them longer")
    pt, pl = pt[keep], pl[keep]
    fixed_at = np.interp(pt, ft, fl)
    gap = (pl - fixed_at) / fixed_at
    last = float(gap[-1])
    ok = gap <= rel_tol
    advantage = None
    if source_tokens is not None:
        st, sl = _curve(source_tokens, source_loss, "source curve")
        advantage = (np.interp(pt, st, ema(sl, smoothing)) - fixed_at) / fixed_at
        advantage[pt > st[-1]] = -np.inf  # not observed: cannot count
    can_start = np.ones(len(pt), bool) if advantage is None else advantage >= min_advantage_rel
    for i in range(len(pt)):
        end = pt[i] + window_tokens
        if end > pt[-1]:
            break
        inside = (pt >= pt[i]) & (pt <= end)
        if can_start[i] and ok[inside].all():
            start = int(round(pt[i]))
            return MixResult(
                True,
                int(round(pt[i] - expand_at_tokens)),
                start,
                float(gap[inside].max()),
                last,
                None if advantage is None else float(advantage[i]),
            )
    last_adv = None if advantage is None or not np.isfinite(advantage[-1]) else float(advantage[-1])
    if advantage is not None and not can_start.any():
        note = (
            f"depth showed no measurable advantage within the search (the fixed model beats the source by "
            f"{last_adv if last_adv is not None else float('nan'):+.2%} < {min_advantage_rel:.2%})"
        )
    else:
        note = f"the curves did not mix within the search (last gap {last:+.2%})"
    return MixResult(False, None, None, None, last, last_adv, note)


@dataclass(frozen=True)
class TauPlan:
    expand: bool  # False: train fixed-size (τ = 0 means the large model from the start)
    tau_tokens: int
    t_mix_tokens: int | None
    flops_fraction: float  # (progressive + search) / fixed-size FLOPs (> 1 possible: search is sunk)
    predicted_gap_rel: float | None
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def plan_tau(
    mix: MixResult,
    *,
    total_tokens: int,
    warmup_tokens: float,
    stable_end_tokens: float,
    small_flops_per_token: float,
    large_flops_per_token: float,
    search_flops: float = 0.0,
    safety: float = 0.0,
    align=None,
) -> TauPlan:
    """τ = end of stable phase − t_mix·(1 + safety), clamped to [end of warmup, end of stable phase].

        Falls back to fixed-size training (``expand=False``, τ = 0) when the curves did not mix, or when
        mixing needs more tokens than the stable phase has. ``align`` maps τ to a step boundary (whole
        batches of both phases) before FLOPs and the verdict are computed. The search is a sunk cost when τ is
    chosen,
        so it does not change the decision; the verdict states the saving both with and without it.
    """
    require(
        total_tokens > 0 and 0 <= warmup_tokens <= stable_end_tokens <= total_tokens,
        "need 0 <= warmup end <= stable end <= total tokens",
    )
    require(safety >= 0, f"safety must be >= 0, got {safety}")
    fixed = large_flops_per_token * total_tokens

    def fixed_size(reason: str) -> TauPlan:
        return TauPlan(
            False,
            0,
            mix.t_mix_tokens,
            (fixed + search_flops) / fixed,
            0.0,
            f"no saving at this horizon: {reason}; train fixed-size",
        )

    if not mix.mixed:
        return fixed_size(
            mix.note or f"the curves did not mix within the search (last gap {mix.last_gap_rel:+.2%})"
        )
    needed = mix.t_mix_tokens * (1 + safety)
    tau = stable_end_tokens - needed
    if tau <= warmup_tokens:
        return fixed_size(
            f"mixing needs {needed:,.0f} tokens but the stable phase after warmup has "
            f"{stable_end_tokens - warmup_tokens:,.0f}"
        )
    tau = int(min(tau, stable_end_tokens - 1))  # a t_mix of 0 still leaves τ inside the stable phase
    if align is not None:
        tau = int(align(tau))
    progressive = small_flops_per_token * tau + large_flops_per_token * (total_tokens - tau)
    if progressive >= fixed:
        return fixed_size("the small model costs as much per token as the large one")
    fraction = (progressive + search_flops) / fixed
    gap = max(mix.gap_after_mix_rel or 0.0, 0.0)
    net = (
        f"{1 - fraction:.1%} net of the search"
        if fraction < 1
        else f"the search cost {fraction - progressive / fixed:.1%} of a fixed run, more than this run "
        f"saves; "
        "t_mix transfers across runs and sizes, reuse it"
    )
    verdict = (
        f"expand at tau = {tau:,} tokens ({tau / total_tokens:.0%} of the horizon): saves "
        f"{1 - progressive / fixed:.1%} FLOPs ({net}) at a predicted final loss gap <= {gap:.2%}"
    )
    return TauPlan(True, tau, mix.t_mix_tokens, fraction, gap, verdict)
