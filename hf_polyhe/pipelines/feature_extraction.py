"""``encrypted-feature-extraction``: the text is embedded and encrypted here; the server's circuit runs the encoder
and mean-pools its last hidden states over the tokens (a sentence embedding, as sentence-transformers computes it);
the embedding comes back encrypted and is decrypted here."""

from __future__ import annotations

import numpy as np

from .base import EncryptedPipeline, json_safe, load_tokenizer_from_export


class EncryptedFeatureExtractionPipeline(EncryptedPipeline):
    """``pipe("a sentence")`` -> ``[embedding]`` (a list of ``hidden_size`` floats, in a list as the
    ``feature-extraction`` pipeline nests its output); a list of texts gives one such result per text (processed in
    turn: one ciphertext per sequence). The export holds a headless ``PolyBertModel``
    (``save_encrypted_pipeline(poly_bert_model, tokenizer, dir)``) and its circuit outputs the mean of the final
    hidden states over the text's tokens -- not one vector per token as the plain ``feature-extraction`` task gives.

    Call arguments: ``normalize=True`` divides each embedding by its L2 norm (cosine similarity is then a dot
    product); ``return_tensors=True`` gives a numpy array ``(1, hidden_size)`` instead of lists; ``return_he=True``
    gives ``{"embedding": [...], "he": {...}}`` (backend, ring, timings) instead of the bare embedding;
    ``truncation=True`` cuts texts longer than the export's ``max_length`` (else they are refused).
    """

    task_name = "encrypted-feature-extraction"
    family = "bert"

    def _client_preprocessors(self, export, tokenizer, image_processor):
        return (tokenizer if tokenizer is not None else load_tokenizer_from_export(export)), None

    def _sanitize_parameters(self, normalize=None, return_tensors=None, return_he=None, truncation=None,
                             tokenize_kwargs=None, **unused):
        if unused:
            raise TypeError(f"{self.task_name} got unexpected arguments {sorted(unused)}; accepted: normalize, "
                            "return_tensors, return_he, truncation")
        if tokenize_kwargs:
            raise TypeError(f"{self.task_name} tokenizes as the export was made; tokenize_kwargs is not supported "
                            "(truncation=True cuts long texts)")
        post = {k: v for k, v in (("normalize", normalize), ("return_tensors", return_tensors),
                                  ("return_he", return_he)) if v is not None}
        pre = {"truncation": truncation} if truncation is not None else {}
        return pre, {}, post

    def preprocess(self, text, truncation: bool = False):
        if not isinstance(text, str):
            raise TypeError(f"{self.task_name} takes a string or a list of strings, got {type(text).__name__}")
        max_len = self.export.encrypted.max_length
        enc = self.tokenizer(text, truncation=truncation, max_length=max_len if truncation else None)
        ids = enc["input_ids"]
        if not ids:
            raise ValueError("the text gives no token")
        if len(ids) > max_len:
            raise ValueError(f"the text has {len(ids)} tokens, the export accepts at most {max_len}; pass "
                             "truncation=True to cut it")
        return {"input_ids": ids, "token_type_ids": enc.get("token_type_ids")}

    def _forward(self, inputs):
        x = self.export.encrypted.embed(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
        embedding, he = self._encrypted_forward(x)
        return {"embedding": embedding, "he": he}

    def postprocess(self, outputs, normalize: bool = False, return_tensors: bool = False, return_he: bool = False):
        e = np.asarray(outputs["embedding"], dtype=np.float64).reshape(-1)
        if normalize:
            norm = float(np.linalg.norm(e))
            if not np.isfinite(norm) or norm == 0.0:
                raise ValueError(f"cannot normalise an embedding of norm {norm}")
            e = e / norm
        emb = e[None, :] if return_tensors else [e.tolist()]
        if return_he:
            return {"embedding": emb, "he": json_safe(outputs["he"])}
        return emb
