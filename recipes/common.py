"""What the three recipes share: arguments (CLI + YAML), training with the range loss and progressive
replacement, evaluation, export check, and the model card.

The method of every recipe (Zimerman et al., ICML 2024, with progressive replacement):

1. **P0** -- the baseline (softmax attention, exact LayerNorm), trained or converted.
2. **P1** -- the HE-friendly architecture (pointwise attention, polynomial-ready norms) trained with the
   range loss (and LayerNorm variance loss), operators still exact.
3. **P2** -- P1 trained on with :class:`~hf_polyhe.training.PolyReplacementCallback`, which replaces
   operators layer by layer on calibrated ranges until the model is fully polynomial.
4. Evaluate P0 vs P2, optionally export with ``save_encrypted_pipeline`` and check the exported circuit on
   a few samples, and write a model card with the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
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
    p.add_argument("--steps", type=int, default=None, help="training steps of P0 and of P1 each")
    p.add_argument("--poly-steps", type=int, default=None, help="steps of progressive replacement (P2)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--poly-lr-scale", type=float, default=0.2, help="learning rate of P2 relative to --lr")
    p.add_argument("--degree", type=int, default=None, help="polynomial degree (default: per operator)")
    p.add_argument("--alpha", type=float, default=1e-2, help="range loss weight")
    p.add_argument("--beta", type=float, default=1e-3, help="LayerNorm variance loss weight")
    p.add_argument("--bound", type=float, default=8.0, help="B of the range loss")
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
    return args


def training_arguments(args, output_dir: str, steps: int, lr: Optional[float] = None, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr or args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=args.use_cpu or not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=False, **extra,
    )


def train_exact(model, train_dataset, args, output_dir, steps, data_collator=None, range_loss=True):
    """P0 / P1: exact operators (P1 with the range + variance losses)."""
    rl = RangeLossConfig(alpha=args.alpha, beta=args.beta, bound=args.bound) if range_loss else None
    trainer = PolyTrainer(model=model, args=training_arguments(args, output_dir, steps), train_dataset=train_dataset,
                          data_collator=data_collator, range_loss=rl)
    trainer.train()
    return trainer


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


def export_results(check: dict, agreement_name: str = "argmax agreement") -> dict:
    """The model-card rows of an :func:`export_check`."""
    rows = {"export: max rel. error of circuit (plain backend) vs torch": check["max_rel_error_plain_backend"],
            f"export: {agreement_name}": check["argmax_agreement"]}
    plan = check.get("plan_128bit") or {}
    if "error" in plan:
        rows["128-bit plan"] = "none: " + plan["error"].split(";")[0]
    elif plan:
        full = plan["circuits"].get("full", {})
        rows["128-bit plan (HEStd_128_classic)"] = (f"ring 2^{int(plan['ring_dim']).bit_length() - 1}, depth {plan['depth']}, "
                                                    f"{plan['mode']}, {plan['rotation_keys']} rotation keys")
        rows["128-bit predicted latency, one input of length %s (s)" % full.get("length")] = float(full.get("predicted_seconds", 0))
    enc = check.get("encrypted")
    if enc:
        tag = "toy params, INSECURE" if enc["insecure"] else enc["params"]
        rows[f"encrypted ({tag}): ring / levels / mode"] = f"2^{int(enc['ring_dim']).bit_length() - 1} / {enc['levels']} / {enc['mode']}"
        rows[f"encrypted ({tag}): measured seconds per input (mean of {enc['samples']})"] = enc["seconds_per_sample"]
        rows[f"encrypted ({tag}): max error / logit range vs plain circuit"] = enc["max_err_over_logit_range"]
        rows[f"encrypted ({tag}): argmax agreement"] = enc["argmax_agreement"]
    return rows


def operator_table(model) -> str:
    rows = ["| operator | op | interval | degree | depth | max error |", "|---|---|---|---|---|---|"]
    for o in hf_polyhe.polynomial_status(model).operators:
        iv = f"[{o.interval[0]:.3g}, {o.interval[1]:.3g}]" if o.interval else "-"
        err = f"{o.max_error:.2e}" if o.max_error is not None else "-"
        rows.append(f"| `{o.path}` | {o.op} | {iv} | {o.degree} | {o.depth} | {err} |")
    return "\n".join(rows)


def write_model_card(card_dir: str, *, name: str, task: str, metric: str, results: dict, model, args,
                     data_desc: str, extra: str = "") -> str:
    """A ``huggingface_hub.ModelCard`` with the measured numbers of this run."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = model.config
    data = ModelCardData(library_name="transformers", tags=["hf_polyhe", "polynomial", "homomorphic-encryption", "ckks"],
                         pipeline_tag=task)
    table = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items())
    arch = (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, MLP "
            f"{cfg.intermediate_size}; attention `{cfg.attention_type}` (σ = `{cfg.attention_activation}`, scaling "
            f"`{cfg.attention_scaling}` {cfg.attention_scaling_position}); norm `{cfg.norm_type}`; MLP act `{cfg.hidden_act}`")
    content = f"""---
{data.to_yaml()}
---

# {name}

A fully polynomial {cfg.model_type} produced by the `hf_polyhe` recipe `{args.recipe}` ({'tiny preset' if args.tiny else 'full run'}),
so that it can be evaluated on CKKS-encrypted inputs (OpenFHE) with `hf_polyhe.save_encrypted_pipeline`.

## Architecture

{arch}.

## Data

{data_desc}

## Results (measured by this run)

| quantity | value |
|---|---|
{table}

P0 = baseline (softmax, exact LayerNorm), P1 = HE-friendly architecture with exact operators trained with the
range/variance loss, P2 = after progressive polynomial replacement (fully polynomial). Metric: {metric}.

## Polynomial operators (ranges calibrated on training data)

{operator_table(model)}

{extra}

## Encrypted inference

Exported circuits run on CKKS with 128-bit parameters (HEStd_128_classic) by default. The rows starting with
`128-bit` in the table above are the planner's (ring dimension, depth, rotation keys, predicted latency from the
cost table measured on a 2-core machine, no keys generated); rows starting with `encrypted` were measured on
ciphertexts by this run (`--encrypted-samples`), with the parameters they name. `hf-polyhe inspect EXPORT_DIR`
prints the full report.

## Threat model

The client holds the secret key, its input and the embedding tables; the server holds the remaining weights and
sees only ciphertexts and evaluation keys. The model's architecture and the input length are visible to the server.

## Limitations

Tiny presets are smoke-scale models trained for minutes on 2 CPU cores: their absolute quality is low; the
comparison between P0 and P2 under the same budget is the point. Polynomials are accurate only inside their
calibrated intervals; inputs far outside them (distribution shift) degrade outputs.

Command: `{args.command}`
"""
    os.makedirs(card_dir, exist_ok=True)
    card = ModelCard(content)
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
