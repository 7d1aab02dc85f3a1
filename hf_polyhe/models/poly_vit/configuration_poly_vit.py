"""PolyViT configuration."""

from __future__ import annotations

from ...nn.configuration import POLY_CONFIG_DOC, PolyPretrainedConfig


class PolyViTConfig(PolyPretrainedConfig):
    r"""Configuration of a ViT image classifier with HE-friendly operators.

    Args:
        image_size (`int`, defaults to 224), patch_size (`int`, defaults to 16), num_channels (`int`, defaults to 3).
        hidden_size (`int`, defaults to 768), num_hidden_layers (`int`, defaults to 12),
        num_attention_heads (`int`, defaults to 12), intermediate_size (`int`, defaults to 3072).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`, defaults to 0.0), attention_probs_dropout_prob (`float`, defaults to 0.0).
        initializer_range (`float`, defaults to 0.02), layer_norm_eps (`float`, defaults to 1e-12).
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projections.
        pooler_act (`str`, defaults to `"tanh"`): activation of the optional pooler.
        norm_type defaults to `"batchnorm"` here (the paper's vision setting), with a BatchNorm in the MLP.
    """ + POLY_CONFIG_DOC

    model_type = "poly_vit"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    pooler_act: str = "tanh"
    norm_type: str = "batchnorm"

    def __post_init__(self, **kwargs):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        super().__post_init__(**kwargs)


__all__ = ["PolyViTConfig"]
