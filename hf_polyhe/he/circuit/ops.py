"""The op registry: for every IR op, its layout inference, its numpy reference semantics on unpacked tensors,
its packed execution on any backend, and its multiplicative depth (levels, as OpenFHE spends them).

Add an op by subclassing :class:`OpSpec` and decorating it with :func:`register_op`; tests are
parametrised over :data:`OPS`.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np

from hf_polyhe.approx.base import Approximation, ChebyshevSeries

from ..errors import CircuitError, LayoutError
from .packing import (ColumnVector, MatrixLayout, ScoreLayout, TiledVector, bsgs_plan, grouped_plan, next_pow2, norm_rot,
                      single_row_plan)

OPS: dict = {}


def register_op(name: str):
    def wrap(cls):
        cls.name = name
        OPS[name] = cls()
        return cls

    return wrap


def approximation_depth(approx: Approximation) -> int:
    """Levels the packed evaluation of ``approx`` consumes on the OpenFHE backend: every Chebyshev stage what
    ``EvalChebyshevSeries`` spends (:func:`hf_polyhe.approx.chebyshev_depth`, counted to a settled output; one
    level less on ``[-1, 1]``), plus the products of the composite/Newton kinds."""
    d = sum(s.depth for s in approx.stages)
    if approx.kind == "relu_from_sign":
        d += 1
    elif approx.kind in ("newton_inv_sqrt", "newton_reciprocal"):
        d += 2 * approx.newton_steps
    return d


def _same(op, a, b):
    if a.kind != b.kind or a.shape != b.shape or a.groups != b.groups or (a.kind in ("scores", "tiled", "column")
                                                                            and a != b):
        raise LayoutError(f"{op}: operands have different shapes/layouts: {a.to_dict()} vs {b.to_dict()}")


def _scale(series: ChebyshevSeries, c: float) -> ChebyshevSeries:
    return ChebyshevSeries(series.coeffs * c, series.interval)


class OpSpec:
    name = "?"
    n_inputs = 1

    def check_arity(self, node):
        if self.n_inputs is not None and len(node.inputs) != self.n_inputs:
            raise CircuitError(f"op {self.name!r} takes {self.n_inputs} input(s), got {len(node.inputs)}")

    def infer(self, circuit, node, layouts):
        raise NotImplementedError

    def reference(self, circuit, node, xs, layouts):
        """Numpy semantics on unpacked tensors (``layouts``: input layouts, for layout-level ops)."""
        raise NotImplementedError

    def execute(self, ev, node, xs):
        """Packed execution: ``xs`` are :class:`~hf_polyhe.he.circuit.evaluator.Packed`; returns a list of cts."""
        raise NotImplementedError

    def depth(self, circuit, node, layouts) -> int:
        return 0


@register_op("linear")
class Linear(OpSpec):
    def infer(self, c, node, lay):
        self.check_arity(node)
        x = lay[0]
        if x.kind in ("tiled", "column"):
            return self._infer_vector(c, node, x)
        if x.kind != "matrix":
            raise LayoutError("linear needs a matrix input")
        W = c.weight(node.attrs["weight"])
        if W.ndim != 2 or W.shape[0] != x.cols:
            raise LayoutError(f"weight shape {W.shape} does not match input features {x.cols}")
        if "bias" in node.attrs and c.weight(node.attrs["bias"]).shape != (W.shape[1],):
            raise LayoutError(f"bias shape {c.weight(node.attrs['bias']).shape} != ({W.shape[1]},)")
        _not_confined("linear", x)
        confine = bool(node.attrs.get("confine", False))
        if confine and (x.groups == 1 or x.stacked or W.shape[1] > x.block):
            raise LayoutError("linear(confine=True) needs row groups, a replicated input and at most one block out")
        out = MatrixLayout(x.rows, int(W.shape[1]), x.block, x.slots, clean=True, groups=x.groups, confined=confine)
        if x.stacked and out.col_blocks > 1:
            raise LayoutError(f"a linear from a stacked input ({x.cols} features in {x.groups} row groups) must map to "
                              f"at most {x.block} features, got {out.cols}; build the circuit with groups=1")
        return out

    @staticmethod
    def _infer_vector(c, node, x):
        """One-row vectors (decode steps): tiled -> column (``width`` attr: the output's row width, default the
        widest that holds one row per output feature) and column -> tiled."""
        W = c.weight(node.attrs["weight"])
        if W.ndim != 2 or W.shape[0] != x.cols:
            raise LayoutError(f"weight shape {W.shape} does not match input features {x.cols}")
        if "bias" in node.attrs and c.weight(node.attrs["bias"]).shape != (W.shape[1],):
            raise LayoutError(f"bias shape {c.weight(node.attrs['bias']).shape} != ({W.shape[1]},)")
        if node.attrs.get("confine"):
            raise LayoutError("linear(confine=True) takes a matrix input")
        n_out = int(W.shape[1])
        if x.kind == "tiled":
            width = int(node.attrs.get("width") or x.ct_slots // next_pow2(n_out))
            if x.period > width:
                raise LayoutError(f"a linear from a tiled vector of period {x.period} to a column vector needs rows "
                                  f"of at least {x.period} slots; {n_out} rows of {x.ct_slots} slots are {width} wide")
            return ColumnVector(n_out, width, x.ct_slots, valid=width - x.period + 1)
        P = next_pow2(n_out)
        if P > x.width:
            raise LayoutError(f"a linear from a column vector to a tiled vector of period {P} needs rows of at least "
                              f"{P} slots, got {x.width}")
        return TiledVector(n_out, P, x.ct_slots)

    @staticmethod
    def _column_plaintext(W, L, out_l):
        """Tiled -> column: row ``r`` holds output ``r``'s weights against the tiled input, so one product and a
        window sum of ``period`` slots leave ``y[r]`` in the first ``width - period + 1`` slots of row ``r``."""
        Wp = np.zeros((L.period, out_l.n_rows))
        Wp[: W.shape[0], : W.shape[1]] = W
        return Wp[np.arange(out_l.width) % L.period].T.reshape(-1).copy()

    @staticmethod
    def _tiled_plaintexts(W, L, out_l):
        """Column -> tiled: plaintexts (one per ``chunk``-wide slice of the output period) and the chunk; with
        enough valid columns one plaintext lays out several copies of the period at once."""
        P = out_l.period
        Wp = np.zeros((L.n_rows, P))
        Wp[: W.shape[0], : W.shape[1]] = W
        valid = 1 << (L.valid.bit_length() - 1)  # a power of two <= the valid columns
        if valid >= P:
            M = np.zeros((L.n_rows, L.width))
            M[:, :valid] = Wp[:, np.arange(valid) % P]
            return [M.reshape(-1)], valid
        out = []
        for j in range(P // valid):
            M = np.zeros((L.n_rows, L.width))
            M[:, :valid] = Wp[:, j * valid : (j + 1) * valid]
            out.append(M.reshape(-1))
        return out, valid

    def _execute_vector(self, ev, node, x, W):
        L, out_l, be = x.layout, ev.layouts[node.name], ev.backend
        # the plaintexts do not depend on the decode position: one copy (and one encoding) for every step
        key = ("vector", _digest(W), repr(L), repr(out_l))
        ct = self.rescaled(ev, node.inputs[0], x.cts[0])
        if L.kind == "tiled":
            M = ev.cached((node.name, "vec"), lambda: _shared(key, lambda: self._column_plaintext(W, L, out_l)))
            y = _rot_sum(ev, be.mul_plain(ct, M), 1, L.period, whole=True)
        else:
            Ms, chunk = ev.cached((node.name, "vec"), lambda: _shared(key, lambda: self._tiled_plaintexts(W, L, out_l)))
            parts, step = [be.mul_plain(ct, M) for M in Ms], chunk
            while len(parts) > 1:  # chunk j moves j * chunk slots right: a tree of power-of-two rotations
                parts = [be.add(a, ev.rotate_slots(b, -step)) for a, b in zip(parts[::2], parts[1::2])]
                step *= 2
            y = _rot_sum(ev, parts[0], L.width, L.n_rows, whole=True)  # every row: the sum over all rows
            filled = max(chunk, out_l.period)
            y = _rot_sum(ev, y, -filled, L.width // filled, whole=True)  # tile the period over the row
        if "bias" in node.attrs:
            b = ev.cached((node.name, "bias"), lambda: out_l.pack(out_l.broadcast(ev.circuit.weight(node.attrs["bias"])))[0])
            y = be.add_plain(y, b)
        return [y]

    def reference(self, c, node, xs, lay):
        y = xs[0] @ c.weight(node.attrs["weight"])
        return y + c.weight(node.attrs["bias"]) if "bias" in node.attrs else y

    def depth(self, c, node, lay):
        return 1

    @staticmethod
    def padding_value(ev, node):
        """What the input's padding slots hold when it is known: 0.0 (clean), ``p(0)`` for a polynomial of a
        clean tensor; None otherwise. A bootstrap keeps the value (its bound covers the padding too), so the
        polynomial may sit behind one: the padding then holds ``p(0)`` up to the bootstrap's noise, as the valid
        slots hold their values."""
        L = ev.layouts[node.inputs[0]]
        if L.clean:
            return 0.0
        src = ev.producers.get(node.inputs[0])
        while src is not None and src.op == "bootstrap":
            src = ev.producers.get(src.inputs[0])
        if src is not None and src.op == "poly" and ev.layouts[src.inputs[0]].clean:
            return float(np.asarray(OPS["poly"].approx(src).evaluate(np.zeros(1))).reshape(-1)[0])
        return None

    @staticmethod
    def padding_correction(plan, L, out_l, pad, grouped=False):
        """Per output ciphertext, minus what the doubled row's padding (``pad`` in every padding slot) adds to the
        single-row product: the same schedule run on the padding pattern in numpy. ``grouped``: a grouped_plan
        (full-ciphertext vectors, then its group sum); else a one-group plan."""
        D, P = L.block, L.slots
        valid = L.valid_masks() if grouped else [m[:P] for m in L.valid_masks()]
        corr = []
        for no in range(out_l.num_cts):
            acc = np.zeros(valid[0].size)
            for ni, ok in enumerate(valid):
                v = np.where(ok, 0.0, pad)
                vv = v + np.roll(v, D)  # = v + rot(v, -D)
                for g, terms in plan.terms.get((ni, no) if grouped else (0, ni, no), {}).items():
                    acc += np.roll(sum(q * np.roll(vv, -b) for b, q in terms.items()), -g)
            for j in range(plan.group_sum):
                acc = acc + np.roll(acc, -(P << j))
            corr.append(-acc)
        return corr

    def _execute_grouped(self, ev, node, x, W, pad, copies=False):
        """Row-grouped layouts: one pass of plaintext products serves every group (see packing.grouped_plan)."""
        L, out_l, be = x.layout, ev.layouts[node.name], ev.backend
        single = pad is not None or copies
        # full-ciphertext plaintexts are big (groups x the one-group ones): shared by every evaluator that
        # runs the same weight on the same layouts (each decode position, each cached circuit)
        key = ("grouped", _digest(W), repr(L), repr(out_l), single)
        plan = ev.cached((node.name, "grouped"), lambda: _shared(key, lambda: grouped_plan(W, L, out_l, single)))
        bias = None
        if "bias" in node.attrs:
            bias = out_l.pack(out_l.broadcast(ev.circuit.weight(node.attrs["bias"])))
        if pad:
            corr = ev.cached((node.name, "gpad"), lambda: self.padding_correction(plan, L, out_l, pad, grouped=True))
            bias = corr if bias is None else [b + c for b, c in zip(bias, corr)]
        babies = [self.babies(ev, node, n, ct, plan, copies) for n, ct in enumerate(x.cts)]
        out = []
        for no in range(out_l.num_cts):
            acc = self.accumulate(ev, plan, babies, [plan.terms.get((ni, no), {}) for ni in range(L.num_cts)])
            if acc is None:
                acc = be.mul_scalar(x.cts[0], 0.0)
            acc = _rot_sum(ev, acc, L.slots, 1 << plan.group_sum, whole=True)  # every group gets all the blocks
            if bias is not None:
                acc = be.add_plain(acc, bias[no])
            out.append(acc)
        return out

    @staticmethod
    def accumulate(ev, plan, babies, terms):
        """``sum_g rot(sum_{ct, b} terms[ct][g][b] * babies[ct][b], g)`` over the input ciphertexts' baby
        rotations and their ``{giant: {baby: plaintext}}`` terms; None when every term is zero. The giant
        rotations are one ``rotate_sum`` (OpenFHE: summed in the extended basis, one ModDown)."""
        be = ev.backend

        def inner_sums():
            for g in plan.giant:
                inner = None
                for rots, t in zip(babies, terms):
                    for b, vec in t.get(g, {}).items():
                        p = be.mul_plain(rots[b], vec)
                        inner = p if inner is None else be.add(inner, p)
                if inner is not None:
                    yield inner, g

        return ev.rotate_sum(inner_sums(), whole=plan.whole)

    @staticmethod
    def babies(ev, node, n, ct, plan, copies):
        """``{b: rot(x, b)}`` of input ciphertext ``n``: rescaled once (not inside each product that reads it),
        the row doubled for single-row plans. Linears reading the same input with the same baby steps (the
        attention's q, k, v) share them through the evaluator's one-entry cache."""
        double = plan.doubled and not copies
        key = (node.inputs[0], n, plan.baby, double, plan.whole)
        hit = ev.last_babies
        if hit is not None and hit[0] == key and hit[2] is ct:  # the same ciphertext object, not a later run's
            return hit[1]
        be, ct_in = ev.backend, ct
        ct = be.rescale(ct)
        rotate = ev.rotate_slots if plan.whole else ev.rotate
        if double:  # a copy of the row after it (the rows below a single row are free)
            ct = be.add(ct, rotate(ct, -ev.layouts[node.inputs[0]].block))
        rots = ev.rotate_many(ct, plan.baby, whole=plan.whole)
        rots[0] = ct
        ev.last_babies = (key, rots, ct_in)
        return rots

    @staticmethod
    def rescaled(ev, name, ct):
        """``ct`` (value ``name``) rescaled once for every linear that reads it (q/k/v of a decode step), not
        inside each product (see the backends' ``rescale``); the evaluator keeps the last one."""
        hit = ev.last_rescaled
        if hit is not None and hit[0] == name and hit[1] is ct:
            return hit[2]
        out = ev.backend.rescale(ct)
        ev.last_rescaled = (name, ct, out)
        return out

    @staticmethod
    def row_copies(ev, name) -> bool:
        """Does every row of ``name``'s ciphertext hold its row 0 (decode attention outputs, and polynomials /
        products / sums / bootstraps of such)? Then a one-row linear reads the copy below instead of doubling the row
        (after a bootstrap, each copy carries its own bootstrap noise)."""
        node = ev.producers.get(name)
        if node is None:
            return False
        if node.op in ("attn_decode", "decode_rowsum"):
            return True
        if node.op in ("poly", "mul", "add", "sub", "add_plain", "mul_plain", "bootstrap"):
            return all(Linear.row_copies(ev, i) for i in node.inputs)
        return False

    def execute(self, ev, node, xs):
        x = xs[0]
        L = x.layout
        W = ev.circuit.weight(node.attrs["weight"])
        if L.kind in ("tiled", "column"):
            return self._execute_vector(ev, node, x, W)
        single = L.rows == 1 and L.slots >= 2 * L.block
        copies = single and self.row_copies(ev, node.inputs[0])
        pad = self.padding_value(ev, node) if single and not copies else None
        if L.groups > 1 and (L.stacked or ev.layouts[node.name].stacked or ev.layouts[node.name].confined):
            return self._execute_grouped(ev, node, x, W, pad, copies)
        if pad is not None or copies:
            plan = ev.cached((node.name, "row"), lambda: single_row_plan(W, L, W.shape[1]))
        else:
            plan = ev.cached((node.name, "bsgs"), lambda: bsgs_plan(W, L, W.shape[1]))
        out_l = ev.layouts[node.name]
        bias = None
        if "bias" in node.attrs:
            bias = out_l.pack(out_l.broadcast(ev.circuit.weight(node.attrs["bias"])))
        if pad:  # the doubled row carries the padding constant: its (plaintext) contribution leaves via the bias
            corr = ev.cached((node.name, "pad"), lambda: [np.tile(c, L.groups) for c in
                                                           self.padding_correction(plan, L, out_l, pad)])
            bias = [c if bias is None else b + c for b, c in zip(bias or [None] * len(corr), corr)]
        be, out = ev.backend, []
        for rb in range(L.row_blocks):
            babies = [self.babies(ev, node, L.ct_index(rb, ib), x.cts[L.ct_index(rb, ib)], plan, copies)
                      for ib in range(L.col_blocks)]
            for ob in range(out_l.col_blocks):
                acc = self.accumulate(ev, plan, babies, [plan.terms[(rb, ib, ob)] for ib in range(L.col_blocks)])
                if acc is None:  # an all-zero weight block
                    acc = be.mul_scalar(x.cts[L.ct_index(rb, 0)], 0.0)
                if bias is not None:
                    acc = be.add_plain(acc, bias[out_l.ct_index(rb, ob)])
                out.append(acc)
        return out


_SHARED: "OrderedDict" = OrderedDict()
SHARED_PLANS = 32  # grouped linear plans kept across evaluators (~32 MB each for a 64 x 256 block at 8 groups)


def _digest(W) -> str:
    return hashlib.blake2b(np.ascontiguousarray(W, dtype=np.float64).tobytes(), digest_size=16).hexdigest()


def _shared(key, fn):
    hit = _SHARED.get(key)
    if hit is None:
        hit = _SHARED[key] = fn()
    _SHARED.move_to_end(key)
    while len(_SHARED) > SHARED_PLANS:
        _SHARED.popitem(last=False)
    return hit


class _Binary(OpSpec):
    n_inputs = 2

    def infer(self, c, node, lay):
        self.check_arity(node)
        _same(self.name, lay[0], lay[1])
        _not_confined(self.name, lay[0])
        clean = (lay[0].clean or lay[1].clean) if self.name == "mul" else (lay[0].clean and lay[1].clean)
        if lay[0].kind == "column":  # the columns valid in both
            return lay[0].with_(clean=clean, valid=min(lay[0].valid, lay[1].valid))
        return lay[0].with_(clean=clean)

    def execute(self, ev, node, xs):
        f = getattr(ev.backend, self.name)
        return [f(a, b) for a, b in zip(xs[0].cts, xs[1].cts)]


@register_op("add")
class Add(_Binary):
    def reference(self, c, node, xs, lay):
        return xs[0] + xs[1]


@register_op("sub")
class Sub(_Binary):
    def reference(self, c, node, xs, lay):
        return xs[0] - xs[1]


@register_op("mul")
class Mul(_Binary):
    def reference(self, c, node, xs, lay):
        return xs[0] * xs[1]

    def depth(self, c, node, lay):
        return 1


def _fill_rows(ev, node, L, vecs):
    """A one-row input holding its row in every row (``Linear.row_copies``) gets the plaintext in every row too,
    so the copies survive the op."""
    if L.kind != "matrix" or L.rows != 1 or not Linear.row_copies(ev, node.inputs[0]):
        return vecs
    return [np.broadcast_to(v.reshape(-1, L.R, L.block)[:, :1], (v.size // L.slots, L.R, L.block)).reshape(-1).copy()
            for v in vecs]


class _Plain(OpSpec):
    def value(self, c, node, layout):
        if "scalar" in node.attrs:
            return float(node.attrs["scalar"])
        return layout.broadcast(c.weight(node.attrs["value"]))

    def infer(self, c, node, lay):
        self.check_arity(node)
        _not_confined(self.name, lay[0])
        if "scalar" not in node.attrs:
            lay[0].broadcast(c.weight(node.attrs["value"]))  # shape check
        clean = lay[0].clean if (self.name == "add_plain" or "scalar" in node.attrs) else True
        return lay[0].with_(clean=clean)


@register_op("add_plain")
class AddPlain(_Plain):
    def reference(self, c, node, xs, lay):
        return xs[0] + self.value(c, node, lay[0])

    def execute(self, ev, node, xs):
        L = xs[0].layout
        vecs = _fill_rows(ev, node, L, L.pack(L.broadcast(self.value(ev.circuit, node, L))))
        return [ev.backend.add_plain(ct, v) for ct, v in zip(xs[0].cts, vecs)]


@register_op("mul_plain")
class MulPlain(_Plain):
    def reference(self, c, node, xs, lay):
        return xs[0] * self.value(c, node, lay[0])

    def depth(self, c, node, lay):
        return 1

    def execute(self, ev, node, xs):
        L = xs[0].layout
        if "scalar" in node.attrs:
            return [ev.backend.mul_scalar(ct, float(node.attrs["scalar"])) for ct in xs[0].cts]
        vecs = ev.cached((node.name, "vec"), lambda: _fill_rows(ev, node, L, L.pack(self.value(ev.circuit, node, L))))
        return [ev.backend.mul_plain(ct, v) for ct, v in zip(xs[0].cts, vecs)]


@register_op("poly")
class Poly(OpSpec):
    def approx(self, node) -> Approximation:
        try:
            return Approximation.from_dict(node.attrs["approximation"])
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"bad approximation: {e}") from e

    def infer(self, c, node, lay):
        self.check_arity(node)
        self.approx(node)
        _not_confined("poly", lay[0])
        return lay[0].with_(clean=False)

    def reference(self, c, node, xs, lay):
        return self.approx(node).evaluate(xs[0])

    def depth(self, c, node, lay):
        return approximation_depth(self.approx(node))

    def execute(self, ev, node, xs):
        a = self.approx(node)
        be = ev.backend
        masks = ev.cached((node.name, "valid"), lambda: xs[0].layout.valid_masks())
        out = []
        for ct, valid in zip(xs[0].cts, masks):
            where = node.name

            def cheb(v, s, k):
                return be.cheb(v, s, where=f"{where}[stage {k}]", valid=valid)

            if a.kind == "chebyshev":
                y = cheb(ct, a.stages[0], 0)
            elif a.kind == "composite_sign":
                y = ct
                for k, s in enumerate(a.stages):
                    y = cheb(y, s, k)
            elif a.kind == "relu_from_sign":
                # (x + x*s)/2 with the 1/2 folded into the last stage: x/2 + x*(s/2)
                y = ct
                for k, s in enumerate(a.stages):
                    y = cheb(y, _scale(s, 0.5) if k == len(a.stages) - 1 else s, k)
                y = be.add(be.mul_scalar(ct, 0.5), be.mul(ct, y))
            elif a.kind == "newton_inv_sqrt":
                # y <- 1.5 y - 0.5 x y^3 : two levels per step; x = x_map(input) (one scalar product, as before)
                y = cheb(ct, a.stages[0], 0)
                xh = _affine(be, ct, -0.5 * a.x_map[0], -0.5 * a.x_map[1], valid.size)
                for _ in range(a.newton_steps):
                    y2 = be.mul(y, y)
                    xy = be.mul(xh, y)
                    y = be.add(be.mul_scalar(y, 1.5), be.mul(xy, y2))
            elif a.kind == "newton_reciprocal":
                # y <- 2y - x y^2
                y = cheb(ct, a.stages[0], 0)
                x = ct if a.x_map == (1.0, 0.0) else _affine(be, ct, *a.x_map, valid.size)
                for _ in range(a.newton_steps):
                    y = be.sub(be.add(y, y), be.mul(be.mul(x, y), y))
            else:
                raise CircuitError(f"approximation kind {a.kind!r} not supported by the runtime")
            out.append(y)
        return out


def _affine(be, ct, a: float, b: float, n: int):
    """``a * ct + b`` in every one of the ciphertext's ``n`` slots (one scalar product; the shift is free)."""
    y = be.mul_scalar(ct, a)
    return y if b == 0.0 else be.add_plain(y, np.full(n, b))


@register_op("rotate")
class Rotate(OpSpec):
    def infer(self, c, node, lay):
        self.check_arity(node)
        int(node.attrs["offset"])
        if getattr(lay[0], "groups", 1) > 1:
            raise LayoutError("rotate acts on one row group; build the circuit with groups=1")
        return lay[0].with_(clean=False)

    def reference(self, c, node, xs, lay):
        L = lay[0]
        k = int(node.attrs["offset"])
        return L.unpack([np.roll(v, -k) for v in L.pack(xs[0])])

    def execute(self, ev, node, xs):
        return [ev.rotate(ct, int(node.attrs["offset"])) for ct in xs[0].cts]


@register_op("row_sum")
class RowSum(OpSpec):
    def infer(self, c, node, lay):
        self.check_arity(node)
        x = lay[0]
        if x.kind in ("tiled", "column"):
            return x.with_(clean=False)  # the sum lands in every slot, padding included
        if x.kind != "matrix":
            raise LayoutError("row_sum needs a matrix input")
        _unstacked("row_sum", x)
        ragged = x.cols % x.block != 0
        if ragged and not x.clean:
            raise LayoutError(
                f"row_sum over {x.cols} features in blocks of {x.block} reads padding columns that may be "
                "nonzero here (after a poly/rotate); insert mul_plain(x, ones((cols,))) first"
            )
        return x.with_(clean=True)  # the sum is spread over the valid columns only (see execute)

    def reference(self, c, node, xs, lay):
        s = float(node.attrs.get("scale", 1.0)) * xs[0].sum(axis=1, keepdims=True)
        return np.broadcast_to(s, xs[0].shape).copy()

    def depth(self, c, node, lay):
        return 1

    @staticmethod
    def _execute_vector(ev, node, x):
        """The valid slots times ``scale`` (the padding dropped), then summed over the features: over the tiled
        period, or over the rows of a column vector; every slot gets the sum."""
        L, be = x.layout, ev.backend
        mask = ev.cached((node.name, "mask"), lambda: L.valid_masks()[0] * float(node.attrs.get("scale", 1.0)))
        y = be.mul_plain(x.cts[0], mask)
        if L.kind == "tiled":
            return [_rot_sum(ev, y, 1, L.period, whole=True)]
        return [_rot_sum(ev, y, L.width, L.n_rows, whole=True)]

    def execute(self, ev, node, xs):
        L, be = xs[0].layout, ev.backend
        if L.kind in ("tiled", "column"):
            return self._execute_vector(ev, node, xs[0])
        D, scale = L.block, float(node.attrs.get("scale", 1.0))
        out = []
        for rb in range(L.row_blocks):
            s = None
            for cb in range(L.col_blocks):
                ct = xs[0].cts[L.ct_index(rb, cb)]
                s = ct if s is None else be.add(s, ct)
            s = _rot_sum(ev, s, 1, D)
            mask = np.zeros(L.slots)
            mask[np.arange(L.block_rows(rb)) * D] = scale
            col0 = be.mul_plain(s, mask)
            # each column block gets the sum in its valid columns only, so a ragged width (d = 384 in blocks of
            # 512) keeps zero padding and a following row_sum (LayerNorm's variance) reads no garbage
            spread = {}
            for cb in range(L.col_blocks):
                w = L.block_cols(cb)
                if w not in spread:
                    spread[w] = _rot_sum(ev, col0, -1, D) if w == D else _spread_prefix(ev, col0, w)
                out.append(spread[w])
        return out


@register_op("select_rows")
class SelectRows(OpSpec):
    def infer(self, c, node, lay):
        self.check_arity(node)
        x, rows = lay[0], node.attrs["rows"]
        if x.kind != "matrix" or not rows or any((not 0 <= int(r) < x.rows) for r in rows):
            raise LayoutError(f"select_rows: rows {rows} must be a non-empty list in [0, {x.rows})")
        _unstacked("select_rows", x)
        return x.with_(rows=len(rows), clean=True)

    def reference(self, c, node, xs, lay):
        return xs[0][np.asarray(node.attrs["rows"], dtype=int)]

    def depth(self, c, node, lay):
        return 1

    def execute(self, ev, node, xs):
        L, be = xs[0].layout, ev.backend
        out_l = ev.layouts[node.name]
        rows, D, R = node.attrs["rows"], L.block, L.R
        out = []
        for ob in range(out_l.row_blocks):
            groups = {}
            for o in range(ob * R, min((ob + 1) * R, len(rows))):
                r = int(rows[o])
                groups.setdefault((r // R, (r % R) - (o % R)), []).append(o % R)
            for cb in range(L.col_blocks):
                acc = None
                for (rb, shift), olocal in sorted(groups.items()):
                    mask = np.zeros((R, D))
                    mask[olocal, : L.block_cols(cb)] = 1.0
                    t = be.mul_plain(ev.rotate(xs[0].cts[L.ct_index(rb, cb)], shift * D), mask.reshape(-1))
                    acc = t if acc is None else be.add(acc, t)
                out.append(acc)
        return out


@register_op("pool_rows")
class PoolRows(OpSpec):
    """``sum_i w_i X[i]`` as a one-row tensor (a mean-pooled sentence embedding: ``w`` = mask / count). The rows
    are weighted by one plaintext product (padding rows and columns zeroed), summed into row 0 by ``log2 R'``
    rotations by whole rows (``R'`` the valid rows rounded to a power of two), and row 0 kept by a mask; 2 levels."""

    def infer(self, c, node, lay):
        self.check_arity(node)
        x = lay[0]
        if x.kind != "matrix":
            raise LayoutError("pool_rows needs a matrix input")
        _unstacked("pool_rows", x)
        _not_confined("pool_rows", x)
        w = c.weight(node.attrs["weights"])
        if w.shape != (x.rows,):
            raise LayoutError(f"pool_rows: {x.rows} rows need {x.rows} weights, got shape {w.shape}")
        return x.with_(rows=1, clean=True)

    def reference(self, c, node, xs, lay):
        w = c.weight(node.attrs["weights"])
        return (w[:, None] * xs[0]).sum(axis=0, keepdims=True)

    def depth(self, c, node, lay):
        return 2

    def execute(self, ev, node, xs):
        L, be = xs[0].layout, ev.backend
        D, R = L.block, L.R
        w = ev.circuit.weight(node.attrs["weights"])
        span = next_pow2(min(L.rows, R))
        out = []
        for cb in range(L.col_blocks):
            acc = None
            for rb in range(L.row_blocks):
                r, cols = L.block_rows(rb), L.block_cols(cb)
                m = np.zeros((R, D))
                m[:r, :cols] = w[rb * R : rb * R + r, None]
                t = be.mul_plain(xs[0].cts[L.ct_index(rb, cb)], m.reshape(-1))
                acc = t if acc is None else be.add(acc, t)
            acc = _rot_sum(ev, acc, D, span)
            keep = np.zeros((R, D))
            keep[0, : L.block_cols(cb)] = 1.0
            out.append(be.mul_plain(acc, keep.reshape(-1)))
        return out


@register_op("slice_cols")
class SliceCols(OpSpec):
    def infer(self, c, node, lay):
        self.check_arity(node)
        x = lay[0]
        a, b = int(node.attrs["start"]), int(node.attrs["stop"])
        if x.kind != "matrix" or not (0 <= a < b <= x.cols) or a % x.block:
            raise LayoutError(f"slice_cols [{a}, {b}) must satisfy 0 <= start < stop <= {x.cols}, start % {x.block} == 0")
        if x.groups > 1:
            raise LayoutError("slice_cols works on one row group; build the circuit with groups=1")
        clean = x.clean and (b == x.cols or b % x.block == 0)
        return x.with_(cols=b - a, clean=clean)

    def reference(self, c, node, xs, lay):
        return xs[0][:, int(node.attrs["start"]) : int(node.attrs["stop"])]

    def execute(self, ev, node, xs):
        L = xs[0].layout
        a, b = int(node.attrs["start"]), int(node.attrs["stop"])
        cbs = range(a // L.block, -(-b // L.block))
        return [xs[0].cts[L.ct_index(rb, cb)] for rb in range(L.row_blocks) for cb in cbs]


@register_op("concat_cols")
class ConcatCols(OpSpec):
    n_inputs = None

    def infer(self, c, node, lay):
        if not lay:
            raise LayoutError("concat_cols needs at least one input")
        for i, x in enumerate(lay):
            if x.kind != "matrix" or x.rows != lay[0].rows:
                raise LayoutError("concat_cols inputs must be matrices with the same number of rows")
            if x.groups > 1:
                raise LayoutError("concat_cols works on one row group; build the circuit with groups=1")
            if i < len(lay) - 1 and x.cols % x.block:
                raise LayoutError(f"concat_cols: input {i} has {x.cols} columns, not a multiple of block {x.block}")
        return lay[0].with_(cols=sum(x.cols for x in lay), clean=all(x.clean for x in lay))

    def reference(self, c, node, xs, lay):
        return np.concatenate(xs, axis=1)

    def execute(self, ev, node, xs):
        out = []
        for rb in range(xs[0].layout.row_blocks):
            for x in xs:
                out.extend(x.cts[x.layout.ct_index(rb, cb)] for cb in range(x.layout.col_blocks))
        return out


class _ShiftWalk:
    """``rot(ct, a)`` for a sequence of row shifts ``a``, each reached from the previous one by one rotation of
    the difference: consecutive attention shifts differ by one row, so one key (+-D) serves all of them instead
    of a key per shift (a 32-row prompt: 31 keys, ~3.6 GB at 128-bit). Same rotation count."""

    def __init__(self, ev, ct):
        self.ev, self.base, self.prev, self.at = ev, ct, ct, 0

    def __call__(self, amount):
        slots = self.ev.circuit.slots
        a = norm_rot(int(amount), slots)
        if a == 0:
            return self.base
        self.prev = self.ev.rotate(self.prev, norm_rot(a - self.at, slots))
        self.at = a
        return self.prev


class _GroupShifts:
    """Keys or values confined to group 0 -> for each batch of shifts, a ciphertext whose group ``g`` holds them
    moved by ``shifts[g]`` rows (``rot(x, s*D - g*P)``). A full batch in arithmetic progression
    (``s_g = s_0 + c*g``) costs ``log2 groups`` doubling rotations; a batch equal to the previous one moved by
    ``delta`` rows costs one; any other batch one rotation per shift. A group's rows move by ``|s| < rows`` and
    the layout has ``R >= 2 * rows``, so what crosses a group border lands in the neighbour's padding rows,
    where the replicated query (zero padding) and the masks cancel it; carried-along shifts of an incomplete
    batch are only kept while they stay in that safe range ``[rows - R, R - rows]``."""

    def __init__(self, ev, ct, S):
        self.ev, self.x0, self.S = ev, ct, S
        self.prev = None  # (row shifts per group, ciphertext)

    def _safe(self, s):
        return self.S.rows - self.S.R <= s <= self.S.R - self.S.rows

    def __call__(self, shifts):
        ev, S, be = self.ev, self.S, self.ev.backend
        D, P, G = S.block, S.slots, S.groups
        sh = [norm_rot(int(s), S.R) for s in shifts]  # rows, in (-R/2, R/2]
        ct = None
        if self.prev is not None:
            prev_sh, prev_ct = self.prev
            delta = sh[0] - prev_sh[0]
            moved = [s + delta for s in prev_sh]
            if moved[: len(sh)] == sh and all(self._safe(s) for s in moved):
                ct, sh = ev.rotate_slots(prev_ct, delta * D), moved
        if ct is None and len(sh) == G and (G == 1 or len({b - a for a, b in zip(sh, sh[1:])}) == 1):
            c = sh[1] - sh[0] if G > 1 else 0
            ct = _rot_sum(ev, ev.rotate_slots(self.x0, sh[0] * D), c * D - P, G, whole=True)
        if ct is None:
            for g, s in enumerate(sh):
                t = ev.rotate_slots(self.x0, s * D - g * P)
                ct = t if ct is None else be.add(ct, t)
            sh = sh + [None] * (G - len(sh))  # empty groups: nothing to carry
        if None not in sh:
            self.prev = (sh, ct)
        else:
            self.prev = None
        return ct


def _rot_sum(ev, ct, unit: int, n: int, whole: bool = False):
    """``sum_{0 <= j < n} rot(ct, j * unit)`` for a power-of-two ``n`` (``unit < 0`` spreads to the other side).
    ``whole``: rotations over the whole ciphertext (across row groups).

    Radix 4 where it can: ``ct + rot(ct, s) + rot(ct, 2s) + rot(ct, 3s)`` is one hoisted ``rotate_sum`` (one
    precomputation, three key switches in the extended basis, one ModDown; OpenFHE 1.6.1 at N = 2^16: ~0.011 s per
    tower against ~0.018 s for the two plain rotations of radix 2), then one plain rotation if ``log2 n`` is odd."""
    if n < 1 or n & (n - 1):
        raise CircuitError(f"internal: a rotate-and-sum over {n} terms (a power of two is needed)")
    be, step = ev.backend, 1
    rotate = ev.rotate_slots if whole else ev.rotate
    while step * 4 <= n:
        ct = be.add(ct, ev.rotate_sum(((ct, j * step * unit) for j in (1, 2, 3)), whole=whole))
        step *= 4
    if step < n:
        ct = be.add(ct, rotate(ct, step * unit))
    return ct


def _spread_prefix(ev, ct, n: int):
    """Column 0 of every row copied into columns ``[0, n)`` of that row and nowhere else, for any ``n`` (not only
    powers of two): doublings up to the largest power of two in ``n``, then one rotated piece per further set bit
    of ``n`` (``log2 n + popcount(n) - 1`` rotations)."""
    be = ev.backend
    pieces, width = {1: ct}, 1
    while 2 * width <= n:
        pieces[2 * width] = be.add(pieces[width], ev.rotate(pieces[width], -width))
        width *= 2
    out, offset = None, 0
    for b in reversed(range(n.bit_length())):
        if n >> b & 1:
            piece = pieces[1 << b] if offset == 0 else ev.rotate(pieces[1 << b], -offset)
            out = piece if out is None else be.add(out, piece)
            offset += 1 << b
    return out


def _key_weighted(ev, node, ct, L, dh):
    """``ct`` times the decode op's per-key weights, in column ``h*dh`` of each of the ``n`` cache rows (a level);
    without weights ``ct`` as it is (it is zero off those columns already, see :func:`_decode_weights`)."""
    if "weights" not in node.attrs:
        return ct
    mask = np.zeros((L.R, L.block))
    mask[: L.rows, np.arange(L.cols // dh) * dh] = ev.circuit.weight(node.attrs["weights"])[:, None]
    return ev.backend.mul_plain(ct, mask.reshape(-1))


def _rotate_rows_pow2(ev, ct, rows: int, D: int):
    """``rot(ct, -rows * D)`` as rotations by powers of two rows (keys shared by every cache length)."""
    k = 0
    while rows:
        if rows & 1:
            ct = ev.rotate(ct, -(D << k))
        rows >>= 1
        k += 1
    return ct


def _not_confined(name, x):
    if getattr(x, "confined", False):
        raise LayoutError(f"{name} does not take a confined layout (attention keys/values in one row group); "
                          "replicate it first")


def _unstacked(name, x):
    if getattr(x, "stacked", False):
        raise LayoutError(f"{name} does not take a stacked layout ({x.cols} features in {x.groups} row groups); "
                          "build the circuit with groups=1")


def _single_ct(name, x, confined_ok=False):
    if not confined_ok:
        _not_confined(name, x)
    if x.kind != "matrix" or x.num_cts != 1 or x.col_blocks != 1:
        raise LayoutError(
            f"{name} needs a single-ciphertext matrix (rows <= slots/block = {x.slots // x.block}, cols <= block = "
            f"{x.block}); got {x.rows} x {x.cols}"
        )


@register_op("qk_scores")
class QKScores(OpSpec):
    n_inputs = 2

    def infer(self, c, node, lay):
        self.check_arity(node)
        q, k = lay
        _single_ct("qk_scores", q)
        _single_ct("qk_scores", k, confined_ok=True)
        _same("qk_scores", q, k)
        h = int(node.attrs["heads"])
        if h <= 0 or q.cols % h:
            raise LayoutError(f"{q.cols} features do not split into {h} heads")
        if "row_scale" in node.attrs and c.weight(node.attrs["row_scale"]).shape != (q.rows,):
            raise LayoutError(f"row_scale must have shape ({q.rows},)")
        # confined keys: the shifts are spread over the row groups (see _GroupShifts)
        return ScoreLayout(q.rows, h, q.cols // h, q.block, q.slots, bool(node.attrs.get("causal", False)),
                           groups=q.groups, spread=k.confined)

    @staticmethod
    def row_factors(c, node, rows):
        r = np.full(rows, float(node.attrs.get("scale", 1.0)))
        return r * c.weight(node.attrs["row_scale"]) if "row_scale" in node.attrs else r

    def reference(self, c, node, xs, lay):
        q, k = xs
        h = int(node.attrs["heads"])
        dh = q.shape[1] // h
        qh = q.reshape(q.shape[0], h, dh).transpose(1, 0, 2)
        kh = k.reshape(k.shape[0], h, dh).transpose(1, 0, 2)
        return self.row_factors(c, node, q.shape[0])[None, :, None] * (qh @ kh.transpose(0, 2, 1))

    def depth(self, c, node, lay):
        return 2

    def _execute_spread(self, ev, node, xs, S):
        """Keys confined to group 0: each ct x ct product meets ``groups`` shifts at once (group g holds the keys
        moved by its shift), so the in-head sums and products run once per batch of shifts."""
        be = ev.backend
        q = be.rescale(xs[0].cts[0])
        D, dh, P = S.block, S.head_dim, S.slots
        r = self.row_factors(ev.circuit, node, S.rows)
        keys = _GroupShifts(ev, be.rescale(xs[1].cts[0]), S)
        out = [None] * S.num_cts
        for ct, m, shifts in S.batches():
            p = be.mul(q, keys(shifts))
            p = _rot_sum(ev, p, 1, dh)
            mask = np.zeros((S.groups, S.R, D))
            for g, s in enumerate(shifts):
                rows = np.nonzero(S.pair_valid(s))[0]
                mask[g][np.ix_(rows, np.arange(S.heads) * dh)] = r[rows][:, None]
            p = ev.rotate(be.mul_plain(p, mask.reshape(-1)), -m)
            out[ct] = p if out[ct] is None else be.add(out[ct], p)
        return out

    def execute(self, ev, node, xs):
        be = ev.backend
        S = ev.layouts[node.name]
        if S.spread:
            return self._execute_spread(ev, node, xs, S)
        q, k = be.rescale(xs[0].cts[0]), be.rescale(xs[1].cts[0])
        D, dh = S.block, S.head_dim
        r = self.row_factors(ev.circuit, node, S.rows)
        out = [None] * S.num_cts
        keys = _ShiftWalk(ev, k)
        for ct, m, s in S.positions():
            p = be.mul(q, keys(s * D))
            p = _rot_sum(ev, p, 1, dh)
            mask = np.zeros((S.R, D))
            rows = np.nonzero(S.pair_valid(s))[0]
            mask[np.ix_(rows, np.arange(S.heads) * dh)] = r[rows][:, None]
            p = ev.rotate(be.mul_plain(p, mask.reshape(-1)), -m)
            out[ct] = p if out[ct] is None else be.add(out[ct], p)
        return out


@register_op("attn_apply")
class AttnApply(OpSpec):
    n_inputs = 2

    def infer(self, c, node, lay):
        self.check_arity(node)
        s, v = lay
        if s.kind != "scores":
            raise LayoutError("attn_apply's first input must be attention scores (from qk_scores)")
        _single_ct("attn_apply", v, confined_ok=True)
        if s.spread != v.confined:
            raise LayoutError("attn_apply: spread scores go with confined values (and replicated with replicated)")
        if v.rows != s.rows or v.cols != s.heads * s.head_dim or v.block != s.block:
            raise LayoutError(f"values of shape {v.shape} do not match scores {s.shape} x head_dim {s.head_dim}")
        if "mask" in node.attrs and c.weight(node.attrs["mask"]).shape != (s.rows, s.rows):
            raise LayoutError(f"mask must have shape ({s.rows}, {s.rows})")
        return v.with_(clean=True, confined=False)

    def _mask(self, c, node, S):
        m = np.ones((S.rows, S.rows))
        if "mask" in node.attrs:
            m = m * c.weight(node.attrs["mask"])
        if S.causal:
            m = np.tril(m)
        return m * float(node.attrs.get("scale", 1.0))

    def reference(self, c, node, xs, lay):
        A, V = xs
        S = lay[0]
        M = self._mask(c, node, S)
        dh = S.head_dim
        out = np.zeros(V.shape)
        for h in range(S.heads):
            out[:, h * dh : (h + 1) * dh] = (A[h] * M) @ V[:, h * dh : (h + 1) * dh]
        return out

    def depth(self, c, node, lay):
        return 2

    def _execute_spread(self, ev, node, xs, S, M):
        """Spread scores and confined values: one product per batch of ``groups`` shifts, then the groups'
        partial outputs are summed by ``log2 groups`` rotations (every group gets the total: replicated)."""
        be = ev.backend
        D, dh = S.block, S.head_dim
        values = _GroupShifts(ev, be.rescale(xs[1].cts[0]), S)
        scores = [be.rescale(ct) for ct in xs[0].cts]
        out = None
        for ct, m, shifts in S.batches():
            a = ev.rotate(scores[ct], m)
            mask = np.zeros((S.groups, S.R, D))
            for g, s in enumerate(shifts):
                rows = np.nonzero(S.pair_valid(s))[0]
                mask[g][np.ix_(rows, np.arange(S.heads) * dh)] = M[rows, (rows + s) % S.R][:, None]
            a = be.mul_plain(a, mask.reshape(-1))
            a = _rot_sum(ev, a, -1, dh)
            t = be.mul(a, values(shifts))
            out = t if out is None else be.add(out, t)
        return [_rot_sum(ev, out, S.slots, S.groups, whole=True)]

    def execute(self, ev, node, xs):
        be = ev.backend
        S = xs[0].layout
        M = self._mask(ev.circuit, node, S)
        if S.spread:
            return self._execute_spread(ev, node, xs, S, M)
        v = be.rescale(xs[1].cts[0])
        scores = [be.rescale(ct) for ct in xs[0].cts]
        D, dh = S.block, S.head_dim
        out = None
        values = _ShiftWalk(ev, v)
        for ct, m, s in S.positions():
            a = ev.rotate(scores[ct], m)
            mask = np.zeros((S.R, D))
            rows = np.nonzero(S.pair_valid(s))[0]
            cols = (rows + s) % S.R
            mask[np.ix_(rows, np.arange(S.heads) * dh)] = M[rows, cols][:, None]
            a = be.mul_plain(a, mask.reshape(-1))
            a = _rot_sum(ev, a, -1, dh)
            t = be.mul(a, values(s * D))
            out = t if out is None else be.add(out, t)
        return [out]


@register_op("replicate")
class Replicate(OpSpec):
    """A confined tensor (group 0 only) copied into every row group: ``log2 groups`` rotations, 0 levels."""

    def infer(self, c, node, lay):
        self.check_arity(node)
        if not getattr(lay[0], "confined", False):
            raise LayoutError("replicate needs a confined layout (a linear with confine=True)")
        return lay[0].with_(confined=False)

    def reference(self, c, node, xs, lay):
        return xs[0]

    def execute(self, ev, node, xs):
        L = xs[0].layout
        return [_rot_sum(ev, xs[0].cts[0], -L.slots, L.groups, whole=True)]


@register_op("bootstrap")
class Bootstrap(OpSpec):
    def infer(self, c, node, lay):
        self.check_arity(node)
        b = float(node.attrs.get("bound", 1.0))
        if not (b > 0 and math.isfinite(b)):
            raise LayoutError(f"bootstrap bound must be a positive finite number, got {b}")
        return lay[0]

    def reference(self, c, node, xs, lay):
        return xs[0]

    def execute(self, ev, node, xs):
        b = float(node.attrs.get("bound", 1.0))
        return [ev.backend.bootstrap(ct, b, where=node.name) for ct in xs[0].cts]


# ---------------------------------------------------------------------------------------------------------
# Decode-step attention over an encrypted KV cache (one new token against ``n`` cached keys/values).
# All three work on single-ciphertext matrices with one token per row (see packing.MatrixLayout).


def _clean_single_row(name, x, what):
    _single_ct(name, x)
    if x.rows != 1:
        raise LayoutError(f"{name}: {what} must be one row (the new token), got {x.rows} rows")
    if not x.clean:
        raise LayoutError(f"{name}: {what} must have zero padding (clean layout, e.g. a linear output)")


@register_op("append_row")
class AppendRow(OpSpec):
    """``vstack(cache, x)``: ``cache`` (n x d, clean) gains the row ``x`` (1 x d, clean) as row ``n``.
    Rotations of ``x`` by ``-n`` rows (one per set bit of ``n``: keys shared by every length), an addition; 0 levels.
    A tiled ``x`` (:class:`~hf_polyhe.he.circuit.packing.TiledVector`, already in every row) is masked to row ``n``
    instead: no rotation, 1 level; ``part`` p takes the features ``[p*D, p*D + d)`` of a wider tiled row (the keys
    and values of one linear; one rotation when row ``n`` holds another part)."""

    n_inputs = 2

    def infer(self, c, node, lay):
        self.check_arity(node)
        cache, x = lay
        _single_ct("append_row", cache)
        part = int(node.attrs.get("part", 0))
        if x.kind == "tiled":
            if x.period % cache.block or x.ct_slots != cache.ct_slots or not 0 <= part < x.period // cache.block \
                    or part * cache.block + cache.cols > x.cols:
                raise LayoutError(f"append_row: a tiled row {x.to_dict()} must have a period that is a multiple of the "
                                  f"cache's block {cache.block}, {cache.ct_slots} slots, and its part {part} must hold "
                                  f"the cache's {cache.cols} features")
        elif part:
            raise LayoutError("append_row: part applies to a tiled row")
        else:
            _clean_single_row("append_row", x, "the appended row")
        if not cache.clean:
            raise LayoutError("append_row: the cache must have zero padding (clean layout)")
        if x.kind == "matrix" and (cache.cols != x.cols or cache.block != x.block or cache.slots != x.slots):
            raise LayoutError(f"append_row: cache {cache.shape} and row {x.shape} have different widths/packing")
        if cache.rows + 1 > cache.R:
            raise LayoutError(f"append_row: a cache of {cache.rows} rows is full (at most {cache.R} rows per ciphertext)")
        return cache.with_(rows=cache.rows + 1, clean=True)

    def reference(self, c, node, xs, lay):
        p = int(node.attrs.get("part", 0)) * lay[0].block
        return np.vstack([xs[0], xs[1][:, p : p + lay[0].cols]])

    def depth(self, c, node, lay):
        return 1 if lay[1].kind == "tiled" else 0

    def execute(self, ev, node, xs):
        L = xs[0].layout
        if xs[1].layout.kind == "tiled":  # the row is already everywhere: keep row n of every group
            def mask():
                m = np.zeros((L.groups, L.R, L.block))
                m[:, L.rows, : L.cols] = 1.0
                return m.reshape(-1)

            # part p of a period of m blocks sits in the rows = p (mod m): bring the nearest one to row n
            m = xs[1].layout.period // L.block
            row = ev.rotate_slots(xs[1].cts[0], ((int(node.attrs.get("part", 0)) - L.rows) % m) * L.block)
            return [ev.backend.add(xs[0].cts[0], ev.backend.mul_plain(row, ev.cached((node.name, "mask"), mask)))]
        return [ev.backend.add(xs[0].cts[0], _rotate_rows_pow2(ev, xs[1].cts[0], L.rows, L.block))]


@register_op("attn_rowsum")
class AttnRowSum(OpSpec):
    """Per head and query row ``scale * sum_j A_h[i, j] * mask[i, j]`` (A in score layout), broadcast over the
    head's ``dh`` columns: the denominator of power-softmax. Like ``attn_apply`` with all-ones values, without
    the ct x ct product: the masked scores of each ciphertext are summed in-head (``log2 dh`` rotations), column
    ``h*dh`` is selected and spread back. 2 levels (as ``attn_apply``); clean output."""

    n_inputs = 1

    def infer(self, c, node, lay):
        self.check_arity(node)
        s = lay[0]
        if s.kind != "scores":
            raise LayoutError("attn_rowsum's input must be attention scores (from qk_scores)")
        if "mask" in node.attrs and c.weight(node.attrs["mask"]).shape != (s.rows, s.rows):
            raise LayoutError(f"mask must have shape ({s.rows}, {s.rows})")
        return MatrixLayout(s.rows, s.heads * s.head_dim, s.block, s.slots, clean=True, groups=s.groups)

    def reference(self, c, node, xs, lay):
        S = lay[0]
        M = OPS["attn_apply"]._mask(c, node, S)
        dh = S.head_dim
        out = np.zeros((S.rows, S.heads * dh))
        for h in range(S.heads):
            out[:, h * dh : (h + 1) * dh] = (xs[0][h] * M).sum(-1, keepdims=True)
        return out

    def depth(self, c, node, lay):
        return 2

    def execute(self, ev, node, xs):
        be = ev.backend
        S = xs[0].layout
        M = OPS["attn_apply"]._mask(ev.circuit, node, S)
        D, dh, P = S.block, S.head_dim, S.slots
        G = S.groups if S.spread else 1
        masks = [np.zeros(G * P) for _ in range(S.num_cts)]
        for ct, off, m, s in S._slots_of():
            rows = np.nonzero(S.pair_valid(s))[0]
            for h in range(S.heads):
                masks[ct][off + rows * D + h * dh + m] = M[rows, (rows + s) % S.R]
        acc = None
        for ct, mask in zip(xs[0].cts, masks):
            t = be.mul_plain(ct, mask)
            acc = t if acc is None else be.add(acc, t)
        acc = _rot_sum(ev, acc, 1, dh)  # column h*dh: the sum over the head's dh shift columns
        sel = np.zeros((S.R, D))
        sel[: S.rows, np.arange(S.heads) * dh] = 1.0
        acc = _rot_sum(ev, be.mul_plain(acc, sel.reshape(-1)), -1, dh)
        return [_rot_sum(ev, acc, P, G, whole=True)]  # spread scores: every group holds a part of the shifts


def _reference_weights(c, node, A, dh):
    """The per-key weights of a decode op's reference; without weights (ones) ``A`` must be zero off the heads'
    score columns, which is what the packed op relies on."""
    if "weights" in node.attrs:
        return c.weight(node.attrs["weights"])
    off = np.ones(A.shape[1], dtype=bool)
    off[::dh] = False
    if np.any(A[:, off] != 0):
        raise LayoutError(f"{node.name}: without key weights the scores must be zero off the heads' score columns")
    return np.ones(A.shape[0])


def _decode_out(node, v):
    """A decode attention output: every row holds it, so it is a tiled vector (``tiled`` attr) or, as the
    one-row linears of the matrix path read it, a 1-row matrix with row copies."""
    if node.attrs.get("tiled"):
        return TiledVector(v.cols, v.block, v.ct_slots)
    return v.with_(rows=1, clean=False)


def _scores_only(c, name) -> bool:
    """Is ``name`` zero off the heads' score columns, by construction: qk_decode's output, products with such a
    value (powers, squares), sums of such values, bootstraps of one?"""
    node = next((n for n in c.nodes if n.name == name), None)
    if node is None:
        return False
    if node.op == "qk_decode":
        return True
    if node.op == "mul":
        return any(_scores_only(c, i) for i in node.inputs)
    if node.op in ("add", "sub", "bootstrap"):
        return all(_scores_only(c, i) for i in node.inputs)
    return False


def _decode_weights(c, node, a, what):
    """Check the per-key weights, or their absence: then ``A`` must be zero off the heads' score columns (see
    :func:`_scores_only`) and the weights are all ones."""
    if "weights" in node.attrs:
        if c.weight(node.attrs["weights"]).shape != (a.rows,):
            raise LayoutError(f"{what}: weights must have shape ({a.rows},)")
    elif not _scores_only(c, node.inputs[0]):
        raise LayoutError(f"{what} without weights needs scores that are zero off the heads' columns (qk_decode's "
                          "output, its products and powers); pass key_weights after a polynomial activation")


class _KeyWeighted(OpSpec):
    """A decode op with optional per-key weights (:func:`_key_weighted`): 2 levels, 1 without them."""

    def depth(self, c, node, lay):
        return 2 if "weights" in node.attrs else 1


@register_op("decode_rowsum")
class DecodeRowSum(_KeyWeighted):
    """``scale * sum_j w[j] * A[j, h*dh]`` over the ``n`` cached keys, in the head's ``dh`` columns of every row (``1 x d``
    with row copies, like ``attn_decode``): the power-softmax denominator of a decode step. 2 levels (1 without
    weights, see :func:`_decode_weights`)."""

    n_inputs = 1

    def infer(self, c, node, lay):
        self.check_arity(node)
        a = lay[0]
        _single_ct("decode_rowsum", a)
        h = int(node.attrs["heads"])
        if h <= 0 or a.cols % h or (a.cols // h) & (a.cols // h - 1):
            raise LayoutError(f"decode_rowsum: {a.cols} features do not split into {h} heads of a power-of-two width")
        _decode_weights(c, node, a, "decode_rowsum")
        return _decode_out(node, a)

    def reference(self, c, node, xs, lay):
        ones = np.ones_like(xs[0])  # all-ones values
        return float(node.attrs.get("scale", 1.0)) * OPS["attn_decode"].reference(c, node, [xs[0], ones], lay)

    def execute(self, ev, node, xs):
        be = ev.backend
        L = xs[0].layout
        D, h = L.block, int(node.attrs["heads"])
        dh = L.cols // h
        t = _rot_sum(ev, _key_weighted(ev, node, xs[0].cts[0], L, dh), D, L.R)  # every row: the sum of rows 0..n-1
        sel = np.zeros((L.R, D))
        sel[:, np.arange(h) * dh] = float(node.attrs.get("scale", 1.0))
        return [_rot_sum(ev, be.mul_plain(t, sel.reshape(-1)), -1, dh)]


@register_op("qk_decode")
class QKDecode(OpSpec):
    """Scores of one query row ``q`` (1 x d) against ``n`` cached keys ``K`` (n x d), per head:
    ``S[j, h*dh] = scale * q_h . K_h[j]`` (other entries 0), an ``n x d`` matrix. 2 levels. The query is a clean
    row 0 (copied into the ``n`` rows: ``log2 n`` rotations) or a :class:`~hf_polyhe.he.circuit.packing.TiledVector`."""

    n_inputs = 2

    def infer(self, c, node, lay):
        self.check_arity(node)
        q, k = lay
        _single_ct("qk_decode", k)
        if q.kind == "tiled":  # the query in every row already
            if not k.clean or (q.period, q.cols, q.ct_slots) != (k.block, k.cols, k.ct_slots):
                raise LayoutError(f"qk_decode: keys {k.shape} must be clean; a tiled query {q.to_dict()} needs "
                                  f"period {k.block}, {k.cols} features and {k.ct_slots} slots")
        else:
            _clean_single_row("qk_decode", q, "the query")
            if not k.clean or q.cols != k.cols or q.block != k.block or q.slots != k.slots:
                raise LayoutError(f"qk_decode: keys {k.shape} must be clean and as wide as the query {q.shape}")
        h = int(node.attrs["heads"])
        if h <= 0 or q.cols % h or not ((q.cols // h) & (q.cols // h - 1)) == 0:
            raise LayoutError(f"qk_decode: {q.cols} features do not split into {h} heads of a power-of-two width")
        return k.with_(clean=True)

    def reference(self, c, node, xs, lay):
        q, K = xs
        h = int(node.attrs["heads"])
        dh = q.shape[1] // h
        S = np.zeros(K.shape)
        for i in range(h):
            S[:, i * dh] = float(node.attrs.get("scale", 1.0)) * K[:, i * dh : (i + 1) * dh] @ q[0, i * dh : (i + 1) * dh]
        return S

    def depth(self, c, node, lay):
        return 2

    def execute(self, ev, node, xs):
        be = ev.backend
        K = xs[1].layout
        D, n, h = K.block, K.rows, int(node.attrs["heads"])
        dh = K.cols // h
        q = xs[0].cts[0]
        if xs[0].layout.kind != "tiled":
            q = _rot_sum(ev, q, -D, next_pow2(n))  # copy the query (row 0, zero elsewhere) into rows 0..n-1
        p = _rot_sum(ev, be.mul(q, xs[1].cts[0]), 1, dh)
        mask = np.zeros((K.R, D))
        mask[:n, np.arange(h) * dh] = float(node.attrs.get("scale", 1.0))
        return [be.mul_plain(p, mask.reshape(-1))]


@register_op("attn_decode")
class AttnDecode(_KeyWeighted):
    """``out[0, head h] = sum_j w[j] * A[j, h*dh] * V[j, head h]``: weights ``A`` (n x d, from qk_decode and
    the activation), values ``V`` (n x d, clean), per-key plaintext weights ``w`` (mask / length scaling).
    Output ``1 x d``; the rows are summed over all ``R`` rows of the group, so every row holds the result
    (row copies, not clean: the next linear reads the copy below instead of doubling the row; or, ``tiled``, a
    :class:`~hf_polyhe.he.circuit.packing.TiledVector`). 2 levels; 1 without ``w`` (all ones; ``A`` must then be zero off
    the score columns, see :func:`_decode_weights`)."""

    n_inputs = 2

    def infer(self, c, node, lay):
        self.check_arity(node)
        a, v = lay
        _single_ct("attn_decode", a)
        _single_ct("attn_decode", v)
        if a.shape != v.shape or not v.clean:
            raise LayoutError(f"attn_decode: weights {a.shape} and values {v.shape} must match, values clean")
        h = int(node.attrs["heads"])
        if h <= 0 or v.cols % h:
            raise LayoutError(f"attn_decode: {v.cols} features do not split into {h} heads")
        _decode_weights(c, node, a, "attn_decode")
        return _decode_out(node, v)

    def reference(self, c, node, xs, lay):
        A, V = xs
        h = int(node.attrs["heads"])
        dh = V.shape[1] // h
        w = _reference_weights(c, node, A, dh)
        out = np.zeros((1, V.shape[1]))
        for i in range(h):
            out[0, i * dh : (i + 1) * dh] = (w * A[:, i * dh]) @ V[:, i * dh : (i + 1) * dh]
        return out

    def execute(self, ev, node, xs):
        be = ev.backend
        V = xs[1].layout
        D, h = V.block, int(node.attrs["heads"])
        dh = V.cols // h
        a = _rot_sum(ev, _key_weighted(ev, node, xs[0].cts[0], V, dh), -1, dh)  # each head's weight over its dh columns
        t = be.mul(a, xs[1].cts[0])
        return [_rot_sum(ev, t, D, V.R)]  # every row: the sum of rows 0..n-1 (rows >= n of V are zero)
