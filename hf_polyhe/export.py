"""Torch -> torch-free model description: the only bridge between a Poly model and the HE runtime.

:func:`model_to_spec` walks a fully polynomial PolyGPT / PolyBert / PolyViT in eval mode and writes a
:class:`~hf_polyhe.he.compile.transformer.TransformerSpec` (architecture JSON + float64 weights), from which
:func:`~hf_polyhe.he.compile.transformer.build_circuit` builds the circuit for any sequence length.

The encrypted input ``x`` is the ``L x d`` embedding matrix, computed by the client, which holds the
embedding tables under the threat model (DESIGN.md §6): token + position (+ token type) embeddings for
text; CLS token + patch projection + positions for images. Everything after the embeddings is server-side.

Operator mapping: ``nn.Linear`` -> ``linear`` (``W.T``, bias); residual -> ``add``; ``PolyLayerNorm`` ->
row sums, the fitted inverse-square-root polynomial, weight and bias; eval-mode ``SequenceBatchNorm`` -> one
affine map; pointwise attention -> ``qk_scores`` (1/√d_h), σ as a polynomial (``square`` as a product),
``attn_apply`` with the 0/1 mask divided row by row by ``s(n_i)``; activations -> ``poly``; pooler / CLS /
last token -> ``select_rows``; heads -> ``linear``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .he.circuit.packing import next_pow2
from .he.compile.transformer import TransformerSpec, build_circuit as build_spec_circuit
from .nn.attention import POWER_EPS, PolyAttention
from .nn.norms import PolyLayerNorm, SequenceBatchNorm
from .nn.operators import Identity, PolyOperator, Square
from .status import polynomial_status


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _unused_prefixes(model) -> tuple:
    """Modules an export leaves out: a headless ``PolyBertModel`` exports mean-pooled embeddings, not its pooler."""
    from .models.poly_bert import PolyBertModel

    return ("pooler.",) if isinstance(model, PolyBertModel) else ()


def _bert_embeddings(model):
    """The embeddings module of a PolyBert classifier (``model.bert``) or of a headless ``PolyBertModel``."""
    from .models.poly_bert import PolyBertForSequenceClassification

    return (model.bert if isinstance(model, PolyBertForSequenceClassification) else model).embeddings


def check_exportable(model) -> None:
    """Raise ``ValueError`` unless ``model`` is fully polynomial (the modules its export uses) and in eval mode."""
    status = polynomial_status(model)
    skip = _unused_prefixes(model)
    offending = [o for o in status.offending if not o.path.startswith(skip)] if skip else status.offending
    if offending:
        bad = ", ".join(f"{o.path} ({o.op}, {o.mode})" for o in offending[:8])
        raise ValueError(f"model is not fully polynomial; offending operators: {bad}. "
                         "Use hf_polyhe.to_polynomial or PolyReplacementCallback first.")
    if model.training:
        raise ValueError("export needs model.eval() (BatchNorm must use running statistics, dropout off)")


class _SpecWriter:
    def __init__(self):
        self.spec = TransformerSpec(config={})

    def linear(self, name: str, layer: torch.nn.Linear) -> dict:
        w = self.spec.add(f"{name}.weight", _np(layer.weight).T)
        b = self.spec.add(f"{name}.bias", _np(layer.bias)) if layer.bias is not None else None
        return {"weight": w, "bias": b}

    def act(self, module) -> dict:
        if isinstance(module, PolyOperator):
            return {"kind": "poly", "approximation": module.approximation.to_dict()}
        if isinstance(module, Square):
            return {"kind": "square"}
        if isinstance(module, Identity):
            return {"kind": "identity"}
        raise ValueError(f"cannot export activation {type(module).__name__}")

    def norm(self, name: str, module) -> dict:
        if isinstance(module, PolyLayerNorm):
            return {"kind": "layernorm", "eps": float(module.eps), "inv_sqrt": module.inv_sqrt.approximation.to_dict(),
                    "weight": self.spec.add(f"{name}.weight", _np(module.weight)),
                    "bias": self.spec.add(f"{name}.bias", _np(module.bias))}
        if isinstance(module, SequenceBatchNorm):
            scale = _np(module.weight) / np.sqrt(_np(module.running_var) + module.eps)
            shift = _np(module.bias) - _np(module.running_mean) * scale
            return {"kind": "affine", "scale": self.spec.add(f"{name}.scale", scale),
                    "shift": self.spec.add(f"{name}.shift", shift)}
        raise ValueError(f"cannot export norm {type(module).__name__} at {name}: use poly_layernorm or batchnorm")

    def attention_linears(self, name: str, attn: PolyAttention) -> dict:
        """q, k, v, o; a head width that is not a power of two is padded with zero columns of q/k/v and zero rows of
        o to the next power of two (the packed attention sums within a head by rotations that double), which
        changes no score and no output: the config records the padded ``head_dim`` and the scores' scale."""
        out = {n: self.linear(f"{name}.{n}", getattr(attn, f"{n}_proj")) for n in "qkvo"}
        heads, real = int(attn.num_heads), int(attn.head_dim)
        padded = next_pow2(real)
        if padded == real:
            return out
        block = next_pow2(int(attn.q_proj.weight.shape[1]))
        if heads * padded > block:
            raise ValueError(f"cannot pack {heads} heads of {real} dims: padded to {padded} each they need "
                             f"{heads * padded} columns, more than the block of {block}")
        cols = (np.arange(heads)[:, None] * padded + np.arange(real)[None, :]).reshape(-1)  # head h -> h*padded

        def spread(name, axis):  # the head axis of a weight, its entries moved to their padded places
            a = np.moveaxis(self.spec.weights[name], axis, 0)
            wide = np.zeros((heads * padded, *a.shape[1:]))
            wide[cols] = a
            self.spec.weights[name] = np.moveaxis(wide, 0, axis)

        for n in "qkv":
            spread(out[n]["weight"], -1)
            if out[n]["bias"]:
                spread(out[n]["bias"], 0)
        spread(out["o"]["weight"], 0)
        self.spec.config.update(head_dim=padded, attention_scale=float(real) ** -0.5)
        return out

    def attention(self, name: str, attn: PolyAttention) -> dict:
        if attn.attention_type == "power":
            out = self.attention_linears(name, attn)
            return {**out, "kind": "power", "power": int(attn.power), "eps": float(POWER_EPS),
                    "normalizer": attn.normalizer.approximation.to_dict()}
        if attn.attention_type != "pointwise":
            raise ValueError(f"export supports attention_type='pointwise' or 'power', got {attn.attention_type!r}")
        if attn.scaling_position not in ("pre", "post"):
            raise ValueError(f"unknown attention_scaling_position {attn.scaling_position!r}; accepted: pre, post")
        out = self.attention_linears(name, attn)
        return {**out, "activation": self.act(attn.score_activation), "scaling": attn.scaling,
                "scaling_position": attn.scaling_position}

    def layer(self, name: str, block) -> dict:
        mlp = block.mlp
        return {
            "pre_norm": bool(block.pre_norm),
            "attention_norm": self.norm(f"{name}.attention_norm", block.attention_norm),
            "mlp_norm": self.norm(f"{name}.mlp_norm", block.mlp_norm),
            "attn": self.attention(f"{name}.attn", block.attn),
            "mlp": {"fc_in": self.linear(f"{name}.mlp.fc_in", mlp.fc_in),
                    "norm": self.norm(f"{name}.mlp.norm", mlp.norm) if mlp.norm is not None else None,
                    "act": self.act(mlp.act), "fc_out": self.linear(f"{name}.mlp.fc_out", mlp.fc_out)},
        }


