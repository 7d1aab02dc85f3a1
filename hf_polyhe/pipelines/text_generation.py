"""``encrypted-text-generation``: the prompt is embedded and encrypted here, every token's logits come back
encrypted and are decrypted and sampled here (greedy, or ``do_sample`` with ``temperature`` / ``top_k``)."""

from __future__ import annotations

from .base import EncryptedPipeline, json_safe, load_tokenizer_from_export


class EncryptedTextGenerationPipeline(EncryptedPipeline):
    """``pipe("The assert statement", max_new_tokens=4)`` ->
    ``[{"generated_text": "...", "he": {...}}]`` (a list of such lists for a list of prompts).

    Generation kwargs (at construction or per call): ``max_new_tokens`` (default 8), ``do_sample``,
    ``temperature``, ``top_k``, ``seed``, ``eos_token_id``; ``return_full_text`` (default True: prompt included)."""

    task_name = "encrypted-text-generation"
    family = "gpt"

    def _client_preprocessors(self, export, tokenizer, image_processor):
        return (tokenizer if tokenizer is not None else load_tokenizer_from_export(export)), None

    def _sanitize_parameters(self, max_new_tokens=None, do_sample=None, temperature=None, top_k=None, seed=None,
                             eos_token_id=None, return_full_text=None, skip_special_tokens=None, **unused):
        if unused:
            raise TypeError(f"{self.task_name} got unexpected arguments {sorted(unused)}; accepted: max_new_tokens, "
                            "do_sample, temperature, top_k, seed, eos_token_id, return_full_text, skip_special_tokens")
        forward = {k: v for k, v in dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                         top_k=top_k, seed=seed, eos_token_id=eos_token_id).items() if v is not None}
        post = {k: v for k, v in dict(return_full_text=return_full_text,
                                      skip_special_tokens=skip_special_tokens).items() if v is not None}
        return {}, forward, post

    def preprocess(self, prompt):
        if not isinstance(prompt, str):
            raise TypeError(f"{self.task_name} takes a string or a list of strings, got {type(prompt).__name__}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        return {"prompt": prompt, "input_ids": [int(i) for i in ids]}

    def _forward(self, inputs, max_new_tokens: int = 8, do_sample: bool = False, temperature: float = 1.0,
                 top_k=None, seed=None, eos_token_id=None):
        if eos_token_id is None:
            eos_token_id = self.export.meta.get("eos_token_id")
        ids, he = self.runtime.generate(inputs["input_ids"], max_new_tokens, do_sample=do_sample,
                                        temperature=temperature, top_k=top_k, eos_token_id=eos_token_id, seed=seed)
        return {**inputs, "output_ids": ids, "he": he}

    def postprocess(self, outputs, return_full_text: bool = True, skip_special_tokens: bool = True):
        n = len(outputs["input_ids"])
        new = self.tokenizer.decode(outputs["output_ids"][n:], skip_special_tokens=skip_special_tokens)
        text = outputs["prompt"] + new if return_full_text else new
        return [{"generated_text": text, "he": json_safe({**outputs["he"], "token_ids": outputs["output_ids"]})}]
