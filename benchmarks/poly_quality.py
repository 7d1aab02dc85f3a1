"""Quality of progressive polynomial replacement on real text, against the stock HF model (a benchmark, not a test).

Trains small GPTs on the CPython language reference (``load_python_docs_corpus()``, ~450k characters of English
prose shipped inside Python, so it runs offline), the same steps, batch and schedule in each configuration, over
several seeds (each seed: its own train / held-out split, init and data order), and evaluates on two held-out sets:
paragraphs of the reference that training never saw (same source), and the standard library's docstrings
(``load_stdlib_docstrings_corpus()``: another source, other authors; paragraphs also in training removed).

- **P0**: a stock ``transformers.GPT2LMHeadModel`` of the same size, trained with the plain ``Trainer`` (the
  baseline every ratio uses);
- **P0poly**: PolyGPT with softmax attention and LayerNorm (is our own model code as good as GPT-2's?);
- **P1**: HE-friendly architecture (pointwise attention scaled by the length, LayerNorm with a PolyOperator
  1/sqrt) with exact operators, trained with the range + variance loss;
- **P1oneshot**: P1 with every operator swapped for its polynomial at once after training (no retraining);
- **P1norl**, **P1norloneshot**: P1 and its one-shot conversion with alpha = beta = 0 (no range / variance loss;
  run with ``--degrees`` or ``--only P1norl``);
- **P2**: the P1 recipe with ``PolyReplacementCallback`` replacing operators progressively during training
  (fully polynomial at the end); **P2norl**: P2 with alpha = beta = 0.

``--degrees 15,7,3`` makes it the ablation grid (range loss on / off x degree x one-shot / progressive): P0, P1 and
P1norl are trained once per seed, the one-shot conversions and P2 / P2norl once per degree, and a second table gives
each cell's held-out perplexity (other source) / P0 and its non-finite blocks.

It prints a markdown table: held-out perplexity (mean ± sd over seeds; inf when a block's loss is not finite), the
ratio to P0 (per seed, then mean ± sd), and the blocks with a non-finite loss per seed (other + same source).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/poly_quality.py --layers 4 --hidden 128 --steps 400 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.data import (  # noqa: E402
    load_python_docs_corpus,
    load_stdlib_docstrings_corpus,
    lm_blocks,
    split_paragraphs,
    train_test_split,
    train_tokenizer,
)
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
    p.add_argument("--degrees", default=None,
                   help="ablation grid: a comma list of degrees (e.g. 15,7,3); per degree, P1 and P1norl made polynomial "
                   "at once and P2 / P2norl trained at that degree (P0, P1, P1norl are trained once per seed)")
    p.add_argument("--alpha", type=float, default=1e-2, help="range loss weight")
    p.add_argument("--bound", type=float, default=None,
                   help="range loss bound B (default: targets measured on each batch, see RangeLossConfig)")
    p.add_argument("--attn-bound", type=float, default=None, help="B for attention scores (default: --bound)")
    p.add_argument("--beta", type=float, default=1e-3, help="variance loss weight")
    p.add_argument("--max-variance", type=float, default=None, help="V (default: measured targets)")
    p.add_argument("--margin", type=float, default=None,
                   help="relative widening of measured ranges before fitting (default: the callback's DEFAULT_MARGIN)")
    p.add_argument("--schedule", choices=("layer", "operator"), default="layer")
    p.add_argument("--replace-start", type=float, default=0.5, help="first stage, as a fraction of --steps")
    p.add_argument("--replace-end", type=float, default=0.8, help="last stage done, as a fraction of --steps")
    p.add_argument("--eval-blocks", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (data split, init, data order)")
    p.add_argument("--only", nargs="*", default=None, help="subset of runs: P0 P0poly P1 P1norl P2 P2norl (P1 and "
                   "P1norl include their one-shot conversions)")
    args = p.parse_args(argv)
    args.degree_list = list(dict.fromkeys(int(d) for d in args.degrees.split(","))) if args.degrees else [args.degree]
    if args.degrees and args.degree:
        p.error("give --degree or --degrees, not both")
    return args


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


def training_args(args, out_dir):
    return TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), weight_decay=0.1, logging_steps=max(1, args.steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
        max_grad_norm=1.0,
    )


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
    trainer = PolyTrainer(model=model, args=training_args(args, out_dir), train_dataset=Blocks(train_blocks), callbacks=callbacks, range_loss=rl)
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, (callbacks[0] if callbacks else None), time.time() - t0, logs


def fmt_ratio(x):
    return f"{x:.3f}" if math.isfinite(x) else "inf"


def train_stock(args, tok, train_blocks, out_dir):
    """P0: a stock ``transformers.GPT2LMHeadModel`` of the same size, trained with the plain ``Trainer`` and the
    same arguments (GPT-2's own init, tied embeddings, softmax attention, LayerNorm)."""
    torch.manual_seed(args.seed)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                                  n_head=args.heads, n_inner=4 * args.hidden, activation_function=args.hidden_act,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg)
    trainer = transformers.Trainer(model=model, args=training_args(args, out_dir), train_dataset=Blocks(train_blocks))
    t0 = time.time()
    trainer.train()
    return model, time.time() - t0


