"""hf_polyhe against Orion (PyPI ``orion-fhe`` 1.0.2, on Lattigo) on issue #15's three workloads, side by side:
128-bit, N = 2^16, batch 1, the same weights and inputs, the two systems' runs interleaved so that the noise of a
shared machine hits both.

Workloads (seeded numpy, written once to a temporary .npz that both systems read):

- ``linear``: Linear(128, 128), input and weights on one row (hf_polyhe: its matrix layout; Orion: ``on.Linear``).
- ``cheb``:   tanh on [-8, 8] by a degree-15 Chebyshev series, the same coefficients (interpolation at the
              Chebyshev points) for both (hf_polyhe: the ``poly`` op, ``EvalChebyshevSeries``; Orion:
              ``on.Chebyshev`` with its coefficients set, input range [-8, 8], margin 1).
- ``mlp``:    MLP 784-128-128-10 with x^2 activations and BatchNorm after the first two linears (hf_polyhe: BN
              folded into the linears in numpy; Orion: ``on.BatchNorm1d`` fused by its compiler).

Every measurement is a fresh process (``--system hf_polyhe|orion --workload W``): setup (keys, then compile:
hf_polyhe plans, generates its keys and builds the server's evaluator with its plaintexts encoded; Orion runs
``init_scheme`` then ``fit`` + ``compile``, which encodes its diagonals and generates its rotation keys), then one
first run and ``--runs`` later runs of the encrypted forward pass (encryption and decryption not timed). The
parent alternates the two systems (hf_polyhe first on even repeats, Orion first on odd ones), collects one JSON
per child and prints, per workload: the later runs' min / median seconds of each system, the ratio of medians
(hf_polyhe / Orion), each system's setup seconds (keys + compile), the levels each input carries and spends,
and each system's max error of the decrypted output against the float64 numpy reference.

Parameters: hf_polyhe plans its 128-bit set at N = 2^16 (``params.default(ring_dim=2**16)``; the plan fixes the
depth, a 60-bit first prime and 50-bit scaling primes). Orion gets the same ring and primes: LogN 16, LogQ = [60]
+ [50] * levels, LogScale 50, and 60-bit special primes, as many as give OpenFHE's number of key-switching
digits (``ceil((levels + 1) / dnum)``, dnum = OpenFHE's default: 3 above depth 3, else 2), a ternary secret of
Hamming weight 2N/3 (what a uniform ternary secret has on average). ``levels`` is hf_polyhe's depth, or Orion's
own need when that is more (Orion is given no bootstrapping: a child refuses a compile that places one).
Both single-threaded: ``OMP_NUM_THREADS=1`` for hf_polyhe, ``GOMAXPROCS=1`` for Orion (``--threads`` changes both).

Orion stays out of the project's dependencies. To compare, give it a venv of its own (Python 3.10, like the
project) that reuses the project venv's torch through a .pth file::

    python3.10 -m venv /tmp/orion-venv
    echo "$PWD/.venv/lib/python3.10/site-packages" > /tmp/orion-venv/lib/python3.10/site-packages/project.pth
    /tmp/orion-venv/bin/pip install --no-deps orion-fhe==1.0.2
    /tmp/orion-venv/bin/pip install "scipy<=1.14.1" h5py matplotlib pyyaml networkx tqdm
    # (without the .pth: /tmp/orion-venv/bin/pip install orion-fhe==1.0.2, which pulls torch and torchvision)

then::

    python benchmarks/vs_orion.py --orion-python /tmp/orion-venv/bin/python          # or ORION_PYTHON=...
    python benchmarks/vs_orion.py --workload cheb --repeats 2 --runs 2
    python benchmarks/vs_orion.py --logn 13                                           # INSECURE, quick check

Without ``--orion-python`` / ``$ORION_PYTHON`` the script measures hf_polyhe's side only.

Orion's ``diagonalize`` (extraction of a weight matrix's generalised diagonals at compile time) is replaced in
the child by :func:`sparse_diagonalize`, which returns the same diagonals (checked equal, value for value, at
1024 and 4096 slots on these layers' shapes) from the matrix's non-zeros: Orion's own allocates dense
(block height x slots) float32 and int64 grids, which for a *last* linear layer (block height = slots = 32768 at
N = 2^16) passes 20 GB and was OOM-killed on this 24 GB machine (``--orion-dense-diagonalize`` restores it). It
runs at compile time only: Orion's run times are its own, its setup times are with the sparse extraction.

Measured on 2026-12-02 (openfhe 1.6.1 / orion-fhe 1.0.2 on Lattigo v6, Python 3.10, 2 cores shared with other
jobs, load average 6-7: wall times are noisy, process CPU times less so)::

    python benchmarks/vs_orion.py --repeats 3 --runs 2 --orion-python /tmp/orion-venv/bin/python

            hf_polyhe run (s) Orion run (s)   ratio  setup keys+compile (s)       max error      levels chain/in/spent
    work       min  median    min  median  hf/Or    hf_polyhe       Orion  hf_polyhe    Orion          hf      Orion
    linear    1.97   2.34   1.33   1.42   1.65    4.8/4.7    34.1/22.3    7.5e-11  7.5e-08       2/2/1      2/1/1
    cheb      2.46   2.51   1.00   1.16   2.17    0.9/0.9     8.8/8.1     5.8e-11  6.4e-08       7/7/6      7/5/5
    mlp      11.14  12.04   8.09   9.10   1.32   16.6/16.6   56.2/53.6    1.8e-10  1.6e-07       6/6/5      6/5/5

    process CPU s (min/median): linear hf_polyhe 1.33/1.52, Orion 0.92/0.93 (ratio 1.64); cheb 1.65/1.68 vs
    0.69/0.76 (2.21); mlp 7.45/7.99 vs 5.54/6.03 (1.32). hf_polyhe plans: linear 23 rotations (23 keys), 128 pt x
    ct; cheb one EvalChebyshevSeries; mlp 72 rotations (27 keys), 384 pt x ct, 2 ct x ct.

After the runtime's ``poly`` op moved to the least-depth Paterson-Stockmeyer (next commit on this branch),
``--workload cheb`` again: hf_polyhe 2.42 / 2.99 s (CPU 1.44 / 2.00), Orion 0.93 / 1.20 s (CPU 0.66 / 0.86), ratio
2.50 wall / 2.34 CPU (noisy: load 3-6); levels chain/in/spent 6/6/5 against Orion's 6/5/5 -- the same 5 levels
spent; hf_polyhe still encrypts at the top of its chain, one level above what the series needs.

Reading it (first table): hf_polyhe is 1.3-1.7x slower on the linear work (the issue had 1.9x before plaintexts were encoded
once per server) and 2.2x on the degree-15 series, where it also spends one level more (6 against 5: OpenFHE's
EvalChebyshevSeries needs 5 levels on [-1, 1] at degree 15 plus the affine map) and starts its input at the top
of a 7-level chain while Orion encrypts at the level the network needs (5 of 7): every hf_polyhe operation there
handles 2 more towers. Orion's setup is longer (its compile packs diagonals in Python and generates rotation keys
per layer). Orion's larger error comes from its float32 diagonals and inputs (1e-7 against 1e-10).

Measured on 2026-12-03, a quieter machine (load average ~1), same command. Before (4db9b2e)::

    work       min  median    min  median  hf/Or    hf_polyhe       Orion  hf_polyhe    Orion          hf      Orion
    linear    0.69   0.70   0.43   0.43   1.61    2.9/2.0    14.1/12.6    7.8e-11  7.5e-08       2/2/1      2/1/1
    cheb      0.86   0.86   0.37   0.51   1.70    0.3/0.3     3.1/3.1     3.5e-11  6.4e-08       6/6/5      6/5/5
    mlp       3.96   3.98   2.85   3.23   1.23   11.8/11.6   34.2/33.7    1.8e-10  1.6e-07       6/6/5      6/5/5

After two changes, ``--repeats 5 --runs 2`` (a first run with 3 repeats, on a noisier host, gave 0.94 / 0.97 / 1.11:
the same hf_polyhe work varied by up to 1.4x during it)::

    linear    0.57   0.57   0.46   0.48   1.19    1.7/1.7      8.8/8.3    8.1e-11  7.5e-08       1/1/1      1/1/1
    cheb      0.48   0.50   0.37   0.38   1.31    0.3/0.3      2.6/2.5    3.7e-11  6.4e-08       5/5/5      5/5/5
    mlp       3.23   3.36   3.03   3.83   0.88    6.6/6.5     39.2/33.8   1.8e-10  1.6e-07       5/5/5      5/5/5

- A leveled plan's modulus chain is now exactly the circuit's depth (``planner.plan``) when calibrated bounds show
  that every value at the last level fits the first prime alone (``planner.fits_first_prime``; this script passes
  them, :func:`hf_bounds`; exports do not, so their plans keep the spare level): the spare level made every
  operation handle one more RNS tower (3 against 2 on the linear). Orion's chain follows ours (Orion has no spare
  level either: its last level is its first prime, so its outputs carry the same bound), so it lost that level
  too: on the linear that made Orion slower in the first run (0.43 -> 0.55 s; with one fewer prime in Q its key
  switching splits into 2 digits instead of 1); in the 5-repeat run it took 0.48 s.
- The Paterson-Stockmeyer series settles each basis element once (FLEXIBLEAUTO redid a pending rescale inside every
  product that read it: the affine map's output was rescaled 7 times) and brings a low basis element to a deeper
  one's level once for all the scalar products that mix them: degree 15 0.68 -> 0.49 s on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKLOADS = ("linear", "cheb", "mlp")
SPECIAL_BITS = 60  # Orion's special primes (OpenFHE's HYBRID auxiliary primes are 60 bits)
# levels Orion's compiler needs (one per linear / x^2, ceil(log2(d + 1)) + 1 for a Chebyshev series whose input
# it maps onto [-1, 1]): checked by the child, which refuses a compile that places a bootstrap
ORION_DEPTH = {"linear": 1, "cheb": 5, "mlp": 5}


# ------------------------------------------------------------------------------------------------------------
# the shared data (numpy only)
# ------------------------------------------------------------------------------------------------------------

def make_data(workload: str, seed: int = 0) -> dict:
    """Weights, input and the float64 reference output of ``workload`` (seeded)."""
    rng = np.random.default_rng(seed)
    if workload == "linear":
        W, b = rng.normal(size=(128, 128)) / np.sqrt(128), rng.normal(size=128) * 0.1
        x = rng.uniform(-1, 1, (1, 128))
        return {"x": x, "W": W, "b": b, "ref": x @ W + b}
    if workload == "cheb":
        lo, hi, degree = -8.0, 8.0, 15
        coeffs = np.polynomial.chebyshev.chebinterpolate(lambda t: np.tanh((hi - lo) / 2 * t + (hi + lo) / 2), degree)
        x = rng.permutation(np.linspace(lo, hi, 128)).reshape(1, 128)  # the range Orion's fit sees: exactly [-8, 8]
        t = (2 * x - (lo + hi)) / (hi - lo)
        return {"x": x, "coeffs": coeffs, "interval": np.array([lo, hi]),
                "ref": np.polynomial.chebyshev.chebval(t, coeffs), "tanh": np.tanh(x)}
    if workload == "mlp":
        d = {"x": rng.uniform(-1, 1, (1, 784))}
        dims = ((784, 128), (128, 128), (128, 10))
        for i, (n_in, n_out) in enumerate(dims, 1):
            d[f"W{i}"] = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in) * (1.0 if i == 1 else 0.7)
            d[f"b{i}"] = rng.normal(size=n_out) * 0.1
        for i in (1, 2):  # BatchNorm1d(128): gamma, beta, running mean / var
            d[f"g{i}"] = rng.uniform(0.5, 1.5, 128)
            d[f"be{i}"] = rng.normal(size=128) * 0.1
            d[f"m{i}"] = rng.normal(size=128) * 0.1
            d[f"v{i}"] = rng.uniform(0.5, 1.5, 128)
        h = d["x"]
        for i in (1, 2):
            h = h @ d[f"W{i}"] + d[f"b{i}"]
            h = (h - d[f"m{i}"]) / np.sqrt(d[f"v{i}"] + BN_EPS) * d[f"g{i}"] + d[f"be{i}"]
            h = h * h
        d["ref"] = h @ d["W3"] + d["b3"]
        return d
    raise ValueError(workload)


BN_EPS = 1e-5


def fold_bn(d: dict, i: int):
    """Linear i followed by BatchNorm i, as one linear (weights (in, out))."""
    s = d[f"g{i}"] / np.sqrt(d[f"v{i}"] + BN_EPS)
    return d[f"W{i}"] * s, (d[f"b{i}"] - d[f"m{i}"]) * s + d[f"be{i}"]


def orion_levels(workload: str, hf_depth: int) -> int:
    return max(hf_depth, ORION_DEPTH[workload])


def openfhe_dnum(depth: int) -> int:
    """OpenFHE's default number of HYBRID key-switching digits (numLargeDigits = 0)."""
    return 3 if depth > 3 else (2 if depth >= 1 else 1)


