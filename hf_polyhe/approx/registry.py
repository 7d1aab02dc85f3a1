"""Registry mapping operator names to fitters: ``fit_operator("gelu", (-8, 8), degree=31)``.

Configuration is separate from mechanism (as PEFT and timm do it): a :class:`FitMethod` is *how* to fit
(Chebyshev interpolation, minimax, composite sign, Newton), an :class:`Approximator` is *what* an operator
accepts (its exact function, the methods that make sense for it, the default). ``fit_operator`` only looks
things up; adding an operator is one ``register_approximator`` call, never another ``if``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .base import MAX_CHEBYSHEV_DEGREE, Approximation, _as_interval
from .chebyshev import fit_chebyshev
from .composite import fit_composite_relu, fit_composite_relu_to_error, fit_composite_sign, fit_composite_sign_to_error
from .functions import EXACT_FUNCTIONS
from .newton import fit_newton_inv_sqrt, fit_newton_reciprocal
from .remez import fit_minimax

__all__ = ["FitMethod", "Approximator", "METHODS", "APPROXIMATORS", "register_approximator", "fit_operator",
           "search_degree", "DEFAULT_DEGREE", "MAX_SEARCH_DEGREE"]

# Default degree of a single series: the largest degree costing 6 levels in OpenFHE on a general interval
# (degrees 14..27 all cost 6, so 27 is the most accurate for that depth).
DEFAULT_DEGREE = 27
# Degree-from-error search stops here by default (a degree-255 series already costs 10 levels).
MAX_SEARCH_DEGREE = 255


def search_degree(fit: Callable[[int], Approximation], max_error: float, max_degree: int = MAX_SEARCH_DEGREE,
                  min_degree: int = 1) -> Approximation:
    """Smallest degree ``d`` in ``[min_degree, max_degree]`` with ``fit(d).max_error <= max_error``.

    Doubling (3, 7, 15, ...) brackets it, bisection finds it (the error of a best fit does not grow with the
    degree). Returns the fit found, or the most accurate fit tried when none meets the target."""
    tried: dict[int, Approximation] = {}

    def at(d: int) -> Approximation:
        if d not in tried:
            tried[d] = fit(d)
        return tried[d]

    lo, d = min_degree - 1, max(min_degree, 3)  # lo: largest degree known to fail
    while at(d).max_error > max_error:
        if d >= max_degree:
            return min(tried.values(), key=lambda a: a.max_error)
        lo, d = d, min(2 * d + 1, max_degree)
    hi = d
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).max_error <= max_error:
            hi = mid
        else:
            lo = mid
    return at(hi)


@dataclass(frozen=True)
class FitMethod:
    """A fitting method. ``fit(func, interval, degree, op=..., **kw)``; ``fit_to_error(func, interval,
    max_error, op=..., **kw)`` returns the cheapest fit it finds meeting ``max_error`` (or its best try)."""

    name: str
    fit: Callable[..., Approximation]
    fit_to_error: Callable[..., Approximation]
    help: str = ""


def _single_series(name: str, fitter: Callable, help: str) -> FitMethod:
    def fit(func, interval, degree=None, op="custom", **kw):
        return fitter(func, interval, DEFAULT_DEGREE if degree is None else degree, op=op, **kw)

    def fit_to_error(func, interval, max_error, op="custom", max_degree=MAX_SEARCH_DEGREE, **kw):
        return search_degree(lambda d: fitter(func, interval, d, op=op, **kw), max_error, max_degree)

    return FitMethod(name, fit, fit_to_error, help)


METHODS: dict[str, FitMethod] = {
    "chebyshev": _single_series("chebyshev", fit_chebyshev, "Chebyshev interpolation, one series"),
    "minimax": _single_series("minimax", fit_minimax, "Remez minimax, one series"),
}

# op-specific methods (they build structure around the op, so they are not generic)
_COMPOSITE_RELU = FitMethod(
    "composite",
    fit=lambda func, interval, degree=None, op="relu", **kw: fit_composite_relu(interval, degree, op=op, **kw),
    fit_to_error=lambda func, interval, max_error, op="relu", **kw: fit_composite_relu_to_error(interval, max_error, op=op),
    help="(x + x * sign(x)) / 2 with a composite minimax sign (Lee et al. 2021)",
)
_COMPOSITE_SIGN = FitMethod(
    "composite",
    fit=lambda func, interval, degree=None, op="sign", **kw: fit_composite_sign(interval, degree, op=op, **kw),
    fit_to_error=lambda func, interval, max_error, op="sign", **kw: fit_composite_sign_to_error(
        interval, max_error, op=op, **kw),
    help="composite of odd minimax polynomials, accurate outside (-eps, eps) (Lee et al. 2021)",
)


def _newton(fitter: Callable) -> FitMethod:
    return FitMethod(
        "newton",
        fit=lambda func, interval, degree=None, op="custom", **kw: fitter(interval, degree, op=op, **kw),
        fit_to_error=lambda func, interval, max_error, op="custom", **kw: fitter(
            interval, kw.pop("degree", None), max_error=max_error, op=op, **kw),
        help="relative-minimax initial guess + Newton steps",
    )


@dataclass
class Approximator:
    """What an operator accepts: its exact numpy function, the fitting methods that make sense for it
    (name -> :class:`FitMethod`) and the default one. Calling it fits: ``approximator(interval, degree)``."""

    op: str
    func: Callable
    methods: dict = field(default_factory=dict)
    default_method: str = "minimax"

    def __call__(self, interval: Sequence[float], degree: Optional[int] = None, **kw) -> Approximation:
        return fit_operator(self.op, interval, degree, **kw)


APPROXIMATORS: dict[str, Approximator] = {}


def register_approximator(op: str, func: Optional[Callable] = None, methods: Optional[dict] = None,
                          default_method: Optional[str] = None):
    """Register how to approximate ``op``. Two forms:

    - ``register_approximator("gelu", func=gelu, methods={...}, default_method="minimax")``;
    - as a decorator on a fitter ``fn(interval, degree=None, **kw) -> Approximation``: it becomes the
      default method ``"custom"`` of ``op`` (degree-from-error then searches the degree of ``fn``).
    Single-series methods (``chebyshev``, ``minimax``) are always available when ``func`` is known."""

    def add(entry_methods: dict, default: str, exact: Optional[Callable]):
        exact = exact or EXACT_FUNCTIONS.get(op)
        base = dict(METHODS) if exact is not None else {}
        APPROXIMATORS[op] = Approximator(op, exact, {**base, **entry_methods}, default)
        return APPROXIMATORS[op]

    if methods is not None or func is not None:
        return add(dict(methods or {}), default_method or "minimax", func)

    def wrap(fn):
        custom = FitMethod(
            "custom",
            fit=lambda f, interval, degree=None, op=op, **kw: fn(interval, degree, **kw),
            fit_to_error=lambda f, interval, max_error, op=op, max_degree=MAX_SEARCH_DEGREE, **kw: search_degree(
                lambda d: fn(interval, d, **kw), max_error, max_degree),
        )
        add({"custom": custom}, "custom", None)
        return fn

    return wrap


for _op in ("gelu", "gelu_new", "silu", "tanh", "exp", "squared_relu"):
    register_approximator(_op, func=EXACT_FUNCTIONS[_op], methods={}, default_method="minimax")
register_approximator("relu", func=EXACT_FUNCTIONS["relu"], methods={"composite": _COMPOSITE_RELU},
                      default_method="composite")
register_approximator("sign", func=EXACT_FUNCTIONS["sign"], methods={"composite": _COMPOSITE_SIGN},
                      default_method="composite")
register_approximator("inv_sqrt", func=EXACT_FUNCTIONS["inv_sqrt"], methods={"newton": _newton(fit_newton_inv_sqrt)},
                      default_method="newton")
register_approximator("reciprocal", func=EXACT_FUNCTIONS["reciprocal"],
                      methods={"newton": _newton(fit_newton_reciprocal)}, default_method="newton")


def fit_operator(op: str, interval: Sequence[float], degree: Optional[int] = None, max_error: Optional[float] = None,
                 method: Optional[str] = None, **kwargs) -> Approximation:
    """Fit the registered approximation of ``op`` on ``interval``.

    ``method`` picks one of the operator's methods (default: its ``default_method``; see
    ``APPROXIMATORS[op].methods``). ``degree`` fixes the degree (per stage for ``composite``, of the initial
    guess for ``newton``); ``max_error`` (absolute, on ``interval``) instead picks the cheapest fit meeting
    it -- the smallest degree for one series -- and raises ``ValueError`` naming the target and the best
    error reached when none does. With both, the fit of that degree must meet ``max_error``. Other keyword
    arguments go to the method (e.g. ``eps=`` for composite, ``newton_steps=`` for newton)."""
    if op not in APPROXIMATORS:
        raise ValueError(f"no approximation registered for operator {op!r}; accepted: {', '.join(sorted(APPROXIMATORS))}")
    entry = APPROXIMATORS[op]
    method = method or entry.default_method
    if method not in entry.methods:
        raise ValueError(f"method {method!r} is not available for {op!r}; accepted: {', '.join(sorted(entry.methods))}")
    interval = _as_interval(interval)
    if degree is not None and (isinstance(degree, bool) or int(degree) != degree or not 1 <= degree <= MAX_CHEBYSHEV_DEGREE):
        raise ValueError(f"degree must be an integer in [1, {MAX_CHEBYSHEV_DEGREE}] or None, got {degree!r}")
    fm = entry.methods[method]
    if max_error is None:
        return fm.fit(entry.func, interval, degree, op=op, **kwargs)
    if isinstance(max_error, bool) or not (isinstance(max_error, (int, float)) and math.isfinite(max_error) and max_error > 0):
        raise ValueError(f"max_error must be a positive finite number, got {max_error!r}")
    if degree is not None:
        approx = fm.fit(entry.func, interval, degree, op=op, **kwargs)
    else:
        approx = fm.fit_to_error(entry.func, interval, float(max_error), op=op, **kwargs)
    if not approx.max_error <= max_error:
        raise ValueError(
            f"cannot approximate {op!r} on {list(interval)} within max_error={max_error:g} with method {method!r}"
            f"{'' if degree is None else f' at degree {degree}'}: best reached {approx.max_error:.3g} "
            f"(degree {approx.degree}, depth {approx.depth}); widen max_error, narrow the interval or try another "
            f"method ({', '.join(sorted(entry.methods))})"
        )
    return approx
