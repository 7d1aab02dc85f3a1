"""Keys, key files and server bundles: everything that creates, writes or reads CKKS key material.

Two directories, two audiences::

    client key directory (SECRET: 0700, files 0600)    server bundle (public: what a server receives)
      client.json   plan + key tag                       bundle.json                plan + key tag
      context.bin   crypto context                       context.bin                crypto context
      public_key.bin                                     eval_mult_keys.bin         relinearisation key
      secret_key.bin                                     eval_automorphism_keys.bin rotation (+ bootstrapping) keys

OpenFHE keeps evaluation keys in a process-wide store keyed by the secret key's tag: :func:`generate_keys`
puts them there, :func:`read_bundle` loads a bundle's keys there (skipping keys a client in this process
already generated), and a :class:`~hf_polyhe.he.Server` finds them by tag.

The key cache (:func:`default_key_dir`) holds one ``<spec digest>-<params>/`` per export and parameter set,
with ``client/`` and ``server_bundle/`` inside.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import struct
import tempfile

from tqdm.auto import tqdm

from .. import params as P
from ..backends.openfhe import build_context, import_openfhe, serialize
from ..compile.export_plan import PLAN_VERSION, ExportPlan
from ..compile.planner import key_bytes
from ..errors import SerializationError
from ..files import read_document

CLIENT_FORMAT = "hf_polyhe.client_keys"
BUNDLE_FORMAT = "hf_polyhe.server_bundle"
BUNDLE_FILES = ("bundle.json", "context.bin", "eval_mult_keys.bin", "eval_automorphism_keys.bin")
ROTATION_KEY_BATCH = 8  # rotation keys generated and serialised together (~1 GB a batch at N = 2^16)
KEY_PARTS_MAGIC = b"HFPHKEYPARTS1\n"
KEY_PARTS_MIN_GIB = float(os.environ.get("HF_POLYHE_KEY_PARTS_GIB", "4"))  # smaller key sets: one piece


class KeyPair:
    """A public/secret key pair (``openfhe.KeyPair`` has no Python constructor for deserialised keys)."""

    def __init__(self, public_key, secret_key):
        self.publicKey, self.secretKey = public_key, secret_key


def default_key_dir() -> str:
    """Where keys are cached: ``$HF_POLYHE_KEY_DIR``, else ``$HF_HOME/hf_polyhe/keys``, else
    ``$XDG_CACHE_HOME/hf_polyhe/keys``, else ``~/.cache/hf_polyhe/keys``."""
    if os.environ.get("HF_POLYHE_KEY_DIR"):
        return os.environ["HF_POLYHE_KEY_DIR"]
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            return os.path.join(os.environ[var], "hf_polyhe", "keys")
    return os.path.join(os.path.expanduser("~"), ".cache", "hf_polyhe", "keys")


# Bumped when the planner's level accounting changes, so that keys cached for an older plan (which a server now
# refuses) are not reused: "ps" = Chebyshev series counted and run as the least-depth Paterson-Stockmeyer; then
# the planner's version (export_plan.PLAN_VERSION)
CACHE_LAYOUT = f"ps{PLAN_VERSION}"


def cache_dirs(key_dir, digest: str, params: P.CKKSParams) -> tuple:
    """``(client directory, server bundle directory)`` of one export's keys in the key cache ``key_dir``."""
    root = os.path.join(str(key_dir or default_key_dir()), f"{digest[:16]}-{params.name}-{CACHE_LAYOUT}")
    return os.path.join(root, "client"), os.path.join(root, "server_bundle")


# -- generation ---------------------------------------------------------------------------------------------

_SPOOLS: dict = {}  # key tag -> private file holding this process's serialised automorphism keys, in parts


