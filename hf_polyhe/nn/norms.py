"""Normalisation layers: exact LayerNorm, LayerNorm with a polynomial inverse square root, and BatchNorm.

``poly_layernorm`` computes ``(x - mean) * inv_sqrt(var + eps) * weight + bias`` where ``inv_sqrt`` is a
:class:`~hf_polyhe.nn.operators.PolyOperator`; in exact mode it equals ``nn.LayerNorm``. ``batchnorm``
(vision, as in the paper) becomes an affine map at inference, so it is polynomial for free.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .operators import PolyOperator, poly_degree


class PolyLayerNorm(nn.Module):
    """LayerNorm over the last dimension whose ``1/sqrt(var + eps)`` is a :class:`PolyOperator`.

    The variance input of ``inv_sqrt`` is what the variance loss keeps small."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, config=None, layer_idx: Optional[int] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps
        degree = poly_degree(config, "inv_sqrt") if config is not None else 15
        self.inv_sqrt = PolyOperator("inv_sqrt", degree=degree, role="norm", layer_idx=layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(-1, keepdim=True)
        return centered * self.inv_sqrt(var + self.eps) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SequenceBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature dimension of ``(batch, seq, features)`` tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


def _layernorm(config, dim, layer_idx):
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


def _poly_layernorm(config, dim, layer_idx):
    return PolyLayerNorm(dim, eps=config.layer_norm_eps, config=config, layer_idx=layer_idx)


def _batchnorm(config, dim, layer_idx):
    return SequenceBatchNorm(dim, eps=config.layer_norm_eps)


NORM_TYPES = {"layernorm": _layernorm, "poly_layernorm": _poly_layernorm, "batchnorm": _batchnorm}


def make_norm(config, dim: Optional[int] = None, layer_idx: Optional[int] = None) -> nn.Module:
    """The normalisation layer chosen by ``config.norm_type``."""
    if config.norm_type not in NORM_TYPES:
        raise ValueError(f"unknown norm_type {config.norm_type!r}; accepted: {', '.join(NORM_TYPES)}")
    return NORM_TYPES[config.norm_type](config, dim or config.hidden_size, layer_idx)
