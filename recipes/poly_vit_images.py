"""PolyViT on images: softmax ViT baseline vs fully polynomial PolyViT (paper: CIFAR-100 73.4 -> 70.8).

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/poly_vit_images.py --tiny
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml recipes/poly_vit_images.py --dataset cifar100
    accelerate launch ... recipes/poly_vit_images.py --dataset tiny-imagenet [--data-dir DIR]

Data through ``datasets``: ``cifar100`` / ``tiny-imagenet`` from the hub when online, an ``imagefolder``
directory with ``--data-dir`` offline; ``--tiny`` uses scikit-learn's 8x8 digits (real scans shipped inside
the package, 1797 images, 10 classes). P0 is a same-size ViT with softmax attention and LayerNorm; P1/P2 use
pointwise attention scaled by 1/sqrt(L) and BatchNorm (the paper's vision setting), trained with the range
loss, then progressively replaced.
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
    CardData, CardMetric, classification_accuracy, export_check, export_results, is_main_process, parse_args,
    quiet_transformers, recipe_parser, steps_row, train_exact, train_exact_same_budget, train_progressive,
    write_model_card,
)

TINY = dict(steps=300, poly_steps=240, batch_size=32, lr=2e-3, output_dir="runs/poly_vit_tiny",
            hidden=64, layers=2, heads=4, mlp=128, patch=2)
FULL = dict(steps=20000, poly_steps=8000, batch_size=128, lr=1e-3, output_dir="runs/poly_vit", hidden=384,
            layers=7, heads=6, mlp=768, patch=4)
HUB = {"cifar100": ("cifar100", "img", "fine_label"), "tiny-imagenet": ("zh-plus/tiny-imagenet", "image", "label")}
LICENCES = {"cifar100": "none stated by its authors (Krizhevsky, 2009); the Hub dataset card lists it as unknown",
            "tiny-imagenet": "derived from ImageNet, whose terms of access (non-commercial research and education) apply"}
# the card's how-to-use input: one image prepared exactly as the recipe prepares its data
TINY_EXAMPLE = '''import torch
from sklearn.datasets import load_digits  # the tiny preset's data: 8x8 scans with values 0..16
digits = load_digits()
pixel_values = torch.tensor((digits.images[:1] / 16.0 - 0.5) / 0.5, dtype=torch.float32)[:, None]  # (1, 1, 8, 8) in [-1, 1]
print("true label:", digits.target[0])'''
HUB_EXAMPLE = '''import numpy as np, torch
from PIL import Image
image = Image.open("image.jpg").convert("RGB").resize(({size}, {size}))  # any RGB image
pixel_values = (torch.tensor(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5'''


def digits_dataset(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # (n, 8, 8) in [-1, 1]
    ds = Dataset.from_dict({"pixel_values": x[:, None].tolist(), "labels": d.target.tolist()}).with_format("numpy")
    split = ds.train_test_split(test_size=300, seed=seed)
    labels = [str(i) for i in range(10)]
    data = CardData(name="scikit-learn digits (8x8, shipped with scikit-learn)", local_type="sklearn-digits",
                    description="scikit-learn's `load_digits()`: 1797 8x8 grayscale scans of handwritten digits (10 classes, "
                                "the UCI Optical Recognition of Handwritten Digits test set, shipped inside scikit-learn), "
                                "scaled to [-1, 1]; 1497 train / 300 test images.",
                    licence="CC BY 4.0 (UCI Machine Learning Repository; Alpaydin and Kaynak, 1998)")
    return split["train"], split["test"], labels, 8, 1, data


def image_dataset(name: str, data_dir, size: int):
    if data_dir:
        raw = load_dataset("imagefolder", data_dir=data_dir)
        img_key, label_key = "image", "label"
    else:
        hub, img_key, label_key = HUB[name]
        raw = load_dataset(hub)
    mean, std = 0.5, 0.5

    def prep(batch):
        px = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32).transpose(2, 0, 1) / 255.0
              for im in batch[img_key]]
        return {"pixel_values": [(p - mean) / std for p in px], "labels": batch[label_key]}

    train = raw["train"].map(prep, batched=True, remove_columns=raw["train"].column_names).with_format("numpy")
    test_split = "test" if "test" in raw else "valid" if "valid" in raw else "validation"
    test = raw[test_split].map(prep, batched=True, remove_columns=raw[test_split].column_names).with_format("numpy")
    labels = raw["train"].features[label_key].names
    if data_dir:
        data = CardData(name=f"local image folder ({data_dir})", local_type="imagefolder", split=test_split,
                        description=f"an `imagefolder` directory `{data_dir}`: {len(train)} train / {len(test)} test images, "
                                    f"resized to {size}x{size}, scaled to [-1, 1]",
                        licence="that of the local images (not recorded by the recipe)")
    else:
        data = CardData(name=name, hub_id=HUB[name][0], split=test_split, licence=LICENCES[name],
                        description=f"{name} (`{HUB[name][0]}` through `datasets`): {len(train)} train / {len(test)} "
                                    f"{test_split} images, resized to {size}x{size}, scaled to [-1, 1].")
    return train, test, labels, size, 3, data


def collate(features):
    return {"pixel_values": torch.as_tensor(np.stack([f["pixel_values"] for f in features])),
            "labels": torch.as_tensor([int(f["labels"]) for f in features])}


def build(args, labels, size, channels, he_friendly: bool):
    kw = dict(image_size=size, patch_size=args.patch, num_channels=channels, hidden_size=args.hidden,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=args.mlp,
              hidden_act="gelu", num_labels=len(labels), id2label=dict(enumerate(labels)),
              label2id={l: i for i, l in enumerate(labels)}, hidden_dropout_prob=0.0)
    if he_friendly:
        kw.update(attention_type="pointwise", attention_activation="gelu", attention_scaling="sqrt_length",
                  norm_type="batchnorm")
    else:
        kw.update(attention_type="softmax", norm_type="layernorm")
    return hf_polyhe.PolyViTForImageClassification(hf_polyhe.PolyViTConfig(**kw))


def main(argv=None):
    parser = recipe_parser(__doc__.splitlines()[0], recipe="poly_vit_images")
    parser.add_argument("--dataset", default="cifar100", choices=sorted(HUB))
    for name in ("hidden", "layers", "heads", "mlp", "patch"):
        parser.add_argument(f"--{name}", type=int, default=None)
    args = parse_args(parser, argv, TINY, FULL)
    args.command = "python recipes/poly_vit_images.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quiet_transformers()
    torch.manual_seed(args.seed)
    if args.tiny:
        train, test, labels, size, channels, data = digits_dataset(args.seed)
    else:
        train, test, labels, size, channels, data = image_dataset(args.dataset, args.data_dir, 32 if args.dataset == "cifar100" else 64)
    if args.eval_samples:
        test = test.select(range(min(args.eval_samples, len(test))))
    out = args.output_dir

    p0 = build(args, labels, size, channels, he_friendly=False)
    # the baseline gets the whole budget of P1 + P2 (same number of optimizer steps)
    train_exact(p0, train, args, os.path.join(out, "p0"), args.steps + args.poly_steps, collate, range_loss=False)
    acc0 = classification_accuracy(p0, test, "pixel_values")

    torch.manual_seed(args.seed)
    model = build(args, labels, size, channels, he_friendly=True)
    train_exact(model, train, args, os.path.join(out, "p1"), args.steps, collate)
    acc1 = classification_accuracy(model, test, "pixel_values")
    p1_budget = train_exact_same_budget(model, train, args, os.path.join(out, "p1_budget"), args.poly_steps, collate)
    acc1_budget = classification_accuracy(p1_budget, test, "pixel_values")
    del p1_budget
    _, replacement = train_progressive(model, train, args, os.path.join(out, "p2"), args.poly_steps, collate)
    acc2 = classification_accuracy(model, test, "pixel_values")
    results = {"P0 softmax ViT accuracy (%)": acc0, "P1 HE-friendly, exact operators (%)": acc1,
               "P1 HE-friendly, exact operators, same total steps as P2 (%)": acc1_budget,
               "P2 fully polynomial PolyViT (%)": acc2, "P0 - P2 (points)": acc0 - acc2,
               "P1 (same total steps) - P2 (points)": acc1_budget - acc2,
               "training steps P0 / P1 / P1 same total / P2": steps_row(args)}
    if is_main_process():
        model.save_pretrained(os.path.join(out, "poly_model"))
        check = None
        if args.export:
            samples = [{"pixel_values": test[i]["pixel_values"]} for i in range(3)]
            check = export_check(model, None, os.path.join(out, "export"), samples, args.encrypted_samples, args.he_params)
            results.update(export_results(check))
        card = write_model_card(args.card_dir or os.path.join(out, "card"), name="PolyViT " + ("tiny (digits)" if args.tiny else args.dataset),
                                task="image-classification", results=results, model=model, args=args, data=data,
                                metric=CardMetric("accuracy", "top-1 accuracy (%) on the held-out split",
                                                  "P0 softmax ViT accuracy (%)", "P2 fully polynomial PolyViT (%)"),
                                example=TINY_EXAMPLE if args.tiny else HUB_EXAMPLE.format(size=size),
                                model_dir=os.path.join(out, "poly_model"), export=check, schedule=replacement.schedule)
        print("\n".join(f"{k}: {v}" for k, v in results.items()))
        print(f"model card: {card}")
    return results


if __name__ == "__main__":
    main()
