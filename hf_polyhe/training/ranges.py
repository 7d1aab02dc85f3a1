"""Measuring the inputs of non-polynomial operators (``RangeTracker``, ``calibrate``) and turning measured ranges
into fitting intervals (``widen_interval``, ``calibrated_intervals``, ``refit_drifted_operators``).

A polynomial is only accurate on the interval it was fitted on, so before an operator becomes a polynomial
we measure what its input actually does on data. ``RangeTracker`` puts a forward pre-hook on every selected
:class:`~hf_polyhe.nn.PolyOperator` and keeps the running min / max of its input (for the ``inv_sqrt`` of a
``PolyLayerNorm`` that input is ``var + eps``, so its range *is* the variance range of the norm).

With ``window=K`` only the last ``K`` closed steps count (:meth:`RangeTracker.end_step` closes one), which
lets the replacement callback reuse the training batches it sees instead of a separate calibration set.
Under ``torch.distributed`` :meth:`RangeTracker.all_reduce` takes the min / max over ranks so that every rank
fits the same polynomial.

Calibration (:func:`calibrate`, and everything built on it: :func:`calibrated_intervals`, ``to_polynomial(
calibration_data=)``, :func:`refit_drifted_operators`, the replacement callback's calibration data) runs with
**every** operator temporarily exact (:func:`exact_operators`): a polynomial already fitted upstream that
diverges on some input would otherwise hand its garbage (1e34, NaN) to every operator downstream as a "range".
The first norm of a language model reads the embeddings directly, so its ``inv_sqrt`` range also covers the
variance of every (token, position) pair of the embedding tables (:func:`embedding_table_ranges`), not only of
the tokens the batches happen to contain.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ..nn.operators import OPERATOR_ROLES, PolyOperator, check_names, operator_names
from ..status import select_operators

logger = logging.getLogger(__name__)


def in_backward() -> bool:
    """True while autograd runs a backward pass. Gradient checkpointing re-runs a checkpointed block's forward
    there: its operator inputs were recorded in the forward pass already and must not count twice."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class OperatorRange:
    """Observed input range of one operator (``lo``/``hi`` are ``±inf`` before any observation)."""

    path: str
    op: str
    role: str
    layer_idx: Optional[int]
    lo: float
    hi: float
    count: int

    @property
    def abs_max(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    @property
    def observed(self) -> bool:
        return self.count > 0 and math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def interval(self) -> tuple[float, float]:
        return (self.lo, self.hi)


class _Stats:
    """Min / max / element count, for the current step and for the closed steps of the window."""

    def __init__(self, window: Optional[int]):
        self.lo, self.hi, self.count = math.inf, -math.inf, 0  # current (open) step, or everything if no window
        self.closed = deque(maxlen=window) if window else None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.float())
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))
        self.count += x.numel()

    def end_step(self) -> None:
        if self.closed is not None and self.count:
            self.closed.append((self.lo, self.hi, self.count))
            self.lo, self.hi, self.count = math.inf, -math.inf, 0

    def merged(self) -> tuple[float, float, int]:
        lo, hi, n = self.lo, self.hi, self.count
        for clo, chi, cn in self.closed or ():
            lo, hi, n = min(lo, clo), max(hi, chi), n + cn
        return lo, hi, n


