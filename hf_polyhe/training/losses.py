"""Range and variance losses (Zimerman et al., ICML 2024, §4.2): keep every operator input where its
polynomial is accurate.

``L = L_task + α · L_range + β · L_var`` where, for each selected operator with input ``x`` and its target
interval ``[lo, hi]``, with ``e = relu(x - hi) + relu(lo - x)`` the excess,

- ``L_range`` = mean over activations of ``mean(e^p) + γ · mean(top_k(e)^p)``: the mean excess and the mean of
  the ``k`` largest excesses of the batch (``k = top_k_fraction`` of its elements, at least 1). The second term
  is the one that moves the *maximum* -- what sets the interval a polynomial must be fitted on -- where the mean
  alone lowers typical values and leaves the outliers (measured on the tiny recipe: 17x less mean excess, the
  same maximum);
- ``L_var`` = the same on the input of every ``PolyLayerNorm``'s ``inv_sqrt`` (``var + eps``) with ``p = 1`` -- on
  ``log(var + eps)`` against the log of the target unless ``max_variance`` / ``min_variance`` fix it: variances
  span decades and their ratio ``hi / lo`` is what sets the degree of the ``inv_sqrt`` polynomial.

Target intervals. By default (``bound=None``, ``max_variance=None``) they come from the range measured on the
batch itself, per operator, shrunk by ``shrink`` ``s``: activations ``[-s·A, s·A]`` with ``A`` the batch's largest
``|x|``; variances ``[v_min, v_max]`` contracted around their geometric centre to the ratio ``(v_max / v_min)^s``
(the ratio is what sets the degree of the ``inv_sqrt`` polynomial). So the loss acts on every batch at any scale of
the model and pulls in the tail of each operator's inputs -- a fixed ``B = 8`` is never reached by a model whose
activations stay below 3 (the tiny recipe) and did nothing: training with and without it was bit-identical. ``bound=B`` (per path / role / operator with ``bounds``) and ``max_variance=V`` /
``min_variance`` set fixed targets instead; ``reciprocal`` and ``exp`` use their own interval (``intervals``).
Once an operator is fitted and runs its polynomial (``"blend"`` / ``"poly"``), its target is the interval the
polynomial was fitted on contracted to ``fitted_target`` of it (positive operators: its ratio to that power), so the loss keeps pulling its inputs back
inside the range measured at the fit (the margin stays free) instead of stopping.

:class:`RangeLoss` captures the operator inputs of the current forward pass with forward pre-hooks (only in
training mode with gradients enabled) and turns them into the penalty; call it once after each forward pass
(inputs of a forward pass that no call consumed are dropped when the next forward pass starts, so an unused
loss never keeps autograd graphs alive)::

    range_loss = RangeLoss(model, RangeLossConfig(alpha=1e-2))
    out = model(**batch)
    loss = out.loss + range_loss()        # also works inside gradient accumulation / DDP
    loss.backward()

With the ``Trainer`` use :class:`~hf_polyhe.training.PolyTrainer`, which adds it with the right
gradient-accumulation scaling.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..nn.operators import OPERATOR_ROLES, PolyOperator, check_names, operator_names
from .ranges import _unwrap, in_backward
from ..status import select_operators


@dataclass
class RangeLossConfig:
    """Weights and target intervals of the range and variance losses."""

    alpha: float = field(default=1e-2, metadata={"help": "weight α of the range loss"})
    bound: Optional[float] = field(
        default=None, metadata={"help": "B: activations are penalised outside [-B, B]; None: shrink x the largest "
                                        "|x| of the batch, per operator"})
    bounds: Optional[dict] = field(
        default=None, metadata={"help": "B per module path, role or operator name, e.g. {'attn_act': 16.0}"})
    intervals: Optional[dict] = field(
        default=None,
        metadata={"help": "target [lo, hi] per path / role / op for operators not symmetric around 0 "
                          "(reciprocal, exp); default: the operator's interval"})
    beta: float = field(default=1e-3, metadata={"help": "weight β of the LayerNorm variance loss"})
    max_variance: Optional[float] = field(
        default=None, metadata={"help": "V: variances above V are penalised; None (with min_variance None): the "
                                        "batch's [v_min, v_max] contracted to the ratio (v_max/v_min)^shrink"})
    min_variance: Optional[float] = field(default=None, metadata={"help": "variances below this are penalised"})
    shrink: float = field(
        default=0.5, metadata={"help": "measured targets: the batch's range shrunk by this factor (0, 1]"})
    extreme_weight: float = field(
        default=1.0, metadata={"help": "γ: weight of the mean of the top-k excesses (the batch's extremes)"})
    top_k_fraction: float = field(
        default=1e-3, metadata={"help": "k of the extremes term, as a fraction of an operator's inputs (k >= 1)"})
    power: int = field(default=2, metadata={"help": "exponent p of the range excess"})
    follow_fitted_interval: bool = field(
        default=True, metadata={"help": "once fitted (blend/poly), target fitted_target of the polynomial's interval"})
    fitted_target: float = field(
        default=0.75, metadata={"help": "fraction (0, 1] of a fitted interval targeted (1: the interval itself; "
                                        "inv_sqrt / reciprocal: the ratio hi/lo to this power)"})
    ops: Optional[list] = field(default=None, metadata={"help": "operator names to include (None = all)"})
    roles: Optional[list] = field(default=None, metadata={"help": "roles to include (None = all)"})
    layers: Optional[list] = field(default=None, metadata={"help": "layer indices to include (None = all)"})

    def __post_init__(self):
        if self.bound is not None and self.bound <= 0:
            raise ValueError(f"bound must be > 0 (or None: from measured ranges), got {self.bound}")
        if self.max_variance is not None and self.max_variance <= 0:
            raise ValueError(f"max_variance must be > 0 (or None: from measured ranges), got {self.max_variance}")
        for name in ("shrink", "fitted_target"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 < self.top_k_fraction <= 1 or self.extreme_weight < 0:
            raise ValueError(f"top_k_fraction must be in (0, 1] and extreme_weight >= 0, got {self.top_k_fraction}, "
                             f"{self.extreme_weight}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.power < 1:
            raise ValueError(f"power must be >= 1, got {self.power}")


def range_penalty(x: torch.Tensor, lo: float, hi: float, power: int = 2, top_k: Optional[int] = None,
                  extreme_weight: float = 1.0) -> torch.Tensor:
    """``mean(e^p) [+ extreme_weight · mean(top_k(e)^p)]`` with ``e = relu(x - hi) + relu(lo - x)``: zero when
    ``x`` stays inside ``[lo, hi]``. The optional second term is the mean of the ``top_k`` largest excesses: the
    gradient it gives the batch's extremes does not shrink with the batch size, so it moves the maximum."""
    excess = (torch.relu(x - hi) + torch.relu(lo - x)).flatten()  # at most one of them is non-zero
    powered = excess**power if power != 1 else excess
    out = powered.mean()
    if top_k and extreme_weight:
        out = out + extreme_weight * powered.topk(min(int(top_k), powered.numel())).values.mean()
    return out


