"""Client and Server: who holds what.

- :class:`Client` plans the circuit, generates keys, encrypts inputs and decrypts outputs. It alone holds the
  secret key (``Client.save`` writes it to the client's own directory).
- :class:`Server` loads a *server bundle* (circuit, plan, crypto context, public evaluation keys: relin,
  rotation, bootstrapping) and evaluates. It never receives a secret key; ``tests/test_he_roles.py`` proves it.

Everything crosses the process boundary as bytes/files: :class:`EncryptedTensor` serialises to a checksummed
container (magic, JSON header with layout and key tag, OpenFHE BINARY ciphertexts), so corrupted or foreign
bytes are refused before OpenFHE parses them.

Usage::

    client = Client.generate(circuit, params.default())       # plan + keys
    client.export_server_bundle("server_dir")                   # no secret key in it
    blob = client.encrypt("x", X).to_bytes()
    server = Server("server_dir")                               # e.g. another process
    out = server.run({"x": blob})                               # name -> EncryptedTensor
    y = client.decrypt(out["y"])
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import struct
import tempfile

import numpy as np
from tqdm.auto import tqdm

from . import params as P
from .backends.openfhe_backend import OpenFHEBackend, build_context, import_openfhe, setup_bootstrap
from .errors import CircuitError, KeyMismatchError, LayoutError, SerializationError
from .interpreter import Evaluator, Packed
from .ir import Circuit
from .packing import layout_from_dict
from .planner import Plan, _key_bytes, plan as make_plan

MAGIC = b"HFPHECT1"
BUNDLE_FORMAT = "hf_polyhe.server_bundle"
CLIENT_FORMAT = "hf_polyhe.client"


def _ser(obj) -> bytes:
    ofhe = import_openfhe()
    data = ofhe.Serialize(obj, ofhe.BINARY)
    return data if isinstance(data, bytes) else data.encode()


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def _read(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SerializationError(f"cannot read {path!r}: {e}") from e


class EncryptedTensor:
    """A packed encrypted tensor: layout, the secret key's tag, one OpenFHE ciphertext per block."""

    def __init__(self, layout, cts, key_tag: str, ring_dim: int):
        self.layout, self.cts, self.key_tag, self.ring_dim = layout, list(cts), key_tag, int(ring_dim)

    def to_bytes(self) -> bytes:
        payloads = [_ser(ct) for ct in self.cts]
        header = json.dumps({
            "layout": self.layout.to_dict(), "key_tag": self.key_tag, "ring_dim": self.ring_dim,
            "sizes": [len(p) for p in payloads], "sha256": [hashlib.sha256(p).hexdigest() for p in payloads],
        }).encode()
        return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(payloads)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptedTensor":
        ofhe = import_openfhe()
        if not isinstance(data, (bytes, bytearray)) or len(data) < 16 or bytes(data[:8]) != MAGIC:
            raise SerializationError("not an hf_polyhe encrypted tensor (bad magic)")
        (hlen,) = struct.unpack("<Q", data[8:16])
        try:
            header = json.loads(bytes(data[16 : 16 + hlen]).decode())
            layout = layout_from_dict(header["layout"])
            sizes, digests = header["sizes"], header["sha256"]
        except Exception as e:
            raise SerializationError(f"corrupted encrypted-tensor header: {e}") from e
        pos, cts = 16 + hlen, []
        if pos + sum(sizes) != len(data) or len(sizes) != layout.num_cts:
            raise SerializationError(f"encrypted tensor is truncated or has trailing bytes ({len(data)} bytes)")
        for n, dg in zip(sizes, digests):
            chunk = bytes(data[pos : pos + n])
            pos += n
            if hashlib.sha256(chunk).hexdigest() != dg:
                raise SerializationError("encrypted tensor payload is corrupted (checksum mismatch)")
            try:
                cts.append(ofhe.DeserializeCiphertextString(chunk, ofhe.BINARY))
            except Exception as e:
                raise SerializationError(f"OpenFHE could not parse a ciphertext: {e}") from e
        return cls(layout, cts, header["key_tag"], header["ring_dim"])

    def save(self, path):
        _write(path, self.to_bytes())

    @classmethod
    def load(cls, path):
        return cls.from_bytes(_read(path))


