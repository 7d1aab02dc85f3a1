"""What a Transformers user expects of any model: saving leaves the config alone, saved directories load through
the Auto classes with trust_remote_code (no `import hf_polyhe`), resize_token_embeddings, output_hidden_states /
output_attentions / return_dict=False, gradient checkpointing."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config, tiny_inputs
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM

import hf_polyhe

HEADS = [
    ("gpt", hf_polyhe.PolyGPTForCausalLM, AutoModelForCausalLM),
    ("bert", hf_polyhe.PolyBertForMaskedLM, AutoModelForMaskedLM),
    ("vit", hf_polyhe.PolyViTForImageClassification, AutoModelForImageClassification),
]


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _he_config(family):
    return tiny_config(family, attention_type="pointwise", norm_type="poly_layernorm" if family != "vit" else "batchnorm")


# -- save_pretrained ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,cls,auto", HEADS, ids=[h[0] for h in HEADS])
def test_save_pretrained_leaves_the_config_alone(tmp_path, family, cls, auto):
    config = _he_config(family)
    before = config.to_dict()
    model = cls(config).eval()
    hf_polyhe.to_polynomial(model, roles=["mlp_act"], calibration_data=[tiny_inputs(family)])
    model.save_pretrained(tmp_path)
    assert model.config is config and config.to_dict() == before and config.poly_operators is None
    # a model built from the same config afterwards is exact: it did not inherit the saved model's polynomials
    fresh = auto.from_config(config)
    assert {o.mode for o in hf_polyhe.polynomial_status(fresh).operators} == {"exact"}
    # ... while the saved config.json has them
    saved = json.loads((tmp_path / "config.json").read_text())["poly_operators"]
    assert {spec["mode"] for spec in saved.values()} == {"exact", "poly"}
    loaded = auto.from_pretrained(tmp_path)
    assert [o.mode for o in hf_polyhe.polynomial_status(loaded).operators] == \
           [o.mode for o in hf_polyhe.polynomial_status(model).operators]


# -- loading through the Auto classes without import hf_polyhe ----------------------------------------------------
REMOTE_SCRIPT = """
import json, sys, torch, transformers
assert "hf_polyhe" not in sys.modules
res = {}
try:  # without trust_remote_code (and without import hf_polyhe) the model type is unknown
    transformers.AutoConfig.from_pretrained(sys.argv[1] + "/gpt")
    res["refused"] = False
except ValueError as e:
    res["refused"] = "trust_remote_code=True" in str(e)
for family, auto in [("gpt", "AutoModelForCausalLM"), ("bert", "AutoModelForMaskedLM"),
                     ("vit", "AutoModelForImageClassification"), ("bert", "AutoModel")]:
    d = sys.argv[1] + "/" + family
    model = getattr(transformers, auto).from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**torch.load(d + "/inputs.pt"))
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    modes = [op.mode for name, op in model.named_modules() if type(op).__name__ == "PolyOperator"]
    res[auto] = [type(model).__module__ + "." + type(model).__name__, out.sum().item(), modes]
