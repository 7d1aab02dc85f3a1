"""The ``openfhe`` backend: CKKS (RNS, FLEXIBLEAUTO rescaling, HYBRID key switching) through the ``openfhe``
wheel, behind the same primitive interface as the plain backend.

Plaintext vectors are encoded at the level of the ciphertext they meet, and looked up by their content (a
digest) and that level: first among the plaintexts *pinned* when a planned circuit was compiled
(:meth:`OpenFHEBackend.pin`, :func:`hf_polyhe.he.compile.plaintexts.compile_evaluator`: every plaintext encoded once,
when the server builds the evaluator), then in a bounded LRU of what was encoded on the fly
(``HF_POLYHE_PLAINTEXT_CACHE_MIB``, default 512).
Chebyshev stages run the least-depth Paterson-Stockmeyer of :mod:`.chebyshev` (one level less than OpenFHE's
``EvalChebyshevSeries`` at degrees 2^k - 1, and faster: ``benchmarks/chebyshev_ps.py``); ``cheb_openfhe`` keeps
``EvalChebyshevSeries`` (OpenFHE's convention halves ``c0``, so it is doubled there) for comparison. Bootstraps scale by ``1/bound`` into the range CKKS bootstrapping needs and back.
"""

from __future__ import annotations

import hashlib
import os
import sys
import weakref
from collections import OrderedDict

import numpy as np

from ..errors import BackendUnavailable, PlanningError


TINY = 2.0**-40  # below CKKS precision: a plaintext of such values is encoded as nothing


def import_openfhe():
    """``import openfhe`` with a clear error when the wheel cannot work here (it is CPython 3.10 only)."""
    if sys.version_info[:2] != (3, 10):
        raise BackendUnavailable(
            f"the openfhe backend needs CPython 3.10 (the openfhe wheel ships a cp310 extension); this is "
            f"Python {sys.version_info.major}.{sys.version_info.minor}. The plain backend works everywhere."
        )
    try:
        import openfhe  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"the openfhe backend needs the `openfhe` wheel (pip install openfhe): {e}") from e
    return openfhe


def serialize(obj) -> bytes:
    """An OpenFHE object (context, key, ciphertext) in OpenFHE's BINARY form."""
    ofhe = import_openfhe()
    data = ofhe.Serialize(obj, ofhe.BINARY)
    return data if isinstance(data, bytes) else data.encode()


def encrypt_vectors(cc, public_key, vectors, level: int, slots: int) -> list:
    """Encode each slot vector at ``level`` (``slots`` wide) and encrypt it under ``public_key``."""
    return [cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(v, 1, level, None, slots)) for v in vectors]


def adopt(cc, ct):
    """A deserialised ciphertext ``ct`` rebuilt on ``cc``'s own RNS parameters, with the same value, level and
    scale. OpenFHE runs additions and plaintext products on a deserialised ciphertext, and on everything computed
    from it until a rescale, 9-13x more slowly (openfhe 1.6.1, 128-bit, ring 2^16, 28 towers: EvalAdd 89.7 against
    6.7 ms, a plaintext product 93.6 against 10.0 ms; rotations and ciphertext products are not affected;
    ``benchmarks/he_ops.py --deserialized``); W1's first-layer q/k/v linears took ~30 s each against ~10 s after.
    ``Compress`` to more towers than ``ct`` has rebuilds it (3 ms); a ciphertext with a pending rescale (a product's
    output, e.g. an encrypted KV cache read back from disk) is rescaled on the way, the level its next product would
    give it."""
    return cc.Compress(ct, 1 << 20)


def settled(cc, ct):
    """``ct`` with a product's pending rescale done (``Compress`` rescales and keeps every remaining tower); ``ct``
    itself when none is pending."""
    return cc.Compress(ct, 1 << 20) if ct.GetNoiseScaleDeg() >= 2 else ct


