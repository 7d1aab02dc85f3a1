"""``convert_to_poly``: standard GPT-2 / BERT / ViT models of transformers -> PolyGPT / PolyBert / PolyViT.

Every weight is copied (a rule table per family maps source names to ours; an unmapped source weight or
an unfilled target weight is an error). By default attention stays softmax and operators stay exact, so
the converted model computes the same function; pass overrides (``attention_type="pointwise"``,
``norm_type="poly_layernorm"``, ...) to get an HE-friendly architecture to fine-tune.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel

from .models.poly_bert import PolyBertConfig, PolyBertForMaskedLM, PolyBertForSequenceClassification, PolyBertModel
from .models.poly_gpt import PolyGPTConfig, PolyGPTForCausalLM, PolyGPTModel
from .models.poly_vit import PolyViTConfig, PolyViTForImageClassification, PolyViTModel

Rule = tuple  # (source regex, target template | callable(match, tensor) -> list[(name, tensor)] | None to skip)


def _split_gpt2_qkv(match, tensor):
    """GPT-2's fused ``c_attn`` (Conv1D, weight ``(d, 3d)``) -> ``q_proj``, ``k_proj``, ``v_proj`` (Linear)."""
    prefix, kind = match.group(1), match.group(2)
    parts = tensor.chunk(3, dim=-1)
    return [(f"{prefix}attn.{n}_proj.{kind}", p.t().contiguous() if kind == "weight" else p) for n, p in zip("qkv", parts)]


def _conv1d(target):
    """GPT-2 Conv1D stores ``(in, out)``; Linear wants ``(out, in)``."""

    def rule(match, tensor):
        name = match.expand(target)
        return [(name, tensor.t().contiguous() if name.endswith("weight") else tensor)]

    return rule


