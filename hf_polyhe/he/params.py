"""CKKS parameter sets.

``default()`` is the 128-bit set (``HEStd_128_classic``: OpenFHE refuses a ring dimension that is too small for
the modulus). ``toy()`` is for tests only: ring dimension 2^12 or 2^13 with ``HEStd_NotSet`` -- it gives no
security, has to be asked for by name and emits a :class:`~hf_polyhe.he.errors.ToyParametersWarning` wherever it is
made, loaded or keyed (Python's default filter shows it once per process; ``pytest.warns`` sees every one).

Depth, slot count and (for the default set) the ring dimension are filled in by the planner
(:func:`hf_polyhe.he.compile.planner.plan`); a ``CKKSParams`` is plain data and JSON-serialisable.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace

from .errors import PlanningError, ToyParametersWarning

SECURITY_LEVELS = ("HEStd_128_classic", "HEStd_192_classic", "HEStd_256_classic", "HEStd_NotSet")
SECRET_KEY_DISTS = ("UNIFORM_TERNARY", "SPARSE_TERNARY")

# Max log2(Q*P) for ternary secrets at 128-bit classic security (HomomorphicEncryption.org standard,
# the table OpenFHE enforces).
# estimate_log_qp is off from the modulus OpenFHE builds by up to ~35 bits either way (its special primes P are
# whole 60-bit primes covering a digit; measured with openfhe 1.6.1: N = 2^16, depth 27 at a 45-bit scale estimated
# at 1760 bits and refused (limit 1761); N = 2^15, depth 9 at 59 bits estimated at 848 and refused (limit 881);
# depth 14 at 40 bits estimated at 887 and accepted), so a ring is chosen only with this many bits to spare
LOGQP_SAFETY_BITS = 40
MAX_LOGQP_128 = {2**10: 27, 2**11: 54, 2**12: 109, 2**13: 218, 2**14: 438, 2**15: 881, 2**16: 1761, 2**17: 3524}

# Levels one CKKS bootstrap consumes with FLEXIBLEAUTO, level budget [2, 2] (openfhe 1.6.1, = its
# GetBootstrapDepth): measured, EvalBootstrap returns min(input level, 18), so a bootstrapped ciphertext
# carries depth - 18 levels.
# Level budgets [3, 3] and [4, 4] measured with benchmarks/he_ops.py --bootstrap-sweep (128-bit, N = 2^16, 6 digits):
# a bootstrap leaves depth - 19 / depth - 21 levels, so 20 / 22 in this table's convention (one spare level).
BOOTSTRAP_DEPTH = {("UNIFORM_TERNARY", (2, 2)): 18, ("SPARSE_TERNARY", (2, 2)): 18,
                   ("UNIFORM_TERNARY", (3, 3)): 20, ("UNIFORM_TERNARY", (4, 4)): 22}


def bootstrap_depth_for(secret_key_dist: str, level_budget) -> int:
    """Levels one bootstrap consumes: :data:`BOOTSTRAP_DEPTH` where measured, else OpenFHE's ``GetBootstrapDepth``
    (its approximate modular reduction's depth, 14 for both secrets as measured at [2, 2], plus one level per
    CoeffsToSlots and per SlotsToCoeffs stage: ``budget[0] + budget[1]``)."""
    lb = tuple(int(v) for v in level_budget)
    if len(lb) != 2 or min(lb) < 1:
        raise PlanningError(f"a level budget is two positive stage counts, got {list(level_budget)}")
    key = (secret_key_dist, lb)
    if key in BOOTSTRAP_DEPTH:
        return BOOTSTRAP_DEPTH[key]
    ref = BOOTSTRAP_DEPTH.get((secret_key_dist, (2, 2)))
    if ref is None:
        raise PlanningError(f"no measured bootstrap depth for {secret_key_dist}; measured: {sorted(BOOTSTRAP_DEPTH)}")
    return ref - 4 + sum(lb)

# Peak memory (RSS) of context + bootstrapping keys + one bootstrap at 128-bit. Measured with
# benchmarks/he_ops.py --bootstrap-only (openfhe 1.6.1, 59-bit scale, depth 24 -- which 128-bit security puts
# on N = 2^17 --, level budget [2, 2]): 512 slots passed 18.5 GB during key generation (stopped before the
# machine ran out), 4096 slots were OOM-killed at 18.6 GB RSS. So 18.5 GB is a LOWER bound; DESIGN section 5's
# 12.9 GB cannot be that 128-bit configuration. Other configurations are scaled from it (see
# :meth:`CKKSParams.estimate_bootstrap_memory_gib`); a measured ``bootstrap_memory`` entry in the planner's
# cost table replaces it.
BOOTSTRAP_MEMORY_ANCHOR = {"ring_dim": 2**17, "depth": 24, "slots": 512, "peak_gib": 18.5}

DEFAULT_MAX_MEMORY_GIB = 24.0  # DESIGN section 5: this 24 GB machine; bootstrapping 32768 slots ran out of it


def default_max_memory_gib() -> float:
    """Memory a bootstrapped plan may need: ``$HF_POLYHE_MAX_MEMORY_GIB``, else :data:`DEFAULT_MAX_MEMORY_GIB`
    (a fixed default, so that a plan does not depend on the machine that computes it)."""
    env = os.environ.get("HF_POLYHE_MAX_MEMORY_GIB")
    try:
        return float(env) if env else DEFAULT_MAX_MEMORY_GIB
    except ValueError as e:
        raise PlanningError(f"HF_POLYHE_MAX_MEMORY_GIB must be a number of GiB, got {env!r}") from e


def key_switch_digits(num_large_digits: int, depth: int) -> int:
    """HYBRID key-switching digits OpenFHE uses: ``num_large_digits``, else its default (openfhe 1.6.1
    ``ComputeNumLargeDigits``: 3 from depth 4 on, 2 for depth 1 to 3, 1 for depth 0)."""
    return int(num_large_digits) or (3 if depth > 3 else 2 if depth > 0 else 1)


def _usable(rows, finished: bool = False) -> list:
    """Measured rows with a peak: finished runs, and (unless ``finished``) runs stopped over their memory cap."""
    return [r for r in rows or () if r.get("peak_gib") and (r.get("bootstrap_min_s") or
                                                            (r.get("over_cap") and not finished))]


def _config(r: dict) -> tuple:
    """A measured row's (ring, level budget, key-switching digits)."""
    return (r["ring_dim"], tuple(r.get("level_budget", (2, 2))), key_switch_digits(r.get("digits", 0), r["depth"]))


