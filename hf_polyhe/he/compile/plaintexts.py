"""Encode once: the server's compile step for a planned circuit.

A circuit's plaintexts (linear diagonals, biases, masks) are the same for every request, and encoding one costs
more than the product it feeds (DESIGN section 5: encode 46 ms, pt x ct 17 ms at N = 2^16, 25 towers). So when a
server builds the evaluator of a planned circuit, :func:`compile_evaluator` traces it once on the planner's
symbolic backend (no ciphertext), which meets every plaintext at the OpenFHE level its ciphertext will have, and
the OpenFHE backend encodes each distinct (vector, level) once and keeps it (:meth:`OpenFHEBackend.pin`) while
they fit the memory budget (:func:`plaintext_budget_bytes`: half the available memory, at most 8 GiB, less
what a bootstrap will still need). Runs then look plaintexts up by content and level;
what is not pinned (over the budget, or a level the trace did not foresee) is encoded when met, into the
backend's bounded LRU, as before. The planner reports the bytes and encoding seconds (``Plan.plaintexts``).
"""

from __future__ import annotations

import os

from ..circuit.evaluator import Evaluator
from ..errors import PlanningError
from .planner import plaintext_bytes, trace

DEFAULT_BUDGET_MIB = 8192


def mem_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except (OSError, ValueError):
        pass
    return float("inf")


def rss_bytes() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def plaintext_budget_bytes(plan=None, pinned_bytes: float = 0.0) -> float:
    """Bytes a backend's pinned plaintexts may take in all: ``$HF_POLYHE_COMPILED_PLAINTEXTS_MIB``, else what is
    pinned already plus half the memory available now, at most 8 GiB. For a bootstrapped ``plan`` the memory a
    bootstrap still needs on top of what this process holds (``plan.bootstrap_memory_gib``, the estimated peak) is
    not available."""
    env = os.environ.get("HF_POLYHE_COMPILED_PLAINTEXTS_MIB")
    if env:
        try:
            return float(env) * 2**20
        except ValueError as e:
            raise PlanningError(f"HF_POLYHE_COMPILED_PLAINTEXTS_MIB must be a number of MiB, got {env!r}") from e
    avail = mem_available_bytes()
    if plan is not None and plan.params.bootstrap:
        avail -= max(0.0, float(plan.bootstrap_memory_gib) * 2**30 - rss_bytes())
    return min(DEFAULT_BUDGET_MIB * 2.0**20, pinned_bytes + 0.5 * max(avail, 0.0))


def pin_plaintexts(ev: Evaluator, plan, backend, min_uses: int = 1, budget_bytes: float | None = None) -> dict:
    """Encode now, once, at the level each meets its ciphertext, the plaintexts of ``ev``'s circuit that one run
    uses at least ``min_uses`` times (the most used first, while the backend's pinned plaintexts take at most
    ``budget_bytes``, default :func:`plaintext_budget_bytes`). Returns counts: ``distinct``, ``pinned`` (now),
    ``bytes`` (now), ``over_budget``, ``kept_for_later`` (used fewer times: encoded when met)."""
    from ..backends.openfhe import vector_digest

    budget = plaintext_budget_bytes(plan, backend.pinned_bytes) if budget_bytes is None else float(budget_bytes)
    cc = backend.cc
    N, towers = cc.GetRingDimension(), cc.GetMultiplicativeDepth() + 1  # the keys' context: maybe deeper than the plan
    vectors = {}

    def seen(vec, level):
        vectors[(vector_digest(vec), level)] = vec

    tb = trace(ev, plan.params, plan.start_level, on_plaintext=seen)
    info = {"distinct": len(tb.plaintexts), "pinned": 0, "bytes": 0, "over_budget": 0, "kept_for_later": 0}
    for key, (level, _, uses) in sorted(tb.plaintexts.items(), key=lambda kv: -kv[1][2]):
        vec = vectors[key]
        if uses < min_uses:
            info["kept_for_later"] += int(not backend.is_pinned(vec, level))
            continue
        n, b = backend.pin([(vec, level, plaintext_bytes(N, towers - level))], budget)
        info["pinned"] += n
        info["bytes"] += b
        info["over_budget"] += int(not n and not backend.is_pinned(vec, level))
    return info


def compile_evaluator(plan, backend, budget_bytes: float | None = None, min_uses: int = 1) -> Evaluator:
    """The :class:`Evaluator` of ``plan`` (a :class:`~hf_polyhe.he.compile.planner.Plan`) on ``backend``, with the
    plaintexts one run uses at least ``min_uses`` times encoded now, once (:func:`pin_plaintexts`; backends
    without ``pin``, e.g. the plain one, just get the evaluator). Pinned plaintexts are shared by every evaluator
    of the backend. ``evaluator.compiled`` says how many were pinned and how many bytes they take.

    A server compiles with ``min_uses=2`` when it first builds an evaluator (plaintexts repeated within one run:
    a single request gains without holding what it uses once), and pins the rest when the same circuit is
    requested again (:meth:`hf_polyhe.he.Server.evaluator`)."""
    ev = Evaluator(plan.circuit, backend)
    if hasattr(backend, "pin"):
        ev.compiled = pin_plaintexts(ev, plan, backend, min_uses, budget_bytes)
    return ev