class RangeTracker:
    """Forward pre-hooks recording the input range of every selected :class:`PolyOperator`.

    Args:
        model: the model to watch (hooks go on its ``PolyOperator`` submodules; a DDP wrapper is fine).
        ops, roles, layers: restrict to these operator names / roles / layer indices (``None`` = all).
        window: keep only the last ``window`` steps closed by :meth:`end_step` (``None`` = everything since
            the last :meth:`reset`).
        training_only: record only forward passes made in training mode (ignore evaluation).

    Use as a context manager (hooks are removed on exit) or call :meth:`remove` yourself::

        with RangeTracker(model) as tracker:
            for batch in loader:
                model(**batch)
        tracker.all_reduce()
        print(tracker.report())
    """

    def __init__(
        self,
        model: nn.Module,
        ops: Optional[Iterable[str]] = None,
        roles: Optional[Iterable[str]] = None,
        layers: Optional[Iterable[Optional[int]]] = None,
        window: Optional[int] = None,
        training_only: bool = False,
    ):
        self.window = window
        self.training_only = training_only
        self.operators: dict[str, PolyOperator] = select_operators(_unwrap(model), ops, roles, layers)
        self._stats = {path: _Stats(window) for path in self.operators}
        self._handles = [
            op.register_forward_pre_hook(self._hook(path), prepend=True) for path, op in self.operators.items()
        ]
        self.enabled = True

    def _hook(self, path: str):
        def hook(module, args):
            if self.enabled and (module.training or not self.training_only) and not in_backward():
                self._stats[path].update(args[0])

        return hook

    # -- bookkeeping -----------------------------------------------------------------------------
    def end_step(self) -> None:
        """Close the current step (only matters with ``window``)."""
        for s in self._stats.values():
            s.end_step()

    def reset(self) -> None:
        self._stats = {path: _Stats(self.window) for path in self.operators}

    def observe(self, path: str, lo: float, hi: float, count: int = 1) -> None:
        """Count the range ``[lo, hi]`` (``count`` values) as seen by ``path`` in the current step: a range
        known without running the model, e.g. the embedding table's variances (:func:`embedding_table_ranges`)."""
        if path not in self._stats:
            raise KeyError(f"{path!r} is not watched by this tracker")
        s = self._stats[path]
        s.lo, s.hi, s.count = min(s.lo, float(lo)), max(s.hi, float(hi)), s.count + int(count)

    def remove(self) -> None:
        """Remove the hooks (the recorded ranges stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        """``{path: {"closed": [[lo, hi, count], ...], "open": [lo, hi, count] or None}}`` (JSON data): what a
        checkpoint keeps so that a resumed run measures over the same window."""
        out = {}
        for path, s in self._stats.items():
            out[path] = {"closed": [list(c) for c in (s.closed or ())],
                         "open": [s.lo, s.hi, s.count] if s.count else None}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (paths this tracker does not watch are an error)."""
        unknown = sorted(set(state) - set(self._stats))
        if unknown:
            raise ValueError(f"ranges saved for operators this tracker does not watch: {', '.join(unknown[:4])}")
        for path, saved in state.items():
            s = _Stats(self.window)
            for entry in saved["closed"]:
                if s.closed is not None:
                    s.closed.append(tuple(entry))
                else:  # saved with a window, loaded without one: merge into the running range
                    s.lo, s.hi, s.count = min(s.lo, entry[0]), max(s.hi, entry[1]), s.count + entry[2]
            if saved.get("open"):
                lo, hi, n = saved["open"]
                s.lo, s.hi, s.count = min(s.lo, lo), max(s.hi, hi), s.count + n
            self._stats[path] = s

    def __enter__(self) -> "RangeTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- results ---------------------------------------------------------------------------------
    def ranges(self) -> dict[str, OperatorRange]:
        """``{module path: OperatorRange}`` over the window (or everything since the last reset)."""
        out = {}
        for path, op in self.operators.items():
            lo, hi, n = self._stats[path].merged()
            out[path] = OperatorRange(path, op.op, op.role, op.layer_idx, lo, hi, n)
        return out

    def intervals(self) -> dict[str, tuple[float, float]]:
        """``{path: (lo, hi)}`` for observed operators, ready for ``to_polynomial(model, ranges=...)``."""
        return {p: r.interval for p, r in self.ranges().items() if r.observed}

    def all_reduce(self) -> "RangeTracker":
        """Min / max over all ranks of ``torch.distributed`` (no-op when it is not initialised).

        Afterwards the tracker holds the global range as a single closed entry, identical on every rank.
        Every rank must call this the same number of times (it is a collective)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        if torch.distributed.get_world_size() == 1:
            return self
        paths = list(self.operators)
        merged = [self._stats[p].merged() for p in paths]
        # one collective: MIN over (lo, -hi), SUM over counts
        t = torch.tensor([[lo, -hi] for lo, hi, _ in merged] or [[0.0, 0.0]], dtype=torch.float64)
        n = torch.tensor([c for _, _, c in merged] or [0], dtype=torch.float64)
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t, n = t.to(device), n.to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.SUM)
        for i, p in enumerate(paths):
            s = _Stats(self.window)
            s.lo, s.hi, s.count = float(t[i, 0]), -float(t[i, 1]), int(n[i])
            if s.closed is not None:
                s.end_step()
            self._stats[p] = s
        return self

    def report(self, bound: Optional[float] = None) -> str:
        """A table a person can read: one row per operator, with the fitted interval when there is one.

        ``inside`` says whether the observed range lies inside the operator's polynomial interval (or inside
        ``[-bound, bound]`` for operators without one when ``bound`` is given)."""
        head = (f"{'module':<42} {'op':<10} {'role':<10} {'layer':>5} {'min':>10} {'max':>10} {'|max|':>9} "
                f"{'poly interval':>22} {'inside':>6}")
        lines = [head, "-" * len(head)]
        for path, r in self.ranges().items():
            op = self.operators[path]
            target = op.interval if op.approximation is not None else (
                (-bound, bound) if bound is not None and op.op not in POSITIVE_OPS else None)
            interval = f"[{target[0]:.4g}, {target[1]:.4g}]" if target else "-"
            inside = "-" if not (target and r.observed) else ("yes" if target[0] <= r.lo and r.hi <= target[1] else "NO")
            layer = "-" if r.layer_idx is None else str(r.layer_idx)
            name = "var+eps" if op.op == "inv_sqrt" else op.op
            lines.append(f"{path[-42:]:<42} {name:<10} {r.role:<10} {layer:>5} {r.lo:>10.4g} {r.hi:>10.4g} "
                         f"{r.abs_max:>9.4g} {interval:>22} {inside:>6}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RangeTracker({len(self.operators)} operators, window={self.window})"


# Operators defined on positive inputs only: their interval is not symmetric around 0.
POSITIVE_OPS = ("inv_sqrt", "reciprocal")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate wrappers (hooks must go on the real submodules)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def move_to_device(batch, device):
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch.to(device) if torch.is_tensor(batch) else batch


def forward_batches(model: nn.Module, data: Iterable, max_batches: Optional[int] = None) -> None:
    """Run ``model`` on each batch of ``data`` (at most ``max_batches``) on the model's device, labels left out
    (a dict batch as keyword arguments, anything else as the input; a model without parameters: CPU)."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        batch = move_to_device(batch, device)
        if isinstance(batch, dict):
            model(**{k: v for k, v in batch.items() if k != "labels"})
        else:
            model(batch)