@torch.no_grad()
def model_to_spec(model, max_length: Optional[int] = None) -> TransformerSpec:
    """The server-side description of ``model`` (fully polynomial, eval mode). A headless ``PolyBertModel`` gets the
    ``mean_pool`` head: its circuit outputs the mean-pooled sentence embedding (its pooler, if any, is not used)."""
    from .models.poly_bert import PolyBertForSequenceClassification, PolyBertModel
    from .models.poly_gpt import PolyGPTForCausalLM
    from .models.poly_vit import PolyViTForImageClassification

    check_exportable(model)
    cfg = model.config
    w = _SpecWriter()
    base = {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_attention_heads, "embedding_norm": None, "final_norm": None}
    if isinstance(model, PolyGPTForCausalLM):
        t = model.transformer
        layers = [w.layer(f"h.{i}", blk) for i, blk in enumerate(t.h)]
        base.update(family="gpt", causal=True, max_length=max_length or cfg.max_position_embeddings,
                    final_norm=w.norm("ln_f", t.ln_f), head={"kind": "last_token", "lm_head": w.linear("lm_head", model.lm_head)},
                    vocab_size=cfg.vocab_size)
        limit = cfg.max_position_embeddings
    elif isinstance(model, PolyBertForSequenceClassification):
        bert = model.bert
        layers = [w.layer(f"layers.{i}", blk) for i, blk in enumerate(bert.layers)]
        base.update(family="bert", causal=False, max_length=max_length or cfg.max_position_embeddings,
                    embedding_norm=w.norm("embeddings.norm", bert.embeddings.norm),
                    head={"kind": "pooler_cls", "pooler": w.linear("pooler", bert.pooler.dense),
                          "pooler_act": w.act(bert.pooler.activation), "classifier": w.linear("classifier", model.classifier)},
                    num_labels=cfg.num_labels)
        limit = cfg.max_position_embeddings
    elif isinstance(model, PolyBertModel):
        layers = [w.layer(f"layers.{i}", blk) for i, blk in enumerate(model.layers)]
        base.update(family="bert", causal=False, max_length=max_length or cfg.max_position_embeddings,
                    embedding_norm=w.norm("embeddings.norm", model.embeddings.norm), head={"kind": "mean_pool"})
        limit = cfg.max_position_embeddings
    elif isinstance(model, PolyViTForImageClassification):
        vit = model.vit
        layers = [w.layer(f"layers.{i}", blk) for i, blk in enumerate(vit.layers)]
        limit = vit.embeddings.patch_embeddings.num_patches + 1
        base.update(family="vit", causal=False, max_length=limit, final_norm=w.norm("norm", vit.norm),
                    head={"kind": "cls", "classifier": w.linear("classifier", model.classifier)}, num_labels=cfg.num_labels)
    else:
        raise ValueError(f"cannot export {type(model).__name__}; accepted: PolyGPTForCausalLM, "
                         "PolyBertForSequenceClassification, PolyBertModel (sentence embeddings), "
                         "PolyViTForImageClassification")
    if base["max_length"] > limit:
        raise ValueError(f"max_length {base['max_length']} exceeds the model's {limit} positions")
    w.spec.config = {**base, **w.spec.config, "layers": layers}  # + head_dim / attention_scale when padded
    return w.spec


