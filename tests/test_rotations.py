"""Rotations composed from fewer keys (hf_polyhe/he/circuit/rotations.py): non-adjacent forms, shortest chains,
the key choice under a count, and circuits on a backend that holds only the chosen keys (plain backend: exact)."""

from collections import deque
from itertools import product

import numpy as np
import pytest

import hf_polyhe.he as he
from hf_polyhe.he.backends.plain import PlainBackend
from hf_polyhe.he.circuit.evaluator import Evaluator, Packed
from hf_polyhe.he.circuit.rotations import (ComposedRotations, RotationPaths, choose_rotation_keys, naf,
                                            rotation_base)
from hf_polyhe.he.errors import KeyMismatchError

from test_he_plain import random_circuit


def _fewest_signed_powers(k, bits=8):
    """Brute force: the fewest nonzero digits of any signed binary form of k (digits -1, 0, 1)."""
    best = None
    for digits in product((-1, 0, 1), repeat=bits):
        if sum(d << i for i, d in enumerate(digits)) == k:
            w = sum(d != 0 for d in digits)
            best = w if best is None else min(best, w)
    return best


def test_naf_sums_to_k_with_the_fewest_signed_powers():
    for k in range(-60, 61):
        d = naf(k)
        assert sum(d) == k
        assert all(abs(x) & (abs(x) - 1) == 0 for x in d)
        assert all(abs(d[i + 1]) >= 4 * abs(d[i]) for i in range(len(d) - 1))  # non-adjacent
        assert len(d) == _fewest_signed_powers(k)


def _bfs_lengths(keys, period):
    dist = {0: 0}
    q = deque([0])
    while q:
        r = q.popleft()
        for k in keys:
            s = (r + k) % period
            if s not in dist:
                dist[s] = dist[r] + 1
                q.append(s)
    return dist


@pytest.mark.parametrize("seed", range(4))
def test_paths_are_shortest_chains_of_held_keys(seed):
    rng = np.random.default_rng(seed)
    period = int(2 ** rng.integers(4, 9))
    keys = sorted({int(k) for k in rng.integers(-period, period, 5)} | {1})
    paths = RotationPaths(keys, period)
    want = _bfs_lengths(keys, period)
    for k in range(-period, period):
        steps = paths.steps(k)
        assert sum(steps) % period == k % period and set(steps) <= set(keys)
        assert len(steps) == (1 if k in keys else want[k % period])
        assert paths.lengths()[k % period] == want[k % period]
    with pytest.raises(KeyMismatchError, match="no chain"):
        RotationPaths([2, 4], 16).steps(3)


def test_key_choice_under_a_count():
    rng = np.random.default_rng(0)
    period = 1024
    uses = {int(k): int(rng.integers(1, 40)) for k in rng.integers(-512, 512, 60)}
    base = rotation_base(uses, period)
    assert choose_rotation_keys(uses, period) == base
    assert all(abs(k) & (abs(k) - 1) == 0 for k in base) and len(base) < len(uses)
    cost = []
    for n in (5, 10, 14, 20, 30, 45, 100):
        keys = choose_rotation_keys(uses, period, n)
        # never fewer than the smaller full-reach start: the signed base or the positive powers (log2 period)
        assert len(keys) <= max(n, min(len(base), 10))
        paths = RotationPaths(keys, period)
        cost.append(sum(u * len(paths.steps(k)) for k, u in uses.items()))
    assert cost == sorted(cost, reverse=True) and cost[-1] == sum(uses.values())  # all keys: one step each
    assert cost[0] > cost[3] > cost[-1]
    few = {1: 3, 2: 1, -1: 2}  # a base no smaller than the keys: all of them
    assert choose_rotation_keys(few, 64) == [-1, 1, 2]
    # a signed base smaller than log2(period) is a start of its own: the count holds
    near = {k: 1 for k in range(-20, 21) if k}
    assert len(choose_rotation_keys(near, 2**15, 10)) <= 10
    # more used indices than their signed base, a count below both: the positive powers, not every index
    spread = {s * k: 1 for k in (3, 6, 12, 24, 48) for s in (1, -1)}
    assert len(rotation_base(spread, 256)) >= len(spread)
    keys = choose_rotation_keys(spread, 256, 3)
    assert keys == [1, 2, 4, 8, 16, 32, 64, 128]
    assert all(RotationPaths(keys, 256).reachable(k) for k in spread)


