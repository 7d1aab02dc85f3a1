"""CKKS parameter sets.

``default()`` is the 128-bit set (``HEStd_128_classic``: OpenFHE refuses a ring dimension that is too small for
the modulus). ``toy()`` is for tests only: ring dimension 2^12 or 2^13 with ``HEStd_NotSet`` -- it gives no
security, has to be asked for by name and emits a :class:`~hf_polyhe.he.errors.ToyParametersWarning` every time.

Depth, slot count and (for the default set) the ring dimension are filled in by the planner
(:func:`hf_polyhe.he.planner.plan`); a ``CKKSParams`` is plain data and JSON-serialisable.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace

from .errors import PlanningError, ToyParametersWarning

SECURITY_LEVELS = ("HEStd_128_classic", "HEStd_192_classic", "HEStd_256_classic", "HEStd_NotSet")
SECRET_KEY_DISTS = ("UNIFORM_TERNARY", "SPARSE_TERNARY")

# Max log2(Q*P) for ternary secrets at 128-bit classic security (HomomorphicEncryption.org standard,
# the table OpenFHE enforces).
MAX_LOGQP_128 = {2**10: 27, 2**11: 54, 2**12: 109, 2**13: 218, 2**14: 438, 2**15: 881, 2**16: 1761, 2**17: 3524}

# Levels one CKKS bootstrap consumes with FLEXIBLEAUTO, level budget [2, 2] (openfhe 1.6.1, = its
# GetBootstrapDepth): measured, EvalBootstrap returns min(input level, 18), so a bootstrapped ciphertext
# carries depth - 18 levels.
BOOTSTRAP_DEPTH = {("UNIFORM_TERNARY", (2, 2)): 18, ("SPARSE_TERNARY", (2, 2)): 18}


@dataclass
class CKKSParams:
    """CKKS parameters (all sizes in bits, levels or slots).

    - ``security``: OpenFHE security level name; ``HEStd_NotSet`` only through :func:`toy`.
    - ``ring_dim``: ring dimension N (0: the smallest N the security level allows for the modulus).
    - ``scale_bits`` / ``first_mod_bits``: bits of the scaling primes / of the first prime.
    - ``depth``: total multiplicative depth of the modulus chain (levels), bootstrapping included.
    - ``slots``: CKKS batch size (power of two <= N/2); sparse packing keeps bootstrapping keys small.
    - ``bootstrap``: whether bootstrapping keys are generated; ``level_budget`` its CoeffsToSlots/SlotsToCoeffs
      levels; ``levels_after_bootstrap``: levels a bootstrapped (or fresh) ciphertext carries.
    - ``secret_key_dist``: ``UNIFORM_TERNARY`` or ``SPARSE_TERNARY``.
    - ``num_large_digits``: HYBRID key-switching digits (0: OpenFHE default).
    """

    name: str = "default"
    security: str = "HEStd_128_classic"
    ring_dim: int = 0
    scale_bits: int = 50
    first_mod_bits: int = 60
    depth: int = 0
    slots: int = 0
    bootstrap: bool = False
    level_budget: tuple = (2, 2)
    levels_after_bootstrap: int = 10
    secret_key_dist: str = "UNIFORM_TERNARY"
    num_large_digits: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.security not in SECURITY_LEVELS:
            raise PlanningError(f"unknown security level {self.security!r}; accepted: {', '.join(SECURITY_LEVELS)}")
        if self.secret_key_dist not in SECRET_KEY_DISTS:
            raise PlanningError(
                f"unknown secret key distribution {self.secret_key_dist!r}; accepted: {', '.join(SECRET_KEY_DISTS)}"
            )
        self.level_budget = tuple(int(v) for v in self.level_budget)
        if self.security == "HEStd_NotSet" and self.name != "toy":
            raise PlanningError("HEStd_NotSet gives no security; ask for it by name with hf_polyhe.he.params.toy()")
        if self.ring_dim and (self.ring_dim & (self.ring_dim - 1)):
            raise PlanningError(f"ring_dim must be a power of two, got {self.ring_dim}")

    @property
    def insecure(self) -> bool:
        return self.security == "HEStd_NotSet"

    @property
    def bootstrap_depth(self) -> int:
        key = (self.secret_key_dist, tuple(self.level_budget))
        if key not in BOOTSTRAP_DEPTH:
            raise PlanningError(f"no measured bootstrap depth for {key}; measured: {sorted(BOOTSTRAP_DEPTH)}")
        return BOOTSTRAP_DEPTH[key]

    @property
    def log_q(self) -> int:
        """log2 of the ciphertext modulus Q (first prime + one scaling prime per level)."""
        return self.first_mod_bits + self.depth * self.scale_bits

    def estimate_log_qp(self) -> int:
        """log2(Q*P) with HYBRID key switching: P is about one digit of Q (ceil(logQ / dnum)) plus slack."""
        dnum = self.num_large_digits or (1 if self.depth < 3 else (2 if self.depth < 4 else 3))
        log_q = self.log_q
        return log_q + int(math.ceil(log_q / dnum)) + 60

    def min_secure_ring_dim(self) -> int:
        """Smallest ring dimension meeting 128-bit security for this modulus (PlanningError if none)."""
        need = self.estimate_log_qp()
        for n, max_bits in sorted(MAX_LOGQP_128.items()):
            if n >= 2 * max(self.slots, 1) and need <= max_bits:
                return n
        raise PlanningError(
            f"log2(QP) ~ {need} bits (depth {self.depth}, {self.scale_bits}-bit scale) exceeds every 128-bit "
            f"secure parameter set (max {MAX_LOGQP_128[2**17]} bits at N=2^17); enable bootstrapping or reduce depth"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level_budget"] = list(self.level_budget)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        d = dict(d)
        if d.get("security") == "HEStd_NotSet":
            warn_toy()
        return cls(**d)

    def with_(self, **kw) -> "CKKSParams":
        return replace(self, **kw)


def warn_toy():
    warnings.warn(
        "hf_polyhe.he: using the TOY CKKS parameter set (HEStd_NotSet, tiny ring) -- NO SECURITY. "
        "For tests only; use params.default() for anything real.",
        ToyParametersWarning,
        stacklevel=3,
    )


def default(**overrides) -> CKKSParams:
    """The 128-bit set (HEStd_128_classic); the planner fills depth, slots and ring dimension."""
    return CKKSParams(name="default", **overrides)


def toy(ring_dim: int = 2**12, **overrides) -> CKKSParams:
    """INSECURE test parameters (HEStd_NotSet, N = 2^12 or 2^13). Warns every time it is called."""
    if ring_dim not in (2**12, 2**13):
        raise PlanningError(f"toy ring_dim must be 2^12 or 2^13, got {ring_dim}")
    warn_toy()
    return CKKSParams(name="toy", security="HEStd_NotSet", ring_dim=ring_dim, **overrides)


PARAMETER_SETS = {"default": default, "toy": toy}


def get(name: str, **overrides) -> CKKSParams:
    """``get("default")`` or ``get("toy")``; the toy set must be named explicitly."""
    if name not in PARAMETER_SETS:
        raise PlanningError(f"unknown parameter set {name!r}; accepted: {', '.join(PARAMETER_SETS)}")
    return PARAMETER_SETS[name](**overrides)