@contextlib.contextmanager
def exact_operators(model: nn.Module) -> Iterator[dict]:
    """Run every :class:`PolyOperator` of ``model`` as its exact function inside the ``with`` block; each
    operator's mode and blend weight are restored on exit (also after an error). Yields ``{path: operator}``.

    Calibration uses it: ranges measured through a fitted polynomial that diverges upstream are not ranges."""
    ops = select_operators(_unwrap(model))
    saved = {p: (op.mode, op.blend_weight) for p, op in ops.items()}
    for op in ops.values():
        op.mode = "exact"
    try:
        yield ops
    finally:
        for p, (mode, weight) in saved.items():
            ops[p].mode, ops[p].blend_weight = mode, weight


def _first_norm_tables(model: nn.Module) -> list:
    """``[(norm, [embedding weight, ...])]``: the polynomial LayerNorm that reads the sum of embedding tables
    directly (PolyGPT: layer 0's pre-attention norm; PolyBert: the embedding LayerNorm), with those tables."""
    from ..models.poly_bert import PolyBertModel
    from ..models.poly_gpt import PolyGPTModel
    from ..nn.norms import PolyLayerNorm

    out = []
    for m in _unwrap(model).modules():
        if isinstance(m, PolyGPTModel) and len(m.h) and m.h[0].pre_norm:
            norm, tables = m.h[0].attention_norm, [m.wte.weight, m.wpe.weight]
        elif isinstance(m, PolyBertModel):
            e = m.embeddings
            norm = e.norm
            tables = [e.word_embeddings.weight, e.position_embeddings.weight, e.token_type_embeddings.weight]
        else:
            continue
        if isinstance(norm, PolyLayerNorm):
            out.append((norm, tables))
    return out


