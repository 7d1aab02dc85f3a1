"""The planner: from the circuit alone, levels per op, bootstrap placement, rotation keys, CKKS parameters, and
a cost report (counts, key sizes, predicted time from a measured per-op cost table).

Levels are counted the way OpenFHE spends them (FLEXIBLEAUTO): a fresh or bootstrapped ciphertext carries
``levels_after_bootstrap`` levels (leveled circuits: the whole depth); ``mul``/``mul_plain``/``linear``... consume
what :meth:`OpSpec.depth` says. Counts and levels come from running the real interpreter on a symbolic
:class:`TraceBackend`, so they match what the OpenFHE backend executes, op for op.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .. import params as P
from ..errors import PlanningError
from ..circuit.evaluator import Evaluator, Packed
from ..circuit.optimize import drop_dead
from ..circuit.ir import Circuit, Node
from ..circuit.ops import OPS
from ..circuit.rotations import ComposedRotations, RotationPaths

# Per-primitive cost model t(T) = (N / ref_ring_dim) * (a*T + b*T^2) seconds, T = RNS towers the ciphertext
# carries (ops get cheaper as levels are consumed). Defaults fitted to DESIGN.md section 5 (N=2^16, 2 threads);
# ``benchmarks/he_ops.py --write-costs`` measures this machine and writes ``cost_table.json``, which wins.
#
# Hoisted rotations (``rotate_many``: one EvalFastRotationPrecompute + k EvalFastRotation) cost
# ``rotate_precompute + k * rotate_fast``; a sum of k rotations of different ciphertexts (``rotate_sum``, the giant
# steps of a linear) ``k * (rotate_precompute + rotate_ext) + keyswitch_down``. A Chebyshev series of degree n costs what Paterson-Stockmeyer costs:
# ``cheb_mults(n)`` ct x ct multiplications at the input's level plus n scalar multiply-adds, where
# ``cheb_mults`` is measured per degree (table "cheb_mults": {degree: effective mults}) and interpolated in
# log2(degree) -- it grows like sqrt(2n) + log2(n), not like n.
COST_TABLE_PATH = os.path.join(os.path.dirname(__file__), "cost_table.json")
DEFAULT_COSTS = {
    "rotate": [4.7e-3, 7.7e-4],
    "rotate_precompute": [2.4e-3, 3.9e-4],
    "rotate_fast": [2.4e-3, 3.9e-4],
    # the two halves of a hoisted rotation: the key switch in the extended basis Q*P (EvalFastRotationExt) and its
    # ModDown (KeySwitchDown), which rotate_sum pays once for a sum of rotations (measured at N = 2^16, 3-21 towers)
    "rotate_ext": [1.7e-3, 0.0],
    "keyswitch_down": [3.0e-3, 0.0],
    "mul": [6.2e-3, 1.07e-3],
    "mul_plain": [2.0e-3, 0.0],  # on a rescaled ciphertext, with a plaintext encoded beforehand
    "rescale": [1.6e-3, 0.0],  # the pending rescale of a product's output, paid by its first plaintext product
    "add_plain": [1.5e-3, 0.0],
    "mul_scalar": [3.0e-4, 0.0],
    "add": [1.0e-4, 0.0],
    # MakeCKKSPackedPlaintext at a level (DESIGN section 5: 0.046 s at N = 2^16, 25 towers); paid once per plaintext
    # and level when the server compiles a circuit (compile/plaintexts.py), not per run
    "encode": [1.8e-3, 0.0],
    # effective ct x ct multiplications per Chebyshev degree (DESIGN section 5: degree 15 ~ 11 mults, 59 ~ 27)
    "cheb_mults": {"7": 6.9, "15": 11.2, "31": 16.5, "59": 27.4},
    # key switching (rotations, relinearisation) with ``num_large_digits`` HYBRID digits, relative to OpenFHE's
    # default 3 (which the primitives above were measured with): {digits: {"rotate": x, "mul": y}}; more digits
    # mean a smaller auxiliary modulus P (more levels on a ring) and a slower key switch. Measured with
    # benchmarks/he_ops.py --digits-cost
    "keyswitch_digits": {"3": {"rotate": 1.0, "mul": 1.0}},
    "bootstrap": [18.0, 0.0],  # seconds at ``bootstrap_ring_dim`` (scaled linearly in N), constant in depth
    "bootstrap_ring_dim": 65536,
    "ref_ring_dim": 65536,
}


def ps_shape(degree: int) -> float:
    """Paterson-Stockmeyer's non-scalar multiplication count grows like sqrt(2n) + log2(n)."""
    n = max(int(degree), 1)
    return math.sqrt(2 * n) + math.log2(n) if n > 1 else 1.0


