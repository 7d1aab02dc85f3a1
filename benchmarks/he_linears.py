"""Issue #15's linear workloads at 128-bit, N = 2^16, batch 1: a Linear(128, 128) on a one-row matrix layout and
the MLP 784-128-128-10 (x^2 activations, BatchNorm folded into the linears) on 8 row groups of 256 slots (the
784 inputs stacked in one ciphertext). Prints, per workload, the server's compile time (plaintexts encoded once,
when the evaluator is built; absent before that existed), the first run and the later runs (min / median over
repeats, seconds), the plan's counts and the error against the float64 reference.

    python benchmarks/he_linears.py                   # both workloads, 3 repeats
    python benchmarks/he_linears.py --only linear --repeats 5
    python benchmarks/he_ops.py --workloads           # the same, from the op benchmark

Each repeat builds a fresh backend and evaluator (empty plaintext caches), then runs twice or more: "first run"
is the first request a server answers, "later runs" the steady state. The machine may be shared: the load
average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hf_polyhe.he as he  # noqa: E402
from hf_polyhe.he import params as P  # noqa: E402
from hf_polyhe.he.backends.openfhe import OpenFHEBackend, decrypt_vectors, encrypt_vectors  # noqa: E402
from hf_polyhe.he.runtime.keys import generate_keys  # noqa: E402


def linear_128(rng):
    c = he.Circuit(block=128, slots=256, name="linear128")
    c.output(c.linear(c.input("x", 1, 128), rng.normal(size=(128, 128)) / np.sqrt(128), rng.normal(size=128) * 0.1))
    return c


def mlp_784(rng):
    """784-128-128-10 with x^2 activations; BatchNorm folded into the linears' weights and biases."""
    c = he.Circuit(block=128, slots=256, groups=8, name="mlp784")
    h = c.linear(c.input("x", 1, 784), rng.normal(size=(784, 128)) / 28, rng.normal(size=128) * 0.1)
    h = c.mul(h, h)
    h = c.linear(h, rng.normal(size=(128, 128)) / 11.3, rng.normal(size=128) * 0.1)
    h = c.mul(h, h)
    c.output(c.linear(h, rng.normal(size=(128, 10)) / 11.3, rng.normal(size=10) * 0.1))
    return c


WORKLOADS = {"linear": linear_128, "mlp": mlp_784}


def stats(xs):
    return f"{min(xs):6.2f} {statistics.median(xs):6.2f}" if xs else f"{'-':>6} {'-':>6}"


class Clock:
    """Wall and process CPU seconds (CPU time is what a shared machine disturbs least; with OMP_NUM_THREADS > 1 it
    sums the threads)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def bench(name, circuit, ring_dim, repeats, runs):
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl = he.plan(circuit, P.default(ring_dim=ring_dim), bootstrap="never")
    t = time.perf_counter()
    cc, kp = generate_keys(pl.params, pl.rotation_keys)
    t_keys = time.perf_counter() - t
    lay = pl.circuit.layouts()["x"]
    X = rng.uniform(-1, 1, (1, circuit.inputs["x"][1]))
    ref = he.run_plain(pl.circuit, {"x": X})[circuit.outputs[0]]
    compile_t, first, later, err = ([], []), ([], []), ([], []), 0.0
    for _ in range(repeats):
        be = OpenFHEBackend(cc, pl.params.slots)
        compile_fn = getattr(he, "compile_evaluator", None)  # the server's compile step (encode once), if any
        with Clock() as t:
            ev = compile_fn(pl, be) if compile_fn else he.Evaluator(pl.circuit, be)
        if compile_fn:
            compile_t[0].append(t.wall), compile_t[1].append(t.cpu)
        for r in range(runs):
            cts = encrypt_vectors(cc, kp.publicKey, lay.pack(X), pl.start_level, pl.params.slots)
            with Clock() as t:
                out = ev.run({"x": he.Packed(lay, cts)})[circuit.outputs[0]]
            (first if r == 0 else later)[0].append(t.wall)
            (first if r == 0 else later)[1].append(t.cpu)
        got = out.layout.unpack(decrypt_vectors(cc, kp.secretKey, out.cts, pl.params.slots))
        err = max(err, float(np.abs(got - ref).max()))
        del ev, be
    c = pl.counts
    for i, what in enumerate(("wall", "cpu")):
        print(f"{name + ' ' + what:<11} {stats(compile_t[i])}   {stats(first[i])}   {stats(later[i])}", flush=True)
    print(f"{'':<11} rotations {c['rotate']} ({len(pl.rotation_keys)} keys), pt x ct {c['mul_plain']}, ct x ct {c['mul']}, "
          f"depth {pl.params.depth}, keys {t_keys:.1f} s, max error {err:.1e}, predicted {pl.predicted_seconds:.2f} s"
          + (f", plaintexts {pl.plaintexts['count']} ({pl.plaintexts['bytes'] / 2**20:.0f} MiB, predicted encoding "
             f"{pl.plaintexts['seconds']:.2f} s)" if getattr(pl, "plaintexts", None) else ""), flush=True)


def run(only=None, repeats=3, runs=3, ring_dim=2**16):
    print(f"# 128-bit, N={ring_dim}, batch 1, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"HF_POLYHE_PLAINTEXT_CACHE_MIB={os.environ.get('HF_POLYHE_PLAINTEXT_CACHE_MIB', '512 (default)')}; "
          f"load average {'%.2f %.2f %.2f' % os.getloadavg()}")
    print(f"{'':<11} {'compile':^13}   {'first run':^13}   {'later runs':^13}")
    print(f"{'workload':<11} {'min':>6} {'median':>6}   {'min':>6} {'median':>6}   {'min':>6} {'median':>6}   (seconds)")
    for name in only or sorted(WORKLOADS, reverse=True):
        bench(name, WORKLOADS[name](np.random.default_rng(0)), ring_dim, repeats, runs)
    print(f"# load average at the end {'%.2f %.2f %.2f' % os.getloadavg()}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="runs per evaluator (the first, then later ones)")
    ap.add_argument("--ring-dim", type=int, default=2**16)
    args = ap.parse_args()
    run(args.only, args.repeats, args.runs, args.ring_dim)


if __name__ == "__main__":
    main()
