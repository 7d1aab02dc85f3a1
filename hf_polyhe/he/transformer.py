"""Transformer circuits from a torch-free model description (what an HE server needs, without torch).

``export.py`` writes a :class:`TransformerSpec`: the architecture as JSON (norm kinds, attention options,
fitted polynomial approximations) plus every server-side weight as a named float64 array. From it,
:func:`build_transformer_circuit` builds the circuit for any sequence length and padding mask, so one export
serves every prompt length up to ``max_length``.

Spec layout (``spec.json``; weights referenced by name)::

    {"version": 1, "family": "gpt" | "bert" | "vit", "hidden_size": d, "num_heads": h, "max_length": L,
     "causal": bool, "embedding_norm": NORM | null, "layers": [LAYER, ...], "final_norm": NORM | null,
     "head": {"kind": "last_token" | "pooler_cls" | "cls", ...}}
    LAYER = {"pre_norm": bool, "attention_norm": NORM, "mlp_norm": NORM,
             "attn": {"q": LIN, "k": LIN, "v": LIN, "o": LIN, "activation": ACT, "scaling": "none"|"length"|"sqrt_length",
                      "scaling_position": "post" | "pre"},   # pre: act(S / s(n)) * M, post: act(S) * M / s(n)
             "mlp": {"fc_in": LIN, "norm": NORM | null, "act": ACT, "fc_out": LIN}}
    LIN  = {"weight": name (d_in x d_out), "bias": name | null}
    NORM = {"kind": "layernorm", "eps": float, "weight": name, "bias": name, "inv_sqrt": APPROX}
         | {"kind": "affine", "scale": name, "shift": name}
         | {"kind": "power", "q"/"k"/"v"/"o": LIN, "power": p, "eps": float, "normalizer": APPROX}  # power-softmax
    ACT  = {"kind": "poly", "approximation": APPROX} | {"kind": "square"} | {"kind": "identity"}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import CircuitError
from .ir import Circuit
from .optimize import fold_plaintext_maps
from .packing import next_pow2

SPEC_VERSION = 1
SCALINGS = {"none": lambda n: np.ones_like(n), "length": lambda n: n, "sqrt_length": np.sqrt}


@dataclass
class TransformerSpec:
    config: dict
    weights: dict = field(default_factory=dict)

    def add(self, name: str, value) -> str:
        arr = np.asarray(value, dtype=np.float64)
        if name in self.weights:
            raise CircuitError(f"weight {name!r} defined twice")
        self.weights[name] = arr
        return name

    def save(self, directory) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "spec.json"), "w") as f:
            json.dump({**self.config, "version": SPEC_VERSION}, f, indent=1)
        np.savez(os.path.join(directory, "spec_weights.npz"), **self.weights)

    @classmethod
    def load(cls, directory) -> "TransformerSpec":
        try:
            with open(os.path.join(directory, "spec.json")) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CircuitError(f"cannot read transformer spec in {directory}: {e}") from e
        if config.get("version") != SPEC_VERSION:
            raise CircuitError(f"transformer spec version {config.get('version')!r} is not supported (expected {SPEC_VERSION})")
        with np.load(os.path.join(directory, "spec_weights.npz"), allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
        return cls(config, weights)


def default_packing(seq_len: int, hidden_size: int) -> tuple[int, int]:
    """``(block, slots)``: block = next power of two >= d, one row per token, rows rounded to a power of two."""
    block = next_pow2(hidden_size)
    return block, next_pow2(seq_len) * block


class _Builder:
    def __init__(self, spec: TransformerSpec, circuit: Circuit):
        self.s, self.c = spec, circuit

    def w(self, name):
        return self.s.weights[name]

    def linear(self, x, lin, name=None, confine=False, scale: float = 1.0):
        """``x @ (scale * W) + b`` for a spec LIN (``scale``: a constant folded into the weights)."""
        W = self.w(lin["weight"])
        return self.c.linear(x, W if scale == 1.0 else scale * W, self.w(lin["bias"]) if lin.get("bias") else None,
                             name=name, confine=confine)

    def spread_attention(self) -> bool:
        """Shift-parallel attention (keys/values confined to one row group, see ops._GroupShifts): with row
        groups and prompts of at most half a group's rows."""
        c = self.c
        return c.groups > 1 and 2 * c.inputs["x"][0] <= c.slots // c.block

    def act(self, x, act):
        if act["kind"] == "poly":
            return self.c.poly(x, act["approximation"])
        if act["kind"] == "square":
            return self.c.mul(x, x)
        if act["kind"] == "identity":
            return x
        raise CircuitError(f"unknown activation kind {act['kind']!r}; accepted: poly, square, identity")

    def norm(self, x, norm, d):
        c = self.c
        if norm["kind"] == "layernorm":
            mean = c.row_sum(x, 1.0 / d)
            xc = c.sub(x, mean)
            var = c.row_sum(c.mul(xc, xc), 1.0 / d)
            inv = c.poly(c.add_plain(var, float(norm["eps"])), norm["inv_sqrt"])
            return c.add_plain(c.mul_plain(c.mul(xc, inv), self.w(norm["weight"])), self.w(norm["bias"]))
        if norm["kind"] == "affine":
            return c.add_plain(c.mul_plain(x, self.w(norm["scale"])), self.w(norm["shift"]))
        raise CircuitError(f"unknown norm kind {norm['kind']!r}; accepted: layernorm, affine")

    def attention(self, x, attn, mask, causal):
        c = self.c
        spread = self.spread_attention()
        q = self.linear(x, attn["q"])
        k, v = (self.linear(x, attn[n], confine=spread) for n in "kv")
        return self.attend(q, k, v, attn, mask, causal)

    def power(self, x, p: int):
        """``x ** p`` (even ``p``) by squarings: ``ceil(log2 p)`` levels."""
        c = self.c
        y, acc, e = c.mul(x, x), None, p // 2
        while e:
            if e & 1:
                acc = y if acc is None else c.mul(acc, y)
            e >>= 1
            if e:
                y = c.mul(y, y)
        return acc

    def attend(self, q, k, v, attn, mask, causal):
        """Scores, activation and the weighted values; the length scaling ``s(n)`` (``n`` the unmasked keys of
        each query row) goes into the scores' per-row scale (``pre``) or into the values' mask (``post``).
        Power-softmax (``kind: power``): ``(S^p M / n) V`` times the polynomial reciprocal of the row mean
        ``sum_j S^p M / n + eps``, per head."""
        c = self.c
        heads = self.s.config["num_heads"]
        d = self.s.config["hidden_size"]
        if attn.get("kind") == "power":
            scores = c.qk_scores(q, k, heads, scale=(d // heads) ** -0.5, causal=causal)
            powered = self.power(scores, int(attn["power"]))
            m = mask / np.maximum(mask.sum(-1), 1.0)[:, None]
            mean = c.attn_rowsum(powered, mask=m)
            inv = c.poly(c.add_plain(mean, float(attn["eps"])), attn["normalizer"])
            return self.linear(c.mul(c.attn_apply(powered, v, mask=m), inv), attn["o"])
        s_n = SCALINGS[attn["scaling"]](np.maximum(mask.sum(-1), 1.0))
        pre = attn.get("scaling_position", "post") == "pre"
        scores = c.qk_scores(q, k, heads, scale=(d // heads) ** -0.5, causal=causal, row_scale=1.0 / s_n if pre else None)
        weights = self.act(scores, attn["activation"])
        return self.linear(c.attn_apply(weights, v, mask=mask if pre else mask / s_n[:, None]), attn["o"])

    def mlp(self, x, mlp):
        h = self.linear(x, mlp["fc_in"])
        if mlp.get("norm"):
            h = self.norm(h, mlp["norm"], self.w(mlp["fc_in"]["weight"]).shape[1])
        return self.linear(self.act(h, mlp["act"]), mlp["fc_out"])

    def layer(self, x, layer, mask, causal, d):
        c = self.c
        if layer["pre_norm"]:
            x = c.add(x, self.attention(self.norm(x, layer["attention_norm"], d), layer["attn"], mask, causal))
            return c.add(x, self.mlp(self.norm(x, layer["mlp_norm"], d), layer["mlp"]))
        x = self.norm(c.add(x, self.attention(x, layer["attn"], mask, causal)), layer["attention_norm"], d)
        return self.norm(c.add(x, self.mlp(x, layer["mlp"])), layer["mlp_norm"], d)


def attention_mask_matrix(seq_len: int, attention_mask=None, causal: bool = False) -> np.ndarray:
    """The multiplicative ``seq_len x seq_len`` 0/1 mask: padded keys (``attention_mask`` zeros) and, for causal
    models, future positions are 0."""
    mask = np.ones((seq_len, seq_len))
    if attention_mask is not None:
        am = np.asarray(attention_mask, dtype=np.float64).reshape(-1)
        if am.shape != (seq_len,) or not np.isin(am, (0.0, 1.0)).all() or am.sum() == 0:
            raise CircuitError(f"attention_mask must be {seq_len} zeros/ones with at least one 1, got {am.tolist()}")
        mask = mask * am[None, :]
    return np.tril(mask) if causal else mask


def build_transformer_circuit(spec: TransformerSpec, seq_len: int, attention_mask=None, all_logits: bool = False,
                              slots: Optional[int] = None, groups: int = 1) -> Circuit:
    """The circuit computing ``spec``'s output for an ``seq_len x d`` embedding input named ``x``.

    Outputs: the causal LM's last-row logits (``1 x vocab``; every row with ``all_logits``), or a
    classifier's ``1 x num_labels`` logits. ``attention_mask`` (``seq_len`` entries, 1 = token) masks keys."""
    cfg = spec.config
    d, max_len = cfg["hidden_size"], cfg["max_length"]
    if not 1 <= seq_len <= max_len:
        raise CircuitError(f"sequence length {seq_len} is outside the exported range 1..{max_len}")
    block, default_slots = default_packing(max_len, d)
    c = Circuit(block=block, slots=slots or default_slots, name=f"{cfg['family']}-L{seq_len}", groups=groups)
    b = _Builder(spec, c)
    x = c.input("x", seq_len, d)
    causal = bool(cfg["causal"])
    mask = attention_mask_matrix(seq_len, attention_mask, causal)
    if cfg.get("embedding_norm"):
        x = b.norm(x, cfg["embedding_norm"], d)
    for layer in cfg["layers"]:
        x = b.layer(x, layer, mask, causal, d)
    if cfg.get("final_norm"):
        x = b.norm(x, cfg["final_norm"], d)
    head = cfg["head"]
    if head["kind"] == "last_token":
        out = b.linear(x if all_logits else c.select_rows(x, [seq_len - 1]), head["lm_head"])
    elif head["kind"] == "pooler_cls":
        pooled = b.act(b.linear(c.select_rows(x, [0]), head["pooler"]), head["pooler_act"])
        out = b.linear(pooled, head["classifier"])
    elif head["kind"] == "cls":
        out = b.linear(c.select_rows(x, [0]), head["classifier"])
    else:
        raise CircuitError(f"unknown head kind {head['kind']!r}; accepted: last_token, pooler_cls, cls")
    c.output(out)
    c.meta.update(family=cfg["family"], seq_len=seq_len)
    return fold_plaintext_maps(c)