@torch.no_grad()
def block_losses(model, blocks, batch=16):
    """Mean next-token loss of every block (float; non-finite where the model returned inf / NaN)."""
    model.eval()
    out = []
    for i in range(0, len(blocks), batch):
        ids = torch.tensor(blocks[i : i + batch])
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(-1)
        out += loss.tolist()
    return out


def evaluate(model, sets: dict) -> dict:
    """Per held-out set: perplexity over all blocks (inf when any block is not finite) and non-finite blocks."""
    res = {}
    for name, blocks in sets.items():
        losses = block_losses(model, blocks)
        bad = sum(not math.isfinite(v) for v in losses)
        res[name] = (math.exp(sum(losses) / len(losses)) if bad == 0 else float("inf"), bad)
    return res


def run_seed(args, out_root) -> dict:
    """Every configuration of ``args.only`` for ``args.seed``: {config: {held-out set: (ppl, bad blocks)}}."""
    train_paras, test_paras = train_test_split(split_paragraphs(load_python_docs_corpus()), test_fraction=0.1,
                                               seed=args.seed)
    tok = train_tokenizer(train_paras, vocab_size=args.vocab, model_max_length=args.seq)
    train_blocks = lm_blocks(tok, train_paras, args.seq)
    seen = set(train_paras)
    other = [p for p in split_paragraphs(load_stdlib_docstrings_corpus()) if p not in seen]
    sets = {"same source": lm_blocks(tok, test_paras, args.seq, max_blocks=args.eval_blocks),
            "other source": lm_blocks(tok, other, args.seq, max_blocks=args.eval_blocks)}
    print(f"seed {args.seed}: {len(train_blocks)} train blocks x {args.seq} tokens; held-out blocks: "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), flush=True)
    runs = args.only or [k for k in RUNS if args.degrees or k != "P1norl"]  # P1norl: the grid's (or asked for)
    res, out = {}, os.path.join(out_root, f"seed{args.seed}")
    if "P0" in runs:
        m, dt = train_stock(args, tok, train_blocks, out + "/p0")
        res["P0"] = evaluate(m, sets)
        print(f"  P0 stock GPT-2 {dt:.0f}s: {res['P0']}", flush=True)
    if "P0poly" in runs:
        m, _, dt, _ = train(args, tok, train_blocks, he=False, range_loss=False, replace=False, out_dir=out + "/p0poly")
        res["P0poly"] = evaluate(m, sets)
        print(f"  P0poly {dt:.0f}s: {res['P0poly']}", flush=True)
    for name, rl in (("P1", True), ("P1norl", False)):
        if name not in runs:
            continue
        m, _, dt, _ = train(args, tok, train_blocks, he=True, range_loss=rl, replace=False, out_dir=out + "/" + name)
        res[name] = evaluate(m, sets)
        print(f"  {name} {dt:.0f}s: {res[name]}", flush=True)
        # one-shot: calibrate on training blocks, fit every operator, switch all at once (no retraining)
        cal = calibrate(m, torch.utils.data.DataLoader(Blocks(train_blocks[:1024]), batch_size=16))  # as the callback's final pass
        ranges = {p: widen_interval(m.get_submodule(p).op, r.lo, r.hi, margin_for(margin(args), m.get_submodule(p)))
                  for p, r in cal.ranges().items()}
        for degree in args.degree_list:
            poly = copy.deepcopy(m)
            hf_polyhe.to_polynomial(poly, ranges=ranges, degree=degree)
            key = name + "oneshot" + degree_tag(args, degree)
            res[key] = evaluate(poly, sets)
            print(f"  {key}: {res[key]}", flush=True)
    for degree in args.degree_list:
        args.degree = degree
        for name, rl in (("P2", True), ("P2norl", False)):
            if name not in runs:
                continue
            key = name + degree_tag(args, degree)
            m, _, dt, _ = train(args, tok, train_blocks, he=True, range_loss=rl, replace=True, out_dir=out + "/" + key.replace(" ", "_"))
            if not hf_polyhe.polynomial_status(m).is_polynomial:
                print(f"  {key}: not fully polynomial after training:\n{hf_polyhe.polynomial_status(m)}", flush=True)
            res[key] = evaluate(m, sets)
            ops = hf_polyhe.polynomial_status(m).operators
            print(f"  {key} {dt:.0f}s: {res[key]}; operator depth max {max(o.depth or 0 for o in ops)}, "
                  f"sum {sum(o.depth or 0 for o in ops)} (levels the polynomials take in one forward pass)", flush=True)
    args.degree = None if args.degrees else args.degree
    return res


