import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_config(family: str, **overrides):
    """Tiny configs for the three families (shared by tests)."""
    import hf_polyhe

    if family == "gpt":
        return hf_polyhe.PolyGPTConfig(vocab_size=97, max_position_embeddings=32, **{**TINY, **overrides})
    if family == "bert":
        return hf_polyhe.PolyBertConfig(vocab_size=97, max_position_embeddings=32, num_labels=3, **{**TINY, **overrides})
    if family == "vit":
        return hf_polyhe.PolyViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=5, **{**TINY, **overrides})
    raise ValueError(family)


def tiny_inputs(family: str, batch: int = 2, length: int = 9):
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8)}
    ids = torch.randint(1, 97, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}
