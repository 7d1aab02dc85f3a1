"""``encrypted-text-classification``: the text is embedded and encrypted here, the class logits come back
encrypted and are turned into labels and scores here."""

from __future__ import annotations

import numpy as np

from .base import EncryptedPipeline, json_safe, load_tokenizer_from_export


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def top_labels(logits, id2label: dict, top_k: int, function_to_apply: str = "softmax") -> list:
    """``[{"label", "score"}]`` of the ``top_k`` classes (scores by softmax, or sigmoid for one logit)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if function_to_apply == "sigmoid" or (function_to_apply == "auto" and z.size == 1):
        scores = 1.0 / (1.0 + np.exp(-z))
    elif function_to_apply in ("softmax", "auto"):
        scores = _softmax(z)
    elif function_to_apply == "none":
        scores = z
    else:
        raise ValueError(f"function_to_apply must be softmax, sigmoid, none or auto, got {function_to_apply!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    order = np.argsort(-scores)[: top_k or z.size]
    return [{"label": id2label.get(str(i), id2label.get(i, f"LABEL_{i}")), "score": float(scores[i])} for i in order]


class EncryptedTextClassificationPipeline(EncryptedPipeline):
    """``pipe("a sentence")`` -> ``[{"label", "score", "he"}]``; ``top_k=n`` gives the ``n`` best labels per
    text; a list of texts gives one result per text (processed in turn: one ciphertext per sequence)."""

    task_name = "encrypted-text-classification"
    family = "bert"

    def _client_preprocessors(self, export, tokenizer, image_processor):
        return (tokenizer if tokenizer is not None else load_tokenizer_from_export(export)), None

    def _sanitize_parameters(self, top_k="", function_to_apply=None, truncation=None, **unused):
        if unused:
            raise TypeError(f"{self.task_name} got unexpected arguments {sorted(unused)}; accepted: top_k, "
                            "function_to_apply, truncation")
        post = {}
        if top_k != "":
            post["top_k"] = top_k
        if function_to_apply is not None:
            post["function_to_apply"] = function_to_apply
        pre = {"truncation": truncation} if truncation is not None else {}
        return pre, {}, post

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        legacy = kwargs.get("top_k", self._postprocess_params.get("top_k", "")) == ""
        if legacy and isinstance(inputs, str):
            return [result]  # like text-classification: a single text gives a one-element list
        return result

    def preprocess(self, text, truncation: bool = False):
        if not isinstance(text, str):
            raise TypeError(f"{self.task_name} takes a string or a list of strings, got {type(text).__name__}")
        enc = self.tokenizer(text, truncation=truncation, max_length=self.export.encrypted.max_length if truncation else None)
        ids = enc["input_ids"]
        if len(ids) > self.export.encrypted.max_length:
            raise ValueError(f"the text has {len(ids)} tokens, the export accepts at most "
                             f"{self.export.encrypted.max_length}; pass truncation=True to cut it")
        return {"input_ids": ids, "token_type_ids": enc.get("token_type_ids")}

    def _forward(self, inputs):
        x = self.export.encrypted.embed(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
        logits, he = self._encrypted_forward(x)
        return {"logits": logits, "he": he}

    def postprocess(self, outputs, top_k="", function_to_apply: str = "auto"):
        id2label = self.export.meta.get("id2label", {})
        k = 1 if top_k == "" else (top_k or len(outputs["logits"]))  # top_k=None: every label
        best = top_labels(outputs["logits"], id2label, k, function_to_apply)
        he = json_safe(outputs["he"])
        if top_k == "":
            return {**best[0], "he": he}
        return [{**b, "he": he} for b in best]
