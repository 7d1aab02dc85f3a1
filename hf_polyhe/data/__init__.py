"""Offline text for demos, tests and benchmarks, and a tokenizer trained on it.

``load_tiny_corpus()`` is an excerpt of the Python Language Reference shipped with this package (PSF
License). ``load_python_docs_corpus()`` is the whole reference as it ships inside CPython itself
(``pydoc_data.topics``, ~450k characters of real English prose) -- available offline wherever Python is.
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Iterable, Optional

TINY_CORPUS = "python_reference_excerpt.txt"


def load_tiny_corpus() -> str:
    return resources.files(__name__).joinpath(TINY_CORPUS).read_text(encoding="utf-8")


def load_python_docs_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_paragraphs(text: str, min_chars: int = 40) -> list[str]:
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if len(p) >= min_chars]


def train_test_split(items: list, test_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_test = max(1, int(len(items) * test_fraction))
    return items[n_test:], items[:n_test]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 128, **special_tokens):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained locally with the ``tokenizers`` library.

    ``special_tokens`` override the defaults (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``,
    and for encoders ``mask_token``/``cls_token``/``sep_token``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
    specials.update(special_tokens)
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(specials.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **specials)


def tiny_tokenizer(vocab_size: int = 512, **special_tokens):
    """Tokenizer trained on :func:`load_tiny_corpus` (a second or two)."""
    return train_tokenizer(split_paragraphs(load_tiny_corpus()), vocab_size=vocab_size, **special_tokens)


def lm_blocks(tokenizer, texts: Iterable[str], block_size: int, max_blocks: Optional[int] = None) -> list[list[int]]:
    """Concatenate tokenised texts (separated by EOS) and cut them into ``block_size`` token blocks."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return blocks[:max_blocks] if max_blocks else blocks
