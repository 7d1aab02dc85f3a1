"""The polynomial approximation format shared by torch layers, the numpy runtime and the OpenFHE backend.

An :class:`Approximation` is a tiny straight-line program over the input ``x`` built from Chebyshev
series (each on its own interval ``[a, b]``), additions and multiplications:

- ``kind="chebyshev"``: ``y = S0(x)``.
- ``kind="composite_sign"``: ``y = S_k(... S_1(S_0(x)))`` -- a composite approximation of ``sign(x)``
  (Lee et al., 2021); ``S_0`` lives on the calibrated interval ``[-B, B]``, later stages on ``[-1, 1]``
  (their inputs stay within ``[-1 - m, 1 + m]`` for a tiny margin ``m``; a Chebyshev series is a plain
  polynomial, so evaluating it slightly outside its interval is exact, and ``[-1, 1]`` saves the level the
  affine map onto ``[-1, 1]`` would cost).
- ``kind="relu_from_sign"``: ``s = composite_sign(x)`` then ``y = (x + x * s) / 2``, computed as
  ``h = 0.5 * x; y = h + h * s`` (one level after ``s``, not two).
- ``kind="newton_inv_sqrt"``: ``y = S0(x)`` then ``newton_steps`` times ``y = y * (3 - x * y * y) / 2``,
  computed as ``h = -0.5 * x; y = 1.5 * y + (h * y) * (y * y)`` (two levels per step).
- ``kind="newton_reciprocal"``: ``y = S0(x)`` then ``newton_steps`` times ``y = y * (2 - x * y)``,
  computed as ``y = (y + y) - (x * y) * y`` (two levels per step).

For the two Newton kinds the steps may read ``x`` through a map ``x_map = (a, b)``: ``x = a * input + b``. A circuit
that folds the initial guess's affine map onto ``[-1, 1]`` into the op feeding it (a LayerNorm's variance row sum,
:mod:`hf_polyhe.he.circuit.optimize`) feeds the approximation ``t`` in place of ``x``; the steps recover ``x`` from
``t`` with a scalar product on a level that is free (the initial guess is deeper), and ``S0`` saves its map's level.

Evaluation only uses ``+``, ``-``, ``*`` and multiplication by Python floats, so :meth:`Approximation.evaluate`
runs unchanged on numpy arrays, torch tensors or any ciphertext wrapper that overloads those operators.
A wrapper may also define ``eval_chebyshev_series(series)``: :meth:`ChebyshevSeries.evaluate` then hands each
series to it (the OpenFHE backend runs its least-depth Paterson-Stockmeyer there,
:mod:`hf_polyhe.he.backends.chebyshev`), instead of running the Clenshaw recurrence, whose depth grows linearly
with the degree.

Depth (``.depth``, in CKKS levels) counts what the evaluation above costs when every Chebyshev series goes
through the runtime's least-depth Paterson-Stockmeyer (see :func:`chebyshev_depth`; one level less than OpenFHE's
``EvalChebyshevSeries`` at degrees 3, 6-7, 14-15, 28-31, 60-63, ...: :func:`openfhe_chebyshev_depth`) and every
other multiplication -- ciphertext by ciphertext *or* by a non-unit constant -- costs one level; additions are free.
This module imports numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

KINDS = ("chebyshev", "composite_sign", "relu_from_sign", "newton_inv_sqrt", "newton_reciprocal")


def _as_interval(interval: Sequence[float]) -> tuple[float, float]:
    a, b = (float(v) for v in interval)
    if not (math.isfinite(a) and math.isfinite(b)) or not a < b:
        raise ValueError(f"interval must be finite with a < b, got [{a}, {b}]")
    return a, b


# Upper degree of each depth bin of OpenFHE's Paterson-Stockmeyer evaluation (``GetDepthByDegree`` in
# ckksrns-utils.cpp, and the table in FUNCTION_EVALUATION.md), paired with the levels a series of that degree
# on a general interval [a, b] consumes. Degrees 1-4 use OpenFHE's linear (non-PS) path; the values below
# were measured with openfhe 1.6.1 (the documented "3 levels for degree <= 4" is one short for degrees 3-4).
_OPENFHE_DEPTH_BINS = (
    (1, 2), (2, 3), (5, 4), (13, 5), (27, 6), (59, 7), (119, 8), (247, 9), (495, 10), (1007, 11), (2031, 12),
)
MAX_CHEBYSHEV_DEGREE = _OPENFHE_DEPTH_BINS[-1][0]
CKKS_TINY = 2.0**-45  # a Chebyshev coefficient below CKKS precision: the runtime leaves it out


def chebyshev_depth(degree: int, normalized: bool = False) -> int:
    """Multiplicative depth (CKKS levels) that the runtime's least-depth Paterson-Stockmeyer
    (:mod:`hf_polyhe.he.backends.chebyshev`, ``OpenFHEBackend.cheb``) consumes for a series of degree ``degree``:
    ``ceil(log2(degree + 1))``, plus one for the affine map onto ``[-1, 1]`` unless ``normalized``. Counted from a
    settled input to a settled output (``GetLevel()`` plus the pending rescale); checked against the openfhe
    wheel in ``tests/test_approx.py`` and ``tests/test_chebyshev_ps.py``. Degree 0 (a constant) costs 0; degrees
    above ``MAX_CHEBYSHEV_DEGREE`` (2031) are refused: split them into composite stages. A series' degree for
    this count is :attr:`ChebyshevSeries.ps_degree` (coefficients below CKKS precision left out)."""
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    if degree == 0:
        return 0
    if degree > MAX_CHEBYSHEV_DEGREE:
        raise ValueError(f"degree {degree} is above the largest supported Chebyshev degree {MAX_CHEBYSHEV_DEGREE}")
    return math.ceil(math.log2(degree + 1)) + (0 if normalized else 1)


def openfhe_chebyshev_depth(degree: int, normalized: bool = False) -> int:
    """Multiplicative depth (CKKS levels) that OpenFHE's ``EvalChebyshevSeries`` consumes for a series of
    degree ``degree`` (degree counted as OpenFHE does: index of the last non-zero coefficient) -- what the
    runtime spent before it evaluated series itself (:func:`chebyshev_depth`; never less).

    Levels are counted from a settled (rescaled) input to a settled output, i.e. ``GetLevel()`` plus the
    pending rescale (``GetNoiseScaleDeg() - 1``) under FLEXIBLEAUTO. On a general interval ``[a, b]`` this is
    OpenFHE's documented table -- degree 1: 2, 2: 3, 3-5: 4, 6-13: 5, 14-27: 6, 28-59: 7, 60-119: 8,
    120-247: 9, ... -- and ``normalized=True`` (interval exactly ``[-1, 1]``, so no affine map ``x -> t``)
    saves one level. Checked against the openfhe wheel in ``tests/test_approx.py``. A degree-0 series is a
    constant (0 levels); OpenFHE itself must not be handed one (it crashes), the runtime adds the constant.
    Degrees above ``MAX_CHEBYSHEV_DEGREE`` (2031) are refused: split them into composite stages."""
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    if degree == 0:
        return 0
    for upper, depth in _OPENFHE_DEPTH_BINS:
        if degree <= upper:
            return depth - 1 if normalized else depth
    raise ValueError(f"degree {degree} is above the largest supported Chebyshev degree {MAX_CHEBYSHEV_DEGREE}")


@dataclass
class ChebyshevSeries:
    """``sum_k coeffs[k] * T_k(t)`` with ``t = (2x - (a + b)) / (b - a)`` mapping ``[a, b]`` onto ``[-1, 1]``."""

    coeffs: np.ndarray
    interval: tuple[float, float]

    def __post_init__(self):
        self.coeffs = np.asarray(self.coeffs, dtype=np.float64).reshape(-1)
        if self.coeffs.size == 0:
            raise ValueError("a Chebyshev series needs at least one coefficient")
        self.interval = _as_interval(self.interval)

    @property
    def degree(self) -> int:
        """Degree of the polynomial: index of the last non-zero coefficient (OpenFHE's ``Degree``)."""
        nz = np.flatnonzero(self.coeffs)
        return int(nz[-1]) if nz.size else 0

    @property
    def ps_degree(self) -> int:
        """The degree the runtime evaluates: index of the last coefficient above CKKS precision (``CKKS_TINY``)."""
        nz = np.flatnonzero(np.abs(self.coeffs) > CKKS_TINY)
        return int(nz[-1]) if nz.size else 0

    @property
    def normalized(self) -> bool:
        """True when the interval is exactly ``[-1, 1]`` (no affine map, one level cheaper)."""
        return self.interval == (-1.0, 1.0)

    @property
    def depth(self) -> int:
        """CKKS levels the runtime's evaluation of this series consumes (see :func:`chebyshev_depth`)."""
        return chebyshev_depth(self.ps_degree, normalized=self.normalized)

    def openfhe_coeffs(self) -> list:
        """Coefficients in OpenFHE's convention ``c0 / 2 + sum_{k>=1} c_k T_k``: ``coeffs`` with ``c0`` doubled,
        trailing zeros dropped. Pass them to ``EvalChebyshevSeries(ct, coeffs, a, b)``."""
        c = [float(v) for v in self.coeffs[: self.degree + 1]]
        c[0] *= 2.0
        return c

    def evaluate(self, x: Any) -> Any:
        """Value of the series at ``x``: ``x.eval_chebyshev_series(self)`` when ``x`` offers it (ciphertext
        backends), else the Clenshaw recurrence with arithmetic only (numpy, torch, plain wrappers)."""
        hook = getattr(x, "eval_chebyshev_series", None)
        if hook is not None:
            return hook(self)
        a, b = self.interval
        scale, shift = 2.0 / (b - a), -(a + b) / (b - a)
        t = x * scale + shift
        c = [float(v) for v in self.coeffs]
        if len(c) == 1:
            return t * 0.0 + c[0]
        two_t = t * 2.0
        b1 = t * 0.0 + c[-1]  # b_{k+1}
        b2 = None  # b_{k+2}
        for ck in reversed(c[1:-1]):
            nb = two_t * b1 + ck if b2 is None else two_t * b1 - b2 + ck
            b2, b1 = b1, nb
        return t * b1 + c[0] if b2 is None else t * b1 - b2 + c[0]

    __call__ = evaluate

    def to_dict(self) -> dict:
        return {"coeffs": [float(v) for v in self.coeffs], "interval": list(self.interval)}

    @classmethod
    def from_dict(cls, d: dict) -> "ChebyshevSeries":
        return cls(coeffs=np.asarray(d["coeffs"], dtype=np.float64), interval=tuple(d["interval"]))


@dataclass
class Approximation:
    """A polynomial stand-in for a non-polynomial operator ``op`` on the input interval ``interval``.

    ``max_error`` is the measured max |approx - exact| on ``interval`` (dense grid refined around its peaks;
    for ``composite_sign`` on ``[a, -eps] U [eps, b]``, with ``eps`` in ``meta``, since no polynomial follows
    the jump of ``sign`` at 0); ``depth`` is the multiplicative depth in CKKS levels that evaluating it costs;
    ``meta`` holds JSON-friendly facts about the fit (method, ``max_rel_error`` for Newton fits, ...)."""

    op: str
    kind: str
    stages: list
    interval: tuple[float, float]
    newton_steps: int = 0
    max_error: float = float("nan")
    meta: dict = field(default_factory=dict)
    x_map: tuple = (1.0, 0.0)  # Newton kinds: the steps' x is x_map[0] * input + x_map[1]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown approximation kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        self.stages = [s if isinstance(s, ChebyshevSeries) else ChebyshevSeries.from_dict(s) for s in self.stages]
        if not self.stages:
            raise ValueError("an approximation needs at least one Chebyshev stage")
        self.interval = _as_interval(self.interval)
        self.newton_steps = int(self.newton_steps)
        if not isinstance(self.x_map, (list, tuple)) or len(self.x_map) != 2:
            raise ValueError(f"x_map must be two numbers (a, b), got {self.x_map!r}")
        a, b = (float(v) for v in self.x_map)
        if not (math.isfinite(a) and math.isfinite(b) and a != 0.0):
            raise ValueError(f"x_map must be two finite numbers with a non-zero slope, got {self.x_map!r}")
        if (a, b) != (1.0, 0.0) and self.kind not in ("newton_inv_sqrt", "newton_reciprocal"):
            raise ValueError(f"x_map applies to the Newton kinds only, not {self.kind!r}")
        self.x_map = (a, b)

    @property
    def degree(self) -> int:
        """Total degree of the polynomial in ``x``."""
        d = 1
        for s in self.stages:
            d *= s.degree
        if self.kind == "relu_from_sign":
            d += 1
        if self.kind == "newton_inv_sqrt":
            d = d * 3**self.newton_steps + (3**self.newton_steps - 1) // 2
        if self.kind == "newton_reciprocal":
            d = d * 2**self.newton_steps + 2**self.newton_steps - 1
        return d

    @property
    def depth(self) -> int:
        """Multiplicative depth in CKKS levels of :meth:`evaluate` when each Chebyshev stage runs through the
        runtime's least-depth Paterson-Stockmeyer (see the module docstring; checked against openfhe in the tests)."""
        d = sum(s.depth for s in self.stages)
        if self.kind == "relu_from_sign":
            d += 1  # h * s with h = 0.5 * x at level 1 <= depth of s
        elif self.kind in ("newton_inv_sqrt", "newton_reciprocal") and self.newton_steps:
            # each step: one level for the products of y, one for their product; a constant initial guess
            # still needs one level before the first product (h = -0.5 * x / x * y).
            d = max(d, 1) + 2 * self.newton_steps
        return d

    def evaluate(self, x: Any) -> Any:
        """The approximation at ``x`` (numpy array, torch tensor or ciphertext wrapper), arithmetic only."""
        if self.kind == "chebyshev":
            return self.stages[0](x)
        if self.kind in ("composite_sign", "relu_from_sign"):
            s = x
            for stage in self.stages:
                s = stage(s)
            if self.kind == "composite_sign":
                return s
            h = x * 0.5  # (x + x*s)/2 as h + h*s: the 1/2 rides on a level x has spare, not after x*s
            return h + h * s
        y = self.stages[0](x)
        a, b = self.x_map
        if self.kind == "newton_inv_sqrt":
            h = x * (-0.5 * a) if b == 0.0 else x * (-0.5 * a) + (-0.5 * b)
            for _ in range(self.newton_steps):
                # y (3 - x y^2) / 2 = 1.5 y + (h y)(y y): both products at depth(y) + 1, their product + 2
                y = y * 1.5 + (h * y) * (y * y)
        else:
            if (a, b) != (1.0, 0.0):
                x = x * a + b
            for _ in range(self.newton_steps):
                y = (y + y) - (x * y) * y  # y (2 - x y) with two levels per step
        return y

    __call__ = evaluate

    def to_dict(self) -> dict:
        return {
            "op": self.op,
            "kind": self.kind,
            "interval": list(self.interval),
            "newton_steps": self.newton_steps,
            "max_error": float(self.max_error),
            "stages": [s.to_dict() for s in self.stages],
            "meta": dict(self.meta),
            **({"x_map": list(self.x_map)} if self.x_map != (1.0, 0.0) else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Approximation":
        return cls(
            op=d["op"],
            kind=d["kind"],
            stages=[ChebyshevSeries.from_dict(s) for s in d["stages"]],
            interval=tuple(d["interval"]),
            newton_steps=d.get("newton_steps", 0),
            max_error=d.get("max_error", float("nan")),
            meta=dict(d.get("meta", {})),
            x_map=d.get("x_map", (1.0, 0.0)),
        )