def build_circuit(model, seq_len: int, attention_mask=None, all_logits: bool = False, slots: Optional[int] = None,
                  groups: int = 1):
    """Shortcut: :func:`~hf_polyhe.he.compile.transformer.build_circuit` of ``model_to_spec(model)``."""
    return build_spec_circuit(model_to_spec(model), seq_len, attention_mask, all_logits=all_logits, slots=slots,
                              groups=groups)


@torch.no_grad()
def client_embeddings(model, input_ids=None, pixel_values=None, token_type_ids=None) -> np.ndarray:
    """What the client computes in the clear before encrypting: the ``L x d`` embedding matrix (float64)."""
    from .models.poly_bert import PolyBertForSequenceClassification, PolyBertModel
    from .models.poly_gpt import PolyGPTForCausalLM
    from .models.poly_vit import PolyViTForImageClassification

    if isinstance(model, PolyGPTForCausalLM):
        ids = torch.as_tensor(input_ids).reshape(1, -1)
        t = model.transformer
        x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1])[None])
    elif isinstance(model, (PolyBertForSequenceClassification, PolyBertModel)):
        ids = torch.as_tensor(input_ids).reshape(1, -1)
        e = _bert_embeddings(model)
        tt = torch.zeros_like(ids) if token_type_ids is None else torch.as_tensor(token_type_ids).reshape(1, -1)
        x = e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1])[None]) + e.token_type_embeddings(tt)
    elif isinstance(model, PolyViTForImageClassification):
        x = model.vit.embeddings(torch.as_tensor(pixel_values, dtype=model.vit.embeddings.cls_token.dtype))
    else:
        raise ValueError(f"cannot embed for {type(model).__name__}")
    return _np(x[0])


@torch.no_grad()
def client_tables(model) -> dict:
    """The embedding tables the client keeps (float64)."""
    from .models.poly_bert import PolyBertForSequenceClassification, PolyBertModel
    from .models.poly_gpt import PolyGPTForCausalLM

    if isinstance(model, PolyGPTForCausalLM):
        return {"word_embeddings": _np(model.transformer.wte.weight), "position_embeddings": _np(model.transformer.wpe.weight)}
    if isinstance(model, (PolyBertForSequenceClassification, PolyBertModel)):
        e = _bert_embeddings(model)
        return {"word_embeddings": _np(e.word_embeddings.weight), "position_embeddings": _np(e.position_embeddings.weight),
                "token_type_embeddings": _np(e.token_type_embeddings.weight)}
    e = model.vit.embeddings
    return {"cls_token": _np(e.cls_token), "patch_weight": _np(e.patch_embeddings.projection.weight),
            "patch_bias": _np(e.patch_embeddings.projection.bias), "position_embeddings": _np(e.position_embeddings[0])}


