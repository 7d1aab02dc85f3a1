"""Least-depth Paterson-Stockmeyer (hf_polyhe/he/backends/chebyshev.py) against OpenFHE's EvalChebyshevSeries:
seconds (min / median over repeats, process CPU time), levels consumed (settled output) and max error against the
exact series, at degree 15 and 59, tanh on [-8, 8] (issue #15) and on [-1, 1]. The runtime's ``poly`` op uses the
least-depth PS (``OpenFHEBackend.cheb``) since it measured faster and one level shallower at degree 15::

    # HEStd_128_classic, N=65536, depth 9, scale 50 bits, 2048 slots, OMP_NUM_THREADS=1, 2 shared cores (load ~6)
    series                 method                   levels ct x ct   min s median s  max error
    tanh deg 15 [-8,8]     EvalChebyshevSeries           6       -   2.405    2.439    1.1e-10
    tanh deg 15 [-8,8]     least-depth PS (deg 15)       5       8   2.224    2.278    1.1e-10
    tanh deg 59 [-8,8]     EvalChebyshevSeries           7       -   5.148    5.411    1.4e-10
    tanh deg 59 [-8,8]     least-depth PS (deg 59)       7      15   4.596    5.254    1.0e-10
    tanh deg 15 [-1,1]     EvalChebyshevSeries           5       -   2.687    3.141    1.7e-10
    tanh deg 15 [-1,1]     least-depth PS (deg 15)       4       8   2.418    2.462    1.6e-10
    tanh deg 59 [-1,1]     EvalChebyshevSeries           6       -   7.138    7.929    1.9e-10
    tanh deg 59 [-1,1]     least-depth PS (deg 25)       5      10   3.696    3.798    1.6e-10

    python benchmarks/chebyshev_ps.py                 # 128-bit, N = 2^16, 5 repeats
    python benchmarks/chebyshev_ps.py --toy           # N = 2^12, insecure: a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_polyhe.approx.chebyshev import fit_chebyshev  # noqa: E402
from hf_polyhe.approx.functions import EXACT_FUNCTIONS  # noqa: E402
from hf_polyhe.he import params as P  # noqa: E402
from hf_polyhe.he.backends.chebyshev import ps_schedule  # noqa: E402
from hf_polyhe.he.backends.openfhe import OpenFHEBackend, build_context, decrypt_vectors, encrypt_vectors  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slots", type=int, default=2048)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    depth = 9
    p = (P.toy() if args.toy else P.default(ring_dim=2**16)).with_(depth=depth, slots=args.slots)
    cc = build_context(p)
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    be = OpenFHEBackend(cc, p.slots)
    print(f"# {p.security}, N={cc.GetRingDimension()}, depth {depth}, scale {p.scale_bits} bits, {p.slots} slots, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, load average {'%.2f %.2f %.2f' % os.getloadavg()}")
    print(f"{'series':<22} {'method':<24} {'levels':>6} {'ct x ct':>7} {'min s':>7} {'median s':>8} {'max error':>10}"
          "   (PS: coefficients below 2^-45 left out; 'degree' is the degree it evaluates)")
    for lo, hi in ((-8.0, 8.0), (-1.0, 1.0)):
        x = np.linspace(lo, hi, p.slots)
        ct = encrypt_vectors(cc, kp.publicKey, [x], 0, p.slots)[0]
        for degree in (15, 59):
            s = fit_chebyshev(EXACT_FUNCTIONS["tanh"], (lo, hi), degree).stages[0]
            want = s.evaluate(x)
            ps = ps_schedule(s.coeffs)
            for name, fn, mults in (("EvalChebyshevSeries", lambda: be.cheb_openfhe(ct, s), "-"),
                                    (f"least-depth PS (deg {ps.degree})", lambda: be.cheb(ct, s), str(ps.products))):
                ts, out = [], None
                for _ in range(args.repeats):
                    t = time.process_time()
                    out = fn()
                    ts.append(time.process_time() - t)
                got = decrypt_vectors(cc, kp.secretKey, [out], p.slots)[0]
                levels = out.GetLevel() + out.GetNoiseScaleDeg() - 1
                print(f"{f'tanh deg {degree} [{lo:g},{hi:g}]':<22} {name:<24} {levels:>6} {mults:>7} {min(ts):7.3f} "
                      f"{statistics.median(ts):8.3f} {np.abs(got - want).max():10.1e}", flush=True)


if __name__ == "__main__":
    main()