class _Role:
    plan: Plan
    cc: object
    key_tag: str

    def _check_tensor(self, t: "EncryptedTensor", want_layout, name: str):
        if not isinstance(t, EncryptedTensor):
            raise LayoutError(f"{name!r}: expected an EncryptedTensor or its bytes, got {type(t).__name__}")
        if t.key_tag != self.key_tag or any(ct.GetKeyTag() != self.key_tag for ct in t.cts):
            raise KeyMismatchError(f"{name!r} was encrypted under another key (tag {t.key_tag[:12]}..., "
                                   f"this session uses {self.key_tag[:12]}...)")
        ring = self.cc.GetRingDimension()
        if t.ring_dim != ring or any(ct.GetCryptoContext().GetRingDimension() != ring for ct in t.cts):
            raise KeyMismatchError(f"{name!r} belongs to another crypto context (ring {t.ring_dim}, expected {ring})")
        if want_layout is not None and t.layout != want_layout:
            raise LayoutError(f"{name!r} has layout {t.layout.to_dict()}, expected {want_layout.to_dict()}")
        for ct in t.cts:
            if ct.GetSlots() not in (0, self.plan.params.slots):
                raise LayoutError(f"{name!r}: ciphertext packs {ct.GetSlots()} slots, expected {self.plan.params.slots}")


def _plan_meta(pl: Plan, key_tag: str) -> dict:
    return {"params": pl.params.to_dict(), "start_level": pl.start_level, "rotation_keys": pl.rotation_keys,
            "key_tag": key_tag, "report": pl.report()}


ROTATION_KEY_BATCH = 8  # rotation keys generated and serialised together (~1 GB a batch at N = 2^16)
KEY_PARTS_MAGIC = b"HFPHKEYPARTS1\n"
_SPOOLS: dict = {}  # key tag -> private file holding this process's serialised automorphism keys, in parts


def _spool_cleanup():
    for path in _SPOOLS.values():
        try:
            os.remove(path)
        except OSError:
            pass


atexit.register(_spool_cleanup)


KEY_PARTS_MIN_GIB = float(os.environ.get("HF_POLYHE_KEY_PARTS_GIB", "4"))  # smaller key sets: one piece


def generate_keys(params: P.CKKSParams, rotation_keys) -> tuple:
    """``(crypto context, key pair)`` with every evaluation key a planned circuit needs: relinearisation, the
    given rotation indices and, when ``params.bootstrap``, bootstrapping keys. Toy parameters warn.

    Key sets over ``HF_POLYHE_KEY_PARTS_GIB`` (default 4 GiB, and any bootstrapping set) are generated in
    batches of :data:`ROTATION_KEY_BATCH`, each serialised right away to a private spool file (0600, removed at
    exit) that :func:`write_automorphism_keys` later copies into a server bundle: at 128-bit a W1 key set is ~10 GB, and serialising it in one piece would hold it twice."""
    if params.insecure:
        P.warn_toy()
    cc = build_context(params)
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    rot = list(rotation_keys or [])
    jobs = ([("bootstrap", None)] if params.bootstrap else []) + [
        ("rotate", rot[i : i + ROTATION_KEY_BATCH]) for i in range(0, len(rot), ROTATION_KEY_BATCH)]
    small = _key_bytes(params.with_(ring_dim=cc.GetRingDimension()), len(rot))["rotation"] < KEY_PARTS_MIN_GIB * 2**30
    if len(jobs) <= 1 or (not params.bootstrap and small):
        if rot:
            cc.EvalRotateKeyGen(kp.secretKey, rot)
        if params.bootstrap:
            cc.EvalBootstrapKeyGen(kp.secretKey, params.slots)
        return cc, kp
    ofhe = import_openfhe()
    tag = kp.secretKey.GetKeyTag()
    others = {t: m for t, m in ofhe.CryptoContext.GetAllEvalAutomorphismKeys().items() if t != tag}
    fd, path = tempfile.mkstemp(prefix="hf_polyhe_keys_")  # mode 0600
    _SPOOLS[tag] = path
    maps = []
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(KEY_PARTS_MAGIC + struct.pack("<I", len(jobs)))
            for kind, idx in tqdm(jobs, desc="evaluation keys", unit="batch", leave=False,
                                  disable=len(jobs) < 4 or None):
                ofhe.CryptoContext.ClearEvalAutomorphismKeys()  # the store then holds this batch only
                if kind == "bootstrap":
                    cc.EvalBootstrapKeyGen(kp.secretKey, params.slots)
                else:
                    cc.EvalRotateKeyGen(kp.secretKey, idx)
                maps.append(cc.GetEvalAutomorphismKeyMap(tag))
                data = ofhe.SerializeEvalAutomorphismKeyString(ofhe.BINARY, tag)
                data = data if isinstance(data, bytes) else data.encode()
                f.write(struct.pack("<Q", len(data)))
                f.write(data)
                del data
    finally:
        ofhe.CryptoContext.ClearEvalAutomorphismKeys()
        for t, m in others.items():
            cc.InsertEvalAutomorphismKey(m, t)
        for m in maps:  # every batch back into the store (the same key objects: no copy, no new memory)
            cc.InsertEvalAutomorphismKey(m, tag)
    return cc, kp


