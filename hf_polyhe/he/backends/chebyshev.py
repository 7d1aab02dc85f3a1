"""A Chebyshev series in the least depth: Paterson-Stockmeyer whose critical path carries no scalar product.

``p(t) = sum_i c_i T_i(t)`` of degree ``d`` on ``[-1, 1]`` needs ``L = ceil(log2(d + 1))`` levels at least: ``T_{2^j}``
takes ``j`` products. Paterson-Stockmeyer with baby steps ``T_1 .. T_{k-1}`` (``k = 2^a``) and giant steps
``G_j = T_{k 2^j}`` (``j < m``, ``a + m = L``) splits ``p = r + G_{m-1} q`` (Chebyshev division:
``T_{K+i} = 2 T_K T_i - T_{K-i}``) down to leaves of degree ``< k``. A leaf ``sum c_i T_i`` costs ``a`` levels for the
babies plus one for the scalar products, so the chain ``leaf * G_0 * G_1 ...`` ends at ``L + 1`` -- what OpenFHE's
``EvalChebyshevSeries`` spends when ``d + 1`` is (close to) a power of two (degree 15: 5 levels on ``[-1, 1]``).
Only that one chain is tight: every remainder ``r`` is added, not multiplied, and has a level to spare. So its
leaf is evaluated *absorbed*: split again by ``T_{k/2}``, ``T_{k/4}``, ... (``a - 1`` more products), every scalar
product lands on a baby of lower depth, and the leaf costs ``a`` levels. Total: ``L`` levels (one more for the
affine map onto ``[-1, 1]`` on another interval). Coefficients below ``2^-45`` (CKKS precision) are left out, so
odd or even functions skip half the leaves' products.

Under CKKS (FLEXIBLEAUTO) two things cost time without changing levels: a product's rescale is deferred and redone
inside every product that reads it, and a sum of operands at different levels adjusts the shallower one each time.
So every basis element is settled once (:meth:`Arithmetic.settle`), and a low basis element that several scalar
products mix with a deeper one is brought to that level once (:meth:`Arithmetic.align`): degree 15 on [-8, 8] at
128-bit, ring 2^16, 0.68 -> 0.49 s.

:func:`ps_schedule` picks ``a`` with the fewest products at depth ``L`` (running each on :class:`DepthArithmetic`);
:func:`evaluate_ps` runs it on any :class:`Arithmetic`: numpy arrays (:class:`NumpyArithmetic`, the tests) or
OpenFHE ciphertexts (``OpenFHEBackend.cheb_ps``). ``benchmarks/chebyshev_ps.py`` measures it against
``EvalChebyshevSeries``. The runtime's ``poly`` op evaluates every series this way (``OpenFHEBackend.cheb``), and its
depth is what the planner and the approximation registry count (:func:`hf_polyhe.approx.chebyshev_depth` of
:attr:`~hf_polyhe.approx.ChebyshevSeries.ps_degree`). Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...approx.base import CKKS_TINY as TINY  # a coefficient below CKKS precision is left out


@dataclass(frozen=True)
class PSSchedule:
    """How :func:`evaluate_ps` evaluates a series: its degree, levels (from ``t`` to a settled output), baby and
    giant steps, and ciphertext products."""

    degree: int
    depth: int  # levels from t (on [-1, 1]) to a settled output
    baby: int  # k = 2^a: baby steps T_1 .. T_{k-1}
    giants: int  # m: giant steps T_k, T_2k, ..., T_{k 2^(m-1)}
    products: int  # ciphertext x ciphertext products


def _split(c: np.ndarray, K: int):
    """``sum c_i T_i`` (degree < 2K) = ``r + T_K * q`` with ``r``, ``q`` of degree < K."""
    c = np.concatenate([c, np.zeros(max(0, 2 * K - len(c)))])
    q = np.zeros(K)
    r = c[:K].copy()
    q[0] = c[K]
    for i in range(1, K):  # c_{K+i} T_{K+i} = 2 c_{K+i} T_K T_i - c_{K+i} T_{K-i}
        q[i] = 2.0 * c[K + i]
        r[K - i] -= c[K + i]
    return r, q


def _nonzero(c) -> bool:
    return bool(np.any(np.abs(np.asarray(c)[1:]) > TINY)) or abs(float(np.asarray(c)[0])) > TINY


class Arithmetic:
    """What :func:`evaluate_ps` needs: ``mul`` (ct x ct, relinearised), ``add``, ``sub``, ``scale`` (by a float,
    one level), ``add_const`` (a float, free), ``double`` (``x + x``, free)."""

    def mul(self, a, b):
        raise NotImplementedError

    def add(self, a, b):
        raise NotImplementedError

    def sub(self, a, b):
        raise NotImplementedError

    def scale(self, a, c: float):
        raise NotImplementedError

    def add_const(self, a, c: float):
        raise NotImplementedError

    def double(self, a):
        return self.add(a, a)

    def settle(self, a):
        """``a`` with a pending rescale done (no level change in this module's count): a value read several
        times is settled once, not inside every product that reads it. Default: ``a``."""
        return a

    def align(self, a, b):
        """``a`` (settled) brought down to the level of ``b`` (settled, as deep or deeper), so that the scalar
        products and sums that mix them do not each redo that adjustment. Default: ``a``."""
        return a


class NumpyArithmetic(Arithmetic):
    """Float64 arrays, counting the products (tests)."""

    def __init__(self):
        self.products = 0

    def mul(self, a, b):
        self.products += 1
        return a * b

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def scale(self, a, c):
        return a * c

    def add_const(self, a, c):
        return a + c


class DepthArithmetic(Arithmetic):
    """Symbolic: a value is its depth in levels (FLEXIBLEAUTO: a sum sits at its deeper operand's level)."""

    def __init__(self):
        self.products = 0

    def mul(self, a, b):
        self.products += 1
        return max(a, b) + 1

    def add(self, a, b):
        return max(a, b)

    sub = add

    def scale(self, a, c):
        return a + 1

    def add_const(self, a, c):
        return a

    def align(self, a, b):
        return max(a, b)


def _run(ar: Arithmetic, t, c: np.ndarray, a: int, m: int):
    """Evaluate ``sum c_i T_i(t)`` with baby size ``2^a`` and ``m`` giants (see the module docstring)."""
    T = {1: ar.settle(t)}
    aligned = {}  # (i, j) -> T_i at the level of T_j (j > i): one adjustment for every use

    def at_level_of(i, j, like=None):
        target = cheb(j) if like is None else like  # first: computing T_j may align T_i itself
        if (i, j) not in aligned:
            aligned[(i, j)] = ar.align(cheb(i), target)
        return aligned[(i, j)]

    def cheb(i):
        """T_i = 2 T_lo T_hi - T_{hi - lo} (lo = i // 2): depth ceil(log2 i)."""
        if i not in T:
            lo, hi = i // 2, i - i // 2
            prod = ar.double(ar.settle(ar.mul(cheb(lo), cheb(hi))))
            T[i] = ar.add_const(prod, -1.0) if lo == hi else ar.sub(prod, at_level_of(hi - lo, i, like=prod))
        return T[i]

    # a value is (ciphertext or None, constant): constants are added once, at the end of a sum (free)
    def total(parts):
        ct, const = None, 0.0
        for x, k in parts:
            const += k
            if x is not None:
                ct = x if ct is None else ar.add(ct, x)
        return ct, const

    def combo(c):
        """c_0 + sum c_i T_i: one level of scalar products, on the T_i brought to the deepest one's level."""
        used = [i for i in range(1, len(c)) if abs(c[i]) > TINY]
        top = max(used, key=lambda i: (i - 1).bit_length(), default=0)  # T_i sits ceil(log2 i) levels down
        return total([(ar.scale(at_level_of(i, top) if i != top else cheb(i), float(c[i])), 0.0) for i in used]
                     + [(None, float(c[0]))])

    def times(K, v):
        """T_K * v: a product (or a scalar product when v is a constant)."""
        x, k = v
        if x is None:
            return (ar.scale(cheb(K), k), 0.0) if abs(k) > TINY else (None, 0.0)
        y = ar.mul(cheb(K), x)
        return (ar.add(y, ar.scale(cheb(K), k)), 0.0) if abs(k) > TINY else (y, 0.0)

    def absorbed(c, b):
        """Degree < 2^b in b levels: c = r + T_{2^(b-1)} q, with q absorbed one level lower."""
        if b <= 1:
            return combo(c[:2])
        r, q = _split(c, 1 << (b - 1))
        hi = absorbed(q, b - 1) if _nonzero(q) else (None, 0.0)
        return total([combo(r), times(1 << (b - 1), hi)])

    k = 1 << a

    def node(c, j, tight):
        if j == 0:
            return absorbed(c, a) if tight else combo(c)
        K = k << (j - 1)
        r, q = _split(c, K)
        hi = node(q, j - 1, tight) if _nonzero(q) else (None, 0.0)
        return total([node(r, j - 1, False), times(K, hi)])

    x, const = node(c, m, True)
    if x is None:
        x = ar.scale(t, 0.0)
    return ar.add_const(x, const) if abs(const) > TINY else x


def _trim(coeffs) -> np.ndarray:
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    nz = np.flatnonzero(np.abs(c) > TINY)
    return c[: int(nz[-1]) + 1] if nz.size else c[:1]


def ps_schedule(coeffs) -> PSSchedule:
    """The schedule of least depth (``ceil(log2(degree + 1))``) with the fewest products for ``coeffs`` (Chebyshev
    coefficients on ``[-1, 1]``), found by running each baby size on :class:`DepthArithmetic`."""
    c = _trim(coeffs)
    d = len(c) - 1
    L = math.ceil(math.log2(d + 1)) if d >= 1 else 0
    best = None
    for a in range(1, max(L, 1) + 1):
        ar = DepthArithmetic()
        depth = _run(ar, 0, c, a, max(L - a, 0))
        key = (depth, ar.products)
        if best is None or key < best[0]:
            best = (key, PSSchedule(d, depth, 1 << a, max(L - a, 0), ar.products))
    return best[1]


def evaluate_ps(ar: Arithmetic, t, coeffs, schedule: PSSchedule | None = None):
    """``sum_i coeffs[i] T_i(t)`` for ``t`` on ``[-1, 1]`` (already mapped), by :func:`ps_schedule`."""
    c = _trim(coeffs)
    s = schedule or ps_schedule(c)
    return _run(ar, t, c, int(math.log2(s.baby)), s.giants)
