"""Who computes for a pipeline: keys on the client, the evaluator in-process or behind ``hf-polyhe serve``.

:class:`EncryptedRuntime` is the client side of one export. It owns the secret key (generated on first use and
cached under a private key directory, or passed in), encrypts the embeddings the pipeline computes, hands
ciphertexts to an evaluator and decrypts the logits. The evaluator is one of

- ``"openfhe"`` (default): an :class:`~hf_polyhe.he.keys_multi.EncryptedServer` in this process, built from the
  client's *public* server bundle -- the same code ``hf-polyhe serve`` runs;
- ``server_url="http://host:port"``: a :class:`~hf_polyhe.serve.client.RemoteServer` (the secret key never
  leaves this process: only the bundle and ciphertexts travel);
- ``"plain"``: the float64 reference backend, **no encryption**, for debugging and fast tests.

Keys live in ``key_dir`` (default ``$HF_POLYHE_KEY_DIR`` or ``~/.cache/hf_polyhe/keys``), one sub-directory per
export digest and parameter set: ``client/`` (secret key, files 0600, directory 0700) and ``server_bundle/``
(context + evaluation keys, safe to hand to a server).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Optional

import numpy as np

from ..he import params as P
from ..he.session import EncryptedModel

BACKENDS = ("openfhe", "plain")


def default_key_dir() -> str:
    """``$HF_POLYHE_KEY_DIR``, else ``~/.cache/hf_polyhe/keys``."""
    return os.environ.get("HF_POLYHE_KEY_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hf_polyhe", "keys")


def resolve_params(he_params) -> P.CKKSParams:
    """``"default"`` (128-bit), ``"toy"`` (INSECURE, warns) or a :class:`~hf_polyhe.he.params.CKKSParams`."""
    if isinstance(he_params, P.CKKSParams):
        return he_params
    if he_params in (None, "default", "128", 128):
        return P.default()
    if he_params == "toy":
        return P.toy()
    raise ValueError(f"he_params must be 'default' (128-bit), 'toy' (insecure, tests only) or a CKKSParams, "
                     f"got {he_params!r}")


@contextlib.contextmanager
def _private_umask():
    """New files readable by their owner only (the secret key is never world-readable, not even briefly)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _lock_down(directory: str) -> None:
    os.chmod(directory, 0o700)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o600)


def save_client(client, directory) -> str:
    """``EncryptedClient.save`` with owner-only permissions (directory 0700, files 0600)."""
    directory = str(directory)
    with _private_umask():
        os.makedirs(directory, exist_ok=True)
        client.save(directory)
    _lock_down(directory)
    return directory


def _check_client(client, model: EncryptedModel, params: P.CKKSParams, where: str):
    from ..he.keys_multi import spec_digest

    if client.plan.digest != spec_digest(model.spec):
        raise ValueError(f"the keys in {where} were made for another export (or modified weights); "
                         "generate keys for this export (hf-polyhe keygen) or pass another key directory")
    if client.plan.params.insecure != params.insecure:
        want = "toy (insecure)" if params.insecure else "128-bit"
        raise ValueError(f"the keys in {where} use {'toy' if client.plan.params.insecure else '128-bit'} parameters, "
                         f"this pipeline asked for {want}")


