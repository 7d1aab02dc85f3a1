"""PolyGPT: a GPT-2-style causal language model whose non-polynomial operators can become polynomials.

Layout follows ``transformers/models/gpt2/modeling_gpt2.py``: ``PolyGPTModel`` (embeddings, blocks, final
norm) and ``PolyGPTForCausalLM`` (tied LM head, ``generate()`` through ``GenerationMixin`` and the v5
``Cache`` API). Attention, norms and activations come from :mod:`hf_polyhe.nn`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...nn import PolyBlock, PolyPreTrainedModel, build_attention_mask, make_norm
from .configuration_poly_gpt import PolyGPTConfig


class PolyGPTPreTrainedModel(PolyPreTrainedModel):
    config_class = PolyGPTConfig
    config: PolyGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["PolyBlock"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        super()._init_weights(module)
        # GPT-2's scheme: the two projections of each block that write into the residual stream start smaller by
        # 1/sqrt(2 * num_hidden_layers). Without it the softmax baseline of benchmarks/poly_quality.py (4 layers,
        # d=128, 400 steps) reached held-out perplexity 131 where GPT2LMHeadModel of the same size reached 69.
        # (Marked on the Linear layers themselves: transformers skips custom modules without own parameters.)
        if isinstance(module, nn.Linear) and getattr(module, "_writes_residual", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)


class PolyGPTModel(PolyGPTPreTrainedModel):
    def __init__(self, config: PolyGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.h = nn.ModuleList(PolyBlock(config, i, pre_norm=True) for i in range(config.num_hidden_layers))
        for block in self.h:
            block.attn.o_proj._writes_residual = block.mlp.fc_out._writes_residual = True
        self.ln_f = make_norm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``output_hidden_states`` / ``output_attentions`` / ``return_dict`` are handled by ``capture_outputs``:
        ``hidden_states`` are the embeddings and the output of each block, the last one after ``ln_f``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + length} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        mask = build_attention_mask(
            attention_mask, batch, length, past + length, causal=True, device=hidden_states.device, dtype=hidden_states.dtype
        )
        for block in self.h:
            hidden_states = block(hidden_states, mask, past_key_values=past_key_values if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.ln_f(hidden_states), past_key_values=past_key_values if use_cache else None
        )


class PolyGPTForCausalLM(PolyGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: PolyGPTConfig):
        super().__init__(config)
        self.transformer = PolyGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``labels`` are shifted inside (set ``labels = input_ids``); -100 is ignored."""
        outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # whatever config.return_dict says: this head reads the fields
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


__all__ = ["PolyGPTPreTrainedModel", "PolyGPTModel", "PolyGPTForCausalLM"]