def write_automorphism_keys(path, key_tag: str) -> None:
    """Write the rotation/bootstrapping keys of ``key_tag`` to ``path``: a copy of the spool file when the keys
    were generated in parts here, else one OpenFHE string."""
    if key_tag in _SPOOLS and os.path.exists(_SPOOLS[key_tag]):
        shutil.copyfile(_SPOOLS[key_tag], path)
        return
    ofhe = import_openfhe()
    _write(path, ofhe.SerializeEvalAutomorphismKeyString(ofhe.BINARY, key_tag))


def load_automorphism_keys(path, key_tag: str, cc=None, expected: int = 0) -> None:
    """Load the keys :func:`write_automorphism_keys` wrote (parts or one string) into OpenFHE's process-wide
    store. Skipped when ``cc`` already sees ``expected`` (> 0) or more keys for ``key_tag`` (a client in this
    process generated them): reading them again would only double the memory."""
    ofhe = import_openfhe()
    if cc is not None and expected > 0:
        try:
            have = len(cc.GetExistingEvalAutomorphismKeyIndices(key_tag))
        except Exception:  # no keys under this tag yet
            have = 0
        if have >= expected:
            return
    with open(path, "rb") as f:
        head = f.read(len(KEY_PARTS_MAGIC))
        if head != KEY_PARTS_MAGIC:
            f.seek(0)
            ofhe.DeserializeEvalAutomorphismKeyString(f.read(), ofhe.BINARY)
            return
        (n,) = struct.unpack("<I", f.read(4))
        for _ in range(n):
            raw = f.read(8)
            if len(raw) != 8:
                raise SerializationError(f"{path}: truncated key file")
            (size,) = struct.unpack("<Q", raw)
            data = f.read(size)
            if len(data) != size:
                raise SerializationError(f"{path}: truncated key file")
            ofhe.DeserializeEvalAutomorphismKeyString(data, ofhe.BINARY)
            del data


class Client(_Role):
    """Holds the secret key. Build with :meth:`generate` (new keys) or :meth:`load` (saved client)."""

    def __init__(self, plan: Plan, cc, keypair):
        self.plan, self.cc, self.keypair = plan, cc, keypair
        self.key_tag = keypair.secretKey.GetKeyTag()
        self.layouts = plan.circuit.layouts()

    @classmethod
    def generate(cls, circuit_or_plan, params: P.CKKSParams | None = None, **plan_kwargs) -> "Client":
        pl = circuit_or_plan if isinstance(circuit_or_plan, Plan) else make_plan(circuit_or_plan, params, **plan_kwargs)
        return cls(pl, *generate_keys(pl.params, pl.rotation_keys))

    # -- data ---------------------------------------------------------------------------------------
    def encrypt(self, name: str, x) -> EncryptedTensor:
        if name not in self.plan.circuit.inputs:
            raise CircuitError(f"unknown input {name!r}; the circuit takes {sorted(self.plan.circuit.inputs)}")
        L = self.layouts[name]
        cts = []
        for v in L.pack(x):
            pt = self.cc.MakeCKKSPackedPlaintext(v, 1, self.plan.start_level, None, self.plan.params.slots)
            cts.append(self.cc.Encrypt(self.keypair.publicKey, pt))
        return EncryptedTensor(L, cts, self.key_tag, self.cc.GetRingDimension())

    def decrypt(self, t) -> np.ndarray:
        if isinstance(t, (bytes, bytearray)):
            t = EncryptedTensor.from_bytes(t)
        self._check_tensor(t, None, "output")
        vecs = []
        for ct in t.cts:
            pt = self.cc.Decrypt(self.keypair.secretKey, ct)
            pt.SetLength(self.plan.params.slots)
            vecs.append(np.asarray(pt.GetRealPackedValue(), dtype=np.float64))
        return t.layout.unpack(vecs)

    # -- files --------------------------------------------------------------------------------------
    def export_server_bundle(self, directory) -> str:
        """Circuit, plan, crypto context and public evaluation keys -- never the secret key."""
        ofhe = import_openfhe()
        os.makedirs(directory, exist_ok=True)
        self.plan.circuit.save(os.path.join(directory, "circuit"))
        _write(os.path.join(directory, "context.bin"), _ser(self.cc))
        _write(os.path.join(directory, "eval_mult_keys.bin"), ofhe.SerializeEvalMultKeyString(ofhe.BINARY, self.key_tag))
        if self.plan.rotation_keys or self.plan.params.bootstrap:
            write_automorphism_keys(os.path.join(directory, "eval_automorphism_keys.bin"), self.key_tag)
        with open(os.path.join(directory, "bundle.json"), "w") as f:
            json.dump({"format": BUNDLE_FORMAT, **_plan_meta(self.plan, self.key_tag)}, f, indent=1)
        return str(directory)

    def save(self, directory) -> str:
        """Everything the client needs later, SECRET KEY INCLUDED: keep this directory private."""
        os.makedirs(directory, exist_ok=True)
        self.plan.circuit.save(os.path.join(directory, "circuit"))
        _write(os.path.join(directory, "context.bin"), _ser(self.cc))
        _write(os.path.join(directory, "public_key.bin"), _ser(self.keypair.publicKey))
        _write(os.path.join(directory, "secret_key.bin"), _ser(self.keypair.secretKey))
        with open(os.path.join(directory, "client.json"), "w") as f:
            json.dump({"format": CLIENT_FORMAT, **_plan_meta(self.plan, self.key_tag)}, f, indent=1)
        return str(directory)

    @classmethod
    def load(cls, directory) -> "Client":
        ofhe = import_openfhe()
        meta = _read_meta(os.path.join(directory, "client.json"), CLIENT_FORMAT)
        pl = _plan_from_meta(meta, Circuit.load(os.path.join(directory, "circuit")))
        cc = _deser(ofhe.DeserializeCryptoContextString, _read(os.path.join(directory, "context.bin")), "context")
        kp = _KeyPair(
            _deser(ofhe.DeserializePublicKeyString, _read(os.path.join(directory, "public_key.bin")), "public key"),
            _deser(ofhe.DeserializePrivateKeyString, _read(os.path.join(directory, "secret_key.bin")), "secret key"),
        )
        return cls(pl, cc, kp)