# ------------------------------------------------------------------------------------------------------------
# one measurement (a child process)
# ------------------------------------------------------------------------------------------------------------

class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def hf_circuit(workload: str, d: dict):
    from hf_polyhe import he
    from hf_polyhe.approx.base import Approximation, ChebyshevSeries

    if workload == "linear":
        c = he.Circuit(block=128, slots=256, name="linear128")
        c.output(c.linear(c.input("x", 1, 128), d["W"], d["b"]))
    elif workload == "cheb":
        c = he.Circuit(block=128, slots=256, name="tanh15")
        s = ChebyshevSeries(coeffs=d["coeffs"], interval=tuple(d["interval"]))
        c.output(c.poly(c.input("x", 1, 128), Approximation(op="custom", kind="chebyshev", stages=[s],
                                                             interval=s.interval)))
    else:
        c = he.Circuit(block=128, slots=256, groups=8, name="mlp784")
        h = c.input("x", 1, 784)
        for i in (1, 2):
            h = c.linear(h, *fold_bn(d, i))
            h = c.mul(h, h)
        c.output(c.linear(h, d["W3"], d["b3"]))
    return c


def hf_bounds(c, d: dict) -> dict:
    """The values' bounds on this input (plain run): with them the planner drops its spare level when every value at
    the last level fits the first prime (``planner.fits_first_prime``), as Orion's chain has none."""
    from hf_polyhe.he.compile.planner import calibrate_bounds

    return calibrate_bounds(c, {"x": d["x"]})


