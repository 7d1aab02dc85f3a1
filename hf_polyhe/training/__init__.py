"""Training side of the polynomial conversion: range tracking, range / variance losses, progressive replacement.

- :class:`RangeTracker`, :func:`calibrate`: measure the input range of every non-polynomial operator.
- :class:`RangeLossConfig`, :class:`RangeLoss`, :func:`range_penalty`: ``α·L_range + β·L_var``.
- :class:`PolyTrainer`: ``Trainer`` that adds the range loss (gradient accumulation handled) and logs ranges.
- :class:`PolyReplacementCallback`, :class:`ReplacementStage`, :func:`schedule_by_layer`,
  :func:`schedule_by_operator`: replace operators by calibrated polynomials during training.
"""

from .losses import RangeLoss, RangeLossConfig, RangeLossOutput, range_penalty
from .ranges import OperatorRange, RangeTracker, calibrate
from .replacement import (
    DEFAULT_MARGIN,
    PolyReplacementCallback,
    ReplacementStage,
    schedule_by_layer,
    schedule_by_operator,
    margin_for,
    widen_interval,
)
from .trainer import PolyTrainer

__all__ = [
    "DEFAULT_MARGIN",
    "margin_for",
    "OperatorRange",
    "PolyReplacementCallback",
    "PolyTrainer",
    "RangeLoss",
    "RangeLossConfig",
    "RangeLossOutput",
    "RangeTracker",
    "ReplacementStage",
    "calibrate",
    "range_penalty",
    "schedule_by_layer",
    "schedule_by_operator",
    "widen_interval",
]
