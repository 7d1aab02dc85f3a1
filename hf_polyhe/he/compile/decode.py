"""The decode step of generation with an encrypted KV cache: one token's work per new token.

Prefill (:func:`~hf_polyhe.he.compile.transformer.build_circuit` with ``kv_cache=True``, ``L`` tokens): input
``x`` (``L x d`` embeddings); outputs the last row's logits and, per layer ``i``, ``k{i}`` / ``v{i}`` (``L x d``,
the attention keys and values, clean packing).

Decode step at position ``t`` (the new token is token number ``t``, 0-based, so ``t`` tokens are cached):
inputs ``x`` (``1 x d``: the new token's embedding) and per layer ``k{i}`` / ``v{i}`` (``t x d``); outputs the
logits (``1 x vocab``) and the updated caches ``k{i}`` / ``v{i}`` (``(t + 1) x d``). The new key/value row is
appended with popcount(t) rotations (``append_row``), the query meets the ``t + 1`` keys with ``qk_decode`` and the
values with ``attn_decode``: ``O(log t)`` rotations per layer instead of a full re-run over ``t + 1`` rows.

When the ciphertext is wide enough (row groups, :func:`vector_decode`) the step runs on one-row vectors
(:class:`~hf_polyhe.he.circuit.packing.TiledVector` / :class:`~hf_polyhe.he.circuit.packing.ColumnVector`): the client encrypts
the token as a column vector (``ExportPlan.decode_input``), every linear is one plaintext product and ``log2``
rotations instead of one product per diagonal, keys and values come from one linear, and the tiled rows are
masked into the caches (which keep the prefill's matrix packing). Measured at 128-bit on the benchmark's W1
(2 layers, d = 64): 105 rotations and 18 plaintext products per token instead of 213 and 836.

The decode step has the same op sequence per layer as :func:`~hf_polyhe.he.compile.transformer.build_circuit`
(qk_decode / attn_decode spend the levels qk_scores / attn_apply spend), so the planner places bootstraps at
the same points and a cache written by the prefill carries the levels the decode step expects
(:func:`check_cache_levels`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import CircuitError, PlanningError
from ..circuit.ir import Circuit
from ..circuit.optimize import fold_plaintext_maps
from ..circuit.packing import ColumnVector, next_pow2
from .transformer import SCALINGS, TransformerSpec, _Builder, attention_dims, cache_names, check_causal_lm, head, new_circuit


class _DecodeBuilder(_Builder):
    """Decode step: attention of the new row against the cache (inputs ``k{i}_cache``/``v{i}_cache``)."""

    def __init__(self, spec, circuit, position):
        super().__init__(spec, circuit, keep_cache=True)
        self.t = position

    def _attention(self, x, attn, mask, causal, i):
        c = self.c
        heads, head_dim, scale = attention_dims(self.s.config)
        q, k, v = (self.linear(x, attn[n]) for n in "qkv")
        keys = c.append_row(c.input(f"k{i}_cache", self.t, heads * head_dim), k, name=f"k{i}")
        values = c.append_row(c.input(f"v{i}_cache", self.t, heads * head_dim), v, name=f"v{i}")
        if attn.get("kind") == "power":  # as _Builder.attend, for the one new query row
            scores = c.qk_decode(q, keys, heads, scale=scale)
            powered = self.power(scores, int(attn["power"]))
            w = np.ones(self.t + 1) / (self.t + 1.0)
            mean = c.decode_rowsum(powered, heads, w)
            inv = c.poly(c.add_plain(mean, float(attn["eps"])), attn["normalizer"])
            return self.linear(c.mul(c.attn_decode(powered, values, heads, w), inv), attn["o"])
        s_n = float(SCALINGS[attn["scaling"]](np.array([self.t + 1.0]))[0])
        pre = attn.get("scaling_position", "post") == "pre"
        scores = c.qk_decode(q, keys, heads, scale=scale / (s_n if pre else 1.0))
        weights = self.act(scores, attn["activation"])
        key_weights = np.ones(self.t + 1) / (1.0 if pre else s_n)
        return self.linear(c.attn_decode(weights, values, heads, key_weights), attn["o"])


class _VectorDecodeBuilder(_DecodeBuilder):
    """Decode step on one-row vectors (:func:`vector_decode`): the residual stream is a
    :class:`~hf_polyhe.he.circuit.packing.ColumnVector`, q/k/v, the attention output and the MLP's hidden layer are
    :class:`~hf_polyhe.he.circuit.packing.TiledVector` s, so every linear is one plaintext product and ``log2`` rotations
    (instead of one product per diagonal). The new key/value row is masked into the cache (it is in every row
    already), and with a square / identity attention activation the per-key weights (a constant ``1/s(n)``) go
    into the query scale (power-softmax: into decode_rowsum's mask and the output projection), so ``attn_decode``
    skips its mask: the same levels per layer as the matrix path."""

    def _attention(self, x, attn, mask, causal, i):
        c = self.c
        d = self.s.config["hidden_size"]
        heads, head_dim, scale = attention_dims(self.s.config)
        q = self.linear(x, attn["q"])
        kv = self.c.linear(x, *self._stacked(attn["k"], attn["v"], d))  # [k | v]: one product, one row sum
        keys = c.append_row(c.input(f"k{i}_cache", self.t, heads * head_dim), kv, name=f"k{i}")
        values = c.append_row(c.input(f"v{i}_cache", self.t, heads * head_dim), kv, part=1, name=f"v{i}")
        if attn.get("kind") == "power":  # the mean's 1/(t+1) in decode_rowsum's mask, the values' in W_o
            w = 1.0 / (self.t + 1.0)
            powered = self.power(c.qk_decode(q, keys, heads, scale=scale), int(attn["power"]))
            mean = c.decode_rowsum(powered, heads, scale=w, tiled=True)
            inv = c.poly(c.add_plain(mean, float(attn["eps"])), attn["normalizer"])
            return self.linear(c.mul(c.attn_decode(powered, values, heads, tiled=True), inv), attn["o"], scale=w)
        s_n = float(SCALINGS[attn["scaling"]](np.array([self.t + 1.0]))[0])
        pre = attn.get("scaling_position", "post") == "pre"
        w = 1.0 if pre else 1.0 / s_n  # the same weight for every key: into the query scale
        if pre:
            scale /= s_n
        scale *= math.sqrt(w) if attn["activation"]["kind"] == "square" else w
        weights = self.act(c.qk_decode(q, keys, heads, scale=scale), attn["activation"])
        return self.linear(c.attn_decode(weights, values, heads, tiled=True), attn["o"])


    def _stacked(self, k, v, d):
        """``[W_k | 0 | W_v | 0]`` (each padded to a block) and its bias: keys and values as parts 0 and 1."""
        D = next_pow2(d)
        W = np.zeros((d, 2 * D))
        b = np.zeros(2 * D)
        for p, lin in enumerate((k, v)):
            w = self.w(lin["weight"])  # d x (heads * head_dim)
            W[:, p * D : p * D + w.shape[1]] = w
            if lin.get("bias"):
                b[p * D : p * D + w.shape[1]] = self.w(lin["bias"])
        return W, b


def vector_decode(spec: TransformerSpec, ct_slots: int) -> Optional[ColumnVector]:
    """The decode input's layout when decode steps run on one-row vectors (:class:`_VectorDecodeBuilder`), else
    None (the matrix path). It needs rows of ``ct_slots / next_pow2(d)`` slots at least as wide as the tiled
    periods: twice the hidden size (keys and values), twice every MLP width (so at most two products per
    linear) and the vocabulary (all rounded up to powers of two); and attention that keeps the scores zero off
    the heads' columns (power-softmax, or a square / identity activation: a polynomial with ``p(0) != 0`` would
    need attn_decode's mask, a level more than the matrix path spends)."""
    cfg = spec.config
    if cfg["head"]["kind"] != "last_token":
        return None
    D = next_pow2(cfg["hidden_size"])
    widths = [2 * D, next_pow2(spec.weights[cfg["head"]["lm_head"]["weight"]].shape[1])]  # 2D: keys | values
    # twice the MLP period: fc_out's window leaves at least half a row valid, so a linear from the residual stream
    # needs at most two products (one per valid-wide chunk of its output)
    widths += [2 * next_pow2(spec.weights[layer["mlp"]["fc_in"]["weight"]].shape[1]) for layer in cfg["layers"]]
    width = ct_slots // D
    if width < max(widths):
        return None
    for layer in cfg["layers"]:
        attn = layer["attn"]
        if attn.get("kind") != "power" and attn["activation"]["kind"] not in ("square", "identity"):
            return None  # act(0) != 0 would need attn_decode's mask: a level more than the matrix path
    return ColumnVector(cfg["hidden_size"], width, ct_slots)


def build_decode_circuit(spec: TransformerSpec, position: int, groups: int = 1, slots: Optional[int] = None,
                         vectors: bool = True) -> Circuit:
    """One decode step for the token at ``position`` (``position`` tokens already cached). ``vectors``: on
    one-row vectors when the ciphertext is wide enough (:func:`vector_decode`; the input ``x`` is then a
    :class:`~hf_polyhe.he.circuit.packing.ColumnVector`), else (or ``False``) in the matrix packing."""
    check_causal_lm(spec)
    cfg = spec.config
    d, max_len = cfg["hidden_size"], cfg["max_length"]
    if not 1 <= position < max_len:
        raise CircuitError(f"decode position {position} is outside 1..{max_len - 1} (the export's max_length is "
                           f"{max_len}; the prompt itself goes through the prefill)")
    c = new_circuit(spec, position + 1, f"decode-t{position}", groups=groups, slots=slots)
    layout = vector_decode(spec, c.ct_slots) if vectors else None
    b = (_VectorDecodeBuilder if layout else _DecodeBuilder)(spec, c, position)
    x = c.input("x", 1, d, layout=layout)
    if cfg.get("embedding_norm"):
        x = b.norm(x, cfg["embedding_norm"], d)
    for layer in cfg["layers"]:
        x = b.layer(x, layer, None, True, d)
    c.output(head(b, x, 1, all_rows=True), *cache_names(spec))
    c.meta.update(family=cfg["family"], seq_len=position + 1, kind="decode")
    return fold_plaintext_maps(c)


def decode_inputs(x_row, caches: dict) -> dict:
    """Input dict of a decode circuit: ``x`` and the caches under their input names (``k0_cache``, ...)."""
    return {"x": x_row, **{f"{k}_cache": v for k, v in caches.items()}}


def check_cache_levels(prefill_levels: dict, decode_levels: dict, names) -> None:
    """A cache handed to a decode step must not carry more consumed levels than the step's own new K/V row
    (the planner treats cache inputs as fresh); raises :class:`PlanningError` naming the tensor otherwise."""
    for n in names:
        new_row = decode_levels.get(n)
        if new_row is None:
            continue
        if prefill_levels.get(n, 0) > new_row:
            raise PlanningError(f"cache {n!r}: the prefill leaves it at level {prefill_levels[n]}, the decode step "
                                f"expects at most {new_row}; raise levels_after_bootstrap")
