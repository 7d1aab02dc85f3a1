"""Plan every circuit of an export under one set of CKKS parameters: :class:`ExportPlan` and :func:`plan_for_export`.

A client generates its keys once for *every* circuit the server may run for an export (full forward for lengths
``1..max_length``, KV-cache prefill and decode steps for causal LMs): the rotation keys are the union over all
of them, the CKKS parameters the deepest. The server then builds whatever circuit a request needs from the spec
and plans it again with the same parameters (:meth:`ExportPlan.plan_circuit`), which checks the keys cover it.

Planning needs no keys and no OpenFHE: ``hf-polyhe inspect`` and ``save_encrypted_pipeline`` print
:func:`plan_report` of the 128-bit plan.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .. import params as P
from ..backends.plain import run_plain
from ..circuit.evaluator import peak_live_values
from ..circuit.packing import next_pow2
from ..circuit.rotations import choose_rotation_keys
from ..errors import KeyMismatchError, PlanningError, SerializationError
from .decode import build_decode_circuit, check_cache_levels, decode_inputs
from .plaintexts import DEFAULT_BUDGET_MIB
from .planner import PROCESS_BASE_GIB, calibrate_bounds, key_bytes, load_cost_table, plan as make_plan
from .transformer import TransformerSpec, build_circuit, cache_names, default_packing

PLAN_FORMAT = "hf_polyhe.export_plan"
# Bumped whenever the planner may plan the same export differently (parameters, key set): keys cached for an older
# plan (runtime/keys.py CACHE_LAYOUT) and a server's cached plans (serve/app.py) are then not reused, since a server
# refuses keys whose plan differs from its own. 2: composed rotation keys, 6-digit alternative; 3: radix-4
# rotate-and-sums (rotation indices 3 * 4^k) (2026-12-03); 4: row-sum scales folded into the next polynomial's domain
# (a LayerNorm's inv_sqrt, power-softmax's reciprocal: one level less each) (2026-12-03); 5: "auto" exports past
# max_leveled_depth may plan leveled at 128-bit, single-row linears after a bootstrap (2026-12-04).
PLAN_VERSION = 5
BOOTSTRAP_HEADROOM = 1  # extra levels in bootstrap mode, see plan_for_export
GIB = 2.0**30


def spec_digest(spec: TransformerSpec) -> str:
    """SHA-256 over the spec's JSON and weights: ties keys and bundles to one export."""
    h = hashlib.sha256(json.dumps(spec.config, sort_keys=True).encode())
    for k in sorted(spec.weights):
        h.update(k.encode())
        h.update(np.ascontiguousarray(spec.weights[k], dtype=np.float64).tobytes())
    return h.hexdigest()