print()  # the refused load left transformers' trust_remote_code prompt on the current line
print(json.dumps(res))
"""


def test_auto_classes_load_saved_models_without_import(tmp_path):
    """A user with hf_polyhe installed loads a saved directory through the Auto classes with trust_remote_code=True
    and never imports hf_polyhe; the classes are the package's own (export and isinstance checks keep working)."""
    expected = {}
    for family, cls, auto in HEADS:
        model = cls(_he_config(family)).eval()
        hf_polyhe.to_polynomial(model, roles=["mlp_act"], calibration_data=[tiny_inputs(family)])
        inputs = tiny_inputs(family)
        model.save_pretrained(tmp_path / family)
        torch.save(inputs, tmp_path / family / "inputs.pt")
        with torch.no_grad():
            expected[auto.__name__] = (cls, _output(model(**inputs)).sum().item(), hf_polyhe.polynomial_status(model))
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["auto_map"]["AutoConfig"] == f"configuration_poly_{family}.{type(model.config).__name__}"
        assert config["auto_map"][auto.__name__] == f"modeling_poly_{family}.{cls.__name__}"
        assert {"AutoConfig", "AutoModel", auto.__name__} <= set(config["auto_map"])
        for entry in config["auto_map"].values():
            assert (tmp_path / family / (entry.split(".")[0] + ".py")).exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("refused") is True
    for auto_name, (cls, value, status) in expected.items():
        name, total, modes = got[auto_name]
        assert name == f"{cls.__module__}.{cls.__name__}"  # hf_polyhe's class, not a copy
        assert total == pytest.approx(value, rel=1e-5, abs=1e-5)
        assert modes == [o.mode for o in status.operators] and "poly" in modes
    assert got["AutoModel"][0] == "hf_polyhe.models.poly_bert.modeling_poly_bert.PolyBertModel"


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_a_model_converted_without_pooler_reloads_without_one(tmp_path, family):
    """``BertModel(add_pooling_layer=False)`` (a sentence-embedding checkpoint) converts to a pooler-less
    PolyBertModel; ``from_pretrained`` must rebuild it pooler-less too, not with a randomly initialised pooler whose
    exact tanh makes the reloaded model "not fully polynomial". ``add_pooling_layer=`` still overrides."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    src = (BertModel(BertConfig(vocab_size=100, **small), add_pooling_layer=False) if family == "bert"
           else ViTModel(ViTConfig(image_size=8, patch_size=4, **small), add_pooling_layer=False))
    model = hf_polyhe.convert_to_poly(src)
    assert model.pooler is None and model.config.add_pooling_layer is False
    model.save_pretrained(tmp_path)
    cls = type(model)
    assert cls.from_pretrained(tmp_path).pooler is None
    assert AutoModel.from_pretrained(tmp_path).pooler is None
    assert cls.from_pretrained(tmp_path, add_pooling_layer=True).pooler is not None
    with_pooler = hf_polyhe.convert_to_poly(type(src)(src.config))  # the default keeps its pooler
    assert with_pooler.pooler is not None and getattr(with_pooler.config, "add_pooling_layer", True)


# -- resize_token_embeddings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family,cls", [("bert", hf_polyhe.PolyBertForMaskedLM), ("gpt", hf_polyhe.PolyGPTForCausalLM)],
                         ids=["bert", "gpt"])
def test_resize_token_embeddings(tmp_path, family, cls, tie):
    model = cls(tiny_config(family, tie_word_embeddings=tie)).eval()
    if family == "bert":
        with torch.no_grad():
            model.lm_head.bias.normal_()  # a trained MLM bias, so that losing or misplacing it shows
    inputs = tiny_inputs(family)
    with torch.no_grad():
        before = model(**inputs).logits
        model.resize_token_embeddings(120)
        assert model.config.vocab_size == 120
        assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 120
        if family == "bert":  # BERT's layout: the decoder's bias is lm_head.bias, resized with it
            assert model.lm_head.decoder.bias is model.lm_head.bias and model.lm_head.bias.shape == (120,)
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.logits.shape == (2, 9, 120) and torch.isfinite(out.loss)
        torch.testing.assert_close(out.logits[..., :97], before)  # the old tokens keep their logits
        new_ids = torch.tensor([[100, 119, 5]])
        assert model(input_ids=new_ids, labels=new_ids).logits.shape == (1, 3, 120)
        model.save_pretrained(tmp_path)
        loaded = cls.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, out.logits)
        model.resize_token_embeddings(90)
        assert model(**{**inputs, "input_ids": inputs["input_ids"] % 90}).logits.shape == (2, 9, 90)


# -- output_hidden_states / output_attentions / return_dict ---------------------------------------------------------
def _converted_pairs():
    """(transformers model, its exact Poly conversion, inputs) for GPT-2, BERT and ViT, eager attention."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    ids = {"input_ids": torch.randint(1, 97, (2, 7))}
    sources = [
        (GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=3, n_head=4)), ids),
        (BertModel(BertConfig(vocab_size=97, max_position_embeddings=16, **small)), ids),
        (ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_labels=3, **small)),
         {"pixel_values": torch.randn(2, 3, 8, 8)}),
    ]
    for source, inputs in sources:
        source.config._attn_implementation = "eager"  # attention weights are only returned by eager attention
        yield source.eval(), hf_polyhe.convert_to_poly(source).eval(), inputs


def test_hidden_states_and_attentions_match_gpt2_bert_vit():
    """The exact conversion of GPT-2 / BERT / ViT returns the same hidden states (embeddings, each layer; the last
    after GPT-2's final norm, before ViT's) and the same attention weights as the original."""
    for source, poly, inputs in _converted_pairs():
        with torch.no_grad():
            ref = source(**inputs, output_hidden_states=True, output_attentions=True)
            got = poly(**inputs, output_hidden_states=True, output_attentions=True)
        name = type(source).__name__
        assert len(got.hidden_states) == len(ref.hidden_states) == 4, name
        assert len(got.attentions) == len(ref.attentions) == 3, name
        for a, b in zip(got.hidden_states + got.attentions, ref.hidden_states + ref.attentions):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family,cls", [("gpt", hf_polyhe.PolyGPTForCausalLM), ("gpt", hf_polyhe.PolyGPTModel),
                                        ("bert", hf_polyhe.PolyBertForMaskedLM),
                                        ("bert", hf_polyhe.PolyBertForSequenceClassification),
                                        ("bert", hf_polyhe.PolyBertModel),
                                        ("vit", hf_polyhe.PolyViTForImageClassification), ("vit", hf_polyhe.PolyViTModel)],
                         ids=lambda v: getattr(v, "__name__", v))
