"""Quality of progressive polynomial replacement on real text (a benchmark, not a test).

Trains a small GPT on the CPython language reference (``load_python_docs_corpus()``, ~450k characters of
English prose shipped inside Python, so it runs offline), split into train / held-out by paragraph, the same
number of steps in each configuration:

- **P0**: softmax attention + LayerNorm (the baseline);
- **P1**: HE-friendly architecture (pointwise attention scaled by 1/sqrt(L), LayerNorm with a PolyOperator
  1/sqrt) with exact operators, trained with the range + variance loss;
- **P1 one-shot**: P1 with every operator swapped for its polynomial at once after training (no retraining;
  the seed paper's final-substitution step);
- **P2**: the P1 recipe with ``PolyReplacementCallback`` replacing operators progressively during training
  (fully polynomial at the end);
- **P2 no range loss**: P2 with alpha = beta = 0.

It prints a markdown table: held-out perplexity, P/P0 ratio, the fraction of the P2 - P0 gap that
P2 - P1 accounts for, and what the operator inputs did on held-out data relative to the fitted intervals.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/poly_quality.py --layers 4 --hidden 128 --steps 400
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.data import load_python_docs_corpus, lm_blocks, split_paragraphs, train_test_split, train_tokenizer  # noqa: E402
from hf_polyhe.training import (  # noqa: E402
    DEFAULT_MARGIN,
    PolyReplacementCallback,
    PolyTrainer,
    RangeLossConfig,
    calibrate,
    margin_for,
    schedule_by_layer,
    schedule_by_operator,
    widen_interval,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="tokens per block")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per configuration")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--attention-activation", default="gelu")
    p.add_argument("--hidden-act", default="gelu_new")
    p.add_argument("--degree", type=int, default=None, help="polynomial degree (default: the library's per op)")
    p.add_argument("--alpha", type=float, default=1e-2, help="range loss weight")
    p.add_argument("--bound", type=float, default=10.0, help="range loss bound B")
    p.add_argument("--attn-bound", type=float, default=None, help="B for attention scores (default: --bound)")
    p.add_argument("--beta", type=float, default=1e-3, help="variance loss weight")
    p.add_argument("--max-variance", type=float, default=50.0)
    p.add_argument("--margin", type=float, default=None,
                   help="relative widening of measured ranges before fitting (default: the callback's DEFAULT_MARGIN)")
    p.add_argument("--schedule", choices=("layer", "operator"), default="layer")
    p.add_argument("--replace-start", type=float, default=0.5, help="first stage, as a fraction of --steps")
    p.add_argument("--replace-end", type=float, default=0.8, help="last stage done, as a fraction of --steps")
    p.add_argument("--eval-blocks", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="subset of runs: P0 P1 P2 P2norl")
    return p.parse_args(argv)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = torch.tensor(self.blocks[i])
        return {"input_ids": ids, "labels": ids}


def margin(args):
    return DEFAULT_MARGIN if args.margin is None else args.margin


def make_config(args, tok, he: bool):
    return hf_polyhe.PolyGPTConfig(
        vocab_size=len(tok), max_position_embeddings=args.seq, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        hidden_act=args.hidden_act, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
        attention_type="pointwise" if he else "softmax", attention_activation=args.attention_activation,
        norm_type="poly_layernorm" if he else "layernorm", pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, use_cache=False,
        **({"poly_degree": args.degree} if args.degree else {}),
    )


@torch.no_grad()
def perplexity(model, blocks, batch=16):
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = torch.tensor(blocks[i : i + batch])
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll, n = nll + float(loss), n + ids[:, 1:].numel()
    return math.exp(nll / n) if math.isfinite(nll) else float("inf")


@torch.no_grad()
def out_of_range(model, blocks, batch=16):
    """Held-out inputs vs the fitted intervals: fraction of elements outside, worst overshoot (|x| / bound)."""
    ops = hf_polyhe.status.select_operators(model)
    counts = {"out": 0, "all": 0, "worst": 0.0}

    def hook(module, args):
        x = args[0]
        lo, hi = module.interval
        counts["out"] += int(((x < lo) | (x > hi)).sum())
        counts["all"] += x.numel()
        scale = max(abs(lo), abs(hi))
        counts["worst"] = max(counts["worst"], float(x.abs().max()) / scale if module.op not in ("inv_sqrt",) else float(x.max()) / hi)

    handles = [op.register_forward_pre_hook(hook) for op in ops.values()]
    model.eval()
    for i in range(0, len(blocks), batch):
        model(input_ids=torch.tensor(blocks[i : i + batch]))
    for h in handles:
        h.remove()
    return counts["out"] / max(counts["all"], 1), counts["worst"]


def train(args, tok, train_blocks, *, he: bool, range_loss: bool, replace: bool, out_dir: str):
    torch.manual_seed(args.seed)
    model = hf_polyhe.PolyGPTForCausalLM(make_config(args, tok, he))
    callbacks = []
    if replace:
        start = int(args.steps * args.replace_start)
        n_stages = args.layers if args.schedule == "layer" else 4
        every = max(1, int(args.steps * (args.replace_end - args.replace_start)) // n_stages)
        ramp = max(1, every // 2)
        schedule = (schedule_by_layer(args.layers, start, every, ramp_steps=ramp) if args.schedule == "layer"
                    else schedule_by_operator(start, every, roles=("mlp_act", "attn_act", "norm", ("attn_norm", "pooler_act")), ramp_steps=ramp))
        callbacks.append(PolyReplacementCallback(schedule, window=8, margin=margin(args)))
    rl = None
    if he and range_loss:
        rl = RangeLossConfig(alpha=args.alpha, bound=args.bound, beta=args.beta, max_variance=args.max_variance,
                             bounds={"attn_act": args.attn_bound} if args.attn_bound else None)
    targs = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), weight_decay=0.1, logging_steps=max(1, args.steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    trainer = PolyTrainer(model=model, args=targs, train_dataset=Blocks(train_blocks), callbacks=callbacks, range_loss=rl)
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, (callbacks[0] if callbacks else None), time.time() - t0, logs


def fmt_ratio(x):
    return f"{x:.3f}" if math.isfinite(x) else "inf"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    t_start = time.time()
    train_paras, test_paras = train_test_split(split_paragraphs(load_python_docs_corpus()), test_fraction=0.1, seed=args.seed)
    tok = train_tokenizer(train_paras, vocab_size=args.vocab, model_max_length=args.seq)
    train_blocks = lm_blocks(tok, train_paras, args.seq)
    test_blocks = lm_blocks(tok, test_paras, args.seq, max_blocks=args.eval_blocks)
    print(f"corpus: {len(train_paras)} train / {len(test_paras)} held-out paragraphs; {len(train_blocks)} train blocks "
          f"x {args.seq} tokens, {len(test_blocks)} held-out blocks; vocab {len(tok)}", flush=True)
    out_root = os.path.join("/tmp", f"poly_quality_{os.getpid()}")
    runs = args.only or ["P0", "P1", "P2", "P2norl"]
    res = {}
    notes = {}

    if "P0" in runs:
        m, _, dt, _ = train(args, tok, train_blocks, he=False, range_loss=False, replace=False, out_dir=out_root + "/p0")
        res["P0"] = perplexity(m, test_blocks)
        print(f"P0 done in {dt:.0f}s: ppl {res['P0']:.2f}", flush=True)
    if "P1" in runs:
        m, _, dt, _ = train(args, tok, train_blocks, he=True, range_loss=True, replace=False, out_dir=out_root + "/p1")
        res["P1"] = perplexity(m, test_blocks)
        print(f"P1 done in {dt:.0f}s: ppl {res['P1']:.2f}", flush=True)
        # one-shot: calibrate on training blocks, fit every operator, switch all at once (no retraining)
        cal = calibrate(m, torch.utils.data.DataLoader(Blocks(train_blocks[:64]), batch_size=16))
        print(cal.report(bound=args.bound), flush=True)
        ranges = {p: widen_interval(m.get_submodule(p).op, r.lo, r.hi, margin_for(margin(args), m.get_submodule(p)))
                  for p, r in cal.ranges().items()}
        hf_polyhe.to_polynomial(m, ranges=ranges)
        res["P1 one-shot"] = perplexity(m, test_blocks)
        notes["P1 one-shot"] = out_of_range(m, test_blocks)
        print(f"P1 one-shot: ppl {res['P1 one-shot']:.2f}", flush=True)
    for name, rl in (("P2", True), ("P2norl", False)):
        if name not in runs:
            continue
        m, cb, dt, logs = train(args, tok, train_blocks, he=True, range_loss=rl, replace=True, out_dir=out_root + "/" + name)
        status = hf_polyhe.polynomial_status(m)
        assert status.is_polynomial, str(status)
        res[name] = perplexity(m, test_blocks)
        notes[name] = out_of_range(m, test_blocks)
        widest = max((max(abs(h["measured"][0]), abs(h["measured"][1])) for h in cb.history
                      if h["measured"] and h["op"] != "inv_sqrt"), default=float("nan"))
        max_var = max((h["measured"][1] for h in cb.history if h["measured"] and h["op"] == "inv_sqrt"), default=float("nan"))
        notes[name + "_ranges"] = (widest, max_var)
        print(f"{name} done in {dt:.0f}s: ppl {res[name]:.2f}; widest activation range {widest:.3g}, max variance {max_var:.3g}", flush=True)
        print(cb.fit_report(), flush=True)
        print("loss log:", [(h["step"], round(h["loss"], 3), h.get("poly/fraction_polynomial")) for h in logs], flush=True)

    p0, p1, p2 = res.get("P0", float("nan")), res.get("P1", float("nan")), res.get("P2", float("nan"))
    print()
    print(f"## Held-out perplexity, {args.layers}-layer GPT (d={args.hidden}), {args.steps} steps x {args.batch} x {args.seq} tokens")
    print()
    print("| model | ppl | ppl / P0 | fully polynomial | held-out inputs outside fitted interval | worst |x| / interval bound |")
    print("|---|---|---|---|---|---|")
    labels = {"P0": "P0 softmax + LayerNorm", "P1": "P1 HE-friendly, exact ops (range loss)",
              "P1 one-shot": "P1 -> all polynomial at once (no retraining)", "P2": "P2 progressive replacement (range loss)",
              "P2norl": "P2 progressive, no range loss"}
    for k in ("P0", "P1", "P1 one-shot", "P2", "P2norl"):
        if k not in res:
            continue
        poly = "yes" if k in ("P1 one-shot", "P2", "P2norl") else "no"
        frac, worst = notes.get(k, (None, None))
        o = f"{100 * frac:.4f}%" if frac is not None else "-"
        w = f"{worst:.2f}" if worst is not None else "-"
        print(f"| {labels[k]} | {res[k]:.2f} | {fmt_ratio(res[k] / p0)} | {poly} | {o} | {w} |")
    print()
    if all(math.isfinite(v) for v in (p0, p1, p2)):
        gap = (p2 - p1) / (p2 - p0) if p2 != p0 else float("nan")
        print(f"P2 / P0 = {p2 / p0:.3f} (target <= 1.05, stretch <= 1.03); (P2 - P1) / (P2 - P0) = {gap:.2f} "
              f"(target <= 0.25)")
        if "P1 one-shot" in res:
            p1s = res["P1 one-shot"]
            print(f"one-shot replacement: (P1one-shot - P1) / (P1one-shot - P0) = {(p1s - p1) / (p1s - p0):.2f}")
    for k in ("P2", "P2norl"):
        if k + "_ranges" in notes:
            w, v = notes[k + "_ranges"]
            print(f"{k}: widest calibrated activation input |x| = {w:.3g}, largest LayerNorm variance = {v:.3g}")
    print(f"total time {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
