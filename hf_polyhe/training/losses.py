"""Range and variance losses (Zimerman et al., ICML 2024, §4.2): keep every operator input where its
polynomial is accurate.

``L = L_task + α · L_range + β · L_var`` where, for each selected operator with input ``x``,

- ``L_range`` = mean over operators of ``mean(relu(x - hi)^p + relu(lo - x)^p)`` with ``[lo, hi] = [-B, B]``
  for activations (``B`` configurable, per path / role / operator), the operator's own interval for
  ``reciprocal`` and ``exp``, and -- once an operator has been fitted and switched to ``"blend"`` / ``"poly"``
  -- the interval its polynomial was fitted on;
- ``L_var`` = mean over ``PolyLayerNorm`` s of ``mean(relu(var - V)) + mean(relu(V_min - var))``, on the input of
  their ``inv_sqrt`` (``var + eps``).

:class:`RangeLoss` captures the operator inputs of the current forward pass with forward pre-hooks (only in
training mode with gradients enabled) and turns them into the penalty; call it once per forward pass::

    range_loss = RangeLoss(model, RangeLossConfig(alpha=1e-2, bound=8.0))
    out = model(**batch)
    loss = out.loss + range_loss()        # also works inside gradient accumulation / DDP
    loss.backward()

With the ``Trainer`` use :class:`~hf_polyhe.training.PolyTrainer`, which adds it with the right
gradient-accumulation scaling.
"""

from __future__ import annotations

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
    bound: float = field(default=8.0, metadata={"help": "B: activations are penalised outside [-B, B]"})
    bounds: Optional[dict] = field(
        default=None, metadata={"help": "B per module path, role or operator name, e.g. {'attn_act': 16.0}"})
    intervals: Optional[dict] = field(
        default=None,
        metadata={"help": "target [lo, hi] per path / role / op for operators not symmetric around 0 "
                          "(reciprocal, exp); default: the operator's interval"})
    beta: float = field(default=1e-3, metadata={"help": "weight β of the LayerNorm variance loss"})
    max_variance: float = field(default=64.0, metadata={"help": "V: variances above V are penalised"})
    min_variance: Optional[float] = field(default=None, metadata={"help": "variances below this are penalised"})
    power: int = field(default=2, metadata={"help": "exponent p of the range excess"})
    follow_fitted_interval: bool = field(
        default=True, metadata={"help": "once fitted (blend/poly), target the operator's polynomial interval"})
    ops: Optional[list] = field(default=None, metadata={"help": "operator names to include (None = all)"})
    roles: Optional[list] = field(default=None, metadata={"help": "roles to include (None = all)"})
    layers: Optional[list] = field(default=None, metadata={"help": "layer indices to include (None = all)"})

    def __post_init__(self):
        if self.bound <= 0:
            raise ValueError(f"bound must be > 0, got {self.bound}")
        if self.max_variance <= 0:
            raise ValueError(f"max_variance must be > 0, got {self.max_variance}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.power < 1:
            raise ValueError(f"power must be >= 1, got {self.power}")


def range_penalty(x: torch.Tensor, lo: float, hi: float, power: int = 2) -> torch.Tensor:
    """``mean(relu(x - hi)^p + relu(lo - x)^p)``: zero when ``x`` stays inside ``[lo, hi]``."""
    excess = torch.relu(x - hi) + torch.relu(lo - x)  # at most one of them is non-zero
    return (excess**power).mean() if power != 1 else excess.mean()


@dataclass
class RangeLossOutput:
    """``total = alpha * range + beta * variance`` (tensors with gradients), plus the unweighted parts."""

    total: torch.Tensor
    range: torch.Tensor
    variance: torch.Tensor


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
        self._handles = [op.register_forward_pre_hook(self._hook(p), prepend=True) for p, op in self._operators.items()]

    @property
    def operators(self) -> dict[str, PolyOperator]:
        return dict(self._operators)

    def target_interval(self, path: str, op: PolyOperator) -> tuple[float, float]:
        """The interval outside which ``op``'s input is penalised."""
        c = self.config
        if c.follow_fitted_interval and op.mode != "exact" and op.approximation is not None:
            return tuple(op.approximation.interval)
        if op.op == "inv_sqrt":
            lo = c.min_variance if c.min_variance is not None else -float("inf")
            return (lo, _lookup(c.bounds, path, op, None) or c.max_variance)
        if op.op in ("reciprocal", "exp"):
            return tuple(_lookup(c.intervals, path, op, op.interval))
        b = float(_lookup(c.bounds, path, op, c.bound))
        return (-b, b)

    def _hook(self, path: str):
        def hook(module, args):
            if not (module.training and torch.is_grad_enabled()):
                return
            x = args[0]
            lo, hi = self.target_interval(path, module)
            norm = module.op == "inv_sqrt"
            term = range_penalty(x, lo, hi, power=1 if norm else self.config.power)
            # Gradient checkpointing recomputes a block's forward inside backward: the penalty is computed again so
            # that the recomputation saves the same tensors as the forward pass, but it was counted already.
            if in_backward():
                return
            if norm:
                self._variance_terms.append(term)
                self._record(f"range/{module.role}_var_max", x.detach().max())
            else:
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
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def extra_repr(self) -> str:
        c = self.config
        return (f"{len(self._operators)} operators, alpha={c.alpha}, bound={c.bound}, beta={c.beta}, "
                f"max_variance={c.max_variance}")
