"""Softmax-free attention (Zimerman et al., ICML 2024) with multiplicative masks.

``Attn(Q, K, V) = W · V`` where the weights ``W`` come from the scores ``S = QKᵀ/√d`` and a 0/1 mask ``M``:

- ``softmax``: the baseline, ``softmax(S)`` over unmasked keys.
- ``pointwise``: ``σ(S) ⊙ M / s(n)`` with σ pointwise (relu, gelu, squared_relu or the polynomial
  ``square``), ``n`` the number of unmasked keys of each query row and ``s(n)`` one of ``1``, ``n`` or
  ``√n``, applied before σ (``σ(S / s(n))``) or after it (``attention_scaling_position``).
  Per-row counts keep a causal model causal: row ``i`` divides by its own ``i + 1`` keys, so cached
  generation gives the same numbers as a full forward pass.
- ``power``: power-softmax ``Sᵖ ⊙ M / Σ Sᵖ ⊙ M`` with even ``p``; the division is
  ``(Sᵖ ⊙ M / n) · reciprocal(mean of Sᵖ ⊙ M)`` so the reciprocal sees a mean, not a growing sum.

The mask is multiplied after σ because a polynomial σ(0) is not exactly 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .operators import PolyOperator, make_activation, poly_degree

ATTENTION_SCALINGS = {
    "none": lambda n: torch.ones_like(n),
    "length": lambda n: n,
    "sqrt_length": torch.sqrt,
}
SCALING_POSITIONS = ("pre", "post")
POWER_EPS = 1e-6


def build_attention_mask(
    attention_mask: Optional[torch.Tensor],
    batch_size: int,
    query_length: int,
    key_length: int,
    causal: bool,
    device,
    dtype=torch.float32,
) -> torch.Tensor:
    """Multiplicative 0/1 mask of shape ``(batch, 1, query_length, key_length)``.

    ``attention_mask`` is the usual ``(batch, key_length)`` padding mask (1 = attend). Queries are the
    last ``query_length`` of the ``key_length`` positions (the others are in the KV cache)."""
    mask = torch.ones(batch_size, 1, query_length, key_length, device=device, dtype=dtype)
    if causal:
        past = key_length - query_length
        q = torch.arange(query_length, device=device)[:, None] + past
        k = torch.arange(key_length, device=device)[None, :]
        mask = mask * (k <= q).to(dtype)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask must have shape (batch, {key_length}) (past + current tokens), "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = mask * attention_mask[:, None, None, :].to(dtype)
    return mask


def softmax_weights(module, scores, mask):
    scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * (mask.sum(-1, keepdim=True) > 0)


def pointwise_weights(module, scores, mask):
    scale = ATTENTION_SCALINGS[module.scaling](mask.sum(-1, keepdim=True).clamp(min=1.0))
    if module.scaling_position == "pre":
        return module.score_activation(scores / scale) * mask
    return module.score_activation(scores) * mask / scale


def power_weights(module, scores, mask):
    n = mask.sum(-1, keepdim=True).clamp(min=1.0)
    powered = scores**module.power * mask / n
    return powered * module.normalizer(powered.sum(-1, keepdim=True) + POWER_EPS)


ATTENTION_TYPES = {"softmax": softmax_weights, "pointwise": pointwise_weights, "power": power_weights}


class PolyAttention(nn.Module):
    """Multi-head self-attention with the weights chosen by ``config.attention_type``."""

    def __init__(self, config, layer_idx: Optional[int] = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        bias = getattr(config, "qkv_bias", True)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.resid_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_type = config.attention_type
        self.scaling = config.attention_scaling
        self.scaling_position = config.attention_scaling_position
        self.power = config.attention_power
        if self.attention_type == "pointwise":
            self.score_activation = make_activation(config.attention_activation, config, "attn_act", layer_idx)
        elif self.attention_type == "power":
            self.normalizer = PolyOperator(
                "reciprocal", degree=poly_degree(config, "reciprocal"), role="attn_norm", layer_idx=layer_idx
            )

    def _split(self, x):
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, mask, past_key_values=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, weights)``: the attention output and the weights ``W`` (after dropout, as in GPT-2's eager
        attention), ``(batch, heads, query_length, key_length)``; ``output_attentions=True`` returns the latter."""
        q = self._split(self.q_proj(hidden_states))
        k = self._split(self.k_proj(hidden_states))
        v = self._split(self.v_proj(hidden_states))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        weights = self.attn_dropout(ATTENTION_TYPES[self.attention_type](self, scores, mask))
        out = torch.matmul(weights, v).transpose(1, 2).reshape(hidden_states.shape)
        return self.resid_dropout(self.o_proj(out)), weights
