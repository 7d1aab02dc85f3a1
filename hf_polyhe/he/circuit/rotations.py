"""Rotations composed from fewer keys: when a server cannot hold one rotation key per distinct index.

Each rotation key is large (``digits * 2 * N * towers(Q*P) * 8`` bytes: ~0.27 GiB at N = 2^17), and a deep model's
circuits rotate by many distinct indices (72 for a 2-layer PolyGPT). A rotation by ``k`` is also the composition
of rotations by steps summing to ``k`` modulo the ciphertext's period (the CKKS batch size: a sparsely packed
ciphertext repeats every ``slots`` values, so a rotation by ``k`` and by ``k + slots`` agree on it). So a key set
can shrink to a *base* (the signed powers of two the indices' non-adjacent forms use, at most ``2 log2(slots)``
keys) plus whatever else still fits, and every other rotation runs as a short chain of base rotations.

- :func:`naf`: the signed powers of two of an index's non-adjacent form (the fewest signed powers summing to it).
- :func:`rotation_base`: the base a set of indices needs.
- :class:`RotationPaths`: the shortest chain of available keys for every index (one breadth-first search over
  the residues modulo the period).
- :func:`choose_rotation_keys`: the base plus the most useful other keys, within a key count.
- :class:`ComposedRotations`: a backend seen through a key set: ``rotate``, ``rotate_many`` (hoisted: a
  composed index's first step shares the hoisted precomputation) and ``rotate_sum`` (a composed term's last step
  stays in the extended basis) use only keys of the set. It wraps any backend (OpenFHE, the planner's trace, which
  then charges every step, or the plain one).
"""

from __future__ import annotations

import numpy as np

from ..errors import KeyMismatchError
from .packing import norm_rot


def naf(k: int) -> list:
    """The signed powers of two of ``k``'s non-adjacent form, lowest first (``7 -> [-1, 8]``): no two adjacent
    powers, and the fewest nonzero terms of any signed binary form."""
    out, k, p = [], int(k), 1
    sign = -1 if k < 0 else 1
    k = abs(k)
    while k:
        if k & 1:
            d = 2 - (k & 3)  # +1 if k = 1 mod 4, -1 if k = 3 mod 4
            out.append(sign * d * p)
            k -= d
        k >>= 1
        p <<= 1
    return out


def rotation_base(indices, period: int) -> list:
    """The signed powers of two (normalised by :func:`~.packing.norm_rot` over ``period``) whose chains reach every
    index of ``indices`` modulo ``period``: the union of their non-adjacent forms (each index normalised first)."""
    period = int(period)
    base = set()
    for k in indices:
        r = norm_rot(int(k), period)
        base.update(norm_rot(s, period) for s in naf(r))
    base.discard(0)
    return sorted(base)


class RotationPaths:
    """The shortest chain of rotations by ``keys`` that rotates by each index modulo ``period``.

    ``keys``: the rotation indices a key set holds, as generated (a chain step is always one of them, unchanged:
    OpenFHE's key for ``-1`` is not its key for ``period - 1``). :meth:`steps` returns ``(k,)`` for a held index."""

    def __init__(self, keys, period: int):
        self.period = P = int(period)
        self.keys = frozenset(int(k) for k in keys)
        by_res = {}
        for k in sorted(self.keys, key=lambda k: (abs(k), k)):
            by_res.setdefault(int(k) % P, int(k))
        self._key_of = by_res  # residue -> the key that rotates by it
        # breadth-first search from 0 over the residues: parent[r] = the residue of the last step into r
        parent = np.full(P, -1, dtype=np.int64)
        parent[0] = 0
        steps = np.array(sorted(r for r in by_res if r), dtype=np.int64)
        frontier = np.array([0], dtype=np.int64)
        dist = np.full(P, -1, dtype=np.int64)
        dist[0] = level = 0
        while frontier.size and steps.size:
            level += 1
            nxt = (frontier[:, None] + steps[None, :]) % P
            via = np.broadcast_to(steps[None, :], nxt.shape)
            nxt, via = nxt.reshape(-1), via.reshape(-1)
            new = parent[nxt] < 0
            nxt, via = nxt[new], via[new]
            nxt, first = np.unique(nxt, return_index=True)  # one parent per newly reached residue
            parent[nxt] = via[first]
            dist[nxt] = level
            frontier = nxt
        self._parent, self._dist = parent, dist
        self._cache = {}

    def lengths(self) -> np.ndarray:
        """Chain length of every residue modulo the period (-1: unreachable)."""
        return self._dist.copy()

    def reachable(self, k: int) -> bool:
        return bool(self._parent[int(k) % self.period] >= 0)

    def steps(self, k: int) -> tuple:
        """The keys whose rotations, one after another, rotate by ``k`` (modulo the period): ``()`` for 0,
        ``(k,)`` for a held key. KeyMismatchError if the keys cannot reach ``k``."""
        k = int(k)
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        if k in self.keys:
            out = (k,)
        else:
            r = k % self.period
            if self._parent[r] < 0:
                raise KeyMismatchError(f"no chain of the rotation keys {sorted(self.keys)[:12]} rotates by {k} "
                                   f"(modulo {self.period}); generate keys with this plan")
            out = []
            while r:
                s = int(self._parent[r])
                out.append(self._key_of[s])
                r = (r - s) % self.period
            out = tuple(sorted(out, key=lambda s: (abs(s), s)))
        self._cache[k] = out
        return out


