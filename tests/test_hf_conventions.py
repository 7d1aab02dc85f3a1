"""What a Transformers user expects of any model: saving leaves the config alone, saved directories load through
the Auto classes with trust_remote_code (no `import hf_polyhe`), resize_token_embeddings, output_hidden_states /
output_attentions / return_dict=False, gradient checkpointing."""

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
