"""One key set per client session for a whole export: every prompt length, padding mask and decode step.

The client generates its keys once, for *every* circuit the server may run for an export (full forward for
lengths ``1..max_length``, KV-cache prefill and decode steps for causal LMs): the rotation keys are the union
over all of them, the CKKS parameters the deepest. The server then builds whatever circuit a request needs
from the spec, plans it with the same parameters and evaluates it with those evaluation keys.

Three steps, three objects::

    plan = plan_for_export(EncryptedModel(export_dir), params.default())     # anyone: no keys involved
    client = EncryptedClient.generate(plan)                                   # keys (secret key stays here)
    client.server_bundle("bundle")                                            # context + eval keys, no secret
    server = EncryptedServer("bundle")                                        # another process / machine
    logits = client.decrypt_logits(server.run(L, client.encrypt_embeddings(x)))

Generation with an encrypted KV cache (the server keeps the caches per session; it only ever sees ciphertexts)::

    sid = server.start_session()
    logits = client.decrypt_logits(server.prefill(sid, client.encrypt_embeddings(prompt_embeddings)))
    logits = client.decrypt_logits(server.decode(sid, client.encrypt_embeddings(next_token_embedding, decode=True)))
    server.end_session(sid)

:class:`EncryptedGeneration` wraps exactly this for :meth:`EncryptedModel.generate` (``runner=``).
Bytes cross the boundary as :class:`~hf_polyhe.he.roles.EncryptedTensor` containers (checksummed, tagged with
the secret key's tag), so a ciphertext of another session is refused with :class:`KeyMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from . import params as P
from .decode import build_circuit, build_decode_circuit, cache_names, check_cache_levels, decode_inputs
from .errors import HEError, KeyMismatchError, LayoutError, PlanningError, SerializationError
from .interpreter import Evaluator, Packed
from .ops import OPS
from .packing import MatrixLayout, layout_from_dict, next_pow2, same_packing
from .planner import calibrate_bounds, plan as make_plan
from .transformer import TransformerSpec, default_packing

BUNDLE_FORMAT = "hf_polyhe.export_server_bundle"
CLIENT_FORMAT = "hf_polyhe.export_client"
PLAN_FORMAT = "hf_polyhe.export_plan"
BOOTSTRAP_HEADROOM = 1  # extra levels in bootstrap mode, see plan_for_export


class SessionError(HEError, LookupError):
    """Unknown, finished or out-of-order generation session on the server."""


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = self.params.to_dict()
        if d["decode_input"] is None:  # plans of matrix-packed decode steps stay readable by earlier releases
            del d["decode_input"]
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
        kw = dict(bounds=self.bounds.get(kind), max_leveled_depth=self.max_leveled_depth)
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


def plan_report(plan: ExportPlan) -> str:
    """A person-readable planner report of an export: parameters, then each circuit kind's counts, depth and
    predicted seconds (what ``hf-polyhe inspect`` prints and ``save_encrypted_pipeline`` writes to ``plan.txt``)."""
    p = plan.params
    lines = [f"parameters  : {p.name} ({'INSECURE' if p.insecure else p.security}), ring 2^{p.ring_dim.bit_length() - 1}, "
             f"depth {p.depth}, {p.slots} slots ({plan.groups} row groups of {plan.slots}), {p.scale_bits}-bit scale, mode {plan.mode}, "
             f"{len(plan.rotation_keys)} rotation keys"]
    for kind, entry in plan.summary.items():
        lines += ["", f"== {kind} circuit, length {entry['length']} ==", entry.get("report", "")]
    return "\n".join(lines)


def plan_overview(plan: ExportPlan) -> dict:
    """The JSON part of :func:`plan_report`: parameters and, per circuit kind, counts and predicted seconds."""
    p = plan.params
    return {"params": p.name, "security": "NONE (toy)" if p.insecure else p.security, "ring_dim": p.ring_dim,
            "depth": p.depth, "slots": p.slots, "row_groups": plan.groups, "scale_bits": p.scale_bits, "mode": plan.mode,
            "rotation_keys": len(plan.rotation_keys),
            "circuits": {kind: {"length": e["length"], "depth": e["depth"], "counts": e["counts"],
                                "predicted_seconds": round(float(e["predicted_seconds"]), 2)}
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
                    calibration_samples: int = 2, groups: Optional[int] = None) -> ExportPlan:
    """Plan every circuit a server may run for ``model`` (an :class:`~hf_polyhe.he.session.EncryptedModel`).

    ``lengths``: prompt lengths to support (default ``1..max_length``); ``kv_cache`` (default: causal LMs)
    adds the KV-cache prefill for each length and the decode steps ``1..max_length-1``. ``bootstrap`` as in
    :func:`~hf_polyhe.he.planner.plan`; bootstrap bounds come from ``calibration`` (a list of ``max_length x d``
    embedding matrices; default: random tokens through the client's tables). Padding masks change neither
    depth nor rotations, so the keys cover every mask.

    ``groups``: row groups per ciphertext (see :mod:`hf_polyhe.he.packing`). Default (:func:`_auto_groups`): a
    leveled export fills the ring's slots, so wide linears (MLP, LM head) and their activations cost one
    block's work and attention meets one key shift per group with each product (the groups get twice the
    rows when a prompt would not fit half of them); a bootstrapping export keeps one group (sparse
    bootstrapping)."""
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
    probe = make_plan(longest, params, levels_after_bootstrap=levels_after_bootstrap, bootstrap=bootstrap,
                      max_leveled_depth=max_leveled_depth)
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
    bounds = {"full": {}, "prefill": {}, "decode": {}}
    if mode == "bootstrap":
        samples = calibration or _sample_embeddings(model, calibration_samples)
        for X in samples:
            for kind, L, c in jobs:
                if kind == "decode":
                    continue
                _merge_max(bounds[kind], calibrate_bounds(c, {"x": X[:L]}))
            if kv_cache:
                from .backends.plain import run_plain

                for t in range(1, max_len):
                    out = run_plain(build_circuit(spec, t, kv_cache=True), {"x": X[:t]})
                    c = build_decode_circuit(spec, t)
                    _merge_max(bounds["decode"], calibrate_bounds(
                        c, decode_inputs(X[t : t + 1], {k: out[k] for k in cache_names(spec)})))
    plans, rot, best = {}, set(), None
    for kind, L, c in jobs:
        kw = dict(bounds=bounds[kind] or None, max_leveled_depth=max_leveled_depth)
        if mode == "bootstrap":
            pl = make_plan(c, params, levels_after_bootstrap=lb, bootstrap="always", **kw)
        else:
            pl = make_plan(c, params, bootstrap="never", **kw)
        plans[(kind, L)] = pl
        rot |= set(pl.rotation_keys)
        if best is None or pl.params.depth > best.params.depth or pl.params.ring_dim > best.params.ring_dim:
            best = pl
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
    final = best.params
    if mode == "bootstrap":
        # One spare level on top of the planner's count: with FLEXIBLEAUTO a bootstrap input that arrives with a
        # pending rescale at the last planned level makes EvalBootstrap drop its last RNS tower (measured,
        # openfhe 1.6.1: "DropLastElement(): Removing last element of DCRTPoly renders it invalid").
        final = final.with_(depth=final.depth + BOOTSTRAP_HEADROOM)
        if not final.insecure:
            final = final.with_(ring_dim=max(final.ring_dim, final.min_secure_ring_dim()))
    decode_input = None
    for kind, _, c in jobs:
        if kind == "decode" and "x" in c.input_layouts:
            decode_input = c.input_layouts["x"].to_dict()
            break
    summary = {}
    for kind in ("full", "prefill", "decode"):
        keys = [k for k in plans if k[0] == kind]
        if keys:
            k = max(keys, key=lambda k: k[1])
            pl = plans[k]
            summary[kind] = {"length": k[1], "counts": pl.counts, "depth": pl.depth,
                             "predicted_seconds": pl.predicted_seconds, "time_by_op": pl.time_by_op,
                             "report": pl.report()}
    spec_dir = os.path.abspath(os.path.join(model.directory, "server")) if getattr(model, "directory", None) else None
    return ExportPlan(params=final, start_level=starts.pop(), rotation_keys=sorted(rot), mode=mode,
                      levels_after_bootstrap=lb, max_leveled_depth=max_leveled_depth, bounds=bounds,
                      digest=spec_digest(spec), family=model.family, max_length=max_len,
                      hidden_size=spec.config["hidden_size"], block=block, slots=slots, kv_cache=kv_cache,
                      spec_dir=spec_dir, summary=summary, groups=groups, decode_input=decode_input)


# ------------------------------------------------------------------------------------------------------
# client


def _roles():
    from . import roles

    return roles


class EncryptedClient:
    """The data owner: holds the secret key for one export, encrypts embeddings, decrypts logits."""

    def __init__(self, plan: ExportPlan, cc, keypair):
        self.plan, self.cc, self.keypair = plan, cc, keypair
        self.key_tag = keypair.secretKey.GetKeyTag()

    @classmethod
    def generate(cls, plan: ExportPlan) -> "EncryptedClient":
        """Generate ONE key set (relinearisation, the union of rotation keys, bootstrapping if planned)."""
        from .roles import generate_keys

        return cls(plan, *generate_keys(plan.params, plan.rotation_keys))

    def encrypt_embeddings(self, x, decode: bool = False) -> bytes:
        """``rows x hidden_size`` embeddings (a prompt, or with ``decode=True`` the one new token of a decode step,
        packed the way the export's decode circuits read it: ``plan.decode_input``) -> bytes."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.plan.hidden_size or not 1 <= x.shape[0] <= self.plan.max_length:
            raise LayoutError(f"embeddings must have shape (1..{self.plan.max_length}, {self.plan.hidden_size}), got {x.shape}")
        if decode and x.shape[0] != 1:
            raise LayoutError(f"a decode step takes one token's embedding (1 x {self.plan.hidden_size}), got {x.shape}")
        if decode and self.plan.decode_input:
            L = layout_from_dict(self.plan.decode_input)
        else:
            L = MatrixLayout(x.shape[0], x.shape[1], self.plan.block, self.plan.slots, groups=self.plan.groups)
        cts = []
        for v in L.pack(x):
            pt = self.cc.MakeCKKSPackedPlaintext(v, 1, self.plan.start_level, None, self.plan.params.slots)
            cts.append(self.cc.Encrypt(self.keypair.publicKey, pt))
        return _roles().EncryptedTensor(L, cts, self.key_tag, self.cc.GetRingDimension()).to_bytes()

    def decrypt(self, data) -> np.ndarray:
        """Any encrypted tensor of this session (bytes or EncryptedTensor) -> its matrix."""
        t = data if isinstance(data, _roles().EncryptedTensor) else _roles().EncryptedTensor.from_bytes(data)
        if t.key_tag != self.key_tag or any(ct.GetKeyTag() != self.key_tag for ct in t.cts):
            raise KeyMismatchError(f"this ciphertext was made under another key (tag {t.key_tag[:12]}..., this client "
                                   f"holds {self.key_tag[:12]}...)")
        vecs = []
        for ct in t.cts:
            pt = self.cc.Decrypt(self.keypair.secretKey, ct)
            pt.SetLength(self.plan.params.slots)
            vecs.append(np.asarray(pt.GetRealPackedValue(), dtype=np.float64))
        return t.layout.unpack(vecs)

    def decrypt_logits(self, data) -> np.ndarray:
        """Encrypted ``1 x n`` logits -> a length-``n`` vector."""
        return self.decrypt(data).reshape(-1)

    def server_bundle(self, directory) -> str:
        """What the server needs: plan, crypto context, public evaluation keys (relin, rotations,
        bootstrapping) and a reference to the spec (path + digest). Never the secret key."""
        roles = _roles()
        ofhe = roles.import_openfhe()
        os.makedirs(directory, exist_ok=True)
        roles._write(os.path.join(directory, "context.bin"), roles._ser(self.cc))
        roles._write(os.path.join(directory, "eval_mult_keys.bin"), ofhe.SerializeEvalMultKeyString(ofhe.BINARY, self.key_tag))
        roles.write_automorphism_keys(os.path.join(directory, "eval_automorphism_keys.bin"), self.key_tag)
        with open(os.path.join(directory, "bundle.json"), "w") as f:
            json.dump({"format": BUNDLE_FORMAT, "key_tag": self.key_tag, "plan": self.plan.to_dict()}, f, indent=1)
        return str(directory)

    def save(self, directory) -> str:
        """Everything this client needs later, SECRET KEY INCLUDED: keep the directory private."""
        roles = _roles()
        os.makedirs(directory, exist_ok=True)
        roles._write(os.path.join(directory, "context.bin"), roles._ser(self.cc))
        roles._write(os.path.join(directory, "public_key.bin"), roles._ser(self.keypair.publicKey))
        roles._write(os.path.join(directory, "secret_key.bin"), roles._ser(self.keypair.secretKey))
        with open(os.path.join(directory, "client.json"), "w") as f:
            json.dump({"format": CLIENT_FORMAT, "key_tag": self.key_tag, "plan": self.plan.to_dict()}, f, indent=1)
        return str(directory)

    @classmethod
    def load(cls, directory) -> "EncryptedClient":
        roles = _roles()
        ofhe = roles.import_openfhe()
        meta = roles._read_meta(os.path.join(directory, "client.json"), CLIENT_FORMAT)
        cc = roles._deser(ofhe.DeserializeCryptoContextString, roles._read(os.path.join(directory, "context.bin")), "context")
        kp = roles._KeyPair(
            roles._deser(ofhe.DeserializePublicKeyString, roles._read(os.path.join(directory, "public_key.bin")), "public key"),
            roles._deser(ofhe.DeserializePrivateKeyString, roles._read(os.path.join(directory, "secret_key.bin")), "secret key"))
        return cls(ExportPlan.from_dict(meta["plan"]), cc, kp)


# ------------------------------------------------------------------------------------------------------
# server


def _load_eval_keys(ofhe, fn, data, what):
    try:
        fn(data, ofhe.BINARY)
    except RuntimeError as e:
        # OpenFHE's key store is process-wide: a client in this process already inserted these keys (same tag)
        if "key vector for the given keyTag" not in str(e) and "already" not in str(e):
            raise SerializationError(f"cannot load the {what}: {e}") from e


@dataclass
class _Session:
    position: int = 0
    caches: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)


