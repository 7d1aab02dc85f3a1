"""What the three recipes share: arguments (CLI + YAML), training with the range loss and progressive
replacement, evaluation, export check, and the model card.

The method of every recipe (Zimerman et al., ICML 2024, with progressive replacement):

1. **P0** -- the baseline (softmax attention, exact LayerNorm), trained or converted.
2. **P1** -- the HE-friendly architecture (pointwise attention, polynomial-ready norms) trained with the
   range loss (and LayerNorm variance loss), operators still exact. A copy of it is trained on for P2's steps
   with exact operators (:func:`train_exact_same_budget`): the HE-friendly model at P2's budget, so that the gap
   to P2 is what the polynomials cost and the gap to P0 what the architecture costs, both at equal budgets.
3. **P2** -- P1 trained on with :class:`~hf_polyhe.training.PolyReplacementCallback`, which replaces
   operators layer by layer on calibrated ranges until the model is fully polynomial.
4. Evaluate P0 vs P2, optionally export with ``save_encrypted_pipeline`` and check the exported circuit on
   a few samples, and write a model card with the measured numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.training import (  # noqa: E402
    PolyReplacementCallback,
    PolyTrainer,
    RangeLossConfig,
    refit_drifted_operators,
    schedule_by_layer,
)


def recipe_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """Arguments shared by every recipe; ``--config file.yaml`` sets defaults, explicit flags win."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file of argument values (keys as the long flags, '-' or '_')")
    p.add_argument("--tiny", action="store_true", help="tiny preset on offline data (minutes on 2 CPU cores)")
    p.add_argument("--data-dir", help="local data instead of the hub (see the recipe's docstring)")
    p.add_argument("--output-dir", default=None, help="where models, export and results go")
    p.add_argument("--card-dir", default=None, help="write the model card here (default: <output-dir>/card)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of P1 (an exact baseline gets the same total budget as P2)")
    p.add_argument("--poly-steps", type=int, default=None, help="steps of progressive replacement (P2)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--poly-lr-scale", type=float, default=0.2, help="learning rate of P2 relative to --lr")
    p.add_argument("--degree", type=int, default=None, help="polynomial degree (default: per operator)")
    p.add_argument("--alpha", type=float, default=1e-2, help="range loss weight")
    p.add_argument("--beta", type=float, default=1e-3, help="LayerNorm variance loss weight")
    p.add_argument("--bound", type=float, default=None,
                   help="B of the range loss (default: per operator, half the largest |x| of each batch)")
    p.add_argument("--export", action="store_true", help="export the polynomial model and check the circuit")
    p.add_argument("--encrypted-samples", type=int, default=0,
                   help="with --export: also run this many held-out samples on CKKS ciphertexts (OpenFHE)")
    p.add_argument("--he-params", choices=("default", "toy"), default="default",
                   help="CKKS parameters of --encrypted-samples: 'default' 128-bit, 'toy' INSECURE (quick looks, tests)")
    p.add_argument("--eval-samples", type=int, default=None, help="limit the evaluation set")
    p.add_argument("--use-cpu", action="store_true", help="force CPU (e.g. under torchrun with gloo)")
    p.set_defaults(**defaults)
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None, tiny_defaults: Optional[dict] = None,
               full_defaults: Optional[dict] = None) -> argparse.Namespace:
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        import yaml

        with open(pre.config) as f:
            values = {k.replace("-", "_"): v for k, v in (yaml.safe_load(f) or {}).items()}
        known = {a.dest for a in parser._actions}
        unknown = set(values) - known
        if unknown:
            parser.error(f"unknown keys in {pre.config}: {sorted(unknown)}")
        parser.set_defaults(**values)
        pre, _ = parser.parse_known_args(argv)
    preset = (tiny_defaults if pre.tiny else full_defaults) or {}
    args = parser.parse_args(argv)
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.started_at = time.time()  # the card reports the run's wall-clock time
    return args


def training_arguments(args, output_dir: str, steps: int, lr: Optional[float] = None, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr or args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=args.use_cpu or not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=False, **extra,
    )


def train_exact(model, train_dataset, args, output_dir, steps, data_collator=None, range_loss=True, lr=None):
    """P0 / P1: exact operators (P1 with the range + variance losses)."""
    rl = RangeLossConfig(alpha=args.alpha, beta=args.beta, bound=args.bound) if range_loss else None
    trainer = PolyTrainer(model=model, args=training_arguments(args, output_dir, steps, lr=lr),
                          train_dataset=train_dataset, data_collator=data_collator, range_loss=rl)
    trainer.train()
    return trainer


def train_exact_same_budget(model, train_dataset, args, output_dir, steps, data_collator=None):
    """A copy of P1 trained on for P2's ``steps`` exactly as P2 is (learning rate ×``poly_lr_scale``, the same
    range + variance losses, the same seed and data order) but with its operators left exact. Evaluated beside P2
    it shows what the polynomials cost at an equal budget; ``model`` itself is not changed."""
    copy_ = copy.deepcopy(model)
    train_exact(copy_, train_dataset, args, output_dir, steps, data_collator, lr=args.lr * args.poly_lr_scale)
    return copy_


