"""Per-op CKKS costs at 128-bit security on this machine, the fitted planner cost table, and planner-predicted vs
measured time of a mid-size circuit. Prints a short table.

    python benchmarks/he_ops.py                 # ops + mid-size circuit (leveled, N chosen for 128-bit)
    python benchmarks/he_ops.py --bootstrap     # also bootstrapping at 128-bit (N=2^17, ~13 GB RAM, minutes)
    python benchmarks/he_ops.py --write-costs   # store the fitted table in hf_polyhe/he/compile/cost_table.json
    python benchmarks/he_ops.py --workloads     # issue #15's Linear(128,128) and MLP: compile, first and later runs
                                                # (benchmarks/he_linears.py; --workload linear|mlp for one)
    python benchmarks/he_ops.py --bootstrap-sweep  # bootstrapping over ring / slots / level budget / digits, one
                                                   # process each (benchmarks/bootstrap_sweep.py)
    python benchmarks/he_ops.py --digits-cost   # key switching with 3 / 4 / 6 / 8 HYBRID digits (N = 2^16)
    python benchmarks/he_ops.py --deserialized  # ops on a deserialised ciphertext, before and after adopt()
                                                # (W1's ring and depth: N = 2^16, depth 27; ~1 min)

The machine may be shared, so op costs are measured twice, right before and right after the circuit, and the
fit uses their mean (both passes and the load average are printed). Ops are timed on ciphertexts in the state
the circuit leaves them in (a product with a pending FLEXIBLEAUTO rescale) at three levels; each primitive is
fitted as t(T) = a*T + b*T^2 over the T towers it carries, and Chebyshev series as effective ct x ct
multiplications per degree (Paterson-Stockmeyer), see hf_polyhe/he/compile/planner.py.
"""

from __future__ import annotations

import argparse
import gc
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
from hf_polyhe.he.backends.openfhe import OpenFHEBackend, build_context  # noqa: E402
from hf_polyhe.he.compile.planner import COST_TABLE_PATH, TraceBackend, TraceCt, load_cost_table, plan  # noqa: E402

PRIMS = ("rotate", "rotate_precompute", "rotate_fast", "rotate_ext", "keyswitch_down", "mul", "mul_plain", "encode",
         "add_plain", "mul_scalar", "add", "rescale")
CHEB_DEGREES = (7, 15, 31)


def timeit(fn, n=3, warm=True):
    if warm:
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def mem_available_gib():
    from hf_polyhe.he.compile.plaintexts import mem_available_bytes

    return mem_available_bytes() / 2**30


def loadavg():
    return "%.2f %.2f %.2f" % os.getloadavg()


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


class TimedBackend(OpenFHEBackend):
    """OpenFHE backend that sums wall time per primitive (outermost call only)."""

    def __init__(self, cc, slots):
        super().__init__(cc, slots)
        self.spent, self._depth = {}, 0

    def _timed(name):  # noqa: N805
        def wrap(self, *a, **kw):
            self._depth += 1
            t = time.perf_counter()
            try:
                return getattr(OpenFHEBackend, name)(self, *a, **kw)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    key = "rotate" if name in ("rotate_many", "rotate_sum") else name
                    self.spent[key] = self.spent.get(key, 0.0) + time.perf_counter() - t
        return wrap

    for _n in ("add", "sub", "mul", "add_plain", "mul_plain", "mul_scalar", "rotate", "rotate_many", "rotate_sum",
               "cheb", "bootstrap", "rescale", "encode"):
        locals()[_n] = _timed(_n)
    del _n


