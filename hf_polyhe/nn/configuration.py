"""Fields shared by the three PolyXXX configs: the HE-friendly architecture choices."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .attention import ATTENTION_SCALINGS, ATTENTION_TYPES, SCALING_POSITIONS
from .norms import NORM_TYPES
from .operators import accepted_activations, canonical_activation, check_names, operator_names

POLY_CONFIG_DOC = r"""
    HE-friendly architecture (shared by PolyGPT, PolyBert and PolyViT):

        attention_type (`str`, defaults to `"pointwise"`):
            `"softmax"` (baseline, no polynomial form), `"pointwise"` (σ(QKᵀ/√d) scaled by sequence length)
            or `"power"` (power-softmax Sᵖ/ΣSᵖ).
        attention_activation (`str`, defaults to `"relu"`):
            σ for pointwise attention: `"relu"`, `"gelu"`, `"squared_relu"` (approximated by polynomials)
            or `"square"` (already a polynomial).
        attention_scaling (`str`, defaults to `"sqrt_length"`):
            s(n) for pointwise attention, n = number of attended keys of each query: `"none"`, `"length"`
            (1/n) or `"sqrt_length"` (1/√n, the paper's best).
        attention_scaling_position (`str`, defaults to `"post"`): scale before (`"pre"`) or after (`"post"`) σ.
        attention_power (`int`, defaults to 4): the even power p of power-softmax.
        norm_type (`str`): `"layernorm"` (exact only), `"poly_layernorm"` (1/√var as a polynomial) or
            `"batchnorm"` (affine at inference; vision).
        mlp_batchnorm (`bool`, *optional*): BatchNorm inside the MLP (the paper's vision variant); defaults
            to `norm_type == "batchnorm"`.
        poly_degree (`int`, defaults to 15): default polynomial degree of every approximated operator.
        poly_degrees (`dict[str, int]`, *optional*): per-operator degrees, e.g. `{"inv_sqrt": 31}`.
        poly_operators (`dict`, *optional*): fitted approximations and modes by module path; written into the
            saved config.json by the model's `save_pretrained` (never into the live config), not meant to be
            edited by hand.
"""


class PolyPretrainedConfig(PreTrainedConfig):
    """Base of the PolyGPT / PolyBert / PolyViT configs (not registered itself)."""

    attention_type: str = "pointwise"
    attention_activation: str = "relu"
    attention_scaling: str = "sqrt_length"
    attention_scaling_position: str = "post"
    attention_power: int = 4
    norm_type: str = "poly_layernorm"
    mlp_batchnorm: bool | None = None
    poly_degree: int = 15
    poly_degrees: dict[str, Any] | None = None
    poly_operators: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        if self.mlp_batchnorm is None:
            self.mlp_batchnorm = self.norm_type == "batchnorm"
        self.hidden_act = canonical_activation(self.hidden_act)
        super().__post_init__(**kwargs)
        self.check_he_options()

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to do: saved Poly models always carry their ``auto_map`` and code files (see
        ``PolyPreTrainedModel.save_pretrained``); transformers calls this after loading remote code."""

    def check_he_options(self) -> None:
        """Raise ``ValueError`` naming the bad value and the accepted ones."""

        def one_of(name, value, accepted):
            if value not in accepted:
                raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(str, accepted))}")

        one_of("attention_type", self.attention_type, list(ATTENTION_TYPES))
        one_of("attention_scaling", self.attention_scaling, list(ATTENTION_SCALINGS))
        one_of("attention_scaling_position", self.attention_scaling_position, list(SCALING_POSITIONS))
        one_of("norm_type", self.norm_type, list(NORM_TYPES))
        one_of("attention_activation", canonical_activation(self.attention_activation), accepted_activations())
        one_of("hidden_act", self.hidden_act, accepted_activations())
        if self.attention_type == "power" and (self.attention_power < 2 or self.attention_power % 2):
            raise ValueError(f"attention_power must be an even integer >= 2, got {self.attention_power}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.poly_degree < 1:
            raise ValueError(f"poly_degree must be >= 1, got {self.poly_degree}")
        degrees = self.poly_degrees or {}
        check_names(list(degrees), operator_names(), "operator name(s) in poly_degrees")
        bad = {k: v for k, v in degrees.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"poly_degrees values must be integers >= 1, got {bad}")
