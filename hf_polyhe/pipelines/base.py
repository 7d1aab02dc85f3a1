"""What the three encrypted pipelines share: the export directory as a pipeline "model", and the Pipeline base.

``transformers.pipeline(task, model=path)`` first reads ``path/config.json`` with ``AutoConfig`` and then calls
``from_pretrained`` on the task's model class. An export directory therefore carries a small ``config.json``
(model type ``poly_he_export``, written by :func:`write_pipeline_config`), and :class:`EncryptedExport` -- the
task's model class -- is a thin torch-free wrapper around :class:`~hf_polyhe.he.session.EncryptedModel`.
Passing a Poly model object instead exports it to a temporary directory first.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch
from transformers import AutoConfig, PretrainedConfig, Pipeline

from ..he.session import EncryptedModel, read_pipeline_json
from .runtime import EncryptedRuntime


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


def write_pipeline_config(export_dir) -> str:
    """Write ``config.json`` into an export so ``pipeline(task, model=export_dir)`` can load it; returns its path."""
    meta = read_pipeline_json(export_dir)
    kw = {"task": meta["task"], "family": meta["family"], "max_sequence_length": meta["max_length"]}
    if "id2label" in meta:
        kw["id2label"] = {int(k): v for k, v in meta["id2label"].items()}
    PolyHEExportConfig(**kw).save_pretrained(str(export_dir))
    return os.path.join(str(export_dir), "config.json")


class EncryptedExport:
    """The "model" of an encrypted pipeline: an export directory (client tables + server spec), no torch weights.

    Pipelines only embed (client side) and hand ciphertexts to an evaluator; this object never runs torch."""

    config_class = PolyHEExportConfig
    device = torch.device("cpu")
    dtype = torch.float64
    input_modalities = ("text",)

    def __init__(self, directory, config: Optional[PolyHEExportConfig] = None, tmp: Optional[tempfile.TemporaryDirectory] = None):
        self.encrypted = EncryptedModel(directory)
        self.directory = str(directory)
        meta = self.encrypted.meta
        if config is None:
            kw = {"task": meta["task"], "family": meta["family"], "max_sequence_length": meta["max_length"]}
            if "id2label" in meta:
                kw["id2label"] = {int(k): v for k, v in meta["id2label"].items()}
            config = PolyHEExportConfig(**kw)
        self.config = config
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
        write_pipeline_config(tmp.name)
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
        return os.path.join(self.directory, self.meta.get("client", "client"), name)


def as_export(model, tokenizer_or_processor=None, max_length: Optional[int] = None) -> EncryptedExport:
    """An :class:`EncryptedExport` from an export, a path to one, or a fully polynomial Poly model."""
    if isinstance(model, EncryptedExport):
        return model
    if isinstance(model, (str, os.PathLike)):
        return EncryptedExport(model)
    if isinstance(model, EncryptedModel):
        return EncryptedExport(model.directory)
    if isinstance(model, torch.nn.Module):
        return EncryptedExport.from_model(model, tokenizer_or_processor, max_length)
    raise TypeError(f"model must be an export directory or a fully polynomial Poly model, got {type(model).__name__}")


class EncryptedPipeline(Pipeline):
    """Base of the encrypted pipelines. Extra constructor arguments (all optional):

    - ``server_url``: evaluate on ``hf-polyhe serve`` at this URL (the secret key stays here);
    - ``key_dir``: where keys are cached (default ``~/.cache/hf_polyhe/keys``), or a directory written by
      ``hf-polyhe keygen``; ``client``: an :class:`~hf_polyhe.he.keys_multi.EncryptedClient` (existing keys);
    - ``he_params``: ``"default"`` (128-bit) or ``"toy"`` (INSECURE, tests only);
    - ``backend``: ``"openfhe"`` (encrypted, default) or ``"plain"`` (float64 reference, NOT encrypted);
    - ``verbose``: progress bars per layer / per token (default True);
    - ``max_length``: only when exporting a model object on the fly.
    """

    task_name = ""
    family = ""
    _load_tokenizer = False  # read from the export's client/ directory instead
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False
    _load_video_processor = False

    def __init__(self, model, tokenizer=None, image_processor=None, *, server_url: Optional[str] = None, key_dir=None,
                 client=None, he_params="default", backend: str = "openfhe", verbose: bool = True,
                 max_length: Optional[int] = None, **kwargs):
        export = as_export(model, tokenizer if tokenizer is not None else image_processor, max_length)
        family = export.meta["family"]
        if family != self.family:
            raise ValueError(f"{self.task_name} needs a {self.family!r} export, {export.directory!r} is a "
                             f"{family!r} export for {export.meta['task']!r}")
        tokenizer, image_processor = self._client_preprocessors(export, tokenizer, image_processor)
        kwargs.pop("feature_extractor", None)
        super().__init__(export, tokenizer=tokenizer, image_processor=image_processor, device=kwargs.pop("device", -1),
                         **kwargs)
        self.export = export
        self.runtime = EncryptedRuntime(export.encrypted, backend=backend, server_url=server_url, key_dir=key_dir,
                                        client=client, he_params=he_params, verbose=verbose)

    def _client_preprocessors(self, export: EncryptedExport, tokenizer, image_processor):
        return tokenizer, image_processor

    # One sequence (or image) per ciphertext: inputs of a list are processed in turn, whatever batch_size says.
    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        for item in inputs:
            yield self.run_single(item, preprocess_params, forward_params, postprocess_params)

    def forward(self, model_inputs, **forward_params):
        return self._forward(model_inputs, **forward_params)  # no torch device placement: nothing runs in torch

    @property
    def verbose(self) -> bool:
        return self.runtime.verbose

    @verbose.setter
    def verbose(self, value: bool):
        self.runtime.verbose = bool(value)

    def __repr__(self):
        return f"{type(self).__name__}(export={self.export.directory!r}, backend={self.runtime.backend!r})"


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
