"""PolyBert: a BERT-style post-norm encoder with HE-friendly operators.

Follows ``transformers/models/bert/modeling_bert.py``: embeddings (word + position + token type, norm),
post-norm layers, optional pooler; heads for masked LM and sequence classification.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...nn import PolyBlock, PolyPooler, PolyPreTrainedModel, build_attention_mask, make_activation, make_norm
from .configuration_poly_bert import PolyBertConfig


class PolyBertPreTrainedModel(PolyPreTrainedModel):
    config_class = PolyBertConfig
    config: PolyBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["PolyBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PolyBertLMHead):
            nn.init.zeros_(module.bias)


class PolyBertEmbeddings(nn.Module):
    def __init__(self, config: PolyBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        length = inputs_embeds.shape[1]
        if length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={self.max_positions}")
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        x = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class PolyBertModel(PolyBertPreTrainedModel):
    def __init__(self, config: PolyBertConfig, add_pooling_layer: Optional[bool] = None):
        """``add_pooling_layer``: build the pooler (default: ``config.add_pooling_layer``, which a model converted
        from a pooler-less original sets to ``False``, so that ``from_pretrained`` rebuilds it without one)."""
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = getattr(config, "add_pooling_layer", True)
        self.embeddings = PolyBertEmbeddings(config)
        self.layers = nn.ModuleList(PolyBlock(config, i, pre_norm=False) for i in range(config.num_hidden_layers))
        self.pooler = PolyPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """``hidden_states`` (``output_hidden_states=True``): the embeddings and the output of each layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        batch, length = hidden_states.shape[:2]
        mask = build_attention_mask(
            attention_mask, batch, length, length, causal=False, device=hidden_states.device, dtype=hidden_states.dtype
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class PolyBertLMHead(nn.Module):
    """``decoder(norm(act(dense(h))))``. As in BERT, the decoder's weight is tied to the word embeddings and its
    bias is ``self.bias`` (one tensor under two names), so ``resize_token_embeddings`` resizes both."""

    def __init__(self, config: PolyBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = make_activation(config.hidden_act, config, "head_act")
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states):
        return self.decoder(self.norm(self.act(self.dense(hidden_states))))


class PolyBertForMaskedLM(PolyBertPreTrainedModel):
    _tied_weights_keys = {
        "lm_head.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias",
    }

    def __init__(self, config: PolyBertConfig):
        super().__init__(config)
        self.bert = PolyBertModel(config, add_pooling_layer=False)
        self.lm_head = PolyBertLMHead(config)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # The decoder's bias is lm_head.bias even when tie_word_embeddings=False (transformers then ties nothing).
        return {**super().get_expanded_tied_weights_keys(all_submodels), "lm_head.decoder.bias": "lm_head.bias"}

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings
        self.lm_head.bias = new_embeddings.bias

    @can_return_tuple
    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, labels=None, **kwargs
    ) -> MaskedLMOutput:
        """``labels``: token ids at masked positions, -100 elsewhere."""
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.config.vocab_size), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def classification_loss(config, logits, labels):
    """The loss of ``BertForSequenceClassification``: regression, single- or multi-label."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class PolyBertForSequenceClassification(PolyBertPreTrainedModel):
    def __init__(self, config: PolyBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = PolyBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, labels=None, **kwargs
    ) -> SequenceClassifierOutput:
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


__all__ = [
    "PolyBertPreTrainedModel",
    "PolyBertModel",
    "PolyBertForMaskedLM",
    "PolyBertForSequenceClassification",
    "classification_loss",
]
