"""Progressive replacement: turn a model into a polynomial one operator group at a time, during training.

The seed paper swaps every operator for its polynomial at once and loses ~80% of its quality gap at that
step. Here a schedule of :class:`ReplacementStage` s replaces operators by role and/or layer on a step (or
epoch) schedule. At the start of each stage the callback

1. measures the input range of the stage's operators -- on a ``calibration_dataloader`` with every operator
   exact, or on the training batches of the last ``window`` steps seen through forward hooks -- and takes
   min / max over all ranks; the norm reading the embeddings also covers the whole embedding table;
2. fits each polynomial on its own range widened by ``margin`` (same data on every rank, so every rank fits
   the same coefficients);
3. ramps ``blend_weight`` from 0 to 1 over ``ramp_steps`` (``(1 - w)·exact + w·poly``), then sets
   ``mode="poly"``, so training adapts to the polynomial while it comes in.

An operator that saw no input when its stage starts (a head the data never reaches) is left exact, with a
warning: fitting it on a guessed interval would make a model that reports "fully polynomial" and diverges on the
first real input. :func:`~hf_polyhe.polynomial_status` then lists it as not polynomial.

At the end of training (``refit_on_train_end``) the callback measures every operator's range once more, with the
trained weights, every operator exact, on the calibration data (or a few training batches), and refits the
polynomials whose inputs left their interval: training moves the weights after each fit, and a polynomial
outside its interval diverges -- NaN perplexity on held-out text.

Operators are :class:`~hf_polyhe.nn.PolyOperator` modules that exist from model construction and have no
parameters: nothing is created mid-training, so optimizers, LR schedulers and DDP are unaffected.

Works with the stock ``Trainer`` (``callbacks=[PolyReplacementCallback(...)]``) and in a hand-written loop
(call :meth:`PolyReplacementCallback.step` after each optimizer step). Without a schedule the callback spreads
:func:`default_schedule` over the run. Trainer checkpoints keep its progress (it is an ``ExportableState``): the
stages started and finished, the operators' modes and polynomials, the window of measured ranges; training
resumed with ``trainer.train(resume_from_checkpoint=...)`` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence, Union

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..nn.operators import PolyOperator, check_names, operator_names
from ..status import check_selection, polynomial_status, select_operators
from .ranges import (
    DEFAULT_MARGIN,
    OperatorRange,
    RangeTracker,
    _unwrap,
    calibrate,
    check_margin,
    embedding_table_ranges,
    margin_for,
    refit_on_ranges,
    widen_interval,
)

logger = logging.getLogger(__name__)

# Default order of schedule_by_operator: cheap, well-behaved activations first, norms (whose 1/sqrt is the
# hardest to approximate) last.
DEFAULT_ROLE_ORDER = ("mlp_act", "attn_act", "attn_norm", "pooler_act", "head_act", "act", "norm")


@dataclass
class ReplacementStage:
    """One group of operators replaced together.

    ``start`` is a global step (or an epoch with ``unit="epoch"`` in the callback); ``ops`` / ``roles`` /
    ``layers`` select operators as :func:`hf_polyhe.status.select_operators` does (``None`` = any; layer
    ``None`` = operators outside the layers, e.g. the final norm). ``ramp_steps``, ``degree`` and ``margin``
    override the callback's defaults for this stage."""

    start: int
    ops: Optional[list] = None
    roles: Optional[list] = None
    layers: Optional[list] = None
    ramp_steps: Optional[int] = None
    degree: Optional[int] = None
    margin: Optional[float] = None
    name: Optional[str] = None

    def __post_init__(self):
        check_selection(self.ops, self.roles)  # a misspelt role would select nothing and be skipped silently
        bad = [v for v in self.layers or () if v is not None and not isinstance(v, int)]
        if bad:
            raise ValueError(f"stage layers must be layer indices (int) or None, got {bad}")

    @classmethod
    def from_dict(cls, d: dict) -> "ReplacementStage":
        d = dict(d)
        keys = [k for k in ("start", "step", "epoch") if k in d]
        if len(keys) != 1:
            raise ValueError(f"a stage needs exactly one of 'step', 'epoch' or 'start', got {sorted(d)}")
        start = d.pop(keys[0])
        allowed = {"ops", "roles", "layers", "ramp_steps", "degree", "margin", "name"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown stage keys {sorted(unknown)}; accepted: step/epoch, {', '.join(sorted(allowed))}")
        return cls(start=int(start), **d)

    def to_dict(self) -> dict:
        """The inverse of :meth:`from_dict` (fields left at ``None`` are omitted)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        if self.name:
            return self.name
        parts = [f"{k}={v}" for k, v in (("ops", self.ops), ("roles", self.roles), ("layers", self.layers)) if v is not None]
        return ", ".join(parts) or "all operators"


def schedule_by_layer(
    num_layers: int, start: int, every: int, ramp_steps: Optional[int] = None, roles: Optional[Sequence[str]] = None
) -> list:
    """One stage per transformer layer, layer 0 first, ``every`` steps apart; operators outside the layers
    (final norm, pooler) go with the last layer."""
    return [
        ReplacementStage(start + i * every, roles=list(roles) if roles else None,
                         layers=[i] if i < num_layers - 1 else [i, None], ramp_steps=ramp_steps, name=f"layer {i}")
        for i in range(num_layers)
    ]


def schedule_by_operator(
    start: int, every: int, roles: Sequence[Union[str, Sequence[str]]] = DEFAULT_ROLE_ORDER,
    ramp_steps: Optional[int] = None, layers: Optional[Sequence[Optional[int]]] = None,
) -> list:
    """One stage per role (or group of roles), in the given order, ``every`` steps apart. Roles the model
    does not have simply select nothing (the stage is skipped)."""
    stages = []
    for i, r in enumerate(roles):
        group = [r] if isinstance(r, str) else list(r)
        stages.append(ReplacementStage(start + i * every, roles=group, layers=list(layers) if layers else None,
                                       ramp_steps=ramp_steps, name="+".join(group)))
    return stages


# Where default_schedule puts its stages, as fractions of the run: after 10 % of the steps (training batches have
# filled the range window, the optimizer has settled) and done by 70 %, leaving 30 % for the fully polynomial
# model to recover -- in the seed paper most of the quality gap appears when the last operators are replaced.
DEFAULT_SCHEDULE_SPAN = (0.1, 0.7)


def default_schedule(model: nn.Module, max_steps: int, ramp_steps: Optional[int] = None) -> list:
    """The schedule of ``PolyReplacementCallback()`` given none: one stage per operator role the model has, in
    :data:`DEFAULT_ROLE_ORDER` (activations first, norms last), spread evenly over the steps
    ``DEFAULT_SCHEDULE_SPAN`` of ``max_steps`` (10 % to 70 %). Each stage ramps its polynomials in over its whole
    slot (``ramp_steps`` overrides), so it is fully polynomial when the next one starts, and the last 30 % of the
    run trains the fully polynomial model."""
    if max_steps < 1:
        raise ValueError(f"default_schedule needs the number of training steps, got max_steps={max_steps}")
    present = list(dict.fromkeys(op.role for op in select_operators(_unwrap(model)).values()))
    roles = [r for r in DEFAULT_ROLE_ORDER if r in present] + [r for r in present if r not in DEFAULT_ROLE_ORDER]
    if not roles:
        raise ValueError("the model has no PolyOperator to replace")
    first, last = DEFAULT_SCHEDULE_SPAN
    slot = (last - first) * max_steps / len(roles)
    ramp = ramp_steps if ramp_steps is not None else max(1, math.floor(slot))
    return [ReplacementStage(max(1, round(first * max_steps + i * slot)), roles=[role], ramp_steps=ramp, name=role)
            for i, role in enumerate(roles)]


def _clip_to_interval(module: PolyOperator, args):
    if module.training and module.mode != "exact" and module.approximation is not None:
        lo, hi = module.approximation.interval
        return (args[0].clamp(lo, hi),) + tuple(args[1:])
    return None


@dataclass
class _StageState:
    stage: ReplacementStage
    operators: dict  # {path: PolyOperator}, fixed at attach time
    started_at: Optional[int] = None
    done: bool = False
    weight: float = 0.0


class PolyReplacementCallback(TrainerCallback, ExportableState):
    """Replace a model's operators by polynomials progressively during training.

    Args:
        schedule: list of :class:`ReplacementStage` or dicts such as
            ``{"step": 100, "roles": ["mlp_act"], "layers": [0, 1]}`` (see also :func:`schedule_by_layer` and
            :func:`schedule_by_operator`). An operator belongs to the first stage that selects it. ``None``:
            :func:`default_schedule` over the run's ``max_steps`` -- one operator role at a time between 10 % and
            70 % of training, each ramped in over its slot, then 30 % of the steps to recover (with the
            ``Trainer``, whose ``state.max_steps`` is known; in a hand-written loop call
            ``attach(model, max_steps=N)`` first).
        calibration_dataloader: batches (dicts of model inputs) on which ranges are measured at each stage
            start, in eval mode. Without it the ranges of the training batches of the last ``window`` steps
            are used (recorded by forward hooks).
        calibration_batches: how many batches of ``calibration_dataloader`` to use.
        window: steps of training batches remembered when no calibration dataloader is given.
        margin: relative widening of each measured range before fitting (see :func:`widen_interval`), or
            ``{op name or role: margin, "default": margin}`` (e.g. a wider one for ``inv_sqrt``, whose Newton
            steps diverge quickly above the interval). Default :data:`DEFAULT_MARGIN`.
        ramp_steps: steps over which ``blend_weight`` goes from 0 to 1 (0: switch at once; default 0, or the
            stage's slot for the default schedule).
        degree: polynomial degree, an int or ``{op name: degree}`` (default: each operator's own degree).
        fit_kwargs: extra keyword arguments for ``PolyOperator.fit``, or ``{op name: kwargs}``.
        unit: ``"step"`` or ``"epoch"``: what ``ReplacementStage.start`` counts.
        symmetric: fit activations on a symmetric interval ``[-A, A]``.
        finish_on_train_end: at the end of training, replace whatever the schedule has not reached (with a
            warning) so the saved model is fully polynomial.
        refit_on_train_end: after training (after ``finish_on_train_end``), a final calibration pass: re-measure
            every fitted operator's range with the final weights (every operator exact, on up to ``refit_batches``
            batches of ``calibration_dataloader`` or else of the Trainer's training dataloader) and refit those
            whose range widened by their margin leaves their interval (see
            :func:`~hf_polyhe.training.refit_drifted_operators` with ``keep_margin=True``; ``history`` records them
            with ``"stage": "refit"``). In a hand-written loop call :meth:`refit` or ``refit_drifted_operators``.
        refit_batches: batches measured by the final calibration pass (``None``: the whole dataloader). More than
            a stage's window on purpose: a norm's variance has a heavy upper tail (measured on the tiny GPT recipe:
            the largest of 5,340 training blocks is 2.4x the 99th percentile), and 8 batches miss the rare blocks
            that held-out text then pushes out of the interval (NaN logits). It is forward passes only.
        clip_in_training: in training mode, clip the input of a blended / polynomial operator to the interval
            its polynomial was fitted on, so one outlier cannot turn the loss into NaN (a polynomial grows
            fast outside its interval). The range loss still sees -- and penalises -- the unclipped input;
            evaluation is never clipped, exactly as under HE.

    Unknown operator names or roles (in the schedule, ``margin``, ``degree``, ``fit_kwargs``) raise ``ValueError``.

    Resuming: a ``Trainer`` checkpoint stores :meth:`state` (in ``trainer_state.json``); when training resumes
    from it, :meth:`on_train_begin` restores the stages' progress, the fit history, every operator's mode, blend
    weight and polynomial, and the window of measured ranges, so stages already applied are not applied again
    and a ramp goes on where it stopped. (With ``restore_callback_states_from_checkpoint=True`` the ``Trainer``
    rebuilds the callback from its saved arguments instead, which cannot include a ``calibration_dataloader``.)
    """

    def __init__(
        self,
        schedule: Optional[Iterable[Union[ReplacementStage, dict]]] = None,
        calibration_dataloader: Optional[Iterable] = None,
        calibration_batches: int = 8,
        window: int = 16,
        margin: Union[float, dict, None] = None,
        ramp_steps: Optional[int] = None,
        degree: Union[int, dict, None] = None,
        fit_kwargs: Optional[dict] = None,
        unit: str = "step",
        symmetric: bool = True,
        finish_on_train_end: bool = True,
        clip_in_training: bool = True,
        refit_on_train_end: bool = True,
        refit_batches: Optional[int] = 64,
    ):
        self.schedule = None if schedule is None else [
            s if isinstance(s, ReplacementStage) else ReplacementStage.from_dict(s) for s in schedule]
        if self.schedule is not None and not self.schedule:
            raise ValueError("schedule is empty: give at least one ReplacementStage (or None for the default schedule)")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        if self.schedule is None and unit != "step":
            raise ValueError("the default schedule counts steps: give a schedule to use unit='epoch'")
        margin = dict(DEFAULT_MARGIN) if margin is None else margin
        check_margin(margin)
        if ramp_steps is not None and ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        if isinstance(degree, dict):
            check_names(list(degree), operator_names(), "operator name(s) in degree")
        if fit_kwargs and all(isinstance(v, dict) for v in fit_kwargs.values()):
            check_names(list(fit_kwargs), operator_names(), "operator name(s) in fit_kwargs")
        self.calibration_dataloader = calibration_dataloader
        self.calibration_batches = calibration_batches
        self.window = window
        self.margin = margin
        self.ramp_steps = ramp_steps
        self.degree = degree
        self.fit_kwargs = fit_kwargs or {}
        self.unit = unit
        self.symmetric = symmetric
        self.finish_on_train_end = finish_on_train_end
        self.clip_in_training = clip_in_training
        self.refit_on_train_end = refit_on_train_end
        if refit_batches is not None and refit_batches < 1:
            raise ValueError(f"refit_batches must be >= 1 or None (the whole dataloader), got {refit_batches}")
        self.refit_batches = refit_batches
        self.history: list[dict] = []  # one entry per fitted operator
        self._stages: list[_StageState] = []
        self._model: Optional[nn.Module] = None
        self._tracker: Optional[RangeTracker] = None
        self._clip_handles: list = []
        self._progress_to_restore: Optional[dict] = None  # set by the Trainer when it rebuilds the callback

    # -- setup -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, max_steps: Optional[int] = None) -> None:
        """Resolve the schedule against ``model`` and install the range hooks (done on the first use).

        ``max_steps``: length of the run, needed (once) when the callback has no schedule of its own."""
        model = _unwrap(model)
        if self._model is model:
            return
        if self.schedule is None and not max_steps:
            raise ValueError("PolyReplacementCallback() without a schedule spreads one over the run and needs its "
                             "length: use it with a Trainer, or call attach(model, max_steps=N) before step()")
        self.detach()
        self._model = model
        schedule = self.schedule if self.schedule is not None else default_schedule(model, max_steps, self.ramp_steps)
        claimed: set = set()
        self._stages = []
        for stage in sorted(schedule, key=lambda s: s.start):
            ops = {p: op for p, op in select_operators(model, stage.ops, stage.roles, stage.layers).items()
                   if p not in claimed}
            claimed |= set(ops)
            self._stages.append(_StageState(stage, ops))
        all_ops = select_operators(model)
        for p, op in all_ops.items():
            if any(True for _ in op.parameters()):  # the promise to optimizers / DDP
                raise RuntimeError(f"{p} has parameters; replacement would change the parameter set")
        left = [p for p in all_ops if p not in claimed]
        if left:
            logger.warning("replacement schedule leaves %d operator(s) exact: %s", len(left), ", ".join(left[:8]))
        blockers = [o for o in polynomial_status(model).operators if not o.convertible]
        if blockers:
            logger.warning("%d operator(s) have no polynomial form (%s): the model cannot become fully polynomial",
                           len(blockers), ", ".join(f"{o.path} ({o.op})" for o in blockers[:4]))
        if self.calibration_dataloader is None:
            self._tracker = RangeTracker(model, window=self.window, training_only=True)
        if self.clip_in_training:
            # registered last (range hooks are prepended), so trackers and the range loss see unclipped inputs
            self._clip_handles = [op.register_forward_pre_hook(_clip_to_interval) for op in all_ops.values()]

    def detach(self) -> None:
        """Remove every hook (the fitted operators keep their polynomials and modes)."""
        if self._tracker is not None:
            self._tracker.remove()
        for h in self._clip_handles:
            h.remove()
        self._clip_handles = []
        self._tracker, self._model = None, None

    # -- progress --------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return bool(self._stages) and all(s.done for s in self._stages)

    def step(self, model: nn.Module, global_step: int, epoch: Optional[float] = None) -> None:
        """Advance the schedule after optimizer step ``global_step`` (hand-written loops call this; the
        ``Trainer`` calls it through ``on_step_end``)."""
        self.attach(model)
        if self._tracker is not None:
            self._tracker.end_step()
        for s in self._stages:
            if s.started_at is not None and not s.done:
                self._ramp(s, global_step)
        position = global_step if self.unit == "step" else (math.floor(epoch + 1e-9) if epoch is not None else None)
        if position is not None:
            self._start_due(position, global_step)

    def _start_due(self, position: int, global_step: int) -> None:
        due = [s for s in self._stages if s.started_at is None and s.stage.start <= position]
        if due:
            self._start(due, global_step)

    def _ramp(self, s: _StageState, global_step: int) -> None:
        ramp = s.stage.ramp_steps if s.stage.ramp_steps is not None else (self.ramp_steps or 0)
        k = global_step - s.started_at + 1
        fitted = [op for op in s.operators.values() if op.approximation is not None]  # unobserved ones stay exact
        if ramp <= 1 or k >= ramp:
            for op in fitted:
                op.set_mode("poly", 1.0)
            s.weight, s.done = 1.0, True
        else:
            s.weight = k / ramp
            for op in fitted:
                op.set_mode("blend", s.weight)

    def _measure(self, paths: set) -> dict:
        """All-reduced ``{path: OperatorRange}`` for ``paths`` (a collective: every rank calls it together)."""
        if self.calibration_dataloader is not None:  # every operator exact, embedding table included
            tracker = calibrate(self._model, self.calibration_dataloader, self.calibration_batches)
            return {p: r for p, r in tracker.ranges().items() if p in paths}
        ranges = {p: r for p, r in self._tracker.all_reduce().ranges().items() if p in paths}
        for p, t in embedding_table_ranges(self._model).items():  # same on every rank: no collective needed
            if p in ranges and ranges[p].observed:  # the stage waits for training batches to reach it
                r = ranges[p]
                ranges[p] = OperatorRange(p, r.op, r.role, r.layer_idx, min(r.lo, t.lo), max(r.hi, t.hi), r.count)
        return ranges

    def _margin(self, op: PolyOperator) -> float:
        return margin_for(self.margin, op)

    def _fit_args(self, op: PolyOperator, stage: ReplacementStage) -> tuple[Optional[int], dict]:
        degree = stage.degree if stage.degree is not None else self.degree
        if isinstance(degree, dict):
            degree = degree.get(op.op)
        kw = self.fit_kwargs
        if kw and all(isinstance(v, dict) for v in kw.values()):  # {op name: kwargs}
            kw = kw.get(op.op, {})
        return degree, kw

    def _start(self, states: list, global_step: int, final: bool = False) -> None:
        """Measure, fit and start ramping the operators of ``states`` (stages that are due together)."""
        todo = {p for s in states for p, op in s.operators.items() if not (op.mode == "poly" and op.approximation)}
        ranges = self._measure(todo) if todo else {}
        unobserved = [p for p in todo if not (p in ranges and ranges[p].observed)]
        if unobserved and self.calibration_dataloader is None and not final:
            # no training batch has reached these operators yet (ranges are all-reduced, so every rank
            # agrees): try again after the next step rather than fit on a guessed interval
            logger.info("step %d: no input observed yet for %s; stage start deferred", global_step, unobserved[0])
            return
        for s in states:
            for path, op in s.operators.items():
                if path not in todo:  # already polynomial (e.g. resumed from a checkpoint)
                    continue
                margin = s.stage.margin if s.stage.margin is not None else self._margin(op)
                r = ranges.get(path)
                if r is None or not r.observed:
                    # a polynomial fitted on a guessed interval diverges on the first real input while the model
                    # reports "fully polynomial": leave it exact, polynomial_status shows it
                    warnings.warn(f"PolyReplacementCallback: {path} ({op.op}) saw no input by step {global_step}; it "
                                  "stays exact (the model is not fully polynomial). Give a calibration_dataloader "
                                  "that reaches it, or fit it yourself: to_polynomial(model, calibration_data=...)",
                                  UserWarning, stacklevel=2)
                    self.history.append({"step": global_step, "stage": s.stage.describe(), "path": path, "op": op.op,
                                         "measured": None, "interval": None, "degree": None, "depth": None,
                                         "max_error": None})
                    continue
                interval = widen_interval(op.op, r.lo, r.hi, margin, self.symmetric)
                degree, kw = self._fit_args(op, s.stage)
                approx = op.fit(interval=interval, degree=degree, **kw)
                self.history.append({
                    "step": global_step, "stage": s.stage.describe(), "path": path, "op": op.op,
                    "measured": (r.lo, r.hi) if r is not None and r.observed else None,
                    "interval": tuple(approx.interval), "degree": approx.degree, "depth": approx.depth,
                    "max_error": float(approx.max_error),
                })
            s.started_at = global_step
            self._ramp(s, global_step)
            logger.info("step %d: replacement stage '%s' started (%d operators, ramp %s)\n%s", global_step,
                        s.stage.describe(), len(s.operators), s.stage.ramp_steps if s.stage.ramp_steps is not None
                        else self.ramp_steps or 0, self.fit_report(global_step))

    def finish(self, model: Optional[nn.Module] = None, global_step: int = -1) -> None:
        """Replace everything the schedule has not reached yet and end every ramp (fully polynomial)."""
        if model is not None:
            self.attach(model)
        pending = [s for s in self._stages if s.started_at is None]
        if pending:
            logger.warning("training ended before %d replacement stage(s) started (%s): replacing them untrained",
                           len(pending), ", ".join(s.stage.describe() for s in pending))
            self._start(pending, global_step, final=True)
        for s in self._stages:
            if not s.done:
                for op in s.operators.values():
                    if op.approximation is not None:
                        op.set_mode("poly", 1.0)
                s.weight, s.done = 1.0, True

    def refit(self, model: Optional[nn.Module] = None, dataloader: Optional[Iterable] = None,
              global_step: int = -1) -> list:
        """The final calibration pass: re-measure every fitted operator's input range (every operator exact, eval
        mode, embedding table included) on up to ``refit_batches`` batches of ``calibration_dataloader`` -- or
        ``dataloader`` -- and refit those whose range widened by their margin leaves their polynomial's interval
        (same degree and fit arguments as their stage; see :func:`~hf_polyhe.training.refit_on_ranges` with
        ``keep_margin=True``). Returns the refitted paths. A collective under ``torch.distributed``: every rank
        calls it."""
        if model is not None:
            self.attach(model)
        data = self.calibration_dataloader if self.calibration_dataloader is not None else dataloader
        if data is None:
            logger.warning("PolyReplacementCallback.refit: no calibration data; nothing re-measured")
            return []
        stage_of = {p: s.stage for s in self._stages for p in s.operators}
        ranges = calibrate(self._model, data, self.refit_batches).ranges()
        before = {p: op.approximation for p, op in select_operators(self._model).items()}
        refit = refit_on_ranges(self._model, ranges, self.margin,
                                lambda p, op: self._fit_args(op, stage_of.get(p, ReplacementStage(0))), keep_margin=True)
        for path in refit:
            op, r = select_operators(self._model)[path], ranges[path]
            a = op.approximation
            self.history.append({
                "step": global_step, "stage": "refit", "path": path, "op": op.op, "measured": (r.lo, r.hi),
                "interval": tuple(a.interval), "degree": a.degree, "depth": a.depth, "max_error": float(a.max_error),
            })
            logger.info("%s: final calibration measured [%.4g, %.4g] (interval [%.4g, %.4g]); refitted on [%.4g, %.4g]",
                        path, r.lo, r.hi, *before[path].interval, *a.interval)
        return refit

    # -- reporting -------------------------------------------------------------------------------
    def fit_report(self, step: Optional[int] = None) -> str:
        """Fitted operators (those of ``step`` only, if given): measured range, interval, degree, error."""
        rows = [h for h in self.history if step is None or h["step"] == step]
        head = f"{'module':<42} {'measured':>22} {'fitted on':>22} {'deg':>4} {'depth':>5} {'max err':>9}"
        lines = [head, "-" * len(head)]
        for h in rows:
            m = f"[{h['measured'][0]:.4g}, {h['measured'][1]:.4g}]" if h["measured"] else "-"
            if h["interval"] is None:
                lines.append(f"{h['path'][-42:]:<42} {m:>22} {'(no input: exact)':>22}")
                continue
            i = f"[{h['interval'][0]:.4g}, {h['interval'][1]:.4g}]"
            lines.append(f"{h['path'][-42:]:<42} {m:>22} {i:>22} {h['degree']:>4} {h['depth']:>5} {h['max_error']:>9.2e}")
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        """Replacement progress for the logs: stages started, fraction of operators polynomial, ramp weight."""
        if self._model is None:
            return {}
        ops = select_operators(self._model)
        ramping = [s.weight for s in self._stages if s.started_at is not None and not s.done]
        out = {
            "poly/stage": float(sum(s.started_at is not None for s in self._stages)),
            "poly/fraction_polynomial": sum(op.mode == "poly" for op in ops.values()) / max(len(ops), 1),
        }
        if ramping:
            out["poly/blend_weight"] = min(ramping)
        return out

    def progress(self) -> str:
        """Short text for a progress bar: ``poly 6/12 ops, stage 2/4``."""
        if self._model is None:
            return ""
        ops = select_operators(self._model)
        n_poly = sum(op.mode == "poly" for op in ops.values())
        started = sum(s.started_at is not None for s in self._stages)
        ramp = [s.weight for s in self._stages if s.started_at is not None and not s.done]
        text = f"poly {n_poly}/{len(ops)} ops, stage {started}/{len(self._stages)}"
        return text + (f" (blend {min(ramp):.2f})" if ramp else "")

    # -- checkpoints -----------------------------------------------------------------------------
    def _constructor_args(self) -> dict:
        """The constructor arguments that are plain (JSON) data; the calibration dataloader is not."""
        args = {
            "schedule": None if self.schedule is None else [s.to_dict() for s in self.schedule],
            "calibration_batches": self.calibration_batches, "window": self.window, "margin": self.margin,
            "ramp_steps": self.ramp_steps, "degree": self.degree, "fit_kwargs": self.fit_kwargs, "unit": self.unit,
            "symmetric": self.symmetric, "finish_on_train_end": self.finish_on_train_end,
            "clip_in_training": self.clip_in_training, "refit_on_train_end": self.refit_on_train_end,
            "refit_batches": self.refit_batches,
        }
        plain = {}
        for k, v in args.items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                logger.warning("PolyReplacementCallback: %s is not JSON data and is left out of checkpoints", k)
            else:
                plain[k] = v
        return plain

    def progress_state(self) -> Optional[dict]:
        """Where the replacement stands (JSON data), or ``None`` before the callback is attached to a model:
        each stage's start step / done / weight, the fit history, the mode and polynomial of every operator, the
        window of measured ranges. :meth:`load_progress_state` puts it back."""
        if self._model is None:
            return None
        return {
            "stages": [{"stage": s.stage.describe(), "start": s.stage.start, "started_at": s.started_at,
                        "done": s.done, "weight": s.weight} for s in self._stages],
            "history": self.history,
            "operators": {p: op.spec() for p, op in select_operators(self._model).items()},
            "ranges": self._tracker.state_dict() if self._tracker is not None else None,
            "calibration_dataloader": self.calibration_dataloader is not None,
        }

    def load_progress_state(self, progress: dict) -> None:
        """Restore :meth:`progress_state` (the callback must be attached to the same model architecture)."""
        saved = [(s["stage"], s["start"]) for s in progress["stages"]]
        ours = [(s.stage.describe(), s.stage.start) for s in self._stages]
        if saved != ours:
            raise ValueError(f"the checkpoint's replacement schedule {saved} differs from this callback's {ours}: "
                             "resume with the schedule the checkpoint was trained with")
        ops = select_operators(self._model)
        missing = sorted(set(progress["operators"]) - set(ops))
        if missing:
            raise ValueError(f"the checkpoint has operators this model lacks: {', '.join(missing[:4])}")
        for s, saved_stage in zip(self._stages, progress["stages"]):
            s.started_at, s.done, s.weight = saved_stage["started_at"], saved_stage["done"], saved_stage["weight"]
        for path, spec in progress["operators"].items():
            ops[path].load_spec(spec)
        self.history = [{**h, "interval": tuple(h["interval"]) if h["interval"] is not None else None,
                         "measured": tuple(h["measured"]) if h["measured"] is not None else None}
                        for h in progress["history"]]
        if self._tracker is not None and progress.get("ranges") is not None:
            self._tracker.load_state_dict(progress["ranges"])
        if progress.get("calibration_dataloader") and self.calibration_dataloader is None:
            logger.warning("the checkpoint was trained with a calibration_dataloader and this callback has none: "
                           "the stages still to come are calibrated on training batches")

    def state(self) -> dict:
        """What a ``Trainer`` checkpoint stores for this callback (``TrainerState.stateful_callbacks``): the
        constructor arguments that are plain data and :meth:`progress_state`."""
        return {"args": self._constructor_args(), "attributes": {"_progress_to_restore": self.progress_state()}}

    def _saved_progress(self, state) -> Optional[dict]:
        """The progress this callback saved in the checkpoint that ``state`` was loaded from, if any."""
        if self._progress_to_restore is not None:  # the Trainer rebuilt this callback from the checkpoint
            return self._progress_to_restore
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        candidates = saved if isinstance(saved, list) else [saved] if saved else []
        if len(candidates) > 1:  # several replacement callbacks: the one saved with our arguments
            candidates = [c for c in candidates if c.get("args") == self._constructor_args()][-1:]
        return candidates[0].get("attributes", {}).get("_progress_to_restore") if candidates else None

    # -- TrainerCallback -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model, state.max_steps)
        if state.global_step > 0:  # resumed from a checkpoint (the model's weights are loaded already)
            progress = self._saved_progress(state)
            if progress is not None:
                self.load_progress_state(progress)
                logger.info("resumed replacement at step %d: %s", state.global_step, self.progress())
            else:
                logger.warning("resuming at step %d from a checkpoint without replacement progress: every operator "
                               "starts exact and the stages due by now are applied at once", state.global_step)
            self._progress_to_restore = None
        if self.calibration_dataloader is not None:
            position = state.global_step if self.unit == "step" else math.floor((state.epoch or 0) + 1e-9)
            self._start_due(position, state.global_step)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.unit == "epoch" and self.calibration_dataloader is not None:
            self.attach(model, state.max_steps)
            self._start_due(round(state.epoch or 0), state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step(model, state.global_step, state.epoch)

    def on_log(self, args, state, control, logs=None, **kwargs):
        m = self.metrics()
        if logs is not None and "loss" in logs:  # training logs only
            logs.update({k: v for k, v in m.items() if k not in logs})
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update({k: v for k, v in m.items() if k not in state.log_history[-1]})

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.finish_on_train_end:
            self.finish(model, state.global_step)
        if self.refit_on_train_end:
            self.refit(model, train_dataloader, state.global_step)
        if state.is_world_process_zero:
            logger.info("replacement finished:\n%s", polynomial_status(self._model))
        self.detach()