class _KeyPair:
    """openfhe.KeyPair has no Python constructor; this holds a deserialised pair."""

    def __init__(self, public_key, secret_key):
        self.publicKey, self.secretKey = public_key, secret_key


def _deser(fn, data, what):
    ofhe = import_openfhe()
    try:
        return fn(data, ofhe.BINARY)
    except Exception as e:
        raise SerializationError(f"cannot deserialize the {what}: {e}") from e


def _read_meta(path, fmt):
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise SerializationError(f"cannot read {path!r}: {e}") from e
    if meta.get("format") != fmt:
        raise SerializationError(f"{path!r} is not a {fmt} file")
    return meta


def _plan_from_meta(meta, circuit) -> Plan:
    p = P.CKKSParams.from_dict(meta["params"])
    return Plan(circuit=circuit, params=p, levels={}, depth=0, rotation_keys=list(meta["rotation_keys"]), counts={},
                inserted_bootstraps=[], start_level=int(meta["start_level"]), key_bytes={}, predicted_seconds=0.0)


class Server(_Role):
    """Loads a server bundle and evaluates the circuit on encrypted inputs. Holds no secret key."""

    def __init__(self, directory):
        ofhe = import_openfhe()
        meta = _read_meta(os.path.join(directory, "bundle.json"), BUNDLE_FORMAT)
        self.plan = _plan_from_meta(meta, Circuit.load(os.path.join(directory, "circuit")))
        self.key_tag = meta["key_tag"]
        self.cc = _deser(ofhe.DeserializeCryptoContextString, _read(os.path.join(directory, "context.bin")), "context")
        try:
            try:
                ofhe.DeserializeEvalMultKeyString(_read(os.path.join(directory, "eval_mult_keys.bin")), ofhe.BINARY)
            except RuntimeError as e:
                # OpenFHE's key cache is process-wide: a client in this process already inserted the same
                # keys (same key tag). Anything else is a real error.
                if "there is a key vector for the given keyTag" not in str(e):
                    raise
            path = os.path.join(directory, "eval_automorphism_keys.bin")
            if os.path.exists(path):
                load_automorphism_keys(path, self.key_tag, self.cc, len(set(self.plan.rotation_keys)))
        except SerializationError:
            raise
        except Exception as e:
            raise SerializationError(f"cannot load evaluation keys from {directory!r}: {e}") from e
        if self.plan.params.bootstrap:
            self.cc.Enable(ofhe.FHE)
            setup_bootstrap(self.cc, self.plan.params)
        self.backend = OpenFHEBackend(self.cc, self.plan.params.slots)
        self.evaluator = Evaluator(self.plan.circuit, self.backend)

    def run(self, inputs: dict) -> dict:
        """``inputs``: name -> :class:`EncryptedTensor` or its bytes. Returns name -> EncryptedTensor."""
        packed = {}
        for name, t in inputs.items():
            if isinstance(t, (bytes, bytearray)):
                t = EncryptedTensor.from_bytes(t)
            want = self.evaluator.layouts.get(name) if name in self.plan.circuit.inputs else None
            if want is None:
                raise CircuitError(f"unknown input {name!r}; the circuit takes {sorted(self.plan.circuit.inputs)}")
            self._check_tensor(t, want, name)
            packed[name] = Packed(want, t.cts)
        out = self.evaluator.run(packed)
        ring = self.cc.GetRingDimension()
        return {k: EncryptedTensor(v.layout, v.cts, self.key_tag, ring) for k, v in out.items()}
