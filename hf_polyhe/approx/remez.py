"""Minimax (best uniform) polynomial fits by the Remez exchange algorithm, in the Chebyshev basis.

We run the exchange on a dense discrete grid of the domain (uniform + Chebyshev-clustered points), in the
variable ``t in [-1, 1]`` and the basis ``T_k(t)``, which keeps the linear systems well conditioned up to
degree ~2000 where a monomial basis fails beyond ~20. The grid also makes the same code serve the cases the
library needs besides a plain interval: a union of intervals (sign with a gap around 0), a parity constraint
(odd polynomials for sign) and a weight (relative error for ``1/sqrt(x)``). When the exchange does not
converge, the best iterate is kept, and it is never worse than Chebyshev interpolation, which we fall back to.

Reference: E. Ya. Remez (1934); L. N. Trefethen, *Approximation Theory and Approximation Practice*, ch. 10;
the exchange/pruning step follows chebfun's ``remez``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from numpy.polynomial import chebyshev as C

from .base import Approximation, ChebyshevSeries, _as_interval
from .chebyshev import check_degree
from .errors import dense_grid, max_abs_error

__all__ = ["remez_series", "fit_minimax"]

_PARITY_START = {None: 0, "even": 0, "odd": 1}


def _basis_indices(degree: int, parity: Optional[str]) -> np.ndarray:
    if parity not in _PARITY_START:
        raise ValueError(f"parity must be one of None, 'even', 'odd', got {parity!r}")
    step = 1 if parity is None else 2
    return np.arange(_PARITY_START[parity], degree + 1, step)


def _initial_reference(t: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` grid points spread like Chebyshev extrema over the sorted grid ``t``."""
    # Chebyshev extrema in "arc length" over the union of domains: cumulative length with gaps removed
    steps = np.diff(t)
    gap = steps > 10 * np.median(steps) if steps.size else steps
    s = np.concatenate([[0.0], np.cumsum(np.where(gap, 0.0, steps))])
    targets = s[-1] * (1.0 - np.cos(np.pi * np.arange(count) / (count - 1))) / 2.0
    idx = np.searchsorted(s, targets).clip(0, t.size - 1)
    # make indices strictly increasing (neighbouring targets may hit the same grid point)
    for i in range(1, count):
        idx[i] = max(idx[i], idx[i - 1] + 1)
    for i in range(count - 2, -1, -1):
        idx[i] = min(idx[i], idx[i + 1] - 1)
    return idx


def _exchange(err: np.ndarray, count: int) -> Optional[np.ndarray]:
    """New reference: one extremum per run of constant sign of ``err``, pruned to ``count`` alternating points
    keeping the largest ones. None when the error alternates fewer than ``count`` times."""
    sgn = np.where(err >= 0, 1, -1)
    bounds = np.flatnonzero(np.diff(sgn)) + 1
    runs = np.split(np.arange(err.size), bounds)
    ext = [r[np.argmax(np.abs(err[r]))] for r in runs]
    if len(ext) < count:
        return None
    ext = list(ext)
    while len(ext) > count:
        mags = np.abs(err[ext])
        if len(ext) == count + 1:  # drop the smaller end: the others keep alternating
            ext.pop(0 if mags[0] < mags[-1] else -1)
            continue
        i = int(np.argmin(mags))
        ext.pop(i)
        if 0 < i < len(ext):  # neighbours i-1, i now share a sign: keep the larger
            ext.pop(i if abs(err[ext[i - 1]]) >= abs(err[ext[i]]) else i - 1)
    return np.asarray(ext)


def remez_series(
    func: Callable,
    interval: Sequence[float],
    degree: int,
    *,
    domains: Optional[Sequence[Sequence[float]]] = None,
    parity: Optional[str] = None,
    weight: Optional[Callable] = None,
    max_iter: int = 40,
    tol: float = 1e-4,
) -> tuple[ChebyshevSeries, dict]:
    """Minimax series of degree ``degree`` for ``func``, as a :class:`ChebyshevSeries` on ``interval``.

    Minimises ``max |weight(x) * (p(x) - func(x))|`` over the union of ``domains`` (sub-intervals of the
    real line, default ``[interval]``; the series still lives on ``interval``). ``parity="odd"``/``"even"``
    keeps only odd/even ``T_k`` (for odd/even targets on domains symmetric about the interval's centre, fit
    one half). Returns ``(series, info)`` with ``info = {"converged", "iterations", "levelled_error"}``;
    ``levelled_error`` is the weighted error level of the last reference (equal to the true minimax error
    when converged). Converged means the grid error is within ``tol`` (relative) of that level."""
    degree = check_degree(degree, lowest=0)
    a, b = _as_interval(interval)
    domains = [_as_interval(d) for d in (domains or [(a, b)])]
    ks = _basis_indices(degree, parity)
    n_unknowns = ks.size + 1  # coefficients + the levelled error E
    per_domain = max(1000, 24 * n_unknowns) // len(domains)
    x = np.unique(np.concatenate([dense_grid(d, per_domain) for d in domains]))
    t = (2.0 * x - (a + b)) / (b - a)
    f = np.asarray(func(x), dtype=np.float64)
    w = np.ones_like(x) if weight is None else np.asarray(weight(x), dtype=np.float64)
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError(f"func and weight must be finite (weight > 0) on the domains {domains}")
    phi = C.chebvander(t, degree)[:, ks]

    ref = _initial_reference(t, n_unknowns)
    best = (np.inf, None, 0.0)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        alt = (-1.0) ** np.arange(n_unknowns)
        A = np.column_stack([phi[ref], alt / w[ref]])
        sol = np.linalg.lstsq(A, f[ref], rcond=None)[0]
        c, level = sol[:-1], abs(sol[-1])
        err = w * (phi @ c - f)
        emax = float(np.max(np.abs(err)))
        if emax < best[0]:
            best = (emax, c, level)
        # converged: levelled, or at the roundoff floor of the data (no further exchange can help)
        if emax - level <= tol * emax or emax <= 64 * np.finfo(float).eps * float(np.max(np.abs(w * f))):
            converged = True
            break
        new_ref = _exchange(err, n_unknowns)
        if new_ref is None or np.array_equal(new_ref, ref):
            break
        ref = new_ref
    coeffs = np.zeros(degree + 1)
    coeffs[ks] = best[1]
    info = {"converged": bool(converged), "iterations": it, "levelled_error": float(best[2])}
    return ChebyshevSeries(coeffs=coeffs, interval=(a, b)), info


def fit_minimax(func: Callable, interval: Sequence[float], degree: int, op: str = "custom", **kw) -> Approximation:
    """Minimax (Remez) fit of ``func`` on ``interval`` as a one-stage :class:`Approximation`.

    ``max_error`` is measured on a dense grid (absolute error). If the exchange does not converge, or
    Chebyshev interpolation of the same degree happens to be at least as good, the interpolant is returned
    instead, with ``meta["method"] = "chebyshev"`` and ``meta["remez_converged"] = False``."""
    from .chebyshev import fit_chebyshev

    a, b = _as_interval(interval)
    series, info = remez_series(func, (a, b), check_degree(degree), **kw)
    approx = Approximation(op=op, kind="chebyshev", stages=[series], interval=(a, b))
    approx.max_error = max_abs_error(approx, func, (a, b))
    approx.meta.update(method="minimax", remez_converged=info["converged"], remez_iterations=info["iterations"])
    fallback = fit_chebyshev(func, (a, b), degree, op=op)
    if not approx.max_error < fallback.max_error:
        fallback.meta["remez_converged"] = info["converged"]
        return fallback
    return approx
