"""Property tests of the packings: every layout the circuit builder accepts gives numpy's answer on the plain
backend, for ``linear`` and the ops that take the same layouts. Sweeps row groups (1, 2, 4, 8), slots per group
(1, 2 and 4 blocks: one row, two rows, four rows), rows (one row, a part of a group, a full group, several row
blocks), and widths below, at, above a block and non powers of two, with clean, polynomial (p(0) padding) and
unknown padding. Compared against numpy directly (not the ops' own ``reference``). A second or so in all."""

import itertools

import numpy as np
import pytest

import hf_polyhe.he as he
from hf_polyhe.approx.chebyshev import fit_chebyshev
from hf_polyhe.approx.functions import EXACT_FUNCTIONS

D = 8  # block
WIDTHS = (3, 8, 13, 30, 70)  # below a block, a block, one and a bit, four blocks, more blocks than groups
SOURCES = ("clean", "poly", "dirty")
GELU = fit_chebyshev(EXACT_FUNCTIONS["gelu"], (-2.0, 2.0), 7, op="gelu")


def _gelu(x):
    return GELU.evaluate(x)


def _rows(groups, slots):
    R = slots // D
    rows = {1, max(R // 2, 1), R}
    if groups == 1:
        rows.add(2 * R + 1)  # several row blocks
    return sorted(rows)


def _source(c, x, source):
    """``x`` as is (zero padding), through a polynomial (padding p(0)), or shifted by a constant (padding 0.25,
    not a known polynomial constant: the general plan). Returns the value name and its numpy function."""
    if source == "poly":
        return c.poly(c.mul_plain(x, 0.5), GELU), lambda v: _gelu(0.5 * v)
    if source == "dirty":
        return c.add_plain(x, 0.25), lambda v: v + 0.25
    return x, lambda v: v


def _linear_cases():
    for groups, ratio, source in itertools.product((1, 2, 4, 8), (1, 2, 4), SOURCES):
        slots = D * ratio
        for rows, din, dout in itertools.product(_rows(groups, slots), WIDTHS, WIDTHS):
            if groups > 1 and din > D and dout > D:
                continue  # refused: a stacked input maps to one block (checked below)
            if rows > slots // D and max(din, dout) > 4 * D:
                continue  # several row blocks: the narrower widths suffice (and keep the sweep fast)
            yield groups, slots, rows, din, dout, source


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_linear_on_every_matrix_layout_matches_numpy(groups):
    """``x @ W + b`` for every accepted (slots, rows, d_in, d_out, padding) on ``groups`` row groups: replicated
    -> replicated / stacked, stacked -> replicated (group sum), one-row (doubled row) and general plans."""
    rng = np.random.default_rng(groups)
    bad = []
    n = 0
    for g, slots, rows, din, dout, source in _linear_cases():
        if g != groups:
            continue
        c = he.Circuit(D, slots, groups=groups)
        x, f = _source(c, c.input("x", rows, din), source)
        W, b = rng.normal(size=(din, dout)) / np.sqrt(din), rng.normal(size=dout)
        c.output(c.linear(x, W, b))
        X = rng.uniform(-1, 1, size=(rows, din))
        err = np.abs(he.run_plain(c, {"x": X})[c.outputs[0]] - (f(X) @ W + b)).max()
        n += 1
        if err > 1e-9:
            bad.append((slots, rows, din, dout, source, float(err)))
    assert n > 100 and not bad, f"{len(bad)} of {n} layouts wrong (slots, rows, d_in, d_out, source, error): {bad[:8]}"


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_stacked_input_needs_one_block_out(groups):
    c = he.Circuit(D, 2 * D, groups=groups)
    with pytest.raises(he.CircuitError, match="stacked"):
        c.linear(c.input("x", 1, 30), np.ones((30, 13)))


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_mlp_chain_on_every_matrix_layout_matches_numpy(groups):
    """The MLP pattern the planner builds: replicated -> wide (stacked when grouped) -> pointwise ops on the wide
    tensor (poly, mul, add, sub, add_plain, mul_plain) -> back to one block (group sum) -> row_sum, plus a
    confined linear replicated back (attention keys), on every slots / rows / width of the sweep."""
    rng = np.random.default_rng(10 + groups)
    bad = []
    for ratio, din, hidden in itertools.product((1, 2, 4), (3, 8), (13, 30, 70)):
        slots = D * ratio
        for rows in _rows(groups, slots):
            c = he.Circuit(D, slots, groups=groups)
            x = c.input("x", rows, din)
            W1, b1 = rng.normal(size=(din, hidden)) / np.sqrt(din), rng.normal(size=hidden) * 0.1
            W2 = rng.normal(size=(hidden, din)) / np.sqrt(hidden)
            pv, pm = rng.normal(size=hidden) * 0.1, rng.normal(size=(rows, 1))
            h = c.linear(x, W1, b1)
            a = c.poly(c.mul_plain(h, 0.5), GELU)
            m = c.mul_plain(c.add_plain(c.sub(c.mul(a, a), h), pv), pm)
            y = c.linear(c.add(m, a), W2)
            s = c.row_sum(y, 1 / din)
            outs = [h, y, s]
            if groups > 1:
                outs.append(c.replicate(c.linear(x, W2[:din, :din].T, confine=True)))
            c.output(*outs)
            X = rng.uniform(-1, 1, size=(rows, din))
            H = X @ W1 + b1
            A = _gelu(0.5 * H)
            Y = (((A * A - H) + pv) * pm + A) @ W2
            want = [H, Y, np.repeat(Y.sum(1, keepdims=True) / din, din, axis=1)]
            if groups > 1:
                want.append(X @ W2[:din, :din].T)
            got = he.run_plain(c, {"x": X})
            for name, w in zip(outs, want):
                err = np.abs(got[name] - w).max()
                if err > 1e-9 * max(1.0, np.abs(w).max()):
                    bad.append((slots, rows, din, hidden, name, float(err)))
    assert not bad, f"wrong (slots, rows, d_in, hidden, value, error): {bad[:8]}"


def _vector(c, n, kind, width=None):
    P = 1 << (n - 1).bit_length()
    lay = he.TiledVector(n, P, c.ct_slots) if kind == "tiled" else \
        he.ColumnVector(n, width or c.ct_slots // P, c.ct_slots)
    return c.input("x", 1, n, layout=lay)


def test_vector_linears_on_every_size_match_numpy():
    """tiled -> column -> tiled linears (one-row vectors of a decode step) for widths below / above a power of two,
    ciphertexts from 64 to 1024 slots (so the column -> tiled plan runs with one and with several chunks), clean and
    p(0) padding, each followed by a row_sum."""
    rng = np.random.default_rng(3)
    bad = []
    for ct_slots, din, dh, dout, source in itertools.product((64, 256, 1024), (3, 8, 13), (5, 16), (1, 7, 16),
                                                             ("clean", "poly")):
        if next(p for p in (1, 2, 4, 8, 16) if p >= din) * 16 > ct_slots:  # rows of at least the period
            continue
        c = he.Circuit(D, ct_slots // 4, groups=4)
        x, f = _source(c, _vector(c, din, "tiled"), source)
        W1, b1 = rng.normal(size=(din, dh)), rng.normal(size=dh)
        W2, b2 = rng.normal(size=(dh, dout)), rng.normal(size=dout)
        try:
            h = c.linear(x, W1, b1)
            y = c.linear(h, W2, b2)
        except he.CircuitError:
            continue  # a row narrower than the output period: refused with a clear error (test_he_plain)
        s = c.row_sum(y, 0.5)
        c.output(h, y, s)
        X = rng.uniform(-1, 1, size=(1, din))
        H = f(X) @ W1 + b1
        Y = H @ W2 + b2
        got = he.run_plain(c, {"x": X})
        for name, w in ((h, H), (y, Y), (s, np.full_like(Y, 0.5 * Y.sum()))):
            err = np.abs(got[name] - w).max()
            if err > 1e-9 * max(1.0, np.abs(w).max()):
                bad.append((ct_slots, din, dh, dout, source, name, float(err)))
    assert not bad, f"wrong (ct_slots, d_in, hidden, d_out, source, value, error): {bad[:8]}"


def test_the_reported_mlp_layer():
    """Issue #15's reproducer: 784 -> 128 on 8 row groups of 2 * block slots (stacked, one row)."""
    rng = np.random.default_rng(0)
    X, W = rng.normal(size=(1, 784)), rng.normal(size=(784, 128)) / 28
    for slots in (256, 512):
        c = he.Circuit(block=128, slots=slots, groups=8)
        c.output(c.linear(c.input("x", 1, 784), W))
        assert np.abs(he.run_plain(c, {"x": X})[c.outputs[0]] - X @ W).max() < 1e-9, slots
