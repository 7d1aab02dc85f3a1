"""Offline text for demos, tests and benchmarks, and a tokenizer trained on it.

``load_tiny_corpus()`` is an excerpt of the Python Language Reference shipped with this package (PSF
License). ``load_python_docs_corpus()`` is the whole reference as it ships inside CPython itself
(``pydoc_data.topics``, ~450k characters of real English prose) -- available offline wherever Python is.
``load_stdlib_docstrings_corpus()`` is text of another source (the standard library's docstrings) for held-out
evaluation.
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


# Pure-Python standard-library modules whose docstrings make the held-out text of another source
STDLIB_DOC_MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.queues", "asyncio.tasks", "base64", "bisect", "calendar",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "email.utils", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json", "json.decoder", "json.encoder",
    "locale", "logging", "logging.handlers", "mailbox", "mimetypes", "netrc", "numbers", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri",
    "random", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wave", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
)


def load_stdlib_docstrings_corpus() -> str:
    """Docstrings of pure-Python standard-library modules (their modules, classes, functions and methods; about
    0.6M characters of English technical prose on CPython 3.10), one paragraph per docstring paragraph.

    A second source, written by other authors for another purpose than :func:`load_python_docs_corpus` (the
    language reference): held-out text for quality benchmarks that measures more than a split of one document.
    Modules missing on a platform are skipped; the text is deterministic for a given Python."""
    return load_docstrings_corpus(STDLIB_DOC_MODULES)


# Modules of hf_polyhe's own dependencies (numpy, datasets, accelerate) whose docstrings make a third source:
# training text of the docstring genre that shares no author or text with the standard library's held-out set
DEPENDENCY_DOC_MODULES = (
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial.polynomial",
    "numpy.lib.recfunctions", "datasets.arrow_dataset", "accelerate.accelerator",
)


def load_dependency_docstrings_corpus() -> str:
    """Docstrings of numpy, ``datasets`` and ``accelerate`` modules (about 1.5M characters; the installed versions
    decide the exact text): a third source, for training text more varied than the language reference that stays
    disjoint from :func:`load_stdlib_docstrings_corpus` (the held-out text). Numpy's docstrings of objects it
    re-exports from its submodules count once."""
    return load_docstrings_corpus(DEPENDENCY_DOC_MODULES, defined_in_submodules=True)


def load_docstrings_corpus(modules: Iterable[str], defined_in_submodules: bool = False) -> str:
    """The docstrings of ``modules`` (each module's own, and those of the public classes, their public methods and
    properties, and functions it defines), each once, in a deterministic order. Modules that fail to import are
    skipped. ``defined_in_submodules``: also the public objects a module re-exports from its own submodules, and
    callables that are not Python functions (numpy's ufuncs)."""
    import importlib
    import inspect

    seen, docs = set(), []

    def add(obj):
        doc = inspect.getdoc(obj) if not isinstance(obj, str) else obj
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module a platform lacks is skipped
            continue
        add(mod.__doc__)
        for attr, obj in sorted(vars(mod).items()):
            owner = getattr(obj, "__module__", None) or ""
            own = owner == mod.__name__ or (defined_in_submodules and owner.startswith(mod.__name__ + "."))
            if attr.startswith("_") or not own:
                continue
            if inspect.isclass(obj):
                add(obj)
                for m_name, m in sorted(vars(obj).items()):
                    if not m_name.startswith("_") and (inspect.isfunction(m) or isinstance(m, (property, classmethod, staticmethod))):
                        add(getattr(m, "__func__", m))
            elif inspect.isfunction(obj) or (defined_in_submodules and callable(obj)):
                add(obj)
    return "\n\n".join(docs)


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
