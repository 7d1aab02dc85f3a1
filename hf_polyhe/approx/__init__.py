"""Polynomial approximations of non-polynomial operators (numpy only; no torch).

``fit_operator("gelu", (-8, 8))`` returns an :class:`Approximation` -- Chebyshev series stages plus a little
arithmetic -- with its measured ``max_error`` and its CKKS ``depth`` (levels, as the runtime evaluates it).
Methods: Chebyshev interpolation, minimax (Remez), composite sign/ReLU (Lee et al. 2021), Newton for
``1/sqrt(x)`` and ``1/x``.
"""

from .base import KINDS, MAX_CHEBYSHEV_DEGREE, Approximation, ChebyshevSeries, chebyshev_depth
from .chebyshev import fit_chebyshev, fit_chebyshev_series, max_abs_error
from .composite import fit_composite_relu, fit_composite_sign
from .errors import measure_max_error
from .functions import EXACT_FUNCTIONS
from .newton import fit_newton_inv_sqrt, fit_newton_reciprocal
from .registry import APPROXIMATORS, METHODS, Approximator, FitMethod, fit_operator, register_approximator, search_degree
from .remez import fit_minimax, remez_series

__all__ = [
    "KINDS",
    "MAX_CHEBYSHEV_DEGREE",
    "Approximation",
    "ChebyshevSeries",
    "chebyshev_depth",
    "fit_chebyshev",
    "fit_chebyshev_series",
    "fit_minimax",
    "remez_series",
    "fit_composite_sign",
    "fit_composite_relu",
    "fit_newton_inv_sqrt",
    "fit_newton_reciprocal",
    "max_abs_error",
    "measure_max_error",
    "EXACT_FUNCTIONS",
    "APPROXIMATORS",
    "METHODS",
    "Approximator",
    "FitMethod",
    "fit_operator",
    "register_approximator",
    "search_degree",
]