def measure_ops(cc, be, p, vec, k_rot, levels, degrees, reps=3):
    """{kind: [(T, seconds)]} and {degree: (T, seconds)} on pending-rescale ciphertexts at trace ``levels``."""
    pts, cheb = {}, {}
    for L in levels:
        fresh = cc.Encrypt(be._pk, cc.MakeCKKSPackedPlaintext(vec, 1, L - 1, None, p.slots))
        ct = cc.EvalMult(fresh, 1.0)  # trace level L: rescale pending, as after any product
        done = be.rescale(ct)  # the same, rescaled (what linears multiply: see OpenFHEBackend.rescale)
        T = p.depth - L + 1
        pre = cc.EvalFastRotationPrecompute(ct)
        pt_done = cc.MakeCKKSPackedPlaintext(vec, 1, done.GetLevel(), None, p.slots)
        pt_ct = cc.MakeCKKSPackedPlaintext(vec, 1, ct.GetLevel(), None, p.slots)
        ext = cc.EvalFastRotationExt(ct, k_rot, pre, True)
        meas = {
            "rotate": lambda: cc.EvalRotate(ct, k_rot),
            "rotate_precompute": lambda: cc.EvalFastRotationPrecompute(ct),
            "rotate_fast": lambda: cc.EvalFastRotation(ct, k_rot, be.M, pre),
            # the halves of rotate_fast that rotate_sum separates: the key switch in Q*P, and its ModDown
            "rotate_ext": lambda: cc.EvalFastRotationExt(ct, k_rot, pre, True),
            "keyswitch_down": lambda: cc.KeySwitchDown(ext),
            "mul": lambda: cc.EvalMult(ct, ct),
            # plaintexts are encoded once, when the server compiles the circuit ("encode", at the level of use);
            # on a rescaled ciphertext: a pending rescale is the separate "rescale" cost
            "mul_plain": lambda: cc.EvalMult(done, pt_done),
            "encode": lambda: cc.MakeCKKSPackedPlaintext(vec, 1, done.GetLevel(), None, p.slots),
            "rescale": lambda: be.rescale(ct),
            "add_plain": lambda: cc.EvalAdd(ct, pt_ct),
            "mul_scalar": lambda: cc.EvalMult(ct, 0.5),
            "add": lambda: cc.EvalAdd(ct, ct),
        }
        for kind in PRIMS:
            pts.setdefault(kind, []).append((T, timeit(meas[kind], n=reps)))
        if L == levels[0]:
            for deg in degrees:
                s = fit_chebyshev(EXACT_FUNCTIONS["tanh"], (-4, 4), deg).stages[0]
                cheb[deg] = (T, timeit(lambda: be.cheb(ct, s), n=1, warm=False))
    return pts, cheb


def fit_costs(pts, cheb, ring_dim, base):
    costs = dict(base)
    costs["ref_ring_dim"] = int(ring_dim)
    for kind, vals in pts.items():
        A = np.array([[T, T * T] for T, _ in vals], dtype=float)
        y = np.array([t for _, t in vals])
        a, b = np.linalg.lstsq(A, y, rcond=None)[0]
        if b < 0:
            a, b = float(np.sum(y * A[:, 0]) / np.sum(A[:, 0] ** 2)), 0.0
        elif a < 0:
            a, b = 0.0, float(np.sum(y * A[:, 1]) / np.sum(A[:, 1] ** 2))
        costs[kind] = [float(a), float(b)]
    # Chebyshev: effective ct x ct mults = (time - n scalar mult-adds) / one mult, at the measured level
    unit = lambda kind, T: costs[kind][0] * T + costs[kind][1] * T * T  # noqa: E731
    costs["cheb_mults"] = {
        str(d): float((t - d * (unit("mul_scalar", T) + unit("add", T))) / unit("mul", T)) for d, (T, t) in cheb.items()
    }
    return costs


def average(a, b):
    pts = {k: [(T, (t1 + t2) / 2) for (T, t1), (_, t2) in zip(a[0][k], b[0][k])] for k in a[0]}
    cheb = {d: (a[1][d][0], (a[1][d][1] + b[1][d][1]) / 2) for d in a[1]}
    return pts, cheb


