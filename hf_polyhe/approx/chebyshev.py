"""Chebyshev interpolation of a numpy function on an interval, with a measured error bound."""

from __future__ import annotations

from typing import Callable, Sequence

from numpy.polynomial import chebyshev as C

from .base import MAX_CHEBYSHEV_DEGREE, Approximation, ChebyshevSeries, _as_interval
from .errors import max_abs_error

__all__ = ["check_degree", "fit_chebyshev_series", "fit_chebyshev", "max_abs_error"]


def check_degree(degree, lowest: int = 1) -> int:
    """``degree`` as an int in ``[lowest, MAX_CHEBYSHEV_DEGREE]``, else a ValueError naming it."""
    if isinstance(degree, bool) or int(degree) != degree or not lowest <= int(degree) <= MAX_CHEBYSHEV_DEGREE:
        raise ValueError(f"degree must be an integer in [{lowest}, {MAX_CHEBYSHEV_DEGREE}], got {degree!r}")
    return int(degree)


def fit_chebyshev_series(func: Callable, interval: Sequence[float], degree: int) -> ChebyshevSeries:
    """Interpolate ``func`` at the ``degree + 1`` Chebyshev points of the first kind mapped to ``interval``."""
    degree = check_degree(degree, lowest=0)
    a, b = _as_interval(interval)
    coeffs = C.chebinterpolate(lambda t: func((b - a) / 2.0 * t + (a + b) / 2.0), degree)
    return ChebyshevSeries(coeffs=coeffs, interval=(a, b))


def fit_chebyshev(func: Callable, interval: Sequence[float], degree: int, op: str = "custom") -> Approximation:
    """One Chebyshev series for ``func`` on ``interval``; ``max_error`` is measured on a dense grid."""
    series = fit_chebyshev_series(func, interval, check_degree(degree))
    approx = Approximation(op=op, kind="chebyshev", stages=[series], interval=series.interval)
    approx.max_error = max_abs_error(approx, func, series.interval)
    approx.meta["method"] = "chebyshev"
    return approx
