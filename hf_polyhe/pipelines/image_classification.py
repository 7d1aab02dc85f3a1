"""``encrypted-image-classification``: the image is patch-embedded and encrypted here, the class logits come
back encrypted and are turned into labels and scores here."""

from __future__ import annotations

import numpy as np

from .base import EncryptedPipeline, json_safe, load_image_processor_from_export
from .text_classification import top_labels


class EncryptedImageClassificationPipeline(EncryptedPipeline):
    """``pipe(image)`` -> ``[{"label", "score", "he"}, ...]`` (``top_k`` best, default 5); a list of images gives
    a list of such lists. ``image``: a PIL image, a path or URL-free file name, or an array ``(C, H, W)`` of
    pixel values as the model was trained on (used as is when the export has no image processor)."""

    task_name = "encrypted-image-classification"
    family = "vit"

    def _client_preprocessors(self, export, tokenizer, image_processor):
        if image_processor is None:
            image_processor = load_image_processor_from_export(export)
        return None, image_processor

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, **unused):
        if unused:
            raise TypeError(f"{self.task_name} got unexpected arguments {sorted(unused)}; accepted: top_k, "
                            "function_to_apply")
        post = {}
        if top_k is not None:
            post["top_k"] = top_k
        if function_to_apply is not None:
            post["function_to_apply"] = function_to_apply
        return {}, {}, post

    def __call__(self, images, **kwargs):
        """One image, a list of images, or a batch array ``(B, C, H, W)`` (a list of ``B`` results). One
        ciphertext holds one image: a batch is processed image by image."""
        arr = images.detach().cpu().numpy() if hasattr(images, "detach") else images
        if isinstance(arr, np.ndarray) and arr.ndim == 4:
            return super().__call__(list(arr), **kwargs)
        return super().__call__(images, **kwargs)

    def preprocess(self, image):
        try:
            import torch

            if isinstance(image, torch.Tensor):
                image = image.detach().cpu().numpy()
        except ImportError:  # pragma: no cover
            pass
        if isinstance(image, np.ndarray) and self.image_processor is None:
            px = image.astype(np.float64)
        else:
            from transformers.image_utils import load_image

            if self.image_processor is None:
                raise ValueError("this export has no image processor: pass pixel arrays (C, H, W) or image_processor=")
            img = load_image(image) if isinstance(image, str) else image
            px = np.asarray(self.image_processor(img, return_tensors="np")["pixel_values"], dtype=np.float64)
        return {"pixel_values": px}

    def _forward(self, inputs):
        x = self.export.encrypted.embed(pixel_values=inputs["pixel_values"])
        logits, he = self._encrypted_forward(x)
        return {"logits": logits, "he": he}

    def postprocess(self, outputs, top_k: int = 5, function_to_apply: str = "softmax"):
        id2label = self.export.meta.get("id2label", {})
        best = top_labels(outputs["logits"], id2label, min(top_k, len(outputs["logits"])), function_to_apply)
        he = json_safe(outputs["he"])
        return [{**b, "he": he} for b in best]