def nearest_bootstrap_measurement(rows, p: CKKSParams, finished: bool = False):
    """Of measured bootstrapping configurations (``bootstrap_measured`` rows of the planner's cost table, see
    ``benchmarks/bootstrap_sweep.py``), the one nearest ``p``: the same ring, level budget and digits first, then
    the closest slot count and depth. Rows stopped over the memory cap (``over_cap``) count unless ``finished``
    (their peak is a lower bound; they have no bootstrap time); None if there are none."""
    rows = _usable(rows, finished)
    if not rows:
        return None
    mine = (p.ring_dim or 2**16, tuple(p.level_budget), key_switch_digits(p.num_large_digits, p.depth))

    def distance(r):
        return (*(a != b for a, b in zip(_config(r), mine)), abs(math.log2(max(r["slots"], 1) / max(p.slots, 1))),
                abs(r["depth"] - p.depth), bool(r.get("over_cap")))

    return min(rows, key=distance)


def _towers_qp(depth: int, digits: int) -> int:
    """RNS towers of Q*P: ``depth + 1`` for Q, one digit's worth for P."""
    return depth + 1 + int(math.ceil((depth + 1) / digits))


def bootstrap_memory_from_measurements(rows, p: CKKSParams):
    """Peak bootstrapping memory (GiB) of ``p`` from measured configurations: those of the nearest one's ring,
    level budget and digits (:func:`nearest_bootstrap_measurement`), each scaled to ``p``'s ring and Q*P towers,
    interpolated in log2(slots) between the nearest measured slot counts below and above (measured: 256 -> 4096
    slots adds 6 GiB at N = 2^16, far less than the key count alone suggests); beyond them, the nearest one
    scaled by key count. None without measurements."""
    best = nearest_bootstrap_measurement(rows, p)
    if best is None:
        return None
    n, dn = p.ring_dim or 2**16, key_switch_digits(p.num_large_digits, p.depth)
    group = [r for r in _usable(rows) if _config(r) == _config(best)]

    def scaled(r):
        return float(r["peak_gib"]) * (n / r["ring_dim"]) * _towers_qp(p.depth, dn) / _towers_qp(
            r["depth"], key_switch_digits(r.get("digits", 0), r["depth"]))

    s = math.log2(max(p.slots, 1))

    def pick(rs):  # per slot count, the row of the nearest depth
        return min(rs, key=lambda r: (abs(math.log2(r["slots"]) - s), abs(r["depth"] - p.depth))) if rs else None

    def by_keys(r):  # r scaled to p's slots by key count as well
        units = [_bootstrap_key_units(n, p.depth, max(x, 1), p.level_budget, dn) for x in (p.slots, r["slots"])]
        return scaled(r) * units[0] / units[1]

    lo = pick([r for r in group if math.log2(r["slots"]) <= s])
    hi = pick([r for r in group if math.log2(r["slots"]) >= s])
    if lo is not None and hi is not None:
        a, b = math.log2(lo["slots"]), math.log2(hi["slots"])
        est = scaled(lo) if a == b else scaled(lo) + (scaled(hi) - scaled(lo)) * (s - a) / (b - a)
    else:
        est = by_keys(lo or hi)
    if all(r.get("over_cap") for r in (lo, hi) if r is not None):
        # only lower bounds here (runs stopped over a memory cap): not below what a finished run elsewhere implies
        done = nearest_bootstrap_measurement(rows, p, finished=True)
        if done is not None:
            est = max(est, by_keys(done))
    return est


