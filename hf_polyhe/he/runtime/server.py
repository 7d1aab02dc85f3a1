"""The server side of an export: :class:`Server` (CKKS, evaluation keys only) and :class:`PlainServer` (the
float64 reference, NOT encrypted). Both implement :class:`~hf_polyhe.he.runtime.protocol.ServerProtocol`.

For each request the server builds the circuit it needs from the export's spec (full forward of a prompt
length, KV-cache prefill, or the decode step at a position; :mod:`hf_polyhe.he.compile`), plans it under the
client's parameters (:meth:`~hf_polyhe.he.compile.export_plan.ExportPlan.plan_circuit`, which also checks that
the client's keys cover it), compiles it (:func:`~hf_polyhe.he.compile.plaintexts.compile_evaluator`: its
plaintexts encoded once) and evaluates it (:class:`~hf_polyhe.he.circuit.evaluator.Evaluator` on the
:class:`~hf_polyhe.he.backends.openfhe.OpenFHEBackend`). Streams keep a generation's encrypted KV cache.

Usage (another process or machine than the client's)::

    server = Server("bundle_dir", spec="export_dir")    # the client's public bundle + the export's server part
    logits = server.run(ciphertext_bytes)               # -> encrypted logits (bytes)
    sid = server.open_stream()
    server.prefill(sid, prompt_bytes); server.decode(sid, token_bytes); server.close_stream(sid)
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ..backends.openfhe import OpenFHEBackend, adopt, import_openfhe, setup_bootstrap
from ..backends.plain import run_plain
from ..circuit.evaluator import Packed
from ..circuit.packing import same_packing
from ..circuit.rotations import ComposedRotations, RotationPaths
from ..compile.decode import build_decode_circuit, decode_inputs
from ..compile.plaintexts import compile_evaluator, pin_plaintexts
from ..compile.transformer import TransformerSpec, build_circuit, cache_names
from ..errors import KeyMismatchError, LayoutError, SerializationError, StreamError
from .ciphertext import EncryptedTensor, read_header
from .keys import read_bundle
from .protocol import ServerProtocol

MAX_STREAMS = 16  # open generation streams per server (each holds a KV cache)
MAX_EVALUATORS = 256  # planned circuits kept per server


def load_spec(spec) -> TransformerSpec:
    """A :class:`TransformerSpec` from itself, an :class:`~hf_polyhe.he.Export`, an export directory or its
    ``server/`` directory."""
    if isinstance(spec, TransformerSpec):
        return spec
    if hasattr(spec, "spec"):
        return spec.spec
    path = str(spec)
    if os.path.exists(os.path.join(path, "pipeline.json")):
        from ..export import read_pipeline_json, part_dir

        path = part_dir(path, read_pipeline_json(path), "server")
    return TransformerSpec.load(path)


@dataclass
class _Stream:
    position: int = 0
    caches: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)


class _SpecServer(ServerProtocol):
    """What both servers share: request checks and generation streams. A subclass evaluates one circuit
    (:meth:`_evaluate`) on its own payloads."""

    def __init__(self, spec: TransformerSpec, kv_cache: bool):
        self.spec, self.kv_cache = spec, bool(kv_cache)
        self.max_length = int(spec.config["max_length"])
        self.streams: dict = {}
        self.last_timings: dict = {}
        self.last_node_timings: list = []  # (node name, op, block, seconds) of the last evaluation
        self.verbose = True

    def _rows(self, x) -> int:
        raise NotImplementedError

    def _evaluate(self, kind: str, n: int, x, caches=None, attention_mask=None) -> tuple:
        """``(logits payload, caches)`` of circuit ``kind`` (full / prefill / decode) at length / position ``n``."""
        raise NotImplementedError

    def run(self, x, attention_mask=None):
        n = self._rows(x)
        if not 1 <= n <= self.max_length:
            raise LayoutError(f"the input has {n} rows; this export accepts 1..{self.max_length}")
        return self._evaluate("full", n, x, attention_mask=attention_mask)[0]

    def open_stream(self) -> str:
        if not self.kv_cache:
            raise StreamError("this export was planned without a KV cache: use run() per token")
        if len(self.streams) >= MAX_STREAMS:
            raise StreamError(f"{MAX_STREAMS} generation streams are open: close one first")
        sid = uuid.uuid4().hex
        self.streams[sid] = _Stream()
        return sid

    def _stream(self, sid) -> _Stream:
        if sid not in self.streams:
            raise StreamError(f"unknown or finished stream {sid!r}")
        return self.streams[sid]

    def prefill(self, stream: str, x):
        s = self._stream(stream)
        if s.position:
            raise StreamError(f"stream {stream!r} already holds {s.position} tokens; prefill starts a stream")
        n = self._rows(x)
        if not 1 <= n <= self.max_length:
            raise LayoutError(f"a prompt of {n} tokens: this export accepts 1..{self.max_length}")
        logits, s.caches = self._evaluate("prefill", n, x)
        s.position = n
        return logits

    def decode(self, stream: str, x):
        s = self._stream(stream)
        if not s.position:
            raise StreamError(f"stream {stream!r} has no prompt yet: call prefill first")
        if s.position >= self.max_length:
            raise StreamError(f"stream {stream!r} reached the export's max_length {self.max_length}")
        if self._rows(x) != 1:
            raise LayoutError(f"a decode step takes one token's embedding, got {self._rows(x)} rows")
        logits, s.caches = self._evaluate("decode", s.position, x, caches=s.caches)
        s.position += 1
        return logits

    def close_stream(self, stream: str) -> None:
        self.streams.pop(stream, None)

    def close(self) -> None:
        self.streams.clear()


class PlainServer(_SpecServer):
    """The float64 reference of an export's circuits on UNENCRYPTED arrays (debugging, fast tests): the same
    packing and polynomials as CKKS without the noise. Payloads are ``L x d`` arrays in, logits arrays out."""

    def __init__(self, spec, kv_cache: bool = None, strict: bool = False):
        spec = load_spec(spec)
        super().__init__(spec, spec.config["head"]["kind"] == "last_token" if kv_cache is None else kv_cache)
        self.strict = strict
        self._circuits: dict = {}

    def _rows(self, x) -> int:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.spec.config["hidden_size"]:
            raise LayoutError(f"embeddings must have shape (rows, {self.spec.config['hidden_size']}), got {x.shape}")
        return int(x.shape[0])

    def circuit(self, kind: str, n: int, attention_mask=None):
        """The circuit of ``kind`` at length / position ``n`` in the default packing (one row group)."""
        mask = None if attention_mask is None else tuple(np.asarray(attention_mask).reshape(-1).astype(int).tolist())
        key = (kind, n, mask)
        if key not in self._circuits:
            if len(self._circuits) >= MAX_EVALUATORS:
                self._circuits.clear()
            if kind == "decode":
                self._circuits[key] = build_decode_circuit(self.spec, n)
            else:
                self._circuits[key] = build_circuit(self.spec, n, attention_mask, kv_cache=(kind == "prefill"))
        return self._circuits[key]

    def _evaluate(self, kind, n, x, caches=None, attention_mask=None):
        t0 = time.perf_counter()
        c = self.circuit(kind, n, attention_mask)
        inputs = decode_inputs(np.asarray(x, dtype=np.float64), caches) if kind == "decode" else {"x": np.asarray(x, dtype=np.float64)}
        out = run_plain(c, inputs, strict=self.strict)
        self.last_timings = {"plain": time.perf_counter() - t0}
        return np.asarray(out["logits"]), {k: out[k] for k in cache_names(self.spec)} if kind != "full" else {}


class _BlockClock:
    """An evaluator observer: seconds per block (norms, attention, mlp, head, bootstrap, residual) and a progress
    bar that advances once per transformer layer and once for the head."""

    def __init__(self, circuit, layers: int, verbose: bool):
        self.blocks = circuit.meta.get("blocks", {})
        self.times: dict = {}
        self.nodes: list = []  # (node name, op, block, seconds) in evaluation order
        self.previous, self.seen_attention = None, 0
        self.bar = tqdm(total=layers + 1, desc=f"encrypted {circuit.name}", unit="layer", leave=False,
                        disable=not verbose)

    def __call__(self, node, seconds: float):
        b = "bootstrap" if node.op == "bootstrap" else self.blocks.get(node.name, "residual")
        if b != self.previous and b in ("attention", "head") and self.seen_attention:
            self.bar.update(1)  # a layer ends where the next attention block (or the head) begins
        if b == "attention" and self.previous != "attention":
            self.seen_attention += 1
        if b != "bootstrap":
            self.previous = b
        self.times[b] = self.times.get(b, 0.0) + seconds
        self.nodes.append((node.name, node.op, b, seconds))

    def close(self, done: bool):
        if done:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


class Server(_SpecServer):
    """Evaluates one client's ciphertexts for one export, with that client's public evaluation keys. Holds no
    secret key (``tests/test_encrypted.py`` walks every object reachable from it).

    ``Server(bundle_dir, spec)``: the client's server bundle (:meth:`~hf_polyhe.he.Client.write_bundle`) and the
    export's server part (an :class:`~hf_polyhe.he.Export`, its directory, its ``server/`` directory or a
    :class:`TransformerSpec`; default: the directory recorded in the bundle's plan). The spec's digest must be
    the one the keys were planned for."""

    def __init__(self, bundle_dir, spec=None):
        plan, key_tag, cc = read_bundle(bundle_dir)
        if spec is None:
            if not plan.spec_dir:
                raise SerializationError("the bundle records no export directory: pass spec=")
            spec = plan.spec_dir
        self._setup(plan, key_tag, cc, load_spec(spec))

    @classmethod
    def from_loaded(cls, plan, key_tag: str, cc, spec) -> "Server":
        """The server for keys already in this process's store (``cc``: their crypto context, ``key_tag``: their
        tag) that runs ``plan`` -- ``hf-polyhe serve`` passes the plan it made itself for the export, never the
        one a client sent."""
        self = cls.__new__(cls)
        self._setup(plan, key_tag, cc, load_spec(spec))
        return self

    @classmethod
    def sharing_keys(cls, client, spec=None) -> "Server":
        """The server for a ``client`` whose keys were generated in *this* process: it shares the client's crypto
        context and the evaluation keys already in OpenFHE's (process-wide) store, so no bundle is serialised and
        read back (gigabytes and minutes at 128-bit). The secret key is neither used nor reachable from it."""
        self = cls.__new__(cls)
        self._setup(client.plan, client.key_tag, client.cc, load_spec(spec if spec is not None else client.export))
        return self

    def _setup(self, plan, key_tag: str, cc, spec: TransformerSpec):
        from ..compile.export_plan import spec_digest

        if spec_digest(spec) != plan.digest:
            raise KeyMismatchError("the model spec differs from the one the keys were planned for "
                                   "(another export or modified weights)")
        super().__init__(spec, plan.kv_cache)
        self.plan, self.key_tag, self.cc = plan, key_tag, cc
        self.ring_dim = cc.GetRingDimension()
        if plan.params.bootstrap:
            cc.Enable(import_openfhe().FHE)
            setup_bootstrap(cc, plan.params)
        self.backend = OpenFHEBackend(cc, plan.params.slots)
        if getattr(plan, "compose_rotations", False):  # the keys hold a base: other rotations are chains of it
            self.backend = ComposedRotations(self.backend, RotationPaths(plan.rotation_keys, plan.params.slots))
        self._evaluators: dict = {}
        self._uses: dict = {}  # evaluator key -> requests

    def evaluator(self, kind: str, n: int, attention_mask=None) -> tuple:
        """``(Evaluator, Plan)`` of circuit ``kind`` ("full", "prefill", "decode") at length / position ``n``."""
        mask = None if attention_mask is None else tuple(np.asarray(attention_mask).reshape(-1).astype(int).tolist())
        key = (kind, n, mask)
        if key not in self._evaluators:
            g, s = self.plan.groups, self.plan.slots
            if kind == "decode":  # on vectors only if the keys were planned so (exports before vector decode: not)
                c = build_decode_circuit(self.spec, n, groups=g, slots=s, vectors=self.plan.decode_input is not None)
                reads = c.layouts()["x"].to_dict()
                if self.plan.decode_input and reads != self.plan.decode_input:
                    raise KeyMismatchError(f"the decode circuit reads {reads}, the keys were planned for "
                                           f"{self.plan.decode_input}: re-plan the export")
            else:
                c = build_circuit(self.spec, n, attention_mask, kv_cache=(kind == "prefill"), groups=g, slots=s)
            pl = self.plan.plan_circuit(c, kind)
            if len(self._evaluators) >= MAX_EVALUATORS:
                self._evaluators.clear()
                self._uses.clear()
                self.backend.unpin()
            # encode once what one run meets repeatedly (at the level it meets its ciphertext); the rest is encoded
            # when met until the circuit is asked for again (measured on the demo's prompt: pinning plaintexts used
            # once cost 14 s for a 32 s run that then saved nothing, and held 2.6 GiB)
            self._evaluators[key] = (compile_evaluator(pl, self.backend, min_uses=2), pl)
        self._uses[key] = self._uses.get(key, 0) + 1
        ev, pl = self._evaluators[key]
        if self._uses[key] == 2:  # a circuit requested again: every plaintext it needs, once
            ev.compiled = pin_plaintexts(ev, pl, self.backend, min_uses=1)
        return ev, pl

    def _tensor(self, x) -> EncryptedTensor:
        """The request's ciphertexts, checked and rebuilt on this server's context (:func:`adopt`: on a deserialised
        ciphertext the first layer's additions and plaintext products run 9-13x slower at 128-bit)."""
        t = x if isinstance(x, EncryptedTensor) else EncryptedTensor.from_bytes(x, role="embeddings")
        t.check("embeddings", self.key_tag, self.ring_dim)
        return EncryptedTensor(t.layout, [adopt(self.cc, ct) for ct in t.cts], t.key_tag, t.ring_dim, t.role)

    def _rows(self, x) -> int:
        return x.layout.rows if isinstance(x, EncryptedTensor) else read_header(x).rows

    def _evaluate(self, kind, n, x, caches=None, attention_mask=None):
        ev, _ = self.evaluator(kind, n, attention_mask)
        t = self._tensor(x)
        want = ev.layouts["x"]
        if not same_packing(t.layout, want):
            raise LayoutError(f"the input has layout {t.layout.to_dict()}, expected {n if kind != 'decode' else 1} x "
                              f"{self.spec.config['hidden_size']} embeddings packed as {want.to_dict()}")
        inputs = {"x": Packed(want, t.cts)}
        if kind == "decode":
            inputs.update({f"{k}_cache": v for k, v in caches.items()})
        clock = _BlockClock(ev.circuit, len(self.spec.config.get("layers", [])), self.verbose)
        done = False
        try:
            out = ev.run(inputs, observer=clock)
            done = True
        finally:
            clock.close(done)
        self.last_timings = clock.times
        self.last_node_timings = clock.nodes
        logits = out["logits"]
        data = EncryptedTensor(logits.layout, logits.cts, self.key_tag, self.ring_dim, role="logits").to_bytes()
        return data, ({k: out[k] for k in cache_names(self.spec)} if kind != "full" else {})