def decrypt_vectors(cc, secret_key, cts, slots: int) -> list:
    """Decrypt each ciphertext to its first ``slots`` real slot values (float64)."""
    out = []
    for ct in cts:
        pt = cc.Decrypt(secret_key, ct)
        pt.SetLength(slots)
        out.append(np.asarray(pt.GetRealPackedValue(), dtype=np.float64))
    return out


def build_context(p, bootstrap_setup: bool = True):
    """CryptoContext for a planned :class:`~hf_polyhe.he.params.CKKSParams` (bootstrap precomputation included
    unless ``bootstrap_setup=False``: it is not part of the serialised context)."""
    ofhe = import_openfhe()
    if p.depth <= 0 or p.slots <= 0:
        raise PlanningError("parameters are not planned yet (depth/slots unset): use hf_polyhe.he.plan()")
    cp = ofhe.CCParamsCKKSRNS()
    cp.SetSecurityLevel(getattr(ofhe, p.security))
    if p.insecure:
        cp.SetRingDim(p.ring_dim)
    elif p.ring_dim:
        cp.SetRingDim(p.ring_dim)
    cp.SetScalingModSize(p.scale_bits)
    cp.SetFirstModSize(p.first_mod_bits)
    cp.SetMultiplicativeDepth(p.depth)
    cp.SetBatchSize(p.slots)
    cp.SetScalingTechnique(ofhe.FLEXIBLEAUTO)
    cp.SetKeySwitchTechnique(ofhe.HYBRID)
    cp.SetSecretKeyDist(getattr(ofhe, p.secret_key_dist))
    if p.num_large_digits:
        cp.SetNumLargeDigits(p.num_large_digits)
    try:
        cc = ofhe.GenCryptoContext(cp)
    except Exception as e:  # OpenFHE refuses insecure combinations
        raise PlanningError(f"OpenFHE refused the parameters {p.to_dict()}: {e}") from e
    for f in (ofhe.PKE, ofhe.KEYSWITCH, ofhe.LEVELEDSHE, ofhe.ADVANCEDSHE):
        cc.Enable(f)
    if p.bootstrap:
        cc.Enable(ofhe.FHE)
        if bootstrap_setup:
            setup_bootstrap(cc, p)
    return cc


def setup_bootstrap(cc, p):
    cc.EvalBootstrapSetup(list(p.level_budget), [0, 0], p.slots)


def vector_digest(vec) -> bytes:
    """What identifies a plaintext vector: a 16-byte digest of its float64 values (and so of its length)."""
    return hashlib.blake2b(np.ascontiguousarray(vec, dtype=np.float64).tobytes(), digest_size=16).digest()