def cheb_mults(degree: int, table: dict) -> float:
    """Effective ct x ct multiplications of a degree-``degree`` Chebyshev series: the measured table,
    interpolated linearly in log2(degree); outside the measured range scaled by :func:`ps_shape`."""
    pts = sorted((int(k), float(v)) for k, v in table.items())
    if not pts:
        return ps_shape(degree)
    n = max(int(degree), 1)
    if n <= pts[0][0]:
        return pts[0][1] * ps_shape(n) / ps_shape(pts[0][0])
    if n >= pts[-1][0]:
        return pts[-1][1] * ps_shape(n) / ps_shape(pts[-1][0])
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if d0 <= n <= d1:
            w = (math.log2(n) - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
            return r0 + w * (r1 - r0)
    return ps_shape(n)  # unreachable


KEYSWITCH_KINDS = ("rotate", "rotate_precompute", "rotate_fast", "rotate_ext", "keyswitch_down")


def digits_factor(costs: dict, digits: int, kind: str = "rotate") -> float:
    """Key-switching cost with ``digits`` HYBRID digits relative to 3 (cost table ``keyswitch_digits``, ``kind``
    "rotate" or "mul"): the measured value, else linear in the digits between the nearest measured (above them, the
    last two's slope; below them, the smallest one's value)."""
    table = {int(k): float(v[kind]) for k, v in costs.get("keyswitch_digits", {}).items() if kind in v}
    table.setdefault(3, 1.0)
    d = int(digits)
    if d in table:
        return table[d]
    pts = sorted(table)
    if len(pts) == 1 or d < pts[0]:  # fewer digits than measured (shallow leveled sets): no claim, the nearest
        return table[pts[0]]
    lo = max([k for k in pts if k < d], default=pts[0])
    hi = min([k for k in pts if k > d], default=pts[-1])
    if lo == hi:  # beyond the measured ones: the slope of the last two
        lo, hi = (pts[-2], pts[-1]) if d > pts[-1] else (pts[0], pts[1])
    return max(table[lo] + (table[hi] - table[lo]) * (d - lo) / (hi - lo), 0.1)


def load_cost_table(path: str = COST_TABLE_PATH) -> dict:
    """The measured cost table (``cost_table.json``) over :data:`DEFAULT_COSTS`; a missing file gives the
    defaults, an unreadable one a :class:`PlanningError`."""
    costs = copy.deepcopy(DEFAULT_COSTS)
    if os.path.exists(path):
        try:
            with open(path) as f:
                costs.update(json.load(f))
        except (OSError, ValueError) as e:
            raise PlanningError(f"cannot read the cost table {path}: {e}") from e
    costs.pop("cheb_per_degree", None)  # old linear-in-degree model
    return costs


class TraceCt:
    """A traced ciphertext: levels consumed, and whether a rescale is pending (a product's output, which
    OpenFHE's FLEXIBLEAUTO rescales inside the next multiplication -- in every one that reads it). OpenFHE's
    ``GetLevel()`` (towers dropped) is ``start level + dropped``."""

    __slots__ = ("level", "pending")

    def __init__(self, level: int, pending: bool = False):
        self.level, self.pending = level, pending

    @property
    def dropped(self) -> int:
        """Towers dropped so far (the pending rescale not yet done)."""
        return self.level - int(self.pending)


def plaintext_bytes(ring_dim: int, towers: int) -> int:
    """Memory of one encoded CKKS plaintext: ``towers`` RNS limbs of ``ring_dim`` 64-bit words."""
    return int(ring_dim) * int(towers) * 8


class TraceBackend:
    """Symbolic backend: a ciphertext is its level (levels consumed since fresh/bootstrap). Counts every
    primitive, records rotation indices and the levels each op reaches, and sums predicted time."""

    name = "trace"

    def __init__(self, slots, total_depth, start_level, levels_after_bootstrap, ring_dim, costs, on_plaintext=None):
        self.slots = slots
        # every distinct plaintext (content, OpenFHE level) the circuit multiplies or adds: key -> [level, towers,
        # uses]; ``on_plaintext(vector, level)`` is told of each when first met (compile_evaluator encodes it)
        self.plaintexts = {}
        self.on_plaintext = on_plaintext
        self.total_depth, self.start_level, self.lb = total_depth, start_level, levels_after_bootstrap
        self.N, self.costs = ring_dim, costs
        self.counts = {k: 0 for k in ("rotate", "mul", "mul_plain", "add_plain", "mul_scalar", "add", "cheb",
                                      "bootstrap", "rescale")}
        self.rotation_keys = set()
        self.rotation_uses = {}  # rotation index -> rotations by it
        self.time = 0.0
        self.time_by_op = {}
        self.node = None
        self.max_level = 0
        self.node_levels = {}
        self.bootstrap_s = None  # seconds of one bootstrap (trace(): from the nearest measured configuration)
        self.ks_factor = {}  # key switching against 3 digits (trace(): from the parameters' digits)

    def begin_node(self, node):
        self.node = node

    def towers(self, level):
        return max(self.total_depth - (self.start_level + level) + 1, 1)

    def unit(self, kind, level):
        """Predicted seconds of one ``kind`` primitive on a ciphertext at ``level``."""
        return self.unit_towers(kind, self.towers(level))

    def unit_towers(self, kind, T):
        """Predicted seconds of one ``kind`` primitive on ``T`` RNS towers."""
        a, b = self.costs.get(kind, DEFAULT_COSTS[kind])
        t = (self.N / self.costs["ref_ring_dim"]) * (a * T + b * T * T)
        if kind == "mul":  # its relinearisation
            return t * self.ks_factor.get("mul", 1.0)
        if kind in KEYSWITCH_KINDS:
            return t * self.ks_factor.get("rotate", 1.0)
        return t

    def plaintext_summary(self) -> dict:
        """Distinct plaintexts (content and level) the traced run met: count, uses, encoded bytes and predicted
        seconds to encode them all once (the server's compile step)."""
        pts = list(self.plaintexts.values())
        return {"count": len(pts), "uses": sum(p[2] for p in pts),
                "bytes": sum(plaintext_bytes(self.N, p[1]) for p in pts),
                "seconds": sum(self.unit_towers("encode", p[1]) for p in pts)}

    def _charge(self, t):
        self.time += t
        if self.node is not None:
            self.time_by_op[self.node.op] = self.time_by_op.get(self.node.op, 0.0) + t

    def _cost(self, kind, level, mult=1.0):
        self._charge(self.unit(kind, level) * mult)

    def _out(self, level, pending=True):
        self.max_level = max(self.max_level, level)
        if self.node is not None:
            self.node_levels[self.node.name] = max(self.node_levels.get(self.node.name, 0), level)
        return TraceCt(level, pending)

    def _plaintext(self, a, v):
        """Record plaintext ``v`` met by ciphertext ``a``: the OpenFHE backend encodes it at ``a``'s OpenFHE level."""
        from ..backends.openfhe import vector_digest

        level = self.start_level + a.dropped
        key = (vector_digest(v), level)
        hit = self.plaintexts.get(key)
        if hit is None:
            self.plaintexts[key] = [level, self.total_depth + 1 - level, 1]
            if self.on_plaintext is not None:
                self.on_plaintext(v, level)
        else:
            hit[2] += 1

    def add(self, a, b):
        # OpenFHE brings both to the more reduced one's towers; on equal towers a pending rescale stays pending
        self.counts["add"] += 1
        self._cost("add", max(a.level, b.level))
        if a.dropped != b.dropped:
            w = a if a.dropped > b.dropped else b
            return self._out(w.level, w.pending)
        return self._out(max(a.level, b.level), a.pending or b.pending)

    sub = add

    def mul(self, a, b):
        self.counts["mul"] += 1
        self._cost("mul", max(a.level, b.level))
        return self._out(max(a.level, b.level) + 1)

    def add_plain(self, a, v):
        from ..backends.openfhe import TINY

        self.counts["add_plain"] += 1
        self._cost("add_plain", a.level)
        if np.ndim(v) and np.any(np.abs(np.asarray(v, dtype=np.float64)) > TINY):  # ~0 is not encoded (see OpenFHEBackend)
            self._plaintext(a, v)
        return self._out(a.level, a.pending)

    def mul_plain(self, a, v):
        self.counts["mul_plain"] += 1
        self._plaintext(a, v)
        self._cost("mul_plain", a.level)
        if a.pending:
            self._cost("rescale", a.level)
        return self._out(a.level + 1)

    def mul_scalar(self, a, c):
        self.counts["mul_scalar"] += 1
        self._cost("mul_scalar", a.level)
        return self._out(a.level + 1)

    def rescale(self, a):
        if not a.pending:
            return a
        self.counts["rescale"] += 1
        self._cost("rescale", a.level)
        return self._out(a.level, False)

    def _key(self, k):
        self.counts["rotate"] += 1
        self.rotation_keys.add(int(k))
        self.rotation_uses[int(k)] = self.rotation_uses.get(int(k), 0) + 1

    def rotate(self, a, k):
        self._key(k)
        self._cost("rotate", a.level)
        return self._out(a.level, a.pending)

    def rotate_many(self, a, ks):
        # mirrors OpenFHEBackend.rotate_many: one rotation is a plain EvalRotate, more are hoisted
        if len(ks) == 1:
            return {ks[0]: self.rotate(a, ks[0])}
        self._cost("rotate_precompute", a.level)
        out = {}
        for k in ks:
            self._key(k)
            self._cost("rotate_fast", a.level)
            out[k] = self._out(a.level, a.pending)
        return out

    def rotate_sum(self, terms):
        # mirrors OpenFHEBackend.rotate_sum: each rotation's key switch in the extended basis (precompute +
        # EvalFastRotationExt), summed there, one KeySwitchDown; terms at another level than the first: plain
        acc = state = last = None
        ext = []
        for a, k in terms:
            if k == 0 or (state is not None and (a.dropped, a.pending) != state):
                r = a if k == 0 else self.rotate(a, k)
                acc = r if acc is None else self.add(acc, r)
                continue
            state = (a.dropped, a.pending)
            self._key(k)
            if a is not last:  # consecutive terms of one ciphertext share its precomputation
                self._cost("rotate_precompute", a.level)
                last = a
            self._cost("rotate_ext", a.level)
            if ext:
                self._cost("add", a.level)
            ext.append(a)
        if ext:
            self._cost("keyswitch_down", ext[0].level)
            r = self._out(ext[0].level, ext[0].pending)
            acc = r if acc is None else self.add(acc, r)
        return acc

    def cheb_seconds(self, degree, level):
        """Predicted seconds of a degree-``degree`` Chebyshev series on a ciphertext at ``level``."""
        if degree <= 0:
            return self.unit("mul_scalar", level) + self.unit("add", level)
        return (cheb_mults(degree, self.costs.get("cheb_mults", DEFAULT_COSTS["cheb_mults"])) * self.unit("mul", level)
                + degree * (self.unit("mul_scalar", level) + self.unit("add", level)))

    def cheb(self, a, series, where="", valid=None):
        self.counts["cheb"] += 1
        self._charge(self.cheb_seconds(series.degree, a.level))
        return self._out(a.level + series.depth)

    def bootstrap(self, a, bound, where=""):
        self.counts["bootstrap"] += 1
        scaled = bound != 1.0
        if a.level + int(scaled) > self.lb:
            raise PlanningError(f"{where}: bootstrap input at level {a.level} has no level left for scaling by 1/bound")
        if scaled:
            self.mul_scalar(a, 1.0)
        t = self.bootstrap_s
        if t is None:
            t = self.costs["bootstrap"][0] * self.N / self.costs.get("bootstrap_ring_dim", self.costs["ref_ring_dim"])
        self.time += t
        self.time_by_op["bootstrap"] = self.time_by_op.get("bootstrap", 0.0) + t
        out = TraceCt(0)
        if scaled:
            out = self.mul_scalar(out, 1.0)
        return out


@dataclass
class Plan:
    """What the planner decided and predicts. ``circuit`` is the circuit to run (bootstraps inserted)."""

    circuit: Circuit
    params: P.CKKSParams
    levels: dict  # value name -> levels consumed since fresh/bootstrap
    depth: int  # levels needed by the longest leveled segment
    rotation_keys: list
    counts: dict
    inserted_bootstraps: list
    start_level: int  # OpenFHE level fresh ciphertexts are encrypted at
    key_bytes: dict
    predicted_seconds: float
    time_by_op: dict = field(default_factory=dict)
    bootstrap_memory_gib: float = 0.0  # estimated peak memory of bootstrapping (0: leveled)
    notes: list = field(default_factory=list)
    # distinct plaintexts (vector, level) of one run: count, uses, bytes once encoded, predicted encoding seconds
    # (paid once, when the server compiles the circuit: compile/plaintexts.py; not in predicted_seconds)
    plaintexts: dict = field(default_factory=dict)
    rotation_uses: dict = field(default_factory=dict)  # rotation index -> rotations by it in one run

    def report(self) -> str:
        p = self.params
        lines = [
            f"circuit {self.circuit.name!r}: {len(self.circuit.nodes)} ops, slots {self.circuit.ct_slots} ({self.circuit.groups} row groups), block {self.circuit.block}",
            f"params: {p.name} ({p.security}), ring dim {p.ring_dim or 'auto'}, scale {p.scale_bits} bits, "
            f"total depth {p.depth}, bootstrap={p.bootstrap}"
            + (f" (levels after bootstrap {p.levels_after_bootstrap}, level budget {list(p.level_budget)})" if p.bootstrap else ""),
            f"multiplicative depth of the longest segment: {self.depth}",
            f"#rotations {self.counts['rotate']} ({len(self.rotation_keys)} keys), #ct x ct mults {self.counts['mul']}, "
            f"#pt x ct mults {self.counts['mul_plain']}, #Chebyshev series {self.counts['cheb']}, "
            f"#bootstraps {self.counts['bootstrap']} ({len(self.inserted_bootstraps)} inserted by the planner)",
            f"keys (estimate): relin {self.key_bytes['relin'] / 2**20:.1f} MiB, rotations "
            f"{self.key_bytes['rotation'] / 2**20:.1f} MiB" + (
                f", bootstrapping ~{self.key_bytes['bootstrap'] / 2**20:.0f} MiB" if p.bootstrap else ""),
            *self.notes,
            *([f"plaintexts: {self.plaintexts['count']} distinct (vector, level) for {self.plaintexts['uses']} uses, "
               f"encoded once when compiled: {self.plaintexts['bytes'] / 2**20:.1f} MiB, "
               f"~{self.plaintexts['seconds']:.2f} s"] if self.plaintexts else []),
            *([f"bootstrapping memory (estimate): ~{self.bootstrap_memory_gib:.1f} GiB peak"] if p.bootstrap else []),
            f"predicted time: {self.predicted_seconds:.2f} s ("
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.time_by_op.items(), key=lambda kv: -kv[1])) + ")",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "depth": self.depth, "rotation_keys": self.rotation_keys,
                "counts": self.counts, "start_level": self.start_level, "key_bytes": self.key_bytes,
                "predicted_seconds": self.predicted_seconds, "inserted_bootstraps": self.inserted_bootstraps,
                "bootstrap_memory_gib": self.bootstrap_memory_gib, "notes": list(self.notes),
                "plaintexts": dict(self.plaintexts)}


