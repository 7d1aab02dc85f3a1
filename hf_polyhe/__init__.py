"""hf_polyhe: polynomial transformers for Hugging Face, evaluated on CKKS-encrypted data with OpenFHE.

Importing the package registers PolyGPT, PolyBert and PolyViT with the transformers Auto classes.
The encrypted runtime ``hf_polyhe.he`` imports only numpy and openfhe; when torch or transformers is not
installed (an HE server), or when ``HF_POLYHE_NO_TORCH=1``, the torch side of the package is not loaded.
"""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("HF_POLYHE_NO_TORCH", "") not in ("", "0"):
    # an HE server process (`hf-polyhe serve`, its workers): numpy + openfhe only, no torch import (seconds, and
    # hundreds of MB per process)
    _HAS_TORCH = False
else:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:  # torch-free install: only hf_polyhe.approx and hf_polyhe.he are usable
        _HAS_TORCH = False
    else:
        _HAS_TORCH = True

if _HAS_TORCH:
    from transformers import AutoConfig

    from .conversion import convert_to_poly
    from .export import save_encrypted_pipeline
    from .models.poly_bert import (
        PolyBertConfig,
        PolyBertForMaskedLM,
        PolyBertForSequenceClassification,
        PolyBertModel,
    )
    from .models.poly_gpt import PolyGPTConfig, PolyGPTForCausalLM, PolyGPTModel
    from .models.poly_vit import PolyViTConfig, PolyViTForImageClassification, PolyViTModel
    from .nn import PolyOperator
    from .status import OutOfIntervalWarning, polynomial_status, set_operator_mode, to_polynomial
    from .training import PolyReplacementCallback, PolyTrainer, RangeLoss, RangeLossConfig, RangeTracker

    def _register_auto_classes() -> None:
        import transformers

        from .models import AUTO_CLASSES

        for config_class, auto_models in AUTO_CLASSES.items():
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            for auto_name, model_class in auto_models.items():
                getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)

    _register_auto_classes()

    # registers encrypted-text-generation / -text-classification / -image-classification with PIPELINE_REGISTRY
    from . import pipelines  # noqa: E402,F401

    __all__ = [
        "PolyBertConfig",
        "PolyBertForMaskedLM",
        "PolyBertForSequenceClassification",
        "PolyBertModel",
        "PolyGPTConfig",
        "PolyGPTForCausalLM",
        "PolyGPTModel",
        "PolyOperator",
        "PolyViTConfig",
        "PolyViTForImageClassification",
        "PolyViTModel",
        "convert_to_poly",
        "OutOfIntervalWarning",
        "polynomial_status",
        "save_encrypted_pipeline",
        "set_operator_mode",
        "to_polynomial",
        "PolyReplacementCallback",
        "PolyTrainer",
        "RangeLoss",
        "RangeLossConfig",
        "RangeTracker",
    ]
