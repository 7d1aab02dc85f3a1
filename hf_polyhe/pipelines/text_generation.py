"""``encrypted-text-generation``: the prompt is embedded and encrypted here, every token's logits come back
encrypted and are decrypted here, and the next token is chosen here with transformers' own generation
machinery (:class:`~transformers.GenerationConfig`, logits processors and warpers, stopping criteria)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import logits_process as lp

from .base import EncryptedPipeline, json_safe, load_tokenizer_from_export

# GenerationConfig fields the client-side token choice honours; any other field set to a non-default value is
# refused by name (beam search would need one encrypted KV cache per beam on the server).
SUPPORTED = {"max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size", "eos_token_id", "pad_token_id", "bos_token_id",
             "num_beams", "num_return_sequences", "use_cache", "return_dict_in_generate", "output_scores",
             "transformers_version", "_from_model_config"}


def logits_processors(gc: GenerationConfig, prompt_len: int) -> LogitsProcessorList:
    """The processors and (when sampling) warpers ``gc`` asks for, in transformers' order."""
    procs = LogitsProcessorList()
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(penalty=gc.repetition_penalty))
    if gc.no_repeat_ngram_size:
        procs.append(lp.NoRepeatNGramLogitsProcessor(gc.no_repeat_ngram_size))
    if gc.min_new_tokens and gc.eos_token_id is not None:
        procs.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, gc.min_new_tokens, gc.eos_token_id))
    if gc.do_sample:
        if gc.temperature is not None and gc.temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(gc.temperature))
        if gc.top_k:
            procs.append(lp.TopKLogitsWarper(top_k=gc.top_k))
        if gc.top_p is not None and gc.top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(top_p=gc.top_p))
        if gc.min_p is not None:
            procs.append(lp.MinPLogitsWarper(min_p=gc.min_p))
    return procs


class EncryptedTextGenerationPipeline(EncryptedPipeline):
    """``pipe("The assert statement", max_new_tokens=4)`` ->
    ``[{"generated_text": "...", "he": {...}}]`` (a list of such lists for a list of prompts).

    Generation arguments as for ``model.generate`` (at construction or per call): ``max_new_tokens`` (default 8)
    or ``max_length``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``min_new_tokens``, ``eos_token_id``, a ``generation_config``, extra
    ``logits_processor`` / ``stopping_criteria`` lists, ``seed`` (sampling); ``return_full_text`` (default True:
    prompt included) and ``skip_special_tokens``. Beam search (``num_beams > 1``) is refused: every beam would
    need its own encrypted KV cache on the server."""

    task_name = "encrypted-text-generation"
    family = "gpt"

    def _client_preprocessors(self, export, tokenizer, image_processor):
        return (tokenizer if tokenizer is not None else load_tokenizer_from_export(export)), None

    def _sanitize_parameters(self, return_full_text=None, skip_special_tokens=None, generation_config=None,
                             logits_processor=None, stopping_criteria=None, seed=None, **generate_kwargs):
        unknown = sorted(k for k in generate_kwargs if not hasattr(GenerationConfig(), k))
        if unknown:
            raise TypeError(f"{self.task_name} got unexpected arguments {unknown}; accepted: GenerationConfig fields "
                            f"({', '.join(sorted(SUPPORTED - {'transformers_version', '_from_model_config'}))}), "
                            "generation_config, logits_processor, stopping_criteria, seed, return_full_text, "
                            "skip_special_tokens")
        forward = {k: v for k, v in dict(generation_config=generation_config, logits_processor=logits_processor,
                                         stopping_criteria=stopping_criteria, seed=seed).items() if v is not None}
        if generate_kwargs:
            forward["generate_kwargs"] = generate_kwargs
        post = {k: v for k, v in dict(return_full_text=return_full_text,
                                      skip_special_tokens=skip_special_tokens).items() if v is not None}
        return {}, forward, post

    def generation_config(self, generation_config=None, **kwargs) -> GenerationConfig:
        """The export's defaults (``max_new_tokens=8``, its EOS and PAD ids), updated by ``generation_config`` and
        ``kwargs``; refuses options the encrypted loop does not implement."""
        meta = self.export.meta
        gc = GenerationConfig(max_new_tokens=8, eos_token_id=meta.get("eos_token_id"), pad_token_id=meta.get("pad_token_id"))
        if generation_config is not None:
            gc.update(**generation_config.to_diff_dict())
        gc.update(**kwargs)
        gc.validate()
        unsupported = sorted(k for k in gc.to_diff_dict() if k not in SUPPORTED)
        if unsupported:
            raise ValueError(f"{self.task_name} does not support {unsupported}; supported generation options: "
                             f"{sorted(SUPPORTED - {'transformers_version', '_from_model_config'})}")
        if (gc.num_beams or 1) > 1 or (gc.num_return_sequences or 1) > 1:
            raise ValueError("beam search and several return sequences are not supported under encryption (each "
                             "beam would need its own encrypted KV cache on the server): use num_beams=1")
        return gc

    def preprocess(self, prompt):
        if not isinstance(prompt, str):
            raise TypeError(f"{self.task_name} takes a string or a list of strings, got {type(prompt).__name__}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        return {"prompt": prompt, "input_ids": [int(i) for i in ids]}

    def _forward(self, inputs, generation_config=None, logits_processor=None, stopping_criteria=None, seed=None,
                 generate_kwargs=None):
        gc = self.generation_config(generation_config, **(generate_kwargs or {}))
        prompt_len = len(inputs["input_ids"])
        max_new = gc.max_new_tokens if "max_length" not in (generate_kwargs or {}) else gc.max_length - prompt_len
        procs = logits_processors(gc, prompt_len)
        procs.extend(logits_processor or [])
        stops = StoppingCriteriaList(stopping_criteria or [])
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def next_token(ids, logits) -> int:
            scores = procs(torch.tensor([ids]), torch.as_tensor(logits, dtype=torch.float32)[None])
            if not gc.do_sample:
                return int(scores.argmax(-1))
            return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))

        def stop(ids, logits) -> bool:
            if not stops:
                return False
            return bool(stops(torch.tensor([ids]), torch.as_tensor(logits, dtype=torch.float32)[None]).all())

        t_server = self._timed_server()
        ids, info = self.client.generate(t_server[0], inputs["input_ids"], max_new, next_token=next_token,
                                         eos_token_id=gc.eos_token_id, stop=stop, verbose=self.verbose)
        return {**inputs, "output_ids": ids, "he": self._he_info(info, t_server[1])}

    def postprocess(self, outputs, return_full_text: bool = True, skip_special_tokens: bool = True):
        n = len(outputs["input_ids"])
        new = self.tokenizer.decode(outputs["output_ids"][n:], skip_special_tokens=skip_special_tokens)
        text = outputs["prompt"] + new if return_full_text else new
        return [{"generated_text": text, "he": json_safe({**outputs["he"], "token_ids": outputs["output_ids"]})}]