def static_levels(circuit: Circuit) -> dict:
    """Levels per value with every bootstrap resetting to 0 (+1 when it rescales by its bound)."""
    lay = circuit.layouts()
    lev = {n: 0 for n in circuit.inputs}
    for node in circuit.nodes:
        if node.op == "bootstrap":
            lev[node.name] = int(float(node.attrs.get("bound", 1.0)) != 1.0)
            continue
        base = max(lev[i] for i in node.inputs)
        lev[node.name] = base + OPS[node.op].depth(circuit, node, [lay[i] for i in node.inputs])
    return lev


def insert_bootstraps(circuit: Circuit, levels_after_bootstrap: int, bounds: dict | None = None):
    """Copy of ``circuit`` with bootstraps before every op that would leave fewer than one level (kept for the
    bootstrap's 1/bound scaling) in its segment. ``bounds``: value name -> max |x| over all slots (from
    :func:`calibrate_bounds`); the bootstrap bound is the next power of two above it (1.0 if unknown).

    A value is bootstrapped once however many inputs of an op read it (``mul(x, x)``). When the value to refresh
    spans more ciphertexts than the input of the single-input op that made it (a linear widening 64 features to
    256: 4 ciphertexts from 1) and that op fits in the fresh segment too, the narrower input is bootstrapped and the
    op recomputed from it: one bootstrap instead of one per ciphertext."""
    lb = int(levels_after_bootstrap)
    budget = lb - 1
    bounds = bounds or {}
    out = Circuit(circuit.block, circuit.slots, circuit.name, circuit.groups)
    out.meta = dict(circuit.meta)
    out.weights = dict(circuit.weights)
    for n, (r, c) in circuit.inputs.items():
        out.input(n, r, c, layout=circuit.input_layouts.get(n))
    lay = circuit.layouts()
    producer = {n.name: n for n in circuit.nodes}
    fanout = {}
    for n in circuit.nodes:
        for i in set(n.inputs):
            fanout[i] = fanout.get(i, 0) + 1
    lev = {n: 0 for n in circuit.inputs}
    alias = {}
    inserted = []
    recomputed = []

    def bound_for(v):
        m = bounds.get(v)
        return 1.0 if not m or m <= 1.0 else float(2.0 ** math.ceil(math.log2(m * 1.05)))

    def cts(v):
        return int(getattr(lay[v], "num_cts", 1))

    def depth_of(node):
        return OPS[node.op].depth(circuit, node, [lay[i] for i in node.inputs])

    def bootstrap(src):
        """Emit a bootstrap of value ``src`` (an original name; its current version ``alias[src]``)."""
        bname = out._fresh(f"bootstrap_{src}")
        b = bound_for(src)
        out.nodes.append(Node("bootstrap", out._name_ok(bname), [alias.get(src, src)], {"bound": b}))
        lev[bname] = int(b != 1.0)
        alias[src] = bname
        inserted.append(bname)
        return bname

    def refresh(src, d):
        """A fresh version of ``src`` for a consumer of depth ``d``: the op that made it again, from its input
        refreshed already (for a sibling: q, k and v of one normalised input) or bootstrapped now when that input
        is narrower or feeds several ops; else a bootstrap of ``src``."""
        p = producer.get(src)
        if p is not None and p.op != "bootstrap" and len(p.inputs) == 1:
            j = p.inputs[0]
            dp = depth_of(p)
            fresh_j = int(bound_for(j) != 1.0)
            if lev[alias.get(j, j)] + dp + d > budget:
                if not ((cts(j) < cts(src) or (cts(j) == cts(src) and fanout[j] > 1)) and fresh_j + dp + d <= budget):
                    return bootstrap(src)
                bootstrap(j)
            name = out._name_ok(out._fresh(f"{p.name}_again"))
            out.nodes.append(Node(p.op, name, [alias.get(j, j)], dict(p.attrs)))
            lev[name] = lev[alias.get(j, j)] + dp
            alias[src] = name
            recomputed.append(name)
            return name
        return bootstrap(src)

    for node in circuit.nodes:
        ins = [alias.get(i, i) for i in node.inputs]
        if node.op == "bootstrap":
            d_after = int(float(node.attrs.get("bound", 1.0)) != 1.0)
            out.nodes.append(Node(node.op, out._name_ok(node.name), ins, dict(node.attrs)))
            lev[node.name] = d_after
            continue
        d = depth_of(node)
        if d > budget - 1:
            raise PlanningError(
                f"op {node.name!r} ({node.op}) needs {d} levels but a bootstrap segment offers {budget - 1} "
                f"(levels_after_bootstrap={lb}); split the polynomial into stages or raise levels_after_bootstrap"
            )
        for k, src in enumerate(node.inputs):
            i = alias.get(src, src)  # refreshed already for an earlier input of this op (mul(x, x))
            if lev[i] + d > budget:
                i = refresh(src, d)
            ins[k] = i
        out.nodes.append(Node(node.op, out._name_ok(node.name), ins, dict(node.attrs)))
        lev[node.name] = max(lev[i] for i in ins) + d
    out.outputs = list(circuit.outputs)
    if recomputed:  # the ops recomputed after a bootstrap may leave their first versions unread
        drop_dead(out)
        kept = {n.name for n in out.nodes}
        inserted = [b for b in inserted if b in kept]
    out.layouts()
    return out, inserted