@atexit.register
def _spool_cleanup():
    for path in _SPOOLS.values():
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def _scratch_file(near: str | None = None):
    """``(file object, path OpenFHE can open)`` of a private scratch file, in the directory ``near`` when it is
    writable (a bundle's: where /tmp is a tmpfs, a scratch part there would sit in memory), else the system's
    temporary directory. On Linux an unnamed temporary file (nothing is left behind if the process is killed: a
    ring-2^17 bootstrapping part is ~15 GiB), opened by OpenFHE through ``/proc/self/fd``; elsewhere a 0600 file,
    removed afterwards."""
    if not os.path.isdir("/proc/self/fd"):
        fd, path = tempfile.mkstemp(prefix="hf_polyhe_keypart_")
        try:
            with os.fdopen(fd, "w+b") as named:
                yield named, path
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)
        return
    try:
        t = tempfile.TemporaryFile(dir=near) if near else tempfile.TemporaryFile()
    except OSError:  # a read-only bundle directory
        t = tempfile.TemporaryFile()
    with t:
        yield t, f"/proc/self/fd/{t.fileno()}"


def _append_part(f, tag: str) -> None:
    """Append the store's automorphism keys of ``tag`` to the open spool ``f`` as one part (length, then bytes).
    OpenFHE writes them to a scratch file, which is then copied in chunks: serialising to a string held a second
    copy of the keys (a ring-2^17 bootstrapping key set is ~15 GiB: measured, keygen for a 2-layer poly-LayerNorm
    PolyGPT went past 22 GiB while serialising it)."""
    ofhe = import_openfhe()
    with _scratch_file() as (t, path):
        if not ofhe.CryptoContext.SerializeEvalAutomorphismKey(path, ofhe.BINARY, tag):
            raise SerializationError("OpenFHE could not serialise the rotation keys")
        size = os.fstat(t.fileno()).st_size
        if shutil.disk_usage(tempfile.gettempdir()).free < (1 << 20):
            # a full disk may cut OpenFHE's last flush short and still report success
            raise SerializationError("no space left for the rotation keys' scratch file")
        t.seek(0)
        f.write(struct.pack("<Q", size))
        shutil.copyfileobj(t, f, 64 << 20)


def _load_part(f, size: int, path: str) -> None:
    """Load one part of ``size`` bytes at ``f``'s position into the store, through a scratch file (OpenFHE reads
    it as a stream: reading a part into memory first held a second copy of its keys)."""
    ofhe = import_openfhe()
    with _scratch_file(os.path.dirname(os.path.abspath(path))) as (t, scratch):
        left = size
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                raise SerializationError(f"{path}: truncated key file")
            t.write(chunk)
            left -= len(chunk)
        t.flush()
        try:
            ok = ofhe.CryptoContext.DeserializeEvalAutomorphismKey(scratch, ofhe.BINARY)
        except Exception as e:  # noqa: BLE001 (OpenFHE raises RuntimeError or ValueError on bad bytes)
            raise SerializationError(f"cannot load the rotation keys of {path}: {e}") from e
        if not ok:
            raise SerializationError(f"{path}: cannot load the rotation keys")


def generate_keys(params: P.CKKSParams, rotation_keys) -> tuple:
    """``(crypto context, KeyPair)`` with every evaluation key a plan needs in OpenFHE's key store:
    relinearisation, the given rotation indices and, when ``params.bootstrap``, bootstrapping keys. Toy
    parameters warn.

    Key sets over ``HF_POLYHE_KEY_PARTS_GIB`` (default 4 GiB, and any bootstrapping set) are generated in
    batches of :data:`ROTATION_KEY_BATCH`, each serialised right away to a private spool file (0600, removed at
    exit) that :func:`write_bundle` later copies: at 128-bit a W1 key set is ~10 GB, and serialising it in one
    piece would hold it twice."""
    if params.insecure:
        P.warn_toy()
    cc = build_context(params)
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    rot = list(rotation_keys or [])
    jobs = ([("bootstrap", None)] if params.bootstrap else []) + [
        ("rotate", rot[i : i + ROTATION_KEY_BATCH]) for i in range(0, len(rot), ROTATION_KEY_BATCH)]
    small = key_bytes(params.with_(ring_dim=cc.GetRingDimension()), len(rot))["rotation"] < KEY_PARTS_MIN_GIB * 2**30
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
        with os.fdopen(fd, "wb") as f, tqdm(jobs, desc="evaluation keys", unit="batch", leave=False,
                                            disable=len(jobs) < 4 or None) as bar:
            f.write(KEY_PARTS_MAGIC + struct.pack("<I", len(jobs)))
            for kind, idx in bar:
                ofhe.CryptoContext.ClearEvalAutomorphismKeys()  # the store then holds this batch only
                if kind == "bootstrap":
                    cc.EvalBootstrapKeyGen(kp.secretKey, params.slots)
                else:
                    cc.EvalRotateKeyGen(kp.secretKey, idx)
                maps.append(cc.GetEvalAutomorphismKeyMap(tag))
                _append_part(f, tag)
    finally:
        ofhe.CryptoContext.ClearEvalAutomorphismKeys()
        for t, m in others.items():
            cc.InsertEvalAutomorphismKey(m, t)
        for m in maps:  # every batch back into the store (the same key objects: no copy, no new memory)
            cc.InsertEvalAutomorphismKey(m, tag)
    return cc, KeyPair(kp.publicKey, kp.secretKey)