def run_hf(workload: str, d: dict, logn: int, runs: int) -> dict:
    import warnings

    from hf_polyhe import he
    from hf_polyhe.he.backends.openfhe import (
        OpenFHEBackend,
        decrypt_vectors,
        encrypt_vectors,
    )
    from hf_polyhe.he.runtime.keys import generate_keys

    c = hf_circuit(workload, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = hf_params(logn)
        with Clock() as t_keys:
            pl = he.plan(c, params, bootstrap="never", bounds=hf_bounds(c, d))
            cc, kp = generate_keys(pl.params, pl.rotation_keys)
    lay = pl.circuit.layouts()["x"]
    be = OpenFHEBackend(cc, pl.params.slots)
    with Clock() as t_compile:
        ev = he.compile_evaluator(pl, be)
    times, cpus, out = [], [], None
    for _ in range(runs + 1):
        cts = encrypt_vectors(cc, kp.publicKey, lay.pack(d["x"]), pl.start_level, pl.params.slots)
        with Clock() as t:
            out = ev.run({"x": he.Packed(lay, cts)})[c.outputs[0]]
        times.append(t.wall), cpus.append(t.cpu)
    got = out.layout.unpack(decrypt_vectors(cc, kp.secretKey, out.cts, pl.params.slots))
    ct = out.cts[0]
    settled = int(ct.GetLevel()) + int(ct.GetNoiseScaleDeg()) - 1  # a pending rescale counts as spent
    return {"keys": t_keys.wall, "compile": t_compile.wall, "first": times[0], "runs": times[1:], "cpu": cpus[1:],
            "error": float(np.abs(np.asarray(got).reshape(d["ref"].shape) - d["ref"]).max()),
            "depth": pl.params.depth, "level_in": pl.params.depth - pl.start_level,
            "spent": settled - pl.start_level,
            "ring_dim": int(cc.GetRingDimension()), "scale_bits": pl.params.scale_bits,
            "counts": {k: pl.counts.get(k, 0) for k in ("rotate", "mul", "mul_plain")},
            "rotation_keys": len(pl.rotation_keys), "peak_rss_gib": peak_rss_gib()}


def orion_config(levels: int, logn: int, scale_bits: int, first_mod_bits: int, dnum: int) -> dict:
    return {
        "ckks_params": {"LogN": logn, "LogQ": [first_mod_bits] + [scale_bits] * levels,
                        "LogP": [SPECIAL_BITS] * math.ceil((levels + 1) / dnum), "LogScale": scale_bits,
                        "H": (2 * 2**logn) // 3, "RingType": "standard"},
        "orion": {"margin": 1, "embedding_method": "hybrid", "backend": "lattigo", "fuse_modules": True,
                  "debug": False, "io_mode": "none"},
    }


def orion_net(workload: str, d: dict):
    import orion.nn as on
    import torch

    f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)

    class LinearNet(on.Module):
        def __init__(self):
            super().__init__()
            self.fc = on.Linear(128, 128)

        def forward(self, x):
            return self.fc(x)

    class ChebNet(on.Module):
        def __init__(self):
            super().__init__()
            self.act = on.Chebyshev(len(d["coeffs"]) - 1, torch.tanh)

        def forward(self, x):
            return self.act(x)

    class MLP(on.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1, self.act1 = on.Linear(784, 128), on.BatchNorm1d(128), on.Quad()
            self.fc2, self.bn2, self.act2 = on.Linear(128, 128), on.BatchNorm1d(128), on.Quad()
            self.fc3 = on.Linear(128, 10)

        def forward(self, x):
            x = self.act1(self.bn1(self.fc1(x)))
            x = self.act2(self.bn2(self.fc2(x)))
            return self.fc3(x)

    net = {"linear": LinearNet, "cheb": ChebNet, "mlp": MLP}[workload]()
    with torch.no_grad():
        if workload == "linear":
            net.fc.weight.copy_(f32(d["W"].T)), net.fc.bias.copy_(f32(d["b"]))
        elif workload == "mlp":
            for i in (1, 2, 3):
                fc = getattr(net, f"fc{i}")
                fc.weight.copy_(f32(d[f"W{i}"].T)), fc.bias.copy_(f32(d[f"b{i}"]))
            for i in (1, 2):
                bn = getattr(net, f"bn{i}")
                bn.weight.copy_(f32(d[f"g{i}"])), bn.bias.copy_(f32(d[f"be{i}"]))
                bn.running_mean.copy_(f32(d[f"m{i}"])), bn.running_var.copy_(f32(d[f"v{i}"]))
                bn.eps = BN_EPS
    return net


def sparse_diagonalize(matrix, num_slots: int, embed_method: str, is_last_layer: bool):
    """``orion.core.packing.diagonalize`` with the same output, from the matrix's non-zeros: Orion's own builds
    a dense (block height x slots) block and int64 index grids of that size, which for a last layer (block height
    = slots = 32768 at N = 2^16) take over 20 GB (OOM-killed here). Generalised diagonal ``i`` of a block holds
    ``block[j mod h, (i + j) mod slots]`` in slot ``j`` (h: block height)."""
    nbr, nbc = math.ceil(matrix.shape[0] / num_slots), math.ceil(matrix.shape[1] / num_slots)
    if nbr == 1 and embed_method == "hybrid" and not is_last_layer:
        h = 2 ** math.ceil(math.log2(matrix.shape[0]))
        output_rotations = int(math.log2(num_slots // h))
    else:
        h, output_rotations = num_slots, 0
    m = matrix.tocoo()
    k = np.arange(num_slots // h)
    out = {}
    for br in range(nbr):
        for bc in range(nbc):
            r0, c0 = br * num_slots, bc * num_slots
            sel = (m.row >= r0) & (m.row < r0 + h) & (m.col >= c0) & (m.col < c0 + num_slots)
            r, c, v = m.row[sel] - r0, m.col[sel] - c0, m.data[sel].astype(np.float32)
            j = r[:, None] + k[None, :] * h  # the slots holding entry (r, c) ...
            i = (c[:, None] - j) % num_slots  # ... on diagonal i
            keep = i < h
            ii, jj = i[keep], j[keep]
            vv = np.broadcast_to(v[:, None], j.shape)[keep]
            idx = np.unique(ii)
            arr = np.zeros((len(idx), num_slots), dtype=np.float32)
            arr[np.searchsorted(idx, ii), jj] = vv
            diags = {int(d): arr[n].tolist() for n, d in enumerate(idx) if np.any(arr[n])}
            out[(br, bc)] = diags or {0: [0.0] * num_slots}
    return out, output_rotations


def run_orion(workload: str, d: dict, logn: int, runs: int, dense_diagonalize: bool = False) -> dict:
    import contextlib
    import io

    import orion
    import orion.core.packing
    import torch

    if not dense_diagonalize:
        orion.core.packing.diagonalize = sparse_diagonalize
    x = torch.tensor(d["x"], dtype=torch.float32)
    levels, scale_bits, first_mod_bits, dnum = (int(d[k]) for k in ("orion_levels", "scale_bits", "first_mod_bits",
                                                                      "dnum"))
    log = io.StringIO()  # Orion prints its progress: keep it out of the JSON, show it on failure
    try:
        with contextlib.redirect_stdout(log):
            with Clock() as t_keys:
                scheme = orion.init_scheme(orion_config(levels, logn, scale_bits, first_mod_bits, dnum))
            net = orion_net(workload, d)
            net.eval()
            with Clock() as t_compile:
                orion.fit(net, x)
                if workload == "cheb":  # the shared coefficients (Orion's own fit interpolates the same way)
                    net.act.set_coeffs([float(v) for v in d["coeffs"]])
                input_level = orion.compile(net)
                boots = sum(1 for m in net.modules() if type(m).__name__ == "Bootstrap")
            if boots or "requires 0 bootstrap" not in log.getvalue():
                raise RuntimeError(f"Orion placed bootstraps with {levels} levels: give it more (ORION_DEPTH)")
            net.he()
            times, cpus, out = [], [], None
            for _ in range(runs + 1):
                ct = orion.encrypt(orion.encode(x, input_level))
                with Clock() as t:
                    out = net(ct)
                times.append(t.wall), cpus.append(t.cpu)
            end_level = int(out.level())
            got = out.decrypt().decode().detach().numpy().astype(np.float64)
    except Exception:
        sys.stderr.write(log.getvalue()[-4000:])
        raise
    del scheme
    return {"keys": t_keys.wall, "compile": t_compile.wall, "first": times[0], "runs": times[1:], "cpu": cpus[1:],
            "error": float(np.abs(got.reshape(d["ref"].shape) - d["ref"]).max()), "depth": levels,
            "level_in": int(input_level), "spent": int(input_level) - end_level, "ring_dim": 2**logn,
            "scale_bits": scale_bits, "special_primes": math.ceil((levels + 1) / dnum),
            "peak_rss_gib": peak_rss_gib()}


def child(args) -> None:
    d = dict(np.load(args.data))
    if args.system == "hf_polyhe":
        res = run_hf(args.workload, d, args.logn, args.runs)
    else:
        res = run_orion(args.workload, d, args.logn, args.runs, args.orion_dense_diagonalize)
    res.update(system=args.system, workload=args.workload, repeat=args.repeat)
    with open(args.out, "w") as f:
        json.dump(res, f)


# ------------------------------------------------------------------------------------------------------------
# the parent: interleave, collect, print
# ------------------------------------------------------------------------------------------------------------

def spawn(python, system, workload, repeat, data, args, tmp) -> dict | None:
    out = os.path.join(tmp, f"{system}-{workload}-{repeat}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GOMAXPROCS=str(args.threads), HF_HUB_OFFLINE="1")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if system == "hf_polyhe":
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python, os.path.abspath(__file__), "--system", system, "--workload", workload, "--repeat", str(repeat),
           "--data", data, "--out", out, "--logn", str(args.logn), "--runs", str(args.runs)]
    if args.orion_dense_diagonalize:
        cmd.append("--orion-dense-diagonalize")
    limit = int(args.max_memory_gib * 2**30)  # address space: a runaway child fails alone instead of the machine

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False,
                       preexec_fn=cap if limit > 0 else None)
    if p.returncode != 0 or not os.path.exists(out):
        print(f"# {system} {workload} repeat {repeat} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", flush=True)
        return None
    with open(out) as f:
        return json.load(f)


def mm(xs) -> str:
    return f"{min(xs):6.2f} {statistics.median(xs):6.2f}" if xs else f"{'-':>6} {'-':>6}"


def hf_params(logn: int):
    """hf_polyhe's 128-bit set at N = 2^logn (its defaults: the planner fills depth and slots); below 2^16 the
    INSECURE toy set."""
    from hf_polyhe.he import params as P

    return P.default(ring_dim=2**logn) if logn >= 16 else P.toy(ring_dim=2**logn)


def hf_plan_params(workload: str, d: dict, logn: int) -> dict:
    """What hf_polyhe's plan chose (planning is numpy only, no keys): the parameters Orion gets."""
    import warnings

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from hf_polyhe import he

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = hf_circuit(workload, d)
        p = he.plan(c, hf_params(logn), bootstrap="never", bounds=hf_bounds(c, d)).params
    return {"orion_levels": orion_levels(workload, p.depth), "scale_bits": p.scale_bits,
            "first_mod_bits": p.first_mod_bits, "dnum": p.num_large_digits or openfhe_dnum(p.depth)}


def parent(args) -> None:
    orion_py = args.orion_python or os.environ.get("ORION_PYTHON")
    systems = ["hf_polyhe"] + (["orion"] if orion_py else [])
    pythons = {"hf_polyhe": sys.executable, "orion": orion_py}
    print(f"# {'128-bit' if args.logn >= 16 else 'INSECURE (toy ring)'}, N=2^{args.logn}, batch 1, threads "
          f"{args.threads}, {args.repeats} repeats x (1 first + {args.runs} later runs); load average "
          f"{'%.2f %.2f %.2f' % os.getloadavg()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if not orion_py:
        print("# Orion: not measured (give --orion-python or $ORION_PYTHON; see this script's docstring)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workload or WORKLOADS:
            d = make_data(w, args.seed)
            d.update(hf_plan_params(w, d, args.logn))
            data = os.path.join(tmp, f"{w}.npz")
            np.savez(data, **d)
            res = {s: [] for s in systems}
            for r in range(args.repeats):
                for s in (systems if r % 2 == 0 else systems[::-1]):
                    out = spawn(pythons[s], s, w, r, data, args, tmp)
                    if out:
                        res[s].append(out)
                        print(f"#   {w:<6} {s:<9} repeat {r}: setup {out['keys']:.1f}+{out['compile']:.1f} s, first "
                              f"{out['first']:.2f} s, later {' '.join(f'{v:.2f}' for v in out['runs'])} s, error "
                              f"{out['error']:.1e}, levels: chain {out['depth']}, input {out['level_in']}, spent {out['spent']}, "
                              f"peak RSS {out['peak_rss_gib']:.1f} GiB", flush=True)
            rows.append((w, res))
    print()
    print(f"{'':<7} {'hf_polyhe run (s)':^14} {'Orion run (s)':^14} {'ratio':>6}  {'setup keys+compile (s)':^23}  "
          f"{'max error':^17}  {'levels chain/in/spent':^21}")
    print(f"{'work':<7} {'min':>6} {'median':>7} {'min':>6} {'median':>7} {'hf/Or':>6}  {'hf_polyhe':>11} {'Orion':>11}  "
          f"{'hf_polyhe':>8} {'Orion':>8}  {'hf':>10} {'Orion':>10}")
    for w, res in rows:
        col = {}
        for s in ("hf_polyhe", "orion"):
            rs = res.get(s) or []
            runs = [v for o in rs for v in o["runs"]]
            setup = [o["keys"] + o["compile"] for o in rs]
            col[s] = {
                "run": mm(runs), "med": statistics.median(runs) if runs else None,
                "setup": f"{statistics.median(setup):5.1f}" + (f"/{min(setup):<5.1f}" if setup else "") if setup else "-",
                "err": f"{max(o['error'] for o in rs):8.1e}" if rs else f"{'-':>8}",
                "lev": f"{rs[0]['depth']}/{rs[0]['level_in']}/{rs[0]['spent']}" if rs else "-",
            }
        h, o = col["hf_polyhe"], col["orion"]
        ratio = f"{h['med'] / o['med']:6.2f}" if h["med"] and o["med"] else f"{'-':>6}"
        print(f"{w:<7} {h['run']} {o['run']} {ratio}  {h['setup']:>11} {o['setup']:>11}  {h['err']} {o['err']}  "
              f"{h['lev']:>10} {o['lev']:>10}")
        cpu = {s: [v for o in res.get(s) or [] for v in o["cpu"]] for s in ("hf_polyhe", "orion")}
        line = f"{'':<7} process CPU s: hf_polyhe {mm(cpu['hf_polyhe'])}, Orion {mm(cpu['orion'])}"
        if cpu["hf_polyhe"] and cpu["orion"]:
            line += f", ratio {statistics.median(cpu['hf_polyhe']) / statistics.median(cpu['orion']):.2f}"
        if res.get("hf_polyhe"):
            c = res["hf_polyhe"][0]
            line += (f"; hf_polyhe plan: {c['counts']['rotate']} rotations ({c['rotation_keys']} keys), "
                     f"{c['counts']['mul_plain']} pt x ct, {c['counts']['mul']} ct x ct")
        print(line)
    print("# run: later runs, min / median seconds over repeats x runs; ratio: hf_polyhe median / Orion median; setup:"
          " median/min; levels: the modulus chain's / the input ciphertext's / spent by the run")
    print(f"# load average at the end {'%.2f %.2f %.2f' % os.getloadavg()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS, action="append", help="repeatable; default: all three")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per system and workload")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the first, per process")
    ap.add_argument("--orion-python", help="a python with orion-fhe (default: $ORION_PYTHON; none: skip Orion)")
    ap.add_argument("--logn", type=int, default=16, help="log2 ring dimension; below 16 INSECURE (quick checks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--orion-dense-diagonalize", action="store_true",
                    help="Orion's own diagonal extraction (over 20 GB for a last layer at N = 2^16)")
    ap.add_argument("--max-memory-gib", type=float, default=16.0, help="address-space cap per child (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    # a child's own arguments
    ap.add_argument("--system", choices=("hf_polyhe", "orion"), help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.system:
        args.workload = args.workload[0]
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