def calibrate_bounds(circuit: Circuit, sample_inputs: dict) -> dict:
    """Max |x| over all slots of every value when the plain backend runs ``sample_inputs``."""
    from ..backends.plain import PlainBackend

    be = PlainBackend(circuit.ct_slots)
    ev = Evaluator(circuit, be)
    env = {n: Packed(ev.layouts[n], ev.layouts[n].pack(x)) for n, x in sample_inputs.items()}
    env = ev.check_inputs(env)
    res = {}
    for node in circuit.nodes:
        cts = OPS[node.op].execute(ev, node, [env[i] for i in node.inputs])
        env[node.name] = Packed(ev.layouts[node.name], cts)
        res[node.name] = float(max(np.max(np.abs(c)) for c in cts))
    for n in circuit.inputs:
        res[n] = float(max(np.max(np.abs(c)) for c in env[n].cts))
    return res


def bootstrap_seconds(costs: dict, p: P.CKKSParams) -> float:
    """Predicted seconds of one bootstrap for the planned set ``p``: the nearest configuration measured by
    ``benchmarks/he_ops.py --bootstrap-sweep`` (cost table ``bootstrap_measured``, see
    :func:`params.nearest_bootstrap_measurement`), its median scaled by ring dimension and towers (CoeffsToSlots
    runs on the full modulus); without one, the table's ``bootstrap`` entry scaled by ring dimension."""
    N = p.ring_dim or costs.get("bootstrap_ring_dim", 2**16)
    row = P.nearest_bootstrap_measurement(costs.get("bootstrap_measured"), p, finished=True)
    if row is None:
        return costs["bootstrap"][0] * N / costs.get("bootstrap_ring_dim", costs["ref_ring_dim"])
    return float(row["bootstrap_median_s"]) * (N / row["ring_dim"]) * (p.depth + 1) / (row["depth"] + 1)


