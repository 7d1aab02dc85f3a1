"""One session's CKKS work in its own process: ``python -m hf_polyhe.serve.worker``, started and supervised by
:mod:`hf_polyhe.serve.app` through :class:`hf_polyhe.he.runtime.sandbox.ChildProcess` (torch-free; its address
space is capped, it exits with its parent).

A crash of OpenFHE in here (a malformed key file or ciphertext) ends this process only: the server answers the
request with a 4xx/5xx naming what crashed, other sessions run in their own workers, and the session's keys
load again from its directory for its next job. Ending the process also frees every key it loaded (OpenFHE keeps
evaluation keys in a process-wide store that nothing else empties).

Requests (JSON header, bytes payload; replies likewise)::

    {"op": "reference", "plan": PLAN.json}   -> {"template", "ring_dim"} + the serialised crypto context of the
                                                server's plan (what every bundle's context.bin must equal)
    {"op": "load", "session": DIR, "plan": PLAN.json, "spec": SERVER_DIR}
                                             -> {"key_tag", "ring_dim"}: the bundle in DIR loaded (stages: the file
                                                names), its keys checked against the server's plan
    {"op": "run", "seq_len": L} | {"op": "prefill"|"decode", "stream": ID}   payload: an encrypted tensor
                                             -> {"timings"} + encrypted logits (stage "parsed" once the input is
                                                parsed); a stream's KV cache is kept in DIR/streams/ID/stream.bin
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from ..he.backends.openfhe import adopt, build_context, encrypt_vectors, import_openfhe, serialize
from ..he.circuit.evaluator import Packed
from ..he.circuit.packing import layout_from_dict
from ..he.compile.export_plan import ExportPlan
from ..he.errors import KeyMismatchError, SerializationError, StreamError
from ..he.files import read_json
from ..he.runtime.ciphertext import EncryptedTensor
from ..he.runtime.keys import read_bundle
from ..he.runtime.precheck import CiphertextTemplate
from ..he.runtime.sandbox import child_main
from ..he.runtime.server import Server, _Stream

STREAM_MAGIC = b"HFPHKV01"
_state: dict = {}


def _plan(path) -> ExportPlan:
    import warnings

    from ..he.errors import ToyParametersWarning

    with warnings.catch_warnings():  # the server allowed toy parameters explicitly (--allow-toy) or never plans them
        warnings.simplefilter("ignore", ToyParametersWarning)
        return ExportPlan.from_dict(read_json(path))


def reference(header: dict) -> tuple:
    """The crypto context of the server's plan, and the templates of a fresh ciphertext at its start level (see
    :func:`~hf_polyhe.he.runtime.precheck.check_fresh`: public key made here, public key read from bytes): made
    here from the plan's parameters (trusted) with a throwaway key."""
    ofhe = import_openfhe()
    plan = _plan(header["plan"])
    cc = build_context(plan.params, bootstrap_setup=False)
    kp = cc.KeyGen()
    slots, tag = plan.params.slots, kp.secretKey.GetKeyTag()
    templates = []
    for pk in (kp.publicKey, ofhe.DeserializePublicKeyString(serialize(kp.publicKey), ofhe.BINARY)):
        a, b = (serialize(ct) for ct in encrypt_vectors(cc, pk, [np.zeros(slots)] * 2, plan.start_level, slots))
        templates.append(CiphertextTemplate.learn(a, b, cc.GetRingDimension(), tag).to_dict())
    return {"templates": templates, "ring_dim": cc.GetRingDimension()}, serialize(cc)


def load(header: dict, stage) -> tuple:
    """Load a session's bundle and check that its keys are the ones the server's plan needs."""
    ofhe = import_openfhe()
    plan, directory = _plan(header["plan"]), header["session"]
    _, key_tag, cc = read_bundle(directory, stage=stage)
    stage("checks")
    if cc.GetRingDimension() != plan.params.ring_dim:
        raise KeyMismatchError(f"the bundle's context has ring dimension {cc.GetRingDimension()}, this server's plan "
                               f"{plan.params.ring_dim}")
    mult = set(ofhe.CryptoContext.GetAllEvalMultKeys())
    if mult != {key_tag}:
        raise KeyMismatchError(f"the relinearisation key file holds keys for {len(mult)} key tag(s), not exactly the "
                               "bundle's key tag")
    autos = set(ofhe.CryptoContext.GetAllEvalAutomorphismKeys())
    if autos - {key_tag}:
        raise KeyMismatchError("the rotation key file holds keys for another key tag than the bundle's")
    need = {int(r): cc.FindAutomorphismIndex(int(r)) for r in plan.rotation_keys}
    have = set(cc.GetExistingEvalAutomorphismKeyIndices(key_tag)) if autos else set()
    missing = sorted(r for r, a in need.items() if a not in have)
    if missing:
        raise KeyMismatchError(f"the bundle's rotation keys do not cover this server's plan: no key for rotations "
                               f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} of {len(need)})")
    server = Server.from_loaded(plan, key_tag, cc, header["spec"])
    server.verbose = False
    _state.update(server=server, directory=directory)
    return {"key_tag": key_tag, "ring_dim": cc.GetRingDimension()}, b""


