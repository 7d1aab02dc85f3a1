"""MLP, transformer block and pooler shared by PolyGPT, PolyBert and PolyViT."""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import PolyAttention
from .norms import SequenceBatchNorm, make_norm
from .operators import make_activation


class PolyMLP(nn.Module):
    """``fc_out(act(bn?(fc_in(x))))``; the BatchNorm inside the MLP is the paper's vision variant."""

    def __init__(self, config, layer_idx: Optional[int] = None):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.norm = SequenceBatchNorm(config.intermediate_size, eps=config.layer_norm_eps) if config.mlp_batchnorm else None
        self.act = make_activation(config.hidden_act, config, "mlp_act", layer_idx)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x):
        x = self.fc_in(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(self.fc_out(self.act(x)))


class PolyBlock(GradientCheckpointingLayer):
    """One transformer layer: pre-norm (GPT-2, ViT) or post-norm (BERT).

    A ``GradientCheckpointingLayer``: after ``model.gradient_checkpointing_enable()`` its activations are recomputed
    in the backward pass instead of kept (pass ``hidden_states`` positionally, the cache by keyword)."""

    def __init__(self, config, layer_idx: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.attention_norm = make_norm(config, layer_idx=layer_idx)
        self.attn = PolyAttention(config, layer_idx=layer_idx)
        self.mlp_norm = make_norm(config, layer_idx=layer_idx)
        self.mlp = PolyMLP(config, layer_idx=layer_idx)

    def forward(self, hidden_states, mask, past_key_values=None):
        if self.pre_norm:
            hidden_states = hidden_states + self.attn(self.attention_norm(hidden_states), mask, past_key_values)[0]
            return hidden_states + self.mlp(self.mlp_norm(hidden_states))
        hidden_states = self.attention_norm(hidden_states + self.attn(hidden_states, mask, past_key_values)[0])
        return self.mlp_norm(hidden_states + self.mlp(hidden_states))


class PolyPooler(nn.Module):
    """``tanh(dense(h[:, 0]))`` as in BERT / ViT, with tanh as a PolyOperator."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = make_activation(getattr(config, "pooler_act", "tanh"), config, "pooler_act")

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))