def bootstrap_source_note(rows, p: P.CKKSParams) -> str:
    """What a bootstrapped plan's bootstrap seconds and memory are predicted from (``rows``:
    :func:`bootstrap_memory_source`), in words."""
    def name(r):
        return (f"N=2^{int(r['ring_dim']).bit_length() - 1}, {r['slots']} slots, level budget "
                f"{list(r.get('level_budget', [2, 2]))}, {r.get('digits') or 3} digits, depth {r['depth']}")

    if not isinstance(rows, list):
        return "bootstrap memory scaled from one measured anchor (run benchmarks/he_ops.py --bootstrap-sweep)"
    mem = P.nearest_bootstrap_measurement(rows, p)
    done = P.nearest_bootstrap_measurement(rows, p, finished=True)
    if mem is None:
        return "bootstrap memory scaled from one measured anchor (no usable measured configuration)"
    return ("bootstrap estimates from measured configurations (benchmarks/he_ops.py --bootstrap-sweep): memory near "
            + name(mem) + (" (a lower bound: stopped over its memory cap)" if mem.get("over_cap") else "")
            + ("; time near " + name(done) if done is not None else "; time from the cost table's single entry"))


def bootstrap_memory_source(costs: dict):
    """What bootstrapping memory is predicted from: the measured configurations (``bootstrap_measured``) if the cost
    table has any, with the single anchor (``bootstrap_memory``, else :data:`params.BOOTSTRAP_MEMORY_ANCHOR`: a lower
    bound, so counted as stopped over a cap) among them; else that anchor alone."""
    rows = costs.get("bootstrap_measured")
    if not rows:
        return costs.get("bootstrap_memory")
    anchor = dict(costs.get("bootstrap_memory") or P.BOOTSTRAP_MEMORY_ANCHOR)
    if any(all(r.get(k) == anchor.get(k) for k in ("ring_dim", "depth", "slots")) for r in rows):
        return list(rows)
    return list(rows) + [{**anchor, "over_cap": True}]


# Resident memory of a process before any key or ciphertext (Python, numpy, the OpenFHE library): measured 0.82 GiB
# (`import hf_polyhe.he, openfhe`, ru_maxrss, this machine), for a server (export_plan.server_memory) and for a
# bootstrap_sweep child alike; taken off a measured bootstrapping peak to leave what bootstrapping adds
PROCESS_BASE_GIB = 0.82


