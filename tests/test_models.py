"""Forward, loss, backward, HE options, save/load through the Auto classes, generate()."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config, tiny_inputs
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

import hf_polyhe

# (family, class, auto class, labels builder)
MODELS = [
    ("gpt", hf_polyhe.PolyGPTModel, AutoModel, None),
    ("gpt", hf_polyhe.PolyGPTForCausalLM, AutoModelForCausalLM, lambda inp: inp["input_ids"]),
    ("bert", hf_polyhe.PolyBertModel, AutoModel, None),
    ("bert", hf_polyhe.PolyBertForMaskedLM, AutoModelForMaskedLM,
     lambda inp: torch.where(torch.rand(inp["input_ids"].shape) < 0.5, inp["input_ids"], -100)),
    ("bert", hf_polyhe.PolyBertForSequenceClassification, AutoModelForSequenceClassification,
     lambda inp: torch.tensor([0, 2])),
    ("vit", hf_polyhe.PolyViTModel, AutoModel, None),
    ("vit", hf_polyhe.PolyViTForImageClassification, AutoModelForImageClassification, lambda inp: torch.tensor([1, 4])),
]
IDS = [m[1].__name__ for m in MODELS]

HE_OPTIONS = [
    dict(attention_type="softmax", norm_type="layernorm"),
    dict(attention_type="pointwise", attention_activation="relu", attention_scaling="sqrt_length"),
    dict(attention_type="pointwise", attention_activation="gelu", attention_scaling="length", attention_scaling_position="pre"),
    dict(attention_type="pointwise", attention_activation="squared_relu", attention_scaling="none"),
    dict(attention_type="pointwise", attention_activation="square", hidden_act="relu"),
    dict(attention_type="power", attention_power=4, norm_type="poly_layernorm"),
    dict(attention_type="power", attention_power=2, norm_type="batchnorm", hidden_act="square"),
]


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family,cls,auto,labels", MODELS, ids=IDS)
def test_forward_loss_backward(family, cls, auto, labels):
    model = cls(tiny_config(family))
    inputs = tiny_inputs(family)
    if labels is not None:
        out = model(**inputs, labels=labels(inputs))
        assert out.loss is not None and torch.isfinite(out.loss)
        out.loss.backward()
    else:
        out = model(**inputs)
        _output(out).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2
    assert torch.isfinite(_output(out)).all()


@pytest.mark.parametrize("options", HE_OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("family", ["gpt", "bert", "vit"])
def test_he_options_forward_and_polynomial(family, options):
    """Every HE-friendly combination runs; those without softmax/LayerNorm become fully polynomial."""
    model = {"gpt": hf_polyhe.PolyGPTForCausalLM, "bert": hf_polyhe.PolyBertForSequenceClassification,
             "vit": hf_polyhe.PolyViTForImageClassification}[family](tiny_config(family, **options)).eval()
    inputs = tiny_inputs(family)
    exact = _output(model(**inputs))
    assert torch.isfinite(exact).all()
    status = hf_polyhe.polynomial_status(model)
    if options.get("attention_type") == "softmax" or options.get("norm_type") == "layernorm":
        assert not status.is_polynomial
        with pytest.raises(ValueError, match="no polynomial form"):
            hf_polyhe.to_polynomial(model)
        return
    hf_polyhe.to_polynomial(model, degree=31)  # on default intervals (it warns): visibly different from exact
    status = hf_polyhe.polynomial_status(model)
    assert status.is_polynomial and "fully polynomial" in str(status)
    poly = _output(model(**inputs))
    assert torch.isfinite(poly).all() and not torch.equal(poly, exact)


def test_poly_mode_close_to_exact_with_accurate_fit():
    """With intervals covering the inputs and a high degree, the polynomial model tracks the exact one."""
    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt", hidden_act="gelu", attention_activation="gelu")).eval()
    inputs = tiny_inputs("gpt")
    exact = model(**inputs).logits
    ranges = {}
    hooks = []
    for path, op in hf_polyhe.nn.poly_operators(model).items():
        def hook(mod, args, path=path):
            lo, hi = float(args[0].detach().min()), float(args[0].detach().max())
            a, b = ranges.get(path, (lo, hi))
            lo, hi = min(a, lo), max(b, hi)
            pad = 0.05 * (hi - lo) + 1e-3
            ranges[path] = (lo / 2 if 0 < lo <= pad else lo - pad, hi + pad)
        hooks.append(op.register_forward_pre_hook(hook))
    model(**inputs)
    for h in hooks:
        h.remove()
    hf_polyhe.to_polynomial(model, ranges=ranges, degree=63)
    poly = model(**inputs).logits
    assert (poly - exact).abs().max() < 1e-2 * exact.abs().max()


@pytest.mark.parametrize("family,cls,auto,labels", MODELS, ids=IDS)
def test_save_load_auto(tmp_path, family, cls, auto, labels):
    config = tiny_config(family, attention_type="pointwise", norm_type="poly_layernorm" if family != "vit" else "batchnorm")
    model = cls(config).eval()
    inputs = tiny_inputs(family)
    hf_polyhe.to_polynomial(model, ops=["relu"], calibration_data=[inputs])  # poly and exact operators must round-trip
    expected = _output(model(**inputs))
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == config.model_type
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    torch.testing.assert_close(_output(loaded(**inputs)), expected, rtol=1e-5, atol=1e-6)
    modes = {p: s.mode for p, s in ((o.path, o) for o in hf_polyhe.polynomial_status(loaded).operators)}
    assert modes == {o.path: o.mode for o in hf_polyhe.polynomial_status(model).operators}
    assert "poly" in modes.values() and "exact" in modes.values()


def test_from_pretrained_in_fresh_process(tmp_path):
    """Only `import hf_polyhe` is needed (no trust_remote_code)."""
    expected = {}
    for family, cls, auto, _ in MODELS:
        model = cls(tiny_config(family)).eval()
        out = tmp_path / cls.__name__
        model.save_pretrained(out)
        inputs = tiny_inputs(family)
        torch.save(inputs, out / "inputs.pt")
        expected[cls.__name__] = _output(model(**inputs)).sum().item()
    script = textwrap.dedent(f"""
        import json, torch, hf_polyhe, transformers
        from pathlib import Path
        res = {{}}
        for name, auto in {[(m[1].__name__, m[2].__name__) for m in MODELS]!r}:
            d = Path({str(tmp_path)!r}) / name
            m = getattr(transformers, auto).from_pretrained(d).eval()
            out = m(**torch.load(d / "inputs.pt"))
            res[name] = [type(m).__name__, (out.logits if hasattr(out, "logits") else out.last_hidden_state).sum().item()]
        print(json.dumps(res))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, value in expected.items():
        assert got[name][0] == name
        assert got[name][1] == pytest.approx(value, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("attention_type", ["softmax", "pointwise", "power"])
def test_generate_matches_uncached_forward(attention_type):
    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt", attention_type=attention_type)).eval()
    prompt = torch.randint(1, 97, (2, 5))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11)
    # greedy tokens equal the argmax of a full (uncached) forward pass at every position
    logits = model(out, use_cache=False).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), out[:, 5:])
    # cached logits equal uncached logits
    with torch.no_grad():
        first = model(out[:, :8], use_cache=True)
        step = model(out[:, 8:9], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, logits[:, 8], rtol=1e-4, atol=1e-5)


