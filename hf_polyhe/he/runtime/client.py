"""The client side of an export: :class:`Client` owns the secret key, embeds and encrypts its inputs, decrypts the
logits and chooses the tokens. A server (:class:`~hf_polyhe.he.runtime.protocol.ServerProtocol`: in this
process or behind ``hf-polyhe serve``) only ever sees ciphertexts and public evaluation keys.

Usage::

    export = Export("exports/poly-gpt")
    client = Client.keygen(export, "default")         # plan every circuit of the export, make ONE key set
    client.write_bundle("bundle")                        # context + evaluation keys, no secret key
    server = Server("bundle", spec=export)               # another process / machine (or client.server())
    ids, info = client.generate(server, prompt_ids, max_new_tokens=4)
    logits, info = client.forward(server, export.embed(input_ids=ids))

:meth:`Client.from_cache` keeps one key set per export and parameter set in the key cache
(:func:`~hf_polyhe.he.runtime.keys.default_key_dir`), made on first use. :meth:`Client.plain` is the float64
reference without encryption (its "ciphertexts" are arrays, its server a
:class:`~hf_polyhe.he.runtime.server.PlainServer`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from .. import params as P
from ..backends.openfhe import decrypt_vectors, encrypt_vectors, serialize
from ..circuit.packing import MatrixLayout, layout_from_dict
from ..compile.export_plan import ExportPlan, plan_for_export
from ..errors import KeyMismatchError, LayoutError, SerializationError, ToyParametersWarning
from ..export import Export
from . import keys as K
from .ciphertext import EncryptedTensor
from .protocol import ServerProtocol

logger = logging.getLogger(__name__)


def sample_next_token(logits: np.ndarray, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, rng: Optional[np.random.Generator] = None) -> int:
    """Greedy argmax, or sampling with ``temperature`` and ``top_k`` (on decrypted logits)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not do_sample:
        return int(np.argmax(logits))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = np.sort(z)[-min(top_k, z.size)]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int((rng or np.random.default_rng()).choice(z.size, p=p))


def _as_export(export) -> Export:
    return export if isinstance(export, Export) else Export(export)