def load_or_create_client(model: EncryptedModel, params: P.CKKSParams, key_dir=None, verbose: bool = True):
    """``(client, directory, created)``: the cached key set of this export under ``key_dir``, made on first use.

    ``key_dir`` may also be a directory written by :func:`save_client` / ``hf-polyhe keygen`` (it holds
    ``client.json``): those keys are used as they are."""
    from ..he.keys_multi import EncryptedClient, plan_for_export, spec_digest

    key_dir = str(key_dir or default_key_dir())
    if os.path.exists(os.path.join(key_dir, "client.json")):
        client_dir = key_dir
    else:
        client_dir = os.path.join(key_dir, f"{spec_digest(model.spec)[:16]}-{params.name}", "client")
    if os.path.exists(os.path.join(client_dir, "client.json")):
        with warnings.catch_warnings():
            if not params.insecure:  # loading a toy plan warns; the requested params already decided that
                warnings.simplefilter("error", category=P.ToyParametersWarning)
            try:
                client = EncryptedClient.load(client_dir)
            except P.ToyParametersWarning as e:
                raise ValueError(f"the keys in {client_dir} use toy (insecure) parameters; this pipeline asked "
                                 "for 128-bit") from e
        _check_client(client, model, params, client_dir)
        return client, client_dir, False
    t0 = time.perf_counter()
    if verbose:
        print(f"hf_polyhe: planning and generating {params.name} CKKS keys for this export "
              f"(once; cached in {client_dir})", flush=True)
    plan = plan_for_export(model, params)
    client = EncryptedClient.generate(plan)
    save_client(client, client_dir)
    bundle_dir_for(client, client_dir)  # public evaluation keys, so that later processes can evaluate
    if verbose:
        print(f"hf_polyhe: keys ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return client, client_dir, True


def bundle_dir_for(client, client_dir: str) -> str:
    """The public server bundle of ``client``: ``client_dir/server_bundle`` (``hf-polyhe keygen`` layout) or a
    ``server_bundle`` next to ``client_dir`` (the key cache layout); written there once if missing."""
    import json

    inside = os.path.join(client_dir, "server_bundle")
    beside = os.path.join(os.path.dirname(os.path.abspath(client_dir)), "server_bundle")
    for path in (inside, beside):
        meta = os.path.join(path, "bundle.json")
        if os.path.exists(meta):
            with open(meta) as f:
                if json.load(f).get("key_tag") == client.key_tag:
                    return path
    path = beside if os.path.basename(os.path.abspath(client_dir)) == "client" else inside
    client.server_bundle(path)
    return path


class EncryptedRuntime:
    """Client side of one export; see the module docstring. Keys and evaluator are made on first use."""

    def __init__(self, model: EncryptedModel, backend: str = "openfhe", server_url: Optional[str] = None,
                 key_dir=None, client=None, he_params="default", verbose: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "plain" and server_url:
            raise ValueError("server_url needs encryption: use backend='openfhe' (the default)")
        self.model, self.backend, self.server_url = model, backend, server_url
        self.key_dir, self.verbose = key_dir, verbose
        self.params = resolve_params(he_params) if backend == "openfhe" else None
        self._client, self._client_dir, self._server = None, None, None
        self._keys_in_memory = False
        if client is not None:
            self._keys_in_memory = not isinstance(client, (str, os.PathLike))
            self._client = client if self._keys_in_memory else self._load_client(client)
            self._client_dir = None if self._keys_in_memory else str(client)
            _check_client(self._client, model, self._client.plan.params, "the given client")
            self.params = self._client.plan.params

    @staticmethod
    def _load_client(path):
        from ..he.keys_multi import EncryptedClient

        return EncryptedClient.load(path)

    # -- lazily built pieces ------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client, self._client_dir, created = load_or_create_client(self.model, self.params, self.key_dir,
                                                                            self.verbose)
            self._keys_in_memory = created
        return self._client

    @property
    def server(self):
        if self._server is None:
            client = self.client
            if self.server_url:
                from ..serve.client import RemoteServer

                self._server = RemoteServer(self.server_url, client)
            else:
                from .progress import ProgressServer

                if self._keys_in_memory:  # generated or passed in this process: evaluation keys already loaded
                    self._server = ProgressServer.from_client(client, self.model.spec)
                else:  # loaded from the cache: the evaluation keys come from the public bundle next to them
                    self._server = ProgressServer(bundle_dir_for(client, self._client_dir), spec=self.model.spec)
        self._server.verbose = self.verbose
        return self._server

    def prepare(self) -> "EncryptedRuntime":
        """Generate or load keys and connect the evaluator now instead of at the first call."""
        if self.backend == "openfhe":
            _ = self.server
        return self

    # -- what the pipelines call ----------------------------------------------------------------------
    def describe(self) -> dict:
        """The static part of a result's ``he`` entry: backend, security, ring, levels, rotation keys."""
        if self.backend == "plain":
            return {"backend": "plain", "encrypted": False,
                    "warning": "plain float64 reference backend: NOT encrypted"}
        plan = self.client.plan
        p = plan.params
        return {"backend": "openfhe", "encrypted": True, "where": self.server_url or "in-process",
                "security": "NONE (toy parameters, tests only)" if p.insecure else p.security,
                "ring_dim": p.ring_dim, "slots": p.slots, "row_groups": plan.groups, "scale_bits": p.scale_bits, "levels": p.depth,
                "start_level": plan.start_level, "mode": plan.mode, "rotation_keys": len(plan.rotation_keys)}

    def forward(self, x: np.ndarray) -> tuple:
        """``(logits, he)``: one encrypted forward pass over the ``L x d`` embeddings ``x``."""
        t0 = time.perf_counter()
        if self.backend == "plain":
            logits = self.model.forward_plain(x)
            return logits, {**self.describe(), "timings": {"total_s": time.perf_counter() - t0}, "seq_len": x.shape[0]}
        server, client = self.server, self.client
        t1 = time.perf_counter()
        data = client.encrypt_embeddings(x)
        t2 = time.perf_counter()
        out = server.run(x.shape[0], data)
        t3 = time.perf_counter()
        logits = client.decrypt_logits(out)
        t4 = time.perf_counter()
        counts = self._counts("full", x.shape[0])
        return logits, {**self.describe(), "seq_len": int(x.shape[0]), "ciphertext_bytes": {"in": len(data), "out": len(out)},
                        "counts": counts,
                        "timings": {"setup_s": t1 - t0, "encrypt_s": t2 - t1, "server_s": t3 - t2, "decrypt_s": t4 - t3,
                                    "total_s": t4 - t0, "by_block": dict(getattr(server, "last_timings", {}))}}

    def generate(self, ids, max_new_tokens: int, **sampling) -> tuple:
        """``(token ids, he)``: token-by-token generation, logits decrypted and sampled on the client."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        bar = tqdm(total=max_new_tokens, desc="encrypted generation" if self.backend == "openfhe" else "generation",
                   unit="token", disable=not self.verbose, leave=False)

        def callback(token, logits):
            bar.update(1)

        try:
            if self.backend == "plain":
                out = self.model.generate(ids, max_new_tokens, callback=callback, use_cache=True, **sampling)
                return out, {**self.describe(), "new_tokens": len(out) - len(ids),
                             "timings": {"total_s": time.perf_counter() - t0}}
            from ..he.keys_multi import EncryptedGeneration

            gen = EncryptedGeneration(self.client, self.server)
            t1 = time.perf_counter()
            try:
                out = self.model.generate(ids, max_new_tokens, runner=gen, callback=callback, **sampling)
            finally:
                gen.close()
        finally:
            bar.close()
        steps = [{"step": what, "seconds": round(s, 4), "by_block": {k: round(v, 4) for k, v in blocks.items()}}
                 for what, s, blocks in gen.timings]
        return out, {**self.describe(), "prompt_tokens": len(ids), "new_tokens": len(out) - len(ids),
                     "counts": self._counts("decode", None),
                     "timings": {"setup_s": t1 - t0, "total_s": time.perf_counter() - t0,
                                 "per_token_s": [s["seconds"] for s in steps], "steps": steps}}

    def _counts(self, kind: str, length) -> dict:
        summary = getattr(self.client.plan, "summary", {}) or {}
        entry = summary.get(kind) or summary.get("full") or {}
        return {"circuit": kind, "longest_length": entry.get("length"), "depth": entry.get("depth"),
                **{k: v for k, v in (entry.get("counts") or {}).items()}}