@dataclass
class ExportPlan:
    """Everything keys depend on, for every circuit of an export (JSON-serialisable, no secrets).

    ``mode``: ``"leveled"`` or ``"bootstrap"``; ``bounds``: per circuit kind (``full``, ``prefill``,
    ``decode``), value name -> max |x| seen on calibration data (bootstrap scaling); ``summary``: planner
    counts and predicted seconds of the longest circuit of each kind."""

    params: P.CKKSParams
    start_level: int
    rotation_keys: list
    mode: str
    levels_after_bootstrap: Optional[int]
    max_leveled_depth: int
    bounds: dict
    digest: str
    family: str
    max_length: int
    hidden_size: int
    block: int
    slots: int
    kv_cache: bool
    spec_dir: Optional[str] = None
    summary: dict = field(default_factory=dict)
    groups: int = 1  # row groups per ciphertext (packing.MatrixLayout); the CKKS batch is groups * slots
    decode_input: Optional[dict] = None  # how a decode step's token is packed (a ColumnVector's dict), None: matrix
    # True: the server holds only ``rotation_keys`` and runs every other rotation as a chain of them
    # (circuit/rotations.py; chosen by plan_for_export when a key per index would not fit in memory)
    compose_rotations: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = self.params.to_dict()
        if d["decode_input"] is None:  # plans of matrix-packed decode steps stay readable by earlier releases
            del d["decode_input"]
        if not d["compose_rotations"]:  # and plans with a key per rotation index
            del d["compose_rotations"]
        return {"format": PLAN_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ExportPlan":
        d = dict(d)
        if d.pop("format", None) != PLAN_FORMAT:
            raise SerializationError(f"not a {PLAN_FORMAT} document")
        d["params"] = P.CKKSParams.from_dict(d["params"])
        return cls(**d)

    # -- planning one circuit with the export's parameters ---------------------------------------------
    def plan_circuit(self, circuit, kind: str):
        """Plan ``circuit`` under this export's parameters; KeyMismatchError if the keys cannot run it."""
        if circuit.groups != self.groups or circuit.slots != self.slots:
            raise KeyMismatchError(f"circuit {circuit.name!r} packs {circuit.groups} row groups of {circuit.slots} slots, "
                                   f"this export {self.groups} of {self.slots}: build it with groups={self.groups}, slots={self.slots}")
        base = self.params
        kw = dict(bounds=self.bounds.get(kind), max_leveled_depth=self.max_leveled_depth,
                  rotation_keys=self.rotation_keys if self.compose_rotations else None)
        if self.mode == "bootstrap":
            pl = make_plan(circuit, base, levels_after_bootstrap=self.levels_after_bootstrap, bootstrap="always", **kw)
        else:
            pl = make_plan(circuit, base, bootstrap="never", **kw)
        p, q = pl.params, self.params
        if (p.slots, p.scale_bits, p.bootstrap, p.security) != (q.slots, q.scale_bits, q.bootstrap, q.security) \
                or p.ring_dim > q.ring_dim or p.depth > q.depth or pl.start_level != self.start_level:
            raise KeyMismatchError(
                f"circuit {circuit.name!r} needs parameters (ring {p.ring_dim}, depth {p.depth}, slots {p.slots}, "
                f"start level {pl.start_level}) the session keys were not made for (ring {q.ring_dim}, depth {q.depth}, "
                f"slots {q.slots}, start level {self.start_level}); generate keys with plan_for_export for this export")
        missing = sorted(set(pl.rotation_keys) - set(self.rotation_keys))
        if missing:
            raise KeyMismatchError(f"circuit {circuit.name!r} needs rotation keys {missing[:8]} the session lacks")
        return pl


def server_memory(params: P.CKKSParams, n_rotation_keys: int, start_level: int, plaintext_bytes: float,
                  peak_ciphertexts: int, plaintext_budget_mib: float = DEFAULT_BUDGET_MIB,
                  costs: dict | None = None, limit_gib: float | None = None) -> dict:
    """The parts of :func:`predicted_memory`, in bytes, from plain numbers: evaluation keys for ``params`` and
    ``n_rotation_keys`` (:func:`~hf_polyhe.he.compile.planner.key_bytes`), ``plaintext_bytes`` encoded once capped
    by ``plaintext_budget_mib``, ``peak_ciphertexts`` at the level fresh ciphertexts have (``start_level``), the
    process base, and their ``total``. ``costs``: the planner's cost table (default :func:`load_cost_table`), whose
    measured bootstrapping rows size the bootstrapping part. ``limit_gib``: the memory of the server's machine; a
    server pins plaintexts in at most half the memory left beside the rest (:func:`~hf_polyhe.he.compile.plaintexts.
    plaintext_budget_bytes`), so they are capped by that too (the others are encoded when met).
    ``benchmarks/plan_scaling.py`` uses it on planner-only plans."""
    N = params.ring_dim or 2**16
    kb = key_bytes(params, int(n_rotation_keys), costs if costs is not None else load_cost_table())
    ct = 2 * N * (params.depth + 1 - int(start_level)) * 8
    out = {"keys": kb["relin"] + kb["rotation"] + kb["bootstrap"],
           "plaintexts": min(float(plaintext_bytes), plaintext_budget_mib * 2.0**20),
           "ciphertexts": int(peak_ciphertexts) * ct,
           "process": PROCESS_BASE_GIB * GIB}
    if limit_gib is not None:
        rest = out["keys"] + out["ciphertexts"] + out["process"]
        out["plaintexts"] = min(out["plaintexts"], max(0.5 * (float(limit_gib) * GIB - rest), 0.0))
    out["total"] = sum(out.values())
    return out


def predicted_memory(plan: ExportPlan, plaintext_budget_mib: float = DEFAULT_BUDGET_MIB,
                     limit_gib: float | None = None) -> dict:
    """What a server process running ``plan``'s circuits holds at its peak, in bytes: ``keys`` (relinearisation,
    every rotation key, bootstrapping keys; the estimate of :func:`~hf_polyhe.he.compile.planner.plan`),
    ``plaintexts`` (every distinct plaintext of the longest circuit of each kind, encoded once, capped by the
    server's budget ``plaintext_budget_mib``: the rest is encoded when met and freed), ``ciphertexts`` (the most
    alive at once while one circuit runs, :func:`~hf_polyhe.he.circuit.evaluator.peak_live_values`, each at the
    fresh level; a KV-cache stream's cache is among them), ``process`` (:data:`~hf_polyhe.he.compile.planner.PROCESS_BASE_GIB`) and ``total``.
    Not counted: a linear's rotations on the way and OpenFHE's scratch. A first request pins only the plaintexts
    it uses twice, so ``plaintexts`` is the steady state of a server that has run every circuit twice. Checked once,
    at 128-bit on the benchmark's W1 (``benchmarks/encrypted_inference.py --requests 3``, which prints both): keys
    5.3 predicted / 6.4 GiB measured, plaintexts 8.0 / 7.4, total 14.4 against 14.9 for the measured parts on a
    server-only base; not yet on bootstrapped plans. ``limit_gib`` (default :func:`params.default_max_memory_gib`):
    the server machine's memory, which also caps the pinned plaintexts (:func:`server_memory`)."""
    pts, peak = _summary_memory(plan.summary)
    limit = P.default_max_memory_gib() if limit_gib is None else limit_gib
    return server_memory(plan.params, len(plan.rotation_keys), plan.start_level, pts, peak, plaintext_budget_mib,
                         limit_gib=limit)


def _summary_memory(summary: dict) -> tuple:
    """``(plaintext bytes, peak ciphertexts)`` of an export's summary: every kind's distinct plaintexts, and the
    most ciphertexts alive in any kind's longest circuit."""
    pts = sum(e.get("plaintexts", {}).get("bytes", 0) for e in summary.values())
    return pts, max((e.get("peak_ciphertexts", 0) for e in summary.values()), default=0)


def memory_over_limit(plan: ExportPlan, limit_gib: float | None = None, memory: dict | None = None) -> str | None:
    """Why a server for ``plan`` would not fit ``limit_gib`` (default :func:`params.default_max_memory_gib`, the
    limit the planner holds bootstrapping memory to), naming the largest part; None if it fits. The planner bounds
    the bootstrapping keys by that limit and composes rotations from fewer keys to fit it (``plan_for_export``'s
    ``rotation_keys``), but a plan can exist and still not fit: the fewest rotation keys, the bootstrapping keys
    and the ciphertexts can together need more. ``memory``: :func:`predicted_memory` of ``plan`` if already
    computed."""
    limit = float(limit_gib if limit_gib is not None else P.default_max_memory_gib())
    m = {k: v / GIB for k, v in (memory or predicted_memory(plan, limit_gib=limit)).items()}
    if m["total"] <= limit:
        return None
    per_key = key_bytes(plan.params, 1)["per_key"] / GIB
    return (f"a server needs ~{m['total']:.1f} GiB, over the {limit:.1f} GiB limit (HF_POLYHE_MAX_MEMORY_GIB): keys "
            f"{m['keys']:.1f} GiB, of which {len(plan.rotation_keys)} rotation keys {len(plan.rotation_keys) * per_key:.1f}"
            f" GiB, plaintexts {m['plaintexts']:.1f} GiB")


def plan_report(plan: ExportPlan) -> str:
    """A person-readable planner report of an export: parameters, then each circuit kind's counts, depth and
    predicted seconds (what ``hf-polyhe inspect`` prints and ``save_encrypted_pipeline`` writes to ``plan.txt``)."""
    p = plan.params
    lines = [f"parameters  : {p.name} ({'INSECURE' if p.insecure else p.security}), ring 2^{p.ring_dim.bit_length() - 1}, "
             f"depth {p.depth}, {p.slots} slots ({plan.groups} row groups of {plan.slots}), {p.scale_bits}-bit scale, mode {plan.mode}, "
             f"{len(plan.rotation_keys)} rotation keys"
             + (" (a reduced set: every other rotation runs as a chain of them)" if plan.compose_rotations else "")]
    mem = predicted_memory(plan)
    m = {k: v / GIB for k, v in mem.items()}
    lines.append(f"server memory (predicted): {m['total']:.1f} GiB at its peak (keys {m['keys']:.1f}, plaintexts "
                 f"encoded once {m['plaintexts']:.1f}, ciphertexts {m['ciphertexts']:.1f}, process {m['process']:.1f})")
    over = memory_over_limit(plan, memory=mem)
    if over:
        lines.append("WARNING: " + over)
    for kind, entry in plan.summary.items():
        lines += ["", f"== {kind} circuit, length {entry['length']} ==", entry.get("report", "")]
    return "\n".join(lines)


def plan_overview(plan: ExportPlan) -> dict:
    """The JSON part of :func:`plan_report`: parameters and, per circuit kind, counts and predicted seconds."""
    p = plan.params
    mem = predicted_memory(plan)
    return {"params": p.name, "security": "NONE (toy)" if p.insecure else p.security, "ring_dim": p.ring_dim,
            "depth": p.depth, "slots": p.slots, "row_groups": plan.groups, "scale_bits": p.scale_bits, "mode": plan.mode,
            "rotation_keys": len(plan.rotation_keys), "compose_rotations": plan.compose_rotations,
            "server_memory_gib": {k: round(v / GIB, 2) for k, v in mem.items()},
            "memory_limit_gib": P.default_max_memory_gib(), "over_memory_limit": memory_over_limit(plan, memory=mem),
            "circuits": {kind: {"length": e["length"], "depth": e["depth"], "counts": e["counts"],
                                "predicted_seconds": round(float(e["predicted_seconds"]), 2),
                                **({"plaintext_mib": round(e["plaintexts"]["bytes"] / 2**20, 1)}
                                   if e.get("plaintexts") else {})}
                         for kind, e in plan.summary.items()}}


def _sample_embeddings(model, n: int, seed: int = 0) -> list:
    """Calibration inputs: embeddings of random tokens (or random images) at the export's max length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if model.family == "vit":
            c, p = model.tables["patch_weight"].shape[1:3]
            side = int(round(np.sqrt(model.tables["position_embeddings"].shape[0] - 1))) * p
            out.append(model.embed(pixel_values=rng.normal(size=(c, side, side))))
        else:
            vocab = model.tables["word_embeddings"].shape[0]
            out.append(model.embed(input_ids=rng.integers(0, vocab, model.max_length)))
    return out


def _auto_groups(circuit, ring_dim: int) -> tuple:
    """``(groups, slots per group)`` for ``circuit`` (the export's longest prompt, built with one group) on a
    ring of ``ring_dim``.

    Shift-parallel attention needs ``2 * L <= R`` rows per group for a prompt of ``L``: when the default
    packing has fewer for the longest prompt and the ring has room, the groups get twice the rows (an export
    for shorter prompts than ``max_length`` keeps more, shorter groups). Then every group the ring holds is used (each one more
    shift per attention product); otherwise no more than the widest linear (input or output) has column
    blocks, beyond which groups only replicate."""
    slots, half = circuit.slots, ring_dim // 2
    rows, max_len = slots // circuit.block, circuit.inputs["x"][0]
    if 2 * max_len > rows and half >= 4 * slots:
        slots, rows = 2 * slots, 2 * rows
    fit = max(1, half // slots)
    if fit > 1 and 2 * max_len <= rows:
        return int(fit), int(slots)
    widest = 1
    for node in circuit.nodes:
        if node.op == "linear":
            W = circuit.weight(node.attrs["weight"])
            widest = max(widest, next_pow2(-(-max(W.shape) // circuit.block)))
    return int(min(fit, widest)), int(circuit.slots)


def _merge_max(acc: dict, new: dict):
    for k, v in new.items():
        acc[k] = max(acc.get(k, 0.0), float(v))


def plan_for_export(model, params: Optional[P.CKKSParams] = None, *, bootstrap: str = "auto",
                    levels_after_bootstrap: Optional[int] = None, max_leveled_depth: int = 24,
                    lengths=None, kv_cache: Optional[bool] = None, calibration: Optional[list] = None,
                    calibration_samples: int = 2, groups: Optional[int] = None,
                    rotation_keys="auto", max_memory_gib: Optional[float] = None) -> ExportPlan:
    """Plan every circuit a server may run for ``model`` (an :class:`~hf_polyhe.he.Export`).

    ``lengths``: prompt lengths to support (default ``1..max_length``); ``kv_cache`` (default: causal LMs)
    adds the KV-cache prefill for each length and the decode steps ``1..max_length-1``. ``bootstrap`` as in
    :func:`~hf_polyhe.he.compile.planner.plan`; bootstrap bounds come from ``calibration`` (a list of ``max_length x d``
    embedding matrices; default: random tokens through the client's tables). Padding masks change neither
    depth nor rotations, so the keys cover every mask. With ``"auto"`` at secure parameters, an export that would
    bootstrap (its depth is past ``max_leveled_depth``) is also planned leveled on a ring that holds its whole depth,
    and the leveled plan is kept when it ranks better (:func:`_export_rank`: fits ``max_memory_gib``, then faster) or
    when no bootstrapped plan exists (e.g. its keys do not fit); not when ``levels_after_bootstrap`` is given.

    ``groups``: row groups per ciphertext (see :mod:`hf_polyhe.he.circuit.packing`). Default (:func:`_auto_groups`): a
    leveled export fills the ring's slots, so wide linears (MLP, LM head) and their activations cost one
    block's work and attention meets one key shift per group with each product (the groups get twice the
    rows when a prompt would not fit half of them); a bootstrapping export keeps one group (sparse
    bootstrapping).

    ``rotation_keys``: which rotation keys the client generates. ``"all"``: one per rotation index the circuits
    use. ``"minimal"``: only the signed powers of two those indices need
    (:func:`~hf_polyhe.he.circuit.rotations.rotation_base`); every other rotation runs as a chain of them. An int:
    at most that many (the base, then the keys that save the most rotations). ``"auto"`` (default): all, unless the
    predicted server memory (:func:`predicted_memory`) would exceed ``max_memory_gib`` (default
    :func:`params.default_max_memory_gib`); then as many as fit beside everything else. Composed rotations cost
    time: the plans charge every step (their notes count them)."""
    if not (rotation_keys in ("auto", "all", "minimal") or (isinstance(rotation_keys, numbers.Integral)
                                                            and not isinstance(rotation_keys, bool) and rotation_keys > 0)):
        raise PlanningError(f"rotation_keys must be 'auto', 'all', 'minimal' or a positive int, got {rotation_keys!r}")
    spec, max_len = model.spec, model.max_length
    causal = model.family == "gpt"
    kv_cache = causal if kv_cache is None else bool(kv_cache)
    if kv_cache and not causal:
        raise PlanningError(f"kv_cache needs a causal LM export, this one is {model.family!r}")
    lengths = sorted(set(lengths or range(1, max_len + 1)))
    if model.family == "vit":
        lengths = [max_len]
    if not lengths or lengths[0] < 1 or lengths[-1] > max_len:
        raise PlanningError(f"lengths must lie in 1..{max_len}, got {lengths}")
    params = params or P.default()
    user_params = params
    if groups is not None and (int(groups) < 1 or int(groups) & (int(groups) - 1)):
        raise PlanningError(f"groups must be a power of two >= 1, got {groups!r}")

    def make_jobs(g, slots=None):
        out = [("full", L, build_circuit(spec, L, groups=g, slots=slots)) for L in lengths]
        if kv_cache:
            out += [("prefill", L, build_circuit(spec, L, kv_cache=True, groups=g, slots=slots)) for L in lengths]
            out += [("decode", t, build_decode_circuit(spec, t, groups=g, slots=slots)) for t in range(1, max_len)]
        return out

    jobs = make_jobs(1)
    block, slots = default_packing(max_len, spec.config["hidden_size"])
    # resolve "auto" once, on the longest circuit, so every circuit runs the same way
    longest = max((j for j in jobs if j[0] != "decode"), key=lambda j: j[1])[2]

    def export_plan(params, probe, max_leveled_depth, groups=groups, slots=slots, jobs=jobs):
        """The whole export's plan on the probe's choices (mode, ring, levels after bootstrap)."""
        mode = "bootstrap" if probe.params.bootstrap else "leveled"
        if groups is None:
            groups, slots = _auto_groups(longest, probe.params.ring_dim) if mode == "leveled" else (1, slots)
        groups = int(groups)
        if groups > 1:
            if mode == "bootstrap":
                raise PlanningError(f"groups={groups} needs a leveled export (this one bootstraps); use groups=1")
            jobs = make_jobs(groups, slots)
        if mode == "leveled":  # the scale the probe settled on (see planner.fit_scale) holds for every circuit
            params = params.with_(scale_bits=probe.params.scale_bits, min_scale_bits=probe.params.scale_bits)
        # the probe chose the levels after bootstrap (automatically unless requested): every circuit uses them
        lb = int(levels_after_bootstrap or probe.params.levels_after_bootstrap) if mode == "bootstrap" else None
        if mode == "bootstrap":  # and its level budget (planner.choose_level_budget): one bootstrapping key set for all
            params = params.with_(level_budget=probe.params.level_budget)
        bounds = {"full": {}, "prefill": {}, "decode": {}}
        if mode == "bootstrap":
            samples = calibration or _sample_embeddings(model, calibration_samples)
            for X in samples:
                for kind, L, c in jobs:
                    if kind == "decode":
                        continue
                    _merge_max(bounds[kind], calibrate_bounds(c, {"x": X[:L]}))
                if kv_cache:
                    for t in range(1, max_len):
                        out = run_plain(build_circuit(spec, t, kv_cache=True), {"x": X[:t]})
                        c = build_decode_circuit(spec, t)
                        _merge_max(bounds["decode"], calibrate_bounds(
                            c, decode_inputs(X[t : t + 1], {k: out[k] for k in cache_names(spec)})))

        def plan_jobs(keys=None):
            plans, rot, best = {}, set(), None
            for kind, L, c in jobs:
                kw = dict(bounds=bounds[kind] or None, max_leveled_depth=max_leveled_depth, rotation_keys=keys)
                if mode == "bootstrap":
                    pl = make_plan(c, params, levels_after_bootstrap=lb, bootstrap="always", **kw)
                else:
                    pl = make_plan(c, params, bootstrap="never", **kw)
                plans[(kind, L)] = pl
                rot |= set(pl.rotation_keys)
                if best is None or pl.params.depth > best.params.depth or pl.params.ring_dim > best.params.ring_dim:
                    best = pl
            return plans, rot, best

        plans, rot, best = plan_jobs()
        summary = _summaries(plans)
        keep = _rotation_key_choice(plans, summary, rot, best, mode, rotation_keys, max_memory_gib)
        if keep is not None:
            plans, rot, best = plan_jobs(keep)
            summary = _summaries(plans)
        starts = {pl.start_level for pl in plans.values()}
        if len(starts) != 1:
            raise PlanningError(f"circuits of this export start at different levels {sorted(starts)}")
        if kv_cache:
            for t in range(1, max_len):
                src = plans[("prefill", t)] if t in lengths else None
                if src is not None:
                    check_cache_levels(src.levels, plans[("decode", t)].levels, cache_names(spec))
                if t + 1 < max_len:
                    check_cache_levels(plans[("decode", t)].levels, plans[("decode", t + 1)].levels, cache_names(spec))
        final = _final_params(best.params, mode)
        spec_dir = os.path.abspath(os.path.join(model.directory, "server")) if getattr(model, "directory", None) else None
        return ExportPlan(params=final, start_level=starts.pop(), rotation_keys=sorted(rot), mode=mode,
                          levels_after_bootstrap=lb, max_leveled_depth=max_leveled_depth, bounds=bounds,
                          digest=spec_digest(spec), family=model.family, max_length=max_len,
                          hidden_size=spec.config["hidden_size"], block=block, slots=slots, kv_cache=kv_cache,
                          spec_dir=spec_dir, summary=summary, groups=groups, decode_input=_decode_input(jobs),
                          compose_rotations=keep is not None)

    # "auto" bootstraps past max_leveled_depth; on a 128-bit ring that holds the whole depth, the leveled plan can
    # still be faster and need far less memory (no bootstrapping keys): plan both, keep the better (or the one that
    # exists: bootstrapping keys may not fit at all)
    compare = (bootstrap == "auto" and levels_after_bootstrap is None and not user_params.insecure
               and not any(n.op == "bootstrap" for n in longest.nodes))
    try:
        probe = make_plan(longest, params, levels_after_bootstrap=levels_after_bootstrap, bootstrap=bootstrap,
                          max_leveled_depth=max_leveled_depth, max_memory_gib=max_memory_gib)
        decodes = [j for j in jobs if j[0] == "decode"]
        params, probe = _choose_digits(longest, params, probe, max(decodes, key=lambda j: j[1])[2] if decodes else None,
                                       levels_after_bootstrap=levels_after_bootstrap, bootstrap=bootstrap,
                                       max_leveled_depth=max_leveled_depth, max_memory_gib=max_memory_gib)
        plan, failure = export_plan(params, probe, max_leveled_depth), None
    except PlanningError as e:
        if not compare:
            raise
        plan, failure = None, e
    if compare and (plan is None or plan.mode == "bootstrap"):
        try:
            flat = make_plan(longest, user_params, bootstrap="never", max_leveled_depth=LEVELED_DEPTH_CAP,
                             max_memory_gib=max_memory_gib)
            alt = export_plan(user_params, flat, max(max_leveled_depth, LEVELED_DEPTH_CAP))
        except PlanningError:
            alt = None
        if plan is None:
            if alt is None:
                raise failure
            plan = alt
        elif alt is not None and _export_rank(alt, max_memory_gib) < _export_rank(plan, max_memory_gib):
            plan = alt
    return plan


# "auto" exports that bootstrap past max_leveled_depth are also planned leveled up to this depth (past every
# 128-bit ring's modulus: the ring's limit, not this, ends the attempt) and keep that plan when it ranks better
LEVELED_DEPTH_CAP = 1000


def _export_rank(plan: ExportPlan, max_memory_gib: Optional[float]) -> tuple:
    """How :func:`plan_for_export` compares two plans of one export: one whose predicted server memory fits
    ``max_memory_gib`` first, then the smaller predicted time: a prompt plus a decode step for a causal LM (as
    :func:`_choose_digits` compares), else the full circuit (each kind's longest)."""
    over = memory_over_limit(plan, max_memory_gib) is not None
    kinds = [k for k in plan.summary if k != "full"] or list(plan.summary)
    return over, sum(float(plan.summary[k]["predicted_seconds"]) for k in kinds)


# HYBRID key-switching digits tried for a bootstrapped export when the user left them to OpenFHE (0): measured
# (benchmarks/he_ops.py --bootstrap-sweep, 128-bit) 6 digits keep 5 levels after a [2, 2] bootstrap on ring 2^16,
# where 3 keep 2, so a plan needing few levels per segment fits the half-size ring; each rotation and product
# then costs 1.27x / 1.32x (--digits-cost), which the planner charges
ALTERNATIVE_DIGITS = 6


def _choose_digits(circuit, params: P.CKKSParams, probe, decode=None, **kw):
    """``(params, probe plan)``: ``params`` with :data:`ALTERNATIVE_DIGITS` key-switching digits on half the
    probe's ring when the user left digits and ring to the planner (0), the probe bootstraps at HEStd_128_classic
    (where the alternative was measured), and that plan (fewer levels per segment, so more bootstraps, each cheaper;
    the planner charges the digits' cost) is predicted faster on ``circuit`` plus, for a causal LM, its longest
    ``decode`` step; else as given."""
    if (params.num_large_digits or params.ring_dim or params.insecure or params.security != "HEStd_128_classic"
            or not probe.params.bootstrap):
        return params, probe
    # on the next smaller ring, with as many levels per segment as it holds (fewer than the default, if need be)
    alt_params = params.with_(num_large_digits=ALTERNATIVE_DIGITS, ring_dim=probe.params.ring_dim // 2)
    try:
        alt = make_plan(circuit, alt_params, **kw)
        if kw.get("levels_after_bootstrap") is None and alt.params.bootstrap and \
                _final_params(alt.params, "bootstrap").ring_dim > alt.params.ring_dim:
            # the export's spare level (_final_params) must fit the same ring: one level less per segment, with the
            # level budget the first plan chose for memory
            alt_params = alt_params.with_(level_budget=alt.params.level_budget, auto_level_budget=False)
            alt = make_plan(circuit, alt_params, **{**kw, "levels_after_bootstrap": alt.params.levels_after_bootstrap - 1})
    except PlanningError:
        return params, probe
    if not alt.params.bootstrap or _final_params(alt.params, "bootstrap").ring_dim >= probe.params.ring_dim:
        return params, probe

    def total(pl, base):
        t = pl.predicted_seconds
        if decode is not None:
            q = base.with_(level_budget=pl.params.level_budget, auto_level_budget=False)
            t += make_plan(decode, q, **{**kw, "bootstrap": "always",
                                         "levels_after_bootstrap": pl.params.levels_after_bootstrap}).predicted_seconds
        return t

    try:
        faster = total(alt, alt_params) < total(probe, params)
    except PlanningError:
        return params, probe
    return (alt_params.with_(level_budget=alt.params.level_budget), alt) if faster else (params, probe)


def _final_params(params: P.CKKSParams, mode: str) -> P.CKKSParams:
    """The export's parameters from its deepest circuit's: with bootstrapping, one level of headroom."""
    final = params
    if mode == "bootstrap":
        # One spare level on top of the planner's count: with FLEXIBLEAUTO a bootstrap input that arrives with a
        # pending rescale at the last planned level makes EvalBootstrap drop its last RNS tower (measured,
        # openfhe 1.6.1: "DropLastElement(): Removing last element of DCRTPoly renders it invalid").
        final = final.with_(depth=final.depth + BOOTSTRAP_HEADROOM)
        if not final.insecure:
            final = final.with_(ring_dim=max(final.ring_dim, final.min_secure_ring_dim()))
    return final


def _decode_input(jobs):
    for kind, _, c in jobs:
        if kind == "decode" and "x" in c.input_layouts:
            return c.input_layouts["x"].to_dict()
    return None


def _summaries(plans: dict) -> dict:
    """Per circuit kind, the longest circuit's counts, depth, predicted seconds, plaintexts, report and peak
    ciphertexts (:attr:`ExportPlan.summary`)."""
    summary = {}
    for kind in ("full", "prefill", "decode"):
        keys = [k for k in plans if k[0] == kind]
        if keys:
            k = max(keys, key=lambda k: k[1])
            pl = plans[k]
            summary[kind] = {"length": k[1], "counts": pl.counts, "depth": pl.depth,
                             "predicted_seconds": pl.predicted_seconds, "time_by_op": pl.time_by_op,
                             "plaintexts": pl.plaintexts, "report": pl.report(),
                             "peak_ciphertexts": peak_live_values(pl.circuit)[0]}
    return summary


def _rotation_key_choice(plans: dict, summary: dict, rot: set, best, mode: str, rotation_keys,
                         max_memory_gib) -> Optional[list]:
    """The rotation keys to generate when not one per index (``plan_for_export``'s ``rotation_keys``), None for
    all of them. ``"auto"``: as many as fit under ``max_memory_gib`` beside the rest of the predicted server
    memory (at least the base); ``summary``: :func:`_summaries` of ``plans``."""
    if rotation_keys == "all" or not rot:
        return None
    uses = {}
    for pl in plans.values():
        for k, n in pl.rotation_uses.items():
            uses[k] = uses.get(k, 0) + n
    period = best.params.slots
    if rotation_keys == "minimal":
        keep = choose_rotation_keys(uses, period)
    elif rotation_keys != "auto":
        keep = choose_rotation_keys(uses, period, int(rotation_keys))
    else:
        final = _final_params(best.params, mode)
        pts, peak = _summary_memory(summary)
        start = next(iter(plans.values())).start_level
        limit = max_memory_gib if max_memory_gib is not None else P.default_max_memory_gib()
        return fit_rotation_keys(uses, final, server_memory(final, len(rot), start, pts, peak, limit_gib=limit), limit)
    return None if len(keep) >= len(rot) else keep


def fit_rotation_keys(uses: dict, params: P.CKKSParams, memory: dict, max_memory_gib: Optional[float] = None):
    """The rotation keys a server can hold when one per index (``uses``: index -> rotations by it) would not fit:
    None if ``memory`` (:func:`server_memory` with every key) fits ``max_memory_gib`` (default
    :func:`params.default_max_memory_gib`), else the base and as many of the most useful other keys as fit beside
    the rest (:func:`~hf_polyhe.he.circuit.rotations.choose_rotation_keys`; the base even if it does not fit)."""
    limit = float(max_memory_gib if max_memory_gib is not None else P.default_max_memory_gib()) * GIB
    if memory["total"] <= limit or not uses:
        return None
    kb = key_bytes(params, len(uses))
    # keys before pinned plaintexts: a plaintext not pinned is encoded when met, a key not held costs rotations
    fit = int((limit - (memory["total"] - kb["rotation"] - memory["plaintexts"])) // kb["per_key"])
    keep = choose_rotation_keys(uses, params.slots, max(fit, 0))
    return None if len(keep) >= len(uses) else keep


