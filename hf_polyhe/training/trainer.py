"""``PolyTrainer``: the stock ``Trainer`` plus the range / variance loss and replacement progress in the logs.

Why a subclass rather than ``compute_loss_func``: ``Trainer`` skips its gradient-accumulation division for
``compute_loss_func`` (and for models that normalise by ``num_items_in_batch``), so an extra per-batch term
must be scaled by hand. :meth:`PolyTrainer.compute_loss` adds ``α·L_range + β·L_var`` with exactly the
scaling the task loss gets, so accumulating ``k`` micro-batches gives the gradient of one ``k``-times larger
batch. Under DDP the per-rank penalty is a mean and DDP averages gradients, so no world-size factor is needed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from .losses import RangeLoss, RangeLossConfig
from .replacement import PolyReplacementCallback


class PolyTrainer(Trainer):
    """``Trainer`` with ``range_loss=RangeLossConfig(...)`` (or a :class:`RangeLoss`).

    Logs (every ``logging_steps``): ``range_loss`` and ``variance_loss`` (unweighted, averaged over the
    micro-batches since the last log), ``range/<role>_absmax`` / ``range/norm_var_max`` (largest operator
    input seen), and, when a :class:`PolyReplacementCallback` is among the callbacks, ``poly/stage``,
    ``poly/fraction_polynomial`` and ``poly/blend_weight``; the replacement stage also shows on the tqdm bar.
    """

    def __init__(self, *args, range_loss: Union[RangeLossConfig, RangeLoss, None] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(range_loss, RangeLossConfig):
            range_loss = RangeLoss(self.model, range_loss)
        self.range_loss: Optional[RangeLoss] = range_loss
        self._penalty_sums = {"range_loss": 0.0, "variance_loss": 0.0}
        self._penalty_count = 0

    def train(self, *args, **kwargs):
        """``Trainer.train`` with the range loss's hooks installed for the run only: afterwards they are removed
        (with anything captured), so a later trainer on the same model (P1 then P2) does not feed a loss nobody
        reads -- each of its forward passes would keep an autograd graph alive."""
        if self.range_loss is not None:
            self.range_loss.attach()
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.range_loss is not None:
                self.range_loss.remove()

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of ``Trainer.training_step``: will the returned loss be divided by the accumulation steps?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.add_range_loss(model, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def add_range_loss(self, model, loss: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """``loss`` plus ``α·L_range + β·L_var`` of the forward pass just run (training only), scaled for gradient
        accumulation exactly as ``loss`` is; subclasses that compute their own loss (distillation) call it too."""
        if self.range_loss is not None and model.training and torch.is_grad_enabled():
            penalty = self.range_loss.compute()
            extra = penalty.total.to(loss.device)
            if self._task_loss_is_scaled_for_ga(num_items_in_batch):
                # the task loss is already normalised over the whole accumulated batch; a per-micro-batch mean
                # must be divided here, or it would count current_gradient_accumulation_steps times
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
            self._penalty_sums["range_loss"] += float(penalty.range.detach())
            self._penalty_sums["variance_loss"] += float(penalty.variance.detach())
            self._penalty_count += 1
        return loss

    def _replacement_callbacks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, PolyReplacementCallback)]

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training log (not evaluation)
            if self._penalty_count:
                for k, v in self._penalty_sums.items():
                    logs[k] = round(v / self._penalty_count, 6)
                self._penalty_sums = dict.fromkeys(self._penalty_sums, 0.0)
                self._penalty_count = 0
            if self.range_loss is not None:
                logs.update({k: round(v, 4) for k, v in self.range_loss.pop_stats().items()})
            progress = []
            for cb in self._replacement_callbacks():
                logs.update(cb.metrics())
                progress.append(cb.progress())
            bars = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
            for bar in bars:
                if bar.training_bar is not None and progress:
                    bar.training_bar.set_postfix_str("; ".join(progress), refresh=False)
        super().log(logs, start_time)