def test_causal_lm_is_causal():
    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt")).eval()
    ids = torch.randint(1, 97, (1, 10))
    a = model(ids).logits
    ids2 = ids.clone()
    ids2[0, 7:] = 5
    b = model(ids2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])


def test_padding_mask_hides_padded_tokens():
    model = hf_polyhe.PolyBertForSequenceClassification(tiny_config("bert")).eval()
    ids = torch.randint(1, 97, (1, 9))
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[0, 6:] = 0
    a = model(input_ids=ids, attention_mask=mask).logits
    ids2 = ids.clone()
    ids2[0, 6:] = 3
    b = model(input_ids=ids2, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(attention_type="linear"), "attention_type 'linear'.*softmax, pointwise, power"),
        (dict(norm_type="rmsnorm"), "norm_type 'rmsnorm'.*layernorm"),
        (dict(attention_type="power", attention_power=3), "even integer"),
        (dict(hidden_size=30, num_attention_heads=4), "multiple of num_attention_heads"),
        (dict(hidden_act="mish"), "hidden_act 'mish'.*accepted"),
        (dict(attention_activation="sigmoid"), "attention_activation 'sigmoid'"),
        (dict(attention_scaling="log"), "attention_scaling 'log'"),
        (dict(poly_degrees={"gleu": 7}), r"unknown operator name\(s\) in poly_degrees 'gleu'; accepted: .*gelu"),
        (dict(poly_degrees={"gelu": 0}), "integers >= 1"),
    ],
)
def test_bad_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config("gpt", **overrides)


def test_auto_config_for_model():
    for model_type in ("poly_gpt", "poly_bert", "poly_vit"):
        cfg = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4)
        assert cfg.model_type == model_type and cfg.hidden_size == 64


def test_bad_inputs():
    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt")).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(1, 97, (1, 40)))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.randint(1, 97, (1, 5)), attention_mask=torch.ones(1, 4))
    vit = hf_polyhe.PolyViTModel(tiny_config("vit"))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        vit(pixel_values=torch.randn(1, 3, 16, 16))
    op = hf_polyhe.PolyOperator("gelu")
    with pytest.raises(RuntimeError, match="fit"):
        op.set_mode("poly")
    with pytest.raises(ValueError, match="unknown mode"):
        op.set_mode("approx")
    with pytest.raises(ValueError, match="unknown operator 'softplus'"):
        hf_polyhe.PolyOperator("softplus")
