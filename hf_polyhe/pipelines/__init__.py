"""Encrypted pipelines, registered with ``transformers.pipelines.PIPELINE_REGISTRY`` when ``hf_polyhe`` is imported.

=================================  ==============================================  ==================================
task                               pipeline class                                  export of
=================================  ==============================================  ==================================
``encrypted-text-generation``      :class:`EncryptedTextGenerationPipeline`        PolyGPT (causal LM)
``encrypted-text-classification``  :class:`EncryptedTextClassificationPipeline`    PolyBert (sequence cls.)
``encrypted-image-classification`` :class:`EncryptedImageClassificationPipeline`   PolyViT
``encrypted-feature-extraction``   :class:`EncryptedFeatureExtractionPipeline`     PolyBertModel (mean-pooled
                                                                                   sentence embedding)
=================================  ==============================================  ==================================

``pipeline(task, model=export_dir)`` loads a directory written by :func:`hf_polyhe.save_encrypted_pipeline`
(or ``hf-polyhe export``); ``pipeline(task, model=poly_model,
tokenizer=tok)`` exports to a temporary directory on the fly. See :class:`~.base.EncryptedPipeline` for the
extra arguments (``server_url``, ``server_token``, ``key_dir``, ``client``, ``he_params``, ``backend``, ``verbose``).
"""

from transformers.pipelines import PIPELINE_REGISTRY

from .base import EncryptedExport, EncryptedPipeline, PolyHEExportConfig, as_export, write_pipeline_config
from .feature_extraction import EncryptedFeatureExtractionPipeline
from .image_classification import EncryptedImageClassificationPipeline
from .text_classification import EncryptedTextClassificationPipeline
from .text_generation import EncryptedTextGenerationPipeline

PIPELINES = {
    "encrypted-text-generation": EncryptedTextGenerationPipeline,
    "encrypted-text-classification": EncryptedTextClassificationPipeline,
    "encrypted-image-classification": EncryptedImageClassificationPipeline,
    "encrypted-feature-extraction": EncryptedFeatureExtractionPipeline,
}


def register_pipelines() -> None:
    """Register the four tasks (v5 form: ``pt_model`` is the model class ``pipeline()`` loads a path with)."""
    for task, cls in PIPELINES.items():
        if task in PIPELINE_REGISTRY.supported_tasks and PIPELINE_REGISTRY.supported_tasks[task]["impl"] is cls:
            continue
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=cls, pt_model=EncryptedExport,
                                            type="image" if "image" in task else "text")


register_pipelines()

__all__ = ["PIPELINES", "EncryptedExport", "EncryptedPipeline", "PolyHEExportConfig",
           "EncryptedTextGenerationPipeline", "EncryptedTextClassificationPipeline",
           "EncryptedImageClassificationPipeline", "EncryptedFeatureExtractionPipeline", "as_export", "register_pipelines", "write_pipeline_config"]