def choose_rotation_keys(uses: dict, period: int, max_keys: int | None = None) -> list:
    """The rotation keys to generate when not every used index can have one (``uses``: index -> rotations by it
    in the planned circuits).

    ``max_keys`` None: the :func:`rotation_base` of the used indices (signed powers of two: chains of at most
    ~log2(period)/2 steps). Otherwise at most ``max_keys`` keys (never fewer than the smaller of that base and
    ``log2(period)``): from each of two starts that fits, that base and the positive powers of two below the period
    (which reach every index),
    keys are added greedily while there is room -- the used index or signed power of two that saves the most
    rotations (``uses``-weighted chain lengths, recomputed after each choice) -- and the start whose set needs
    fewer rotations wins."""
    period = int(period)
    used = sorted({int(k) for k in uses if norm_rot(int(k), period)})
    signed = rotation_base(used, period)
    if max_keys is None:
        return used if len(signed) >= len(used) else signed
    powers = [norm_rot(1 << i, period) for i in range(max(period.bit_length() - 1, 0))]
    # never fewer than the smallest set known to reach every used index
    limit = max(int(max_keys), min(len(signed), len(powers), len(used)))
    if limit >= len(used):
        return used
    res = np.array([int(k) % period for k in used], dtype=np.int64)
    n = np.array([uses.get(k, 0) for k in used], dtype=np.float64)

    def grow(start):
        chosen = set(start)
        candidates = (set(used) | set(signed)) - chosen
        while len(chosen) < limit and candidates:
            d = RotationPaths(chosen, period).lengths().astype(np.float64)
            d[d < 0] = np.inf
            here = d[res]
            best, gain = None, 0.0
            for c in sorted(candidates, key=lambda c: (abs(c), c)):
                # c once, at the end of a chain: a lower bound on what it saves (the next round recomputes exactly)
                g = float(np.sum(n * np.maximum(here - (d[(res - c) % period] + 1), 0)))
                if g > gain:
                    best, gain = c, g
            if best is None:
                break
            chosen.add(best)
            candidates.discard(best)
        d = RotationPaths(chosen, period).lengths()[res]
        return (float(np.sum(n * d)) if np.all(d >= 0) else np.inf), sorted(chosen)

    options = ([grow(powers)] if len(powers) <= limit else []) + ([grow(signed)] if len(signed) <= limit else [])
    return min(options, key=lambda o: (o[0], len(o[1])))[1]


class ComposedRotations:
    """``backend`` restricted to the rotation keys of ``paths`` (a :class:`RotationPaths`): a rotation by an index
    without a key runs as its chain. Everything else goes straight to ``backend``. ``composed`` counts the
    rotations that needed a chain and ``extra`` the rotations they added."""

    def __init__(self, backend, paths: RotationPaths):
        self._be, self.paths = backend, paths
        self.composed = self.extra = 0

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_be", "paths"):  # copying / unpickling: not yet set
            raise AttributeError(name)
        return getattr(self._be, name)

    def _chain(self, a, steps):
        for s in steps:
            a = self._be.rotate(a, s)
        return a

    def _note(self, steps):
        if len(steps) > 1:
            self.composed += 1
            self.extra += len(steps) - 1

    def rotate(self, a, k):
        steps = self.paths.steps(k)
        self._note(steps)
        return self._chain(a, steps)

    def rotate_many(self, a, ks):
        """Hoisted: one precomputation for every held index and every composed index's first step. The rest of
        a chain are plain rotations, shared between chains with a common prefix (chains list their steps in one
        order: with the positive powers of two as keys, baby steps ``1..n`` then cost ``n`` rotations in all,
        as with a key each, only not hoisted)."""
        chains = {k: self.paths.steps(k) for k in ks}
        firsts = sorted({c[0] for c in chains.values() if c})
        res = self._be.rotate_many(a, firsts) if firsts else {}
        memo = {(f,): res[f] for f in firsts}
        run, out = len(firsts), {}
        for k, c in chains.items():
            if not c:
                out[k] = a
                continue
            self.composed += len(c) > 1
            i = len(c)
            while c[:i] not in memo:
                i -= 1
            ct = memo[c[:i]]
            for j in range(i, len(c)):
                ct = self._be.rotate(ct, c[j])
                memo[c[: j + 1]] = ct
                run += 1
            out[k] = ct
        # rotations run against those asked for
        self.extra += max(run - sum(1 for c in chains.values() if c), 0)
        return out

    def rotate_sum(self, terms):
        """A composed term's chain runs up to its last step, which joins the backend's sum (OpenFHE: in the
        extended basis)."""
        def chained():
            for ct, k in terms:
                c = self.paths.steps(k) if k else ()
                self._note(c)
                if len(c) > 1:
                    yield self._chain(ct, c[:-1]), c[-1]
                else:  # the held key itself (which may differ from k by the period), or 0
                    yield ct, (c[0] if c else 0)

        if hasattr(self._be, "rotate_sum"):
            return self._be.rotate_sum(chained())
        acc = None
        for ct, k in chained():
            r = ct if k == 0 else self._be.rotate(ct, k)
            acc = r if acc is None else self._be.add(acc, r)
        return acc
