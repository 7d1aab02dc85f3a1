"""Torch layers shared by PolyGPT, PolyBert and PolyViT."""

from .attention import ATTENTION_TYPES, PolyAttention, build_attention_mask
from .configuration import POLY_CONFIG_DOC, PolyPretrainedConfig
from .layers import PolyBlock, PolyMLP, PolyPooler
from .modeling_utils import PolyPreTrainedModel, poly_operators
from .norms import NORM_TYPES, PolyLayerNorm, SequenceBatchNorm, make_norm
from .operators import EXACT_TORCH_FUNCTIONS, MODES, PolyOperator, make_activation

__all__ = [
    "ATTENTION_TYPES",
    "EXACT_TORCH_FUNCTIONS",
    "MODES",
    "NORM_TYPES",
    "POLY_CONFIG_DOC",
    "PolyAttention",
    "PolyBlock",
    "PolyLayerNorm",
    "PolyMLP",
    "PolyOperator",
    "PolyPooler",
    "PolyPretrainedConfig",
    "PolyPreTrainedModel",
    "SequenceBatchNorm",
    "build_attention_mask",
    "make_activation",
    "make_norm",
    "poly_operators",
]