def steps_row(args) -> str:
    """The optimizer steps of P0 / P1 / P1 trained on with exact operators / P2 for recipes that train P0 from scratch:
    P0 and both ends of the method get the same total."""
    s, p = args.steps, args.poly_steps
    return f"{s + p} / {s} / {s} + {p} / {s} + {p}"


def train_progressive(model, train_dataset, args, output_dir, steps, data_collator=None):
    """P2: progressive replacement, one layer at a time, then the operators outside the layers."""
    n = model.config.num_hidden_layers
    every = max(1, steps // (n + 1))
    # ranges are measured in eval mode on held-in batches (BatchNorm running statistics, no dropout): exactly
    # what the polynomial will see at inference, where nothing clips its input
    calibration = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True,
                                              collate_fn=data_collator, generator=torch.Generator().manual_seed(args.seed))
    callback = PolyReplacementCallback(schedule_by_layer(n, start=1, every=every, ramp_steps=max(1, every // 2)),
                                       calibration_dataloader=calibration, calibration_batches=8,
                                       degree=args.degree)  # the library's DEFAULT_MARGIN
    # replacement is a fine-tuning phase: a lower learning rate keeps ranges near where they were calibrated
    trainer = PolyTrainer(model=model, args=training_arguments(args, output_dir, steps, lr=args.lr * args.poly_lr_scale),
                          train_dataset=train_dataset, data_collator=data_collator, callbacks=[callback],
                          range_loss=RangeLossConfig(alpha=args.alpha, beta=args.beta, bound=args.bound))
    trainer.train()
    refit = refit_drifted_operators(model, calibration, args.degree)
    if refit:
        print(f"refitted {len(refit)} operator(s) whose inputs drifted outside their interval: {', '.join(refit)}")
    status = hf_polyhe.polynomial_status(model)
    if not status.is_polynomial:
        raise RuntimeError(f"progressive replacement did not finish:\n{status}")
    return trainer, callback


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


_METRICS: dict = {}


def accuracy_metric(predictions, references) -> float:
    """Accuracy in %, through ``evaluate.load("accuracy")`` when it can be loaded (it needs the hub the first
    time) and computed locally otherwise -- the same number either way."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    if "accuracy" not in _METRICS:
        try:
            import evaluate

            _METRICS["accuracy"] = evaluate.load("accuracy")
        except Exception as e:  # offline (HF_HUB_OFFLINE=1 or no network): evaluate cannot fetch its script
            print(f"evaluate.load('accuracy') unavailable ({type(e).__name__}); computing accuracy locally")
            _METRICS["accuracy"] = None
    metric = _METRICS["accuracy"]
    if metric is None:
        return 100.0 * float((predictions == references).mean())
    return 100.0 * float(metric.compute(predictions=predictions, references=references)["accuracy"])


@torch.no_grad()
def classification_accuracy(model, dataset, input_key: str, batch_size: int = 64) -> float:
    model.eval()
    preds, refs = [], []
    for i in range(0, len(dataset), batch_size):
        batch = dataset[i : i + batch_size]
        inputs = {input_key: torch.as_tensor(np.asarray(batch[input_key]))}
        if "attention_mask" in batch:
            inputs["attention_mask"] = torch.as_tensor(np.asarray(batch["attention_mask"]))
        preds += model(**inputs).logits.argmax(-1).tolist()
        refs += np.asarray(batch["labels"]).tolist()
    return accuracy_metric(preds, refs)


@torch.no_grad()
def lm_perplexity(model, dataset, batch_size: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        ids = torch.as_tensor(np.asarray(dataset[i : i + batch_size]["input_ids"]))
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids.numel() - ids.shape[0]
        total += float(out.loss) * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def export_check(model, processor, out_dir: str, samples: list, encrypted_samples: int = 0,
                 he_params: str = "default") -> dict:
    """Export with ``save_encrypted_pipeline`` and compare the circuit (plain CKKS-packing backend) with torch
    on ``samples`` (dicts of model inputs for one example). The export's 128-bit plan (ring, depth, predicted
    latency) is read back from ``pipeline.json``; with ``encrypted_samples > 0`` the first samples also run on
    CKKS ciphertexts (OpenFHE, ``he_params``: ``"default"`` 128-bit or ``"toy"`` INSECURE) and are compared with
    the plain polynomial circuit."""
    from hf_polyhe.export import save_encrypted_pipeline
    from hf_polyhe.he import Export, PlainServer

    model = model.eval()
    save_encrypted_pipeline(model, processor, out_dir)
    enc = Export(out_dir)
    plain = PlainServer(enc)
    worst, agree, inputs = 0.0, 0, []
    for s in samples:
        ref = model.double()(**{k: torch.as_tensor(v)[None] for k, v in s.items()}).logits[0]
        ref = (ref[-1] if ref.dim() == 2 else ref).numpy()
        x = enc.embed(**{k: np.asarray(v) for k, v in s.items() if k in ("input_ids", "pixel_values")})
        mask = s.get("attention_mask")
        got = plain.run(x, attention_mask=mask).reshape(-1)
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        worst = max(worst, err if np.isfinite(err) else float("inf"))  # NaN must not read as 0
        agree += int(np.argmax(got) == np.argmax(ref))
        # the encrypted run takes the unpadded sequence (padding only masks keys; the circuit of the true length
        # is smaller and gives the same logits)
        inputs.append(x if mask is None else x[np.asarray(mask, dtype=bool)])
    model.float()
    result = {"export_dir": out_dir, "samples": len(samples), "max_rel_error_plain_backend": worst,
              "argmax_agreement": agree / max(1, len(samples)), "plan_128bit": enc.meta.get("plan", {})}
    if encrypted_samples:
        result["encrypted"] = encrypted_check(enc, inputs[:encrypted_samples], he_params)
    return result


def encrypted_check(enc, inputs: list, he_params: str = "default") -> dict:
    """Run ``inputs`` (embedding matrices) through CKKS with keys made for this export (kept in memory) and
    compare each with the plain polynomial circuit: max error relative to the logit range, argmax agreement and
    the measured seconds (encrypt / server / decrypt)."""
    import warnings

    from hf_polyhe.he import Client, PlainServer, plan_for_export
    from hf_polyhe.he import params as P
    from hf_polyhe.he.errors import ToyParametersWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ToyParametersWarning)  # the card says INSECURE
        t0 = time.perf_counter()
        # keys for the lengths of these inputs only, bootstrap bounds calibrated on them (not on random tokens,
        # which a model trained on real text may push outside its polynomials' intervals)
        lengths = sorted({len(x) for x in inputs})
        plan = plan_for_export(enc, P.resolve(he_params), lengths=lengths, kv_cache=False,
                               calibration=[x for x in inputs if len(x) == lengths[-1]])
        client = Client.keygen(enc, plan)
        server, plain = client.server(), PlainServer(enc)
        server.verbose = False
        t_keys = time.perf_counter() - t0
        errs, same, seconds, he = [], 0, [], {}
        for x in inputs:
            got, he = client.forward(server, x)
            ref = plain.run(x).reshape(-1)
            errs.append(float(np.abs(got - ref).max() / max(float(ref.max() - ref.min()), 1e-12)))
            same += int(np.argmax(got) == np.argmax(ref))
            seconds.append(he["timings"]["total_s"])
    return {"params": he.get("security"), "insecure": client.plan.params.insecure, "ring_dim": he.get("ring_dim"),
            "levels": he.get("levels"), "mode": he.get("mode"), "rotation_keys": he.get("rotation_keys"),
            "samples": len(inputs), "keys_s": t_keys, "seconds_per_sample": float(np.mean(seconds)),
            "max_err_over_logit_range": max(errs), "argmax_agreement": same / len(inputs)}


# -- model cards ---------------------------------------------------------------------------------------------------
# A card is Hub-form: YAML front matter (huggingface_hub.ModelCardData: licence, datasets, metrics, model-index,
# base_model; no pipeline_tag and `inference: false`, because the models need the hf_polyhe package and, encrypted,
# a client holding keys -- a Hub widget cannot serve them), then sections for people: description, intended use,
# how to use (a runnable snippet), training, evaluation, polynomial operators, threat model, limitations.

PROJECT_LICENSE = "apache-2.0"  # pyproject.toml: Apache-2.0
# results keys written by export_results start with one of these; the card shows those rows in words
EXPORT_ROW_PREFIXES = ("export: ", "128-bit ", "encrypted ")
PAPER = ("Zimerman et al., *Converting Transformers to Polynomial Form for Secure Inference Over Homomorphic "
         "Encryption*, ICML 2024 ([arXiv:2311.08610](https://arxiv.org/abs/2311.08610))")
BIBTEX = """@inproceedings{zimerman2024converting,
  title     = {Converting Transformers to Polynomial Form for Secure Inference Over Homomorphic Encryption},
  author    = {Zimerman, Itamar and Baruch, Moran and Drucker, Nir and Ezov, Gilad and Soceanu, Omri and Wolf, Lior},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  year      = {2024}
}"""


@dataclass
class CardData:
    """What a model card says about a recipe's data.

    ``hub_id`` is the Hub dataset the recipe loads (it goes into the YAML ``datasets`` list and the model-index);
    ``None`` for data that ships with a package or comes from local files, which the card then says in words
    (``local_type`` names it in the model-index, where the Hub expects a dataset type)."""

    name: str  # a person's name for the data, also the model-index dataset name
    description: str  # what the examples are, sizes, splits
    licence: str  # the data's own licence, in words (the model's licence is the project's)
    hub_id: Optional[str] = None
    config: Optional[str] = None  # Hub dataset configuration (e.g. "sst2", "wikitext-103-raw-v1")
    split: str = "test"  # the split the metrics were measured on
    local_type: Optional[str] = None  # model-index dataset type of local data (not a Hub id)


@dataclass
class CardMetric:
    """The headline metric of a card: its Hub metric id, a person's name for it, and the ``results`` keys of
    the baseline (P0 at the same training budget) and of the fully polynomial model (P2)."""

    type: str  # Hub metric id: "perplexity", "accuracy"
    name: str  # e.g. "held-out perplexity (lower is better)"
    baseline_key: str
    polynomial_key: str


def _fmt(v) -> str:
    """How the card prints a measured number (the card check looks for exactly this)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def export_results(check: dict, agreement_name: str = "argmax agreement") -> dict:
    """The ``results.json`` rows of an :func:`export_check` (every key starts with one of
    :data:`EXPORT_ROW_PREFIXES`; :func:`write_model_card` shows them in words)."""
    rows = {"export: max rel. error of circuit (plain backend) vs torch": check["max_rel_error_plain_backend"],
            f"export: {agreement_name}": check["argmax_agreement"]}
    plan = check.get("plan_128bit") or {}
    if "error" in plan:
        rows["128-bit plan"] = "none: " + plan["error"]
    elif plan:
        full = plan["circuits"].get("full", {})
        rows["128-bit plan (HEStd_128_classic)"] = (f"ring 2^{int(plan['ring_dim']).bit_length() - 1}, depth {plan['depth']}, "
                                                    f"{plan['mode']}, {plan['rotation_keys']} rotation keys")
        rows["128-bit predicted latency, one input of length %s (s)" % full.get("length")] = float(full.get("predicted_seconds", 0))
        if "decode" in plan["circuits"]:
            rows["128-bit predicted latency, one further token with the encrypted KV cache (s)"] = \
                float(plan["circuits"]["decode"]["predicted_seconds"])
    enc = check.get("encrypted")
    if enc:
        tag = "toy params, INSECURE" if enc["insecure"] else enc["params"]
        rows[f"encrypted ({tag}): ring / levels / mode"] = f"2^{int(enc['ring_dim']).bit_length() - 1} / {enc['levels']} / {enc['mode']}"
        rows[f"encrypted ({tag}): measured seconds per input (mean of {enc['samples']})"] = enc["seconds_per_sample"]
        rows[f"encrypted ({tag}): max error / logit range vs plain circuit"] = enc["max_err_over_logit_range"]
        rows[f"encrypted ({tag}): argmax agreement"] = enc["argmax_agreement"]
    return rows


_OP_WORDS = {"inv_sqrt": "1/√(variance + ε) of a LayerNorm", "gelu": "GELU", "relu": "ReLU", "tanh": "tanh",
             "silu": "SiLU", "squared_relu": "squared ReLU", "sigmoid": "sigmoid", "exp": "exp", "sign": "sign"}
_ROLE_WORDS = {"attn_act": "on the attention scores", "mlp_act": "in the MLP", "pooler_act": "in the pooler",
               "head_act": "in the classification head"}


def _operator_words(o) -> str:
    what = _OP_WORDS.get(o.op, o.op)
    where = _ROLE_WORDS.get(o.role, "")
    layer = f"layer {o.layer_idx}" if o.layer_idx is not None else "outside the layers"
    return " ".join(p for p in (what, where) if p) + f", {layer}"


def operator_table(model) -> str:
    """Every replaced operator: what it computes, the input interval its polynomial was fitted on, the degree,
    the CKKS levels it costs and the fit's max error on the interval."""
    rows = ["| operator | computes | input interval | degree | CKKS levels | max error on the interval |",
            "|---|---|---|---|---|---|"]
    for o in hf_polyhe.polynomial_status(model).operators:
        iv = f"[{o.interval[0]:.3g}, {o.interval[1]:.3g}]" if o.interval else "-"
        err = f"{o.max_error:.2e}" if o.max_error is not None else "-"
        rows.append(f"| `{o.path}` | {_operator_words(o)} | {iv} | {o.degree} | {o.depth} | {err} |")
    return "\n".join(rows)


_NORM_WORDS = {"layernorm": "exact LayerNorm", "poly_layernorm": "LayerNorm whose 1/√variance is a polynomial",
               "batchnorm": "BatchNorm, an affine map at inference"}


def _attention_words(cfg) -> str:
    if cfg.attention_type == "softmax":
        return "(softmax)"
    scale = {"sqrt_length": "1/√L", "length": "1/L"}.get(cfg.attention_scaling)
    where = {"pre": "before", "post": "after"}.get(cfg.attention_scaling_position, cfg.attention_scaling_position)
    if cfg.attention_type == "power":
        return f"(power-softmax, p = {cfg.attention_power})"
    return f"(σ(QKᵀ/√d)·V with σ = {cfg.attention_activation}" + (f", scaled by {scale} {where} σ)" if scale else ")")


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores"


def _plan_failure_in_words(reason: str) -> dict:
    """The planner's reason for having no 128-bit plan, in words: ``{"headline", "detail", "memory_gib"}``."""
    op = re.search(r"op '[^']+' \((\w+)\) needs (\d+) levels in one bootstrap segment", reason)
    mem = re.search(r"need ~([\d.]+) GiB, over the ([\d.]+) GiB limit", reason)
    cap = re.search(r"no 128-bit secure ring allows more than (\d+) levels after a bootstrap", reason)
    leveled = re.search(r"without bootstrapping: .*?\(depth (\d+),.*?max \d+ bits at N=2\^(\d+)\)", reason)
    parts, headline, need = [], "not possible yet", None
    deepest = f"its deepest polynomial step needs {op.group(2)} levels between two bootstraps" if op else None
    if mem:
        need = float(mem.group(1))
        headline = f"not possible within {float(mem.group(2)):.0f} GiB of memory yet"
        parts.append((deepest or "the circuit needs bootstrapping") + f", and bootstrapping keys for that depth "
                     f"need ~{need:.0f} GiB")
    elif cap:
        headline = "not possible at 128-bit security yet"
        parts.append((deepest or "the circuit needs bootstrapping") + f", but no 128-bit secure ring keeps more than "
                     f"{cap.group(1)} levels after a bootstrap")
    if leveled:
        parts.append(f"without bootstrapping the whole circuit needs {leveled.group(1)} levels, more than any "
                     f"128-bit ring (up to 2^{leveled.group(2)}) holds")
    detail = "; ".join(parts) if parts else reason
    return {"headline": headline, "detail": detail, "memory_gib": need}


def _memory_setting(gib: float) -> int:
    """A round ``HF_POLYHE_MAX_MEMORY_GIB`` above the planner's estimate of ``gib``."""
    return int(math.ceil((gib + 1) / 8) * 8)


def _unit(task: str) -> str:
    return {"text-generation": "prompt", "text-classification": "text", "image-classification": "image"}[task]


def plan_in_words(plan: dict, task: str) -> str:
    """The export's 128-bit plan (``pipeline.json["plan"]``) as a sentence a Hub user understands."""
    if not plan:
        return "Encrypted inference at 128-bit security: not planned (the export was written without a plan)."
    if "error" in plan:
        w = _plan_failure_in_words(plan["error"])
        more = (f" On a machine with more memory, `HF_POLYHE_MAX_MEMORY_GIB={_memory_setting(w['memory_gib'])}` "
                "lets the planner use it." if w["memory_gib"] else "")
        return (f"Encrypted inference at 128-bit security: {w['headline']}: {w['detail']}.{more} "
                f"Planner's message: `{plan['error']}`")
    ring = int(plan["ring_dim"]).bit_length() - 1
    boot = "no bootstrapping" if plan["mode"] == "leveled" else "with bootstrapping"
    full = plan["circuits"].get("full", {})
    unit = _unit(task)
    tokens = "tokens (patches and the class token)" if task == "image-classification" else "tokens"
    s = (f"Encrypted inference at 128-bit security (HEStd_128_classic): CKKS ring 2^{ring}, {plan['depth']} "
         f"multiplicative levels, {boot}, {plan['rotation_keys']} rotation keys; predicted ~{_fmt(float(full.get('predicted_seconds', 0)))} s "
         f"per {unit} of {full.get('length')} {tokens} on 2 CPU cores")
    if "decode" in plan["circuits"]:
        s += f", then ~{_fmt(float(plan['circuits']['decode']['predicted_seconds']))} s per further token with the encrypted KV cache"
    s += " (the planner's cost model, measured on a 2-core machine; no keys generated)."
    mem = (plan.get("server_memory_gib") or {}).get("total")
    if mem:
        s += f" Predicted server memory: ~{_fmt(float(mem))} GiB"
        s += (f", over the {_fmt(float(plan.get('memory_limit_gib', 24)))} GiB this machine plans for: this plan needs a bigger "
              f"server (`HF_POLYHE_MAX_MEMORY_GIB` sets the limit)." if plan.get("over_memory_limit") else ".")
    return s


def _export_in_words(check: dict, task: str) -> list:
    """Bullet points: the exported circuit against PyTorch, the 128-bit plan, the measured encrypted run."""
    n = check["samples"]
    what = "next token" if task == "text-generation" else "predicted class"
    lines = [f"- **Exported circuit vs PyTorch** (plain float64 backend, same packing and polynomials as under "
             f"encryption, {n} held-out inputs): max relative error {_fmt(check['max_rel_error_plain_backend'])}; "
             f"same {what} on {round(check['argmax_agreement'] * n)} of {n} (agreement {_fmt(check['argmax_agreement'])}).",
             "- **" + plan_in_words(check.get("plan_128bit") or {}, task).replace(": ", ":** ", 1)]
    enc = check.get("encrypted")
    if enc:
        params = ("INSECURE toy parameters, a quick look only" if enc["insecure"] else f"{enc['params']} parameters")
        lines.append(
            f"- **Measured on ciphertexts** (OpenFHE CKKS, {params}: ring 2^{int(enc['ring_dim']).bit_length() - 1}, "
            f"{enc['levels']} levels, {'with' if enc['mode'] == 'bootstrap' else 'no'} bootstrapping; {enc['samples']} "
            f"held-out input(s)): {_fmt(enc['seconds_per_sample'])} s per input on {_machine()}; max error "
            f"{_fmt(enc['max_err_over_logit_range'])} of the logit range against the plain circuit; same {what} on "
            f"{round(enc['argmax_agreement'] * enc['samples'])} of {enc['samples']} (agreement {_fmt(enc['argmax_agreement'])}).")
    return lines


def how_to_use(task: str, model_dir: str, export_dir: str, example: str, plan: Optional[dict],
               max_length: Optional[int] = None) -> str:
    """A runnable snippet: load the saved model through the Auto classes, predict in the clear, export it and run
    ``pipeline("encrypted-...")`` at 128-bit. ``example``: a prompt / text, or for images Python lines that set
    ``pixel_values`` (a float tensor ``(1, C, H, W)`` prepared as in training)."""
    if plan and "error" in plan:
        w = _plan_failure_in_words(plan["error"])
        note = (f"# This model has no 128-bit plan yet ({w['headline']}; see Evaluation),\n"
                "# so this call raises PlanningError")
        if w["memory_gib"]:
            note += (f"; with ~{w['memory_gib']:.0f} GiB free, set HF_POLYHE_MAX_MEMORY_GIB="
                     f"{_memory_setting(w['memory_gib'])} first")
        note += '.\n# he_params="toy" runs it on INSECURE toy parameters for a look; backend="plain" without encryption.'
    else:
        seconds = ((plan or {}).get("circuits", {}).get("full", {}) or {}).get("predicted_seconds")
        mem = ((plan or {}).get("server_memory_gib") or {}).get("total")
        over = (f".\n# Its server needs ~{mem:.0f} GiB, more than the {(plan or {}).get('memory_limit_gib', 24):.0f} GiB "
                "planned for (see Evaluation): run it on a bigger machine" if mem and (plan or {}).get("over_memory_limit")
                else "")
        note = ("# 128-bit CKKS (OpenFHE); keys are made on first use and cached"
                + (f"; predicted ~{seconds:.0f} s per {_unit(task)} on 2 CPU cores" if seconds else "") + over
                + '.\n# he_params="toy" is an INSECURE quick look; backend="plain" the float64 reference without encryption.')
    head = ["import hf_polyhe  # registers the poly_* models with the Auto classes and the encrypted-* pipelines"]
    load = [f'model_dir = "{model_dir}"  # written by the command under Training',
            f'export_dir = "{export_dir}"']
    if task == "text-generation":
        head.append("from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline")
        body = load + [
            "model = AutoModelForCausalLM.from_pretrained(model_dir)",
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
            f"prompt = {example!r}",
            "",
            "# in the clear: an ordinary transformers model in which every operator is a polynomial",
            'ids = tokenizer(prompt, return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0]))",
            "",
            "# encrypted: the client embeds and encrypts the prompt, the server computes on ciphertexts, the client decrypts",
            "hf_polyhe.save_encrypted_pipeline(model, tokenizer, export_dir)",
            note,
            'generator = pipeline("encrypted-text-generation", model=export_dir, he_params="default")',
            "print(generator(prompt, max_new_tokens=2, do_sample=False)[0][\"generated_text\"])",
        ]
    elif task == "text-classification":
        head.append("from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline")
        body = load + [
            "model = AutoModelForSequenceClassification.from_pretrained(model_dir)",
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
            f"text = {example!r}",
            "",
            "# in the clear",
            f'inputs = tokenizer(text, truncation=True, max_length={max_length}, return_tensors="pt")',
            "print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])",
            "",
            "# encrypted: the client embeds and encrypts the text, the server computes on ciphertexts, the client decrypts",
            f"hf_polyhe.save_encrypted_pipeline(model, tokenizer, export_dir, max_length={max_length})",
            note,
            'classifier = pipeline("encrypted-text-classification", model=export_dir, he_params="default")',
            "result = classifier(text, truncation=True)[0]",
            'print(result["label"], round(result["score"], 3))',
        ]
    elif task == "image-classification":
        head.append("from transformers import AutoModelForImageClassification, pipeline")
        body = load + [
            "model = AutoModelForImageClassification.from_pretrained(model_dir)",
            *example.strip().splitlines(),
            "",
            "# in the clear",
            "print(model.config.id2label[model(pixel_values=pixel_values).logits.argmax(-1).item()])",
            "",
            "# encrypted: the client embeds and encrypts the image, the server computes on ciphertexts, the client decrypts",
            "hf_polyhe.save_encrypted_pipeline(model, None, export_dir)",
            note,
            'classifier = pipeline("encrypted-image-classification", model=export_dir, he_params="default")',
            'print([(r["label"], round(r["score"], 3)) for r in classifier(pixel_values[0].numpy(), top_k=3)])',
        ]
    else:
        raise ValueError(f"no how-to-use snippet for task {task!r}; known: text-generation, text-classification, "
                         "image-classification")
    return "\n".join(head + [""] + body)


def write_model_card(card_dir: str, *, name: str, task: str, metric: CardMetric, results: dict, model, args,
                     data: CardData, example: str, model_dir: str, export: Optional[dict] = None, schedule=None,
                     base_model: Optional[str] = None, extra: str = "") -> str:
    """Write ``card_dir/README.md``, a Hub-form ``huggingface_hub.ModelCard`` with the measured numbers of this run,
    and ``card_dir/results.json`` (every number, machine-readable). Returns the card's path.

    ``results``: the run's rows (export rows from :func:`export_results` included when ``export`` is given);
    ``export``: the :func:`export_check` of this run (shown in words); ``schedule``: the replacement stages of P2
    (``PolyReplacementCallback.schedule``); ``base_model``: the Hub id the run started from, if any;
    ``example`` and ``model_dir``: see :func:`how_to_use`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = model.config
    results = dict(results)
    started = getattr(args, "started_at", None)
    if started is not None:
        results["run wall-clock (s)"] = time.time() - started
        # timings depend on what else ran: a load above the core count means the cores were shared
        results["load average (1 min) when the card was written"] = float(os.getloadavg()[0])
    p0, p2 = results[metric.baseline_key], results[metric.polynomial_key]
    index = dict(task_type=task, dataset_type=data.hub_id or data.local_type or "local", dataset_name=data.name,
                 dataset_config=data.config, dataset_split=data.split, metric_type=metric.type)
    hub_base = base_model if base_model and not os.path.exists(base_model) else None  # a local path is no Hub id
    origin = (f"fine-tuned from [`{hub_base}`](https://huggingface.co/{hub_base}) and converted" if hub_base else
              f"fine-tuned from the local checkpoint `{base_model}` and converted" if base_model else "trained from scratch")
    card_data = ModelCardData(
        model_name=name, license=PROJECT_LICENSE, library_name="transformers", base_model=hub_base,
        datasets=[data.hub_id] if data.hub_id else None, metrics=[metric.type],
        tags=["hf_polyhe", "polynomial", "homomorphic-encryption", "ckks", "openfhe", "privacy", cfg.model_type],
        eval_results=[EvalResult(**index, metric_name=f"P2 fully polynomial ({metric.type})",
                                 metric_value=float(_fmt(float(p2)))),
                      EvalResult(**index, metric_name=f"P0 exact baseline, same training budget ({metric.type})",
                                 metric_value=float(_fmt(float(p0))))],
        inference=False,  # no widget: running the model needs the hf_polyhe package (and keys, encrypted)
    )
    export_dir = (export or {}).get("export_dir") or os.path.join(args.output_dir, "export")
    plan = (export or {}).get("plan_128bit")
    snippet = how_to_use(task, model_dir, export_dir, example, plan, getattr(args, "max_length", None))
    preset = "tiny preset" if args.tiny else "full run"
    arch = (f"{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, {cfg.num_attention_heads} heads, MLP "
            f"{cfg.intermediate_size}, {model.num_parameters():,} parameters; attention `{cfg.attention_type}` "
            f"{_attention_words(cfg)}; norm `{cfg.norm_type}` ({_NORM_WORDS.get(cfg.norm_type, cfg.norm_type)}); "
            f"MLP activation `{cfg.hidden_act}`")
    quality = {k: v for k, v in results.items()
               if not k.startswith(EXPORT_ROW_PREFIXES) and not k.startswith(("training steps", "run wall-clock", "load average"))}
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in quality.items())
    steps = next((f"{k}: {v}" for k, v in results.items() if k.startswith("training steps")), "")
    stages = "; ".join(f"{s.describe()} from step {s.start}" + (f" (blended in over {s.ramp_steps} steps)" if s.ramp_steps else "")
                       for s in (schedule or []))
    n_ops = len(hf_polyhe.polynomial_status(model).operators)
    encrypted_lines = _export_in_words(export, task) if export else [
        "- Not exported in this run (`--export` exports the model, checks the circuit and adds its 128-bit plan here)."]
    local_data = "" if data.hub_id else (" The data is not on the Hub: it ships with the package named above, so the "
                                         "card lists no `datasets`.")
    bound_words = (f"bound B = {args.bound}" if args.bound is not None else
                   "target per operator: half the largest |x| of each batch, `RangeLossConfig`'s default")
    wall = ""
    if "run wall-clock (s)" in results:
        load = results["load average (1 min) when the card was written"]
        shared = (": other jobs shared the cores, so the timings on this card are slower than on an idle machine"
                  if load > (os.cpu_count() or 1) else "")
        wall = (f" Wall-clock time of this run until the card was written: {_fmt(results['run wall-clock (s)'])} s on "
                f"{_machine()} (1-minute load average then {_fmt(load)}{shared}).")
    if args.tiny:
        scope = ("This tiny preset is a smoke-scale model for trying the workflow (Auto classes, export, encrypted "
                 "pipeline) and for the comparison between the exact baseline (P0) and the polynomial model (P2) under "
                 "the same training budget.")
        not_for = f"any use that needs a good {task.replace('-', ' ')} model (its quality is smoke-scale); "
        quality_note = ("A smoke-scale model trained for minutes on a small offline data set: its absolute quality is "
                        "low; the comparison between P0 and P2 under the same budget is the point.")
    else:
        scope = "This run reproduces one of the paper's experiments at full scale."
        not_for = ""
        quality_note = "Trained once, with one seed: the numbers vary with the seed."
    encrypted_text = "\n".join(encrypted_lines)
    chooses = ", and chooses each next token from the decrypted logits" if task == "text-generation" else ""
    content = f"""---
{card_data.to_yaml()}
---

# {name}

## Model description

A fully polynomial {cfg.model_type} for {task.replace('-', ' ')}: every operation of its forward pass (attention,
norms, activations) is a polynomial, so it can run on CKKS-encrypted inputs (OpenFHE). It was {origin} by the
`hf_polyhe` recipe `{args.recipe}` ({preset}), which follows {PAPER} with progressive replacement of the
non-polynomial operators.

Architecture: {arch}.

License: {PROJECT_LICENSE} (the project's); the training data has its own licence (see Training). Library:
`transformers` with the `hf_polyhe` plugin (this project, Python 3.10), whose import registers the model type with
the Auto classes.

## Intended use

Research and demonstration of private inference: a model owner serves predictions on inputs it never sees in the
clear; the client encrypts its {_unit(task)}, the server computes on ciphertexts, the client decrypts. {scope}

Out of scope: decisions about people or anything safety-relevant; {not_for}inputs unlike the training data (the polynomials are accurate only on the input ranges calibrated during
training); claims of security beyond the threat model below; the INSECURE toy parameters for anything but a quick
look.

## How to use

Paths are those of the command under Training (relative to the directory it ran in); with the model files uploaded
beside this card, this repository's id works as `model_dir` too.

```python
{snippet}
```

`hf-polyhe serve EXPORT_DIR` serves the export over HTTP; `pipeline(..., server_url=...)` then keeps the secret
key on the client.

## Training

Data: {data.description} Licence of the data: {data.licence}.{local_data}

Method (P0 → P1 → P2):
- **P0**, the baseline: softmax attention, exact LayerNorm (or the pretrained model's own operators).
- **P1**, the HE-friendly architecture with exact operators, trained with the range loss (α = {args.alpha},
  {bound_words}) and the LayerNorm variance loss (β = {args.beta}; target: each batch's variance range contracted to
  the square root of its max / min ratio), which keep the inputs of every non-polynomial operator in a small interval.
- **P2**, P1 trained on while `PolyReplacementCallback` replaces the operators by polynomials fitted on ranges
  calibrated in eval mode on training batches, layer by layer: {stages or 'see the recipe'}. Operators whose inputs
  drifted outside their interval by the end of training are refitted; the result is fully polynomial ({n_ops}
  operators, table below).

Schedule: {steps}; batch size {args.batch_size}; AdamW, learning rate {args.lr} (P2: ×{args.poly_lr_scale}),
cosine decay with 5% warm-up, weight decay 0.01; seed {args.seed}; hf_polyhe {hf_polyhe.__version__}, transformers
{transformers.__version__}, torch {torch.__version__}.{wall}

Command:

```bash
{args.command}
```

## Evaluation

Metric: {metric.name}; data: {data.name}, {data.split} split. P0 = exact baseline with the same training budget
(optimizer steps) as P2; P1 = HE-friendly architecture, exact operators, after its own steps (where P2 starts);
"P1 ... same total steps as P2" = a copy of P1 trained on for P2's steps exactly as P2 (learning rate, range loss,
data order) but with exact operators, so that it differs from P2 only by the polynomials; P2 = fully polynomial
(this model).

| quantity | value |
|---|---|
{table}

Encrypted inference:

{encrypted_text}

`hf-polyhe inspect EXPORT_DIR` prints the planner's full report.

## Polynomial operators

Input ranges calibrated on training data; levels = multiplicative depth the polynomial costs under CKKS.

{operator_table(model)}

{extra}

## Threat model

The client holds the secret key, its input and the embedding tables it needs to embed it{chooses};
the server holds the remaining weights and receives only ciphertexts and public evaluation keys (no server bundle
ever contains a secret key). The server learns the model's public shape facts: the input length, the number of
generated tokens, timing. Security is 128-bit (HE standard, enforced by OpenFHE) by default; toy parameters must be
asked for by name and are INSECURE.

## Limitations

- {quality_note}
- Polynomials are accurate only inside their calibrated intervals: inputs far outside them (distribution shift)
  degrade outputs, and under encryption nothing clips them.
- Encrypted inference is slow (seconds to minutes per input on CPUs, see Evaluation) and memory-hungry; the
  predicted latencies are the planner's cost model, not measurements, unless a row says "measured".
- Encrypted results match the plain polynomial circuit to CKKS precision, not bit for bit.

## Citation

```bibtex
{BIBTEX}
```
"""
    os.makedirs(card_dir, exist_ok=True)
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", content))  # no blank runs where an optional part is empty
    path = os.path.join(card_dir, "README.md")
    card.save(path)
    with open(os.path.join(card_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return path


def quiet_transformers():
    transformers.logging.set_verbosity_warning()


def timed(fn: Callable, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t
