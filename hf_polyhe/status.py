"""Which operators of a model are polynomial, and switching them: ``polynomial_status``, ``to_polynomial``.

``polynomial_status(model, data)`` also runs the model on ``data`` and reports, per operator, the fraction of its
inputs outside the interval its polynomial was fitted on (the out-of-interval rate), warning with
:class:`OutOfIntervalWarning` when any is outside: a polynomial diverges outside its interval, in plaintext (NaN)
as under encryption (where nothing checks: the decrypted result is silently wrong)."""

from __future__ import annotations

import warnings
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .nn.attention import PolyAttention
from .nn.operators import OPERATOR_ROLES, PolyOperator, canonical_activation, check_names, operator_names


class OutOfIntervalWarning(UserWarning):
    """Inputs of a polynomial operator left the interval its polynomial was fitted on (see
    :func:`polynomial_status` with ``data``): there the polynomial diverges -- NaN / huge outputs in plaintext,
    silently wrong decryptions under encryption."""


@dataclass
class OperatorStatus:
    path: str
    op: str
    mode: str
    role: str
    layer_idx: Optional[int]
    interval: Optional[tuple]
    degree: Optional[int]
    depth: Optional[int]
    max_error: Optional[float]
    convertible: bool
    out_of_interval: Optional[float] = None  # fraction of inputs outside ``interval`` on the data given, if any
    measured: Optional[tuple] = None  # (min, max) of the inputs on that data (NaN if any input was NaN)

    @property
    def is_polynomial(self) -> bool:
        return self.mode == "poly"

    def describe_range(self) -> str:
        """``path: inputs [lo, hi] vs interval [a, b] (x% outside)`` for error messages."""
        lo, hi = self.measured
        return (f"{self.path} ({self.op}): inputs [{lo:.4g}, {hi:.4g}] vs interval [{self.interval[0]:.4g}, "
                f"{self.interval[1]:.4g}] ({100 * self.out_of_interval:.3g}% outside)")


@dataclass
class PolynomialStatus:
    """One row per non-polynomial operator; ``is_polynomial`` is True when every row runs a polynomial."""

    operators: list

    @property
    def is_polynomial(self) -> bool:
        return all(o.is_polynomial for o in self.operators)

    @property
    def offending(self) -> list:
        return [o for o in self.operators if not o.is_polynomial]

    @property
    def out_of_interval(self) -> list:
        """Operators whose inputs left their polynomial's interval on the data given to :func:`polynomial_status`
        (forward order: the first one is where the divergence starts)."""
        return [o for o in self.operators if o.out_of_interval]

    def __str__(self) -> str:
        checked = any(o.out_of_interval is not None for o in self.operators)
        head = f"{'module':<44} {'op':<13} {'mode':<6} {'interval':<22} {'deg':>4} {'depth':>5} {'max err':>9}"
        if checked:
            head += f" {'measured':>22} {'outside':>8}"
        lines = [head, "-" * len(head)]
        for o in self.operators:
            interval = f"[{o.interval[0]:.3g}, {o.interval[1]:.3g}]" if o.interval else "-"
            deg = str(o.degree) if o.degree is not None else "-"
            depth = str(o.depth) if o.depth is not None else "-"
            err = f"{o.max_error:.2e}" if o.max_error is not None else "-"
            mode = o.mode if o.convertible else f"{o.mode}!"
            line = f"{o.path:<44} {o.op:<13} {mode:<6} {interval:<22} {deg:>4} {depth:>5} {err:>9}"
            if checked:
                m = f"[{o.measured[0]:.3g}, {o.measured[1]:.3g}]" if o.measured else "-"
                rate = f"{100 * o.out_of_interval:.3g}%" if o.out_of_interval is not None else "-"
                line += f" {m:>22} {rate:>8}"
            lines.append(line)
        n_poly = sum(o.is_polynomial for o in self.operators)
        lines.append(f"{n_poly}/{len(self.operators)} operators polynomial -> "
                     + ("model is fully polynomial" if self.is_polynomial else "model is NOT fully polynomial"))
        if self.out_of_interval:
            lines.append(f"{len(self.out_of_interval)} operator(s) get inputs outside their polynomial's interval "
                         f"(first: {self.out_of_interval[0].path}): refit them, e.g. "
                         "hf_polyhe.training.refit_drifted_operators(model, data)")
        if any(not o.convertible for o in self.operators):
            lines.append("'!' = no polynomial form: use attention_type='pointwise'/'power' and norm_type='poly_layernorm'/'batchnorm'")
        return "\n".join(lines)