GPT2_RULES: list = [
    (r"(transformer\.)?(wte|wpe)\.weight", r"\1\2.weight"),
    (r"(transformer\.)?h\.(\d+)\.ln_1\.(weight|bias)", r"\1h.\2.attention_norm.\3"),
    (r"(transformer\.)?h\.(\d+)\.ln_2\.(weight|bias)", r"\1h.\2.mlp_norm.\3"),
    (r"((?:transformer\.)?h\.\d+\.)attn\.c_attn\.(weight|bias)", _split_gpt2_qkv),
    (r"(transformer\.)?h\.(\d+)\.attn\.c_proj\.(weight|bias)", _conv1d(r"\1h.\2.attn.o_proj.\3")),
    (r"(transformer\.)?h\.(\d+)\.mlp\.c_fc\.(weight|bias)", _conv1d(r"\1h.\2.mlp.fc_in.\3")),
    (r"(transformer\.)?h\.(\d+)\.mlp\.c_proj\.(weight|bias)", _conv1d(r"\1h.\2.mlp.fc_out.\3")),
    (r"(transformer\.)?ln_f\.(weight|bias)", r"\1ln_f.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]

BERT_RULES: list = [
    (r"(bert\.)?embeddings\.(word|position|token_type)_embeddings\.weight", r"\1embeddings.\2_embeddings.weight"),
    (r"(bert\.)?embeddings\.LayerNorm\.(weight|bias)", r"\1embeddings.norm.\2"),
    (r"(bert\.)?encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
     lambda m, t: [(f"{m.group(1) or ''}layers.{m.group(2)}.attn.{m.group(3)[0]}_proj.{m.group(4)}", t)]),
    (r"(bert\.)?encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"\1layers.\2.attn.o_proj.\3"),
    (r"(bert\.)?encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"\1layers.\2.attention_norm.\3"),
    (r"(bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"\1layers.\2.mlp.fc_in.\3"),
    (r"(bert\.)?encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"\1layers.\2.mlp.fc_out.\3"),
    (r"(bert\.)?encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"\1layers.\2.mlp_norm.\3"),
    (r"(bert\.)?pooler\.dense\.(weight|bias)", r"\1pooler.dense.\2"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"lm_head.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"lm_head.norm.\1"),
    # The bias BERT's forward adds is the decoder's; cls.predictions.bias is the same tensor when the embeddings are
    # tied and an unused one otherwise (transformers 5 ties it only with tie_word_embeddings).
    (r"cls\.predictions\.decoder\.bias", r"lm_head.bias"),
    (r"cls\.predictions\.bias", None),
    (r"cls\.predictions\.decoder\.weight", r"lm_head.decoder.weight"),
]

VIT_RULES: list = [
    (r"(vit\.)?embeddings\.(cls_token|position_embeddings)", r"\1embeddings.\2"),
    (r"(vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", r"\1embeddings.patch_embeddings.projection.\2"),
    (r"(vit\.)?layers\.(\d+)\.attention\.(q|k|v|o)_proj\.(weight|bias)", r"\1layers.\2.attn.\3_proj.\4"),
    (r"(vit\.)?layers\.(\d+)\.layernorm_before\.(weight|bias)", r"\1layers.\2.attention_norm.\3"),
    (r"(vit\.)?layers\.(\d+)\.layernorm_after\.(weight|bias)", r"\1layers.\2.mlp_norm.\3"),
    (r"(vit\.)?layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"\1layers.\2.mlp.fc_in.\3"),
    (r"(vit\.)?layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"\1layers.\2.mlp.fc_out.\3"),
    (r"(vit\.)?layernorm\.(weight|bias)", r"\1norm.\2"),
    (r"(vit\.)?pooler\.dense\.(weight|bias)", r"\1pooler.dense.\2"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
]


def _gpt2_config(c) -> dict:
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    if getattr(c, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not supported")
    return dict(
        vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, intermediate_size=c.n_inner or 4 * c.n_embd,
        hidden_act=c.activation_function, hidden_dropout_prob=c.resid_pdrop, attention_probs_dropout_prob=c.attn_pdrop,
        layer_norm_eps=c.layer_norm_epsilon, initializer_range=c.initializer_range, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, tie_word_embeddings=c.tie_word_embeddings,
    )


def _bert_config(c) -> dict:
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        raise ValueError("BERT as a decoder / with cross-attention is not supported")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
        hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        initializer_range=c.initializer_range, layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_token_id,
        classifier_dropout=c.classifier_dropout, tie_word_embeddings=c.tie_word_embeddings,
    )


def _vit_config(c) -> dict:
    if not isinstance(c.image_size, int) or not isinstance(c.patch_size, int):
        raise ValueError(f"only square images/patches are supported, got image_size={c.image_size}, patch_size={c.patch_size}")
    return dict(
        image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels, hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size, hidden_act=c.hidden_act, hidden_dropout_prob=c.hidden_dropout_prob,
        attention_probs_dropout_prob=c.attention_probs_dropout_prob, initializer_range=c.initializer_range,
        layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias, pooler_act=getattr(c, "pooler_act", "tanh"),
    )


@dataclass
class ConversionSpec:
    target_class: type
    config_class: type
    config_map: Callable
    rules: list
    model_kwargs: dict | None = None


# Exact-preserving architecture: what the standard models compute.
EXACT_OVERRIDES = {"attention_type": "softmax", "norm_type": "layernorm"}

CONVERSIONS: dict[str, ConversionSpec] = {
    "GPT2LMHeadModel": ConversionSpec(PolyGPTForCausalLM, PolyGPTConfig, _gpt2_config, GPT2_RULES),
    "GPT2Model": ConversionSpec(PolyGPTModel, PolyGPTConfig, _gpt2_config, GPT2_RULES),
    "BertModel": ConversionSpec(PolyBertModel, PolyBertConfig, _bert_config, BERT_RULES),
    "BertForMaskedLM": ConversionSpec(PolyBertForMaskedLM, PolyBertConfig, _bert_config, BERT_RULES),
    "BertForSequenceClassification": ConversionSpec(
        PolyBertForSequenceClassification, PolyBertConfig, _bert_config, BERT_RULES
    ),
    "ViTModel": ConversionSpec(PolyViTModel, PolyViTConfig, _vit_config, VIT_RULES),
    "ViTForImageClassification": ConversionSpec(PolyViTForImageClassification, PolyViTConfig, _vit_config, VIT_RULES),
}


def _map_state_dict(state_dict: dict, rules: list) -> dict:
    out = {}
    compiled = [(re.compile(p + r"$"), t) for p, t in rules]
    for key, tensor in state_dict.items():
        for pattern, target in compiled:
            m = pattern.match(key)
            if not m:
                continue
            if target is None:
                pass
            elif callable(target):
                out.update(target(m, tensor))
            else:
                out[m.expand(target)] = tensor
            break
        else:
            raise ValueError(f"don't know where to copy source weight {key!r} (shape {tuple(tensor.shape)})")
    return out


def config_fields(config_class) -> list[str]:
    """The fields a config class declares (its own and ``PreTrainedConfig``'s), plus settable properties
    such as ``num_labels``."""
    names = [f.name for f in dataclasses.fields(config_class)]
    props = [k for k in dir(config_class) if isinstance(getattr(config_class, k, None), property)
             and getattr(config_class, k).fset is not None and not k.startswith("_")]
    return sorted(set(names) | set(props))


def convert_to_poly(model: PreTrainedModel, **overrides) -> PreTrainedModel:
    """Build the Poly counterpart of a transformers GPT-2 / BERT / ViT model and copy every weight.

    ``overrides`` set Poly config fields (e.g. ``attention_type="pointwise"``, ``norm_type="poly_layernorm"``,
    ``hidden_act="relu"``); anything else (``degree=31`` instead of ``poly_degree=31``) raises ``ValueError``.
    With none, attention stays softmax and norms exact: outputs are unchanged."""
    name = type(model).__name__
    if name not in CONVERSIONS:
        raise ValueError(f"cannot convert {name}; accepted: {', '.join(CONVERSIONS)}")
    spec = CONVERSIONS[name]
    fields = config_fields(spec.config_class)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, fields, n=1, cutoff=0.6)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown {spec.config_class.__name__} field(s) {', '.join(map(repr, unknown))} for "
                         f"convert_to_poly{hint}; accepted: {', '.join(fields)}")
    src = model.config
    kwargs = {**spec.config_map(src), **EXACT_OVERRIDES}
    if getattr(src, "id2label", None) is not None:
        kwargs.update(id2label=dict(src.id2label), label2id=dict(src.label2id))
    if getattr(src, "problem_type", None) is not None:
        kwargs["problem_type"] = src.problem_type
    kwargs.update(overrides)
    config = spec.config_class(**kwargs)
    target = spec.target_class(config)
    if name in ("BertModel", "ViTModel"):
        has_pooler = getattr(model, "pooler", None) is not None
        if not has_pooler:
            target.pooler = None
            config.add_pooling_layer = False  # saved with the config: from_pretrained builds no pooler either
    mapped = _map_state_dict(model.state_dict(), spec.rules)
    tied = set(target.all_tied_weights_keys)  # honours tie_word_embeddings (the MLM bias is tied either way)
    for k in tied:
        mapped.pop(k, None)
    own = target.state_dict()
    for k, t in mapped.items():
        if k in own and own[k].shape != t.shape:
            raise ValueError(f"shape mismatch for {k}: source {tuple(t.shape)} vs target {tuple(own[k].shape)}")
    result = target.load_state_dict(mapped, strict=False)
    # The MLP BatchNorm (mlp_batchnorm=True) has no counterpart in the source: it keeps its identity init.
    missing = [k for k in result.missing_keys if k not in tied and ".mlp.norm." not in k
               and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"conversion left weights unfilled {missing} or unused {result.unexpected_keys}")
    target.tie_weights()
    target.train(model.training)
    return target