def degree_tag(args, degree) -> str:
    """The suffix of a result's key: `` d7`` in an ablation grid (``--degrees``), nothing otherwise."""
    return f" d{degree}" if args.degrees and degree is not None else ""


RUNS = {"P0": "P0 stock GPT2LMHeadModel (softmax, LayerNorm)", "P0poly": "PolyGPT softmax + LayerNorm",
        "P1": "P1 HE-friendly, exact ops (range loss)", "P1oneshot": "P1 -> all polynomial at once, no retraining",
        "P1norl": "P1 HE-friendly, exact ops, no range loss",
        "P1norloneshot": "P1norl -> all polynomial at once, no retraining",
        "P2": "P2 progressive replacement (range loss)", "P2norl": "P2 progressive, no range loss"}
# the ablation grid (--degrees): per degree, (range loss on, off) for one-shot and progressive replacement
GRID = (("one-shot (P1 / P1norl, no retraining)", "P1oneshot", "P1norloneshot"),
        ("progressive (P2 / P2norl)", "P2", "P2norl"))


def mean_sd(xs):
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "inf"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}" if m < 10 else f"{m:.1f} ± {sd:.1f}"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    t_start = time.time()
    out_root = os.path.join("/tmp", f"poly_quality_{os.getpid()}")
    seeds = [int(s) for s in str(args.seeds).split(",")]
    per_seed = {}
    for seed in seeds:
        args.seed = seed
        per_seed[seed] = run_seed(args, out_root)
    print()
    print(f"## Held-out perplexity, {args.layers}-layer GPT (d={args.hidden}, {args.heads} heads), {args.steps} steps x "
          f"{args.batch} x {args.seq} tokens, seeds {seeds} (mean ± sd over seeds; ratio: per seed to that seed's P0)")
    print()
    sets = ("other source", "same source")
    print("| model | " + " | ".join(f"ppl {s} | / P0 {s}" for s in sets) + " | non-finite blocks (per seed) |")
    print("|---|" + "---|---|" * len(sets) + "---|")
    per_degree = {k for _, on, off in GRID for k in (on, off)}
    keys = [(k + degree_tag(args, d), label + (f", degree {d}" if args.degrees and d is not None else ""))
            for k, label in RUNS.items() for d in (args.degree_list if k in per_degree else [None])]
    for k, label in keys:
        rows = [per_seed[s][k] for s in seeds if k in per_seed[s]]
        if not rows:
            continue
        cells = []
        for st in sets:
            cells.append(mean_sd([r[st][0] for r in rows]))
            if all("P0" in per_seed[s] for s in seeds):
                cells.append(mean_sd([per_seed[s][k][st][0] / per_seed[s]["P0"][st][0] for s in seeds]))
            else:
                cells.append("-")
        bad = ", ".join(f"{r['other source'][1]}+{r['same source'][1]}" for r in rows)
        print(f"| {label} | " + " | ".join(cells) + f" | {bad} |")
    if args.degrees:
        print_grid(args, seeds, per_seed)
    print(f"\ntotal time {time.time() - t_start:.0f}s")


def print_grid(args, seeds, per_seed) -> None:
    """The ablation grid: perplexity on the other source / P0 (mean ± sd over seeds; inf where a seed had a
    non-finite block) and non-finite blocks per seed, range loss on and off, per degree and replacement."""
    def cell(key):
        rows = [per_seed[s].get(key) for s in seeds]
        if any(r is None for r in rows) or not all("P0" in per_seed[s] for s in seeds):
            return "-", "-"
        ratios = [r["other source"][0] / per_seed[s]["P0"]["other source"][0] for r, s in zip(rows, seeds)]
        ratio = mean_sd(ratios) if all(math.isfinite(x) for x in ratios) else "inf"
        return ratio, ", ".join(str(r["other source"][1] + r["same source"][1]) for r in rows)

    print()
    print("## Ablation: held-out perplexity (other source) / P0, range loss on vs off, per degree and replacement")
    print()
    print("| degree | replacement | range loss on | non-finite | range loss off | non-finite |")
    print("|---|---|---|---|---|---|")
    for degree in args.degree_list:
        for label, on, off in GRID:
            a, b = cell(on + degree_tag(args, degree)), cell(off + degree_tag(args, degree))
            print(f"| {degree} | {label} | {a[0]} | {a[1]} | {b[0]} | {b[1]} |")


if __name__ == "__main__":
    main()