class EncryptedServer:
    """Evaluates any circuit of one export on one client's ciphertexts. Holds no secret key.

    ``EncryptedServer(bundle_dir, spec=None)``: ``spec`` is a :class:`TransformerSpec` or the export's
    ``server/`` directory (default: the path recorded in the bundle); its digest must match the keys'."""

    def __init__(self, bundle_dir, spec=None):
        roles = _roles()
        ofhe = roles.import_openfhe()
        meta = roles._read_meta(os.path.join(bundle_dir, "bundle.json"), BUNDLE_FORMAT)
        self.plan = ExportPlan.from_dict(meta["plan"])
        self.key_tag = meta["key_tag"]
        if spec is None:
            if not self.plan.spec_dir:
                raise SerializationError("the bundle records no spec directory: pass spec=")
            spec = self.plan.spec_dir
        self.spec = spec if isinstance(spec, TransformerSpec) else TransformerSpec.load(spec)
        if spec_digest(self.spec) != self.plan.digest:
            raise KeyMismatchError("the model spec differs from the one the session keys were planned for "
                                   "(another export or modified weights)")
        self.cc = roles._deser(ofhe.DeserializeCryptoContextString, roles._read(os.path.join(bundle_dir, "context.bin")), "context")
        _load_eval_keys(ofhe, ofhe.DeserializeEvalMultKeyString, roles._read(os.path.join(bundle_dir, "eval_mult_keys.bin")),
                        "relinearisation keys")
        try:
            roles.load_automorphism_keys(os.path.join(bundle_dir, "eval_automorphism_keys.bin"), self.key_tag, self.cc,
                                         len(set(self.plan.rotation_keys)))
        except (OSError, RuntimeError) as e:
            if "already" not in str(e) and "key vector for the given keyTag" not in str(e):
                raise SerializationError(f"cannot load the rotation keys: {e}") from e
        if self.plan.params.bootstrap:
            from .backends.openfhe_backend import setup_bootstrap

            self.cc.Enable(ofhe.FHE)
            setup_bootstrap(self.cc, self.plan.params)
        from .backends.openfhe_backend import OpenFHEBackend

        self.backend = OpenFHEBackend(self.cc, self.plan.params.slots)
        self._evaluators: dict = {}
        self.sessions: dict = {}
        self.last_timings: dict = {}

    # -- circuits ------------------------------------------------------------------------------------
    def evaluator(self, kind: str, n: int, attention_mask=None) -> Evaluator:
        """Planned evaluator of circuit ``kind`` ("full", "prefill", "decode") for length/position ``n``."""
        key = (kind, n, None if attention_mask is None else tuple(np.asarray(attention_mask).reshape(-1).astype(int).tolist()))
        if key not in self._evaluators:
            g, s = self.plan.groups, self.plan.slots
            if kind == "decode":  # on vectors only if the keys were planned so (exports before vector decode: not)
                c = build_decode_circuit(self.spec, n, groups=g, slots=s, vectors=self.plan.decode_input is not None)
                reads = c.layouts()["x"].to_dict()
                if self.plan.decode_input and reads != self.plan.decode_input:
                    raise KeyMismatchError(f"the decode circuit reads {reads}, the session keys were planned for "
                                           f"{self.plan.decode_input}: re-plan the export")
            else:
                c = build_circuit(self.spec, n, attention_mask, kv_cache=(kind == "prefill"), groups=g, slots=s)
            pl = self.plan.plan_circuit(c, kind)
            ev = Evaluator(pl.circuit, self.backend)
            ev.plan = pl
            if len(self._evaluators) > 256:
                self._evaluators.clear()
            self._evaluators[key] = ev
        return self._evaluators[key]

    def _tensor(self, data, rows: int, name="x", want=None):
        roles = _roles()
        t = data if isinstance(data, roles.EncryptedTensor) else roles.EncryptedTensor.from_bytes(data)
        if t.key_tag != self.key_tag or any(ct.GetKeyTag() != self.key_tag for ct in t.cts):
            raise KeyMismatchError(f"{name!r} was encrypted under another key (tag {t.key_tag[:12]}..., this server's "
                                   f"session uses {self.key_tag[:12]}...)")
        if t.ring_dim != self.cc.GetRingDimension():
            raise KeyMismatchError(f"{name!r} belongs to another crypto context (ring {t.ring_dim})")
        want = want or MatrixLayout(rows, self.plan.hidden_size, self.plan.block, self.plan.slots, groups=self.plan.groups)
        if not same_packing(t.layout, want):
            raise LayoutError(f"{name!r} has layout {t.layout.to_dict()}, expected {rows} x {self.plan.hidden_size} "
                              f"embeddings packed as {want.to_dict()}")
        return Packed(want, t.cts)

    def _run(self, ev: Evaluator, inputs: dict) -> dict:
        """Evaluator.run with wall-clock time per block (norms, attention, mlp, head, bootstrap)."""
        env = ev.check_inputs(inputs)
        blocks = ev.circuit.meta.get("blocks", {})
        times: dict = {}
        for node in ev.circuit.nodes:
            t0 = time.perf_counter()
            cts = OPS[node.op].execute(ev, node, [env[i] for i in node.inputs])
            env[node.name] = Packed(ev.layouts[node.name], cts)
            b = "bootstrap" if node.op == "bootstrap" else blocks.get(node.name, "residual")
            times[b] = times.get(b, 0.0) + time.perf_counter() - t0
        ev.last_babies = ev.last_rescaled = None  # release the cached rotations (ops.Linear.babies)
        self.last_timings = times
        return {o: env[o] for o in ev.circuit.outputs}

    def _logits_bytes(self, packed: Packed) -> bytes:
        return _roles().EncryptedTensor(packed.layout, packed.cts, self.key_tag, self.cc.GetRingDimension()).to_bytes()

    def run(self, seq_len: int, x, attention_mask=None) -> bytes:
        """One forward pass over ``seq_len`` encrypted embeddings -> encrypted logits (bytes)."""
        ev = self.evaluator("full", int(seq_len), attention_mask)
        out = self._run(ev, {"x": self._tensor(x, int(seq_len))})
        return self._logits_bytes(out["logits"])

    # -- generation sessions (encrypted KV cache) ------------------------------------------------------
    def start_session(self) -> str:
        if not self.plan.kv_cache:
            raise SessionError("this bundle was planned without kv_cache; use run() per token")
        sid = uuid.uuid4().hex
        self.sessions[sid] = _Session()
        return sid

    def _session(self, sid) -> _Session:
        if sid not in self.sessions:
            raise SessionError(f"unknown or finished session {sid!r}")
        return self.sessions[sid]

    def prefill(self, session_id: str, x) -> bytes:
        """The prompt's encrypted embeddings -> encrypted last-token logits; keeps K/V for this session."""
        s = self._session(session_id)
        if s.position:
            raise SessionError(f"session {session_id!r} already has {s.position} tokens; prefill starts a session")
        t = x if isinstance(x, _roles().EncryptedTensor) else _roles().EncryptedTensor.from_bytes(x)
        n = t.layout.rows
        out = self._run(self.evaluator("prefill", n), {"x": self._tensor(t, n)})
        s.caches = {k: out[k] for k in cache_names(self.spec)}
        s.position = n
        return self._logits_bytes(out["logits"])

    def decode(self, session_id: str, x) -> bytes:
        """The next token's encrypted embedding (``1 x d``) -> encrypted logits; one token's work."""
        s = self._session(session_id)
        if not s.position:
            raise SessionError(f"session {session_id!r} has no prompt yet: call prefill first")
        if s.position >= self.plan.max_length:
            raise SessionError(f"session {session_id!r} reached the export's max_length {self.plan.max_length}")
        ev = self.evaluator("decode", s.position)
        inputs = {"x": self._tensor(x, 1, want=ev.layouts["x"]), **{f"{k}_cache": v for k, v in s.caches.items()}}
        out = self._run(ev, inputs)
        s.caches = {k: out[k] for k in cache_names(self.spec)}
        s.position += 1
        return self._logits_bytes(out["logits"])

    def end_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


class EncryptedGeneration:
    """Client side of one generation: a ``runner`` for :meth:`EncryptedModel.generate` that encrypts each
    embedding, lets ``server`` (an :class:`EncryptedServer` or anything with its prefill/decode bytes API)
    work on ciphertexts, and decrypts the logits. Token choice stays with the caller."""

    def __init__(self, client: EncryptedClient, server):
        self.client, self.server, self.session = client, server, None
        self.timings: list = []

    def prefill(self, x) -> np.ndarray:
        if self.session is not None:
            self.server.end_session(self.session)
        self.session = self.server.start_session()
        return self._timed("prefill", lambda: self.server.prefill(self.session, self.client.encrypt_embeddings(x)))

    def decode(self, x_row) -> np.ndarray:
        return self._timed("decode", lambda: self.server.decode(self.session, self.client.encrypt_embeddings(x_row, decode=True)))

    def _timed(self, what, fn):
        t0 = time.perf_counter()
        logits = self.client.decrypt_logits(fn())
        self.timings.append((what, time.perf_counter() - t0, dict(getattr(self.server, "last_timings", {}))))
        return logits

    def close(self):
        if self.session is not None:
            self.server.end_session(self.session)
            self.session = None
