"""Reading and writing an export's files: named float arrays (safetensors) and JSON documents, with size limits
(an export or bundle may come from someone else: a file linked to ``/dev/zero`` must not hang a server)."""

from __future__ import annotations

import os

import numpy as np

from .errors import SerializationError

MAX_JSON_BYTES = 64 * 2**20
MAX_ARRAY_FILE_BYTES = int(float(os.environ.get("HF_POLYHE_MAX_ARRAY_FILE_GIB", "16")) * 2**30)


def save_arrays(directory, stem: str, arrays: dict) -> str:
    """Write ``arrays`` (name -> array) to ``directory/stem.safetensors``; returns the path."""
    from safetensors.numpy import save_file

    path = os.path.join(str(directory), f"{stem}.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)
    return path


def load_arrays(directory, stem: str) -> dict:
    """The arrays :func:`save_arrays` wrote (a regular file of at most ``HF_POLYHE_MAX_ARRAY_FILE_GIB``)."""
    from safetensors.numpy import load_file

    path = os.path.join(str(directory), f"{stem}.safetensors")
    if not os.path.isfile(path):
        raise SerializationError(f"{path!r} is missing or not a regular file")
    if os.path.getsize(path) > MAX_ARRAY_FILE_BYTES:
        raise SerializationError(f"{path!r} is larger than {MAX_ARRAY_FILE_BYTES} bytes (HF_POLYHE_MAX_ARRAY_FILE_GIB)")
    try:
        return dict(load_file(path))
    except Exception as e:
        raise SerializationError(f"cannot read the arrays in {path!r}: {e}") from e


def read_json(path, limit: int = MAX_JSON_BYTES):
    """A JSON document from a regular file of at most ``limit`` bytes (OSError / ValueError otherwise)."""
    import json

    if not os.path.isfile(path):
        raise OSError(f"{path!r} is missing or not a regular file")
    if os.path.getsize(path) > limit:
        raise ValueError(f"{path!r} is larger than {limit} bytes")
    with open(path) as f:
        return json.load(f)


def read_document(path, fmt: str, error=SerializationError, unreadable: str = "cannot read {path!r}: {e}") -> dict:
    """A JSON object whose ``"format"`` is ``fmt`` (:func:`read_json`'s limits); ``error`` (an exception class)
    otherwise, with ``unreadable`` (formatted with ``path`` and ``e``) when the file cannot be read at all."""
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise error(unreadable.format(path=path, e=e)) from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{path!r} is not a {fmt} file")
    return meta
