"""The ``openfhe`` backend: CKKS (RNS, FLEXIBLEAUTO rescaling, HYBRID key switching) through the ``openfhe``
wheel, behind the same primitive interface as the plain backend.

Plaintext vectors are encoded at the level of the ciphertext they meet (a bounded LRU per vector and level:
``HF_POLYHE_PLAINTEXT_CACHE_MIB``, default 512).
Chebyshev stages use ``EvalChebyshevSeries`` (OpenFHE's convention halves ``c0``, so it is doubled here);
bootstraps scale by ``1/bound`` into the range CKKS bootstrapping needs and back.
"""

from __future__ import annotations

import os
import sys
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


class OpenFHEBackend:
    name = "openfhe"

    def __init__(self, cc, slots: int):
        self.ofhe = import_openfhe()
        self.cc = cc
        self.slots = int(slots)
        self.M = 2 * cc.GetRingDimension()
        self._pt = OrderedDict()
        # encoded plaintexts are big (N * towers * 8 bytes: ~10 MB at N = 2^16): keep a bounded LRU of them
        budget = float(os.environ.get("HF_POLYHE_PLAINTEXT_CACHE_MIB", "512")) * 2**20
        self._pt_max = max(16, int(budget // (cc.GetRingDimension() * 8 * 16)))

    def encode(self, vec, level: int = 0):
        key = (id(vec), level)
        hit = self._pt.get(key)
        if hit is not None and hit[0] is vec:
            self._pt.move_to_end(key)
            return hit[1]
        pt = self.cc.MakeCKKSPackedPlaintext(vec, 1, level, None, self.slots)
        self._pt[key] = (vec, pt)
        while len(self._pt) > self._pt_max:
            self._pt.popitem(last=False)
        return pt

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
        if a.GetNoiseScaleDeg() < 2:
            return a
        return self.cc.Compress(a, 1 << 20)  # rescales, keeps every remaining tower

    def rotate(self, a, k):
        return self.cc.EvalRotate(a, int(k))

    def rotate_many(self, a, ks):
        if len(ks) == 1:
            return {ks[0]: self.rotate(a, ks[0])}
        pre = self.cc.EvalFastRotationPrecompute(a)
        return {k: self.cc.EvalFastRotation(a, int(k), self.M, pre) for k in ks}

    def cheb(self, a, series, where="", valid=None):
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