def _bootstrap_key_units(ring_dim: int, depth: int, slots: int, level_budget=(2, 2), dnum: int = 3) -> float:
    """Relative size of bootstrapping keys: N * (towers of Q + towers of P) * (#CoeffsToSlots/SlotsToCoeffs keys)."""
    towers_q = depth + 1
    towers_p = int(math.ceil(towers_q / dnum))
    per = int(math.ceil(math.log2(max(slots, 2)) / max(level_budget[0], 1)))
    n_keys = 2 * sum(level_budget) * (2**per // 2 + 2) + 1
    return float(ring_dim) * (towers_q + towers_p) * n_keys


@dataclass
class CKKSParams:
    """CKKS parameters (all sizes in bits, levels or slots).

    - ``security``: OpenFHE security level name; ``HEStd_NotSet`` only through :func:`toy`.
    - ``ring_dim``: ring dimension N (0: the smallest N the security level allows for the modulus).
    - ``scale_bits`` / ``first_mod_bits``: bits of the scaling primes / of the first prime.
    - ``min_scale_bits``: the planner may lower a leveled set's scale down to this many bits when that allows a
      smaller secure ring (every op then costs about half); set it to ``scale_bits`` to keep the scale fixed.
    - ``depth``: total multiplicative depth of the modulus chain (levels), bootstrapping included.
    - ``slots``: CKKS batch size (power of two <= N/2); sparse packing keeps bootstrapping keys small.
    - ``bootstrap``: whether bootstrapping keys are generated; ``level_budget`` its CoeffsToSlots/SlotsToCoeffs
      levels; ``levels_after_bootstrap``: levels a bootstrapped (or fresh) ciphertext carries.
    - ``auto_level_budget``: the planner may raise the default [2, 2] level budget to [3, 3] or [4, 4] (fewer
      bootstrapping keys, 2 / 4 more levels per bootstrap) when [2, 2] needs more memory than its limit
      (``planner.choose_level_budget``); False keeps ``level_budget`` as given.
    - ``secret_key_dist``: ``UNIFORM_TERNARY`` or ``SPARSE_TERNARY``.
    - ``num_large_digits``: HYBRID key-switching digits (0: OpenFHE's default, 3; for a bootstrapped export
      ``plan_for_export`` takes 6 instead when that puts it on a smaller ring and is predicted faster: more digits
      hold more levels after a bootstrap on ring 2^16).
    """

    name: str = "default"
    security: str = "HEStd_128_classic"
    ring_dim: int = 0
    scale_bits: int = 50
    first_mod_bits: int = 60
    min_scale_bits: int = 40
    depth: int = 0
    slots: int = 0
    bootstrap: bool = False
    level_budget: tuple = (2, 2)
    levels_after_bootstrap: int = 10
    secret_key_dist: str = "UNIFORM_TERNARY"
    num_large_digits: int = 0
    extra: dict = field(default_factory=dict)
    auto_level_budget: bool = True

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
        return bootstrap_depth_for(self.secret_key_dist, self.level_budget)

    @property
    def log_q(self) -> int:
        """log2 of the ciphertext modulus Q (first prime + one scaling prime per level)."""
        return self.first_mod_bits + self.depth * self.scale_bits

    def estimate_log_qp(self) -> int:
        """log2(Q*P) with HYBRID key switching: P is about one digit of Q (ceil(logQ / dnum)) plus slack."""
        dnum = key_switch_digits(self.num_large_digits, self.depth)
        log_q = self.log_q
        return log_q + int(math.ceil(log_q / dnum)) + 60

    def min_secure_ring_dim(self) -> int:
        """Smallest ring dimension meeting 128-bit security for this modulus (PlanningError if none), with
        :data:`LOGQP_SAFETY_BITS` to spare: the estimate can be a few bits below the modulus OpenFHE builds."""
        need = self.estimate_log_qp()
        for n, max_bits in sorted(MAX_LOGQP_128.items()):
            if n >= 2 * max(self.slots, 1) and need + LOGQP_SAFETY_BITS <= max_bits:
                return n
        top = max(MAX_LOGQP_128)
        if 2 * max(self.slots, 1) > top:
            raise PlanningError(
                f"{self.slots} slots need a ring of {2 * self.slots}, larger than the largest 128-bit parameter set "
                f"this planner knows (N=2^{top.bit_length() - 1}, {top // 2} slots); use shorter inputs or a smaller "
                "hidden size")
        raise PlanningError(
            f"log2(QP) ~ {need} bits (depth {self.depth}, {self.scale_bits}-bit scale) exceeds every 128-bit "
            f"secure parameter set (max {MAX_LOGQP_128[2**17]} bits at N=2^17); enable bootstrapping or reduce depth"
        )

    def secure_ring_dim(self) -> int:
        """The ring dimension this set will use: ``ring_dim`` if fixed (PlanningError if not secure), else the
        smallest secure one. Insecure (toy) sets return their fixed ``ring_dim``."""
        if self.insecure:
            return self.ring_dim
        n_min = self.min_secure_ring_dim()
        if self.ring_dim and self.ring_dim < n_min:
            raise PlanningError(f"ring dimension {self.ring_dim} is not 128-bit secure for log2(QP) ~ "
                                f"{self.estimate_log_qp()}; need >= {n_min}")
        return max(self.ring_dim, n_min)

    def max_levels_after_bootstrap(self, limit: int = 64) -> int:
        """Largest ``levels_after_bootstrap`` for which a secure ring exists (within ``ring_dim`` when fixed):
        total depth ``levels + bootstrap_depth`` at this scale must fit log2(QP) <= 3524 bits (N = 2^17).
        0 if even one level does not fit; ``limit`` for insecure sets."""
        if self.insecure:
            return limit
        best = 0
        for lb in range(1, limit + 1):
            q = self.with_(bootstrap=True, levels_after_bootstrap=lb, depth=lb + self.bootstrap_depth)
            try:
                q.secure_ring_dim()
            except PlanningError:
                break
            best = lb
        return best

    def estimate_bootstrap_memory_gib(self, anchor=None) -> float:
        """Peak memory (GiB) of context, bootstrapping keys and a bootstrap for this (planned) set. ``anchor``: one
        measurement (a dict with ``ring_dim``, ``depth``, ``slots``, ``peak_gib``, maybe ``level_budget`` /
        ``digits``), scaled by ring dimension, towers and key count; or a list of them (``benchmarks/he_ops.py
        --bootstrap-sweep``, :func:`bootstrap_memory_from_measurements`); default :data:`BOOTSTRAP_MEMORY_ANCHOR`."""
        if isinstance(anchor, (list, tuple)):
            got = bootstrap_memory_from_measurements(anchor, self)
            if got is not None:
                return got
            anchor = None
        a = anchor or BOOTSTRAP_MEMORY_ANCHOR
        n = self.ring_dim or 2**16
        ref = _bootstrap_key_units(a["ring_dim"], a["depth"], a["slots"], a.get("level_budget", (2, 2)),
                                   key_switch_digits(a.get("digits", 0), a["depth"]))
        mine = _bootstrap_key_units(n, self.depth, max(self.slots, 1), self.level_budget,
                                    key_switch_digits(self.num_large_digits, self.depth))
        return float(a["peak_gib"]) * mine / ref

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level_budget"] = list(self.level_budget)
        if d["auto_level_budget"]:  # the default: left out, so plans stay readable by releases without the field
            del d["auto_level_budget"]
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
    # one warning location for every caller: the default filter then prints it once per process, not once per
    # caller (planning, loading a plan and key generation each used to add one)
    warnings.warn(
        "hf_polyhe.he: using the TOY CKKS parameter set (HEStd_NotSet, tiny ring) -- NO SECURITY. "
        "For tests only; use params.default() for anything real.",
        ToyParametersWarning,
        stacklevel=1,
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


def resolve(he_params) -> CKKSParams:
    """``"default"`` (128-bit; also ``None``, ``"128"``, ``128``), ``"toy"`` (INSECURE, warns) or a
    :class:`CKKSParams` as it is."""
    if isinstance(he_params, CKKSParams):
        return he_params
    if he_params in (None, "default", "128", 128):
        return default()
    if he_params == "toy":
        return toy()
    raise ValueError(f"he_params must be 'default' (128-bit), 'toy' (insecure, tests only) or a CKKSParams, "
                     f"got {he_params!r}")
