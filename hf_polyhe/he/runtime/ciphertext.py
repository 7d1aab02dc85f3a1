"""The wire form of an encrypted tensor: :class:`EncryptedTensor` and its container bytes.

Layout of the container::

    b"HFPHECT1"  | u64 header length | JSON header | OpenFHE BINARY ciphertext 1 | ciphertext 2 | ...

The header names the tensor's ``role`` (``"embeddings"``: what a client sends, ``"logits"``: what a server
returns), its packing (``layout``), the secret key's tag, the ring dimension, and per ciphertext its size and
SHA-256. :func:`read_header` checks all of that without OpenFHE, so corrupted, truncated, foreign or
mislabelled bytes are refused before any native parser sees them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from ..circuit.packing import layout_from_dict
from ..errors import KeyMismatchError, LayoutError, SerializationError

MAGIC = b"HFPHECT1"
ROLES = ("embeddings", "logits")


@dataclass
class TensorHeader:
    """What :func:`read_header` learns from a container without parsing a ciphertext."""

    role: str
    layout: object
    key_tag: str
    ring_dim: int
    offsets: list  # (start, size) of each ciphertext payload

    @property
    def rows(self) -> int:
        return int(self.layout.rows)

    def check(self, role: str, key_tag: str, ring_dim: int) -> "TensorHeader":
        """This header, if it announces ``role`` under the secret key ``key_tag`` and a ring of ``ring_dim``;
        LayoutError / KeyMismatchError naming what differs otherwise."""
        if self.role != role:
            raise LayoutError(f"this encrypted tensor holds {self.role}, expected {role}")
        if self.key_tag != key_tag:
            raise KeyMismatchError(f"this ciphertext was encrypted under another key (tag {self.key_tag[:12]}..., "
                                   f"expected {key_tag[:12]}...)")
        if self.ring_dim != ring_dim:
            raise KeyMismatchError(f"this ciphertext belongs to another crypto context (ring {self.ring_dim}, "
                                   f"expected {ring_dim})")
        return self


MAX_HEADER_BYTES = 1 << 20
MAX_RING_DIM = 1 << 17
_HEX = set("0123456789abcdef")


def _layout(d):
    """The header's layout, with every field checked for type first (a string where a count belongs must be a
    400, not a TypeError deep in the packing code)."""
    if not isinstance(d, dict) or not isinstance(d.get("kind", "matrix"), str):
        raise ValueError("layout must be an object")
    for k, v in d.items():
        if k == "kind":
            continue
        if isinstance(v, bool) and k in ("clean", "confined", "spread", "causal"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 40:
            raise ValueError(f"layout field {k!r} must be a count, got {v!r}")
    layout = layout_from_dict(d)
    if not 1 <= int(layout.rows) <= 1 << 20 or not 1 <= int(layout.num_cts) <= 1 << 16:
        raise ValueError(f"layout of {layout.rows} rows in {layout.num_cts} ciphertexts is out of range")
    return layout


def read_header(data) -> TensorHeader:
    """Check an encrypted-tensor container (magic, header, role, layout, sizes, checksums) without OpenFHE.
    Any malformed header (wrong JSON types included) is a :class:`SerializationError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 16 or bytes(data[:8]) != MAGIC:
        raise SerializationError("not an hf_polyhe encrypted tensor (bad magic)")
    data = memoryview(data)
    (hlen,) = struct.unpack("<Q", data[8:16])
    if hlen > len(data) - 16 or hlen > MAX_HEADER_BYTES:
        raise SerializationError("encrypted tensor header is truncated or too long")
    try:
        header = json.loads(bytes(data[16 : 16 + hlen]).decode())
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        layout = _layout(header["layout"])
        sizes, digests = header["sizes"], header["sha256"]
        if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
            raise ValueError("sizes must be a list of byte counts")
        if not isinstance(digests, list) or not all(isinstance(d, str) and len(d) == 64 and set(d) <= _HEX
                                                    for d in digests):
            raise ValueError("sha256 must be a list of hex digests")
        role, key_tag, ring_dim = header["role"], header["key_tag"], header["ring_dim"]
        if not isinstance(role, str) or not isinstance(key_tag, str) or not 0 < len(key_tag) <= 128 \
                or not set(key_tag) <= _HEX:
            raise ValueError("role and key_tag must be strings (key_tag: hex)")
        if not isinstance(ring_dim, int) or isinstance(ring_dim, bool) or not 2 <= ring_dim <= MAX_RING_DIM \
                or ring_dim & (ring_dim - 1):
            raise ValueError(f"ring_dim must be a power of two up to {MAX_RING_DIM}, got {ring_dim!r}")
    except SerializationError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the JSON holds, the answer is "corrupted header"
        raise SerializationError(f"corrupted encrypted-tensor header: {type(e).__name__}: {e}") from None
    if role not in ROLES:
        raise SerializationError(f"encrypted tensor has unknown role {role!r}; expected one of {ROLES}")
    pos = 16 + hlen
    if len(sizes) != len(digests) or len(sizes) != layout.num_cts or any(n <= 0 for n in sizes) \
            or pos + sum(sizes) != len(data):
        raise SerializationError(f"encrypted tensor is truncated or has trailing bytes ({len(data)} bytes)")
    offsets = []
    for n, dg in zip(sizes, digests):
        if hashlib.sha256(data[pos : pos + n]).hexdigest() != dg:
            raise SerializationError("encrypted tensor payload is corrupted (checksum mismatch)")
        offsets.append((pos, n))
        pos += n
    return TensorHeader(role, layout, key_tag, ring_dim, offsets)


class EncryptedTensor:
    """A packed encrypted tensor: its role, layout, the secret key's tag, one OpenFHE ciphertext per block."""

    def __init__(self, layout, cts, key_tag: str, ring_dim: int, role: str = "embeddings"):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.layout, self.cts, self.key_tag, self.ring_dim, self.role = layout, list(cts), key_tag, int(ring_dim), role

    def check(self, role: str, key_tag: str, ring_dim: int) -> "EncryptedTensor":
        """This tensor, if it holds ``role`` under the secret key ``key_tag`` and a ring of ``ring_dim`` (header and
        every ciphertext); LayoutError / KeyMismatchError naming what differs otherwise."""
        TensorHeader(self.role, self.layout, self.key_tag, self.ring_dim, []).check(role, key_tag, ring_dim)
        if any(ct.GetKeyTag() != key_tag for ct in self.cts):
            raise KeyMismatchError("a ciphertext in this tensor carries another key tag than its header")
        if any(ct.GetCryptoContext().GetRingDimension() != ring_dim for ct in self.cts):
            raise KeyMismatchError(f"a ciphertext in this tensor belongs to another crypto context (expected ring {ring_dim})")
        return self

    def to_bytes(self) -> bytes:
        from ..backends.openfhe import serialize

        payloads = [serialize(ct) for ct in self.cts]
        header = json.dumps({
            "role": self.role, "layout": self.layout.to_dict(), "key_tag": self.key_tag, "ring_dim": self.ring_dim,
            "sizes": [len(p) for p in payloads], "sha256": [hashlib.sha256(p).hexdigest() for p in payloads],
        }).encode()
        return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(payloads)

    @classmethod
    def from_bytes(cls, data, role: str = None) -> "EncryptedTensor":
        """Parse a container; ``role`` (if given) must match the header's (a client refuses to read its own input
        as logits, a server refuses logits as input)."""
        from ..backends.openfhe import import_openfhe

        h = read_header(data)
        if role is not None and h.role != role:
            raise LayoutError(f"this encrypted tensor holds {h.role}, expected {role}")
        ofhe = import_openfhe()
        data = memoryview(data)
        cts = []
        for start, n in h.offsets:
            try:
                cts.append(ofhe.DeserializeCiphertextString(bytes(data[start : start + n]), ofhe.BINARY))
            except Exception as e:
                raise SerializationError(f"OpenFHE could not parse a ciphertext: {e}") from e
        return cls(h.layout, cts, h.key_tag, h.ring_dim, h.role)