def test_rotate_sum_uses_the_held_key_of_an_index():
    """An index held under another representative (15 and -1 modulo 16) or equal to 0 modulo the period: the
    wrapped backend only ever sees held keys."""
    inner = OnlyKeys(16, [-1])
    be = ComposedRotations(inner, RotationPaths([-1], 16))
    x, y = np.arange(16.0), np.arange(16.0) ** 2
    got = be.rotate_sum(iter([(x, 15), (y, 16)]))
    np.testing.assert_array_equal(got, np.roll(x, -15) + y)
    assert inner.rotations == 1
    got = be.rotate_many(x, [15, 1])  # one hoisted -1 shared by both; 1 is fifteen of them
    np.testing.assert_array_equal(got[15], np.roll(x, -15))
    np.testing.assert_array_equal(got[1], np.roll(x, -1))
    assert inner.rotations == 1 + 15 and be.extra == 13  # 15 rotations for the 2 asked


class OnlyKeys(PlainBackend):
    """The plain backend refusing any rotation it holds no key for (as OpenFHE does)."""

    def __init__(self, slots, keys):
        super().__init__(slots)
        self.keys, self.rotations = set(keys), 0

    def _check(self, ks):
        missing = set(ks) - self.keys
        assert not missing, f"rotation without a key: {sorted(missing)}"
        self.rotations += len(ks)

    def rotate(self, a, k):
        self._check([k])
        return super().rotate(a, k)

    def rotate_many(self, a, ks):
        self._check(ks)
        return super().rotate_many(a, ks)

    def rotate_sum(self, terms):
        def checked():
            for a, k in terms:
                if k:
                    self._check([k])
                yield a, k

        return super().rotate_sum(checked())


def test_hoisted_chains_share_their_prefixes():
    """Baby steps 1..15 from the keys 1, 2, 4, 8: 4 hoisted rotations and 11 more (one per composed index, each
    continuing a chain already made), the same 15 as with a key each."""
    inner = OnlyKeys(64, [1, 2, 4, 8, 16, 32])
    be = ComposedRotations(inner, RotationPaths(inner.keys, 64))
    x = np.arange(64.0)
    got = be.rotate_many(x, list(range(1, 16)))
    for k in range(1, 16):
        np.testing.assert_array_equal(got[k], np.roll(x, -k))
    assert inner.rotations == 15 and be.extra == 0 and be.composed == 11


@pytest.mark.parametrize("seed", range(6))
def test_circuits_on_a_base_of_keys_equal_the_plain_run(seed):
    rng = np.random.default_rng(seed)
    c = random_circuit(rng, n_ops=7, polys=False)
    X = {"x": rng.uniform(-1, 1, (5, 8)), "y": rng.uniform(-1, 1, (5, 8))}
    ref = he.run_plain(c, X)
    pl = he.plan(c, he.params.toy())
    # the positive powers of two (the fewest keys that reach every index): every other index is a chain
    keys = [1 << i for i in range(c.ct_slots.bit_length() - 1)]
    assert any(k not in keys for k in pl.rotation_keys)
    inner = OnlyKeys(c.ct_slots, keys)
    be = ComposedRotations(inner, RotationPaths(keys, c.ct_slots))
    ev = Evaluator(c, be)
    out = ev.run({n: Packed(ev.layouts[n], ev.layouts[n].pack(x)) for n, x in X.items()})
    for k in c.outputs:
        np.testing.assert_allclose(out[k].layout.unpack(out[k].cts), ref[k], rtol=1e-12, atol=1e-12)
    composed = he.plan(c, he.params.toy(), rotation_keys=keys)
    assert composed.counts["rotate"] == inner.rotations == pl.counts["rotate"] + be.extra
    assert set(composed.rotation_keys) <= set(keys)
    assert be.composed > 0 and be.extra > 0


def test_cli_rotation_keys_option():
    from hf_polyhe_cli import build_parser

    p = build_parser()
    assert p.parse_args(["keygen", "e", "--keys", "k"]).rotation_keys == "auto"
    assert p.parse_args(["inspect", "e", "--rotation-keys", "minimal"]).rotation_keys == "minimal"
    assert p.parse_args(["keygen", "e", "--keys", "k", "--rotation-keys", "24"]).rotation_keys == 24
    with pytest.raises(SystemExit):
        p.parse_args(["inspect", "e", "--rotation-keys", "few"])