def polynomial_status(model: nn.Module, data: Optional[Iterable] = None,
                      max_batches: Optional[int] = None) -> PolynomialStatus:
    """List every non-polynomial operator of ``model`` with its mode and fitted polynomial.

    Rows come from :class:`PolyOperator` modules, plus exact-only operators that have no polynomial form
    (``nn.LayerNorm``, softmax attention).

    With ``data`` (batches of model keyword arguments, up to ``max_batches`` of them) the model runs on it in eval
    mode, as it is (its polynomials included: what an export computes), and each operator with a polynomial gets
    ``out_of_interval`` -- the fraction of its inputs outside the interval the polynomial was fitted on (NaN inputs
    count as outside) -- and ``measured`` (min, max). If any is outside, an :class:`OutOfIntervalWarning` names
    them; ``status.out_of_interval`` lists them in forward order (the first is where a divergence starts)."""
    rows = []
    for path, module in model.named_modules():
        if isinstance(module, PolyOperator):
            a = module.approximation
            rows.append(OperatorStatus(
                path, module.op, module.mode, module.role, module.layer_idx, module.interval,
                a.degree if a else None, a.depth if a else None, a.max_error if a else None, True,
            ))
        elif isinstance(module, nn.LayerNorm):
            rows.append(OperatorStatus(path, "layernorm", "exact", "norm", None, None, None, None, None, False))
        elif isinstance(module, PolyAttention) and module.attention_type == "softmax":
            rows.append(OperatorStatus(path, "softmax", "exact", "attn_act", module.layer_idx, None, None, None, None, False))
        elif isinstance(module, (nn.GELU, nn.ReLU, nn.Tanh, nn.SiLU, nn.Softmax)):
            rows.append(OperatorStatus(path, type(module).__name__.lower(), "exact", "act", None, None, None, None, None, False))
    if data is not None:
        rates, order = _out_of_interval_rates(model, data, max_batches)
        for row in rows:
            if row.path in rates:
                row.out_of_interval, row.measured = rates[row.path]
        seen = [r for r in rows if r.path in order]
        rows = sorted(seen, key=lambda r: order[r.path]) + [r for r in rows if r.path not in order]
        status = PolynomialStatus(rows)
        if status.out_of_interval:
            warnings.warn("inputs outside the fitted polynomial interval (under encryption these give wrong results "
                          "without any error): " + "; ".join(o.describe_range() for o in status.out_of_interval[:6]),
                          OutOfIntervalWarning, stacklevel=2)
        return status
    return PolynomialStatus(rows)


@torch.no_grad()
def _out_of_interval_rates(model: nn.Module, data: Iterable, max_batches: Optional[int]) -> tuple[dict, dict]:
    """``({path: (fraction outside, (min, max))}, {path: first-call order})`` for the operators that have a
    polynomial and run it (mode poly / blend), the model running ``data`` in eval mode as it is."""
    from .training.ranges import forward_batches  # training imports this module

    stats: dict = {}
    order: dict = {}

    def hook_for(path):
        def hook(module, args):
            if module.mode == "exact" or module.approximation is None:
                return
            x = args[0].detach()
            lo, hi = module.approximation.interval
            outside = int((~((x >= lo) & (x <= hi))).sum())
            n, o, mn, mx = stats.get(path, (0, 0, math.inf, -math.inf))
            finite = x[torch.isfinite(x)]
            if finite.numel() < x.numel():  # NaN / inf reached it: report the range as such
                mn, mx = (float("nan"),) * 2
            elif not (math.isnan(mn) or math.isnan(mx)):
                mn, mx = min(mn, float(finite.min())), max(mx, float(finite.max()))
            stats[path] = (n + x.numel(), o + outside, mn, mx)
            order.setdefault(path, len(order))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(p)) for p, m in model.named_modules() if isinstance(m, PolyOperator)]
    was_training = model.training
    model.eval()
    try:
        forward_batches(model, data, max_batches)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {p: (o / max(n, 1), (mn, mx)) for p, (n, o, mn, mx) in stats.items()}, order


