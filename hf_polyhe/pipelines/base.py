"""What the encrypted pipelines share: the export directory as a pipeline "model", and the Pipeline base.

``transformers.pipeline(task, model=path)`` first reads ``path/config.json`` with ``AutoConfig`` and then calls
``from_pretrained`` on the task's model class. An export directory therefore carries a small ``config.json``
(model type ``poly_he_export``, written by :func:`~hf_polyhe.save_encrypted_pipeline`), and
:class:`EncryptedExport` -- the task's model class -- is a thin torch-free wrapper around
:class:`hf_polyhe.he.Export`. Passing a Poly model object instead exports it to a temporary directory first.

A pipeline holds a :class:`hf_polyhe.he.Client` (the secret key; made on first use) and a server
(:class:`hf_polyhe.he.ServerProtocol`): the client's in-process :class:`~hf_polyhe.he.Server`, a
:class:`~hf_polyhe.serve.client.RemoteServer` for ``server_url=``, or the plain reference for ``backend="plain"``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Optional

import torch
from transformers import AutoConfig, PretrainedConfig, Pipeline

from ..he import Client, Export
from ..he import params as P
from ..he.export import read_pipeline_json

BACKENDS = ("openfhe", "plain")


class PolyHEExportConfig(PretrainedConfig):
    """``config.json`` of an encrypted-pipeline export (what ``AutoConfig`` reads); the real description is
    ``pipeline.json``. Fields: ``task``, ``family``, ``max_sequence_length`` (positions the export accepts),
    ``id2label`` (classifiers). (``max_length`` is a generation parameter in transformers, hence the name.)"""

    model_type = "poly_he_export"

    def __init__(self, task: Optional[str] = None, family: Optional[str] = None, max_sequence_length: Optional[int] = None,
                 **kwargs):
        self.task, self.family, self.max_sequence_length = task, family, max_sequence_length
        super().__init__(**kwargs)


AutoConfig.register(PolyHEExportConfig.model_type, PolyHEExportConfig, exist_ok=True)


def export_config(meta: dict) -> PolyHEExportConfig:
    """The ``config.json`` of an export from its ``pipeline.json``."""
    kw = {"task": meta["task"], "family": meta["family"], "max_sequence_length": meta["max_length"]}
    if "id2label" in meta:
        kw["id2label"] = {int(k): v for k, v in meta["id2label"].items()}
    return PolyHEExportConfig(**kw)


def write_pipeline_config(export_dir) -> str:
    """Write ``config.json`` into an export so ``pipeline(task, model=export_dir)`` can load it; returns its path.
    :func:`~hf_polyhe.save_encrypted_pipeline` calls it: an export is complete in one call."""
    export_config(read_pipeline_json(export_dir)).save_pretrained(str(export_dir))
    return os.path.join(str(export_dir), "config.json")


class EncryptedExport:
    """The "model" of an encrypted pipeline: an export directory (client tables + server spec), no torch weights.

    Pipelines only embed (client side) and hand ciphertexts to a server; this object never runs torch."""

    config_class = PolyHEExportConfig
    device = torch.device("cpu")
    dtype = torch.float64
    input_modalities = ("text",)

    def __init__(self, directory, config: Optional[PolyHEExportConfig] = None, tmp: Optional[tempfile.TemporaryDirectory] = None):
        self.encrypted = Export(directory)
        self.directory = str(directory)
        meta = self.encrypted.meta
        self.config = config if config is not None else export_config(meta)
        self._tmp = tmp  # keeps an on-the-fly export alive as long as the pipeline
        if meta["family"] == "vit":
            self.input_modalities = ("image",)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "EncryptedExport":
        config = kwargs.get("config")
        return cls(path, config=config if isinstance(config, PolyHEExportConfig) else None)

    @classmethod
    def from_model(cls, model, tokenizer_or_processor=None, max_length: Optional[int] = None) -> "EncryptedExport":
        """Export a fully polynomial Poly model to a temporary directory (deleted with the pipeline)."""
        from ..export import save_encrypted_pipeline

        tmp = tempfile.TemporaryDirectory(prefix="hf_polyhe_export_")
        was_training = model.training
        save_encrypted_pipeline(model, tokenizer_or_processor, tmp.name, max_length=max_length)
        model.train(was_training)
        return cls(tmp.name, tmp=tmp)

    def to(self, *args, **kwargs):
        return self  # nothing to move: the evaluation runs on CKKS ciphertexts (CPU)

    def eval(self):
        return self

    def can_generate(self) -> bool:
        return False  # token choice is the pipeline's own client-side loop, not transformers' generate()

    @property
    def meta(self) -> dict:
        return self.encrypted.meta

    def client_file(self, name: str) -> str:
        return os.path.join(self.encrypted.client_dir, name)


def as_export(model, tokenizer_or_processor=None, max_length: Optional[int] = None) -> EncryptedExport:
    """An :class:`EncryptedExport` from an export, a path to one, or a fully polynomial Poly model."""
    if isinstance(model, EncryptedExport):
        return model
    if isinstance(model, (str, os.PathLike)):
        return EncryptedExport(model)
    if isinstance(model, Export):
        return EncryptedExport(model.directory)
    if isinstance(model, torch.nn.Module):
        return EncryptedExport.from_model(model, tokenizer_or_processor, max_length)
    raise TypeError(f"model must be an export directory or a fully polynomial Poly model, got {type(model).__name__}")


class EncryptedPipeline(Pipeline):
    """Base of the encrypted pipelines. Extra constructor arguments (all optional):

    - ``server_url``: evaluate on ``hf-polyhe serve`` at this URL (the secret key stays here); ``server_token``:
      its ``--auth-token`` (default ``$HF_POLYHE_AUTH_TOKEN``);
    - ``key_dir``: where keys are cached (default :func:`hf_polyhe.he.runtime.keys.default_key_dir`), or a
      directory written by ``hf-polyhe keygen``; ``client``: a :class:`hf_polyhe.he.Client` (existing keys);
    - ``he_params``: ``"default"`` (128-bit) or ``"toy"`` (INSECURE, tests only);
    - ``backend``: ``"openfhe"`` (encrypted, default) or ``"plain"`` (float64 reference, NOT encrypted);
    - ``verbose``: progress bars per layer / per token (default True);
    - ``max_length``: only when exporting a model object on the fly.

    Keys and the server are made on first use; :meth:`prepare` makes them now.
    """

    task_name = ""
    family = ""
    _load_tokenizer = False  # read from the export's client/ directory instead
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False
    _load_video_processor = False

    def __init__(self, model, tokenizer=None, image_processor=None, *, server_url: Optional[str] = None,
                 server_token: Optional[str] = None, key_dir=None, client=None, he_params="default",
                 backend: str = "openfhe", verbose: bool = True, max_length: Optional[int] = None, **kwargs):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "plain" and server_url:
            raise ValueError("server_url needs encryption: use backend='openfhe' (the default)")
        export = as_export(model, tokenizer if tokenizer is not None else image_processor, max_length)
        family = export.meta["family"]
        if family != self.family or export.meta.get("task", self.task_name) != self.task_name:
            raise ValueError(f"{self.task_name} needs a {self.family!r} export, {export.directory!r} is a "
                             f"{family!r} export for {export.meta['task']!r}")
        tokenizer, image_processor = self._client_preprocessors(export, tokenizer, image_processor)
        kwargs.pop("feature_extractor", None)
        super().__init__(export, tokenizer=tokenizer, image_processor=image_processor, device=kwargs.pop("device", -1),
                         **kwargs)
        self.export = export
        self.backend, self.server_url, self.key_dir, self.verbose = backend, server_url, key_dir, verbose
        self.server_token = server_token
        self.he_params = P.resolve(he_params) if backend == "openfhe" else None
        self._client, self._server = None, None
        if client is not None:
            if backend == "plain":
                raise ValueError("client= holds keys; the plain backend uses none")
            self._client = client if isinstance(client, Client) else Client.load(export.encrypted, client)
            if self._client.plan.digest != export.encrypted.digest:
                raise ValueError("the given client's keys were made for another export (or modified weights)")
            self.he_params = self._client.plan.params

    # -- client and server, made on first use ---------------------------------------------------------------
    @property
    def client(self) -> Client:
        """The :class:`hf_polyhe.he.Client` of this pipeline (keys from the cache, made on first use)."""
        if self._client is None:
            if self.backend == "plain":
                self._client = Client.plain(self.export.encrypted)
            else:
                self._client = Client.from_cache(self.export.encrypted, self.he_params, self.key_dir)
        return self._client

    @property
    def server(self):
        """The server the client talks to: in-process, remote (``server_url``) or the plain reference."""
        if self._server is None:
            if self.server_url:
                from ..serve.client import RemoteServer

                self._server = RemoteServer(self.server_url, self.client, token=self.server_token)
            else:
                self._server = self.client.server()
        self._server.verbose = self.verbose
        return self._server

    def prepare(self) -> "EncryptedPipeline":
        """Generate or load the keys and connect the server now instead of at the first call."""
        _ = self.server
        return self

    def _he_info(self, info: dict, setup_s: float) -> dict:
        """A result's ``he`` entry: the client's ``info`` plus where it ran and the setup time."""
        where = {"where": self.server_url or "in-process"} if self.client.encrypted else {}
        return {**info, **where, "timings": {"setup_s": setup_s, **info.get("timings", {})}}

    def _timed_server(self) -> tuple:
        """``(server, seconds)``: the server, and how long making the keys and the server took (first call)."""
        t0 = time.perf_counter()
        server = self.server
        return server, time.perf_counter() - t0

    def _encrypted_forward(self, x) -> tuple:
        """``(logits, he)`` of one sequence / image's embeddings on this pipeline's server."""
        server, setup_s = self._timed_server()
        logits, info = self.client.forward(server, x)
        return logits, self._he_info(info, setup_s)

    def _client_preprocessors(self, export: EncryptedExport, tokenizer, image_processor):
        return tokenizer, image_processor

    # One sequence (or image) per ciphertext: inputs of a list are processed in turn, whatever batch_size says.
    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        for item in inputs:
            yield self.run_single(item, preprocess_params, forward_params, postprocess_params)

    def forward(self, model_inputs, **forward_params):
        return self._forward(model_inputs, **forward_params)  # no torch device placement: nothing runs in torch

    def __repr__(self):
        return f"{type(self).__name__}(export={self.export.directory!r}, backend={self.backend!r})"


def load_tokenizer_from_export(export: EncryptedExport):
    from transformers import AutoTokenizer

    client_dir = os.path.dirname(export.client_file("x"))
    if not any(os.path.exists(os.path.join(client_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ValueError(f"the export {export.directory!r} holds no tokenizer (client/): pass tokenizer= to the pipeline")
    return AutoTokenizer.from_pretrained(client_dir)


def load_image_processor_from_export(export: EncryptedExport):
    client_dir = os.path.dirname(export.client_file("x"))
    if os.path.exists(os.path.join(client_dir, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(client_dir)
    return None


def json_safe(obj):
    """Round-trip through JSON so results hold plain floats/ints (numpy scalars included)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
