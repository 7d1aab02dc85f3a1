"""The end-to-end demo behind ``hf-polyhe demo`` / ``make demo``.

1. trains a tiny HE-friendly PolyGPT (1 layer, d=32, pointwise *square* attention scaled by 1/length,
   BatchNorm-style norms, GELU MLP) on text shipped with the package;
2. makes it polynomial *during* training with :class:`~hf_polyhe.training.PolyReplacementCallback` (the GELU is
   fitted on the range it actually sees and swapped in; training continues on the polynomial);
3. exports it with :func:`~hf_polyhe.save_encrypted_pipeline`;
4. generates with ``pipeline("encrypted-text-generation")`` on CKKS ciphertexts -- 128-bit parameters by
   default, ``fast=True`` for the INSECURE toy set -- and prints plaintext vs encrypted output with timings.

Cost: at 128-bit the ring is N = 2^16 and the prompt's pass costs ~40 s on 2 cores (rotation keys and
ciphertext-ciphertext products at ~17 levels), so the default encrypts a short prompt and generates
``encrypted_tokens=2`` new tokens under encryption: the prompt's pass, then one step with the encrypted KV cache
(~7 s); ``fast=True`` generates 3. The plaintext side generates ``max_new_tokens``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings

import torch
from tqdm.auto import tqdm

from .data import lm_blocks, load_tiny_corpus, split_paragraphs, tiny_tokenizer, train_test_split
from .models.poly_gpt import PolyGPTConfig, PolyGPTForCausalLM
from .status import polynomial_status, set_operator_mode

DEMO_PROMPTS = ["The assert statement", "A class definition", "The return statement"]
ENCRYPTED_PROMPT = "The return"


def demo_config(tokenizer) -> PolyGPTConfig:
    """The demo architecture: as shallow in CKKS levels as a useful LM gets (one layer, square attention,
    affine norms at inference, one polynomial activation)."""
    return PolyGPTConfig(
        vocab_size=len(tokenizer), max_position_embeddings=64, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=128, hidden_act="gelu", attention_type="pointwise",
        attention_activation="square", attention_scaling="length", norm_type="batchnorm", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_tiny_gpt(steps: int = 300, block_size: int = 32, batch_size: int = 16, seed: int = 0, degree: int = 15,
                   verbose: bool = True):
    """Train the demo PolyGPT; its operators become polynomials at 2/3 of the run (PolyReplacementCallback).
    Returns ``(model, tokenizer, train blocks, test blocks, callback)``."""
    from .training import PolyReplacementCallback, schedule_by_layer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(vocab_size=384)
    train_texts, test_texts = train_test_split(split_paragraphs(load_tiny_corpus()), 0.1, seed)
    train = torch.tensor(lm_blocks(tokenizer, train_texts, block_size))
    test = torch.tensor(lm_blocks(tokenizer, test_texts, block_size))
    config = demo_config(tokenizer)
    model = PolyGPTForCausalLM(config)
    callback = PolyReplacementCallback(
        schedule_by_layer(config.num_hidden_layers, start=max(1, (2 * steps) // 3), every=1,
                          ramp_steps=max(1, steps // 10)),
        margin=0.2, degree=degree)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(range(1, steps + 1), desc="training tiny PolyGPT", disable=not verbose) as bar:  # closed on errors too
        for step in bar:
            batch = train[torch.randint(len(train), (batch_size,), generator=gen)]
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            callback.step(model, step)
    callback.finish(model)
    return model.eval(), tokenizer, train, test, callback


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    losses = [model(blocks[i : i + batch_size], labels=blocks[i : i + batch_size], use_cache=False).loss.item()
              for i in range(0, len(blocks), batch_size)]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def measure_ranges(model, blocks: torch.Tensor, margin: float = 0.1, batch_size: int = 32) -> dict:
    """``{operator path: (lo, hi)}`` from the inputs seen on ``blocks``, widened by ``margin`` of the span."""
    from .export import calibrate_ranges

    return calibrate_ranges(model, [{"input_ids": blocks[i : i + batch_size], "use_cache": False}
                                    for i in range(0, len(blocks), batch_size)], margin)


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int):
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0].tolist()


def run_demo(steps: int = 300, degree: int = 15, max_new_tokens: int = 12, verbose: bool = True, fast: bool = False,
             encrypted: bool = True, encrypted_tokens=None, key_dir=None) -> dict:
    """Run the demo; returns its numbers (perplexities, generations, encrypted tokens and timings)."""
    t0 = time.perf_counter()
    model, tokenizer, train, test, callback = train_tiny_gpt(steps=steps, degree=degree, verbose=verbose)
    t_train = time.perf_counter() - t0
    status = polynomial_status(model)
    ppl_poly = perplexity(model, test)
    poly_out = [tokenizer.decode(_greedy(model, tokenizer, p, max_new_tokens)) for p in DEMO_PROMPTS]
    set_operator_mode(model, "exact")  # the same weights with the exact GELU, for comparison
    ppl_exact = perplexity(model, test)
    exact_out = [tokenizer.decode(_greedy(model, tokenizer, p, max_new_tokens)) for p in DEMO_PROMPTS]
    set_operator_mode(model, "poly")

    print("\n== Polynomial status (made polynomial during training by PolyReplacementCallback) ==")
    print(status)
    print(f"\n== Held-out perplexity: exact {ppl_exact:.2f} | polynomial {ppl_poly:.2f} (training {t_train:.0f} s) ==")
    print("\n== Greedy generation, side by side ==")
    for prompt, e, p in zip(DEMO_PROMPTS, exact_out, poly_out):
        print(f"prompt     : {prompt!r}\n exact     : {e!r}\n polynomial: {p!r}\n")
    result = {"ppl_exact": ppl_exact, "ppl_poly": ppl_poly, "exact": exact_out, "poly": poly_out,
              "fully_polynomial": status.is_polynomial, "train_s": t_train}
    if encrypted:
        result.update(_encrypted_part(model, tokenizer, fast, encrypted_tokens, key_dir, verbose))
    return result


def _encrypted_part(model, tokenizer, fast: bool, n_tokens, key_dir, verbose: bool) -> dict:
    from transformers import pipeline

    from .export import save_encrypted_pipeline
    from .he.errors import ToyParametersWarning

    n_tokens = n_tokens or (3 if fast else 2)
    prompt_ids = tokenizer(ENCRYPTED_PROMPT, add_special_tokens=False)["input_ids"]
    if fast:
        print("\nWARNING: --fast uses the INSECURE toy CKKS parameter set (N = 2^12, no security): a quick look "
              "only. Run without --fast for 128-bit security.")
    security = "toy (INSECURE)" if fast else "128-bit (HEStd_128_classic)"
    with tempfile.TemporaryDirectory(prefix="hf_polyhe_demo_") as tmp:
        export_dir = os.path.join(tmp, "export")
        save_encrypted_pipeline(model, tokenizer, export_dir, max_length=len(prompt_ids) + n_tokens)
        print(f"\n== Encrypted generation: {security}, prompt {ENCRYPTED_PROMPT!r} ({len(prompt_ids)} tokens), "
              f"{n_tokens} new tokens ==")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            if fast:
                warnings.simplefilter("ignore", ToyParametersWarning)  # warned once above, loudly
            client = None
            if key_dir is None:  # one-off keys kept in memory: no key files, no bundle serialised (GBs at 128-bit)
                from .he import Client

                if verbose:
                    print("generating CKKS keys (kept in memory for this run) ...", flush=True)
                client = Client.keygen(export_dir, "toy" if fast else "default")
            pipe = pipeline("encrypted-text-generation", model=export_dir, he_params="toy" if fast else "default",
                            key_dir=key_dir, client=client, verbose=verbose)
            pipe.prepare()  # keys + server now, so setup and generation are timed apart
            t_setup = time.perf_counter() - t0
            (out,) = pipe(ENCRYPTED_PROMPT, max_new_tokens=n_tokens, eos_token_id=-1)
        t_total = time.perf_counter() - t0
    plain_ids = _greedy(model, tokenizer, ENCRYPTED_PROMPT, n_tokens)
    he = out["he"]
    match = he["token_ids"] == plain_ids
    print(f" plaintext : {tokenizer.decode(plain_ids)!r}")
    print(f" encrypted : {out['generated_text']!r}   ({'identical tokens' if match else 'TOKENS DIFFER'})")
    print(f" CKKS      : ring 2^{he['ring_dim'].bit_length() - 1}, {he['levels']} levels, {he['rotation_keys']} rotation "
          f"keys, {he['mode']}")
    per_token = ", ".join(f"{s:.1f} s" for s in he["timings"]["per_token_s"])
    print(f" timings   : keys + evaluator {t_setup:.1f} s; per token {per_token}; total {t_total:.1f} s")
    return {"encrypted_ids": he["token_ids"], "plain_ids": plain_ids, "encrypted_matches": match,
            "encrypted_setup_s": t_setup, "encrypted_total_s": t_total, "encrypted_per_token_s": he["timings"]["per_token_s"],
            "encrypted_text": out["generated_text"], "security": security}
