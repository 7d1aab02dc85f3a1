"""``1/sqrt(x)`` and ``1/x`` on ``[a, b]`` (``a > 0``): a polynomial initial guess refined by Newton steps.

A single polynomial for ``1/sqrt(x)`` on a wide range such as LayerNorm's variance range ``[1e-2, 300]``
needs a huge degree, but Newton's iteration doubles the number of correct digits per step at two levels a
step. Both iterations act on the *relative* quantity ``u = y * sqrt(x)`` (resp. ``u = y * x``) alone:

- inverse square root: ``y <- y (3 - x y^2) / 2``  i.e. ``u <- u (3 - u^2) / 2``, converging for ``0 < u < sqrt(3)``;
- reciprocal:          ``y <- y (2 - x y)``        i.e. ``u <- u (2 - u)``,       converging for ``0 < u < 2``.

So we fit the initial guess by *relative* minimax (Remez with weight ``1/f``), which puts ``u`` in a band
``[1 - r, 1 + r]``, rescale it so that the band is as good a start as possible for ``k`` steps (a 1-D search,
exact because the steps only see ``u``), and pick the degree and ``k`` with the least total depth that meets
the error target. Reference: Panda, "Polynomial approximation of inverse sqrt function for FHE" (CSCML 2022);
Qu & Xu, "SecFormer" (2024) use the same initial-guess-plus-Newton scheme for LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .base import Approximation, ChebyshevSeries, _as_interval
from .chebyshev import check_degree
from .errors import dense_grid, measure_max_error
from .functions import inv_sqrt, reciprocal
from .remez import remez_series

__all__ = ["fit_newton_inv_sqrt", "fit_newton_reciprocal", "DEFAULT_REL_ERROR"]

# default target on max |approx / exact - 1|: LayerNorm outputs are O(1), so 1e-3 relative is ~1e-3 absolute
DEFAULT_REL_ERROR = 1e-3
MAX_NEWTON_STEPS = 8
# initial-guess degrees searched: the largest degree of each OpenFHE depth bin on a general interval
GUESS_DEGREE_LADDER = (1, 2, 5, 13, 27, 59, 119)


@dataclass(frozen=True)
class _NewtonScheme:
    kind: str
    func: Callable
    step: Callable  # the iteration on u = y / exact
    u_max: float  # the iteration converges for 0 < u < u_max


_SCHEMES = {
    "inv_sqrt": _NewtonScheme("newton_inv_sqrt", inv_sqrt, lambda u: u * (3.0 - u * u) * 0.5, float(np.sqrt(3.0))),
    "reciprocal": _NewtonScheme("newton_reciprocal", reciprocal, lambda u: u * (2.0 - u), 2.0),
}


def _positive_interval(interval, op) -> tuple[float, float]:
    a, b = _as_interval(interval)
    if not a > 0:
        raise ValueError(f"{op} needs an interval of positive numbers (0 < a < b), got [{a}, {b}]")
    return a, b


def _best_scale(u: np.ndarray, f: np.ndarray, scheme: _NewtonScheme, steps: int, relative: bool):
    """Scale ``s`` of the initial guess minimising the error after ``steps`` steps; returns ``(s, error)``.

    Both iterations map ``u`` to ``g(u)`` with ``|g(u) - 1|`` decreasing on ``(0, 1]`` and increasing on
    ``[1, u_max)``, so the relative error over the band ``[s min u, s max u]`` is reached at its two ends;
    the absolute error needs every point (weighted by ``f``), done for all scales at once."""
    lo, hi = float(np.min(u)), float(np.max(u))
    pts = np.array([lo, hi]) if relative else u

    def errors(scales):
        v = scales[:, None] * pts[None, :]
        for _ in range(steps):
            v = scheme.step(v)
        e = np.abs(v - 1.0) if relative else np.abs(v - 1.0) * f[None, :]
        return np.max(e, axis=1)

    # coarse scan of every scale keeping s * max u inside the convergence region, then a fine one around the best
    scales = np.linspace(0.05, 0.999 * scheme.u_max, 80) / hi
    i = int(np.argmin(errors(scales)))
    scales = np.linspace(scales[max(i - 1, 0)], scales[min(i + 1, scales.size - 1)], 81)
    err = errors(scales)
    i = int(np.argmin(err))
    return float(scales[i]), float(err[i])


def _plan(scheme, interval, degree, steps, target, relative):
    """(series, steps, predicted error) for a given guess degree; steps=None picks the fewest meeting target."""
    a, b = interval
    series, _ = remez_series(scheme.func, (a, b), degree, weight=lambda x: 1.0 / np.abs(scheme.func(x)))
    x = dense_grid((a, b), 2001)
    f = scheme.func(x)
    u = series(x) / f
    if np.min(u) <= 0:  # guess of the wrong sign somewhere: Newton cannot recover
        return None
    for k in ([steps] if steps is not None else range(MAX_NEWTON_STEPS + 1)):
        s, err = _best_scale(u, f, scheme, k, relative)
        if steps is not None or err <= target:
            return ChebyshevSeries(series.coeffs * s, (a, b)), k, err
    return ChebyshevSeries(series.coeffs * s, (a, b)), k, err


def _finish(scheme, op, interval, series, steps) -> Approximation:
    approx = Approximation(op=op, kind=scheme.kind, stages=[series], interval=interval, newton_steps=steps)
    approx.max_error = measure_max_error(approx, scheme.func, [interval])
    approx.meta.update(method="newton", guess_degree=series.degree,
                       max_rel_error=measure_max_error(approx, scheme.func, [interval], relative=True))
    return approx


def _fit_newton(name: str, interval, degree=None, newton_steps=None, rel_error=None, max_error=None,
                op: Optional[str] = None) -> Approximation:
    scheme = _SCHEMES[name]
    interval = _positive_interval(interval, name)
    if newton_steps is not None and not 0 <= int(newton_steps) <= 64:
        raise ValueError(f"newton_steps must be an integer in [0, 64], got {newton_steps!r}")
    relative = max_error is None
    target = float(rel_error if rel_error is not None else DEFAULT_REL_ERROR) if relative else 0.9 * float(max_error)
    degrees = [check_degree(degree)] if degree is not None else list(GUESS_DEGREE_LADDER)
    best = None  # (meets target, -depth, -error) ordering via key below
    for d in degrees:
        plan = _plan(scheme, interval, d, newton_steps, target, relative)
        if plan is None:
            continue
        series, k, err = plan
        depth = series.depth + 2 * k
        key = (err > target, depth, err)
        if best is None or key < best[0]:
            best = (key, series, k)
        if best[0][0] is False and d > 1 and depth > best[0][1]:
            break  # higher degrees only cost more depth
    if best is None:
        lo, hi = float(interval[0]), float(interval[1])
        raise ValueError(
            f"could not fit a positive initial guess for {name} on {list(interval)}: the interval spans a ratio "
            f"hi/lo = {hi / lo:.3g}, too wide for a polynomial initial guess plus Newton steps (measured: 1e9 fails, and "
            "where a fit is found at such ratios its relative error is near 1 at the low end). Narrow it: fit on the range the inputs take on data like "
            "what will be served (calibration_data=), raise its lower end where no input goes (ranges= / "
            "interval=), or train with the range / variance loss (RangeLossConfig), which pulls the ratio in "
            "(for power-softmax attention the normalizer's input is mean(S^p) + eps: a smaller attention_power "
            "narrows it).")
    return _finish(scheme, op or name, interval, best[1], best[2])


def fit_newton_inv_sqrt(interval: Sequence[float], degree: Optional[int] = None, *, newton_steps: Optional[int] = None,
                        rel_error: Optional[float] = None, max_error: Optional[float] = None,
                        op: str = "inv_sqrt") -> Approximation:
    """``1/sqrt(x)`` on ``interval`` (``0 < a``): relative-minimax initial guess + Newton steps.

    ``degree`` (initial guess) and ``newton_steps`` default to the least-deep pair whose predicted
    relative error is ``<= rel_error`` (default ``DEFAULT_REL_ERROR`` = 1e-3), or absolute error
    ``<= max_error`` when that is given. ``max_error`` (absolute) and ``meta["max_rel_error"]`` are measured."""
    return _fit_newton("inv_sqrt", interval, degree, newton_steps, rel_error, max_error, op)


def fit_newton_reciprocal(interval: Sequence[float], degree: Optional[int] = None, *,
                          newton_steps: Optional[int] = None, rel_error: Optional[float] = None,
                          max_error: Optional[float] = None, op: str = "reciprocal") -> Approximation:
    """``1/x`` on ``interval`` (``0 < a``): relative-minimax initial guess + Newton steps (see
    :func:`fit_newton_inv_sqrt` for the arguments)."""
    return _fit_newton("reciprocal", interval, degree, newton_steps, rel_error, max_error, op)