def test_output_flags_and_tuples(family, cls):
    """Softmax-free attention weights per layer (rows of a causal model are zero past the query), hidden states
    per layer, tuples with return_dict=False (argument or config), and nothing extra by default."""
    model = cls(tiny_config(family, attention_type="pointwise")).eval()
    inputs = tiny_inputs(family)
    with torch.no_grad():
        plain = model(**inputs)
        full = model(**inputs, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs, return_dict=False, output_hidden_states=True)
        model.config.return_dict = False
        from_config = model(**inputs)
        model.config.output_attentions = True
    assert plain.hidden_states is None and plain.attentions is None
    n, length = 2, inputs.get("input_ids", torch.zeros(2, 5)).shape[1]
    assert len(full.hidden_states) == n + 1 and len(full.attentions) == n
    assert all(h.shape == (2, length, 32) for h in full.hidden_states)
    for w in full.attentions:
        assert w.shape == (2, 4, length, length) and (w >= 0).all()  # relu weights, not a softmax: rows need not sum to 1
        assert not torch.allclose(w.sum(-1), torch.ones(()))
        if family == "gpt":
            assert (w.triu(1) == 0).all()
        if "attention_mask" in inputs:
            assert (w[0, :, :, -2:] == 0).all()  # padded keys get no weight
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    torch.testing.assert_close(as_tuple[0], _output(plain))
    torch.testing.assert_close(from_config[0], _output(plain))
    assert any(isinstance(x, tuple) and len(x) == n + 1 for x in as_tuple)  # the hidden states
    with torch.no_grad():
        assert len(model(**inputs)[-1]) == n  # config.output_attentions=True


# -- gradient checkpointing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,cls,labels", [
    ("gpt", hf_polyhe.PolyGPTForCausalLM, lambda i: i["input_ids"]),
    ("bert", hf_polyhe.PolyBertForSequenceClassification, lambda i: torch.tensor([0, 2])),
    ("vit", hf_polyhe.PolyViTForImageClassification, lambda i: torch.tensor([1, 4])),
], ids=["gpt", "bert", "vit"])
def test_gradient_checkpointing_gives_the_same_gradients(family, cls, labels):
    """With the range loss and polynomial / blended operators: same losses and gradients with and without
    checkpointing, over two steps (the recomputation in the backward pass must not feed the next step's range
    loss), and the blocks really are recomputed."""
    from hf_polyhe.training import RangeLoss, RangeLossConfig, RangeTracker

    config = tiny_config(family, attention_type="pointwise", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         **({"norm_type": "poly_layernorm"} if family != "vit" else {}))
    inputs = tiny_inputs(family)
    reference = cls(config).train()
    hf_polyhe.to_polynomial(reference, roles=["mlp_act"], calibration_data=[inputs])
    for op in hf_polyhe.nn.poly_operators(reference).values():
        if op.role == "attn_act":  # half-way through a ramp
            op.fit(interval=(-1.0, 1.0))
            op.set_mode("blend", 0.5)
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing and not reference.is_gradient_checkpointing
    block = next(m for m in checkpointed.modules() if type(m).__name__ == "PolyBlock")
    calls = []
    block.register_forward_pre_hook(lambda *a: calls.append(1))

    results, counts = [], []
    for model in (reference, checkpointed):
        penalty = RangeLoss(model, RangeLossConfig(alpha=10.0, bound=0.05, beta=10.0, max_variance=1e-3))
        tracker = RangeTracker(model, training_only=True)
        steps = []
        for _ in range(2):
            model.zero_grad()
            loss = model(**inputs, labels=labels(inputs)).loss + penalty()
            loss.backward()
            steps.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        results.append(steps)
        counts.append({p: r.count for p, r in tracker.ranges().items()})
    assert counts[0] == counts[1]  # the recomputation is not measured twice either
    assert len(calls) == 4  # 2 steps x (forward + recomputation in backward)
    for (loss_ref, grads_ref), (loss_ckpt, grads_ckpt) in zip(*results):
        assert loss_ckpt == pytest.approx(loss_ref, rel=1e-6)
        assert grads_ckpt.keys() == grads_ref.keys() and len(grads_ref) > 10
        for name in grads_ref:
            torch.testing.assert_close(grads_ckpt[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)
