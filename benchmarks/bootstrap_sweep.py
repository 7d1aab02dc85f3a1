"""Measured 128-bit CKKS bootstrapping on this machine: one configuration per process (issue #14).

For each configuration (ring dimension, slots, level budget, HYBRID key-switching digits) a child process builds
the context at ``HEStd_128_classic`` with a uniform ternary secret, generates the keys a bootstrap needs
(``KeyGen``, ``EvalMultKeyGen``, ``EvalBootstrapKeyGen``), bootstraps a ciphertext at its last level ``reps``
times and reports: key generation seconds, bootstrap seconds (min and median), precision (max error on inputs in
[-1, 1], and in bits), the levels a bootstrapped ciphertext carries, the bootstrap's own depth, and peak RSS. The
parent watches the child's RSS and stops it above ``--cap-gib`` (the row then says "over the cap": a lower
bound, not a measurement). Configurations OpenFHE refuses as insecure are reported as refused.

    python benchmarks/he_ops.py --bootstrap-sweep                       # the default grid
    python benchmarks/he_ops.py --bootstrap-sweep --rings 16 --slots 512 --budgets 2 --digits 0
    python benchmarks/he_ops.py --bootstrap-sweep --write-costs         # store rows in the planner's cost table

The levels each configuration keeps after a bootstrap are the most its ring holds at 128-bit (at the 59-bit
scale bootstrapping needs), at least one; ``--levels`` fixes them. ``--write-costs`` stores the measured rows as
``bootstrap_measured`` in ``hf_polyhe/he/compile/cost_table.json``: the planner then predicts bootstrap time and
memory from the nearest measured configurations (:func:`hf_polyhe.he.compile.planner.bootstrap_seconds`,
:func:`hf_polyhe.he.params.bootstrap_memory_from_measurements`) instead of scaling one anchor.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_polyhe.he import params as P  # noqa: E402
from hf_polyhe.he.errors import PlanningError  # noqa: E402

SCALE_BITS = 59  # what OpenFHE's bootstrapping precision needs (DESIGN section 5)
DEFAULT_GRID = {"rings": (16, 17), "slots": (256, 1024, 4096), "budgets": (2, 3, 4), "digits": (0, 6)}
MAX_LEVELS = 12  # levels kept after a bootstrap when not given: the most the ring holds, at most this many


def _rss_gib(pid="self", field="VmRSS") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return 0.0


def config_params(ring_log2: int, slots: int, budget: int, digits: int, levels: int | None = None) -> P.CKKSParams:
    """The 128-bit bootstrapping set of one configuration: the most levels after a bootstrap that ring holds, at
    most :data:`MAX_LEVELS` (``levels`` if given); PlanningError when not even one fits."""
    lb = (int(budget), int(budget))
    base = P.default(bootstrap=True, ring_dim=2**ring_log2, slots=int(slots), scale_bits=SCALE_BITS,
                     min_scale_bits=SCALE_BITS, level_budget=lb, num_large_digits=int(digits))
    bdepth = P.bootstrap_depth_for(base.secret_key_dist, lb)
    if levels is None:
        levels = 0
        for n in range(1, MAX_LEVELS + 1):
            try:
                base.with_(levels_after_bootstrap=n, depth=n + bdepth).secure_ring_dim()
            except PlanningError:
                break
            levels = n
        if not levels:
            raise PlanningError(f"no level after a bootstrap fits N=2^{ring_log2} at 128-bit ({SCALE_BITS}-bit scale,"
                                f" level budget {list(lb)}, digits {digits or 'default'})")
    return base.with_(levels_after_bootstrap=int(levels), depth=int(levels) + bdepth)


def measure(cfg: dict) -> dict:
    """Child process: keys, ``reps`` bootstraps and their precision for ``cfg`` (see :func:`config_params`)."""
    from hf_polyhe.he.backends.openfhe import build_context

    p = config_params(cfg["ring"], cfg["slots"], cfg["budget"], cfg["digits"], cfg.get("levels"))
    out = {"ring_dim": p.ring_dim, "slots": p.slots, "level_budget": list(p.level_budget),
           "digits": p.num_large_digits, "depth": p.depth, "scale_bits": p.scale_bits}
    t = time.perf_counter()
    try:
        cc = build_context(p)
    except PlanningError as e:
        return {**out, "refused": str(e)[:200]}
    out["setup_s"] = round(time.perf_counter() - t, 2)
    out["rss_context_gib"] = round(_rss_gib(), 2)
    t = time.perf_counter()
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    cc.EvalBootstrapKeyGen(kp.secretKey, p.slots)
    out["keygen_s"] = round(time.perf_counter() - t, 1)
    out["rss_keys_gib"] = round(_rss_gib(), 2)
    rng = np.random.default_rng(0)
    v = rng.uniform(-1, 1, p.slots)
    ct = cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(v, 1, p.depth - 1, None, p.slots))
    times, res = [], None
    for _ in range(int(cfg.get("reps", 2))):
        t = time.perf_counter()
        res = cc.EvalBootstrap(ct)
        times.append(time.perf_counter() - t)
    dec = cc.Decrypt(kp.secretKey, res)
    dec.SetLength(p.slots)
    err = float(np.max(np.abs(np.asarray(dec.GetRealPackedValue()) - v)))
    left = p.depth - res.GetLevel()
    # the planner's convention (params.BOOTSTRAP_DEPTH): one level more than the bootstrap leaves consumed, the
    # spare level a planned segment keeps for a fresh ciphertext's first rescale; so depth = levels after + this
    out.update(bootstrap_s=[round(x, 2) for x in times], bootstrap_min_s=round(min(times), 2),
               bootstrap_median_s=round(float(np.median(times)), 2), max_err=err,
               precision_bits=round(-float(np.log2(max(err, 1e-300))), 1), levels_left=int(left),
               bootstrap_depth=int(p.depth - left + 1), levels_after_bootstrap=p.levels_after_bootstrap,
               peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                    / 2**20, 2))
    return out


def run_one(cfg: dict, cap_gib: float, timeout_s: float) -> dict:
    """Run :func:`measure` for ``cfg`` in a child process, stopping it above ``cap_gib`` of RSS or after
    ``timeout_s``; returns its row (with ``over_cap`` / ``timeout`` / ``failed`` when it did not finish)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg), "--out", f.name]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, t0, why = 0.0, time.perf_counter(), None
        while child.poll() is None:
            peak = max(peak, _rss_gib(child.pid, "VmHWM"))
            if peak > cap_gib:
                why = "over_cap"
            elif time.perf_counter() - t0 > timeout_s:
                why = "timeout"
            if why:
                child.kill()
                child.wait()
                break
            time.sleep(0.5)
        err = child.stderr.read()
        base = {"ring_dim": 2 ** cfg["ring"], "slots": cfg["slots"], "level_budget": [cfg["budget"]] * 2,
                "digits": cfg["digits"], "wall_s": round(time.perf_counter() - t0, 1)}
        if why:
            return {**base, why: True, "peak_gib": round(peak, 2)}
        try:
            row = json.load(f)
        except ValueError:
            return {**base, "failed": (err.strip().splitlines() or ["no output"])[-1][:200],
                    "peak_gib": round(peak, 2)}
        return {**base, **row}