# -- streams on disk ------------------------------------------------------------------------------------------

def _stream_dir(stream: str) -> str:
    if not stream or not all(c in "0123456789abcdef" for c in stream):
        raise StreamError(f"malformed stream id {stream!r}")
    return os.path.join(_state["directory"], "streams", stream)


def _save_stream(stream: str, s: _Stream) -> None:
    """``stream.bin``: position and KV cache in one file, replaced atomically after each step."""
    names, blobs = {}, []
    for name, packed in s.caches.items():
        data = [serialize(ct) for ct in packed.cts]
        names[name] = {"layout": packed.layout.to_dict(), "sizes": [len(d) for d in data]}
        blobs += data
    head = json.dumps({"position": s.position, "caches": names}).encode()
    path = os.path.join(_stream_dir(stream), "stream.bin")
    with open(path + ".tmp", "wb") as f:
        f.write(STREAM_MAGIC + struct.pack("<Q", len(head)) + head)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)


def _load_stream(stream: str, cc) -> _Stream:
    """A stream's state from its directory (written by this server: trusted), its caches rebuilt on ``cc``
    (:func:`~hf_polyhe.he.backends.openfhe.adopt`: deserialised ciphertexts slow every operation on them)."""
    ofhe = import_openfhe()
    directory = _stream_dir(stream)
    if not os.path.isdir(directory):
        raise StreamError(f"unknown or finished stream {stream!r}")
    path = os.path.join(directory, "stream.bin")
    if not os.path.exists(path):
        return _Stream()
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != STREAM_MAGIC:
        raise SerializationError(f"stream {stream!r}: unreadable state")
    (n,) = struct.unpack("<Q", data[8:16])
    head, pos, caches = json.loads(data[16 : 16 + n]), 16 + n, {}
    for name, entry in head["caches"].items():
        cts = []
        for size in entry["sizes"]:
            cts.append(adopt(cc, ofhe.DeserializeCiphertextString(data[pos : pos + size], ofhe.BINARY)))
            pos += size
        caches[name] = Packed(layout_from_dict(entry["layout"]), cts)
    return _Stream(position=int(head["position"]), caches=caches)


def _stream(server: Server, stream: str) -> None:
    """Make ``stream`` current in ``server``: from memory, else from disk; forget streams that were closed."""
    for sid in [s for s in server.streams if not os.path.isdir(_stream_dir(s))]:
        del server.streams[sid]
    if stream not in server.streams:
        server.streams[stream] = _load_stream(stream, server.cc)


def job(header: dict, payload: bytes, stage) -> tuple:
    server: Server = _state.get("server")
    if server is None:
        raise RuntimeError("no keys loaded in this worker")
    op = header["op"]
    x = EncryptedTensor.from_bytes(payload, role="embeddings")
    stage("parsed")
    if op == "run":
        out = server.run(x)
    else:
        stream = str(header["stream"])
        _stream(server, stream)
        out = server.prefill(stream, x) if op == "prefill" else server.decode(stream, x)
        _save_stream(stream, server.streams[stream])
    return {"timings": dict(server.last_timings), "sha256": hashlib.sha256(out).hexdigest()}, out


def handle(header: dict, payload: bytes, stage) -> tuple:
    op = header.get("op")
    if op == "reference":
        return reference(header)
    if op == "load":
        return load(header, stage)
    if op in ("run", "prefill", "decode"):
        return job(header, payload, stage)
    if op == "ping":
        return {"pid": os.getpid()}, b""
    raise ValueError(f"unknown worker op {op!r}")


if __name__ == "__main__":
    child_main(handle)