class Client:
    """The data owner's side of one export. Build it with :meth:`keygen` (new keys), :meth:`load` (a key
    directory), :meth:`from_cache` (the key cache) or :meth:`plain` (no encryption). Then :meth:`forward` runs
    one input and :meth:`generate` generates text token by token, both on a server."""

    def __init__(self, export, plan: Optional[ExportPlan] = None, cc=None, keypair=None, *,
                 directory: Optional[str] = None, bundle_dir: Optional[str] = None):
        self.export = _as_export(export)
        self.plan, self.cc, self.keypair = plan, cc, keypair
        self.key_tag = keypair.secretKey.GetKeyTag() if keypair is not None else None
        self.directory = directory  # where the keys were read from / saved to
        self._bundle_dir = bundle_dir  # a server bundle of these keys on disk, if any
        self._prefix = None  # how every ciphertext of these keys begins (see _decrypt_result)
        if plan is not None and plan.digest != self.export.digest:
            raise KeyMismatchError(f"these keys were made for another export (or modified weights) than "
                                   f"{self.export.directory!r}; generate keys for this export (hf-polyhe keygen)")

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def keygen(cls, export, params="default", **plan_kwargs) -> "Client":
        """Plan every circuit of ``export`` (:func:`~hf_polyhe.he.compile.export_plan.plan_for_export` with
        ``plan_kwargs``; or pass an :class:`ExportPlan` as ``params``) and generate ONE key set: relinearisation,
        the union of rotation keys and, when planned, bootstrapping keys. The secret key stays in this object."""
        export = _as_export(export)
        plan = params if isinstance(params, ExportPlan) else plan_for_export(export, P.resolve(params), **plan_kwargs)
        cc, kp = K.generate_keys(plan.params, plan.rotation_keys)
        return cls(export, plan, cc, kp)

    @classmethod
    def plain(cls, export) -> "Client":
        """A client WITHOUT encryption: payloads are the embedding arrays themselves (float64 reference)."""
        return cls(export)

    @classmethod
    def load(cls, export, directory) -> "Client":
        """The keys :meth:`save` (or ``hf-polyhe keygen``) wrote to ``directory``."""
        plan, cc, kp = K.read_client(directory)
        client = cls(export, plan, cc, kp, directory=str(directory))
        tag = client.key_tag
        for path in (os.path.join(directory, "server_bundle"),
                     os.path.join(os.path.dirname(os.path.abspath(directory)), "server_bundle")):
            try:
                if K.read_bundle_meta(path)[1] == tag:
                    client._bundle_dir = path
                    break
            except SerializationError:
                continue
        return client

    @classmethod
    def from_cache(cls, export, params="default", key_dir=None) -> "Client":
        """This export's keys from the key cache ``key_dir`` (default :func:`~hf_polyhe.he.runtime.keys.default_key_dir`),
        generated and saved there (secret key 0600 in a 0700 directory, plus the public bundle) on first use.
        ``key_dir`` may also be a directory :meth:`save` / ``hf-polyhe keygen`` wrote: those keys are used as they
        are. Keys for another export or another security level are refused."""
        export, params = _as_export(export), P.resolve(params)
        key_dir = str(key_dir or K.default_key_dir())
        if os.path.exists(os.path.join(key_dir, "client.json")):
            client_dir, bundle_dir = key_dir, os.path.join(key_dir, "server_bundle")
        else:
            client_dir, bundle_dir = K.cache_dirs(key_dir, export.digest, params)
        if os.path.exists(os.path.join(client_dir, "client.json")):
            with warnings.catch_warnings():
                if not params.insecure:  # loading a toy plan warns; the requested params already decided
                    warnings.simplefilter("error", category=ToyParametersWarning)
                try:
                    client = cls.load(export, client_dir)
                except ToyParametersWarning as e:
                    raise ValueError(f"the keys in {client_dir} use toy (insecure) parameters; 128-bit keys were "
                                     "asked for") from e
            if client.plan.params.insecure != params.insecure:
                want = "toy (insecure)" if params.insecure else "128-bit"
                raise ValueError(f"the keys in {client_dir} use {'toy' if client.plan.params.insecure else '128-bit'} "
                                 f"parameters, {want} were asked for")
            return client
        t0 = time.perf_counter()
        logger.warning(f"hf_polyhe: planning and generating {params.name} CKKS keys for this export (once; cached "
                       f"in {client_dir})")
        client = cls.keygen(export, params)
        client.save(client_dir)
        client._bundle_dir = client.write_bundle(bundle_dir)  # public evaluation keys, for later processes
        logger.warning(f"hf_polyhe: keys ready in {time.perf_counter() - t0:.1f} s")
        return client

    # -- files ------------------------------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        return self.plan is not None

    def _need_keys(self, what: str):
        if not self.encrypted:
            raise ValueError(f"{what} needs keys; this is a plain (unencrypted) client")

    def save(self, directory) -> str:
        """Everything this client needs later, SECRET KEY INCLUDED (directory 0700, files 0600)."""
        self._need_keys("save")
        self.directory = K.write_client(directory, self.cc, self.keypair, self.plan)
        return self.directory

    @property
    def keys_in_memory(self) -> bool:
        """Whether this process's OpenFHE key store holds this client's evaluation keys."""
        return self.encrypted and K.has_eval_keys(self.key_tag)

    def write_bundle(self, directory) -> str:
        """The public server bundle (context + evaluation keys, never the secret key) into ``directory``: from the
        key store when the keys are in this process, else copied from the bundle saved beside the keys."""
        self._need_keys("write_bundle")
        if self.keys_in_memory:
            path = K.write_bundle(directory, self.cc, self.key_tag, self.plan)
        elif self._bundle_dir:
            path = K.copy_bundle(self._bundle_dir, directory)
        else:
            raise SerializationError("this client's evaluation keys are neither in this process nor in a server bundle "
                                     "on disk: load it from a key directory with its server_bundle/")
        return path

    @property
    def bundle_dir(self) -> Optional[str]:
        """The server bundle kept beside these keys on disk (key cache or ``hf-polyhe keygen`` layout), if any."""
        return self._bundle_dir

    def server(self) -> ServerProtocol:
        """An in-process server for this client: :class:`PlainServer` without encryption, else a :class:`Server`
        sharing the evaluation keys when they are in this process, or loading the bundle beside the keys."""
        from .server import PlainServer, Server

        if not self.encrypted:
            return PlainServer(self.export)
        if self.keys_in_memory:
            return Server.sharing_keys(self)
        if not self._bundle_dir:
            raise SerializationError("no evaluation keys: this client was loaded without its server_bundle/")
        return Server(self._bundle_dir, spec=self.export)

    # -- data -------------------------------------------------------------------------------------------
    def encrypt(self, x, decode: bool = False):
        """``rows x hidden_size`` embeddings (a prompt; with ``decode=True`` the one new token of a decode step,
        packed the way the export's decode circuits read it) -> encrypted-tensor bytes (plain: the array)."""
        x = np.asarray(x, dtype=np.float64)
        d, max_len = int(self.export.spec.config["hidden_size"]), self.export.max_length
        if x.ndim != 2 or x.shape[1] != d or not 1 <= x.shape[0] <= max_len:
            raise LayoutError(f"embeddings must have shape (1..{max_len}, {d}), got {x.shape}")
        if decode and x.shape[0] != 1:
            raise LayoutError(f"a decode step takes one token's embedding (1 x {d}), got {x.shape}")
        if not self.encrypted:
            return x
        pl = self.plan
        if decode and pl.decode_input:
            layout = layout_from_dict(pl.decode_input)
        else:
            layout = MatrixLayout(x.shape[0], d, pl.block, pl.slots, groups=pl.groups)
        cts = encrypt_vectors(self.cc, self.keypair.publicKey, layout.pack(x), pl.start_level, pl.params.slots)
        return EncryptedTensor(layout, cts, self.key_tag, self.cc.GetRingDimension()).to_bytes()

    def decrypt(self, data) -> np.ndarray:
        """Encrypted logits of this client's key (bytes or :class:`EncryptedTensor`) -> a vector (one row) or
        matrix. Refuses anything but a server's logits (e.g. the client's own input ciphertext)."""
        if not self.encrypted:
            return np.asarray(data, dtype=np.float64).reshape(-1)
        if not isinstance(data, EncryptedTensor):
            h, vectors = self._decrypt_result(data)
            out = h.layout.unpack(vectors)
            return out.reshape(-1) if out.shape[0] == 1 else out
        t = data.check("logits", self.key_tag, self.cc.GetRingDimension())
        out = t.layout.unpack(decrypt_vectors(self.cc, self.keypair.secretKey, t.cts, self.plan.params.slots))
        return out.reshape(-1) if out.shape[0] == 1 else out

    def _decrypt_result(self, data) -> tuple:
        """``(header, slot vectors)`` of a server's result bytes, checked before any OpenFHE parser sees them: the
        container (role, key tag, ring dimension, checksums) and the serialised crypto context every ciphertext
        of these keys starts with (:func:`~.precheck.check_prefix`); then parsed and decrypted in the sandbox
        process (:class:`~.sandbox.Decryptor`: a ciphertext crafted to crash OpenFHE kills that process, not this
        one; ``HF_POLYHE_PARSE_SANDBOX=0`` decrypts here instead)."""
        from .ciphertext import read_header
        from .precheck import check_prefix, context_prefix
        from .sandbox import decryptor, sandbox_enabled

        h = read_header(data).check("logits", self.key_tag, self.cc.GetRingDimension())
        slots = self.plan.params.slots
        shape = h.layout.shape
        if h.layout.kind == "scores" or getattr(h.layout, "ct_slots", None) != slots \
                or int(np.prod(shape)) > slots * h.layout.num_cts:
            raise LayoutError(f"a result packed as {h.layout.to_dict()} does not fit these keys' {slots} slots")
        if self._prefix is None:  # one encryption of our own shows how every ciphertext of these keys begins
            ref = encrypt_vectors(self.cc, self.keypair.publicKey, [np.zeros(slots)], 0, slots)[0]
            self._prefix = context_prefix(serialize(ref), self.key_tag)
        view = memoryview(data)
        payloads = [view[start : start + n] for start, n in h.offsets]
        for p in payloads:
            check_prefix(p, self._prefix)
        if sandbox_enabled():
            keys = lambda: (serialize(self.cc), serialize(self.keypair.secretKey))  # noqa: E731
            return h, decryptor().decrypt(self.key_tag, keys, payloads, slots)
        t = EncryptedTensor.from_bytes(data, role="logits").check("logits", self.key_tag, self.cc.GetRingDimension())
        return h, decrypt_vectors(self.cc, self.keypair.secretKey, t.cts, slots)

    # -- what a pipeline calls ----------------------------------------------------------------------------
    def describe(self) -> dict:
        """Backend, security, ring, levels and rotation keys: the static part of a result's ``he`` entry."""
        if not self.encrypted:
            return {"backend": "plain", "encrypted": False, "warning": "plain float64 reference backend: NOT encrypted"}
        plan, p = self.plan, self.plan.params
        return {"backend": "openfhe", "encrypted": True,
                "security": "NONE (toy parameters, tests only)" if p.insecure else p.security,
                "ring_dim": p.ring_dim, "slots": p.slots, "row_groups": plan.groups, "scale_bits": p.scale_bits,
                "levels": p.depth, "start_level": plan.start_level, "mode": plan.mode,
                "rotation_keys": len(plan.rotation_keys)}

    def counts(self, kind: str) -> dict:
        """The planner's operation counts of the longest circuit of ``kind`` (full / prefill / decode)."""
        summary = (self.plan.summary if self.encrypted else {}) or {}
        entry = summary.get(kind) or summary.get("full") or {}
        return {"circuit": kind, "longest_length": entry.get("length"), "depth": entry.get("depth"),
                **dict(entry.get("counts") or {})}

    def forward(self, server: ServerProtocol, x, attention_mask=None) -> tuple:
        """``(logits, info)``: one forward pass of the ``L x d`` embeddings ``x`` on ``server``; ``info`` has the
        description, operation counts and seconds (encrypt / server / decrypt, per block)."""
        t0 = time.perf_counter()
        data = self.encrypt(x)
        t1 = time.perf_counter()
        out = server.run(data, attention_mask) if attention_mask is not None else server.run(data)
        t2 = time.perf_counter()
        logits = self.decrypt(out)
        t3 = time.perf_counter()
        info = {**self.describe(), "seq_len": int(np.asarray(x).shape[0]),
                "timings": {"encrypt_s": t1 - t0, "server_s": t2 - t1, "decrypt_s": t3 - t2, "total_s": t3 - t0,
                            "by_block": dict(server.last_timings)}}
        if self.encrypted:
            info.update(ciphertext_bytes={"in": len(data), "out": len(out)}, counts=self.counts("full"))
        return logits, info

    def generate(self, server: ServerProtocol, input_ids, max_new_tokens: int = 8, *,
                 next_token: Optional[Callable] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: Optional[int] = None, eos_token_id=None,
                 callback: Optional[Callable] = None, stop: Optional[Callable] = None, use_cache: Optional[bool] = None,
                 verbose: bool = False) -> tuple:
        """``(token ids, info)``: generate token by token on ``server``, choosing each token here from decrypted
        logits. ``next_token(ids, logits) -> id`` chooses (default: greedy, or ``do_sample`` with
        ``temperature`` / ``top_k`` / ``seed``); ``eos_token_id`` (an id or a list) stops. ``use_cache`` (default:
        when the export was planned with a KV cache) keeps the keys/values on the server, so each new token
        costs one token's work; otherwise every token re-runs the whole sequence. ``callback(token, logits)``
        after each token; ``stop(ids, logits) -> bool`` ends generation early; ``verbose``: a progress bar per
        token."""
        ex = self.export
        if ex.family != "gpt":
            raise ValueError(f"generation needs a causal LM export, this one is {ex.family!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + max_new_tokens > ex.max_length:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds the export's "
                             f"max_length {ex.max_length}")
        if use_cache is None:
            use_cache = self.plan.kv_cache if self.encrypted else True
        eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).astype(int).tolist())
        if next_token is None:
            rng = np.random.default_rng(seed)

            def next_token(_ids, logits):
                return sample_next_token(logits, do_sample, temperature, top_k, rng)

        t0 = time.perf_counter()
        steps, stream = [], None
        bar = tqdm(total=max_new_tokens, desc="encrypted generation" if self.encrypted else "generation",
                   unit="token", disable=not verbose, leave=False)
        try:
            if use_cache:
                stream = server.open_stream()
            for step in range(max_new_tokens):
                s0 = time.perf_counter()
                if not use_cache:
                    logits = self.decrypt(server.run(self.encrypt(ex.embed(input_ids=ids))))
                    what = "full"
                elif step == 0:
                    logits = self.decrypt(server.prefill(stream, self.encrypt(ex.embed(input_ids=ids))))
                    what = "prefill"
                else:
                    x_row = ex.embed(input_ids=ids)[-1:]
                    logits = self.decrypt(server.decode(stream, self.encrypt(x_row, decode=True)))
                    what = "decode"
                steps.append({"step": what, "seconds": round(time.perf_counter() - s0, 4),
                              "by_block": {k: round(v, 4) for k, v in server.last_timings.items()}})
                nxt = int(next_token(list(ids), logits))
                ids.append(nxt)
                bar.update(1)
                if callback is not None:
                    callback(nxt, logits)
                if nxt in eos or (stop is not None and stop(list(ids), logits)):
                    break
        finally:
            bar.close()
            if stream is not None:
                server.close_stream(stream)
        n_prompt = len(ids) - len(steps)
        info = {**self.describe(), "prompt_tokens": n_prompt, "new_tokens": len(steps),
                "timings": {"total_s": time.perf_counter() - t0, "per_token_s": [s["seconds"] for s in steps],
                            "steps": steps}}
        if self.encrypted:
            info["counts"] = self.counts("decode" if use_cache else "full")
        return ids, info
