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

import math
from collections import deque
from dataclasses import asdict, dataclass, replace
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
    last_adv = None if advantage is None else float(advantage[-1])
    return not_mixed(last, last_adv, advantage is not None and not can_start.any(), min_advantage_rel)


def not_mixed(
    last_gap: float, advantage: float | None, no_advantage: bool, min_advantage: float
) -> MixResult:
    """A curve that did not mix, and why in words: depth never helped enough, or the gap never closed."""
    adv = None if advantage is None or not math.isfinite(advantage) else advantage
    if no_advantage:
        note = (
            f"depth showed no measurable advantage within the search (the fixed model beats the source by "
            f"{adv if adv is not None else float('nan'):+.2%} < {min_advantage:.2%})"
        )
    else:
        note = f"the curves did not mix within the search (last gap {last_gap:+.2%})"
    return MixResult(False, None, None, None, last_gap, adv, note)


class _Smoothed:
    """One curve as it arrives: tokens and the bias-corrected EMA of its losses (``ema`` point by point)."""

    def __init__(self, alpha: float):
        self.alpha, self.acc, self.power = alpha, 0.0, 1.0
        self.tokens: list[float] = []
        self.loss: list[float] = []

    def add(self, tokens: float, loss: float) -> bool:
        ts = self.tokens
        if ts and tokens <= ts[-1]:
            return False  # not after the last point: a restarted trial re-reporting what it already had
        a = self.alpha
        self.acc = acc = a * self.acc + (1 - a) * loss
        self.power = power = self.power * a
        ts.append(tokens)
        self.loss.append(acc / (1 - power) if a else loss)
        return True


class _Cursor:
    """Linear interpolation of a ``_Smoothed`` curve at increasing query tokens, in amortised O(1)."""

    def __init__(self, curve: _Smoothed):
        self.curve, self.j = curve, 0

    def at(self, t: float) -> float | None:
        """The curve at ``t`` (None before its first point); the caller checks that it reaches ``t``."""
        ts, ls = self.curve.tokens, self.curve.loss
        if t < ts[0]:
            return None
        while ts[self.j] < t:
            self.j += 1
        if ts[self.j] == t or self.j == 0:
            return ls[self.j]
        t0, t1 = ts[self.j - 1], ts[self.j]
        return ls[self.j - 1] + (ls[self.j] - ls[self.j - 1]) * (t - t0) / (t1 - t0)


