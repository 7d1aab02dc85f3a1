"""PolyGPT configuration."""

from __future__ import annotations

from ...nn.configuration import POLY_CONFIG_DOC, PolyPretrainedConfig


class PolyGPTConfig(PolyPretrainedConfig):
    r"""Configuration of a GPT-2-style causal language model with HE-friendly operators.

    Args:
        vocab_size (`int`, defaults to 50257): vocabulary size.
        max_position_embeddings (`int`, defaults to 1024): longest sequence (learned positions).
        hidden_size (`int`, defaults to 768): model width d.
        num_hidden_layers (`int`, defaults to 12): number of transformer blocks.
        num_attention_heads (`int`, defaults to 12): heads per block (must divide `hidden_size`).
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`.
        hidden_act (`str`, defaults to `"gelu_new"`): MLP activation (`relu`, `gelu`, `gelu_new`, `silu`,
            `squared_relu`, `square`, `identity`).
        hidden_dropout_prob (`float`, defaults to 0.1): dropout on embeddings and residual branches.
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention weights.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the norms.
        initializer_range (`float`, defaults to 0.02): std of the normal weight init.
        use_cache (`bool`, defaults to `True`): return the KV cache.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head to the token embeddings.
    """ + POLY_CONFIG_DOC

    model_type = "poly_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)


__all__ = ["PolyGPTConfig"]