def key_bytes(p: P.CKKSParams, n_rot: int, costs: dict | None = None) -> dict:
    """Estimated bytes of the evaluation keys for ``p`` with ``n_rot`` rotation keys: ``relin``, ``rotation`` (all
    of them), ``per_key`` (one rotation key) and ``bootstrap`` (CoeffsToSlots / SlotsToCoeffs keys; 0 leveled).
    One key switching key holds ``digits`` pairs of polynomials over Q*P: ``digits * 2 * N * towers(Q*P) * 8``.
    With measured bootstrapping configurations in ``costs`` (``bootstrap_measured``), ``bootstrap`` is their
    estimated peak (:meth:`~hf_polyhe.he.params.CKKSParams.estimate_bootstrap_memory_gib`: keys, the context's
    precomputed transforms, one bootstrap's scratch) less the relinearisation key, not the key count: measured
    at N = 2^16, 4096 slots, [2, 2], 6 digits, 19.2 GiB in all where the count gives ~47 GiB of keys."""
    N = p.ring_dim or 2**16
    towers_q = p.depth + 1
    dnum = P.key_switch_digits(p.num_large_digits, p.depth)
    towers_p = int(math.ceil(towers_q / dnum))
    one = dnum * 2 * N * (towers_q + towers_p) * 8
    boot = 0
    if p.bootstrap and (costs or {}).get("bootstrap_measured"):
        peak = p.estimate_bootstrap_memory_gib(bootstrap_memory_source(costs)) - PROCESS_BASE_GIB
        boot = max(peak * 2**30 - one, 0.0)
    elif p.bootstrap:
        # CoeffsToSlots/SlotsToCoeffs rotations: about 2 * budget * (radix + giant) keys
        per = int(math.ceil(math.log2(max(p.slots, 1)) / max(p.level_budget[0], 1)))
        boot = one * (2 * sum(p.level_budget) * (2 ** per // 2 + 2) + 1)
    return {"relin": one, "rotation": one * n_rot, "per_key": one, "bootstrap": boot}


def op_depths(circuit: Circuit) -> list:
    """``[(node name, op, levels)]`` for every op of ``circuit``, in order."""
    lay = circuit.layouts()
    return [(n.name, n.op, OPS[n.op].depth(circuit, n, [lay[i] for i in n.inputs])) for n in circuit.nodes
            if n.op != "bootstrap"]


def choose_levels_after_bootstrap(circuit: Circuit, params: P.CKKSParams, requested: int | None = None,
                                  max_memory_gib: float | None = None, memory_anchor: dict | None = None):
    """Levels a bootstrapped ciphertext must carry for ``circuit``: every op must fit in one segment after a
    bootstrap that rescales by its bound (``levels >= op depth + 2``).

    ``requested`` (explicit): used as is, PlanningError naming the op if too small. ``None``: the larger of
    ``params.levels_after_bootstrap`` and what the deepest op needs, bounded by what a 128-bit secure ring allows
    (:meth:`CKKSParams.max_levels_after_bootstrap`) and by the estimated bootstrapping memory
    (``max_memory_gib``, default :func:`params.default_max_memory_gib`). Returns ``(levels, note)``."""
    depths = op_depths(circuit)
    name, op, d = max(depths, key=lambda t: t[2]) if depths else ("-", "-", 0)
    need = d + 2
    if requested is not None:
        lb = int(requested)
        if lb < need:
            raise PlanningError(
                f"op {name!r} ({op}) needs {d} levels but a bootstrap segment offers {lb - 2} "
                f"(levels_after_bootstrap={lb}); pass levels_after_bootstrap >= {need}, leave it unset to choose it "
                f"automatically, or split the polynomial into stages")
        return lb, f"levels after bootstrap {lb} (requested)"
    lb = max(int(params.levels_after_bootstrap), need)
    if lb == need and need > int(params.levels_after_bootstrap):
        note = f"levels after bootstrap {lb} (chosen: op {name!r} ({op}) needs {d} levels, +2 for the bootstrap)"
    else:
        note = f"levels after bootstrap {lb} (default)"
    scaled = params.with_(scale_bits=max(params.scale_bits, 59))  # bootstrapping needs a 59-bit scale
    cap = scaled.max_levels_after_bootstrap()
    if lb > cap:
        if need > cap:
            raise PlanningError(
                f"op {name!r} ({op}) needs {d} levels in one bootstrap segment (levels_after_bootstrap >= {need}, "
                f"total depth {need + params.bootstrap_depth} at a {scaled.scale_bits}-bit scale), but no 128-bit "
                f"secure ring allows more than {cap} levels after a bootstrap"
                + (f" within ring dimension {params.ring_dim}" if params.ring_dim else " (N <= 2^17)")
                + "; lower the polynomial's degree or Newton steps, or split it into stages")
        lb = cap
        note = f"levels after bootstrap {lb} (default lowered to the largest secure value)"
    limit = float(max_memory_gib if max_memory_gib is not None else P.default_max_memory_gib())
    mem = _boot_params(params, lb, circuit.ct_slots).estimate_bootstrap_memory_gib(memory_anchor)
    if mem > limit:
        # the fewest levels that still fit the deepest op
        mem_need = _boot_params(params, need, circuit.ct_slots).estimate_bootstrap_memory_gib(memory_anchor)
        if mem_need > limit:
            raise PlanningError(
                f"op {name!r} ({op}) needs {d} levels in one bootstrap segment (levels_after_bootstrap >= {need}); "
                f"bootstrapping keys for that depth ({need + params.bootstrap_depth}) and {circuit.ct_slots} slots need "
                f"~{mem_need:.1f} GiB, over the {limit:.1f} GiB limit (max_memory_gib / HF_POLYHE_MAX_MEMORY_GIB); "
                f"lower the polynomial's degree or Newton steps, split it into stages, or use fewer slots")
        while lb > need and _boot_params(params, lb, circuit.ct_slots).estimate_bootstrap_memory_gib(memory_anchor) > limit:
            lb -= 1
        note = f"levels after bootstrap {lb} (lowered to fit the {limit:.1f} GiB memory limit)"
    return lb, note


# Level budgets tried, in order, when the default [2, 2] needs more bootstrapping memory than the limit: more
# CoeffsToSlots / SlotsToCoeffs stages need fewer keys. Measured (benchmarks/he_ops.py --bootstrap-sweep, 128-bit,
# N = 2^16, 6 digits, 4096 slots): peak 19.2 / 12.3 / 8.5 GiB and 18.5 / 15.2 / 13.3 s per bootstrap for [2, 2] /
# [3, 3] / [4, 4], at the price of 2 / 4 more levels per bootstrap.
MEMORY_LEVEL_BUDGETS = ((3, 3), (4, 4))


def choose_level_budget(circuit: Circuit, params: P.CKKSParams, requested: int | None = None,
                        max_memory_gib: float | None = None, memory_anchor=None):
    """:func:`choose_levels_after_bootstrap` for ``params``' level budget. When that is the default [2, 2] of a
    128-bit set (``auto_level_budget``) and its bootstrapping memory forces fewer levels than wanted, or does not
    fit at all, the budgets of :data:`MEMORY_LEVEL_BUDGETS` are tried too: the first that fits without lowering the
    levels for memory wins, else whichever keeps the most levels ([2, 2] on ties). A budget that cannot be planned
    for any reason (a security cap below what the ops need, memory) is skipped. Returns ``(params with the budget,
    levels, note)``; raises the [2, 2] refusal if no budget fits."""
    base = tuple(params.level_budget)
    try:
        lb, note = choose_levels_after_bootstrap(circuit, params, requested, max_memory_gib, memory_anchor)
    except PlanningError as e:
        if "GiB" not in str(e):
            raise
        first, best = e, None
    else:
        if "lowered to fit" not in note:
            return params, lb, note
        first, best = None, (params, lb, note)
    if base != (2, 2) or not params.auto_level_budget or params.insecure:
        if best is None:
            raise first
        return best
    for b in MEMORY_LEVEL_BUDGETS:
        q = params.with_(level_budget=b)
        try:
            lb, note = choose_levels_after_bootstrap(circuit, q, requested, max_memory_gib, memory_anchor)
        except PlanningError:
            continue
        note += f"; level budget {list(b)}: with {list(base)} the bootstrapping keys needed more memory than the limit"
        if best is None or lb > best[1]:
            best = (q, lb, note)
            if "lowered" not in note:
                break
    if best is None:
        raise first
    return best


def _boot_params(params: P.CKKSParams, lb: int, slots: int) -> P.CKKSParams:
    """The bootstrapping parameter set for ``lb`` levels after a bootstrap (scale >= 59 bits, ring filled in)."""
    scale = params.scale_bits if params.scale_bits >= 59 else 59
    p = params.with_(bootstrap=True, levels_after_bootstrap=lb, scale_bits=scale, slots=slots)
    p = p.with_(depth=lb + p.bootstrap_depth)
    if not p.insecure:
        p = p.with_(ring_dim=p.secure_ring_dim())
    return p


LAST_LEVEL_MARGIN = 4  # calibrated bounds x this must fit the first prime's headroom to drop the spare level


def fits_first_prime(levels: dict, depth: int, bounds: dict | None, p: P.CKKSParams) -> bool:
    """Can a leveled chain of exactly ``depth`` levels hold the circuit? Every value at the last level (``levels``:
    :func:`static_levels`) then sits on the first prime alone: its calibrated bound (``bounds``, e.g.
    :func:`calibrate_bounds`) times :data:`LAST_LEVEL_MARGIN` must stay below ``2^(first_mod_bits - scale_bits -
    1)``. False without bounds for every such value."""
    if not bounds:
        return False
    limit = 2.0 ** (p.first_mod_bits - p.scale_bits - 1)
    last = [n for n, level in levels.items() if level >= depth]
    return all(n in bounds and bounds[n] * LAST_LEVEL_MARGIN <= limit for n in last)


def fit_scale(p: P.CKKSParams):
    """The leveled set ``p`` with the scale (``scale_bits`` down to ``min_scale_bits``, in 5-bit steps) that gives
    the smallest 128-bit secure ring, the largest such scale on ties; ``(params, note or None)``."""
    if p.insecure or p.min_scale_bits >= p.scale_bits:
        return p, None

    def ring(q):
        try:
            return q.secure_ring_dim()
        except PlanningError:
            return None

    scales = sorted(set(range(p.scale_bits, p.min_scale_bits - 1, -5)) | {p.min_scale_bits}, reverse=True)
    options = [(ring(p.with_(scale_bits=s)), s) for s in scales]
    options = [(n, s) for n, s in options if n]
    if not options:
        return p, None
    n, s = min(options, key=lambda o: (o[0], -o[1]))
    if s == p.scale_bits:
        return p, None
    was = ring(p)
    note = (f"scale lowered from {p.scale_bits} to {s} bits so the {p.depth} levels fit "
            + (f"ring 2^{n.bit_length() - 1} instead of 2^{was.bit_length() - 1}" if was else
               f"a 128-bit secure ring (2^{n.bit_length() - 1})"))
    return p.with_(scale_bits=s), note


def plan(circuit: Circuit, params: P.CKKSParams | None = None, levels_after_bootstrap: int | None = None,
         bootstrap: str = "auto", bounds: dict | None = None, max_leveled_depth: int = 24,
         cost_table: dict | None = None, max_memory_gib: float | None = None, rotation_keys=None) -> Plan:
    """Plan ``circuit``: levels, bootstraps, rotation keys, CKKS parameters, predicted cost.

    ``bootstrap``: ``"auto"`` (bootstrap only when the leveled depth exceeds ``max_leveled_depth`` or the
    circuit already has bootstrap ops), ``"never"`` (PlanningError if too deep), ``"always"``.
    ``params``: a parameter set (default: :func:`params.default`); depth/slots/ring are filled in.
    ``levels_after_bootstrap``: levels a bootstrapped ciphertext carries; unset, it is chosen from the deepest
    op (see :func:`choose_levels_after_bootstrap`), bounded by security and ``max_memory_gib``.
    ``rotation_keys``: plan for a server that holds only these rotation keys (other rotations are composed of
    them, :mod:`hf_polyhe.he.circuit.rotations`); None: a key per rotation index.
    ``bounds``: max |value| per node (:func:`calibrate_bounds` on sample inputs). Bootstrapping scales by them; a
    leveled plan drops its spare level when they put every value at the last level well inside the first prime
    (:func:`fits_first_prime`). They are a promise: an input that drives a last-level value 4x past its bound then
    decrypts as garbage. Exports do not pass them in leveled mode.
    """
    circuit.validate()
    params = params or P.default()
    costs = cost_table or load_cost_table()
    has_explicit = any(n.op == "bootstrap" for n in circuit.nodes)
    lev = static_levels(circuit)
    leveled_depth = max(max(lev.values()), 1)
    want_boot = bootstrap == "always" or has_explicit or (bootstrap == "auto" and leveled_depth > max_leveled_depth)
    if bootstrap not in ("auto", "never", "always"):
        raise PlanningError(f"bootstrap must be 'auto', 'never' or 'always', got {bootstrap!r}")
    if bootstrap == "never" and (has_explicit or leveled_depth > max_leveled_depth):
        # still allowed if a secure set exists; checked below by min_secure_ring_dim
        want_boot = has_explicit
    inserted = []
    run_circuit = circuit
    notes = []
    boot_rows = bootstrap_memory_source(costs)
    if want_boot:
        params, lb, note = choose_level_budget(circuit, params, levels_after_bootstrap, max_memory_gib, boot_rows)
        notes.append(note)
        run_circuit, inserted = insert_bootstraps(circuit, lb, bounds)
        lev = static_levels(run_circuit)
        p = _boot_params(params, lb, circuit.ct_slots)
        start_level = p.bootstrap_depth - 1  # one spare level for the fresh ciphertext's first rescale
        seg_depth = max(lev.values())
    else:
        # With FLEXIBLEAUTO d products need d levels (a product's rescale is deferred, the last one to decryption:
        # openfhe 1.6.1, checked from every start level), but a value at the last level then lives on the first
        # prime alone and must stay below 2^(first_mod_bits - scale_bits - 1) (512 at 60 / 50 bits: larger values
        # decrypt as garbage, silently). So the chain keeps a spare level unless calibrated bounds show that every
        # value at the last level fits with a margin; without it every operation handles one tower less.
        def leveled(depth):
            return fit_scale(params.with_(bootstrap=False, slots=circuit.ct_slots, depth=depth))

        p, note = leveled(leveled_depth) if bounds else (None, None)
        if p is None or not fits_first_prime(lev, leveled_depth, bounds, p):
            p, note = leveled(leveled_depth + 1)
        else:
            notes.append(f"no spare level: every value at the last level is calibrated below 1/{LAST_LEVEL_MARGIN} of "
                         f"what the first prime holds ({2 ** (p.first_mod_bits - p.scale_bits - 1)})")
        if note:
            notes.append(note)
        start_level = 0
        seg_depth = leveled_depth
    if p.ring_dim and p.slots * 2 > p.ring_dim:
        raise PlanningError(f"the circuit needs {p.slots} slots, ring dimension {p.ring_dim} offers {p.ring_dim // 2}")
    if not p.insecure:
        p = p.with_(ring_dim=p.secure_ring_dim())  # PlanningError if no secure set
    tb = trace(Evaluator(run_circuit, None), p, start_level, costs, rotation_keys=rotation_keys)
    if tb.composed[0]:
        notes.append(f"rotations composed from {len(rotation_keys)} keys: {tb.composed[0]} rotations run as chains, "
                     f"{tb.composed[1]} extra rotations")
    if tb.max_level > (p.levels_after_bootstrap if p.bootstrap else leveled_depth):
        raise PlanningError(f"internal: traced level {tb.max_level} exceeds the planned depth")
    rot = sorted(tb.rotation_keys)
    mem = p.estimate_bootstrap_memory_gib(boot_rows) if p.bootstrap else 0.0
    if p.bootstrap:
        notes.append(bootstrap_source_note(boot_rows, p))
    return Plan(circuit=run_circuit, params=p, levels=lev, depth=seg_depth, rotation_keys=rot, counts=tb.counts,
                inserted_bootstraps=inserted, start_level=start_level, key_bytes=key_bytes(p, len(rot), costs),
                predicted_seconds=tb.time, time_by_op=tb.time_by_op, bootstrap_memory_gib=mem, notes=notes,
                plaintexts=tb.plaintext_summary(), rotation_uses=dict(tb.rotation_uses))


def trace(evaluator: Evaluator, params: P.CKKSParams, start_level: int, costs: dict | None = None,
          on_plaintext=None, rotation_keys=None) -> TraceBackend:
    """Run ``evaluator``'s circuit on a :class:`TraceBackend` for ``params`` (sharing the plans and plaintext
    vectors ``evaluator`` caches); the backend holds the counts, keys, levels, predicted time and plaintexts
    (``on_plaintext(vector, OpenFHE level)``: told of each distinct one when first met). ``rotation_keys``: the
    only keys a server holds (:class:`~hf_polyhe.he.circuit.rotations.ComposedRotations`: other indices are
    chains, each step charged); ``tb.composed`` is then ``(rotations by a chain, extra rotations)``."""
    p = params
    tb = TraceBackend(evaluator.circuit.ct_slots, p.depth, start_level,
                      p.levels_after_bootstrap if p.bootstrap else p.depth, p.ring_dim, costs or load_cost_table(),
                      on_plaintext=on_plaintext)
    if p.bootstrap:
        tb.bootstrap_s = bootstrap_seconds(tb.costs, p)
    dn = P.key_switch_digits(p.num_large_digits, p.depth)
    tb.ks_factor = {k: digits_factor(tb.costs, dn, k) for k in ("rotate", "mul")}
    comp = None
    if rotation_keys is not None:
        comp = ComposedRotations(tb, RotationPaths(rotation_keys, evaluator.circuit.ct_slots))
    ev = evaluator.on(comp or tb)
    ins = {n: Packed(ev.layouts[n], [TraceCt(0) for _ in range(ev.layouts[n].num_cts)]) for n in ev.circuit.inputs}
    ev.run(ins)
    tb.composed = (comp.composed, comp.extra) if comp is not None else (0, 0)
    return tb
