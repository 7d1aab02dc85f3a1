"""An export directory as both roles read it: :class:`Export`.

Directory written by :func:`hf_polyhe.save_encrypted_pipeline`::

    pipeline.json         what is where; task, family, max_length, labels, special token ids
    config.json           what ``transformers.pipeline(task, model=dir)`` reads (model type poly_he_export)
    server/spec.json      the server part: architecture + fitted polynomials (TransformerSpec) ...
    server/spec_weights.safetensors   ... and every server-side weight
    client/embeddings.safetensors     the client's embedding tables (token/position/type, or CLS/patch/position)
    client/...            tokenizer or image processor files
    plan.txt              the planner's report at 128-bit (every circuit kind; also pipeline.json["plan"])

The client embeds its own data with :meth:`Export.embed` (in the clear, on its side); the server compiles
circuits from :attr:`Export.spec`. Torch-free.
"""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np

from .compile.export_plan import spec_digest
from .files import load_arrays, read_document
from .compile.transformer import TransformerSpec
from .errors import CircuitError

PIPELINE_FORMAT = "hf_polyhe.encrypted_pipeline"
PIPELINE_VERSION = 1


def read_pipeline_json(directory) -> dict:
    """``pipeline.json`` of an export directory (CircuitError when it is not one)."""
    meta = read_document(os.path.join(directory, "pipeline.json"), PIPELINE_FORMAT, CircuitError,
                         f"{str(directory)!r} is not an encrypted pipeline export (cannot read pipeline.json: {{e}})")
    if meta.get("version") != PIPELINE_VERSION:
        raise CircuitError(f"pipeline version {meta.get('version')!r} is not supported (expected {PIPELINE_VERSION})")
    return meta


def part_dir(directory, meta: dict, part: str) -> str:
    """The ``server`` or ``client`` sub-directory of an export; it must lie inside the export."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, str(meta.get(part, part))))
    if os.path.commonpath([root, path]) != root or path == root:
        raise CircuitError(f"pipeline.json's {part!r} entry {meta.get(part)!r} points outside the export {directory!r}")
    return path


class Export:
    """An export directory: ``meta`` (pipeline.json), ``spec`` (server part), ``tables`` (client part)."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.meta = read_pipeline_json(directory)
        self.spec = TransformerSpec.load(part_dir(directory, self.meta, "server"))
        self.tables = load_arrays(part_dir(directory, self.meta, "client"), "embeddings")
        self.family = self.meta["family"]
        self.max_length = int(self.meta["max_length"])

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the server part: keys are made for one export."""
        return spec_digest(self.spec)

    @property
    def client_dir(self) -> str:
        return part_dir(self.directory, self.meta, "client")

    def embed(self, input_ids=None, pixel_values=None, token_type_ids=None) -> np.ndarray:
        """The ``L x d`` embedding matrix of ONE sequence or image, which the client encrypts."""
        t = self.tables
        if self.family in ("gpt", "bert"):
            if input_ids is None:
                raise ValueError(f"a {self.family} export needs input_ids")
            ids = np.asarray(input_ids, dtype=np.int64)
            if ids.ndim == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.ndim != 1:
                raise ValueError(f"input_ids must be one sequence (L,) or (1, L), got shape {ids.shape}: "
                                 "pass a batch as a list of sequences")
            vocab = t["word_embeddings"].shape[0]
            if ids.size == 0 or ids.size > self.max_length:
                raise ValueError(f"sequence of {ids.size} tokens: the export accepts 1..{self.max_length}")
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab}), got min {ids.min()} max {ids.max()}")
            x = t["word_embeddings"][ids] + t["position_embeddings"][: ids.size]
            if self.family == "bert":
                tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids).reshape(-1)
                x = x + t["token_type_embeddings"][tt]
            return x
        if pixel_values is None:
            raise ValueError("a vit export needs pixel_values")
        px = np.asarray(pixel_values, dtype=np.float64)
        if px.ndim == 4:
            if px.shape[0] != 1:
                raise ValueError(f"pixel_values holds a batch of {px.shape[0]} images; one ciphertext holds one "
                                 "image: pass them one by one (or as a list to the pipeline)")
            px = px[0]
        w = t["patch_weight"]  # (d, c, p, p)
        d, c, p, _ = w.shape
        if px.ndim != 3 or px.shape[0] != c or px.shape[1] % p or px.shape[1] != px.shape[2]:
            raise ValueError(f"pixel_values must have shape ({c}, H, H) with H a multiple of {p}, got {px.shape}")
        n = px.shape[1] // p
        patches = px.reshape(c, n, p, n, p).transpose(1, 3, 0, 2, 4).reshape(n * n, c * p * p)
        x = patches @ w.reshape(d, -1).T + t["patch_bias"]
        x = np.concatenate([t["cls_token"].reshape(1, d), x], axis=0)
        if x.shape[0] != t["position_embeddings"].shape[0]:
            raise ValueError(f"image gives {x.shape[0] - 1} patches, the model expects {t['position_embeddings'].shape[0] - 1}")
        return x + t["position_embeddings"]