def table(rows) -> str:
    head = ("| N | slots | level budget | digits | depth | levels left (planned) | keygen (s) | "
            "bootstrap min / median (s) | "
            "precision (bits) | peak RSS (GiB) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cells = [f"2^{int(r['ring_dim']).bit_length() - 1}", r["slots"], r["level_budget"], r["digits"] or "default"]
        if "bootstrap_min_s" in r:
            cells += [r["depth"], f"{r['levels_left']} ({r.get('levels_after_bootstrap', '-')})", r["keygen_s"],
                      f"{r['bootstrap_min_s']} / {r['bootstrap_median_s']}",
                      r["precision_bits"], r["peak_gib"]]
        else:
            what = ("refused: " + r["refused"] if "refused" in r else
                    f"over the {r.get('cap_gib', '?')} GiB cap (stopped at {r['peak_gib']} GiB)" if r.get("over_cap") else
                    f"timeout after {r['wall_s']} s" if r.get("timeout") else "failed: " + r.get("failed", "?"))
            cells += [r.get("depth", "-"), "-", "-", what, "-", r.get("peak_gib", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def sweep(rings, slots, budgets, digits, cap_gib=21.0, timeout_s=3600.0, reps=2, levels=None, write_costs=False):
    """Measure every configuration of the grid, one child process each, printing a row as each finishes."""
    from hf_polyhe.he.compile.planner import COST_TABLE_PATH

    rows = []
    print(f"# 128-bit bootstrapping sweep (HEStd_128_classic, UNIFORM_TERNARY, {SCALE_BITS}-bit scale, "
          f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads); cap {cap_gib} GiB RSS per child", flush=True)
    for ring, s, b, d in itertools.product(rings, slots, budgets, digits):
        if 2 * s > 2**ring:
            continue
        cfg = {"ring": ring, "slots": s, "budget": b, "digits": d, "reps": reps, "levels": levels}
        try:
            p = config_params(ring, s, b, d, levels)
        except PlanningError as e:
            row = {"ring_dim": 2**ring, "slots": s, "level_budget": [b, b], "digits": d, "refused": str(e)}
        else:
            row = run_one(cfg, cap_gib, timeout_s)
            row.setdefault("depth", p.depth)
        row["cap_gib"] = cap_gib
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows), flush=True)
    if write_costs:
        with open(COST_TABLE_PATH) as f:
            tab = json.load(f)
        done = [r for r in rows if "bootstrap_min_s" in r or r.get("over_cap")]
        keep = [r for r in tab.get("bootstrap_measured", [])
                if not any(_same_config(r, n) for n in done)]
        tab["bootstrap_measured"] = keep + [{k: r[k] for k in MEASURED_KEYS if k in r} for r in done]
        tab.setdefault("measured_on", {})["bootstrap_sweep"] = time.strftime("%Y-%m-%d %H:%M")
        with open(COST_TABLE_PATH, "w") as f:
            json.dump(tab, f, indent=1)
        print("updated", COST_TABLE_PATH)
    return rows


MEASURED_KEYS = ("ring_dim", "slots", "level_budget", "digits", "depth", "levels_left", "levels_after_bootstrap",
                 "bootstrap_depth", "keygen_s",
                 "bootstrap_min_s", "bootstrap_median_s", "precision_bits", "peak_gib", "over_cap", "cap_gib")


def _same_config(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("ring_dim", "slots", "level_budget", "digits"))


if __name__ == "__main__" and "--child" in sys.argv:
    cfg = json.loads(sys.argv[sys.argv.index("--child") + 1])
    res = measure(cfg)
    with open(sys.argv[sys.argv.index("--out") + 1], "w") as fh:
        json.dump(res, fh)