@torch.no_grad()
def calibrate_ranges(model, inputs, margin: float = 0.1) -> dict:
    """``{operator path: (lo, hi)}``: the input range of every polynomial operator over ``inputs`` (a list of
    model keyword-argument dicts), widened by ``margin`` of the span -- tight calibrated intervals make the
    fitted polynomials (and Newton inverse square roots) shallow. Pass the result to ``to_polynomial(ranges=)``.

    Measured with every operator exact (a polynomial diverging upstream must not poison the ranges); the norm
    that reads the embeddings also covers the whole embedding table
    (:func:`~hf_polyhe.training.ranges.embedding_table_ranges`)."""
    import math

    from .nn import poly_operators
    from .training.ranges import embedding_table_ranges, exact_operators

    seen: dict = {}
    hooks = []
    for path, op in poly_operators(model).items():
        def hook(module, args, path=path):
            lo, hi = seen.get(path, (math.inf, -math.inf))
            seen[path] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
        hooks.append(op.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with exact_operators(model):
            for kw in inputs:
                model(**kw)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for path, r in embedding_table_ranges(model).items():
        if path in seen:
            lo, hi = seen[path]
            seen[path] = (min(lo, r.lo), max(hi, r.hi))
    out = {}
    for path, (lo, hi) in seen.items():
        pad = margin * (hi - lo) + 1e-3
        out[path] = (lo / 2 if 0 < lo <= pad else lo - pad, hi + pad)
    return out


TASKS = {"gpt": "encrypted-text-generation", "bert": "encrypted-text-classification", "vit": "encrypted-image-classification"}
HEAD_TASKS = {"mean_pool": "encrypted-feature-extraction"}  # a head that makes another task than its family's


def export_task(spec_config: dict) -> str:
    """The pipeline task of an export: by its head (``mean_pool``: feature extraction), else by its family."""
    return HEAD_TASKS.get(spec_config.get("head", {}).get("kind"), TASKS[spec_config["family"]])


def check_intervals(model, calibration_data, max_out_of_interval: float = 0.0, max_batches: Optional[int] = None):
    """Raise ``ValueError`` when, on ``calibration_data`` (batches of model keyword arguments), more than
    ``max_out_of_interval`` of some operator's inputs fall outside the interval its polynomial was fitted on,
    naming each such operator with its measured range and interval. Returns the
    :class:`~hf_polyhe.status.PolynomialStatus` with the rates otherwise.

    Under encryption nothing can check this: a polynomial evaluated outside its interval diverges and the client
    decrypts garbage without any error. This plaintext check before export is the only place it is caught."""
    import warnings

    from .status import OutOfIntervalWarning

    if not 0.0 <= max_out_of_interval <= 1.0:
        raise ValueError(f"max_out_of_interval is a fraction in [0, 1], got {max_out_of_interval}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfIntervalWarning)
        status = polynomial_status(model, calibration_data, max_batches)
    bad = [o for o in status.out_of_interval if o.out_of_interval > max_out_of_interval]
    if bad:
        raise ValueError(
            f"{len(bad)} polynomial operator(s) get inputs outside the interval they were fitted on (more than "
            f"max_out_of_interval={max_out_of_interval:g}); under encryption these give wrong results without any "
            f"error, so the export is refused: {'; '.join(o.describe_range() for o in bad[:8])}. The first one is "
            "where the divergence starts (those after it see its output). Refit on data like this: "
            "hf_polyhe.training.refit_drifted_operators(model, calibration_data), or to_polynomial(model, "
            "calibration_data=...).")
    return status


def save_encrypted_pipeline(model, tokenizer_or_processor, out_dir, max_length: Optional[int] = None,
                            plan: bool = True, calibration_data=None, max_out_of_interval: float = 0.0) -> str:
    """Export a fully polynomial Poly model for encrypted inference into ``out_dir``, complete in one call.

    Writes the server part (architecture, fitted polynomials, weights: ``server/``), the client part
    (embedding tables and the tokenizer or image processor: ``client/``), ``pipeline.json`` describing both,
    ``config.json`` (so ``transformers.pipeline(task, model=out_dir)`` loads it) and, with ``plan=True``, the
    planner's report at the default 128-bit parameters (``plan.txt``, and its numbers under
    ``pipeline.json["plan"]``: ring dimension, depth, mode, rotation keys, counts and predicted seconds per
    circuit; or the reason no 128-bit plan exists). Planning generates no keys. Refuses a model that is not
    fully polynomial, listing the offending operators. The export is written to a temporary directory beside
    ``out_dir`` and moved into place at the end: a failed export leaves nothing behind.

    With ``calibration_data`` (batches of model keyword arguments, like the inputs it will serve), the polynomial
    model first runs on it in plaintext and the export is refused (``ValueError`` naming each operator, its measured
    input range and its interval) when more than ``max_out_of_interval`` (a fraction, default 0) of some
    operator's inputs leave the interval its polynomial was fitted on (:func:`check_intervals`): under encryption
    such inputs give garbage with no error."""
    import json
    import os
    import shutil
    import tempfile

    from .he.export import PIPELINE_FORMAT, PIPELINE_VERSION
    from .he.files import save_arrays
    from .pipelines.base import write_pipeline_config

    model = model.eval()
    if calibration_data is not None:
        check_exportable(model)
        check_intervals(model, calibration_data, max_out_of_interval)
    spec = model_to_spec(model, max_length)
    out_dir = os.path.abspath(str(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        if not os.path.exists(os.path.join(out_dir, "pipeline.json")):
            raise FileExistsError(f"{out_dir!r} exists and is not an export: choose an empty or new directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf_polyhe_export_", dir=parent)
    try:
        spec.save(os.path.join(tmp, "server"))
        client_dir = os.path.join(tmp, "client")
        os.makedirs(client_dir, exist_ok=True)
        save_arrays(client_dir, "embeddings", client_tables(model))
        if tokenizer_or_processor is not None:
            tokenizer_or_processor.save_pretrained(client_dir)
        cfg = model.config
        family = spec.config["family"]
        meta = {
            "format": PIPELINE_FORMAT, "version": PIPELINE_VERSION, "task": export_task(spec.config), "family": family,
            "model_type": cfg.model_type, "max_length": spec.config["max_length"], "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers, "server": "server", "client": "client",
            "security": "128-bit CKKS (HEStd_128_classic) by default; toy parameters only for tests",
            "threat_model": "client: secret key, inputs, embedding tables; server: weights, ciphertexts, evaluation keys",
        }
        if family == "gpt":
            meta.update(vocab_size=cfg.vocab_size, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        elif spec.config["head"]["kind"] == "mean_pool":
            meta.update(pooling="mean", embedding_size=cfg.hidden_size)
        else:
            meta.update(id2label={str(k): v for k, v in cfg.id2label.items()})
        meta["files"] = {"server": sorted(os.listdir(os.path.join(tmp, "server"))), "client": sorted(os.listdir(client_dir))}
        with open(os.path.join(tmp, "pipeline.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if plan:
            meta["plan"] = _write_plan_report(tmp)
            with open(os.path.join(tmp, "pipeline.json"), "w") as f:
                json.dump(meta, f, indent=1)
        write_pipeline_config(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out_dir)


def _write_plan_report(out_dir) -> dict:
    """Plan the export at the default 128-bit parameters (no keys) and write ``plan.txt``; returns the overview."""
    import os

    from .he import Export, params as P
    from .he.compile.export_plan import plan_for_export, plan_overview, plan_report
    from .he.errors import PlanningError

    path = os.path.join(out_dir, "plan.txt")
    model = Export(out_dir)
    try:
        plan = plan_for_export(model, P.default())
    except PlanningError as e:
        try:  # bootstrapping keys may not fit in memory where a (slower) leveled ring still does
            plan = plan_for_export(model, P.default(), bootstrap="never")
        except PlanningError as e2:
            reason = f"{e} (without bootstrapping: {e2})"
            with open(path, "w") as f:
                f.write(f"No 128-bit CKKS plan for this export: {reason}\n")
            return {"params": "default", "error": reason}
    with open(path, "w") as f:
        f.write(plan_report(plan) + "\n")
    overview = plan_overview(plan)
    if overview.get("over_memory_limit"):
        import warnings

        warnings.warn(f"hf_polyhe: the export's 128-bit plan does not fit in memory: {overview['over_memory_limit']} "
                      f"(see {path})", stacklevel=3)
    return overview
