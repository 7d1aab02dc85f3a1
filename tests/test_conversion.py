"""convert_to_poly copies every weight: the exact-preserving conversion computes the same outputs (1e-5)."""

import copy
import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import hf_polyhe

GPT2 = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
BERT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, num_labels=3)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
           patch_size=4, num_channels=3, num_labels=5)


def _text_inputs():
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


CASES = [
    (lambda: GPT2LMHeadModel(GPT2Config(**GPT2)), hf_polyhe.PolyGPTForCausalLM, _text_inputs),
    (lambda: GPT2Model(GPT2Config(**GPT2)), hf_polyhe.PolyGPTModel, _text_inputs),
    (lambda: BertModel(BertConfig(**BERT)), hf_polyhe.PolyBertModel, _text_inputs),
    (lambda: BertModel(BertConfig(**BERT), add_pooling_layer=False), hf_polyhe.PolyBertModel, _text_inputs),
    (lambda: BertForMaskedLM(BertConfig(**BERT)), hf_polyhe.PolyBertForMaskedLM, _text_inputs),
    (lambda: BertForSequenceClassification(BertConfig(**BERT)), hf_polyhe.PolyBertForSequenceClassification, _text_inputs),
    (lambda: ViTModel(ViTConfig(**VIT)), hf_polyhe.PolyViTModel, lambda: {"pixel_values": torch.randn(2, 3, 8, 8)}),
    (lambda: ViTForImageClassification(ViTConfig(**VIT)), hf_polyhe.PolyViTForImageClassification,
     lambda: {"pixel_values": torch.randn(2, 3, 8, 8)}),
]


def _outputs(out):
    return [t for t in (getattr(out, "logits", None), getattr(out, "last_hidden_state", None),
                        getattr(out, "pooler_output", None)) if t is not None]


@pytest.mark.parametrize("build,target,inputs", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_exact_conversion_matches(build, target, inputs):
    source = build().eval()
    poly = hf_polyhe.convert_to_poly(source).eval()
    assert type(poly) is target
    batch = inputs()
    with torch.no_grad():
        ref, got = _outputs(source(**batch)), _outputs(poly(**batch))
    assert len(ref) == len(got) > 0
    for r, g in zip(ref, got):
        if "attention_mask" in batch and r.dim() == 3:  # padded positions are unspecified in BERT/GPT-2 too
            keep = batch["attention_mask"].bool()
            r, g = r[keep], g[keep]
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    n_source = sum(p.numel() for p in source.parameters())
    n_poly = sum(p.numel() for p in poly.parameters())
    assert n_poly == n_source


def test_conversion_to_he_friendly_architecture_then_polynomial():
    source = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    poly = hf_polyhe.convert_to_poly(source, attention_type="pointwise", norm_type="poly_layernorm", hidden_act="gelu").eval()
    assert poly.config.attention_type == "pointwise"
    torch.testing.assert_close(poly.transformer.wte.weight, source.transformer.wte.weight)
    torch.testing.assert_close(poly.transformer.h[0].attn.q_proj.weight, source.transformer.h[0].attn.c_attn.weight[:, :32].t())
    assert not hf_polyhe.polynomial_status(poly).is_polynomial
    hf_polyhe.to_polynomial(poly, calibration_data=[_text_inputs()])
    assert hf_polyhe.polynomial_status(poly).is_polynomial
    assert torch.isfinite(poly(**_text_inputs()).logits).all()


def test_converted_generate_matches_source():
    source = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    poly = hf_polyhe.convert_to_poly(source).eval()
    prompt = torch.randint(1, 97, (1, 4))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(source.generate(prompt, **kw), poly.generate(prompt, **kw))


def test_unsupported_model_is_refused():
    from transformers import GPT2ForSequenceClassification

    with pytest.raises(ValueError, match="cannot convert GPT2ForSequenceClassification; accepted: GPT2LMHeadModel"):
        hf_polyhe.convert_to_poly(GPT2ForSequenceClassification(GPT2Config(**GPT2)))


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match=r"unknown PolyGPTConfig field\(s\) 'degree' .*did you mean 'poly_degree'"):
        hf_polyhe.convert_to_poly(GPT2LMHeadModel(GPT2Config(**GPT2)), attention_type="pointwise", degree=31)


def test_quick_path_on_a_trained_checkpoint_needs_calibration():
    """A trained BERT's operator inputs leave the default intervals (here: GELU inputs up to ~20 where the default
    is [-8, 8]), so fitting on them gives NaN everywhere: to_polynomial warns. With calibration_data it measures
    the ranges (exact operators first) and the polynomial model tracks the exact one."""
    source = BertModel(BertConfig(**BERT)).eval()
    with torch.no_grad():  # activations of a trained checkpoint: far larger than those of a fresh init
        for name, p in source.named_parameters():
            if "intermediate.dense.weight" in name:
                p.mul_(30.0)
    he = hf_polyhe.convert_to_poly(source, attention_type="pointwise", norm_type="poly_layernorm").eval()
    calibration = [{"input_ids": torch.randint(1, 97, (4, 16))} for _ in range(3)]
    held_out = {"input_ids": torch.randint(1, 97, (4, 16))}
    with torch.no_grad():
        exact = he(**held_out).last_hidden_state

    quick = copy.deepcopy(he)
    with pytest.warns(UserWarning, match="10 operator.*never saw calibration data.*calibration_data="):
        hf_polyhe.to_polynomial(quick)
    with torch.no_grad():
        assert not torch.isfinite(quick(**held_out).last_hidden_state).any()  # what the warning is about

    for model in (copy.deepcopy(he), quick):  # quick: measured with its operators exact again, not its NaN polynomials
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            hf_polyhe.to_polynomial(model, calibration_data=calibration)
        assert hf_polyhe.polynomial_status(model).is_polynomial
        assert all(op.calibrated for op in hf_polyhe.nn.poly_operators(model).values())
        with torch.no_grad():
            got = model(**held_out).last_hidden_state
        assert torch.isfinite(got).all() and float((got - exact).norm() / exact.norm()) < 0.1


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_masked_lm_decoder_bias_is_copied(tie):
    """BERT's forward adds the decoder's bias (the same tensor as cls.predictions.bias only when tied)."""
    source = BertForMaskedLM(BertConfig(**BERT, tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        source.cls.predictions.decoder.bias.normal_()
        source.cls.predictions.decoder.weight.normal_()
    poly = hf_polyhe.convert_to_poly(source).eval()
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(poly(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert poly.lm_head.decoder.bias is poly.lm_head.bias
