"""PolyViT: a Vision Transformer classifier with HE-friendly operators.

Follows ``transformers/models/vit/modeling_vit.py``: patch embedding (a strided convolution, i.e. a linear
map of each patch), CLS token, learned positions, pre-norm layers, final norm, classifier on the CLS token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...nn import PolyBlock, PolyPooler, PolyPreTrainedModel, build_attention_mask, make_norm
from ..poly_bert.modeling_poly_bert import classification_loss
from .configuration_poly_vit import PolyViTConfig


class PolyViTPreTrainedModel(PolyPreTrainedModel):
    config_class = PolyViTConfig
    config: PolyViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    _no_split_modules = ["PolyBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PolyViTEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings, std=self.config.initializer_range)
            nn.init.trunc_normal_(module.cls_token, std=self.config.initializer_range)


class PolyViTPatchEmbeddings(nn.Module):
    def __init__(self, config: PolyViTConfig):
        super().__init__()
        self.image_size, self.num_channels = config.image_size, config.num_channels
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values):
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (self.num_channels, self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class PolyViTEmbeddings(nn.Module):
    def __init__(self, config: PolyViTConfig):
        super().__init__()
        self.patch_embeddings = PolyViTPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.patch_embeddings.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values):
        patches = self.patch_embeddings(pixel_values.to(self.cls_token.dtype))
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, patches], dim=1) + self.position_embeddings)


class PolyViTModel(PolyViTPreTrainedModel):
    def __init__(self, config: PolyViTConfig, add_pooling_layer: Optional[bool] = None):
        """``add_pooling_layer``: build the pooler (default: ``config.add_pooling_layer``, which a model converted
        from a pooler-less original sets to ``False``, so that ``from_pretrained`` rebuilds it without one)."""
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = getattr(config, "add_pooling_layer", True)
        self.embeddings = PolyViTEmbeddings(config)
        self.layers = nn.ModuleList(PolyBlock(config, i, pre_norm=True) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.pooler = PolyPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values=None, **kwargs) -> BaseModelOutputWithPooling:
        """``hidden_states`` (``output_hidden_states=True``): the embeddings and the output of each layer, the last
        one before the final norm (as in ViT)."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        hidden_states = self.embeddings(pixel_values)
        batch, length = hidden_states.shape[:2]
        mask = build_attention_mask(None, batch, length, length, causal=False, device=hidden_states.device, dtype=hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        hidden_states = self.norm(hidden_states)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class PolyViTForImageClassification(PolyViTPreTrainedModel):
    def __init__(self, config: PolyViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = PolyViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(self, pixel_values=None, labels=None, **kwargs) -> ImageClassifierOutput:
        outputs = self.vit(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


__all__ = ["PolyViTPreTrainedModel", "PolyViTModel", "PolyViTForImageClassification"]
