"""Non-polynomial operators with an exact and a polynomial mode.

Every operator that CKKS cannot evaluate directly (ReLU, GELU, tanh, 1/sqrt in LayerNorm, 1/x in
power-softmax) is a :class:`PolyOperator`. It runs in one of three modes:

- ``"exact"``: the true function (training from scratch, conversion checks);
- ``"poly"``: its :class:`~hf_polyhe.approx.Approximation`, a polynomial fitted on a calibrated interval;
- ``"blend"``: ``(1 - w) * exact + w * poly`` with ``w = blend_weight``, used to ramp a replacement in.

The approximation is plain Python data (Chebyshev coefficients), not a tensor: it is stored in
``config.poly_operators`` by ``save_pretrained`` and applied again by ``from_pretrained``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..approx import Approximation, fit_operator

MODES = ("exact", "poly", "blend")


def _squared_relu(x):
    return torch.relu(x) ** 2


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# Exact torch versions; names match hf_polyhe.approx.EXACT_FUNCTIONS so each has a fitter.
EXACT_TORCH_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "gelu_new": _gelu_new,
    "silu": nn.functional.silu,
    "squared_relu": _squared_relu,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "inv_sqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal,
}

# Names used by transformers configs for the same functions.
ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new", "swish": "silu", "relu2": "squared_relu"}


class Square(nn.Module):
    """``x * x``: an activation that is already a polynomial (depth 1)."""

    def forward(self, x):
        return x * x


class Identity(nn.Module):
    def forward(self, x):
        return x


# Activations that need no approximation at all.
POLYNOMIAL_ACTIVATIONS: dict[str, type[nn.Module]] = {"square": Square, "identity": Identity}

# Interval used before any calibration (RangeTracker replaces it with measured ranges).
DEFAULT_INTERVALS: dict[str, tuple[float, float]] = {
    "inv_sqrt": (1e-3, 64.0),
    "reciprocal": (1e-3, 16.0),
    "exp": (-8.0, 2.0),
}
DEFAULT_ACTIVATION_INTERVAL = (-8.0, 8.0)

# Widest hi / lo a positive-domain operator is fitted on; wider intervals are clipped at the bottom, with a warning.
# Measured with the default degree 15 guess + up to 8 Newton steps: 1/x reaches a relative error of 8e-4 at a ratio
# of 1e3 (depth 14), 3e-6 at 1e4 (depth 22), 0.28 at 1e5; power-softmax row sums measured on [6.8e-4, 1.3e6]
# (ratio 2e9) had no positive initial guess at all (the fit raised). 1/sqrt: 3e-5 at 1e5 (depth 22).
MAX_POSITIVE_RATIO = {"reciprocal": 2e4, "inv_sqrt": 1e6}

# What an operator does in a model (PolyOperator.role): replacement schedules, margins and range-loss bounds
# select operators by role.
OPERATOR_ROLES = {
    "mlp_act": "activation of a transformer layer's MLP",
    "attn_act": "σ of pointwise attention",
    "attn_norm": "reciprocal of the row sum in power-softmax attention",
    "pooler_act": "tanh of the BERT / ViT pooler",
    "head_act": "activation of a task head (the masked-LM transform)",
    "act": "an activation outside the model families (a PolyOperator built by hand)",
    "norm": "inverse square root of a polynomial LayerNorm",
}


def canonical_activation(name: str) -> str:
    return ACTIVATION_ALIASES.get(name, name)


def operator_names() -> list[str]:
    """Every operator name a :class:`PolyOperator` accepts (aliases such as ``gelu_pytorch_tanh`` included)."""
    return sorted(set(EXACT_TORCH_FUNCTIONS) | set(ACTIVATION_ALIASES))


def check_names(names, accepted, what: str) -> None:
    """Raise ``ValueError`` naming every entry of ``names`` that is not in ``accepted`` (typos must not be ignored)."""
    unknown = [n for n in names if n not in accepted]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; accepted: {', '.join(map(str, accepted))}")


def accepted_activations() -> list[str]:
    return sorted(set(EXACT_TORCH_FUNCTIONS) - {"inv_sqrt", "reciprocal", "exp"} | set(POLYNOMIAL_ACTIVATIONS))


class PolyOperator(nn.Module):
    """A pointwise non-polynomial function ``op`` with modes exact / poly / blend.

    Args:
        op: operator name (a key of ``EXACT_TORCH_FUNCTIONS``).
        degree: polynomial degree used by :meth:`fit` when none is given.
        interval: input interval used by :meth:`fit` before any calibration.
        role: what the operator does in the model, a key of :data:`OPERATOR_ROLES` (``"mlp_act"``,
            ``"attn_act"``, ``"norm"``, ...), used by replacement schedules.
        layer_idx: transformer layer index, or ``None`` outside the layers (pooler, heads, final norm).

    ``calibrated`` says whether the interval comes from measured inputs (or was chosen by the caller) rather than
    being the default of :data:`DEFAULT_INTERVALS`: ``to_polynomial`` warns before fitting uncalibrated operators.
    """

    def __init__(
        self,
        op: str,
        degree: int = 15,
        interval: Optional[Sequence[float]] = None,
        role: str = "act",
        layer_idx: Optional[int] = None,
    ):
        super().__init__()
        op = canonical_activation(op)
        if op not in EXACT_TORCH_FUNCTIONS:
            raise ValueError(f"unknown operator {op!r}; accepted: {', '.join(sorted(EXACT_TORCH_FUNCTIONS))}")
        check_names([role], list(OPERATOR_ROLES), "operator role")
        self.op = op
        self.degree = int(degree)
        self.interval = tuple(float(v) for v in (interval or DEFAULT_INTERVALS.get(op, DEFAULT_ACTIVATION_INTERVAL)))
        self.role = role
        self.layer_idx = layer_idx
        self.mode = "exact"
        self.blend_weight = 0.0
        self.approximation: Optional[Approximation] = None
        self.calibrated = interval is not None

    # -- state ---------------------------------------------------------------------------------
    def set_mode(self, mode: str, blend_weight: Optional[float] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} for {self.op}; accepted: {', '.join(MODES)}")
        if mode != "exact" and self.approximation is None:
            raise RuntimeError(f"operator {self.op!r} has no approximation yet: call fit() before mode {mode!r}")
        self.mode = mode
        if blend_weight is not None:
            if not 0.0 <= blend_weight <= 1.0:
                raise ValueError(f"blend_weight must be in [0, 1], got {blend_weight}")
            self.blend_weight = float(blend_weight)

    def set_approximation(self, approximation: Approximation) -> None:
        if approximation.op != self.op:
            raise ValueError(f"approximation is for {approximation.op!r}, operator is {self.op!r}")
        self.approximation = approximation
        self.interval = approximation.interval
        self.calibrated = True  # the caller chose the approximation's interval

    def fit(self, interval: Optional[Sequence[float]] = None, degree: Optional[int] = None, **kwargs) -> Approximation:
        """Fit the polynomial on ``interval`` (default: the operator's current interval, which stays as calibrated
        -- or not -- as it was) with ``degree`` (default: the operator's own). An explicit ``degree`` becomes the
        operator's own (saved with it), so a later refit without one -- e.g. :func:`refit_drifted_operators` after
        ``PolyReplacementCallback(degree=63)`` -- keeps it instead of falling back to the config's."""
        calibrated = self.calibrated or interval is not None
        lo, hi = (float(v) for v in (interval or self.interval))
        max_ratio = MAX_POSITIVE_RATIO.get(self.op)
        if max_ratio is not None and lo > 0 and hi / lo > max_ratio:
            clipped = hi / max_ratio
            warnings.warn(f"{self.op} interval [{lo:.4g}, {hi:.4g}] spans a ratio of {hi / lo:.3g}, more than a "
                          f"polynomial initial guess + Newton steps can fit (MAX_POSITIVE_RATIO[{self.op!r}] = "
                          f"{max_ratio:.0e}): fitted on [{clipped:.4g}, {hi:.4g}] instead; inputs below "
                          f"{clipped:.4g} are outside it (polynomial_status(model, data) counts them) -- reduce the "
                          "range (range loss, attention scaling) rather than rely on them", UserWarning, stacklevel=2)
            interval = (clipped, hi)
        approx = fit_operator(self.op, interval or self.interval, degree or self.degree, **kwargs)
        self.set_approximation(approx)
        self.calibrated = calibrated
        if degree:
            self.degree = int(degree)
        return approx

    def spec(self) -> dict:
        """JSON-serialisable state, stored in ``config.poly_operators``."""
        return {
            "op": self.op,
            "mode": self.mode,
            "blend_weight": self.blend_weight,
            "interval": list(self.interval),
            "calibrated": self.calibrated,
            "degree": self.degree,
            "approximation": self.approximation.to_dict() if self.approximation is not None else None,
        }

    def load_spec(self, spec: dict) -> None:
        if spec.get("op", self.op) != self.op:
            raise ValueError(f"saved operator is {spec.get('op')!r}, module is {self.op!r}")
        self.interval = tuple(spec.get("interval", self.interval))
        if spec.get("degree") is not None:  # older specs: the config's degree, as built
            self.degree = int(spec["degree"])
        if spec.get("approximation"):
            self.approximation = Approximation.from_dict(spec["approximation"])
        # specs written before the flag existed: an operator with a polynomial had been fitted on purpose
        self.calibrated = bool(spec.get("calibrated", spec.get("approximation") is not None))
        self.set_mode(spec.get("mode", "exact"), spec.get("blend_weight", 0.0))

    # -- compute -------------------------------------------------------------------------------
    def exact(self, x: torch.Tensor) -> torch.Tensor:
        return EXACT_TORCH_FUNCTIONS[self.op](x)

    def polynomial(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximation is None:
            raise RuntimeError(f"operator {self.op!r} has no approximation: call fit() first")
        return self.approximation.evaluate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "exact":
            return self.exact(x)
        if self.mode == "poly":
            return self.polynomial(x)
        w = self.blend_weight
        return (1.0 - w) * self.exact(x) + w * self.polynomial(x)

    def extra_repr(self) -> str:
        r = f"op={self.op}, mode={self.mode}, interval=[{self.interval[0]:.4g}, {self.interval[1]:.4g}]"
        if self.approximation is not None:
            r += f", degree={self.approximation.degree}, depth={self.approximation.depth}"
        if self.mode == "blend":
            r += f", blend_weight={self.blend_weight:.3f}"
        return r


def make_activation(name: str, config, role: str, layer_idx: Optional[int] = None) -> nn.Module:
    """Build the activation ``name``: a polynomial module, or a :class:`PolyOperator`."""
    name = canonical_activation(name)
    if name in POLYNOMIAL_ACTIVATIONS:
        return POLYNOMIAL_ACTIVATIONS[name]()
    if name not in EXACT_TORCH_FUNCTIONS or name in ("inv_sqrt", "reciprocal", "exp"):
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(accepted_activations())}")
    return PolyOperator(name, degree=poly_degree(config, name), role=role, layer_idx=layer_idx)


def poly_degree(config, op: str) -> int:
    """Degree for ``op``: ``config.poly_degrees[op]`` if given, else ``config.poly_degree``."""
    per_op = {canonical_activation(k): v for k, v in (getattr(config, "poly_degrees", None) or {}).items()}
    return int(per_op.get(op, getattr(config, "poly_degree", 15)))
