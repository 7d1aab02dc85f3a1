"""The ``plain`` backend: float64 numpy slot vectors with exactly the packing, rotations and polynomials of the
CKKS backend, so it reproduces the encrypted computation without noise. It checks every Chebyshev stage input
(valid slots only) against the stage's interval and every bootstrap input (all slots) against its bound, and
records violations in :attr:`PlainBackend.violations` (raises :class:`RangeViolation` when ``strict``)."""

from __future__ import annotations

import numpy as np

from ..errors import RangeViolation


class PlainBackend:
    name = "plain"

    def __init__(self, slots: int, strict: bool = False, tol: float = 1e-9):
        self.slots = int(slots)
        self.strict = strict
        self.tol = tol
        self.violations: list = []

    def _violate(self, msg: str, **info):
        self.violations.append(dict(message=msg, **info))
        if self.strict:
            raise RangeViolation(msg)

    # primitives -------------------------------------------------------------------------------------
    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def add_plain(self, a, v):
        return a + v

    def mul_plain(self, a, v):
        return a * v

    def mul_scalar(self, a, c):
        return a * c

    def rescale(self, a):
        return a

    def rotate(self, a, k):
        return np.roll(a, -k)

    def rotate_many(self, a, ks):
        return {k: np.roll(a, -k) for k in ks}

    def rotate_sum(self, terms):
        acc = None
        for a, k in terms:
            r = np.roll(a, -k)
            acc = r if acc is None else acc + r
        return acc

    def cheb(self, a, series, where="", valid=None):
        lo, hi = series.interval
        vals = a[valid] if valid is not None else a
        if vals.size:
            mn, mx = float(vals.min()), float(vals.max())
            span = self.tol * max(1.0, hi - lo)
            if mn < lo - span or mx > hi + span:
                self._violate(f"{where}: input range [{mn:.6g}, {mx:.6g}] leaves the approximation interval "
                              f"[{lo:.6g}, {hi:.6g}]", node=where, min=mn, max=mx, interval=(lo, hi))
        return series.evaluate(a)

    def bootstrap(self, a, bound, where=""):
        m = float(np.max(np.abs(a)))
        if m > bound:
            self._violate(f"{where}: bootstrap input max |x| = {m:.6g} exceeds bound {bound:.6g} (all slots count)",
                          node=where, max_abs=m, bound=bound)
        return a.copy()


def run_plain(circuit, inputs: dict, strict: bool = False, return_backend: bool = False):
    """Pack ``inputs`` (name -> array), run ``circuit`` on the plain backend, unpack the outputs."""
    from ..circuit.evaluator import Evaluator, Packed

    be = PlainBackend(circuit.ct_slots, strict=strict)
    ev = Evaluator(circuit, be)
    packed = {}
    for name in circuit.inputs:
        if name not in inputs:
            from ..errors import CircuitError

            raise CircuitError(f"missing input {name!r}; expected {sorted(circuit.inputs)}")
        L = ev.layouts[name]
        packed[name] = Packed(L, L.pack(inputs[name]))
    for name in inputs:
        if name not in circuit.inputs:
            from ..errors import CircuitError

            raise CircuitError(f"unexpected input {name!r}; expected {sorted(circuit.inputs)}")
    out = ev.run(packed)
    res = {k: v.layout.unpack(v.cts) for k, v in out.items()}
    return (res, be) if return_backend else res
