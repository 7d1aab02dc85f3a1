"""Composite polynomial approximations of ``sign`` and ``ReLU`` (Lee et al., 2021, simplified).

A single polynomial approximating ``sign`` on ``[-B, -eps] U [eps, B]`` needs degree ~ B/eps, far too deep.
Composing low-degree odd polynomials instead sharpens the step geometrically: every stage maps the
"uncertain" band of its input closer to +-1, so the depth grows like log(B/eps) (Lee, Lee, Kim, No:
"Minimax approximation of sign function by composite polynomial for homomorphic comparison", IEEE TDSC 2021;
also Cheon et al., "Efficient homomorphic comparison methods with optimal complexity", ASIACRYPT 2020).

Our practical version:

1. Stage 0 is the odd minimax polynomial of ``sign`` on ``[eps, B]`` (a series on ``[-B, B]``: the scaling
   ``x / B`` is folded into that stage's interval), rescaled so that ``|S_0| <= 1`` on all of ``[-B, B]``.
2. Stage ``i >= 1`` (a series on ``[-1, 1]``, which costs no affine level) is the odd minimax polynomial of
   ``sign`` on ``[lo, 1]``, where ``lo`` is the smallest value the previous stages give on ``[eps, B]``;
   intermediate stages are again rescaled to ``|S_i| <= 1`` on ``[-1, 1]``, so every stage's input stays in
   ``[-1, 1]`` whatever ``x`` is, including inside the gap ``(-eps, eps)``.
3. Stages are added until ``|S(x) - sign(x)| <= target`` on ``[-B, -eps] U [eps, B]``.

ReLU is then ``(x + x * S(x)) / 2`` (one more level): its error is at most ``eps * (1 + max|S|) / 2`` inside the
gap and ``B * target / 2`` outside, so :func:`fit_composite_relu` uses ``target = eps / B``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base import Approximation, ChebyshevSeries, _as_interval
from .chebyshev import check_degree
from .errors import dense_grid, measure_max_error
from .functions import relu, sign
from .remez import remez_series

__all__ = ["fit_composite_sign", "fit_composite_relu", "fit_composite_relu_to_error", "fit_composite_sign_to_error"]

# stage degrees tried when none is given: the largest degree of each OpenFHE depth bin on [-1, 1]
# (3, 4, 5 levels), since a bin's largest degree sharpens most for the same levels
STAGE_DEGREE_LADDER = (5, 13, 27)
DEFAULT_STAGE_DEGREE = 13
MAX_STAGES = 12
# gap half-width, relative to B = max|x|, used when the caller gives neither eps nor an error target
DEFAULT_RELATIVE_EPS = 2.0**-7


def _half_width(interval: Sequence[float]) -> tuple[float, float, float]:
    a, b = _as_interval(interval)
    if not a < 0.0 < b:
        raise ValueError(
            f"a composite sign/ReLU approximation needs an interval around 0 (a < 0 < b), got [{a}, {b}]; "
            "on one side of 0 the function is polynomial, or use method='minimax'"
        )
    return a, b, max(-a, b)


def _check_odd(degree) -> int:
    degree = check_degree(degree)
    if degree % 2 == 0:
        raise ValueError(f"composite sign stages must have odd degree (odd polynomials), got {degree}")
    return degree


def _odd_sign_stage(lo: float, interval: tuple[float, float], degree: int) -> ChebyshevSeries:
    """Odd minimax series (on ``interval``) of sign on ``[lo, interval[1]]``."""
    series, _ = remez_series(np.sign, interval, degree, domains=[(lo, interval[1])], parity="odd")
    return series


def _rescaled(series: ChebyshevSeries) -> ChebyshevSeries:
    """``series`` scaled so that max |S| = 1 on ``[0, b]`` (hence on ``[-b, b]``: S is odd)."""
    peak = measure_max_error(series, np.zeros_like, [(0.0, series.interval[1])], n=4001)
    return ChebyshevSeries(series.coeffs / peak, series.interval)


def build_sign_stages(B: float, eps: float, degrees: Sequence[int] = (), stage_degree: Optional[int] = None,
                      target: Optional[float] = None) -> tuple[list, float]:
    """Stages of the composite sign on ``[-B, B]`` with gap ``eps``: either exactly ``degrees``, or stages
    of ``stage_degree`` added until the sign error on ``[eps, B]`` is ``<= target`` (or stops improving).
    Returns ``(stages, sign_error)`` where ``sign_error`` is measured on ``[eps, B]``."""
    if not 0.0 < eps < B:
        raise ValueError(f"eps (the gap half-width around 0) must be in (0, {B}), got {eps}")
    planned = [_check_odd(d) for d in degrees]
    if not planned:
        stage_degree = _check_odd(stage_degree or DEFAULT_STAGE_DEGREE)
    xs = dense_grid((eps, B), 8001)
    stages: list = []
    s = xs
    err = np.inf
    while True:
        i = len(stages)
        if planned:
            if i == len(planned):
                break
            deg, last = planned[i], i == len(planned) - 1
        else:
            if (target is not None and err <= target) or i == MAX_STAGES:
                break
            deg, last = stage_degree, False
        interval = (-B, B) if i == 0 else (-1.0, 1.0)
        lo = eps if i == 0 else float(np.min(s))
        # the final stage aims at +-1 exactly; earlier ones are rescaled to |S| <= 1 so that the next
        # stage's input stays inside [-1, 1] (its series interval) whatever x is
        stage = _odd_sign_stage(lo, interval, deg)
        new_s = stage(s)
        final = last if planned else (target is not None and float(np.max(np.abs(new_s - 1.0))) <= target)
        if final and not planned:
            # the last stage need not be as sharp as the others: take the lowest odd degree that still
            # meets the target (fewer levels and multiplications than overshooting it by orders)
            for low in range(3, deg, 2):
                cand = _odd_sign_stage(lo, interval, low)
                cand_s = cand(s)
                if float(np.max(np.abs(cand_s - 1.0))) <= target:
                    stage, new_s = cand, cand_s
                    break
        if not final:
            stage = _rescaled(stage)
            new_s = stage(s)
        if not planned and i > 0 and not final and float(np.max(np.abs(new_s - 1.0))) >= err * 0.999:
            break  # no further progress (roundoff floor)
        stages.append(stage)
        s, err = new_s, float(np.max(np.abs(new_s - 1.0)))
        if final:
            break
    return stages, err


def _sign(interval, stage_degree, eps, degrees, target, op) -> Approximation:
    a, b, B = _half_width(interval)
    stages, _ = build_sign_stages(B, eps, degrees, stage_degree, target)
    approx = Approximation(op=op, kind="composite_sign", stages=stages, interval=(a, b))
    domains = [d for d in ((a, -eps), (eps, b)) if d[0] < d[1]]
    approx.max_error = measure_max_error(approx, sign, domains)
    approx.meta.update(method="composite", eps=eps, stage_degrees=[s.degree for s in stages],
                       error_domain=[list(d) for d in domains])
    return approx


def _relu(interval, stage_degree, eps, degrees, target, op) -> Approximation:
    a, b, B = _half_width(interval)
    stages, _ = build_sign_stages(B, eps, degrees, stage_degree, target)
    approx = Approximation(op=op, kind="relu_from_sign", stages=stages, interval=(a, b))
    approx.max_error = measure_max_error(approx, relu, [(a, b)])
    approx.meta.update(method="composite", eps=eps, stage_degrees=[s.degree for s in stages])
    return approx


def _best(candidates: list, max_error: float) -> Approximation:
    """Least depth (then least degree) among those meeting ``max_error``, else the most accurate."""
    ok = [c for c in candidates if c.max_error <= max_error]
    if ok:
        return min(ok, key=lambda c: (c.depth, c.degree))
    return min(candidates, key=lambda c: c.max_error)


def _fit(build, interval, degree, eps, degrees, target, op, accept) -> Approximation:
    if degrees or degree is not None:
        return build(interval, degree, eps, degrees, target, op)
    return _best([build(interval, d, eps, (), target, op) for d in STAGE_DEGREE_LADDER], accept)


def fit_composite_sign(interval: Sequence[float], degree: Optional[int] = None, *, eps: Optional[float] = None,
                       degrees: Sequence[int] = (), target: Optional[float] = None, op: str = "sign") -> Approximation:
    """Composite approximation of ``sign`` on ``interval`` (``a < 0 < b``), accurate outside ``(-eps, eps)``.

    Stages of odd degree ``degree`` are added until the error on ``[a, -eps] U [eps, b]`` is at most
    ``target`` (default ``eps / B``, the gap's width relative to the range); ``degree=None`` tries the
    stage degrees of ``STAGE_DEGREE_LADDER`` and keeps the least deep; ``degrees`` fixes every stage.
    ``eps`` defaults to ``B * 2**-7`` with ``B = max(|a|, |b|)``. ``max_error`` is measured on
    ``[a, -eps] U [eps, b]``; ``meta`` records ``eps``, ``error_domain`` and ``stage_degrees``."""
    _, _, B = _half_width(interval)
    eps = float(eps) if eps is not None else B * DEFAULT_RELATIVE_EPS
    target = float(target) if target is not None else eps / B
    return _fit(_sign, interval, degree, eps, degrees, target, op, accept=target)


def fit_composite_relu(interval: Sequence[float], degree: Optional[int] = None, *, eps: Optional[float] = None,
                       degrees: Sequence[int] = (), target: Optional[float] = None, op: str = "relu") -> Approximation:
    """ReLU on ``interval`` (``a < 0 < b``) as ``(x + x * S(x)) / 2``, ``S`` a composite sign.

    ``eps`` (default ``B * 2**-7``) is the gap where ``S`` may be wrong; there the ReLU error is at most
    about ``eps``. Sign stages are added until the sign error is at most ``target`` (default ``eps / B``,
    which keeps the error away from 0, ``B * target / 2``, at half that). ``degree``/``degrees`` as in
    :func:`fit_composite_sign`. ``max_error`` is measured on all of ``interval``."""
    _, _, B = _half_width(interval)
    eps = float(eps) if eps is not None else B * DEFAULT_RELATIVE_EPS
    target = float(target) if target is not None else eps / B
    return _fit(_relu, interval, degree, eps, degrees, target, op, accept=eps)


def fit_composite_relu_to_error(interval: Sequence[float], max_error: float, op: str = "relu") -> Approximation:
    """The least-deep composite ReLU found with measured error ``<= max_error`` (else the most accurate tried).

    Gaps ``eps`` of 0.9, 1.5 and 2.5 times ``max_error`` are tried (the ReLU error inside the gap is below
    ``eps``, typically ~0.4 ``eps``), each with the sign target ``eps / B`` that keeps the error away from
    the gap, ``B * sign_error / 2``, near ``eps / 2``, and each stage degree of ``STAGE_DEGREE_LADDER``."""
    _, _, B = _half_width(interval)
    # the measured error is usually well below eps (S rises fast inside the gap), so wider gaps are tried too
    gaps = [min(k * float(max_error), B / 2) for k in (0.9, 1.5, 2.5)]
    return _best([_relu(interval, d, eps, (), eps / B, op) for eps in gaps for d in STAGE_DEGREE_LADDER], max_error)


def fit_composite_sign_to_error(interval: Sequence[float], max_error: float, op: str = "sign",
                                eps: Optional[float] = None) -> Approximation:
    """The least-deep composite sign found with measured error ``<= max_error`` outside ``(-eps, eps)``."""
    _, _, B = _half_width(interval)
    eps = float(eps) if eps is not None else B * DEFAULT_RELATIVE_EPS
    target = 0.9 * float(max_error)
    return _best([_sign(interval, d, eps, (), target, op) for d in STAGE_DEGREE_LADDER], max_error)