def _centred(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` in float64 minus their mean over the last dimension."""
    t = t.detach().double()
    return t - t.mean(-1, keepdim=True)


@torch.no_grad()
def embedding_table_ranges(model: nn.Module, chunk_size: int = 4096) -> dict[str, OperatorRange]:
    """``{path: OperatorRange}`` of ``var + eps`` at the first norm's ``inv_sqrt`` over **every** input the
    embedding tables can produce: each token x each position (x each token type for BERT).

    That norm reads ``wte[t] + wpe[p] (+ tte[s])`` directly, so this is the exact range any text can reach there
    -- calibration batches only see the tokens they contain, and training moves the rows of the others too.
    The variance of a sum is computed without building it: with centred rows ``a``, ``b`` (mean over the hidden
    size ``d``), ``var(a + b) = |a|^2/d + |b|^2/d + 2 a.b/d``, in float64, ``chunk_size`` token rows at a time
    against all (position, type) rows -- a 50k x 1024 GPT-2 table costs one matmul per chunk, no sampling.
    Models without such a norm (ViT, exact LayerNorm) give ``{}``."""
    inner = _unwrap(model)
    paths = {id(m): p for p, m in inner.named_modules()}
    out = {}
    for norm, tables in _first_norm_tables(inner):
        tokens, rest = tables[0].detach(), _centred(tables[1])
        for extra in tables[2:]:  # every (position, token type) pair
            rest = (rest[:, None, :] + _centred(extra)[None, :, :]).reshape(-1, rest.shape[-1])
        d = tokens.shape[-1]
        rest_sq = (rest * rest).sum(-1) / d
        lo, hi = math.inf, -math.inf
        for i in range(0, tokens.shape[0], chunk_size):  # the token table in float64 one chunk at a time
            a = _centred(tokens[i : i + chunk_size])
            var = (a * a).sum(-1, keepdim=True) / d + rest_sq[None, :] + 2.0 * (a @ rest.T) / d
            lo, hi = min(lo, float(var.min())), max(hi, float(var.max()))
        op = norm.inv_sqrt
        path = paths[id(op)]
        out[path] = OperatorRange(path, op.op, op.role, op.layer_idx, max(lo, 0.0) + norm.eps, hi + norm.eps,
                                  tokens.shape[0] * rest.shape[0])
    return out


@torch.no_grad()
def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    max_batches: Optional[int] = None,
    ops=None,
    roles=None,
    layers=None,
    all_reduce: bool = True,
    exact: bool = True,
    embedding_tables: bool = True,
) -> RangeTracker:
    """Run ``model`` in eval mode over (up to ``max_batches``) batches and return the tracker with the ranges.

    Batches are dicts of model keyword arguments (``labels`` are dropped). With ``exact`` (default) every operator
    runs its exact function during the measurement (:func:`exact_operators`; modes are restored afterwards), so a
    polynomial that diverges upstream cannot poison the ranges downstream. With ``embedding_tables`` (default) the
    range of the norm that reads the embeddings also covers the whole embedding table
    (:func:`embedding_table_ranges`). The training/eval mode of the model is restored afterwards; ranges are
    all-reduced across ranks when ``all_reduce``."""
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()
    tracker = RangeTracker(inner, ops=ops, roles=roles, layers=layers)
    try:
        with exact_operators(inner) if exact else contextlib.nullcontext():
            forward_batches(inner, dataloader, max_batches)
    finally:
        tracker.remove()
        inner.train(was_training)
    if embedding_tables:
        for path, r in embedding_table_ranges(inner).items():
            if path in tracker.operators:
                tracker.observe(path, r.lo, r.hi, r.count)
    return tracker.all_reduce() if all_reduce else tracker


# Measured with benchmarks/poly_quality.py (4-layer GPT, seeds 0-2): LayerNorm variances of held-out text reach
# up to 1.9x the largest variance calibrated on training batches. With 0.1 (or 0.5) for inv_sqrt, its polynomial
# then diverges, every layer after it too, and held-out perplexity is inf; with 1.0 ([lo/2, 2 hi]: one more level,
# same relative error) the polynomial model matches the exact one. Activations need less: 0.5.
DEFAULT_MARGIN = {"inv_sqrt": 1.0, "default": 0.5}


def check_margin(margin: Union[float, dict]) -> None:
    """Raise ``ValueError`` for a negative margin or a key that is no operator name, role or ``"default"``."""
    if isinstance(margin, dict):
        check_names(list(margin), ["default", *operator_names(), *OPERATOR_ROLES], "margin key(s)")
    if min(margin.values() if isinstance(margin, dict) else [margin]) < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def margin_for(margin: Union[float, dict], op: PolyOperator) -> float:
    """The margin of ``op``: ``margin`` itself, or its entry for the op name, the role, or ``"default"``."""
    if not isinstance(margin, dict):
        return float(margin)
    for key in (op.op, op.role, "default"):
        if key in margin:
            return float(margin[key])
    return DEFAULT_MARGIN["default"]


def widen_interval(op: str, lo: float, hi: float, margin: float, symmetric: bool = True) -> tuple[float, float]:
    """The fitting interval for a measured input range ``[lo, hi]``.

    Activations: ``[-A, A]`` with ``A = max(|lo|, |hi|)·(1 + margin)`` (or the range widened by ``margin``
    around its centre when not ``symmetric``). Positive-domain operators (``inv_sqrt``, ``reciprocal``):
    ``[lo / (1 + margin), hi · (1 + margin)]``, which stays positive."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"cannot fit {op} on an unmeasured range [{lo}, {hi}]")
    f = 1.0 + margin
    if op in POSITIVE_OPS:
        if lo <= 0:
            raise ValueError(f"{op} needs positive inputs, measured range is [{lo:.4g}, {hi:.4g}]")
        lo, hi = lo / f, hi * f
        return (lo, hi) if hi > lo else (lo, lo * 2.0)
    if symmetric:
        a = max(abs(lo), abs(hi), 1e-3) * f
        return (-a, a)
    c, h = (lo + hi) / 2, max((hi - lo) / 2, 1e-3) * f
    return (c - h, c + h)


def calibrated_intervals(
    model: nn.Module,
    dataloader: Iterable,
    max_batches: Optional[int] = None,
    margin: Union[float, dict, None] = None,
    symmetric: bool = True,
    ops=None,
    roles=None,
    layers=None,
) -> dict[str, tuple[float, float]]:
    """``{path: (lo, hi)}``: the fitting interval of each selected operator, from its input range over
    ``dataloader`` (batches of model keyword arguments) measured with **every** operator exact -- the functions
    the polynomials approximate -- (plus the embedding table's range for the first norm, see :func:`calibrate`),
    widened by ``margin`` (default :data:`DEFAULT_MARGIN`, see :func:`widen_interval`). Operators the batches
    never reach are left out. Modes are restored afterwards."""
    margin = DEFAULT_MARGIN if margin is None else margin
    check_margin(margin)
    selected = select_operators(_unwrap(model), ops, roles, layers)
    measured = calibrate(model, dataloader, max_batches, ops=ops, roles=roles, layers=layers).ranges()
    return {p: widen_interval(selected[p].op, r.lo, r.hi, margin_for(margin, selected[p]), symmetric)
            for p, r in measured.items() if r.observed}


def refit_drifted_operators(
    model: nn.Module, dataloader: Iterable, degree: Optional[int] = None, margin: Union[float, dict, None] = None,
    max_batches: Optional[int] = 16, keep_margin: bool = False,
) -> list[str]:
    """Re-measure every fitted operator's input range and refit those whose inputs now leave the interval their
    polynomial was fitted on (``keep_margin=True``: also those whose range *widened by the margin* leaves it, so
    every operator keeps its margin above the data measured now -- a final calibration pass): training moved the weights since the fit, and a polynomial outside its interval
    diverges (NaN logits). Call it after training, before ``save_pretrained`` / export (the replacement callback
    does it itself at the end of training, see ``PolyReplacementCallback(refit_on_train_end=)``).

    The ranges are measured in eval mode with every operator **exact** (a diverging polynomial upstream would
    report its blow-up as the range of everything after it) and, for the norm reading the embeddings, over the
    whole embedding table (:func:`calibrate`). The new interval covers the old one and the new range, widened by
    ``margin`` (default :data:`DEFAULT_MARGIN`); ``degree`` defaults to each operator's own. Modes are kept.
    Returns the refitted paths."""
    margin = DEFAULT_MARGIN if margin is None else margin
    check_margin(margin)
    ranges = calibrate(model, dataloader, max_batches).ranges()
    return refit_on_ranges(model, ranges, margin, lambda path, op: (degree, {}), keep_margin=keep_margin)


def refit_on_ranges(
    model: nn.Module, ranges: dict, margin: Union[float, dict],
    fit_args: Callable[[str, PolyOperator], tuple] = lambda path, op: (None, {}), keep_margin: bool = False,
) -> list[str]:
    """Refit every fitted operator whose measured range (``{path: OperatorRange}``) leaves its polynomial's
    interval, on the union of both widened by ``margin``; ``fit_args(path, op)`` gives ``(degree, fit kwargs)``.

    ``keep_margin=True`` refits an operator as soon as its measured range *widened by the margin* leaves the
    interval, on the union of the interval and that widened range (the interval is not widened again): inputs
    near an interval's edge on the measured data are the ones that leave it on other data -- held-out text
    reaches further than the batches measured (the upper tail of a norm's variance is heavy), and a polynomial
    just outside its interval diverges. Returns the refitted paths (each logged with its old and new interval)."""
    ops = select_operators(_unwrap(model))
    refit = []
    for path, r in ranges.items():
        op = ops.get(path)
        if op is None or op.approximation is None or not r.observed:
            continue
        lo, hi = op.approximation.interval
        m = margin_for(margin, op)
        if keep_margin:
            new = widen_interval(op.op, r.lo, r.hi, m, symmetric=-lo == hi)
            new = (min(new[0], lo), max(new[1], hi))
        else:
            new = widen_interval(op.op, min(r.lo, lo), max(r.hi, hi), m) if r.lo < lo or r.hi > hi else (lo, hi)
        if new == (lo, hi):
            continue
        degree, kw = fit_args(path, op)
        op.fit(new, degree=degree, **kw)
        logger.info("%s: inputs [%.4g, %.4g] (interval [%.4g, %.4g]); refitted on [%.4g, %.4g]", path,
                    r.lo, r.hi, lo, hi, *op.approximation.interval)
        refit.append(path)
    return refit