class MixingWatch:
    """``t_mix`` as the probes' points arrive, in amortised O(1) work per point (the τ search's stopper).

    Each curve is smoothed as it grows. A progressive point is judged once the fixed curve (and the
    source curve, when one is watched) has reached its tokens; a mixed window is the first point that
    may start one, followed by points within ``rel_tol`` up to ``window_tokens`` later. On complete
    curves the answer is ``t_mix``'s; while they grow it is what ``t_mix`` says of the points judged
    so far. Points that do not advance their curve's tokens are ignored (a restarted probe repeats
    some), and ``add`` says so.
    """

    ROLES = ("fixed", "progressive", "source")

    def __init__(
        self,
        expand_at_tokens: float,
        rel_tol: float = 0.01,
        window_tokens: float = 0.0,
        smoothing: float = 0.0,
        min_advantage_rel: float = 0.0,
        with_source: bool = False,
    ):
        require(rel_tol >= 0 and window_tokens >= 0 and min_advantage_rel >= 0, "bad mixing settings")
        require(0 <= smoothing < 1, f"smoothing must be in [0, 1), got {smoothing}")
        self.expand_at, self.rel_tol, self.window = expand_at_tokens, rel_tol, window_tokens
        self.min_advantage, self.with_source = min_advantage_rel, with_source
        self.curves = {r: _Smoothed(smoothing) for r in self.ROLES}
        self._fixed, self._source = _Cursor(self.curves["fixed"]), _Cursor(self.curves["source"])
        self._pending: deque[int] = deque()  # progressive points not judged yet
        self._start: tuple[float, float, float | None] | None = None  # (tokens, worst gap, advantage)
        self._any_advantage = False  # depth showed its advantage at some judged point
        self._last: tuple[float, float | None] | None = None  # (gap, advantage) of the last judged point
        self.judged = 0  # progressive points judged (for the O(1) test)
        self.result: MixResult | None = None  # set once mixed; never changes after

    @property
    def mixed(self) -> bool:
        return self.result is not None

    def add(self, role: str, tokens: float, loss: float) -> bool:
        curve = self.curves.get(role)
        if curve is None:
            require(False, f"unknown curve {role!r}")
        if not math.isfinite(loss):
            require(False, f"{role} curve: losses must be finite")
        if not curve.add(tokens, loss):
            return False
        if role == "progressive" and tokens >= self.expand_at:
            self._pending.append(len(curve.tokens) - 1)
        if self._pending:
            self._judge()
        return True

    def _judge(self, final: bool = False) -> None:
        """Judge the pending progressive points the other curves have reached (``final``: every point the
        fixed curve has reached; beyond the source curve's end depth cannot have shown its advantage)."""
        prog, fixed, source = self.curves["progressive"], self.curves["fixed"], self.curves["source"]
        pending, ft, st = self._pending, fixed.tokens, source.tokens
        while pending:
            i = pending[0]
            t = prog.tokens[i]
            if not ft or ft[-1] < t:
                return  # wait for the fixed curve to reach t
            beyond_source = self.with_source and (not st or st[-1] < t)
            if beyond_source and not final:
                return  # wait for the source curve too
            pending.popleft()
            f = self._fixed.at(t)
            if f is None:
                continue  # before the fixed curve's first point: t_mix drops it too
            self.judged += 1
            advantage = None
            if self.with_source:
                if beyond_source:
                    advantage = -math.inf  # not observed: cannot start a window (as t_mix)
                else:
                    s = self._source.at(t)
                    s = (
                        source.loss[0] if s is None else s
                    )  # before its first point: its first value (np.interp)
                    advantage = (s - f) / f
            self._step(t, (prog.loss[i] - f) / f, advantage)

    def _step(self, t: float, gap: float, advantage: float | None) -> None:
        self._last = (gap, advantage)
        if advantage is not None and advantage >= self.min_advantage:
            self._any_advantage = True
        if self.result is not None:
            return  # mixed already: only the last gap is kept current
        start = self._start
        if start is not None and t > start[0] + self.window:  # the window closed before this point
            return self._mix(start)
        if gap > self.rel_tol:
            self._start = None  # breaks the window of every start so far
            return
        if start is None:
            if advantage is None or advantage >= self.min_advantage:
                self._start = start = (t, gap, advantage)
        else:
            self._start = start = (start[0], max(start[1], gap), start[2])
        if start is not None and t >= start[0] + self.window:
            self._mix(start)

    def _mix(self, start) -> None:
        t, worst, advantage = start
        self.result = MixResult(
            True, int(round(t - self.expand_at)), int(round(t)), worst, float("nan"), advantage
        )

    def finish(self) -> MixResult:
        """The outcome on the curves as they stand, none of them growing any more (``t_mix``'s answer)."""
        self._judge(final=True)
        return self.outcome()

    def outcome(self) -> MixResult:
        """The result so far: mixed (with the gap at the last judged point), or why not (as ``t_mix``)."""
        require(self._last is not None, "the curves share no point after the expansion: run them longer")
        last, advantage = self._last
        if self.result is not None:
            return replace(self.result, last_gap_rel=last)
        return not_mixed(last, advantage, self.with_source and not self._any_advantage, self.min_advantage)


def watch_curves(watch: MixingWatch, curves: dict[str, tuple[Sequence[float], Sequence[float]]]) -> MixResult:
    """Feed whole curves (role -> (tokens, losses)), the progressive one last, and return the outcome."""
    for role in sorted(curves, key=lambda r: r == "progressive"):
        t, loss = _curve(*curves[role], f"{role} curve")
        for x, y in zip(t.tolist(), loss.tolist()):
            watch.add(role, x, y)
    return watch.finish()


# Mixing times the paper reports, in the run's units: the τ search's prior when nothing better is known
# (``tune.t_mix_prior_tokens``, or the mixing-time registry). Under WSD they barely depend on τ.
PAPER_T_MIX: dict[str, tuple[float, str]] = {
    "gpt": (16e9, "the paper's GPT-2 under WSD: about 16B tokens (30k iterations), §5.2 and Fig. 5"),
    "llama": (16e9, "the paper's GPT-2 figure (no Llama run in the paper): about 16B tokens, §5.2"),
    "moe": (16e9, "the paper's GPT-2 figure; its MoE (GPT-2's configuration) mixes alike, Fig. 9"),
    "resnet": (
        12.8e6,
        "the paper's ResNet under WSD still mixes when expanded at 0.8 of a 100-epoch ImageNet run with "
        "10% decay: at most 10 epochs, about 12.8M images (§4, Fig. 5)",
    ),
}


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