def select_operators(
    model: nn.Module, ops: Optional[Iterable[str]] = None, roles: Optional[Iterable[str]] = None,
    layers: Optional[Iterable[Optional[int]]] = None,
) -> dict:
    """``{path: PolyOperator}`` filtered by operator name, role and layer index (``None`` = all). An unknown
    operator name or role raises ``ValueError`` (a typo would silently select nothing)."""
    check_selection(ops, roles)
    ops = [canonical_activation(o) for o in ops] if ops is not None else None
    ops, roles, layers = (set(v) if v is not None else None for v in (ops, roles, layers))
    return {
        p: m for p, m in model.named_modules() if isinstance(m, PolyOperator)
        and (ops is None or m.op in ops) and (roles is None or m.role in roles)
        and (layers is None or m.layer_idx in layers)
    }


def check_selection(ops: Optional[Iterable[str]] = None, roles: Optional[Iterable[str]] = None) -> None:
    """Raise ``ValueError`` for an operator name or role that does not exist (a typo would select nothing)."""
    check_names(list(ops or ()), operator_names(), "operator name(s)")
    check_names(list(roles or ()), list(OPERATOR_ROLES), "operator role(s)")


def to_polynomial(
    model: nn.Module,
    ranges: Optional[dict] = None,
    degree: Optional[int] = None,
    ops: Optional[Iterable[str]] = None,
    roles: Optional[Iterable[str]] = None,
    layers: Optional[Iterable[Optional[int]]] = None,
    calibration_data: Optional[Iterable] = None,
    calibration_batches: Optional[int] = None,
    margin=None,
    **fit_kwargs,
) -> nn.Module:
    """Fit each selected operator on its interval and switch it to ``"poly"``.

    The interval of an operator is ``ranges[path]`` if given; else, with ``calibration_data`` (batches of model
    keyword arguments, e.g. ``[{"input_ids": ids}]``; up to ``calibration_batches`` of them), the range of its
    input over that data measured with every operator exact (the norm reading the embeddings: also over the whole
    embedding table), widened by ``margin`` (default
    :data:`~hf_polyhe.training.DEFAULT_MARGIN`; see :func:`~hf_polyhe.training.calibrated_intervals`); else the
    interval it was last calibrated or fitted on. An operator that never saw data is fitted on a default interval
    ([-8, 8] for activations, [1e-3, 64] for the 1/sqrt of LayerNorm), which the inputs of a trained model
    routinely leave -- a polynomial diverges outside its interval (NaN outputs) -- so this warns, naming them.

    Refuses models with operators that have no polynomial form (exact ``nn.LayerNorm``, softmax)."""
    check_selection(ops, roles)  # before any work
    blockers = [o for o in polynomial_status(model).operators if not o.convertible]
    if blockers:
        names = ", ".join(f"{o.path} ({o.op})" for o in blockers[:6])
        raise ValueError(f"these operators have no polynomial form: {names}; rebuild the model with "
                         "attention_type='pointwise' or 'power' and norm_type='poly_layernorm' or 'batchnorm'")
    selected = select_operators(model, ops, roles, layers)
    ranges = dict(ranges or {})
    check_names(list(ranges), list(select_operators(model)), "module path(s) in ranges")  # else silently unused
    if calibration_data is not None:
        from .training.ranges import calibrated_intervals  # training imports this module

        measured = calibrated_intervals(model, calibration_data, calibration_batches, margin, ops=ops, roles=roles,
                                        layers=layers)
        ranges = {**measured, **ranges}
    uncalibrated = [f"{p} ({op.op} on [{op.interval[0]:.3g}, {op.interval[1]:.3g}])" for p, op in selected.items()
                    if p not in ranges and not op.calibrated]
    if uncalibrated:
        warnings.warn(
            f"to_polynomial: {len(uncalibrated)} operator(s) never saw calibration data and are fitted on default "
            f"intervals, which a trained model's inputs can leave (then the polynomial diverges: NaN outputs): "
            f"{', '.join(uncalibrated[:4])}{', ...' if len(uncalibrated) > 4 else ''}. Pass calibration_data= "
            "(a few batches of model inputs) or ranges=.", UserWarning, stacklevel=2)
    for path, op in selected.items():
        interval = ranges.get(path)
        op.fit(interval=tuple(interval) if interval is not None else None, degree=degree, **fit_kwargs)
        op.set_mode("poly")
    return model


def set_operator_mode(
    model: nn.Module, mode: str, ops=None, roles=None, layers=None, blend_weight: Optional[float] = None
) -> list:
    """Set the mode of the selected operators; returns their paths."""
    selected = select_operators(model, ops, roles, layers)
    for op in selected.values():
        op.set_mode(mode, blend_weight)
    return list(selected)
