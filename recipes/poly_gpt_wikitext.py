"""PolyGPT on WikiText-103: softmax GPT baseline vs fully polynomial PolyGPT (paper, 6 layers: 18.98 -> 19.89).

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/poly_gpt_wikitext.py --tiny
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml recipes/poly_gpt_wikitext.py --layers 6
    accelerate launch ... recipes/poly_gpt_wikitext.py --layers 12 --data-dir DIR   # DIR/{train,validation}.txt

Data through ``datasets``: ``wikitext`` / ``wikitext-103-raw-v1`` from the hub, or text files with
``--data-dir``; ``--tiny`` uses the excerpt of the Python Language Reference shipped with the package (real
prose, offline) and a tokenizer trained on it. P0: softmax attention + LayerNorm; P1: pointwise attention
(σ = GELU, scaled by 1/sqrt(L) after σ) + LayerNorm with a polynomial-ready 1/sqrt, range/variance loss;
P2: progressive replacement, fully polynomial. Metric: held-out perplexity.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402

import hf_polyhe  # noqa: E402
from common import (  # noqa: E402
    CardData, CardMetric, export_check, export_results, is_main_process, lm_perplexity, parse_args, quiet_transformers,
    recipe_parser, steps_row, train_exact, train_exact_same_budget, train_progressive, write_model_card,
)
from hf_polyhe.data import lm_blocks, load_tiny_corpus, split_paragraphs, train_test_split, train_tokenizer  # noqa: E402

TINY = dict(steps=300, poly_steps=300, batch_size=16, lr=2e-3, output_dir="runs/poly_gpt_tiny", hidden=64,
            layers=2, heads=4, block_size=32, vocab=512)
FULL = dict(steps=100000, poly_steps=20000, batch_size=32, lr=6e-4, output_dir="runs/poly_gpt", hidden=512,
            layers=6, heads=8, block_size=256, vocab=32000)


def load_texts(args):
    if args.tiny:
        train, test = train_test_split(split_paragraphs(load_tiny_corpus()), 0.1, args.seed)
        return train, test, CardData(
            name="Python Language Reference excerpt (shipped with hf_polyhe)", local_type="python-reference-excerpt",
            description="An excerpt of the Python Language Reference (pydoc topics of CPython 3.10) shipped inside the "
                        "hf_polyhe package (`hf_polyhe/data/python_reference_excerpt.txt`), split by paragraph 90/10 "
                        "into train / test; byte-level BPE tokenizer trained on the train split.",
            licence="PSF License Version 2 (Python Software Foundation)")
    if args.data_dir:
        raw = load_dataset("text", data_files={s: os.path.join(args.data_dir, f"{s}.txt") for s in ("train", "validation")})
        data = CardData(name=f"local text files ({args.data_dir})", local_type="text-files", split="validation",
                        description=f"Text files `{args.data_dir}/{{train,validation}}.txt`.",
                        licence="that of the local files (not recorded by the recipe)")
    else:
        raw = load_dataset("wikitext", "wikitext-103-raw-v1")
        data = CardData(name="WikiText-103 (raw)", hub_id="wikitext", config="wikitext-103-raw-v1", split="validation",
                        description="WikiText-103 (raw), train / validation splits, through `datasets`; byte-level BPE "
                                    "tokenizer trained on the train split.",
                        licence="CC BY-SA 3.0 and GFDL (text from Wikipedia)")
    clean = lambda split: [t for t in raw[split]["text"] if t.strip()]  # noqa: E731
    return clean("train"), clean("validation"), data


def build(args, tokenizer, he_friendly: bool):
    kw = dict(vocab_size=len(tokenizer), max_position_embeddings=args.block_size, hidden_size=args.hidden,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
              hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if he_friendly:
        kw.update(attention_type="pointwise", attention_activation="gelu", attention_scaling="sqrt_length",
                  norm_type="poly_layernorm")
    else:
        kw.update(attention_type="softmax", norm_type="layernorm")
    return hf_polyhe.PolyGPTForCausalLM(hf_polyhe.PolyGPTConfig(**kw))


def collate(features):
    ids = torch.as_tensor(np.stack([f["input_ids"] for f in features]))
    return {"input_ids": ids, "labels": ids}


def main(argv=None):
    parser = recipe_parser(__doc__.splitlines()[0], recipe="poly_gpt_wikitext")
    for name in ("hidden", "layers", "heads", "block_size", "vocab"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = parse_args(parser, argv, TINY, FULL)
    args.command = "python recipes/poly_gpt_wikitext.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quiet_transformers()
    torch.manual_seed(args.seed)
    train_texts, test_texts, data = load_texts(args)
    tokenizer = train_tokenizer(train_texts[:200000], vocab_size=args.vocab, model_max_length=args.block_size)
    train = Dataset.from_dict({"input_ids": lm_blocks(tokenizer, train_texts, args.block_size)}).with_format("numpy")
    test = Dataset.from_dict({"input_ids": lm_blocks(tokenizer, test_texts, args.block_size)}).with_format("numpy")
    if args.eval_samples:
        test = test.select(range(min(args.eval_samples, len(test))))
    out = args.output_dir

    p0 = build(args, tokenizer, he_friendly=False)
    # the baseline gets the whole budget of P1 + P2 (same number of optimizer steps)
    train_exact(p0, train, args, os.path.join(out, "p0"), args.steps + args.poly_steps, collate, range_loss=False)
    ppl0 = lm_perplexity(p0, test)
    torch.manual_seed(args.seed)
    model = build(args, tokenizer, he_friendly=True)
    train_exact(model, train, args, os.path.join(out, "p1"), args.steps, collate)
    ppl1 = lm_perplexity(model, test)
    p1_budget = train_exact_same_budget(model, train, args, os.path.join(out, "p1_budget"), args.poly_steps, collate)
    ppl1_budget = lm_perplexity(p1_budget, test)
    del p1_budget
    _, replacement = train_progressive(model, train, args, os.path.join(out, "p2"), args.poly_steps, collate)
    ppl2 = lm_perplexity(model, test)
    results = {"P0 softmax GPT perplexity": ppl0, "P1 HE-friendly, exact operators perplexity": ppl1,
               "P1 HE-friendly, exact operators, same total steps as P2 perplexity": ppl1_budget,
               "P2 fully polynomial PolyGPT perplexity": ppl2, "P2 / P0": ppl2 / ppl0,
               "P2 / P1 (same total steps)": ppl2 / ppl1_budget,
               "training steps P0 / P1 / P1 same total / P2": steps_row(args)}
    if is_main_process():
        model.save_pretrained(os.path.join(out, "poly_model"))
        tokenizer.save_pretrained(os.path.join(out, "poly_model"))
        check = None
        if args.export:
            samples = [{"input_ids": test[i]["input_ids"][:16]} for i in range(3)]
            check = export_check(model, tokenizer, os.path.join(out, "export"), samples, args.encrypted_samples, args.he_params)
            results.update(export_results(check, "next-token agreement"))
        data.description += f" {len(train)} training / {len(test)} held-out blocks of {args.block_size} tokens."
        card = write_model_card(args.card_dir or os.path.join(out, "card"),
                                name="PolyGPT " + ("tiny (Python reference)" if args.tiny else "WikiText-103"),
                                task="text-generation", results=results, model=model, args=args, data=data,
                                metric=CardMetric("perplexity", "held-out perplexity (lower is better)",
                                                  "P0 softmax GPT perplexity", "P2 fully polynomial PolyGPT perplexity"),
                                example=" ".join(test_texts[0].split()[:4]), model_dir=os.path.join(out, "poly_model"),
                                export=check, schedule=replacement.schedule)
        print("\n".join(f"{k}: {v}" for k, v in results.items()))
        print(f"model card: {card}")
    return results


if __name__ == "__main__":
    main()
