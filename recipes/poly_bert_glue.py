"""PolyBert on a GLUE task: a fine-tuned BERT converted with ``convert_to_poly`` and made fully polynomial.

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/poly_bert_glue.py --tiny
    accelerate launch recipes/poly_bert_glue.py --task sst2 --model bert-base-uncased

Full run: GLUE ``--task`` (sst2 by default) through ``datasets`` and a pretrained ``--model`` from the hub
(or a local checkpoint path; ``--data-dir`` with ``train.csv`` / ``validation.csv`` holding ``sentence`` and
``label`` columns when offline). ``--tiny``: a BERT built from a config and briefly trained on an offline
task made from real text -- paragraphs of the CPython language reference (shipped inside Python) labelled by
whether their topic documents a *statement* or an *object type* -- then converted and made polynomial.

P0 is the exact fine-tuned ``BertForSequenceClassification`` (softmax, LayerNorm, GELU, tanh pooler); P1 is
``convert_to_poly(P0, attention_type="pointwise", norm_type="poly_layernorm")`` fine-tuned with the range and
variance losses; P2 is P1 after progressive replacement (fully polynomial). Target: P2 within 1.5 points of P0.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import hf_polyhe  # noqa: E402
from common import (  # noqa: E402
    CardData, CardMetric, classification_accuracy, export_check, export_results, is_main_process, parse_args,
    quiet_transformers, recipe_parser, train_exact, train_exact_same_budget, train_progressive, write_model_card,
)

TINY = dict(steps=300, poly_steps=300, batch_size=32, lr=1e-3, output_dir="runs/poly_bert_tiny", max_length=32)
FULL = dict(steps=4000, poly_steps=4000, batch_size=32, lr=3e-5, output_dir="runs/poly_bert", max_length=64)
STATEMENTS = ["assert", "assignment", "augassign", "break", "class", "compound", "continue", "del", "for", "function",
              "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield"]
TYPES = ["bltin-code-objects", "bltin-type-objects", "callable-types", "dict", "floating", "integers", "lists",
         "numbers", "numeric-types", "objects", "sequence-types", "specialattrs", "string-methods", "strings", "types",
         "typesfunctions", "typesmapping", "typesmethods", "typesmodules", "typesseq", "typesseq-mutable"]


def docs_task(seed: int):
    """Binary task on real prose: does a paragraph come from a statement topic (0) or an object-type topic (1)?"""
    from pydoc_data.topics import topics

    from hf_polyhe.data import split_paragraphs

    texts, labels = [], []
    for label, keys in enumerate((STATEMENTS, TYPES)):
        for k in keys:
            for p in split_paragraphs(topics.get(k, ""), min_chars=60):
                texts.append(p[:300])
                labels.append(label)
    ds = Dataset.from_dict({"sentence": texts, "label": labels}).shuffle(seed=seed)
    split = ds.train_test_split(test_size=0.2, seed=seed)
    return split["train"], split["test"], ["statement", "object type"]


def tokenize(ds, tokenizer, max_length, cls_id=None):
    def enc(batch):
        out = tokenizer(batch["sentence"], truncation=True, max_length=max_length - (cls_id is not None),
                        padding="max_length" if cls_id is None else False)
        if cls_id is not None:  # the tiny tokenizer adds no special tokens: prepend [CLS], pad to max_length
            ids = [[cls_id] + x for x in out["input_ids"]]
            out = {"input_ids": [x + [0] * (max_length - len(x)) for x in ids],
                   "attention_mask": [[1] * len(x) + [0] * (max_length - len(x)) for x in ids]}
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": batch["label"]}

    return ds.map(enc, batched=True, remove_columns=ds.column_names).with_format("numpy")


def collate(features):
    return {k: torch.as_tensor(np.stack([f[k] for f in features])) for k in ("input_ids", "attention_mask", "labels")}


def main(argv=None):
    parser = recipe_parser(__doc__.splitlines()[0], recipe="poly_bert_glue")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--model", default="bert-base-uncased", help="pretrained BERT (hub name or path)")
    parser.add_argument("--max-length", type=int, default=None)
    args = parse_args(parser, argv, TINY, FULL)
    args.command = "python recipes/poly_bert_glue.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quiet_transformers()
    torch.manual_seed(args.seed)
    if args.tiny:
        from hf_polyhe.data import load_tiny_corpus, split_paragraphs, train_tokenizer

        raw_train, raw_test, labels = docs_task(args.seed)
        tokenizer = train_tokenizer(split_paragraphs(load_tiny_corpus()) + list(raw_train["sentence"]), vocab_size=1000,
                                    pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                    mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")
        cls_id = tokenizer.cls_token_id
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=args.max_length, num_labels=2,
                            pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        p0 = BertForSequenceClassification(config)
        data = CardData(name="Python language-reference topics: statement vs object type (built by the recipe)",
                        local_type="python-reference-topics",
                        description=f"An offline task made from real text: paragraphs of the CPython language reference "
                                    f"(`pydoc_data.topics`, shipped with Python), labelled by whether their topic documents "
                                    f"a statement or an object type; {len(raw_train)} train / {len(raw_test)} test "
                                    f"paragraphs (first 300 characters); byte-level BPE tokenizer trained locally on "
                                    f"them and on the reference excerpt shipped with hf_polyhe.",
                        licence="PSF License Version 2 (Python Software Foundation)")
    else:
        from transformers import AutoTokenizer

        if args.data_dir:
            raw = load_dataset("csv", data_files={s: os.path.join(args.data_dir, f"{s}.csv") for s in ("train", "validation")})
            data = CardData(name=f"local CSV files ({args.data_dir})", local_type="csv-files", split="validation",
                            description=f"`{args.data_dir}/{{train,validation}}.csv` (columns sentence, label)",
                            licence="that of the local files (not recorded by the recipe)")
        else:
            raw = load_dataset("glue", args.task)
            data = CardData(name=f"GLUE {args.task}", hub_id="glue", config=args.task, split="validation",
                            description=f"GLUE {args.task} through `datasets`",
                            licence=f"each GLUE task has its own; see the `glue` dataset card for {args.task}")
        raw_train, raw_test = raw["train"], raw["validation"]
        labels = raw_train.features["label"].names if hasattr(raw_train.features["label"], "names") else ["0", "1"]
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        cls_id = None
        p0 = BertForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
        data.description += f": {len(raw_train)} train / {len(raw_test)} validation examples; the tokenizer of `{args.model}`."
    train = tokenize(raw_train, tokenizer, args.max_length, cls_id)
    test = tokenize(raw_test, tokenizer, args.max_length, cls_id)
    if cls_id is not None:
        # from here on the tiny tokenizer prepends [CLS] itself, as the model was trained: the saved tokenizer, the
        # export's client and the card's snippet then tokenize exactly like the training data
        from tokenizers import processors

        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A [SEP] $B:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", tokenizer.sep_token_id)])
    if args.eval_samples:
        test = test.select(range(min(args.eval_samples, len(test))))
    out = args.output_dir

    train_exact(p0, train, args, os.path.join(out, "p0"), args.steps, collate, range_loss=False)
    acc0 = classification_accuracy(p0, test, "input_ids")
    # P1 and P2 continue from P0's weights for steps + poly_steps more: the exact model gets the same extra
    # fine-tuning, so that the comparison is at an equal budget
    p0_budget = copy.deepcopy(p0)
    train_exact(p0_budget, train, args, os.path.join(out, "p0_budget"), args.steps + args.poly_steps, collate,
                range_loss=False)
    acc0_budget = classification_accuracy(p0_budget, test, "input_ids")
    del p0_budget

    model = hf_polyhe.convert_to_poly(p0.eval(), attention_type="pointwise", attention_activation="gelu",
                                      norm_type="poly_layernorm", id2label=dict(enumerate(labels)),
                                      label2id={l: i for i, l in enumerate(labels)})
    acc_conv = classification_accuracy(model, test, "input_ids")
    train_exact(model, train, args, os.path.join(out, "p1"), args.steps, collate)
    acc1 = classification_accuracy(model, test, "input_ids")
    p1_budget = train_exact_same_budget(model, train, args, os.path.join(out, "p1_budget"), args.poly_steps, collate)
    acc1_budget = classification_accuracy(p1_budget, test, "input_ids")
    del p1_budget
    _, replacement = train_progressive(model, train, args, os.path.join(out, "p2"), args.poly_steps, collate)
    acc2 = classification_accuracy(model, test, "input_ids")
    s, p = args.steps, args.poly_steps
    results = {"P0 exact fine-tuned BERT accuracy (%)": acc0,
               "P0 exact, fine-tuned for the same total steps as P2 (%)": acc0_budget,
               "converted to pointwise attention, before fine-tuning (%)": acc_conv,
               "P1 HE-friendly, exact operators (%)": acc1,
               "P1 HE-friendly, exact operators, same total steps as P2 (%)": acc1_budget,
               "P2 fully polynomial PolyBert (%)": acc2,
               "P0 (same budget) - P2 (points)": acc0_budget - acc2,
               "P1 (same total steps) - P2 (points)": acc1_budget - acc2,
               "training steps P0 / P0 same budget / P1 / P1 same total / P2":
                   f"{s} / {s} + {s + p} / {s} + {s} / {s} + {s} + {p} / {s} + {s} + {p} (P1, P2 start from P0)"}
    if is_main_process():
        model.save_pretrained(os.path.join(out, "poly_model"))
        tokenizer.save_pretrained(os.path.join(out, "poly_model"))
        check = None
        if args.export:
            samples = [{"input_ids": test[i]["input_ids"], "attention_mask": test[i]["attention_mask"]} for i in range(3)]
            check = export_check(model, tokenizer, os.path.join(out, "export"), samples, args.encrypted_samples, args.he_params)
            results.update(export_results(check))
        card = write_model_card(args.card_dir or os.path.join(out, "card"),
                                name="PolyBert " + ("tiny (Python-reference topics)" if args.tiny else args.task),
                                task="text-classification", results=results, model=model, args=args, data=data,
                                metric=CardMetric("accuracy", "accuracy (%) on the held-out split",
                                                  "P0 exact, fine-tuned for the same total steps as P2 (%)",
                                                  "P2 fully polynomial PolyBert (%)"),
                                example=" ".join(raw_test[0]["sentence"].split()[:12]),
                                model_dir=os.path.join(out, "poly_model"), export=check, schedule=replacement.schedule,
                                base_model=None if args.tiny else args.model)
        print("\n".join(f"{k}: {v}" for k, v in results.items()))
        print(f"model card: {card}")
    return results


if __name__ == "__main__":
    main()