def has_eval_keys(key_tag: str) -> bool:
    """Whether OpenFHE's store in this process holds the relinearisation key of ``key_tag`` (keys generated or
    loaded here, as opposed to a client read from files whose evaluation keys live only in its bundle)."""
    ofhe = import_openfhe()
    try:
        return key_tag in ofhe.CryptoContext.GetAllEvalMultKeys()
    except Exception:  # pragma: no cover - older wheels without the accessor
        return False


# -- files --------------------------------------------------------------------------------------------------

def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def _read(path) -> bytes:
    """A key file's bytes: a regular file (a link to ``/dev/zero`` must not hang the reader)."""
    if not os.path.isfile(path):
        raise SerializationError(f"{path!r} is missing or not a regular file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SerializationError(f"cannot read {path!r}: {e}") from e


def _deserialize(fn, data, what):
    ofhe = import_openfhe()
    try:
        return fn(data, ofhe.BINARY)
    except Exception as e:
        raise SerializationError(f"cannot deserialize the {what}: {e}") from e


def _write_meta(path, fmt: str, key_tag: str, plan: ExportPlan):
    with open(path, "w") as f:
        json.dump({"format": fmt, "key_tag": key_tag, "plan": plan.to_dict()}, f, indent=1)


@contextlib.contextmanager
def _private_umask():
    """New files readable by their owner only (a secret key is never world-readable, not even briefly)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_client(directory, cc, keypair, plan: ExportPlan) -> str:
    """Everything a client needs later, SECRET KEY INCLUDED: directory 0700, files 0600."""
    directory = str(directory)
    with _private_umask():
        os.makedirs(directory, exist_ok=True)
        _write(os.path.join(directory, "context.bin"), serialize(cc))
        _write(os.path.join(directory, "public_key.bin"), serialize(keypair.publicKey))
        _write(os.path.join(directory, "secret_key.bin"), serialize(keypair.secretKey))
        _write_meta(os.path.join(directory, "client.json"), CLIENT_FORMAT, keypair.secretKey.GetKeyTag(), plan)
    os.chmod(directory, 0o700)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o600)
    return directory


def read_client(directory) -> tuple:
    """``(plan, crypto context, KeyPair)`` from a directory :func:`write_client` wrote."""
    ofhe = import_openfhe()
    meta = read_document(os.path.join(directory, "client.json"), CLIENT_FORMAT)
    cc = _deserialize(ofhe.DeserializeCryptoContextString, _read(os.path.join(directory, "context.bin")), "context")
    kp = KeyPair(
        _deserialize(ofhe.DeserializePublicKeyString, _read(os.path.join(directory, "public_key.bin")), "public key"),
        _deserialize(ofhe.DeserializePrivateKeyString, _read(os.path.join(directory, "secret_key.bin")), "secret key"))
    return ExportPlan.from_dict(meta["plan"]), cc, kp


def write_bundle(directory, cc, key_tag: str, plan: ExportPlan) -> str:
    """The server bundle of ``key_tag``'s keys (in this process's key store): plan, crypto context, public
    evaluation keys (relinearisation, rotations, bootstrapping). Never the secret key."""
    ofhe = import_openfhe()
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    _write(os.path.join(directory, "context.bin"), serialize(cc))
    _write(os.path.join(directory, "eval_mult_keys.bin"), ofhe.SerializeEvalMultKeyString(ofhe.BINARY, key_tag))
    path = os.path.join(directory, "eval_automorphism_keys.bin")
    if key_tag in _SPOOLS and os.path.exists(_SPOOLS[key_tag]):
        shutil.copyfile(_SPOOLS[key_tag], path)
    else:
        _write(path, ofhe.SerializeEvalAutomorphismKeyString(ofhe.BINARY, key_tag))
    _write_meta(os.path.join(directory, "bundle.json"), BUNDLE_FORMAT, key_tag, plan)
    return directory


def copy_bundle(src, directory) -> str:
    """Copy a server bundle's files (and nothing else) from ``src`` to ``directory``."""
    read_bundle_meta(src)
    os.makedirs(directory, exist_ok=True)
    for name in BUNDLE_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(directory, name))
    return str(directory)