def run_bootstrap(rng, costs, rows, slots=512, reps=2, num_large_digits=0):
    # more HYBRID key-switching digits shrink the auxiliary modulus P, which can keep log2(QP) within N = 2^16
    bp = P.default(bootstrap=True, slots=slots, scale_bits=59, secret_key_dist="SPARSE_TERNARY",
                   levels_after_bootstrap=6, num_large_digits=num_large_digits)
    bp = bp.with_(depth=bp.levels_after_bootstrap + bp.bootstrap_depth)
    bp = bp.with_(ring_dim=bp.min_secure_ring_dim())
    t = time.perf_counter()
    bcc = build_context(bp)
    bkp = bcc.KeyGen()
    bcc.EvalMultKeyGen(bkp.secretKey)
    bcc.EvalBootstrapKeyGen(bkp.secretKey, bp.slots)
    t_bkeys = time.perf_counter() - t
    bv = rng.uniform(-1, 1, bp.slots)
    N = bcc.GetRingDimension()
    ct = bcc.Encrypt(bkp.publicKey, bcc.MakeCKKSPackedPlaintext(bv, 1, bp.depth - 2, None, bp.slots))
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = bcc.EvalBootstrap(ct)
        times.append(time.perf_counter() - t)
    boot = float(np.mean(times))
    dec = bcc.Decrypt(bkp.secretKey, out)
    dec.SetLength(bp.slots)
    err = float(np.max(np.abs(np.array(dec.GetRealPackedValue()) - bv)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    left = bp.depth - out.GetLevel()
    rows.append((f"bootstrap (N=2^{N.bit_length() - 1}, depth {bp.depth}, {bp.slots} slots, {left} levels left)",
                 [boot], f"keys {t_bkeys:.0f} s, err {err:.1e}, peak RSS {peak:.1f} GiB, runs "
                 + "/".join(f"{x:.1f}" for x in times)))
    costs["bootstrap"] = [boot, 0.0]
    costs["bootstrap_ring_dim"] = int(N)
    costs["bootstrap_memory"] = {"ring_dim": int(N), "depth": int(bp.depth), "slots": int(bp.slots),
                                 "peak_gib": round(peak, 2)}


def run_deserialized(reps: int, depth: int = 27):
    """A client's ciphertext as a server receives it (serialised, then deserialised) against the same one
    encrypted in this process and after :func:`~hf_polyhe.he.backends.openfhe.adopt`: milliseconds per op."""
    from hf_polyhe.he.backends.openfhe import adopt, import_openfhe, serialize

    ofhe = import_openfhe()
    p = P.default(ring_dim=2**16).with_(depth=depth, slots=2**15, scale_bits=40)  # W1 plans 40-45 bits
    cc = build_context(p, bootstrap_setup=False)
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    cc.EvalRotateKeyGen(kp.secretKey, [1])
    vec = np.random.default_rng(0).uniform(-1, 1, p.slots)
    pt = cc.MakeCKKSPackedPlaintext(vec, 1, 0, None, p.slots)
    local = cc.Encrypt(kp.publicKey, pt)
    cts = {"encrypted here": local}
    cts["deserialised"] = ofhe.DeserializeCiphertextString(serialize(local), ofhe.BINARY)
    cts["deserialised, adopt()"] = adopt(cc, cts["deserialised"])
    ops = {"EvalAdd": lambda c: cc.EvalAdd(c, c), "EvalMult(ct, pt)": lambda c: cc.EvalMult(c, pt),
           "EvalRotate": lambda c: cc.EvalRotate(c, 1), "EvalMult(ct, ct)": lambda c: cc.EvalMult(c, c)}
    print(f"# N = {cc.GetRingDimension()}, depth {depth}, fresh ciphertexts ({depth + 1} towers); ms per op, "
          f"median of {reps}; load average {loadavg()}")
    print("| ciphertext | " + " | ".join(ops) + " | adopt() |")
    print("|---" * (len(ops) + 2) + "|")
    for name, ct in cts.items():
        cells = []
        for fn in ops.values():
            ts = [timeit(lambda: fn(ct), n=1, warm=False) for _ in range(reps)]
            cells.append(f"{1e3 * float(np.median(ts)):.1f}")
        t_adopt = float(np.median([timeit(lambda: adopt(cc, ct), n=1, warm=False) for _ in range(reps)]))
        print(f"| {name} | " + " | ".join(cells) + f" | {1e3 * t_adopt:.1f} |")
    d = cc.Decrypt(kp.secretKey, cts["deserialised, adopt()"])
    d.SetLength(p.slots)
    print(f"# adopt(): max |decrypted - input| {np.abs(np.asarray(d.GetRealPackedValue()) - vec).max():.1e}, level "
          f"{cts['deserialised, adopt()'].GetLevel()} (was {local.GetLevel()})")


def run_digits_cost(reps: int, digits=(3, 4, 6, 8), depth: int = 23, write: bool = False):
    """Key switching with more HYBRID digits (a smaller P: more levels on a ring, see
    ``benchmarks/bootstrap_sweep.py``) against OpenFHE's default 3: EvalRotate and EvalMult (ct x ct, with its
    relinearisation) at N = 2^16, ``depth`` levels, fresh ciphertexts, median of ``reps``. Timing only: the ring
    is fixed (``HEStd_NotSet``) so that every digit count runs on the same ring and towers. ``write`` stores the
    ratios as ``keyswitch_digits`` in the planner's cost table."""
    from hf_polyhe.he.backends.openfhe import import_openfhe

    ofhe = import_openfhe()
    rng = np.random.default_rng(0)
    res = {}
    print(f"# key switching against HYBRID digits: N = 2^16, depth {depth}, 59-bit scale, {depth + 1} towers, "
          f"median of {reps}; load average {loadavg()}")
    print("| digits | EvalRotate (ms) | EvalMult ct x ct (ms) | rotate / 3 digits | mult / 3 digits |")
    print("|---|---|---|---|---|")
    for d in digits:
        cp = ofhe.CCParamsCKKSRNS()
        cp.SetSecurityLevel(ofhe.HEStd_NotSet)
        cp.SetRingDim(2**16)
        cp.SetScalingModSize(59)
        cp.SetFirstModSize(60)
        cp.SetMultiplicativeDepth(depth)
        cp.SetBatchSize(2**15)
        cp.SetScalingTechnique(ofhe.FLEXIBLEAUTO)
        cp.SetKeySwitchTechnique(ofhe.HYBRID)
        cp.SetNumLargeDigits(d)
        cc = ofhe.GenCryptoContext(cp)
        for f in (ofhe.PKE, ofhe.KEYSWITCH, ofhe.LEVELEDSHE):
            cc.Enable(f)
        kp = cc.KeyGen()
        cc.EvalMultKeyGen(kp.secretKey)
        cc.EvalRotateKeyGen(kp.secretKey, [1])
        ct = cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(rng.uniform(-1, 1, 2**15), 1, 0, None, 2**15))
        rot = float(np.median([timeit(lambda cc=cc, ct=ct: cc.EvalRotate(ct, 1), n=1, warm=False)
                               for _ in range(reps)]))
        mul = float(np.median([timeit(lambda cc=cc, ct=ct: cc.EvalMult(ct, ct), n=1, warm=False)
                               for _ in range(reps)]))
        res[d] = (rot, mul)
        base = res.get(3, (rot, mul))
        print(f"| {d} | {1e3 * rot:.0f} | {1e3 * mul:.0f} | {rot / base[0]:.2f} | {mul / base[1]:.2f} |", flush=True)
        cc = kp = ct = None  # free this context before the next one
        gc.collect()
    if write and 3 in res:
        with open(COST_TABLE_PATH) as f:
            table = json.load(f)
        table["keyswitch_digits"] = {str(d): {"rotate": round(r / res[3][0], 3), "mul": round(m / res[3][1], 3)}
                                     for d, (r, m) in res.items()}
        with open(COST_TABLE_PATH, "w") as f:
            json.dump(table, f, indent=1)
        print("updated", COST_TABLE_PATH)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", action="store_true")
    ap.add_argument("--write-costs", action="store_true")
    ap.add_argument("--bootstrap-only", action="store_true",
                    help="only the bootstrap row; with --write-costs it updates the existing table's bootstrap entries")
    ap.add_argument("--boot-slots", type=int, default=512,
                    help="slots of the bootstrapping benchmark (4096 at N=2^17 needs > 18.5 GB: OOM-killed here)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workloads", action="store_true",
                    help="issue #15's linear workloads at 128-bit (benchmarks/he_linears.py) instead of the op table")
    ap.add_argument("--workload", choices=("linear", "mlp"), action="append", help="with --workloads: only these")
    ap.add_argument("--num-large-digits", type=int, default=0,
                    help="HYBRID key-switching digits of the bootstrapping set (8: N = 2^16 at 128-bit)")
    ap.add_argument("--deserialized", action="store_true",
                    help="ops on a deserialised ciphertext against one encrypted here and one after adopt()")
    ap.add_argument("--bootstrap-sweep", action="store_true",
                    help="bootstrapping at 128-bit over a grid of configurations, one process each "
                         "(benchmarks/bootstrap_sweep.py); --write-costs stores the rows for the planner")
    ap.add_argument("--rings", type=int, nargs="+", help="with --bootstrap-sweep: log2 ring dimensions (16 17)")
    ap.add_argument("--slots", type=int, nargs="+", help="with --bootstrap-sweep: slot counts (256 1024 4096)")
    ap.add_argument("--budgets", type=int, nargs="+", help="with --bootstrap-sweep: level budgets [b, b] (2 3 4)")
    ap.add_argument("--digits", type=int, nargs="+", help="with --bootstrap-sweep: key-switching digits (0 6)")
    ap.add_argument("--levels", type=int, help="with --bootstrap-sweep: levels after a bootstrap (default: the most "
                                                "the ring holds, at most 12)")
    ap.add_argument("--cap-gib", type=float, default=21.0, help="with --bootstrap-sweep: stop a child above this RSS")
    ap.add_argument("--digits-cost", action="store_true",
                    help="EvalRotate / EvalMult with 3, 4, 6, 8 key-switching digits (--write-costs: store the ratios)")
    args = ap.parse_args()
    if args.digits_cost:
        run_digits_cost(max(args.reps, 3), write=args.write_costs)
        return
    if args.bootstrap_sweep:
        import bootstrap_sweep as bs

        g = bs.DEFAULT_GRID
        bs.sweep(args.rings or g["rings"], args.slots or g["slots"], args.budgets or g["budgets"],
                 args.digits if args.digits is not None else g["digits"], cap_gib=args.cap_gib, reps=max(args.reps, 2),
                 levels=args.levels, write_costs=args.write_costs)
        return
    if args.deserialized:
        run_deserialized(max(args.reps, 3))
        return
    if args.workloads:
        import he_linears

        he_linears.run(args.workload, repeats=args.reps)
        return
    if args.bootstrap_only:
        avail = mem_available_gib()
        print(f"# bootstrapping only: {avail:.1f} GiB available, load average {loadavg()}", flush=True)
        if avail < 15:
            sys.exit(f"only {avail:.1f} GiB available; bootstrapping at 128-bit needs ~15")
        costs, brows = load_cost_table(), []
        run_bootstrap(np.random.default_rng(0), costs, brows, args.boot_slots, num_large_digits=args.num_large_digits)
        print(f"# load average at the end: {loadavg()}")
        for name, ts, note in brows:
            print(f"{name:<58} " + " ".join(f"{x:>8.4f}" for x in ts) + ("   " + note if note else ""))
        if args.write_costs:
            with open(COST_TABLE_PATH) as f:
                table = json.load(f)
            for k in ("bootstrap", "bootstrap_ring_dim", "bootstrap_memory"):
                table[k] = costs[k]
            table.setdefault("measured_on", {})["bootstrap_loadavg"] = loadavg()
            with open(COST_TABLE_PATH, "w") as f:
                json.dump(table, f, indent=1)
            print("updated", COST_TABLE_PATH)
        return
    load0 = loadavg()
    rng = np.random.default_rng(0)
    circ = mid_circuit(rng)
    # measured on the ring the workloads run on (2^16), not the smaller one a 40-bit scale would allow here
    ref = P.default(ring_dim=2**16, min_scale_bits=50)
    pl0 = plan(circ, ref)
    p = pl0.params
    t0 = time.perf_counter()
    cc = build_context(p)
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    cc.EvalRotateKeyGen(kp.secretKey, list(pl0.rotation_keys))
    t_keys = time.perf_counter() - t0
    N = cc.GetRingDimension()
    be = OpenFHEBackend(cc, p.slots)
    be._pk = kp.publicKey
    vec = rng.uniform(-1, 1, p.slots)
    D = p.depth
    levels = (1, (D + 1) // 2, D - 2)

    # pass A: ops; then the circuit; pass B: ops again (similar load for both)
    passA = measure_ops(cc, be, p, vec, pl0.rotation_keys[0], levels, CHEB_DEGREES, args.reps)
    client_ct = [cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(v, 1, pl0.start_level, None, p.slots))
                 for v in pl0.circuit.layouts()["x"].pack(rng.uniform(-1, 1, (16, 32)))]
    tbe = TimedBackend(cc, p.slots)
    t = time.perf_counter()
    ev = he.compile_evaluator(pl0, tbe)  # the server's compile step: plaintexts encoded once, not timed below
    t_compile = time.perf_counter() - t
    tbe.spent.clear()
    load_c = loadavg()
    t = time.perf_counter()
    ev.run({"x": he.Packed(ev.layouts["x"], client_ct)})
    measured = time.perf_counter() - t
    passB = measure_ops(cc, be, p, vec, pl0.rotation_keys[0], levels, CHEB_DEGREES, args.reps)
    load1 = loadavg()

    base = load_cost_table()
    costs = fit_costs(*average(passA, passB), N, base)
    costA, costB = fit_costs(*passA, N, base), fit_costs(*passB, N, base)
    pl = plan(circ, ref, cost_table=costs)
    predA = plan(circ, ref, cost_table=costA).predicted_seconds
    predB = plan(circ, ref, cost_table=costB).predicted_seconds
    # predicted seconds per primitive kind (trace the planned circuit once more, grouping by primitive)
    by_prim = {}
    tb = TraceBackend(p.slots, p.depth, pl.start_level, p.depth, p.ring_dim, costs)
    for kind in ("add", "sub", "mul", "add_plain", "mul_plain", "mul_scalar", "rotate", "rotate_many", "rotate_sum", "cheb",
                 "rescale"):
        def wrapped(*a, _f=getattr(tb, kind), _k=kind, **kw):
            before = tb.time
            r = _f(*a, **kw)
            key = "rotate" if _k in ("rotate_many", "rotate_sum") else _k
            by_prim[key] = by_prim.get(key, 0.0) + tb.time - before
            return r
        setattr(tb, kind, wrapped)
    tev = he.Evaluator(pl.circuit, tb)
    tev.run({n: he.Packed(tev.layouts[n], [TraceCt(0)] * tev.layouts[n].num_cts) for n in pl.circuit.inputs})
    spent = dict(tbe.spent)
    del ev, client_ct, tbe, tev

    rows = []
    for kind in PRIMS:
        what = "rescaled input" if kind == "mul_plain" else "pending rescale"
        rows.append((f"{kind} ({what})", [(x[1] + y[1]) / 2 for x, y in zip(passA[0][kind], passB[0][kind])], ""))
    for d in CHEB_DEGREES:
        ta, tb_ = passA[1][d][1], passB[1][d][1]
        rows.append((f"Chebyshev degree {d} (runtime PS)", [(ta + tb_) / 2], f"passes {ta:.2f}/{tb_:.2f} s, "
                     f"= {costs['cheb_mults'][str(d)]:.1f} ct x ct mults"))
    Ts = [p.depth - L + 1 for L in levels]
    print(f"# hf_polyhe.he per-op costs, 128-bit ({p.security}), N={N}, depth {p.depth}, slots {p.slots}, "
          f"scale {p.scale_bits} bits, 2 threads; keys {t_keys:.1f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    print(f"# load average (1/5/15 min): start {load0}, circuit {load_c}, end {load1}")
    print(f"{'op':<58} " + " ".join(f"{'T=' + str(T):>8}" for T in Ts) + "   (seconds; T = RNS towers left)")
    for name, ts, note in rows:
        print(f"{name:<58} " + " ".join(f"{x:>8.4f}" for x in ts) + ("   " + note if note else ""))
    print(pl.report())
    print("per primitive, predicted vs measured in the circuit (s): " + ", ".join(
        f"{k} {by_prim.get(k, 0.0):.1f}/{spent.get(k, 0.0):.1f}" for k in sorted(set(by_prim) | set(spent))
        if by_prim.get(k, 0) + spent.get(k, 0) > 0.05))
    print(f"{'mid-size circuit: predicted (fit of pass A / pass B)':<58} {predA:>8.2f} / {predB:.2f}")
    print(f"{'mid-size circuit: predicted (mean fit)':<58} {pl.predicted_seconds:>8.2f}")
    print(f"{'mid-size circuit: measured':<58} {measured:>8.2f}")
    print(f"{'mid-size circuit: compile (encode once), predicted / measured':<58} "
          f"{pl.plaintexts['seconds']:>8.2f} / {t_compile:.2f}")
    print(f"prediction error: {100 * (pl.predicted_seconds - measured) / measured:+.1f}%", flush=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": load_c, "threads": 2,
            "circuit_measured_s": round(measured, 2), "circuit_predicted_s": round(pl.predicted_seconds, 2)}

    def write():
        if args.write_costs:
            with open(COST_TABLE_PATH, "w") as f:
                json.dump({**costs, "measured_on": info}, f, indent=1)
            print("wrote", COST_TABLE_PATH, flush=True)

    write()  # before bootstrapping, which may run out of memory
    if args.bootstrap:
        del cc, kp, be
        gc.collect()
        avail = mem_available_gib()
        brows = []
        if avail < 15:
            brows.append(("bootstrap", [], f"SKIPPED: only {avail:.1f} GiB available (needs ~15)"))
        else:
            print(f"# bootstrapping: {avail:.1f} GiB available, load average {loadavg()}", flush=True)
            run_bootstrap(rng, costs, brows, args.boot_slots, num_large_digits=args.num_large_digits)
            info["bootstrap_loadavg"] = loadavg()
            write()
        for name, ts, note in brows:
            print(f"{name:<58} " + " ".join(f"{x:>8.4f}" for x in ts) + ("   " + note if note else ""))


if __name__ == "__main__":
    main()