@dataclass
class RangeLossOutput:
    """``total = alpha * range + beta * variance`` (tensors with gradients), plus the unweighted parts."""

    total: torch.Tensor
    range: torch.Tensor
    variance: torch.Tensor


def _contract_positive(lo, hi, factor):
    """``[lo, hi]`` (positive) contracted around its geometric centre to the ratio ``(hi / lo) ** factor``: the
    ratio is what sets the degree an ``inv_sqrt`` or ``1/x`` polynomial needs. Floats or 0-dim tensors."""
    centre = (lo * hi) ** 0.5
    return (centre * (lo / centre) ** factor, centre * (hi / centre) ** factor)


def _log(v):
    if torch.is_tensor(v):
        return torch.log(v)
    return math.log(v) if v > 0 else -math.inf


def _lookup(table: Optional[dict], path: str, op: PolyOperator, default: Any) -> Any:
    if not table:
        return default
    for key in (path, op.role, op.op):
        if key in table:
            return table[key]
    return default


class RangeLoss(nn.Module):
    """Range + variance loss computed from the operator inputs seen since the last call.

    Hooks record only forward passes in training mode with gradients enabled, so evaluation and
    calibration passes never leak into the loss. Has no parameters (safe to create at any time)."""

    def __init__(self, model: nn.Module, config: Optional[RangeLossConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = RangeLossConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a RangeLossConfig or keyword arguments, not both")
        self.config = config
        # not registered as submodules: the loss must not own the model
        self._operators = select_operators(_unwrap(model), config.ops, config.roles, config.layers)
        keys = [*OPERATOR_ROLES, *operator_names(), *select_operators(_unwrap(model))]
        for name in ("bounds", "intervals"):  # a misspelt key would silently fall back to the default
            check_names(list(getattr(config, name) or {}), keys,
                        f"key(s) in RangeLossConfig.{name} (operator role, operator name or module path)")
        self._range_terms: list = []
        self._variance_terms: list = []
        self._stats: dict[str, torch.Tensor] = {}
        self._model_ref = weakref.ref(_unwrap(model))  # not a submodule: the loss must not own the model
        self._handles: list = []
        self.attach()

    @property
    def operators(self) -> dict[str, PolyOperator]:
        return dict(self._operators)

    @property
    def captured(self) -> int:
        """How many captured operator inputs (tensors holding autograd graphs) wait for the next call."""
        return len(self._range_terms) + len(self._variance_terms)

    def attach(self) -> None:
        """Install the hooks (done by the constructor; again after :meth:`remove`)."""
        if self._handles:
            return
        self._handles = [op.register_forward_pre_hook(self._hook(p), prepend=True)
                         for p, op in self._operators.items()]
        # a new forward pass of the model drops what the previous one captured and nobody consumed (evaluation
        # in training mode, a loss built but not used): without it each such pass would keep its autograd graph
        model = self._model_ref()
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._drop_unconsumed))

    def _drop_unconsumed(self, module, args):
        if not in_backward():
            self._range_terms, self._variance_terms = [], []

    def target_interval(self, path: str, op: PolyOperator, x: Optional[torch.Tensor] = None) -> tuple:
        """The interval outside which ``op``'s input is penalised. A target measured on the batch (``bound`` /
        ``max_variance`` left ``None``) needs the current input ``x``; without it that target is unbounded."""
        c = self.config
        if c.follow_fitted_interval and op.mode != "exact" and op.approximation is not None:
            lo, hi = op.approximation.interval
            if op.op in ("inv_sqrt", "reciprocal"):
                return _contract_positive(lo, hi, c.fitted_target)
            centre, half = (lo + hi) / 2, (hi - lo) / 2 * c.fitted_target
            return (centre - half, centre + half)
        if op.op == "inv_sqrt":
            fixed = _lookup(c.bounds, path, op, None) or c.max_variance
            if fixed is None and c.min_variance is None:
                if x is None:
                    return (-math.inf, math.inf)
                v = x.detach()
                return _contract_positive(v.min().clamp_min(1e-12), v.max().clamp_min(1e-12), c.shrink)
            lo = c.min_variance if c.min_variance is not None else -math.inf
            return (lo, fixed if fixed is not None else math.inf)
        if op.op in ("reciprocal", "exp"):
            return tuple(_lookup(c.intervals, path, op, op.interval))
        b = _lookup(c.bounds, path, op, c.bound)
        if b is None:
            if x is None:
                return (-math.inf, math.inf)
            b = c.shrink * x.detach().abs().max()  # a 0-dim tensor: no device sync in the forward pass
            return (-b, b)
        return (-float(b), float(b))

    def _relative_variance(self, path: str, op: PolyOperator) -> bool:
        """Whether the variance term of ``op`` is on ``log(var + eps)``: measured or fitted targets (ratios matter)
        -- not fixed ``max_variance`` / ``min_variance`` / ``bounds``, which keep the paper's linear excess."""
        c = self.config
        if c.follow_fitted_interval and op.mode != "exact" and op.approximation is not None:
            return True
        return (_lookup(c.bounds, path, op, None) or c.max_variance) is None and c.min_variance is None

    def _hook(self, path: str):
        def hook(module, args):
            if not (module.training and torch.is_grad_enabled()):
                return
            x = args[0]
            norm = module.op == "inv_sqrt"
            weight = self.config.beta if norm else self.config.alpha
            lo, hi = self.target_interval(path, module, x)
            if weight:  # nothing to build (nor to keep alive) for a term weighted 0
                c = self.config
                k = max(1, math.ceil(c.top_k_fraction * x.numel()))
                v = x
                if norm and self._relative_variance(path, module):
                    # variances span decades and their ratio sets the inv_sqrt degree: penalise log excess
                    v, lo, hi = torch.log(x.clamp_min(1e-12)), _log(lo), _log(hi)
                term = range_penalty(v, lo, hi, power=1 if norm else c.power, top_k=k, extreme_weight=c.extreme_weight)
            # Gradient checkpointing recomputes a block's forward inside backward: the penalty is computed again so
            # that the recomputation saves the same tensors as the forward pass, but it was counted already.
            if in_backward():
                return
            if norm:
                if weight:
                    self._variance_terms.append(term)
                self._record(f"range/{module.role}_var_max", x.detach().max())
            else:
                if weight:
                    self._range_terms.append(term)
                self._record(f"range/{module.role}_absmax", x.detach().abs().max())

        return hook

    def _record(self, key: str, value: torch.Tensor) -> None:
        # kept as tensors (no device sync in the forward pass); converted in pop_stats
        old = self._stats.get(key)
        self._stats[key] = value if old is None else torch.maximum(old, value)

    def forward(self) -> torch.Tensor:
        """The weighted penalty ``α·L_range + β·L_var`` of the forward passes since the last call."""
        return self.compute().total

    def compute(self) -> RangeLossOutput:
        """Like calling the module, but also returns the unweighted parts; clears the captured inputs."""
        zero = torch.zeros(())
        r = torch.stack(self._range_terms).mean() if self._range_terms else zero
        v = torch.stack(self._variance_terms).mean() if self._variance_terms else zero
        self._range_terms, self._variance_terms = [], []
        return RangeLossOutput(self.config.alpha * r + self.config.beta * v, r, v)

    def pop_stats(self) -> dict[str, float]:
        """Largest ``|x|`` per role (and largest ``var + eps`` for norms) seen since the last call."""
        stats, self._stats = self._stats, {}
        return {k: float(v) for k, v in sorted(stats.items())}

    def remove(self) -> None:
        """Remove the hooks and drop whatever was captured and not consumed (:meth:`attach` puts them back)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._range_terms, self._variance_terms = [], []

    def extra_repr(self) -> str:
        c = self.config
        bound = c.bound if c.bound is not None else f"measured x {c.shrink}"
        var = c.max_variance if c.max_variance is not None or c.min_variance is not None else f"measured x {c.shrink}"
        return f"{len(self._operators)} operators, alpha={c.alpha}, bound={bound}, beta={c.beta}, max_variance={var}"
