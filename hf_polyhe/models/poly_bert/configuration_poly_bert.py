"""PolyBert configuration."""

from __future__ import annotations

from ...nn.configuration import POLY_CONFIG_DOC, PolyPretrainedConfig


class PolyBertConfig(PolyPretrainedConfig):
    r"""Configuration of a BERT-style encoder (masked LM, sequence classification) with HE-friendly operators.

    Args:
        vocab_size (`int`, defaults to 30522): vocabulary size.
        hidden_size (`int`, defaults to 768): model width d.
        num_hidden_layers (`int`, defaults to 12): number of (post-norm) transformer layers.
        num_attention_heads (`int`, defaults to 12): heads per layer.
        intermediate_size (`int`, defaults to 3072): MLP width.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`, defaults to 0.1), attention_probs_dropout_prob (`float`, defaults to 0.1).
        max_position_embeddings (`int`, defaults to 512): longest sequence.
        type_vocab_size (`int`, defaults to 2): number of token types (segments).
        initializer_range (`float`, defaults to 0.02), layer_norm_eps (`float`, defaults to 1e-12).
        pad_token_id (`int`, defaults to 0).
        classifier_dropout (`float`, *optional*): dropout before the classifier; defaults to `hidden_dropout_prob`.
        pooler_act (`str`, defaults to `"tanh"`): activation of the pooler (approximated like the others).
        tie_word_embeddings (`bool`, defaults to `True`): tie the MLM decoder to the word embeddings.
    """ + POLY_CONFIG_DOC

    model_type = "poly_bert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | int | None = None
    pooler_act: str = "tanh"
    tie_word_embeddings: bool = True


__all__ = ["PolyBertConfig"]
