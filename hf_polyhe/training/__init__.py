"""Training side of the polynomial conversion: range tracking, range / variance losses, progressive replacement.

- :class:`RangeTracker`, :func:`calibrate`: measure the input range of every non-polynomial operator;
  :func:`widen_interval`, :func:`calibrated_intervals`: fitting intervals from measured ranges;
  :func:`refit_drifted_operators`: refit polynomials whose inputs left their interval during training;
  :func:`exact_operators`: every operator exact inside a ``with`` block (what calibration runs under);
  :func:`embedding_table_ranges`: the first norm's variance range over the whole embedding table.
- :class:`RangeLossConfig`, :class:`RangeLoss`, :func:`range_penalty`: ``α·L_range + β·L_var``.
- :class:`PolyTrainer`: ``Trainer`` that adds the range loss (gradient accumulation handled) and logs ranges.
- :class:`DistillationTrainer`, :class:`DistillationConfig`, :func:`distillation_loss`, :func:`mean_pool`,
  :func:`sentence_embeddings`: distil a headless encoder (``PolyBertModel``) from its original's mean-pooled
  sentence embeddings (and hidden states).
- :class:`PolyReplacementCallback`, :class:`ReplacementStage`, :func:`schedule_by_layer`,
  :func:`schedule_by_operator`, :func:`default_schedule`: replace operators by calibrated polynomials during
  training.
"""

from .distill import (
    DistillationConfig,
    DistillationTrainer,
    distillation_loss,
    mean_pool,
    sentence_embeddings,
)
from .losses import RangeLoss, RangeLossConfig, RangeLossOutput, range_penalty
from .ranges import (
    DEFAULT_MARGIN,
    OperatorRange,
    RangeTracker,
    calibrate,
    calibrated_intervals,
    embedding_table_ranges,
    exact_operators,
    margin_for,
    refit_drifted_operators,
    widen_interval,
)
from .replacement import (
    PolyReplacementCallback,
    ReplacementStage,
    default_schedule,
    schedule_by_layer,
    schedule_by_operator,
)
from .trainer import PolyTrainer

__all__ = [
    "DEFAULT_MARGIN",
    "DistillationConfig",
    "DistillationTrainer",
    "OperatorRange",
    "PolyReplacementCallback",
    "PolyTrainer",
    "RangeLoss",
    "RangeLossConfig",
    "RangeLossOutput",
    "RangeTracker",
    "ReplacementStage",
    "calibrate",
    "calibrated_intervals",
    "default_schedule",
    "distillation_loss",
    "embedding_table_ranges",
    "exact_operators",
    "margin_for",
    "mean_pool",
    "range_penalty",
    "refit_drifted_operators",
    "schedule_by_layer",
    "schedule_by_operator",
    "sentence_embeddings",
    "widen_interval",
]
