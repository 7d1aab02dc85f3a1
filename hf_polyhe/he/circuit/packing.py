"""Packing of tensors into CKKS slot vectors.

Matrix layout (:class:`MatrixLayout`)
-------------------------------------
An activation ``X`` of shape ``rows x cols`` (L tokens x d features) is cut into blocks of ``R x D`` where
``D = block`` (a power of two, the same for every tensor of a circuit, typically the hidden size) and
``R = slots // D``. Block ``(rb, cb)`` lives in ciphertext number ``rb * col_blocks + cb`` and is stored
row-major::

    slot(i, j) = (i mod R) * D + (j mod D)        ciphertext = (i // R) * col_blocks + (j // D)

so one ciphertext holds ``R`` whole rows of ``D`` features. With ``L * d <= slots`` and ``d <= D`` a tensor
is one ciphertext. Slots outside ``[0, rows) x [0, cols)`` are *padding*. A layout is ``clean`` when its
padding is known to be zero (the client encrypts zeros there; a polynomial makes it dirty since
``p(0) != 0``). Ops that would read padding either ignore it structurally (``linear`` uses zero diagonal
entries, attention masks invalid pairs) or require a clean input (``row_sum`` when ``cols % D != 0``).

Row groups (``groups = G > 1``): a ciphertext then carries ``G * slots`` CKKS slots, ``G`` groups of ``slots``
each (``R`` rows of ``D``), and the tensor must fit one row block (``rows <= R``). A one-block tensor
(``cols <= D``) is *replicated*: every group holds the same ``R x D`` block, so the slot vector is periodic
with period ``slots`` and every op built for one group (its plaintexts tiled ``G`` times, rotations by less
than a group) computes the same thing in every group -- this is how OpenFHE's sparse packing already lays
out a batch smaller than ``N/2``. A wider tensor is *stacked*: ``k = min(G, next_pow2(col_blocks))`` column
blocks per ciphertext, block ``n * k + (g mod k)`` in group ``g`` of ciphertext ``n`` (each block ``G / k``
times). ``linear`` then multiplies all ``k`` blocks with one plaintext: a replicated input feeds ``k`` output
blocks at the cost of one, and a stacked input's ``k`` blocks are summed by ``log2 k`` rotations by whole
groups, which leaves the (one-block) output replicated. Only pointwise ops and ``linear`` take stacked input.

Slot rotation is cyclic over the ``slots`` of a ciphertext (OpenFHE sparse packing):
``rot(v, k)[s] = v[(s + k) mod slots]``. Rotation indices are normalised to ``(-slots/2, slots/2]``.

Plaintext matmul (``linear``): generalised diagonal method. For a ``D x D`` weight block,
``y[s] = sum_t diag_t[s] * rot(x, t)[s]`` over ``t in (-D, D)`` with
``diag_t[i*D + j] = W[j + t, j]`` when ``0 <= j + t < D`` (else 0: a row never reads its neighbour).
Baby-step/giant-step: ``t = g*n1 + b``; ``y = sum_g rot(sum_b roll(diag_t, g*n1) * rot(x, b), g*n1)``,
baby rotations shared by all output blocks, giant rotations once per output block.

Single-row matmul (a decode step's token): with one valid row the rows below it are free, so the row is first
doubled (``xx = x + rot(x, -D)`` puts a copy right after it) and rotations read it *cyclically*: only the ``D``
cyclic diagonals ``c_t[j] = W[(j + t) mod D, j]`` are needed instead of ``2D - 1``. With ``t = g*n1 + b``,
``y = sum_g rot(sum_b Q_{g,b} * rot(xx, b), g*n1)`` where ``Q_{g,b}`` holds ``c_t`` at slots
``[g*n1, g*n1 + D)``; every term stays inside the doubled row and the giant rotation brings it to ``[0, D)``,
so the output is clean. This needs the input's padding to be zero -- or a known constant (a polynomial of a
clean tensor holds ``p(0)`` there), which is subtracted from the doubled row at no level cost.

One-row vectors (:class:`TiledVector`, :class:`ColumnVector`)
-------------------------------------------------------------
A decode step has one token, so a whole ciphertext can hold one ``1 x n`` vector in a shape that makes a
``linear`` one plaintext product. *Tiled*: ``slot(s) = x[s mod P]`` (``P = next_pow2(n)``). *Column*: rows of
``width`` slots, ``x[i]`` in the first ``valid`` slots of row ``i``. Then, with ``y = x W``:

- tiled -> column: row ``r`` of the plaintext holds ``W[s mod P, r]``; after the product, a window sum of ``P``
  slots (``log2 P`` rotations by 1, 2, 4, ...) leaves ``y[r]`` in slots ``0 .. width - P`` of row ``r``;
- column -> tiled: row ``i`` of the plaintext holds ``W[i, :]`` (as many copies of the period as the valid
  slots take); the sum over all rows (``log2 rows`` rotations by whole rows) leaves ``y`` in every row, and
  ``log2`` more rotations tile the period over the row. With fewer valid slots than ``P`` the output is cut
  into chunks, one product each, put side by side by a tree of power-of-two rotations.

The rows and the window stay inside a row, so nothing crosses rows in the valid slots. A decode step's
residual stream is a column vector, q/k/v and the MLP's hidden layer are tiled (``hf_polyhe.he.compile.decode``).

Score layout (:class:`ScoreLayout`)
-----------------------------------
Attention scores of ``heads`` heads of width ``dh = cols / heads`` for ``L <= R`` rows. A *shift* ``s``
pairs query row ``i`` with key row ``j = (i + s) mod R``. Shifts are grouped by ``dh``; group ``g`` is one
ciphertext with ``slot(i * D + h * dh + m) = S_h[i, (i + shifts[g*dh + m]) mod R]``. Only pairs with
``i < L``, ``j < L`` (and ``j <= i`` if causal) are *covered*; other slots are zero.

With row groups the scores are replicated like any one-block tensor, or *spread* (``spread=True``, from
keys confined to group 0: ``MatrixLayout.confined``): shift number ``n`` lives in group ``n mod G`` at column
offset ``(n // G) mod dh`` of ciphertext ``n // (G * dh)``, so one ciphertext holds ``G * dh`` shifts and one
ct x ct product computes ``G`` of them. It needs ``2 * L <= R``: keys moved by ``|s| < L`` rows then cross a
group border only into the neighbour's padding rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import LayoutError


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(n, 1)))))


def norm_rot(k: int, slots: int) -> int:
    """Rotation index ``k`` normalised to ``(-slots/2, slots/2]`` (one key per distinct value)."""
    k %= slots
    return k - slots if k > slots // 2 else k


@dataclass(frozen=True)
class MatrixLayout:
    """``rows x cols`` tensor in ``R x D`` row-major blocks (see module docstring)."""

    rows: int
    cols: int
    block: int
    slots: int
    clean: bool = field(default=True, compare=False)
    groups: int = 1
    confined: bool = False  # one block in group 0 only, zeros in the other groups (attention keys/values)

    kind = "matrix"

    def __post_init__(self):
        for name in ("rows", "cols", "block", "slots", "groups"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise LayoutError(f"{name} must be a positive integer, got {v!r}")
        if not is_pow2(self.block) or not is_pow2(self.slots) or self.slots < self.block:
            raise LayoutError(f"block ({self.block}) and slots ({self.slots}) must be powers of two with block <= slots")
        if not is_pow2(self.groups):
            raise LayoutError(f"groups must be a power of two, got {self.groups}")
        if self.groups > 1 and self.rows > self.R:
            raise LayoutError(f"with {self.groups} row groups a tensor must fit one group of R = {self.R} rows, "
                              f"got {self.rows} rows")
        if self.confined and (self.groups == 1 or self.col_blocks != 1):
            raise LayoutError("a confined layout needs several row groups and one column block")

    @property
    def ct_slots(self) -> int:
        """CKKS slots of one ciphertext: ``groups * slots``."""
        return self.groups * self.slots

    @property
    def per_ct(self) -> int:
        """Column blocks per ciphertext: 1 (replicated in every group) or ``k`` stacked blocks."""
        if self.groups == 1 or self.col_blocks == 1:
            return 1
        return min(self.groups, next_pow2(self.col_blocks))

    @property
    def stacked(self) -> bool:
        return self.per_ct > 1

    def block_at(self, n: int, g: int) -> Optional[int]:
        """Column block held by group ``g`` of ciphertext ``n`` (None: an empty group)."""
        if self.confined and g:
            return None
        cb = n * self.per_ct + g % self.per_ct
        return cb if cb < self.col_blocks else None

    @property
    def R(self) -> int:
        return self.slots // self.block

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // self.R)

    @property
    def col_blocks(self) -> int:
        return -(-self.cols // self.block)

    @property
    def num_cts(self) -> int:
        return self.row_blocks * -(-self.col_blocks // self.per_ct)

    @property
    def shape(self) -> tuple:
        return (self.rows, self.cols)

    def with_(self, **kw) -> "MatrixLayout":
        d = dict(rows=self.rows, cols=self.cols, block=self.block, slots=self.slots, clean=self.clean,
                 groups=self.groups, confined=self.confined)
        d.update(kw)
        return MatrixLayout(**d)

    def block_rows(self, rb: int) -> int:
        """Valid rows in row block ``rb``."""
        return min(self.R, self.rows - rb * self.R)

    def block_cols(self, cb: int) -> int:
        return min(self.block, self.cols - cb * self.block)

    def ct_index(self, rb: int, cb: int) -> int:
        if self.groups > 1:
            return cb // self.per_ct
        return rb * self.col_blocks + cb

    def check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.shape:
            raise LayoutError(f"expected a tensor of shape {self.shape}, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise LayoutError("tensor contains NaN or inf")
        return x

    def pack(self, x) -> list:
        """``rows x cols`` array -> list of ``num_cts`` slot vectors (float64, length ``slots``)."""
        x = self.check(x)
        blocks = []
        for rb in range(self.row_blocks):
            for cb in range(self.col_blocks):
                blk = np.zeros((self.R, self.block))
                r, c = self.block_rows(rb), self.block_cols(cb)
                blk[:r, :c] = x[rb * self.R : rb * self.R + r, cb * self.block : cb * self.block + c]
                blocks.append(blk.reshape(-1))
        if self.groups == 1:
            return blocks
        out = []
        for n in range(self.num_cts):
            v = np.zeros(self.ct_slots)
            for g in range(self.groups):
                cb = self.block_at(n, g)
                if cb is not None:
                    v[g * self.slots : (g + 1) * self.slots] = blocks[cb]
            out.append(v)
        return out

    def unpack(self, vecs: Sequence) -> np.ndarray:
        if len(vecs) != self.num_cts:
            raise LayoutError(f"layout {self.shape} needs {self.num_cts} slot vectors, got {len(vecs)}")
        x = np.zeros(self.shape)
        for rb in range(self.row_blocks):
            for cb in range(self.col_blocks):
                v = np.asarray(vecs[self.ct_index(rb, cb)], dtype=np.float64).reshape(-1)
                if v.size < self.ct_slots:
                    raise LayoutError(f"slot vector of length {v.size} < {self.ct_slots} slots")
                g0 = (cb % self.per_ct) * self.slots  # the block's first group
                blk = v[g0 : g0 + self.slots].reshape(self.R, self.block)
                r, c = self.block_rows(rb), self.block_cols(cb)
                x[rb * self.R : rb * self.R + r, cb * self.block : cb * self.block + c] = blk[:r, :c]
        return x

    def valid_masks(self) -> list:
        """Per ciphertext, a boolean slot mask of the non-padding slots."""
        return [v > 0 for v in self.pack(np.ones(self.shape))]

    def broadcast(self, value) -> np.ndarray:
        """Broadcast a plaintext (scalar, ``(cols,)``, ``(rows, 1)``, ``(rows, cols)``) to ``rows x cols``."""
        v = np.asarray(value, dtype=np.float64)
        try:
            return np.broadcast_to(v, self.shape).copy()
        except ValueError:
            raise LayoutError(f"plaintext of shape {v.shape} does not broadcast to {self.shape}") from None

    def to_dict(self) -> dict:
        d = {"kind": "matrix", "rows": self.rows, "cols": self.cols, "block": self.block, "slots": self.slots,
             "clean": self.clean}
        if self.groups > 1:
            d["groups"] = self.groups
        if self.confined:
            d["confined"] = True
        return d


def attention_shifts(rows: int, R: int, causal: bool) -> tuple:
    """Cyclic row shifts ``s`` (key row ``(i + s) mod R``) that cover at least one valid (query, key) pair."""
    if rows > R:
        raise LayoutError(f"attention needs all {rows} rows in one ciphertext (at most R = slots/block = {R})")
    out = []
    i = np.arange(rows)
    for s in range(R):
        j = (i + s) % R
        ok = (j < rows) & ((j <= i) if causal else True)
        if ok.any():
            out.append(s)
    # order: s = 0 first, then the negative shifts (previous tokens) nearest first, then positive ones
    return tuple(sorted(out, key=lambda s: (s != 0, s <= R // 2, -s if s > R // 2 else s)))


@dataclass(frozen=True)
class ScoreLayout:
    """Per-head ``L x L`` attention scores packed by shifts (see module docstring)."""

    rows: int
    heads: int
    head_dim: int
    block: int
    slots: int
    causal: bool
    clean: bool = field(default=True, compare=False)
    groups: int = 1  # replicated in every row group (see MatrixLayout) ...
    spread: bool = False  # ... or shifts spread over the groups: shift number n in group n mod groups

    kind = "scores"

    def __post_init__(self):
        if not is_pow2(self.head_dim):
            raise LayoutError(f"head_dim must be a power of two for the in-head rotation sums, got {self.head_dim}")
        if self.heads * self.head_dim > self.block:
            raise LayoutError(f"heads*head_dim = {self.heads * self.head_dim} exceeds block {self.block}")
        if self.spread and (self.groups == 1 or 2 * self.rows > self.R):
            raise LayoutError(f"spread scores need several row groups and at most R/2 = {self.R // 2} rows")

    @property
    def R(self) -> int:
        return self.slots // self.block

    @property
    def shifts(self) -> tuple:
        return attention_shifts(self.rows, self.R, self.causal)

    @property
    def per_ct(self) -> int:
        """Shifts per ciphertext: ``head_dim`` column offsets (times ``groups`` when spread)."""
        return self.head_dim * (self.groups if self.spread else 1)

    @property
    def num_cts(self) -> int:
        return -(-len(self.shifts) // self.per_ct)

    @property
    def shape(self) -> tuple:
        return (self.heads, self.rows, self.rows)

    def batches(self):
        """Spread scores: yield ``(ct, m, shifts)``, the shifts (one per group, fewer in the last batch) held at
        column offset ``m`` of ciphertext ``ct``."""
        sh = self.shifts
        for b in range(-(-len(sh) // self.groups)):
            yield b // self.head_dim, b % self.head_dim, sh[b * self.groups : (b + 1) * self.groups]

    def _slots_of(self):
        """``(ct, slot offset, m, s)`` for every shift: where its ``R x D`` block of scores lives."""
        if self.spread:
            for ct, m, shifts in self.batches():
                for g, s in enumerate(shifts):
                    yield ct, g * self.slots, m, s
        else:
            for ct, m, s in self.positions():
                yield ct, 0, m, s

    def with_(self, **kw):
        d = dict(rows=self.rows, heads=self.heads, head_dim=self.head_dim, block=self.block, slots=self.slots,
                 causal=self.causal, clean=self.clean, groups=self.groups, spread=self.spread)
        d.update(kw)
        return ScoreLayout(**d)

    def pair_valid(self, s: int) -> np.ndarray:
        """Boolean over query rows ``i < rows``: is (i, (i+s) mod R) a covered pair."""
        i = np.arange(self.rows)
        j = (i + s) % self.R
        return (j < self.rows) & ((j <= i) if self.causal else True)

    def positions(self):
        """Yield ``(ct, m, s)``: shift ``s`` lives in ciphertext ``ct`` at column offset ``m`` of each head."""
        for n, s in enumerate(self.shifts):
            yield n // self.head_dim, n % self.head_dim, s

    def pack(self, S) -> list:
        S = np.asarray(S, dtype=np.float64)
        if S.shape != self.shape:
            raise LayoutError(f"expected scores of shape {self.shape}, got {S.shape}")
        vecs = [np.zeros(self.slots * (self.groups if self.spread else 1)) for _ in range(self.num_cts)]
        for ct, off, m, s in self._slots_of():
            ok = self.pair_valid(s)
            for i in np.nonzero(ok)[0]:
                j = (i + s) % self.R
                for h in range(self.heads):
                    vecs[ct][off + i * self.block + h * self.head_dim + m] = S[h, i, j]
        return [np.tile(v, self.groups) for v in vecs] if self.groups > 1 and not self.spread else vecs

    def unpack(self, vecs) -> np.ndarray:
        if len(vecs) != self.num_cts:
            raise LayoutError(f"score layout needs {self.num_cts} slot vectors, got {len(vecs)}")
        S = np.zeros(self.shape)
        for ct, off, m, s in self._slots_of():
            v = np.asarray(vecs[ct], dtype=np.float64)
            for i in np.nonzero(self.pair_valid(s))[0]:
                j = (i + s) % self.R
                for h in range(self.heads):
                    S[h, i, j] = v[off + i * self.block + h * self.head_dim + m]
        return S

    def coverage(self) -> np.ndarray:
        """Boolean ``(heads, L, L)``: which score entries the layout holds."""
        return self.unpack(self.pack(np.ones(self.shape))) > 0

    def valid_masks(self) -> list:
        return [v > 0 for v in self.pack(np.ones(self.shape))]

    def broadcast(self, value) -> np.ndarray:
        v = np.asarray(value, dtype=np.float64)
        try:
            return np.broadcast_to(v, self.shape).copy()
        except ValueError:
            raise LayoutError(f"plaintext of shape {v.shape} does not broadcast to {self.shape}") from None

    def to_dict(self) -> dict:
        d = {"kind": "scores", "rows": self.rows, "heads": self.heads, "head_dim": self.head_dim,
             "block": self.block, "slots": self.slots, "causal": self.causal, "clean": self.clean}
        if self.groups > 1:
            d["groups"] = self.groups
        if self.spread:
            d["spread"] = True
        return d


# ---------------------------------------------------------------------------------------------------------
# One-row vectors of a decode step (a single token): the whole ciphertext for one ``1 x n`` vector


class _OneRow:
    """What the two one-row vector layouts share: one ciphertext, one row, no row groups of their own."""

    rows = 1
    num_cts = 1
    groups = 1
    confined = False
    stacked = False
    check = MatrixLayout.check
    broadcast = MatrixLayout.broadcast

    @property
    def shape(self) -> tuple:
        return (1, self.cols)


@dataclass(frozen=True)
class TiledVector(_OneRow):
    """A ``1 x n`` vector tiled over the whole ciphertext: ``slot(s) = x[s mod period]`` (``period`` a power of
    two >= ``n``; slots with ``s mod period >= n`` are padding, zero when ``clean``). Every ``period`` slots
    hold the vector, so a row-major cache of ``period``-wide rows meets it in every row (``qk_decode``,
    ``append_row``), and a ``linear`` to a :class:`ColumnVector` needs one plaintext product and
    ``log2 period`` rotations."""

    cols: int
    period: int
    ct_slots: int
    clean: bool = field(default=True, compare=False)

    kind = "tiled"

    def __post_init__(self):
        if not (0 < self.cols <= self.period) or not is_pow2(self.period) or not is_pow2(self.ct_slots) \
                or self.period > self.ct_slots:
            raise LayoutError(f"a tiled vector of {self.cols} entries needs a power-of-two period >= {self.cols} "
                              f"dividing the {self.ct_slots} slots, got {self.period}")

    def with_(self, **kw) -> "TiledVector":
        d = dict(cols=self.cols, period=self.period, ct_slots=self.ct_slots, clean=self.clean)
        d.update(kw)
        return TiledVector(**d)

    def pack(self, x) -> list:
        v = np.zeros(self.period)
        v[: self.cols] = self.check(x)[0]
        return [np.tile(v, self.ct_slots // self.period)]

    def unpack(self, vecs) -> np.ndarray:
        if len(vecs) != 1 or np.size(vecs[0]) < self.ct_slots:
            raise LayoutError(f"a tiled vector needs one slot vector of {self.ct_slots} slots")
        return np.asarray(vecs[0], dtype=np.float64).reshape(-1)[: self.cols].reshape(1, -1).copy()

    def valid_masks(self) -> list:
        return [np.arange(self.ct_slots) % self.period < self.cols]

    def to_dict(self) -> dict:
        return {"kind": "tiled", "rows": 1, "cols": self.cols, "period": self.period, "ct_slots": self.ct_slots,
                "clean": self.clean}


@dataclass(frozen=True)
class ColumnVector(_OneRow):
    """A ``1 x n`` vector down the rows: the ciphertext is ``ct_slots / width`` rows of ``width`` slots and entry
    ``i`` fills the first ``valid`` slots of row ``i`` (``slot(i * width + j) = x[i]`` for ``j < valid``; the other
    columns are don't-care, rows ``>= n`` are padding, zero in the valid columns when ``clean``). A ``linear``
    from it to a :class:`TiledVector` needs one plaintext product per ``valid``-wide chunk of the output and
    ``log2(rows)`` rotations; LayerNorm sums over features are sums over rows."""

    cols: int
    width: int
    ct_slots: int
    valid: int = field(default=0, compare=False)  # 0: the whole row
    clean: bool = field(default=True, compare=False)

    kind = "column"

    def __post_init__(self):
        if not is_pow2(self.width) or not is_pow2(self.ct_slots) or self.width > self.ct_slots:
            raise LayoutError(f"row width {self.width} and slots {self.ct_slots} must be powers of two, width <= slots")
        if self.cols > self.n_rows:
            raise LayoutError(f"a column vector of {self.cols} entries needs {self.cols} rows, {self.ct_slots} slots "
                              f"in rows of {self.width} hold {self.n_rows}")
        if self.valid == 0:
            object.__setattr__(self, "valid", self.width)
        if not 0 < self.valid <= self.width:
            raise LayoutError(f"valid columns must be in 1..{self.width}, got {self.valid}")

    @property
    def n_rows(self) -> int:
        return self.ct_slots // self.width

    def with_(self, **kw) -> "ColumnVector":
        d = dict(cols=self.cols, width=self.width, ct_slots=self.ct_slots, valid=self.valid, clean=self.clean)
        d.update(kw)
        return ColumnVector(**d)

    def pack(self, x) -> list:
        v = np.zeros((self.n_rows, self.width))
        v[: self.cols, : self.valid] = self.check(x)[0][:, None]
        return [v.reshape(-1)]

    def unpack(self, vecs) -> np.ndarray:
        if len(vecs) != 1 or np.size(vecs[0]) < self.ct_slots:
            raise LayoutError(f"a column vector needs one slot vector of {self.ct_slots} slots")
        v = np.asarray(vecs[0], dtype=np.float64).reshape(-1)[: self.ct_slots].reshape(self.n_rows, self.width)
        return v[: self.cols, 0].reshape(1, -1).copy()

    def valid_masks(self) -> list:
        m = np.zeros((self.n_rows, self.width), dtype=bool)
        m[: self.cols, : self.valid] = True
        return [m.reshape(-1)]

    def to_dict(self) -> dict:
        return {"kind": "column", "rows": 1, "cols": self.cols, "width": self.width, "ct_slots": self.ct_slots,
                "valid": self.valid, "clean": self.clean}


def same_packing(a, b) -> bool:
    """Do ``a`` and ``b`` pack the same way? Layout equality, plus the valid columns of column vectors (which
    equality leaves out, so that sums of column vectors with different valid widths type-check)."""
    return a == b and getattr(a, "valid", None) == getattr(b, "valid", None)


def layout_from_dict(d: dict):
    d = dict(d)
    kind = d.pop("kind", "matrix")
    if kind == "matrix":
        return MatrixLayout(**d)
    if kind == "scores":
        return ScoreLayout(**d)
    if kind in ("tiled", "column"):
        d.pop("rows", None)
        return (TiledVector if kind == "tiled" else ColumnVector)(**d)
    raise LayoutError(f"unknown layout kind {kind!r}; accepted: matrix, scores, tiled, column")



# ---------------------------------------------------------------------------------------------------------
# Plaintext matmul: diagonals and baby-step/giant-step schedule


@dataclass
class BSGSPlan:
    """Schedule of one ``linear`` op: ``n1`` baby steps, and per (in block, out block) the rotated diagonals
    ``{(g, b): vector}`` for each row block."""

    n1: int
    baby: tuple  # baby rotation amounts (> 0)
    giant: tuple  # giant rotation amounts (multiples of n1, != 0 or 0)
    terms: dict  # (rb, ib, ob) -> {giant: {baby: slot vector}}
    doubled: bool = False  # single-row plan on the doubled row (see the module docstring)
    group_sum: int = 0  # grouped plans: rotations by 1, 2, 4, ... groups summing a stacked input's blocks
    # rotations over the whole ciphertext, not normalised to one row group: a grouped plan's groups hold different
    # blocks (and its plaintexts differ per group), so rotating by ``k - slots`` instead of ``k`` reads a neighbour
    whole: bool = False


def block_diagonals(W: np.ndarray, layout_in: MatrixLayout, ib: int, ob: int, nrows: int, d_out: int) -> dict:
    """Nonzero generalised diagonals ``{t: slot vector}`` of weight block ``(ib, ob)`` for ``nrows`` valid rows."""
    D, R = layout_in.block, layout_in.R
    d_in = layout_in.cols
    blk = np.zeros((D, D))
    r0, c0 = ib * D, ob * D
    sub = W[r0 : min(r0 + D, d_in), c0 : min(c0 + D, d_out)]
    blk[: sub.shape[0], : sub.shape[1]] = sub
    out = {}
    j = np.arange(D)
    for t in range(-(D - 1), D):
        k = j + t
        ok = (k >= 0) & (k < D)
        row = np.zeros(D)
        row[ok] = blk[k[ok], j[ok]]
        if not np.any(row):
            continue
        v = np.zeros((R, D))
        v[:nrows] = row
        out[t] = v.reshape(-1)
    return out


# What the rotations of a baby-step/giant-step schedule cost, relative to one EvalRotate (openfhe 1.6.1, N = 2^16,
# 3 to 21 towers; the rotate_* rows of benchmarks/he_ops.py, cost_table.json): the baby steps of an input are hoisted
# (one EvalFastRotationPrecompute, then a key switch and its ModDown per step), the giant steps of an output are
# summed in the extended basis (per step a precompute and a key switch, one ModDown for all: ``rotate_sum``). Plaintext
# products do not depend on the split (one per nonzero diagonal). Fixed here, not read from the machine's cost table:
# the split decides the rotation keys, so the client that makes keys and the server that runs must choose alike.
HOIST_PRECOMPUTE, HOISTED_BABY, GIANT_STEP, MOD_DOWN = 0.5, 0.55, 0.7, 0.35


def bsgs_cost(n_babies: int, n_giants: int, n_in: int, n_out: int) -> float:
    """Rotation cost (in EvalRotates) of ``n_babies`` baby steps on each of ``n_in`` input ciphertexts and
    ``n_giants`` nonzero giant steps into each of ``n_out`` output ciphertexts."""
    baby = 0.0 if not n_babies else 1.0 if n_babies == 1 else HOIST_PRECOMPUTE + n_babies * HOISTED_BABY
    giant = 0.0 if not n_giants else n_giants * GIANT_STEP + MOD_DOWN
    return n_in * baby + n_out * giant


def choose_n1(ts: Sequence[int], n_in: int, n_out: int) -> int:
    """Baby-step size of the cheapest split (:func:`bsgs_cost`) of the diagonals ``ts``: hoisted baby steps per input
    ciphertext against giant steps per output ciphertext; fewer rotations on ties."""
    if not ts:
        return 1
    best = None
    for n1 in [1 << p for p in range(0, 12)]:
        babies = {t % n1 for t in ts} - {0}
        giants = {(t // n1) * n1 for t in ts} - {0}
        key = (round(bsgs_cost(len(babies), len(giants), n_in, n_out), 9), len(babies) + len(giants))
        if best is None or key < best[0]:
            best = (key, n1)
        if n1 > 2 * max(abs(t) for t in ts):
            break
    return best[1]


def bsgs_plan(W: np.ndarray, layout_in: MatrixLayout, d_out: int) -> BSGSPlan:
    """Diagonals of ``W`` (``cols x d_out``) for every row block, grouped for baby-step/giant-step."""
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (layout_in.cols, d_out):
        raise LayoutError(f"weight of shape {W.shape} does not map {layout_in.cols} features to {d_out}")
    n_out = -(-d_out // layout_in.block)
    diags = {}
    for rb in range(layout_in.row_blocks):
        nrows = layout_in.block_rows(rb)
        for ib in range(layout_in.col_blocks):
            for ob in range(n_out):
                diags[(rb, ib, ob)] = block_diagonals(W, layout_in, ib, ob, nrows, d_out)
    ts = sorted({t for d in diags.values() for t in d})
    n1 = choose_n1(ts, layout_in.col_blocks, n_out)
    terms = {}
    for key, d in diags.items():
        groups = {}
        for t, v in d.items():
            g, b = (t // n1) * n1, t % n1
            groups.setdefault(g, {})[b] = np.roll(v, g)
        terms[key] = groups
    baby = tuple(sorted({t % n1 for t in ts} - {0}))
    giant = tuple(sorted({(t // n1) * n1 for t in ts}))
    return BSGSPlan(n1=n1, baby=baby, giant=giant, terms=terms)


def choose_n1_cyclic(D: int, n_in: int, n_out: int) -> int:
    """Baby-step size for the single-row plan: ``n1 - 1`` baby steps per input and ``D / n1 - 1`` giant steps per
    output ciphertext, the cheapest by :func:`bsgs_cost`."""
    best = None
    n1 = 1
    while n1 <= D:
        key = (round(bsgs_cost(n1 - 1, D // n1 - 1, n_in, n_out), 9), n1 - 1 + D // n1 - 1)
        if best is None or key < best[0]:
            best = (key, n1)
        n1 *= 2
    return best[1]


def single_row_plan(W: np.ndarray, layout_in: MatrixLayout, d_out: int) -> BSGSPlan:
    """Cyclic-diagonal schedule of ``x @ W`` for a one-row input (see the module docstring); ``terms`` are keyed
    ``(0, ib, ob)`` like :func:`bsgs_plan`'s, giant amounts ``g * n1``, baby amounts ``b``."""
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (layout_in.cols, d_out):
        raise LayoutError(f"weight of shape {W.shape} does not map {layout_in.cols} features to {d_out}")
    D, S = layout_in.block, layout_in.slots
    if layout_in.rows != 1 or S < 2 * D:
        raise LayoutError("the single-row plan needs a one-row input and at least two rows of slots")
    n_in, n_out = layout_in.col_blocks, -(-d_out // D)
    n1 = choose_n1_cyclic(D, n_in, n_out)
    j = np.arange(D)
    terms, babies, giants = {}, set(), set()
    for ib in range(n_in):
        for ob in range(n_out):
            blk = np.zeros((D, D))
            sub = W[ib * D : (ib + 1) * D, ob * D : (ob + 1) * D]
            blk[: sub.shape[0], : sub.shape[1]] = sub
            groups = {}
            for t in range(D):
                diag = blk[(j + t) % D, j]
                if not np.any(diag):
                    continue
                g, b = (t // n1) * n1, t % n1
                v = np.zeros(S)
                v[g : g + D] = diag
                groups.setdefault(g, {})[b] = v
                babies.add(b)
                giants.add(g)
            terms[(0, ib, ob)] = groups
    return BSGSPlan(n1=n1, baby=tuple(sorted(babies - {0})), giant=tuple(sorted(giants)), terms=terms, doubled=True)


def grouped_plan(W: np.ndarray, layout_in: MatrixLayout, layout_out: MatrixLayout, single_row: bool) -> BSGSPlan:
    """Schedule of ``x @ W`` on row-grouped layouts (``groups > 1``, see the module docstring): ``terms`` are
    keyed ``(input ct, output ct)`` with full-ciphertext plaintexts (``groups * slots``), each group holding the
    diagonals of the weight block between the blocks that group carries. A replicated input feeds every
    output block at once; a stacked input's blocks are summed afterwards by ``group_sum`` = ``log2 k``
    rotations by whole groups (output replicated). ``single_row``: the cyclic-diagonal plan on the doubled
    row of :func:`single_row_plan`, else generalised diagonals of :func:`bsgs_plan` (rolled over the whole
    ciphertext, since giant rotations cross group borders). Every rotation of the plan (row doubling, baby and
    giant steps) is over the whole ciphertext (``whole``): the groups are not copies of each other."""
    W = np.asarray(W, dtype=np.float64)
    Li, Lo = layout_in, layout_out
    if W.shape != (Li.cols, Lo.cols):
        raise LayoutError(f"weight of shape {W.shape} does not map {Li.cols} features to {Lo.cols}")
    if Li.groups != Lo.groups or Li.groups == 1:
        raise LayoutError("grouped_plan needs input and output with the same number (> 1) of row groups")
    if Li.stacked and Lo.stacked:
        raise LayoutError("a linear from a stacked input must produce one column block")
    D, P, G = Li.block, Li.slots, Li.groups
    n_in, n_out = Li.num_cts, Lo.num_cts

    def blk(ib, ob):
        out = np.zeros((D, D))
        sub = W[ib * D : (ib + 1) * D, ob * D : (ob + 1) * D]
        out[: sub.shape[0], : sub.shape[1]] = sub
        return out

    # per (input ct, output ct, group): the (in block, out block) pair the group computes
    pairs = {}
    for ni in range(n_in):
        for no in range(n_out):
            for g in range(G):
                ib, ob = Li.block_at(ni, g), Lo.block_at(no, g)
                if ib is not None and ob is not None:
                    pairs.setdefault((ni, no), {})[g] = (ib, ob)
    diags = {}  # (ni, no) -> {t: full vector}
    j = np.arange(D)
    for key, groups in pairs.items():
        d = {}
        for g, (ib, ob) in groups.items():
            if single_row:
                B = blk(ib, ob)
                for t in range(D):
                    diag = B[(j + t) % D, j]
                    if np.any(diag):
                        d.setdefault(t, np.zeros(G * P))[g * P : g * P + D] = diag
            else:
                for t, v in block_diagonals(W, Li, ib, ob, Li.rows, Lo.cols).items():
                    d.setdefault(t, np.zeros(G * P))[g * P : (g + 1) * P] = v
        diags[key] = d
    ts = sorted({t for d in diags.values() for t in d})
    n1 = choose_n1_cyclic(D, n_in, n_out) if single_row else choose_n1(ts, n_in, n_out)
    terms, babies, giants = {}, set(), set()
    for key, d in diags.items():
        groups = {}
        for t, v in d.items():
            g, b = (t // n1) * n1, t % n1
            groups.setdefault(g, {})[b] = np.roll(v, g)  # single row: the diagonal moves to [g, g + D) of its group
            babies.add(b)
            giants.add(g)
        terms[key] = groups
    return BSGSPlan(n1=n1, baby=tuple(sorted(babies - {0})), giant=tuple(sorted(giants)), terms=terms,
                    doubled=single_row, group_sum=int(math.log2(Li.per_ct)), whole=True)
