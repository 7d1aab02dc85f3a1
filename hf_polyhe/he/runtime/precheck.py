"""Checks of OpenFHE bytes before OpenFHE parses them (no OpenFHE needed here).

OpenFHE's deserialisers trust their input: a crypto context, key or ciphertext whose ring dimension or a modulus
was zeroed divides by zero inside the parser (SIGFPE: the whole process dies), and a checksum does not help since
whoever edits the bytes recomputes it. Whoever parses bytes from someone else therefore checks them against
what it expects first, and parses them where a crash cannot spread (:mod:`.sandbox`).

- :class:`CiphertextTemplate` (the server's check of a client's ciphertext): every fresh ciphertext of one crypto
  context at one level serialises to the same bytes except its coefficients and the key tag (in one of two
  shapes, see :func:`check_fresh`). The template is learnt from two encryptions made by a trusted process with
  that context (:meth:`CiphertextTemplate.learn`);
  :meth:`~CiphertextTemplate.check` then accepts exactly the bytes OpenFHE itself would write: same length,
  same structure bytes (context, ring dimension, moduli, level, scale, slots), the session's key tag, and every
  coefficient below its tower's modulus.
- :func:`context_prefix` / :func:`check_prefix` (the client's check of a server's result): a computed ciphertext
  carries another structure than a fresh one after its key tag (levels, shared parameter objects), but it
  starts like every ciphertext of the context: the serialised crypto context, then the key tag. The client
  compares that prefix with one of its own encryptions; the rest is parsed in a sandbox process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import SerializationError

_U64 = struct.Struct("<Q")


def _find_vectors(a: bytes, b: bytes, ring_dim: int) -> list:
    """``[(offset, modulus)]`` of the coefficient vectors in ``a``: OpenFHE writes each tower as ``u64 N``, ``N``
    little-endian u64 coefficients and the tower's u64 modulus. A vector is recognised where ``a`` and ``b`` (two
    encryptions) differ in most coefficients and both stay below the modulus that follows."""
    key, n, out, pos = _U64.pack(ring_dim), int(ring_dim), [], 0
    while True:
        i = a.find(key, pos)
        if i < 0:
            return out
        start, end = i + 8, i + 8 + 8 * n
        if end + 8 <= len(a) and a[i:i + 8] == b[i:i + 8]:
            wa = np.frombuffer(a, dtype="<u8", count=n, offset=start)
            wb = np.frombuffer(b, dtype="<u8", count=n, offset=start)
            (mod,) = _U64.unpack_from(a, end)
            if np.count_nonzero(wa != wb) > 0.9 * n and 2 < mod < 2**63 and (wa < mod).all() and (wb < mod).all():
                out.append((start, int(mod)))
                pos = end + 8
                continue
        pos = i + 1


@dataclass
class CiphertextTemplate:
    """What a fresh OpenFHE ciphertext of one crypto context at one level looks like, byte for byte.

    ``length``: bytes; ``ring_dim``: N; ``fixed``: ``[(offset, bytes)]`` that must match exactly (everything but
    the coefficients and the key tag); ``vectors``: ``[(offset, modulus)]`` of the ``N``-coefficient towers;
    ``key_tag_at``: ``(offset, length)`` of the key tag string."""

    length: int
    ring_dim: int
    fixed: list = field(default_factory=list)
    vectors: list = field(default_factory=list)
    key_tag_at: tuple = (0, 0)

    @classmethod
    def learn(cls, a: bytes, b: bytes, ring_dim: int, key_tag: str) -> "CiphertextTemplate":
        """The template of two fresh encryptions ``a`` and ``b`` (same context, level and key ``key_tag``), made by
        a trusted process."""
        a, b = bytes(a), bytes(b)
        if len(a) != len(b):
            raise SerializationError(f"two fresh ciphertexts of one context differ in length ({len(a)}, {len(b)})")
        vectors = _find_vectors(a, b, ring_dim)
        if not vectors:
            raise SerializationError(f"no coefficient vector of ring dimension {ring_dim} in the reference ciphertext")
        tag = key_tag.encode()
        at = a.find(tag)
        if at < 0 or at >= vectors[0][0]:
            raise SerializationError("the reference ciphertext carries its key tag somewhere unexpected")
        gaps, pos = [], 0
        for start, _ in vectors:
            gaps.append((pos, start))
            pos = start + 8 * ring_dim
        gaps.append((pos, len(a)))
        fixed = []
        for lo, hi in gaps:  # the key tag is cut out of the gap that holds it
            for s, e in ((lo, min(hi, at)), (max(lo, at + len(tag)), hi)) if lo <= at < hi else ((lo, hi),):
                if e > s:
                    if a[s:e] != b[s:e]:
                        raise SerializationError("two fresh ciphertexts of one context differ outside their coefficients")
                    fixed.append((s, a[s:e]))
        return cls(len(a), int(ring_dim), fixed, vectors, (at, len(tag)))

    def check(self, payload, key_tag: str) -> None:
        """SerializationError unless ``payload`` is a fresh ciphertext of this context and level under ``key_tag``:
        same length and structure, the key tag, every coefficient below its modulus."""
        data = memoryview(payload)
        if len(data) != self.length:
            raise SerializationError(f"an OpenFHE ciphertext of {len(data)} bytes: a fresh ciphertext of this session's "
                                     f"parameters at its start level has {self.length}")
        at, n = self.key_tag_at
        if bytes(data[at:at + n]) != key_tag.encode() or len(key_tag) != n:
            raise SerializationError("the OpenFHE ciphertext carries another key tag than its header / this session")
        for off, want in self.fixed:
            got = bytes(data[off:off + len(want)])
            if got != want:
                first = off + next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
                raise SerializationError(
                    f"byte {first} of the OpenFHE ciphertext differs from what this session's crypto context writes "
                    "there (ring dimension, moduli, level, scale or slots): not a fresh ciphertext of these parameters")
        for off, mod in self.vectors:
            words = np.frombuffer(data, dtype="<u8", count=self.ring_dim, offset=off)
            if (words >= mod).any():
                raise SerializationError(f"the OpenFHE ciphertext has coefficients above the modulus of their tower "
                                         f"(at byte {off})")

    def to_dict(self) -> dict:
        return {"format": "hf_polyhe.ciphertext_template", "length": self.length, "ring_dim": self.ring_dim,
                "fixed": [[o, b.hex()] for o, b in self.fixed], "vectors": [[o, str(m)] for o, m in self.vectors],
                "key_tag_at": list(self.key_tag_at)}

    @classmethod
    def from_dict(cls, d: dict) -> "CiphertextTemplate":
        if d.get("format") != "hf_polyhe.ciphertext_template":
            raise SerializationError("not a ciphertext template")
        return cls(int(d["length"]), int(d["ring_dim"]), [(int(o), bytes.fromhex(h)) for o, h in d["fixed"]],
                   [(int(o), int(m)) for o, m in d["vectors"]], tuple(int(v) for v in d["key_tag_at"]))


def check_fresh(templates, payload, key_tag: str) -> None:
    """``payload`` must match one of ``templates`` (:meth:`CiphertextTemplate.check`). A fresh ciphertext comes in
    one of two shapes: encrypted with a public key made in the same process, whose element parameters are the
    context's own objects (serialised once, then referenced), or with a public key read from a file, whose
    parameters are objects of their own (serialised again). SerializationError names what differs from the
    template of the same length."""
    errors = []
    for t in templates:
        try:
            t.check(payload, key_tag)
            return
        except SerializationError as e:
            errors.append((t.length != len(memoryview(payload)), str(e)))
    if not errors:
        raise SerializationError("no ciphertext template to check against")
    raise SerializationError(sorted(errors)[0][1])


def context_prefix(reference, key_tag: str) -> bytes:
    """The first bytes of a ciphertext of this context under ``key_tag`` up to the end of its key tag: the
    serialised crypto context (ring dimension, moduli, scheme) that every ciphertext of the context starts with.
    ``reference``: a ciphertext this process made itself."""
    reference = bytes(reference)
    at = reference.find(key_tag.encode())
    if at < 0:
        raise SerializationError("the reference ciphertext does not carry its key tag")
    return reference[: at + len(key_tag)]


def check_prefix(payload, prefix: bytes) -> None:
    """SerializationError unless ``payload`` starts with ``prefix`` (:func:`context_prefix`)."""
    head = bytes(memoryview(payload)[: len(prefix)])
    if head != prefix:
        first = next((i for i, (x, y) in enumerate(zip(head, prefix)) if x != y), len(head))
        raise SerializationError(f"byte {first} of the OpenFHE ciphertext differs from this client's crypto context "
                                 "(ring dimension, moduli, scheme) or key tag: refused before parsing")