def read_bundle_meta(directory) -> tuple:
    """``(plan, key tag)`` of a server bundle, without touching its keys."""
    meta = read_document(os.path.join(directory, "bundle.json"), BUNDLE_FORMAT)
    try:
        return ExportPlan.from_dict(meta["plan"]), str(meta["key_tag"])
    except (KeyError, TypeError) as e:
        raise SerializationError(f"{directory!r}: bundle.json lacks {e}") from e


def _load_eval_keys(fn, data, what):
    ofhe = import_openfhe()
    try:
        fn(data, ofhe.BINARY)
    except RuntimeError as e:
        # the store is process-wide: a client in this process already inserted these keys (same tag)
        if "key vector for the given keyTag" not in str(e) and "already" not in str(e):
            raise SerializationError(f"cannot load the {what}: {e}") from e


def _load_automorphism_keys(path, key_tag: str, cc, expected: int) -> None:
    """Load the keys :func:`write_bundle` wrote (parts or one string) into the store. Skipped when ``cc`` already
    sees ``expected`` (> 0) or more keys for ``key_tag`` (generated in this process): reading them again would
    only double the memory."""
    ofhe = import_openfhe()
    if expected > 0:
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
            _load_eval_keys(ofhe.DeserializeEvalAutomorphismKeyString, f.read(), "rotation keys")
            return
        (n,) = struct.unpack("<I", f.read(4))
        for _ in range(n):
            raw = f.read(8)
            if len(raw) != 8:
                raise SerializationError(f"{path}: truncated key file")
            (size,) = struct.unpack("<Q", raw)
            _load_part(f, size, path)


def read_bundle(directory, stage=None) -> tuple:
    """``(plan, key tag, crypto context)`` of a server bundle, its evaluation keys loaded into the store.
    ``stage(file name)`` is called before each file is handed to OpenFHE (a sandboxed loader reports which file
    crashed the parser)."""
    ofhe = import_openfhe()
    stage = stage or (lambda name: None)
    plan, key_tag = read_bundle_meta(directory)
    stage("context.bin")
    cc = _deserialize(ofhe.DeserializeCryptoContextString, _read(os.path.join(directory, "context.bin")), "context")
    stage("eval_mult_keys.bin")
    _load_eval_keys(ofhe.DeserializeEvalMultKeyString, _read(os.path.join(directory, "eval_mult_keys.bin")),
                    "relinearisation keys")
    path = os.path.join(directory, "eval_automorphism_keys.bin")
    if os.path.exists(path):
        stage("eval_automorphism_keys.bin")
        if not os.path.isfile(path):
            raise SerializationError(f"{path!r} is not a regular file")
        try:
            _load_automorphism_keys(path, key_tag, cc, len(set(plan.rotation_keys)))
        except (OSError, RuntimeError) as e:
            raise SerializationError(f"cannot load the rotation keys: {e}") from e
    return plan, key_tag, cc
