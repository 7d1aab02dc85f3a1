"""The end-to-end demo behind ``hf-polyhe demo`` / ``make demo``.

Trains a tiny PolyGPT on text shipped with the package, measures the input range of every non-polynomial
operator, makes the model fully polynomial, and prints exact vs polynomial generations side by side.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .data import lm_blocks, load_tiny_corpus, split_paragraphs, tiny_tokenizer, train_test_split
from .models.poly_gpt import PolyGPTConfig, PolyGPTForCausalLM
from .status import polynomial_status, to_polynomial

DEMO_PROMPTS = ["The assert statement", "A class definition", "The return statement"]


def train_tiny_gpt(steps: int = 300, block_size: int = 32, batch_size: int = 16, seed: int = 0, verbose: bool = True):
    """Train the demo PolyGPT (2 layers, d=64, pointwise ReLU attention, polynomial-ready LayerNorm)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(vocab_size=512)
    train_texts, test_texts = train_test_split(split_paragraphs(load_tiny_corpus()), 0.1, seed)
    train = torch.tensor(lm_blocks(tokenizer, train_texts, block_size))
    test = torch.tensor(lm_blocks(tokenizer, test_texts, block_size))
    config = PolyGPTConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, hidden_act="gelu", attention_type="pointwise",
        attention_activation="relu", norm_type="poly_layernorm", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = PolyGPTForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="training tiny PolyGPT", disable=not verbose):
        batch = train[torch.randint(len(train), (batch_size,), generator=gen)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.eval(), tokenizer, train, test


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    losses = [model(blocks[i : i + batch_size], labels=blocks[i : i + batch_size], use_cache=False).loss.item()
              for i in range(0, len(blocks), batch_size)]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def measure_ranges(model, blocks: torch.Tensor, margin: float = 0.1, batch_size: int = 32) -> dict:
    """``{operator path: (lo, hi)}`` from the inputs seen on ``blocks``, widened by ``margin`` of the span."""
    from .nn import poly_operators

    seen: dict = {}
    hooks = []
    for path, op in poly_operators(model).items():
        def hook(module, args, path=path):
            x = args[0]
            lo, hi = seen.get(path, (math.inf, -math.inf))
            seen[path] = (min(lo, float(x.min())), max(hi, float(x.max())))
        hooks.append(op.register_forward_pre_hook(hook))
    try:
        for i in range(0, len(blocks), batch_size):
            model(blocks[i : i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for path, (lo, hi) in seen.items():
        pad = margin * (hi - lo) + 1e-3
        out[path] = (lo / 2 if 0 < lo <= pad else lo - pad, hi + pad)
    return out


def run_demo(steps: int = 300, degree: int = 31, max_new_tokens: int = 12, verbose: bool = True) -> dict:
    t0 = time.perf_counter()
    model, tokenizer, train, test = train_tiny_gpt(steps=steps, verbose=verbose)
    t_train = time.perf_counter() - t0
    ppl_exact = perplexity(model, test)
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in DEMO_PROMPTS]
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=tokenizer.pad_token_id)
    exact_out = [tokenizer.decode(model.generate(p, attention_mask=torch.ones_like(p), **kw)[0]) for p in prompts]

    to_polynomial(model, ranges=measure_ranges(model, train[:256]), degree=degree)
    status = polynomial_status(model)
    ppl_poly = perplexity(model, test)
    poly_out = [tokenizer.decode(model.generate(p, attention_mask=torch.ones_like(p), **kw)[0]) for p in prompts]

    print("\n== Polynomial status ==")
    print(status)
    print(f"\n== Held-out perplexity: exact {ppl_exact:.2f} | polynomial {ppl_poly:.2f} (training {t_train:.0f} s) ==")
    print("\n== Greedy generation, side by side ==")
    for prompt, e, p in zip(DEMO_PROMPTS, exact_out, poly_out):
        print(f"prompt     : {prompt!r}\n exact     : {e!r}\n polynomial: {p!r}\n")
    return {"ppl_exact": ppl_exact, "ppl_poly": ppl_poly, "exact": exact_out, "poly": poly_out,
            "fully_polynomial": status.is_polynomial}
