"""A saved encrypted pipeline, torch-free: client-side embedding, circuits per length, generation loop.

Directory written by :func:`hf_polyhe.save_encrypted_pipeline`::

    pipeline.json         what is where; task, family, max_length, labels, special token ids
    server/spec.json      the server part: architecture + fitted polynomials (TransformerSpec) ...
    server/spec_weights.npz   ... and every server-side weight
    client/embeddings.npz the client's embedding tables (token/position/type, or CLS/patch/position)
    client/...            tokenizer or image processor files
    plan.txt              the planner's report at 128-bit (every circuit kind; also pipeline.json["plan"])

:class:`EncryptedModel` is what both roles build on: the client embeds (in the clear, its own data) and
reads the logits; whoever evaluates runs the circuit on the ``plain`` backend (float64 reference) or, through
:class:`~hf_polyhe.he.keys_multi.EncryptedClient` / :class:`~hf_polyhe.he.keys_multi.EncryptedServer` (one key
set for every length of the export), on CKKS ciphertexts.

Generation (:meth:`EncryptedModel.generate`) takes either ``forward(x) -> logits`` (a full re-run per token)
or a ``runner`` with ``prefill(x) -> logits`` and ``decode(x_row) -> logits`` (a KV cache kept by the
evaluator): :class:`PlainCacheRunner` here, :class:`~hf_polyhe.he.keys_multi.EncryptedGeneration` on CKKS.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from .backends.plain import run_plain
from .errors import CircuitError
from .decode import build_circuit, build_decode_circuit, cache_names, decode_inputs
from .transformer import TransformerSpec, build_transformer_circuit

PIPELINE_FORMAT = "hf_polyhe.encrypted_pipeline"
PIPELINE_VERSION = 1


def read_pipeline_json(directory) -> dict:
    path = os.path.join(directory, "pipeline.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CircuitError(f"{directory!r} is not an encrypted pipeline export (cannot read pipeline.json: {e})") from e
    if meta.get("format") != PIPELINE_FORMAT:
        raise CircuitError(f"{path!r} is not a {PIPELINE_FORMAT} file")
    if meta.get("version") != PIPELINE_VERSION:
        raise CircuitError(f"pipeline version {meta.get('version')!r} is not supported (expected {PIPELINE_VERSION})")
    return meta


def sample_next_token(logits: np.ndarray, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, rng: Optional[np.random.Generator] = None) -> int:
    """Greedy argmax, or sampling with ``temperature`` and ``top_k`` (client side, on decrypted logits)."""
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


class EncryptedModel:
    """An exported pipeline directory: ``meta`` (pipeline.json), ``spec`` (server part), ``tables`` (client)."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.meta = read_pipeline_json(directory)
        self.spec = TransformerSpec.load(os.path.join(directory, "server"))
        with np.load(os.path.join(directory, "client", "embeddings.npz"), allow_pickle=False) as z:
            self.tables = {k: z[k] for k in z.files}
        self.family = self.meta["family"]
        self.max_length = int(self.meta["max_length"])
        self._circuits: dict = {}

    # -- client side -----------------------------------------------------------------------------
    def embed(self, input_ids=None, pixel_values=None, token_type_ids=None) -> np.ndarray:
        """The ``L x d`` embedding matrix the client encrypts."""
        t = self.tables
        if self.family in ("gpt", "bert"):
            if input_ids is None:
                raise ValueError(f"a {self.family} pipeline needs input_ids")
            ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
            vocab = t["word_embeddings"].shape[0]
            if ids.size == 0 or ids.size > self.max_length:
                raise ValueError(f"sequence of {ids.size} tokens: the export accepts 1..{self.max_length}")
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab}), got min {ids.min()} max {ids.max()}")
            x = t["word_embeddings"][ids] + t["position_embeddings"][: ids.size]
            if self.family == "bert":
                tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids).reshape(-1)
                x = x + t["token_type_embeddings"][tt]
            return x
        if pixel_values is None:
            raise ValueError("a vit pipeline needs pixel_values")
        px = np.asarray(pixel_values, dtype=np.float64)
        px = px[0] if px.ndim == 4 else px
        w = t["patch_weight"]  # (d, c, p, p)
        d, c, p, _ = w.shape
        if px.ndim != 3 or px.shape[0] != c or px.shape[1] % p or px.shape[1] != px.shape[2]:
            raise ValueError(f"pixel_values must have shape ({c}, H, H) with H a multiple of {p}, got {px.shape}")
        n = px.shape[1] // p
        patches = px.reshape(c, n, p, n, p).transpose(1, 3, 0, 2, 4).reshape(n * n, c * p * p)
        x = patches @ w.reshape(d, -1).T + t["patch_bias"]
        x = np.concatenate([t["cls_token"].reshape(1, d), x], axis=0)
        if x.shape[0] != t["position_embeddings"].shape[0]:
            raise ValueError(f"image gives {x.shape[0] - 1} patches, the model expects {t['position_embeddings'].shape[0] - 1}")
        return x + t["position_embeddings"]

    # -- circuits --------------------------------------------------------------------------------
    def circuit(self, seq_len: int, attention_mask=None, all_logits: bool = False):
        key = (seq_len, None if attention_mask is None else tuple(np.asarray(attention_mask).reshape(-1).tolist()), all_logits)
        if key not in self._circuits:
            self._circuits[key] = build_transformer_circuit(self.spec, seq_len, attention_mask, all_logits)
        return self._circuits[key]

    def forward_plain(self, x: np.ndarray, attention_mask=None, strict: bool = False) -> np.ndarray:
        """Output logits (``1 x vocab`` or ``1 x labels``) by the plain float64 backend."""
        c = self.circuit(x.shape[0], attention_mask)
        out = run_plain(c, {"x": x}, strict=strict)
        return np.asarray(out[c.outputs[0]]).reshape(-1)

    def prefill_plain(self, x: np.ndarray):
        """``(logits, caches)`` of the KV-cache prefill on the plain backend (causal LMs)."""
        out = run_plain(build_circuit(self.spec, x.shape[0], kv_cache=True), {"x": x})
        return np.asarray(out["logits"]).reshape(-1), {k: out[k] for k in cache_names(self.spec)}

    def decode_plain(self, x_row: np.ndarray, caches: dict):
        """``(logits, caches)`` of one decode step (``x_row``: ``1 x d``) on the plain backend."""
        t = next(iter(caches.values())).shape[0]
        out = run_plain(build_decode_circuit(self.spec, t), decode_inputs(x_row, caches))
        return np.asarray(out["logits"]).reshape(-1), {k: out[k] for k in cache_names(self.spec)}

    def generate(self, input_ids, max_new_tokens: int = 8, forward: Optional[Callable] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 eos_token_id: Optional[int] = None, seed: Optional[int] = None, callback: Optional[Callable] = None,
                 runner=None, use_cache: bool = False) -> list:
        """Generate token by token.

        ``forward(x) -> logits`` re-runs the whole sequence per token (default: the plain backend);
        ``runner`` (``prefill(x)``, ``decode(x_row)``) keeps a KV cache so each new token costs one token's
        work (``use_cache=True`` without a runner: :class:`PlainCacheRunner`). The evaluator only ever sees
        embeddings (encrypted in the CKKS case); token choice happens here, on the client, from decrypted
        logits."""
        if self.family != "gpt":
            raise ValueError(f"generation needs a causal LM export, this one is {self.family!r}")
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        if len(ids) + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds max_length {self.max_length}")
        if forward is not None and runner is not None:
            raise ValueError("pass either forward (full re-run per token) or runner (KV cache), not both")
        if runner is None and use_cache:
            runner = PlainCacheRunner(self)
        forward = forward or self.forward_plain
        rng = np.random.default_rng(seed)
        for step in range(max_new_tokens):
            if runner is None:
                logits = forward(self.embed(ids))
            elif step == 0:
                logits = runner.prefill(self.embed(ids))
            else:
                logits = runner.decode(self.embed(ids)[-1:])
            nxt = sample_next_token(logits, do_sample, temperature, top_k, rng)
            ids.append(nxt)
            if callback is not None:
                callback(nxt, logits)
            if eos_token_id is not None and nxt == eos_token_id:
                break
        return ids


class PlainCacheRunner:
    """KV-cache generation on the plain backend (the float64 reference of the encrypted KV cache)."""

    def __init__(self, model: EncryptedModel):
        self.model, self.caches = model, None

    def prefill(self, x):
        logits, self.caches = self.model.prefill_plain(x)
        return logits

    def decode(self, x_row):
        if self.caches is None:
            raise ValueError("decode before prefill")
        logits, self.caches = self.model.decode_plain(x_row, self.caches)
        return logits
