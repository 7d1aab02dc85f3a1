"""The circuit IR: a small, versioned graph of HE-level operations on packed tensors.

A :class:`Circuit` has named encrypted ``inputs`` (each a ``rows x cols`` matrix), a topologically ordered
list of :class:`Node` (``op``, ``name``, ``inputs``, JSON ``attrs``), named ``outputs`` and plaintext
``weights`` (numpy arrays referenced from attrs by name). All tensors of a circuit share one packing:
``block`` (D, features per ciphertext row), ``slots`` (slots per row group) and ``groups`` (row groups per
ciphertext; the CKKS batch size is ``groups * slots``); see :mod:`hf_polyhe.he.circuit.packing`.

Ops (semantics on unpacked tensors in :mod:`hf_polyhe.he.circuit.ops`, ``reference`` functions):

==============  ===========================================================================================
``linear``      ``X @ W + b`` with plaintext ``W`` (d_in x d_out), diagonal method with BSGS rotations; 1 level
                (``confine=True``: the output in row group 0 only, zeros elsewhere -- attention keys/values).
                On one-row vectors (decode steps): tiled -> column and column -> tiled, one plaintext product
                and ``log2`` rotations (see packing.TiledVector / ColumnVector)
``add``/``sub`` elementwise sum / difference of two encrypted tensors of the same shape; 0 levels
``mul``         elementwise ct x ct product (relinearised, rescaled); 1 level
``add_plain``   ``X + P`` with plaintext ``P`` (scalar, ``(cols,)``, ``(rows, 1)`` or ``(rows, cols)``); 0 levels
``mul_plain``   ``X * P`` (same broadcasting; masks, per-row constants, scalars); 1 level
``poly``        elementwise polynomial (an :class:`~hf_polyhe.approx.Approximation` dict); its depth
``rotate``      cyclic rotation of every ciphertext's slots by ``offset`` (a layout-level primitive); 0 levels
``row_sum``     ``scale * sum_j X[i, j]`` broadcast to every column of row ``i`` (LayerNorm mean/var); 1 level
``select_rows`` ``X[rows]`` (last token, CLS); 1 level
``pool_rows``   ``sum_i w_i X[i]`` as one row (mean-pooled sentence embedding); 2 levels, ``log2 rows`` rotations
``replicate``   a confined tensor (``linear(..., confine=True)``: row group 0 only) copied to every group; 0 levels
``slice_cols``  ``X[:, start:stop]``, block aligned (free); ``concat_cols``: ``hstack``, block aligned (free)
``qk_scores``   per head ``scale * r_i * Q_h K_h^T`` (heads x L x L, score layout, causal pairs only if causal;
                optional per-query-row factors ``r``: ``row_scale``); 2 levels
``attn_apply``  per head ``(A_h * mask) @ V_h`` concatenated over heads (A in score layout); 2 levels
``attn_rowsum`` per head ``sum_j (A_h * mask)[i, j]`` in the head's columns (power-softmax denominator); 2 levels
``bootstrap``   refresh levels: ``x / bound`` -> CKKS bootstrap -> ``* bound``; identity on values
``append_row``  ``vstack(cache, x)``: a 1-row ``x`` becomes row ``n`` of an ``n``-row KV cache (popcount(n) rotations); 0 levels
                (a tiled ``x``: a row mask, no rotation; 1 level)
``qk_decode``   scores of one query row against ``n`` cached keys, per head (column ``h*dh`` of an ``n x d``); 2 levels
``attn_decode`` ``sum_j w_j A[j, h] V[j, head h]`` for one query row (``1 x d`` in every row; tiled if asked); 2 levels
                (1 without the weights ``w``: then ``A`` must be zero off the score columns)
``decode_rowsum`` ``scale * sum_j w_j A[j, h]`` in head h's columns of one row (decode power-softmax denominator);
                2 levels (1 without ``w``)
==============  ===========================================================================================

On disk (:meth:`Circuit.save`): ``circuit.json`` (format name, ``version``, inputs, nodes, outputs, weight
names/shapes) and ``weights.safetensors``. A circuit of another ``version`` is refused with a clear error. Version 2
adds one-row vector layouts (``input_layouts``, tiled / column values) and the decode ops' options that go with
them (:meth:`Circuit.uses_version_2`); a circuit without them is written as version 1, so older runtimes keep
reading it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..files import load_arrays, read_json, save_arrays
from ..errors import CircuitError, LayoutError, SerializationError
from .packing import MatrixLayout, is_pow2, layout_from_dict

FORMAT = "hf_polyhe.circuit"
IR_VERSION = 2  # 2: inputs may carry a layout (one-row vectors); circuits without one are still written as 1
READABLE_VERSIONS = (1, 2)


@dataclass
class Node:
    op: str
    name: str
    inputs: list
    attrs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"op": self.op, "name": self.name, "inputs": list(self.inputs), "attrs": self.attrs}


def _decode_attrs(c, heads, key_weights, tiled) -> dict:
    attrs = {"heads": int(heads)}
    if key_weights is not None:
        attrs["weights"] = c.add_weight(key_weights)
    if tiled:
        attrs["tiled"] = True
    return attrs


class Circuit:
    """A graph of HE ops with a builder API: every builder method appends a node and returns its name."""

    def __init__(self, block: int, slots: int, name: str = "circuit", groups: int = 1):
        if not is_pow2(int(block)) or not is_pow2(int(slots)) or block > slots:
            raise CircuitError(f"block ({block}) and slots ({slots}) must be powers of two with block <= slots")
        if not is_pow2(int(groups)):
            raise CircuitError(f"groups must be a power of two, got {groups}")
        self.block, self.slots, self.name, self.groups = int(block), int(slots), name, int(groups)
        self.inputs: dict = {}  # name -> (rows, cols)
        self.input_layouts: dict = {}  # name -> layout, for inputs not in the matrix packing
        self.nodes: list = []
        self.outputs: list = []
        self.weights: dict = {}
        self.meta: dict = {}
        self._names: set = set()

    @property
    def ct_slots(self) -> int:
        """CKKS slots of a ciphertext (the batch size): ``groups * slots``."""
        return self.groups * self.slots

    # ----------------------------------------------------------------- building
    def _fresh(self, base: str) -> str:
        i = len(self.nodes)
        while f"{base}_{i}" in self._names:
            i += 1
        return f"{base}_{i}"

    def _name_ok(self, name: str) -> str:
        if not isinstance(name, str) or not name or name in self._names:
            raise CircuitError(f"value name {name!r} is empty or already used")
        self._names.add(name)
        return name

    def add_weight(self, value, name: Optional[str] = None) -> str:
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise CircuitError("weights must be finite")
        name = name or f"w{len(self.weights)}"
        if name in self.weights:
            raise CircuitError(f"weight name {name!r} already used")
        self.weights[name] = arr
        return name

    def input(self, name: str, rows: int, cols: int, layout=None) -> str:
        """An encrypted input; ``layout``: how the client packs it when not the circuit's matrix packing (a
        :class:`~hf_polyhe.he.circuit.packing.ColumnVector` for a decode step's token, or its dict)."""
        if layout is None:
            MatrixLayout(int(rows), int(cols), self.block, self.slots, groups=self.groups)  # validates
        else:
            layout = layout_from_dict(layout) if isinstance(layout, dict) else layout
            if layout.shape != (int(rows), int(cols)) or layout.ct_slots != self.ct_slots:
                raise CircuitError(f"input {name!r}: layout {layout.to_dict()} does not hold {rows} x {cols} in "
                                   f"{self.ct_slots} slots")
        self.inputs[self._name_ok(name)] = (int(rows), int(cols))
        if layout is not None:
            self.input_layouts[name] = layout
        return name

    def node(self, op: str, inputs, attrs=None, name: Optional[str] = None) -> str:
        from .ops import OPS

        if op not in OPS:
            raise CircuitError(f"unknown op {op!r}; accepted: {', '.join(sorted(OPS))}")
        for i in inputs:
            if i not in self._names:
                raise CircuitError(f"op {op!r}: unknown input value {i!r}")
        n = Node(op, self._name_ok(name or self._fresh(op)), list(inputs), dict(attrs or {}))
        self.nodes.append(n)
        try:
            self.layouts()  # shape-check eagerly so the builder fails at the bad op
        except Exception:
            self.nodes.pop()
            self._names.discard(n.name)
            raise
        return n.name

    def output(self, *names: str):
        for n in names:
            if n not in self._names:
                raise CircuitError(f"unknown output value {n!r}")
            self.outputs.append(n)
        return self

    def linear(self, x, weight, bias=None, name=None, confine: bool = False):
        attrs = {"weight": self.add_weight(weight)}
        if confine:
            attrs["confine"] = True
        if bias is not None:
            attrs["bias"] = self.add_weight(np.asarray(bias).reshape(-1))
        return self.node("linear", [x], attrs, name)

    def add(self, x, y, name=None):
        return self.node("add", [x, y], {}, name)

    def sub(self, x, y, name=None):
        return self.node("sub", [x, y], {}, name)

    def mul(self, x, y, name=None):
        return self.node("mul", [x, y], {}, name)

    def add_plain(self, x, value, name=None):
        if np.ndim(value) == 0:
            return self.node("add_plain", [x], {"scalar": float(value)}, name)
        return self.node("add_plain", [x], {"value": self.add_weight(value)}, name)

    def mul_plain(self, x, value, name=None):
        if np.ndim(value) == 0:
            return self.node("mul_plain", [x], {"scalar": float(value)}, name)
        return self.node("mul_plain", [x], {"value": self.add_weight(value)}, name)

    def poly(self, x, approximation, name=None):
        d = approximation if isinstance(approximation, dict) else approximation.to_dict()
        return self.node("poly", [x], {"approximation": d}, name)

    def rotate(self, x, offset: int, name=None):
        return self.node("rotate", [x], {"offset": int(offset)}, name)

    def row_sum(self, x, scale: float = 1.0, name=None):
        return self.node("row_sum", [x], {"scale": float(scale)}, name)

    def select_rows(self, x, rows, name=None):
        return self.node("select_rows", [x], {"rows": [int(r) for r in rows]}, name)

    def pool_rows(self, x, weights, name=None):
        """``sum_i weights[i] * X[i]`` as a ``1 x cols`` tensor (mean pooling: ``weights = mask / mask.sum()``)."""
        return self.node("pool_rows", [x], {"weights": self.add_weight(weights)}, name)

    def slice_cols(self, x, start: int, stop: int, name=None):
        return self.node("slice_cols", [x], {"start": int(start), "stop": int(stop)}, name)

    def concat_cols(self, xs, name=None):
        return self.node("concat_cols", list(xs), {}, name)

    def qk_scores(self, q, k, heads: int, scale: float = 1.0, causal: bool = False, row_scale=None, name=None):
        attrs = {"heads": int(heads), "scale": float(scale), "causal": bool(causal)}
        if row_scale is not None:
            attrs["row_scale"] = self.add_weight(np.asarray(row_scale, dtype=np.float64).reshape(-1))
        return self.node("qk_scores", [q, k], attrs, name)

    def attn_apply(self, scores, v, mask=None, scale: float = 1.0, name=None):
        attrs = {"scale": float(scale)}
        if mask is not None:
            attrs["mask"] = self.add_weight(mask)
        return self.node("attn_apply", [scores, v], attrs, name)

    def replicate(self, x, name=None):
        return self.node("replicate", [x], {}, name)

    def attn_rowsum(self, scores, mask=None, scale: float = 1.0, name=None):
        attrs = {"scale": float(scale)}
        if mask is not None:
            attrs["mask"] = self.add_weight(mask)
        return self.node("attn_rowsum", [scores], attrs, name)

    def decode_rowsum(self, weights, heads: int, key_weights=None, tiled: bool = False, scale: float = 1.0, name=None):
        attrs = _decode_attrs(self, heads, key_weights, tiled)
        if scale != 1.0:
            attrs["scale"] = float(scale)
        return self.node("decode_rowsum", [weights], attrs, name)

    def bootstrap(self, x, bound: float = 1.0, name=None):
        return self.node("bootstrap", [x], {"bound": float(bound)}, name)

    def append_row(self, cache, x, part: int = 0, name=None):
        return self.node("append_row", [cache, x], {"part": int(part)} if part else {}, name)

    def qk_decode(self, q, keys, heads: int, scale: float = 1.0, name=None):
        return self.node("qk_decode", [q, keys], {"heads": int(heads), "scale": float(scale)}, name)

    def attn_decode(self, weights, values, heads: int, key_weights=None, tiled: bool = False, name=None):
        """``key_weights`` None: all ones, one level less (the scores must then be zero off the heads' columns,
        see ops._decode_weights); ``tiled``: the output as a :class:`~hf_polyhe.he.circuit.packing.TiledVector`."""
        return self.node("attn_decode", [weights, values], _decode_attrs(self, heads, key_weights, tiled), name)

    # ----------------------------------------------------------------- analysis
    def layouts(self) -> dict:
        """Layout of every value (inputs and nodes), checking shapes and attributes."""
        from .ops import OPS

        lay = {n: self.input_layouts.get(n) or MatrixLayout(r, c, self.block, self.slots, groups=self.groups)
               for n, (r, c) in self.inputs.items()}
        for node in self.nodes:
            if node.op not in OPS:
                raise CircuitError(f"node {node.name!r}: unknown op {node.op!r}; accepted: {', '.join(sorted(OPS))}")
            for i in node.inputs:
                if i not in lay:
                    raise CircuitError(f"node {node.name!r}: input {i!r} is not defined before it")
            try:
                lay[node.name] = OPS[node.op].infer(self, node, [lay[i] for i in node.inputs])
            except (LayoutError, KeyError, TypeError) as e:
                raise CircuitError(f"node {node.name!r} ({node.op}): {e}") from e
        return lay

    def weight(self, name: str) -> np.ndarray:
        if name not in self.weights:
            raise CircuitError(f"missing weight {name!r}")
        return self.weights[name]

    def validate(self):
        self.layouts()
        if not self.outputs:
            raise CircuitError("circuit has no outputs")
        return self

    def uses_version_2(self) -> bool:
        """Does the circuit use what IR version 2 added: one-row vector layouts, ``append_row(part=)``,
        ``attn_decode`` / ``decode_rowsum`` without key weights, ``tiled`` or with a ``scale``?"""
        if any(getattr(v, "kind", "") in ("tiled", "column") for v in self.layouts().values()):
            return True
        for n in self.nodes:
            if n.op in ("attn_decode", "decode_rowsum") and ("weights" not in n.attrs or "tiled" in n.attrs
                                                             or "scale" in n.attrs):
                return True
            if n.op == "append_row" and "part" in n.attrs:
                return True
        return False

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "version": IR_VERSION if self.uses_version_2() else 1,  # a version-1 runtime reads what it can run
            "name": self.name,
            "block": self.block,
            "slots": self.slots,
            "groups": self.groups,
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "nodes": [n.to_dict() for n in self.nodes],
            "outputs": list(self.outputs),
            "weights": {k: list(v.shape) for k, v in self.weights.items()},
            "meta": self.meta,
        }
        if self.input_layouts:
            d["input_layouts"] = {k: v.to_dict() for k, v in self.input_layouts.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, weights: dict) -> "Circuit":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CircuitError(f"not a {FORMAT} document")
        if d.get("version") not in READABLE_VERSIONS:
            raise CircuitError(f"circuit IR version {d.get('version')!r} is not supported by this runtime (supports "
                               f"{', '.join(map(str, READABLE_VERSIONS))})")
        try:
            c = cls(d["block"], d["slots"], d.get("name", "circuit"), int(d.get("groups", 1)))
            c.meta = dict(d.get("meta", {}))
            for k, shape in d["weights"].items():
                if k not in weights:
                    raise CircuitError(f"weights file lacks {k!r}")
                w = np.asarray(weights[k], dtype=np.float64)
                if list(w.shape) != list(shape):
                    raise CircuitError(f"weight {k!r} has shape {w.shape}, circuit says {tuple(shape)}")
                c.weights[k] = w
            layouts = d.get("input_layouts", {})
            for k, (r, cc) in d["inputs"].items():
                c.input(k, r, cc, layouts.get(k))
            for nd in d["nodes"]:
                n = Node(nd["op"], c._name_ok(nd["name"]), list(nd["inputs"]), dict(nd.get("attrs", {})))
                c.nodes.append(n)
            c.layouts()
            c.output(*d["outputs"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CircuitError):
                raise
            raise CircuitError(f"malformed circuit document: {e!r}") from e
        return c

    def save(self, directory) -> str:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "circuit.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        save_arrays(directory, "weights", self.weights)
        return str(directory)

    @classmethod
    def load(cls, directory) -> "Circuit":
        try:
            d = read_json(os.path.join(directory, "circuit.json"))
            weights = load_arrays(directory, "weights")
        except (OSError, ValueError, SerializationError) as e:
            raise CircuitError(f"cannot read circuit from {directory!r}: {e}") from e
        return cls.from_dict(d, weights)

    def __repr__(self):
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return f"Circuit({self.name!r}, {len(self.inputs)} inputs, {len(self.nodes)} nodes, block={self.block}, slots={self.slots}{g})"
