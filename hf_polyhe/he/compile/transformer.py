"""Transformer circuits from a torch-free model description (what an HE server needs, without torch).

``export.py`` writes a :class:`TransformerSpec`: the architecture as JSON (norm kinds, attention options,
fitted polynomial approximations) plus every server-side weight as a named float64 array. From it,
:func:`build_circuit` builds the circuit for any sequence length and padding mask (and, for a causal LM, the
KV-cache prefill that also returns every layer's keys and values), so one export serves every prompt length up
to ``max_length``; the decode step is in :mod:`~hf_polyhe.he.compile.decode`.

Spec layout (``spec.json``; weights referenced by name)::

    {"version": 1, "family": "gpt" | "bert" | "vit", "hidden_size": d, "num_heads": h, "max_length": L,
     "causal": bool, "embedding_norm": NORM | null, "layers": [LAYER, ...], "final_norm": NORM | null,
     "head": {"kind": "last_token" | "pooler_cls" | "cls" | "mean_pool", ...}}
    (``mean_pool``: no weights; the output is the mean of the final hidden states over the unmasked tokens -- the
    sentence embedding of an encoder exported for ``encrypted-feature-extraction``)
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
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..files import load_arrays, read_json, save_arrays
from ..errors import CircuitError
from ..circuit.ir import Circuit
from ..circuit.optimize import fold_plaintext_maps
from ..circuit.packing import next_pow2

SPEC_VERSION = 1
OUTPUT = "logits"
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
        save_arrays(directory, "spec_weights", self.weights)

    @classmethod
    def load(cls, directory) -> "TransformerSpec":
        try:
            config = read_json(os.path.join(directory, "spec.json"))
        except (OSError, ValueError) as e:
            raise CircuitError(f"cannot read transformer spec in {directory}: {e}") from e
        if not isinstance(config, dict) or config.get("version") != SPEC_VERSION:
            raise CircuitError(f"transformer spec version {getattr(config, 'get', dict().get)('version')!r} is not supported (expected {SPEC_VERSION})")
        return cls(config, load_arrays(directory, "spec_weights"))


def default_packing(seq_len: int, hidden_size: int) -> tuple[int, int]:
    """``(block, slots)``: block = next power of two >= d, one row per token, rows rounded to a power of two."""
    block = next_pow2(hidden_size)
    return block, next_pow2(seq_len) * block


class _Builder:
    """Builds a transformer's ops into ``circuit``, recording which block (norms, attention, mlp, head) every node
    belongs to in ``circuit.meta["blocks"]`` (node name -> block: timings per block); with ``keep_cache`` each
    layer's keys/values are named ``k{i}``/``v{i}`` so they can be outputs (the KV-cache prefill)."""

    def __init__(self, spec: TransformerSpec, circuit: Circuit, keep_cache: bool = False):
        self.s, self.c = spec, circuit
        self.layer_idx, self.keep_cache = 0, keep_cache
        self.blocks = circuit.meta.setdefault("blocks", {})

    def tagged(self, block, fn, *args):
        n0 = len(self.c.nodes)
        out = fn(*args)
        for node in self.c.nodes[n0:]:
            self.blocks.setdefault(node.name, block)
        return out

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
        return self.tagged("norms", self._norm, x, norm, d)

    def _norm(self, x, norm, d):
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
        i = self.layer_idx
        self.layer_idx += 1
        return self.tagged("attention", self._attention, x, attn, mask, causal, i)

    def _attention(self, x, attn, mask, causal, i):
        c = self.c
        q = self.linear(x, attn["q"])
        if self.spread_attention():  # keys/values confined to group 0; the cache leaves replicated (decode reads it so)
            k, v = (self.linear(x, attn[n], confine=True) for n in "kv")
            if self.keep_cache:
                c.replicate(k, name=f"k{i}")
                c.replicate(v, name=f"v{i}")
        else:
            k = self.linear(x, attn["k"], name=f"k{i}" if self.keep_cache else None)
            v = self.linear(x, attn["v"], name=f"v{i}" if self.keep_cache else None)
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
        heads, _, scale = attention_dims(self.s.config)
        if attn.get("kind") == "power":
            scores = c.qk_scores(q, k, heads, scale=scale, causal=causal)
            powered = self.power(scores, int(attn["power"]))
            m = mask / np.maximum(mask.sum(-1), 1.0)[:, None]
            mean = c.attn_rowsum(powered, mask=m)
            inv = c.poly(c.add_plain(mean, float(attn["eps"])), attn["normalizer"])
            return self.linear(c.mul(c.attn_apply(powered, v, mask=m), inv), attn["o"])
        s_n = SCALINGS[attn["scaling"]](np.maximum(mask.sum(-1), 1.0))
        pre = attn.get("scaling_position", "post") == "pre"
        scores = c.qk_scores(q, k, heads, scale=scale, causal=causal, row_scale=1.0 / s_n if pre else None)
        weights = self.act(scores, attn["activation"])
        return self.linear(c.attn_apply(weights, v, mask=mask if pre else mask / s_n[:, None]), attn["o"])

    def mlp(self, x, mlp):
        return self.tagged("mlp", self._mlp, x, mlp)

    def _mlp(self, x, mlp):
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


