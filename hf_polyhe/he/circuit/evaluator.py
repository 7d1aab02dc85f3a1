"""One interpreter for every backend: walks the circuit and runs each op's packed algorithm on the backend's
primitive operations (add, sub, mul, add_plain, mul_plain, mul_scalar, rotate, cheb, bootstrap).

Also :func:`run_reference`: the same circuit evaluated op by op with the numpy reference semantics on unpacked
tensors (no packing at all), the ground truth packed execution is compared against.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import CircuitError, LayoutError
from .ops import OPS
from .packing import norm_rot, same_packing


@dataclass
class Packed:
    """A tensor on a backend: its layout and one backend ciphertext (or slot vector) per packed block."""

    layout: object
    cts: list

    def __post_init__(self):
        if len(self.cts) != self.layout.num_cts:
            raise LayoutError(f"layout {self.layout.shape} needs {self.layout.num_cts} ciphertexts, got {len(self.cts)}")


class GroupTiling:
    """A backend seen through row groups: plaintext vectors of one group (``slots`` long) are tiled over the
    ``groups`` of a ciphertext (kept in a small LRU so the backend's own encoding cache still hits); full-length
    vectors pass as they are. Everything else goes straight to the backend."""

    def __init__(self, backend, slots: int, groups: int, keep: int = 256):
        self._be, self._slots, self._groups, self._keep = backend, int(slots), int(groups), keep
        self._tiled = OrderedDict()

    def __getattr__(self, name):
        return getattr(self._be, name)

    def _tile(self, v):
        if np.ndim(v) == 0 or np.size(v) != self._slots:
            return v
        hit = self._tiled.get(id(v))
        if hit is not None and hit[0] is v:
            self._tiled.move_to_end(id(v))
            return hit[1]
        t = np.tile(np.asarray(v, dtype=np.float64), self._groups)
        self._tiled[id(v)] = (v, t)
        while len(self._tiled) > self._keep:
            self._tiled.popitem(last=False)
        return t

    def add_plain(self, a, v):
        return self._be.add_plain(a, self._tile(v))

    def mul_plain(self, a, v):
        return self._be.mul_plain(a, self._tile(v))


class Evaluator:
    """Runs ``circuit`` on ``backend``. Rotations go through :meth:`rotate` (normalised index, 0 skipped).

    The evaluator keeps what it builds from the weights (linear schedules, masks: :meth:`cached`) for every later
    run; :meth:`on` runs the same circuit on another backend with them (the planner's trace of a server's
    evaluator, :func:`hf_polyhe.he.compile.plaintexts.compile_evaluator`)."""

    def __init__(self, circuit, backend):
        self.circuit = circuit.validate()
        self.layouts = circuit.layouts()
        self.producers = {n.name: n for n in circuit.nodes}
        self._cache = {}
        self._attach(backend)

    def _attach(self, backend):
        c = self.circuit
        self.backend = backend if c.groups == 1 or backend is None else GroupTiling(backend, c.slots, c.groups)
        self.last_babies = None  # (key, rotations): the last linear input's baby steps (ops.Linear.babies)
        self.last_rescaled = None  # (name, ct, rescaled ct): ops.Linear.rescaled
        if getattr(backend, "slots", c.ct_slots) < c.ct_slots:
            raise CircuitError(f"backend has {backend.slots} slots, the circuit needs {c.ct_slots}")

    def on(self, backend) -> "Evaluator":
        """This evaluator on ``backend``: another object sharing the circuit and everything cached from it."""
        ev = copy.copy(self)
        ev._attach(backend)
        return ev

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def rotate(self, ct, k):
        k = norm_rot(int(k), self.circuit.slots)
        return ct if k == 0 else self.backend.rotate(ct, k)

    def rotate_slots(self, ct, k):
        """A rotation over the whole ciphertext (normalised to ``groups * slots``): moves whole row groups."""
        k = norm_rot(int(k), self.circuit.ct_slots)
        return ct if k == 0 else self.backend.rotate(ct, k)

    def rotate_many(self, ct, ks, whole: bool = False):
        """``{k: rot(ct, k)}`` hoisted; ``whole``: indices normalised over the whole ciphertext (as
        :meth:`rotate_slots`), else over one row group (as :meth:`rotate`)."""
        norm = {k: norm_rot(int(k), self.circuit.ct_slots if whole else self.circuit.slots) for k in ks}
        need = sorted({v for v in norm.values() if v})
        res = self.backend.rotate_many(ct, need) if need else {}
        return {k: (ct if v == 0 else res[v]) for k, v in norm.items()}

    def rotate_sum(self, terms, whole: bool = False):
        """``sum rot(ct, k)`` over the ``(ct, k)`` of ``terms`` (an iterable, consumed lazily), None if empty: one
        backend ``rotate_sum``, which may share work between the rotations (OpenFHE: one ModDown for all)."""
        slots = self.circuit.ct_slots if whole else self.circuit.slots
        terms = ((ct, norm_rot(int(k), slots)) for ct, k in terms)
        if hasattr(self.backend, "rotate_sum"):
            return self.backend.rotate_sum(terms)
        acc = None
        for ct, k in terms:
            r = ct if k == 0 else self.backend.rotate(ct, k)
            acc = r if acc is None else self.backend.add(acc, r)
        return acc

    def check_inputs(self, inputs: dict) -> dict:
        missing = set(self.circuit.inputs) - set(inputs)
        extra = set(inputs) - set(self.circuit.inputs)
        if missing or extra:
            raise CircuitError(f"inputs: missing {sorted(missing)}, unexpected {sorted(extra)}; "
                               f"expected {sorted(self.circuit.inputs)}")
        out = {}
        for name, p in inputs.items():
            want = self.layouts[name]
            if not isinstance(p, Packed):
                raise LayoutError(f"input {name!r} must be a Packed tensor, got {type(p).__name__}")
            if not same_packing(p.layout, want):
                raise LayoutError(f"input {name!r} has layout {p.layout.to_dict()}, circuit expects {want.to_dict()}")
            out[name] = Packed(want, list(p.cts))
        return out

    def run(self, inputs: dict, observer=None) -> dict:
        """Evaluate on ``inputs`` (name -> :class:`Packed`); ``observer(node, seconds)`` is told after every node
        (the server's per-block timings and progress bar). A value is dropped after its last use (outputs are
        kept), so the ciphertexts alive at once are what :func:`peak_live_values` counts, not the whole circuit."""
        env = self.check_inputs(inputs)
        self.last_babies = None
        begin = getattr(self.backend, "begin_node", None)
        last = last_uses(self.circuit)
        try:
            for i, node in enumerate(self.circuit.nodes):
                xs = [env[n] for n in node.inputs]
                if begin is not None:
                    begin(node)
                t0 = time.perf_counter()
                cts = OPS[node.op].execute(self, node, xs)
                env[node.name] = Packed(self.layouts[node.name], cts)
                del xs
                for n in set(node.inputs):
                    if last.get(n) == i:
                        del env[n]
                if observer is not None:
                    observer(node, time.perf_counter() - t0)
        finally:
            self.last_babies = self.last_rescaled = None  # release the rotations
        return {o: env[o] for o in self.circuit.outputs}


def last_uses(circuit) -> dict:
    """``{value name: index of the last node reading it}`` for every value an evaluation may drop afterwards
    (circuit outputs are never dropped)."""
    last = {}
    for i, node in enumerate(circuit.nodes):
        for n in node.inputs:
            last[n] = i
    for o in circuit.outputs:
        last.pop(o, None)
    return last


def peak_live_values(circuit) -> tuple:
    """``(ciphertexts, at node)``: the most ciphertexts alive at once when :class:`Evaluator` runs ``circuit``
    (inputs, values not yet read for the last time, outputs; each value counts its layout's ciphertexts), and the
    node where that peak is reached. Rotations a linear makes on the way are not counted."""
    lay = circuit.layouts()
    last = last_uses(circuit)
    n_cts = lambda name: lay[name].num_cts  # noqa: E731
    live = sum(n_cts(n) for n in circuit.inputs)
    peak, at = live, None
    for i, node in enumerate(circuit.nodes):
        live += n_cts(node.name)
        if live > peak:
            peak, at = live, node.name
        live -= sum(n_cts(n) for n in set(node.inputs) if last.get(n) == i)
    return peak, at


def run_reference(circuit, inputs: dict, keep_all: bool = False) -> dict:
    """Numpy reference semantics of ``circuit`` on unpacked ``inputs`` (name -> rows x cols array)."""
    circuit.validate()
    lay = circuit.layouts()
    env = {}
    for name, (r, c) in circuit.inputs.items():
        if name not in inputs:
            raise CircuitError(f"missing input {name!r}")
        env[name] = lay[name].check(inputs[name])
    for node in circuit.nodes:
        env[node.name] = OPS[node.op].reference(circuit, node, [env[i] for i in node.inputs],
                                                [lay[i] for i in node.inputs])
    return env if keep_all else {o: env[o] for o in circuit.outputs}
