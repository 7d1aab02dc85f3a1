"""Per-op CKKS costs at 128-bit security on this machine, and planner-predicted vs measured time of a mid-size
circuit. Prints a short table.

    python benchmarks/he_ops.py                 # ops + mid-size circuit (leveled, N chosen for 128-bit)
    python benchmarks/he_ops.py --bootstrap     # also one bootstrap at N=2^16 (~13 GB RAM, ~1 min keys)
    python benchmarks/he_ops.py --write-costs   # store the fitted cost table for the planner
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hf_polyhe.he as he  # noqa: E402
from hf_polyhe.approx.chebyshev import fit_chebyshev  # noqa: E402
from hf_polyhe.approx.functions import EXACT_FUNCTIONS  # noqa: E402
from hf_polyhe.he import params as P  # noqa: E402
from hf_polyhe.he.backends.openfhe_backend import OpenFHEBackend, build_context  # noqa: E402
from hf_polyhe.he.planner import COST_TABLE_PATH, load_cost_table, plan  # noqa: E402


def timeit(fn, n=3):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def mid_circuit(rng, L=16, d=32, heads=4):
    c = he.Circuit(block=d, slots=512, name="mid")
    x = c.input("x", L, d)
    mu = c.row_sum(x, 1 / d)
    xc = c.sub(x, mu)
    q, k, v = (c.linear(xc, rng.normal(size=(d, d)) / np.sqrt(d)) for _ in range(3))
    s = c.qk_scores(q, k, heads=heads, scale=1 / np.sqrt(d // heads), causal=True)
    a = c.attn_apply(c.poly(s, fit_chebyshev(EXACT_FUNCTIONS["gelu"], (-8, 8), 7)), v, scale=1 / L)
    h = c.linear(a, rng.normal(size=(d, d)) / np.sqrt(d))
    c.output(c.add(h, x))
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", action="store_true")
    ap.add_argument("--write-costs", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    circ = mid_circuit(rng)
    pl0 = plan(circ, P.default())
    p = pl0.params
    t0 = time.perf_counter()
    cc = build_context(p)
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    cc.EvalRotateKeyGen(kp.secretKey, list(pl0.rotation_keys))
    t_keys = time.perf_counter() - t0
    N = cc.GetRingDimension()
    be = OpenFHEBackend(cc, p.slots)
    vec = rng.uniform(-1, 1, p.slots)
    rows, fit_pts = [], {}

    def fresh(level):
        return cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(vec, 1, level, None, p.slots))

    for level in (0, p.depth - 4):
        ct = fresh(level)
        T = p.depth - level + 1
        k = pl0.rotation_keys[0]
        meas = {
            "rotate": timeit(lambda: be.rotate(ct, k)),
            "mul": timeit(lambda: be.mul(ct, ct)),
            "mul_plain": timeit(lambda: cc.EvalMult(ct, cc.MakeCKKSPackedPlaintext(vec, 1, level, None, p.slots))),
            "add_plain": timeit(lambda: cc.EvalAdd(ct, cc.MakeCKKSPackedPlaintext(vec, 1, level, None, p.slots))),
            "mul_scalar": timeit(lambda: be.mul_scalar(ct, 0.5)),
            "add": timeit(lambda: be.add(ct, ct)),
        }
        for deg in (7, 15, 31):
            if level == 0 and deg + 0 > 0 and p.depth >= 7:
                s = fit_chebyshev(EXACT_FUNCTIONS["tanh"], (-4, 4), deg).stages[0]
                meas[f"cheb{deg}"] = timeit(lambda: be.cheb(ct, s), n=1)
        for kname, t in meas.items():
            fit_pts.setdefault(kname, []).append((T, t))
            rows.append((f"{kname} (N=2^{N.bit_length() - 1}, {T} towers)", t))
    # fit t = (N/ref) * (a T + b T^2) per primitive; cheb per unit degree from degree 15
    costs = dict(load_cost_table())
    costs["ref_ring_dim"] = N
    for kname in ("rotate", "mul", "mul_plain", "add_plain", "mul_scalar", "add"):
        A = np.array([[T, T * T] for T, _ in fit_pts[kname]])
        y = np.array([t for _, t in fit_pts[kname]])
        a, b = np.linalg.lstsq(A, y, rcond=None)[0]
        if b < 0:
            a, b = float(np.sum(y * A[:, 0]) / np.sum(A[:, 0] ** 2)), 0.0
        costs[kname] = [float(a), float(b)]
    T0 = p.depth + 1
    costs["cheb_per_degree"] = [float(fit_pts["cheb15"][0][1] / 15 / T0), 0.0]
    boot = None
    if args.bootstrap:
        bp = P.default(bootstrap=True, slots=4096, scale_bits=59, secret_key_dist="SPARSE_TERNARY",
                       levels_after_bootstrap=6)
        bp = bp.with_(depth=bp.levels_after_bootstrap + bp.bootstrap_depth)
        t = time.perf_counter()
        bcc = build_context(bp)
        bkp = bcc.KeyGen()
        bcc.EvalMultKeyGen(bkp.secretKey)
        bcc.EvalBootstrapKeyGen(bkp.secretKey, bp.slots)
        t_bkeys = time.perf_counter() - t
        bv = rng.uniform(-1, 1, bp.slots)
        ct = bcc.Encrypt(bkp.publicKey, bcc.MakeCKKSPackedPlaintext(bv, 1, bp.depth - 2, None, bp.slots))
        t = time.perf_counter()
        out = bcc.EvalBootstrap(ct)
        boot = time.perf_counter() - t
        dec = bcc.Decrypt(bkp.secretKey, out)
        dec.SetLength(bp.slots)
        err = float(np.max(np.abs(np.array(dec.GetRealPackedValue()) - bv)))
        rows.append((f"bootstrap (N=2^{bcc.GetRingDimension().bit_length() - 1}, 4096 slots, keys {t_bkeys:.0f} s, "
                     f"err {err:.1e})", boot))
        costs["bootstrap"] = [boot * 65536 / bcc.GetRingDimension(), 0.0]
        costs["bootstrap"] = [boot * costs["ref_ring_dim"] / bcc.GetRingDimension(), 0.0]
    pl = plan(circ, P.default(), cost_table=costs)
    client_ct = [cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(v, 1, pl.start_level, None, p.slots))
                 for v in pl.circuit.layouts()["x"].pack(rng.uniform(-1, 1, (16, 32)))]
    ev = he.Evaluator(pl.circuit, OpenFHEBackend(cc, p.slots))
    t = time.perf_counter()
    out = ev.run({"x": he.Packed(ev.layouts["x"], client_ct)})
    measured = time.perf_counter() - t
    print(f"# hf_polyhe.he per-op costs, 128-bit ({p.security}), N={N}, depth {p.depth}, slots {p.slots}, "
          f"scale {p.scale_bits} bits; keys {t_keys:.1f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    print(f"{'op':<60} {'seconds':>10}")
    for name, t in rows:
        print(f"{name:<60} {t:>10.4f}")
    print(pl.report())
    print(f"{'mid-size circuit: predicted':<60} {pl.predicted_seconds:>10.2f}")
    print(f"{'mid-size circuit: measured':<60} {measured:>10.2f}")
    print(f"prediction error: {100 * (pl.predicted_seconds - measured) / measured:+.1f}%")
    if args.write_costs:
        with open(COST_TABLE_PATH, "w") as f:
            json.dump(costs, f, indent=1)
        print("wrote", COST_TABLE_PATH)


if __name__ == "__main__":
    main()