def attention_dims(cfg: dict) -> tuple:
    """``(heads, head_dim, scale)`` of a spec's attention: ``head_dim`` as packed (a power of two; an export pads
    heads of another width with zero columns, see ``hf_polyhe.export``), ``scale`` the scores' factor
    ``1/sqrt(the model's head dim)``. q, k, v and the KV caches are ``heads * head_dim`` wide."""
    heads = int(cfg["num_heads"])
    real = cfg["hidden_size"] // heads
    return heads, int(cfg.get("head_dim", real)), float(cfg.get("attention_scale", real**-0.5))


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


def cache_names(spec: TransformerSpec) -> list:
    """``["k0", "v0", "k1", "v1", ...]``: the cache tensors of every layer, in circuit order."""
    return [f"{kv}{i}" for i in range(len(spec.config["layers"])) for kv in "kv"]


def check_causal_lm(spec: TransformerSpec):
    cfg = spec.config
    if not cfg.get("causal") or cfg["head"]["kind"] != "last_token":
        raise CircuitError(f"a KV cache needs a causal LM spec (family 'gpt'), this one is {cfg.get('family')!r}")


def new_circuit(spec: TransformerSpec, seq_len: int, name: str, groups: int = 1, slots: Optional[int] = None) -> Circuit:
    """An empty circuit in the export's packing (``block``, ``slots`` per group: :func:`default_packing`)."""
    cfg = spec.config
    block, default_slots = default_packing(cfg["max_length"], cfg["hidden_size"])
    return Circuit(block=block, slots=slots or default_slots, name=f"{cfg['family']}-{name}", groups=groups)


def head(b: _Builder, x, seq_len: int, all_rows: bool = False, attention_mask=None):
    """Final norm and output head; the output is named ``logits`` (every row's with ``all_rows``). ``mean_pool``:
    the mean of the rows ``attention_mask`` keeps (every row without one), a ``1 x d`` embedding."""
    cfg, c = b.s.config, b.c
    if cfg.get("final_norm"):
        x = b.norm(x, cfg["final_norm"], cfg["hidden_size"])
    n0 = len(c.nodes)
    spec_head = cfg["head"]
    if spec_head["kind"] == "last_token":
        out = b.linear(x if all_rows else c.select_rows(x, [seq_len - 1]), spec_head["lm_head"], name=OUTPUT)
    elif spec_head["kind"] == "pooler_cls":
        pooled = b.act(b.linear(c.select_rows(x, [0]), spec_head["pooler"]), spec_head["pooler_act"])
        out = b.linear(pooled, spec_head["classifier"], name=OUTPUT)
    elif spec_head["kind"] == "cls":
        out = b.linear(c.select_rows(x, [0]), spec_head["classifier"], name=OUTPUT)
    elif spec_head["kind"] == "mean_pool":
        keep = np.ones(seq_len) if attention_mask is None else np.asarray(attention_mask, dtype=np.float64).reshape(-1)
        out = c.pool_rows(x, keep / keep.sum(), name=OUTPUT)
    else:
        raise CircuitError(f"unknown head kind {spec_head['kind']!r}; accepted: last_token, pooler_cls, cls, mean_pool")
    for node in c.nodes[n0:]:
        b.blocks.setdefault(node.name, "head")
    return out


def build_circuit(spec: TransformerSpec, seq_len: int, attention_mask=None, kv_cache: bool = False,
                  all_logits: bool = False, groups: int = 1, slots: Optional[int] = None) -> Circuit:
    """The model's circuit for an input ``x`` of ``seq_len x d`` embeddings.

    Output ``logits``: the causal LM's last row (every row with ``all_logits``), the classifier's
    ``1 x num_labels``, or an encoder's ``1 x d`` mean-pooled embedding (head ``mean_pool``). ``attention_mask`` (``seq_len`` entries, 1 = token) masks keys. ``kv_cache`` (causal LMs:
    the prefill of a generation) also outputs every layer's keys/values ``k{i}`` / ``v{i}``. ``groups``: row
    groups per ciphertext (see :mod:`hf_polyhe.he.circuit.packing`) and ``slots`` per group (default: one row
    per token of ``max_length``, rounded to a power of two); the planner's choice."""
    cfg = spec.config
    d, max_len = cfg["hidden_size"], cfg["max_length"]
    if not 1 <= seq_len <= max_len:
        raise CircuitError(f"sequence length {seq_len} is outside the exported range 1..{max_len}")
    if kv_cache:
        check_causal_lm(spec)
        if attention_mask is not None and not np.all(np.asarray(attention_mask) == 1):
            raise CircuitError("a KV-cache prefill takes no padding mask (generation runs one unpadded sequence)")
    c = new_circuit(spec, seq_len, f"{'prefill' if kv_cache else 'full'}-L{seq_len}", groups=groups, slots=slots)
    b = _Builder(spec, c, keep_cache=kv_cache)
    x = c.input("x", seq_len, d)
    causal = bool(cfg["causal"])
    mask = attention_mask_matrix(seq_len, attention_mask, causal)
    if cfg.get("embedding_norm"):
        x = b.norm(x, cfg["embedding_norm"], d)
    for layer in cfg["layers"]:
        x = b.layer(x, layer, mask, causal, d)
    c.output(head(b, x, seq_len, all_rows=all_logits, attention_mask=attention_mask),
             *(cache_names(spec) if kv_cache else []))
    c.meta.update(family=cfg["family"], seq_len=seq_len, kind="prefill" if kv_cache else "full")
    return fold_plaintext_maps(c)
