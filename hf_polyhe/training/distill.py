"""Distillation of a headless encoder (a ``PolyBertModel``) from its original: sentence embeddings kept while the
architecture becomes polynomial.

A base model has no head, hence no ``labels`` and no loss: the stock ``Trainer`` refuses it, and a
``compute_loss_func`` never sees the attention mask that mean pooling needs. :class:`DistillationTrainer` (a
:class:`~hf_polyhe.training.PolyTrainer`) runs a frozen ``teacher`` -- e.g. the ``BertModel`` the student was
converted from -- on the same batch and trains the student to reproduce

- its **mean-pooled sentence embedding** (:func:`mean_pool`: the average of the last hidden states over the tokens
  the attention mask keeps): ``cosine · (1 - cos) + mse · MSE``, and optionally
- its **per-token last hidden states** (``token_mse``) and its **intermediate layers' hidden states**
  (``layer_mse``, when both have the same number of layers), masked the same way, and
- its **attention maps** (``attention_mse``, as TinyBERT and MiniLM distil them): the student's attention weights
  against the teacher's softmax probabilities, every layer and head (the teacher then needs an attention
  implementation that returns them, e.g. ``attn_implementation="eager"``).

Everything else is PolyTrainer's: the range / variance loss (``range_loss=``), the progressive replacement
callback (``callbacks=[PolyReplacementCallback(...)]``), gradient accumulation (the distillation loss is a
per-micro-batch mean, which the ``Trainer`` divides by the accumulation steps; the range loss gets the same
scaling), logging (``distill/cosine``, ``distill/mse``, ... averaged since the last log)::

    teacher = BertModel.from_pretrained(path)
    student = hf_polyhe.convert_to_poly(teacher, attention_type="power", norm_type="poly_layernorm")
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=texts_tokenized,
                                  distillation=DistillationConfig(cosine=1.0, mse=1.0),
                                  callbacks=[PolyReplacementCallback()], range_loss=RangeLossConfig())
    trainer.train()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .trainer import PolyTrainer


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, d)`` mean of ``hidden_states`` ``(batch, length, d)`` over the tokens ``attention_mask``
    ``(batch, length)`` keeps (1 = token, 0 = padding; ``None``: every token) -- the sentence embedding of
    sentence-transformers models. Padded rows do not count, whatever they hold (also NaN or inf there)."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be a (batch, length, hidden) tensor, got "
                         f"{tuple(getattr(hidden_states, 'shape', ())) or type(hidden_states).__name__}")
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = torch.as_tensor(attention_mask, device=hidden_states.device)
    if mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match hidden_states "
                         f"{tuple(hidden_states.shape)}: expected {tuple(hidden_states.shape[:2])}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold zeros and ones")
    mask = mask.bool()
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"attention_mask rows {torch.nonzero(counts == 0).flatten().tolist()} keep no token: "
                         "a mean over no token is undefined")
    kept = torch.where(mask[..., None], hidden_states, torch.zeros((), dtype=hidden_states.dtype,
                                                                   device=hidden_states.device))
    return kept.sum(dim=1) / counts[:, None].to(hidden_states.dtype)


@dataclass
class DistillationConfig:
    """Weights of the distillation loss terms (a weight of 0 switches a term off; at least one must be > 0).

    ``cosine``: ``1 - cos(student, teacher)`` of the mean-pooled embeddings, averaged over the batch.
    ``mse``: mean squared error of the mean-pooled embeddings (per feature).
    ``token_mse``: mean squared error of the last hidden states over the kept tokens.
    ``layer_mse``: the same for every intermediate layer's output (``output_hidden_states``; the student and the
    teacher must have the same number of layers).
    ``attention_mse``: the squared error of the attention weights (``output_attentions``: the student's
    ``(batch, heads, queries, keys)`` weights against the teacher's probabilities), each multiplied by its row's
    number of kept keys ``n`` so that a uniform row weighs 1 per key whatever the length, summed over the kept keys
    and averaged over kept queries, heads and layers; both models need the same number of layers and heads.
    ``normalize``: compare L2-normalised embeddings in the ``mse`` term (scale-free, like cosine)."""

    cosine: float = field(default=1.0, metadata={"help": "weight of 1 - cos of the mean-pooled embeddings"})
    mse: float = field(default=1.0, metadata={"help": "weight of the MSE of the mean-pooled embeddings"})
    token_mse: float = field(default=0.0, metadata={"help": "weight of the per-token MSE of the last hidden states"})
    layer_mse: float = field(default=0.0, metadata={"help": "weight of the per-token MSE of every intermediate layer"})
    attention_mse: float = field(default=0.0, metadata={"help": "weight of the squared error of the attention maps"})
    normalize: bool = field(default=False, metadata={"help": "MSE on L2-normalised embeddings"})

    def __post_init__(self):
        weights = {k: getattr(self, k) for k in ("cosine", "mse", "token_mse", "layer_mse", "attention_mse")}
        bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or not v >= 0}
        if bad:
            raise ValueError(f"distillation weights must be numbers >= 0, got {bad}")
        if not any(weights.values()):
            raise ValueError("every distillation weight is 0: set at least one of cosine, mse, token_mse, layer_mse, "
                             "attention_mse")

    @property
    def needs_hidden_states(self) -> bool:
        return self.layer_mse > 0

    @property
    def needs_attentions(self) -> bool:
        return self.attention_mse > 0


def _hidden(outputs, name: str) -> torch.Tensor:
    last = getattr(outputs, "last_hidden_state", None)
    if last is None and getattr(outputs, "hidden_states", None) is not None:
        last = outputs.hidden_states[-1]
    if last is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        last = outputs[0]
    if not isinstance(last, torch.Tensor) or last.dim() != 3:
        raise ValueError(f"the {name} returned no (batch, length, hidden) last_hidden_state (got "
                         f"{type(outputs).__name__}); distil a base encoder such as BertModel / PolyBertModel, or a "
                         "model that returns hidden_states")
    return last


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1]).clamp(min=1.0)


def _attention_error(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``attention_mse``'s term for one layer: ``s`` / ``t`` ``(batch, heads, queries, keys)``, ``mask``
    ``(batch, keys)`` bool (queries and keys are the same tokens)."""
    if s.shape != t.shape:
        raise ValueError(f"attention_mse needs attention maps of the same shape: student {tuple(s.shape)}, teacher "
                         f"{tuple(t.shape)} (the same number of heads and tokens)")
    m = mask.to(s.dtype)
    n = m.sum(-1)[:, None, None, None]  # kept keys of each row (the same for every row of a sequence)
    pair = m[:, None, :, None] * m[:, None, None, :]
    err = ((s - t) ** 2 * pair).sum(-1, keepdim=True) * n  # = sum over keys of (n s - n t)^2 / n
    return err.sum() / (m.sum() * s.shape[1]).clamp(min=1.0)


def distillation_loss(student_outputs, teacher_outputs, attention_mask: torch.Tensor,
                      config: DistillationConfig | None = None) -> tuple:
    """``(loss, terms)``: the weighted distillation loss of one batch and its unweighted terms (floats, for logs).

    ``student_outputs`` / ``teacher_outputs``: model outputs with ``last_hidden_state`` (and ``hidden_states`` when
    ``config.layer_mse > 0``); ``attention_mask``: ``(batch, length)`` 0/1."""
    config = config or DistillationConfig()
    s_last, t_last = _hidden(student_outputs, "student"), _hidden(teacher_outputs, "teacher").detach()
    if s_last.shape != t_last.shape:
        raise ValueError(f"student hidden states {tuple(s_last.shape)} and teacher hidden states "
                         f"{tuple(t_last.shape)} differ: distillation needs the same hidden size")
    t_last = t_last.to(s_last.dtype)
    mask = torch.as_tensor(attention_mask, device=s_last.device)
    s_emb, t_emb = mean_pool(s_last, mask), mean_pool(t_last, mask)
    terms, loss = {}, s_last.new_zeros(())
    if config.cosine:
        terms["cosine"] = torch.nn.functional.cosine_similarity(s_emb, t_emb, dim=-1).mean()
        loss = loss + config.cosine * (1.0 - terms["cosine"])
    if config.mse:
        a, b = (nn.functional.normalize(s_emb, dim=-1), nn.functional.normalize(t_emb, dim=-1)) if config.normalize \
            else (s_emb, t_emb)
        terms["mse"] = nn.functional.mse_loss(a, b)
        loss = loss + config.mse * terms["mse"]
    if config.token_mse:
        terms["token_mse"] = _masked_mse(s_last, t_last, mask.bool())
        loss = loss + config.token_mse * terms["token_mse"]
    if config.layer_mse:
        s_h, t_h = getattr(student_outputs, "hidden_states", None), getattr(teacher_outputs, "hidden_states", None)
        if s_h is None or t_h is None:
            raise ValueError("layer_mse needs hidden_states from both models (output_hidden_states=True)")
        if len(s_h) != len(t_h):
            raise ValueError(f"layer_mse needs as many layers in the student ({len(s_h) - 1}) as in the teacher "
                             f"({len(t_h) - 1})")
        inner = list(zip(s_h[1:-1], t_h[1:-1]))  # the embeddings are the same; the last layer is token_mse's
        if inner:
            terms["layer_mse"] = sum(_masked_mse(a, b.detach().to(a.dtype), mask.bool()) for a, b in inner) / len(inner)
            loss = loss + config.layer_mse * terms["layer_mse"]
    if config.attention_mse:
        s_a, t_a = getattr(student_outputs, "attentions", None), getattr(teacher_outputs, "attentions", None)
        if not s_a or not t_a or any(a is None for a in (*s_a, *t_a)):
            raise ValueError("attention_mse needs attention maps from both models (output_attentions=True); a model "
                             "whose attention implementation returns none (sdpa, flash) must be loaded with "
                             "attn_implementation='eager'")
        if len(s_a) != len(t_a):
            raise ValueError(f"attention_mse needs as many layers in the student ({len(s_a)}) as in the teacher "
                             f"({len(t_a)})")
        terms["attention_mse"] = sum(_attention_error(a, b.detach().to(a.dtype), mask.bool())
                                     for a, b in zip(s_a, t_a)) / len(s_a)
        loss = loss + config.attention_mse * terms["attention_mse"]
    return loss, {k: float(v.detach()) for k, v in terms.items()}


TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class DistillationTrainer(PolyTrainer):
    """A :class:`~hf_polyhe.training.PolyTrainer` whose loss is the distillation of a frozen ``teacher``.

    Args:
        teacher: the original model (e.g. the ``BertModel`` the student was converted from). It is put in eval
            mode, frozen (``requires_grad=False``) and moved to the student's device on the first step; it runs
            under ``torch.no_grad`` on the same inputs (``input_ids``, ``attention_mask``, ``token_type_ids``).
            With ``attention_mse`` a transformers teacher is switched to ``eager`` attention (the same
            computation; ``sdpa`` returns no attention maps).
        distillation: a :class:`DistillationConfig` (loss weights) or a dict of its fields.
        everything else: as :class:`~hf_polyhe.training.PolyTrainer` / ``transformers.Trainer`` (``range_loss``,
        ``callbacks=[PolyReplacementCallback(...)]``, ...).

    Batches need ``input_ids`` and ``attention_mask`` (the mean pooling reads it; a batch without it is refused
    rather than pooled over its padding); ``labels`` are not needed and, if present, ignored. The loss is a
    per-micro-batch mean (``loss_is_scaled_for_ga = False``): the ``Trainer`` divides it by the accumulation steps.
    Logs ``distill/<term>`` (unweighted, averaged over the micro-batches since the last log).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher: nn.Module = None,
                 distillation: DistillationConfig | dict | None = None, **kwargs):
        if teacher is None or not isinstance(teacher, nn.Module):
            raise ValueError(f"DistillationTrainer needs teacher= (a torch model), got {type(teacher).__name__}")
        if isinstance(distillation, dict):
            distillation = DistillationConfig(**distillation)
        if distillation is not None and not isinstance(distillation, DistillationConfig):
            raise TypeError(f"distillation must be a DistillationConfig or a dict, got {type(distillation).__name__}")
        super().__init__(*args, **kwargs)
        if self.model is teacher:
            raise ValueError("the teacher is the student itself: pass a separate (frozen) copy as teacher=")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.distillation = distillation or DistillationConfig()
        impl = getattr(getattr(teacher, "config", None), "_attn_implementation", None)
        if self.distillation.needs_attentions and impl not in (None, "eager") and \
                hasattr(teacher, "set_attn_implementation"):
            teacher.set_attn_implementation("eager")  # sdpa / flash return no attention maps; eager does, same math
        self.model_accepts_loss_kwargs = False  # no num_items_in_batch: our loss is a per-batch mean
        self._distill_sums: dict = {}
        self._distill_count = 0

    def _teacher_on(self, device) -> nn.Module:
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != device:
            self.teacher.to(device)
        if self.teacher.training:  # Trainer.train() only switches the student to train mode; keep it so
            self.teacher.eval()
        return self.teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise ValueError(f"distillation batches need input_ids, got keys {sorted(inputs)}")
        if "attention_mask" not in inputs:
            raise ValueError("distillation batches need an attention_mask (mean pooling over the kept tokens): "
                             f"got keys {sorted(inputs)}; tokenize with return_attention_mask=True")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        extra = {}
        if self.distillation.needs_hidden_states:
            extra["output_hidden_states"] = True
        if self.distillation.needs_attentions:
            extra["output_attentions"] = True
        outputs = model(**model_inputs, **extra)
        s_last = _hidden(outputs, "student")
        teacher = self._teacher_on(s_last.device)
        with torch.no_grad():
            t_in = {k: v for k, v in model_inputs.items() if k in TEACHER_INPUTS}
            t_out = teacher(**t_in, **extra)
        loss, terms = distillation_loss(outputs, t_out, inputs["attention_mask"], self.distillation)
        if model.training:
            for k, v in terms.items():
                self._distill_sums[k] = self._distill_sums.get(k, 0.0) + v
            self._distill_count += 1
        loss = self.add_range_loss(model, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss of the batch (there are no labels, hence no predictions to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._distill_count:
            for k, v in self._distill_sums.items():
                logs[f"distill/{k}"] = round(v / self._distill_count, 6)
            self._distill_sums, self._distill_count = {}, 0
        super().log(logs, start_time)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches, normalize: bool = False) -> torch.Tensor:
    """``(n, d)`` mean-pooled embeddings of ``model`` (eval mode, float32 on CPU) over ``batches`` (dicts with
    ``input_ids`` and ``attention_mask``, as a DataLoader yields them)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        device = next(model.parameters()).device
        for b in batches:
            if "attention_mask" not in b:
                raise ValueError("sentence_embeddings needs batches with an attention_mask")
            kw = {k: torch.as_tensor(v).to(device) for k, v in b.items() if k in TEACHER_INPUTS}
            emb = mean_pool(_hidden(model(**kw), "model"), kw["attention_mask"])
            if normalize:
                emb = nn.functional.normalize(emb, dim=-1)
            out.append(emb.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