class OpenFHEBackend:
    name = "openfhe"

    def __init__(self, cc, slots: int):
        self.ofhe = import_openfhe()
        self.cc = cc
        self.slots = int(slots)
        self.M = 2 * cc.GetRingDimension()
        self._pinned: dict = {}  # (digest, level) -> (Plaintext, bytes): encoded once, when a circuit was compiled
        self.pinned_bytes = 0
        self._pt = OrderedDict()  # (digest, level) -> Plaintext: encoded on the fly, a bounded LRU
        # encoded plaintexts are big (N * towers * 8 bytes: ~10 MB at N = 2^16): keep a bounded LRU of them
        budget = float(os.environ.get("HF_POLYHE_PLAINTEXT_CACHE_MIB", "512")) * 2**20
        self._pt_max = max(16, int(budget // (cc.GetRingDimension() * 8 * 16)))
        self._digests: dict = {}  # id(vec) -> (weak reference, digest): vectors met again are not hashed again
        self.encode_stats = {"pinned": 0, "cached": 0, "encoded": 0}  # plaintext look-ups by where they were found

    def _digest(self, vec) -> bytes:
        hit = self._digests.get(id(vec))
        if hit is not None and hit[0]() is vec:
            return hit[1]
        d = vector_digest(vec)
        if isinstance(vec, np.ndarray):
            key, table = id(vec), self._digests
            table[key] = (weakref.ref(vec, lambda _, k=key: table.pop(k, None)), d)
        return d

    def encode(self, vec, level: int = 0):
        """``vec`` encoded at ``level``: the pinned plaintext, else the LRU's, else encoded now (into the LRU)."""
        key = (self._digest(vec), int(level))
        hit = self._pinned.get(key)
        if hit is not None:
            self.encode_stats["pinned"] += 1
            return hit[0]
        pt = self._pt.get(key)
        if pt is not None:
            self._pt.move_to_end(key)
            self.encode_stats["cached"] += 1
            return pt
        self.encode_stats["encoded"] += 1
        pt = self.cc.MakeCKKSPackedPlaintext(vec, 1, int(level), None, self.slots)
        self._pt[key] = pt
        while len(self._pt) > self._pt_max:
            self._pt.popitem(last=False)
        return pt

    def pin(self, uses, budget_bytes: float) -> tuple:
        """Encode the plaintexts ``uses`` (``(vector, level, bytes)``, the most useful first) once and keep them
        while the pinned ones take at most ``budget_bytes``; the rest are encoded when met (the LRU). Returns
        ``(pinned now, their bytes)``."""
        n = b = 0
        for vec, level, size in uses:
            key = (self._digest(vec), int(level))
            if key in self._pinned:
                continue
            if self.pinned_bytes + size > budget_bytes:
                break
            pt = self._pt.pop(key, None) or self.cc.MakeCKKSPackedPlaintext(vec, 1, int(level), None, self.slots)
            self._pinned[key] = (pt, int(size))
            self.pinned_bytes += int(size)
            n, b = n + 1, b + int(size)
        return n, b

    def is_pinned(self, vec, level: int) -> bool:
        return (self._digest(vec), int(level)) in self._pinned

    def unpin(self) -> None:
        """Forget every pinned plaintext (a server dropping its compiled circuits)."""
        self._pinned.clear()
        self.pinned_bytes = 0

    def add(self, a, b):
        return self.cc.EvalAdd(a, b)

    def sub(self, a, b):
        return self.cc.EvalSub(a, b)

    def mul(self, a, b):
        return self.cc.EvalMult(a, b)

    def add_plain(self, a, v):
        if not np.any(np.abs(np.asarray(v, dtype=np.float64)) > TINY):
            return a  # adding ~0: OpenFHE refuses to encode it ("Scaling factor too small")
        return self.cc.EvalAdd(a, self.encode(v, a.GetLevel()))

    def mul_plain(self, a, v):
        return self.cc.EvalMult(a, self.encode(v, a.GetLevel()))

    def mul_scalar(self, a, c):
        return self.cc.EvalMult(a, float(c))

    def rescale(self, a):
        """Do a product's pending rescale now (FLEXIBLEAUTO would redo it inside every multiplication that reads
        ``a``: 50-80 ms each at N = 2^16 and ~29 towers, against ~10 ms for the product itself)."""
        return settled(self.cc, a)

    def rotate(self, a, k):
        return self.cc.EvalRotate(a, int(k))

    def rotate_many(self, a, ks):
        if len(ks) == 1:
            return {ks[0]: self.rotate(a, ks[0])}
        pre = self.cc.EvalFastRotationPrecompute(a)
        return {k: self.cc.EvalFastRotation(a, int(k), self.M, pre) for k in ks}

    def rotate_sum(self, terms):
        """``sum rot(ct, k)`` over ``terms`` (an iterable of ``(ct, k)``, consumed one at a time); None if empty.
        The rotated ciphertexts stay in the extended basis Q*P (a hoisted key switch without its ModDown:
        ``EvalFastRotationExt``) and are summed there, so the sum pays one ``KeySwitchDown`` instead of one per
        term -- the giant steps of OpenFHE's own linear transforms. Consecutive terms of the same ciphertext
        share one precomputation (hoisted). Terms at another level than the first go the plain way (an addition in
        Q*P needs equal towers and scale degree)."""
        acc = ext = state = None
        last = None  # (ciphertext, its precomputation): consecutive terms of one ciphertext share it (hoisted)
        for ct, k in terms:
            if k == 0 or (state is not None and (ct.GetLevel(), ct.GetNoiseScaleDeg()) != state):
                r = ct if k == 0 else self.rotate(ct, k)
                acc = r if acc is None else self.cc.EvalAdd(acc, r)
                continue
            if last is None or last[0] is not ct:
                last = (ct, self.cc.EvalFastRotationPrecompute(ct))
            e = self.cc.EvalFastRotationExt(ct, int(k), last[1], True)
            if ext is None:
                ext, state = e, (ct.GetLevel(), ct.GetNoiseScaleDeg())
            else:
                self.cc.EvalAddInPlace(ext, e)
        if ext is not None:
            ext = self.cc.KeySwitchDown(ext)
            acc = ext if acc is None else self.cc.EvalAdd(acc, ext)
        return acc

    def cheb(self, a, series, where="", valid=None):
        """The series by :mod:`.chebyshev`'s least-depth Paterson-Stockmeyer: ``series.depth`` levels
        (``ceil(log2(ps_degree + 1))``, one more for the affine map onto [-1, 1] when the interval is another)."""
        if series.ps_degree == 0:
            return self.cc.EvalAdd(self.cc.EvalMult(a, 0.0), float(series.coeffs[0]))
        return eval_chebyshev_ps(self.cc, a, series)

    cheb_ps = cheb

    def cheb_openfhe(self, a, series):
        """The series by OpenFHE's ``EvalChebyshevSeries`` (``approx.openfhe_chebyshev_depth`` levels)."""
        c = [float(v) for v in series.coeffs]
        lo, hi = series.interval
        if len(c) == 1:
            return self.cc.EvalAdd(self.cc.EvalMult(a, 0.0), c[0])
        c[0] *= 2.0  # OpenFHE evaluates sum c_k T_k - c_0 / 2
        return self.cc.EvalChebyshevSeries(a, c, lo, hi)

    def bootstrap(self, a, bound, where=""):
        if bound != 1.0:
            a = self.cc.EvalMult(a, 1.0 / bound)
        b = self.cc.EvalBootstrap(a)
        if bound != 1.0:
            b = self.cc.EvalMult(b, float(bound))
        return b


def eval_chebyshev_ps(cc, a, series):
    """``series`` (a :class:`~hf_polyhe.approx.ChebyshevSeries`) on ciphertext ``a`` by :mod:`.chebyshev`'s
    least-depth Paterson-Stockmeyer: ``series.depth`` levels."""
    from .chebyshev import Arithmetic, evaluate_ps

    class CKKS(Arithmetic):
        def mul(self, x, y):
            return cc.EvalSquare(x) if x is y else cc.EvalMult(x, y)

        def add(self, x, y):
            return cc.EvalAdd(x, y)

        def sub(self, x, y):
            return cc.EvalSub(x, y)

        def scale(self, x, c):
            return cc.EvalMult(x, float(c))

        def add_const(self, x, c):
            return cc.EvalAdd(x, float(c))

        def settle(self, x):
            # FLEXIBLEAUTO rescales a pending product inside every product that reads it (a basis element is
            # read up to 4 times): once here instead (degree 15 on [-8, 8], 128-bit: 0.68 -> 0.53 s)
            return settled(cc, x)

        def align(self, x, y):
            # OpenFHE adjusts the shallower operand of a sum (a scalar product and a rescale, ~12 ms at ring 2^16):
            # adding an exact zero at y's level does it once for every later use of x
            if x.GetLevel() >= y.GetLevel():
                return x
            return cc.EvalAdd(x, cc.EvalSub(y, y))

    lo, hi = series.interval
    t = a
    if not series.normalized:
        t = cc.EvalAdd(cc.EvalMult(a, 2.0 / (hi - lo)), -(lo + hi) / (hi - lo))
    return evaluate_ps(CKKS(), t, series.coeffs)
