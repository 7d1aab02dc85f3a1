"""Plain backend, IR, packing and planner: no openfhe needed, milliseconds each."""

import json
import warnings

import numpy as np
import pytest

from hf_polyhe.approx.chebyshev import fit_chebyshev
from hf_polyhe.approx.functions import EXACT_FUNCTIONS


def fit_operator(op, interval, degree):
    """A plain Chebyshev interpolant (independent of the approximation registry's defaults)."""
    return fit_chebyshev(EXACT_FUNCTIONS[op], interval, degree, op=op)
from hf_polyhe.approx.base import Approximation, ChebyshevSeries
import hf_polyhe.he as he
from hf_polyhe.he import params as P
from hf_polyhe.he.compile.planner import calibrate_bounds, static_levels


def _close(circuit, X, tol=1e-9):
    ref = he.run_reference(circuit, X)
    out, be = he.run_plain(circuit, X, return_backend=True)
    lay = circuit.layouts()
    for k in circuit.outputs:
        err = np.abs(out[k] - ref[k])
        if lay[k].kind == "scores":
            err = err[lay[k].coverage()]
        assert err.max() <= tol * max(1.0, np.abs(ref[k]).max()), (k, err.max())
    return out, be


def op_circuits(rng):
    """One small circuit per op (multi-ciphertext layouts where the op supports them)."""
    out = {}
    W = lambda a, b: rng.normal(size=(a, b)) * 0.3
    c = he.Circuit(8, 32); x = c.input("x", 9, 20)  # 3 column blocks x 3 row blocks
    c.output(c.linear(x, W(20, 13), rng.normal(size=13))); out["linear"] = c
    for op in ("add", "sub", "mul"):
        c = he.Circuit(8, 64); x = c.input("x", 5, 12); y = c.input("y", 5, 12)
        c.output(getattr(c, op)(x, y)); out[op] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 12)
    c.output(c.add_plain(c.add_plain(x, rng.normal(size=12)), 0.5)); out["add_plain"] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 12)
    c.output(c.mul_plain(c.mul_plain(x, rng.normal(size=(5, 1))), -2.0)); out["mul_plain"] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 12)
    c.output(c.poly(x, fit_operator("gelu", (-4, 4), 7))); out["poly"] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 12); c.output(c.rotate(x, 3)); out["rotate"] = c
    c = he.Circuit(8, 32); x = c.input("x", 6, 16); c.output(c.row_sum(x, 1 / 16)); out["row_sum"] = c
    c = he.Circuit(8, 32); x = c.input("x", 9, 12); c.output(c.select_rows(x, [8, 0, 4, 4, 1])); out["select_rows"] = c
    c = he.Circuit(8, 32); x = c.input("x", 9, 12)  # 3 row blocks x 2 column blocks, ragged
    c.output(c.pool_rows(c.poly(x, fit_operator("gelu", (-4, 4), 7)), rng.random(9))); out["pool_rows"] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 20); c.output(c.slice_cols(x, 8, 19)); out["slice_cols"] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 16); y = c.input("y", 5, 5)
    c.output(c.concat_cols([x, y])); out["concat_cols"] = c
    c = he.Circuit(8, 128); q = c.input("q", 6, 8); k = c.input("k", 6, 8)
    c.output(c.qk_scores(q, k, heads=2, scale=0.5, causal=False)); out["qk_scores"] = c
    c = he.Circuit(8, 64); q = c.input("q", 6, 8); k = c.input("k", 6, 8); v = c.input("v", 6, 8)
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=True)
    c.output(c.attn_apply(c.mul(s, s), v, mask=(rng.random((6, 6)) > 0.3), scale=1 / 6)); out["attn_apply"] = c
    c = he.Circuit(8, 64); x = c.input("x", 5, 12); c.output(c.bootstrap(x, 8.0)); out["bootstrap"] = c
    c = he.Circuit(8, 64); q = c.input("q", 6, 8); k = c.input("k", 6, 8)
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=True)
    c.output(c.attn_rowsum(c.mul(s, s), mask=(rng.random((6, 6)) > 0.3), scale=1 / 6)); out["attn_rowsum"] = c
    c = he.Circuit(8, 64); a = c.input("a", 6, 8)
    c.output(c.decode_rowsum(c.mul(a, a), heads=2, key_weights=rng.random(6))); out["decode_rowsum"] = c
    c = he.Circuit(8, 64, groups=4); x = c.input("x", 5, 8)
    c.output(c.replicate(c.linear(x, W(8, 8), confine=True))); out["replicate"] = c
    # decode step over a KV cache (hf_polyhe.he.compile.decode): 5 cached rows + the new one
    c = he.Circuit(8, 64); kc = c.input("kc", 5, 8); r = c.linear(c.input("r", 1, 8), W(8, 8))
    c.output(c.append_row(kc, r)); out["append_row"] = c
    c = he.Circuit(8, 64); q = c.linear(c.input("q", 1, 8), W(8, 8)); k = c.input("k", 6, 8)
    c.output(c.qk_decode(q, k, heads=2, scale=0.5)); out["qk_decode"] = c
    c = he.Circuit(8, 64); a = c.input("a", 6, 8); v = c.input("v", 6, 8)
    c.output(c.attn_decode(c.mul(a, a), v, heads=2, key_weights=rng.random(6))); out["attn_decode"] = c
    return out


def _inputs(c, rng):
    return {n: rng.uniform(-1, 1, size=s) for n, s in c.inputs.items()}


@pytest.mark.parametrize("op", sorted(he.OPS))
def test_every_op_packed_matches_reference(op):
    rng = np.random.default_rng(0)
    circuits = op_circuits(rng)
    assert set(circuits) == set(he.OPS), "every registered op needs a test circuit"
    c = circuits[op]
    _close(c, _inputs(c, rng))


def test_attention_non_cyclic_and_cyclic_layouts():
    rng = np.random.default_rng(1)
    for slots, causal in ((64, True), (64, False), (128, True), (128, False)):  # R = 8 (< 2L-1) and 16
        c = he.Circuit(8, slots)
        q, k, v = (c.input(n, 6, 8) for n in "qkv")
        s = c.qk_scores(q, k, heads=4, scale=0.3, causal=causal)
        c.output(c.attn_apply(c.poly(s, fit_operator("relu", (-3, 3), 8)), v, scale=0.5))
        _close(c, _inputs(c, rng))


def random_circuit(rng, block=8, slots=64, rows=5, cols=8, n_ops=6, polys=True):
    c = he.Circuit(block, slots, name="random")
    vals = [c.input("x", rows, cols), c.input("y", rows, cols)]
    for _ in range(n_ops):
        kind = rng.choice(["linear", "add", "mul", "mul_plain", "poly", "rotate", "row_sum"] if polys else
                          ["linear", "add", "mul", "mul_plain", "rotate", "row_sum"])
        a = vals[rng.integers(len(vals))]
        b = vals[rng.integers(len(vals))]
        if kind == "linear":
            v = c.linear(a, rng.normal(size=(cols, cols)) / np.sqrt(cols), rng.normal(size=cols) * 0.1)
        elif kind == "add":
            v = c.add(a, b)
        elif kind == "mul":
            v = c.mul(a, b)
        elif kind == "mul_plain":
            v = c.mul_plain(a, rng.uniform(-1, 1, size=cols))
        elif kind == "poly":
            v = c.poly(a, fit_operator("tanh", (-20, 20), 7))
        elif kind == "rotate":
            v = c.rotate(a, int(rng.integers(-3, 4)))
        else:
            v = c.row_sum(a, 1.0 / cols)
        vals.append(v)
    c.output(vals[-1])
    return c


@pytest.mark.parametrize("seed", range(20))
def test_random_circuits_plain_matches_reference(seed):
    rng = np.random.default_rng(seed)
    c = random_circuit(rng)
    _close(c, {"x": rng.uniform(-1, 1, (5, 8)), "y": rng.uniform(-1, 1, (5, 8))})


def test_poly_kinds_and_range_violations():
    rng = np.random.default_rng(2)
    inv = Approximation("inv_sqrt", "newton_inv_sqrt", [fit_operator("inv_sqrt", (0.5, 4), 5).stages[0]],
                        (0.5, 4), newton_steps=2)
    sign = fit_operator("sign", (-1, 1), 7).stages[0]
    relu = Approximation("relu", "relu_from_sign", [ChebyshevSeries(sign.coeffs, (-2, 2)),
                                                     ChebyshevSeries(sign.coeffs, (-1.5, 1.5))], (-2, 2))
    rec = Approximation("reciprocal", "newton_reciprocal", [fit_operator("reciprocal", (1, 3), 3).stages[0]],
                        (1, 3), newton_steps=1)
    for ap, lo, hi in ((inv, 0.6, 3.9), (relu, -1.9, 1.9), (rec, 1.1, 2.9)):
        c = he.Circuit(8, 64); x = c.input("x", 4, 8); c.output(c.poly(x, ap))
        out, be = _close(c, {"x": rng.uniform(lo, hi, (4, 8))})
        assert be.violations == []
    c = he.Circuit(8, 64); x = c.input("x", 4, 8); c.output(c.poly(x, fit_operator("gelu", (-1, 1), 7)))
    _, be = he.run_plain(c, {"x": np.full((4, 8), 3.0)}, return_backend=True)
    assert be.violations and "leaves the approximation interval" in be.violations[0]["message"]
    with pytest.raises(he.RangeViolation):
        he.run_plain(c, {"x": np.full((4, 8), 3.0)}, strict=True)


def test_save_load_roundtrip_and_bad_documents(tmp_path):
    rng = np.random.default_rng(3)
    c = random_circuit(rng)
    c.save(tmp_path / "c")
    c2 = he.Circuit.load(tmp_path / "c")
    X = {"x": rng.uniform(-1, 1, (5, 8)), "y": rng.uniform(-1, 1, (5, 8))}
    assert np.array_equal(he.run_plain(c, X)[c.outputs[0]], he.run_plain(c2, X)[c.outputs[0]])
    d = json.loads((tmp_path / "c" / "circuit.json").read_text())
    for patch, msg in (({"version": 99}, "version"), ({"format": "x"}, "not a"),
                       ({"nodes": d["nodes"] + [{"op": "fft", "name": "z", "inputs": ["x"]}]}, "unknown op")):
        (tmp_path / "c" / "circuit.json").write_text(json.dumps({**d, **patch}))
        with pytest.raises(he.CircuitError, match=msg):
            he.Circuit.load(tmp_path / "c")


def test_bad_shapes_are_clear_errors():
    c = he.Circuit(8, 64); x = c.input("x", 4, 8)
    with pytest.raises(he.CircuitError, match="weight shape"):
        c.linear(x, np.ones((7, 3)))
    y = c.input("y", 4, 6)
    with pytest.raises(he.CircuitError, match="different shapes"):
        c.add(x, y)
    with pytest.raises(he.CircuitError, match="single-ciphertext"):
        c2 = he.Circuit(8, 16); q = c2.input("q", 4, 8); c2.qk_scores(q, q, heads=2)
    p = c.poly(y, fit_operator("gelu", (-1, 1), 3))
    with pytest.raises(he.CircuitError, match="insert mul_plain"):
        c.row_sum(p)
    c.output(x)
    with pytest.raises(he.LayoutError, match="shape"):
        he.run_plain(c, {"x": np.ones((5, 8)), "y": np.ones((4, 6))})
    with pytest.raises(he.CircuitError, match="missing input"):
        he.run_plain(c, {"x": np.ones((4, 8))})


def test_planner_counts_levels_and_keys():
    rng = np.random.default_rng(4)
    c = he.Circuit(8, 64)
    x = c.input("x", 6, 8)
    h = c.linear(x, rng.normal(size=(8, 8)))
    s = c.qk_scores(h, h, heads=2, causal=True)
    c.output(c.attn_apply(c.poly(s, fit_operator("gelu", (-4, 4), 7)), h))
    pl = he.plan(c)
    lev = static_levels(c)
    assert pl.depth == max(lev.values()) == 1 + 2 + 4 + 2  # degree 7: 4 levels (EvalChebyshevSeries: 5)
    assert pl.params.depth == pl.depth + 1 and not pl.params.bootstrap
    assert pl.params.security == "HEStd_128_classic" and pl.params.ring_dim >= 2**14
    assert pl.counts["mul"] == 2 * 6  # one ct x ct per shift in qk_scores and attn_apply (6 causal shifts)
    assert all(-32 < k <= 32 and k != 0 for k in pl.rotation_keys)
    assert "rotations" in pl.report() and pl.predicted_seconds > 0


def test_planner_inserts_bootstraps_and_refuses_impossible_depth():
    rng = np.random.default_rng(5)
    c = he.Circuit(8, 64)
    v = c.input("x", 4, 8)
    for _ in range(8):
        v = c.poly(v, fit_operator("tanh", (-2, 2), 7))
    c.output(v)
    X = {"x": rng.uniform(-1, 1, (4, 8))}
    pl = he.plan(c, levels_after_bootstrap=12, bootstrap="always", bounds=calibrate_bounds(c, X))
    assert pl.params.bootstrap and pl.counts["bootstrap"] == len(pl.inserted_bootstraps) >= 3
    assert max(pl.levels.values()) <= 11
    out, be = he.run_plain(pl.circuit, X, return_backend=True)
    assert be.violations == [] and np.allclose(out[v], he.run_reference(c, X)[v], atol=1e-12)
    deep = he.Circuit(8, 64)
    v = deep.input("x", 4, 8)
    for _ in range(80):
        v = deep.mul(v, v)
    deep.output(v)
    with pytest.raises(he.PlanningError, match="exceeds every 128-bit"):
        he.plan(deep, bootstrap="never")
    with pytest.raises(he.PlanningError, match="bootstrap segment"):
        he.plan(c, levels_after_bootstrap=4, bootstrap="always")


def _bootstrapped(c, lb, X):
    """``insert_bootstraps`` with calibrated bounds: the circuit, its bootstraps' sources and its static levels;
    checked against the reference (no range violation, every segment within ``lb - 1`` levels)."""
    from hf_polyhe.he.compile.planner import insert_bootstraps

    out, ins = insert_bootstraps(c, lb, calibrate_bounds(c, X))
    by = {n.name: n for n in out.nodes}
    lev = static_levels(out)
    assert max(lev.values()) <= lb - 1
    res, be = he.run_plain(out, X, return_backend=True)
    ref = he.run_reference(c, X)
    assert be.violations == []
    for k in c.outputs:
        assert np.abs(res[k] - ref[k]).max() <= 1e-9 * max(1.0, np.abs(ref[k]).max())
    return out, [by[b].inputs[0] for b in ins]


def test_bootstraps_once_per_value_and_where_fewest_ciphertexts():
    """``mul(x, x)`` refreshes ``x`` once (it was bootstrapped once per input); a linear widening 8 features to 32
    (4 ciphertexts) whose output must be refreshed is recomputed from its bootstrapped 1-ciphertext input; q, k and
    v of one input are recomputed from one bootstrap of that input instead of one bootstrap each."""
    rng = np.random.default_rng(8)
    X = {"x": rng.uniform(-1, 1, (4, 8))}
    deep = lambda c, v, n: [v := c.mul(v, c.mul_plain(v, 0.9)) for _ in range(n)][-1]

    c = he.Circuit(8, 64)
    v = deep(c, c.input("x", 4, 8), 3)  # 6 levels
    c.output(c.mul(v, v))
    out, srcs = _bootstrapped(c, 7, X)
    assert srcs == [v]

    c = he.Circuit(8, 64)
    v = deep(c, c.input("x", 4, 8), 2)  # 4 levels
    wide = c.linear(v, rng.normal(size=(8, 32)) / 3)  # 5 levels, 4 ciphertexts
    c.output(c.linear(c.poly(wide, fit_operator("tanh", (-6, 6), 7)), rng.normal(size=(32, 8)) / 6))
    out, srcs = _bootstrapped(c, 7, X)
    assert srcs == [v] and c.layouts()[wide].num_cts == 4 and wide not in out.layouts()
    assert sum(n.op == "linear" for n in out.nodes) == 2  # the first version of `wide` is gone

    c = he.Circuit(8, 64)
    h = deep(c, c.input("x", 4, 8), 2)
    q, k, val = (c.linear(h, rng.normal(size=(8, 8)) / 3) for _ in range(3))
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=True)
    c.output(c.attn_apply(c.mul(s, s), val, mask=np.tril(np.ones((4, 4))) / 4))
    out, srcs = _bootstrapped(c, 7, X)
    assert srcs == [h]
    assert sum(n.op == "linear" for n in out.nodes) == 3


def test_toy_parameters_warn_and_must_be_named():
    with pytest.warns(he.ToyParametersWarning):
        P.toy()
    with pytest.raises(he.PlanningError, match="by name"):
        P.CKKSParams(security="HEStd_NotSet")
    with pytest.raises(he.PlanningError):
        P.get("insecure")


def test_he_package_imports_no_torch():
    import subprocess, sys
    # torch made unimportable: the runtime must still import (and never pull torch in)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import hf_polyhe.he, hf_polyhe.he.runtime.client, hf_polyhe.he.runtime.server, hf_polyhe.he.runtime.keys\n"
            "import hf_polyhe.he.compile.export_plan, hf_polyhe.he.backends.openfhe, hf_polyhe.serve.client\n"
            "print(sys.modules.get('torch') is not None)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=__file__.rsplit("/tests", 1)[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------------------------------------------------
# Level-saving rewrites (he/optimize.py) and the single-row matmul


def _folded_copy(c):
    from hf_polyhe.he.circuit.optimize import fold_plaintext_maps

    return fold_plaintext_maps(he.Circuit.from_dict(c.to_dict(), dict(c.weights)))


def test_fold_plaintext_maps_keeps_outputs_and_saves_levels():
    """A pre-norm block with every foldable pattern: per-feature affine before Q/K/V (3 linear consumers), an
    affine right after a matmul before a polynomial, a final affine before select_rows -> head, and a
    polynomial attention activation after qk_scores. Outputs (including a K output) must not change; each
    folded map gives back its level."""
    rng = np.random.default_rng(3)
    d, L = 8, 4
    W = lambda a, b: rng.normal(size=(a, b)) / np.sqrt(a)
    c = he.Circuit(8, 64)
    x = c.input("x", L, d)
    h = c.add_plain(c.mul_plain(x, rng.uniform(0.5, 1.5, d)), rng.normal(size=d) * 0.1)  # norm gain/shift
    q, k, v = (c.linear(h, W(d, d), rng.normal(size=d) * 0.1, name=n) for n in ("q", "k", "v"))
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=True)
    a = c.poly(s, fit_operator("gelu", (-6.0, 6.0), 7))
    o = c.add(x, c.linear(c.attn_apply(a, v, mask=np.tril(np.ones((L, L))) / 3.0), W(d, d)))
    f = c.add_plain(c.mul_plain(c.linear(o, W(d, 16), rng.normal(size=16) * 0.1), rng.uniform(0.5, 1.5, 16)),
                    rng.normal(size=16) * 0.1)  # MLP norm right after fc_in
    m = c.add(o, c.linear(c.poly(f, fit_operator("gelu", (-8.0, 8.0), 7)), W(16, d)))
    head = c.linear(c.select_rows(c.add_plain(c.mul_plain(m, rng.uniform(0.5, 1.5, d)), 0.05), [L - 1]), W(d, 5))
    c.output(head, "k")
    folded = _folded_copy(c)
    assert folded.meta["folded"] == {"affine": 6, "domain": 2}  # three gain + shift pairs, two domains
    assert not any(n.op == "mul_plain" for n in folded.nodes)
    polys = [n for n in folded.nodes if n.op == "poly"]
    assert all(p.attrs["approximation"]["stages"][0]["interval"] == [-1.0, 1.0] for p in polys)
    before, after = static_levels(c), static_levels(folded)
    # 3 affine levels (norm, MLP norm, final norm) + 2 polynomial domain maps
    assert max(after.values()) == max(before.values()) - 5
    X = {"x": rng.normal(size=(L, d))}
    ref = he.run_reference(c, X)
    out = he.run_plain(folded, X)
    for name in (head, "k"):
        assert np.abs(out[name] - ref[name]).max() <= 1e-9 * max(1.0, np.abs(ref[name]).max())


def test_fold_leaves_maps_that_cannot_move():
    """Row-dependent plaintexts, an affine feeding a non-linear consumer, and a linear used twice stay put."""
    rng = np.random.default_rng(4)
    c = he.Circuit(8, 64)
    x = c.input("x", 4, 8)
    per_row = c.linear(c.mul_plain(x, rng.normal(size=(4, 1))), rng.normal(size=(8, 8)))  # row-dependent
    y = c.mul_plain(x, rng.normal(size=8))
    both = c.add(c.linear(y, rng.normal(size=(8, 8))), c.mul(y, y))  # y also feeds a mul
    lin = c.linear(x, rng.normal(size=(8, 8)))
    two = c.add(c.poly(lin, fit_operator("gelu", (-9.0, 9.0), 5)), lin)  # the linear is used twice
    c.output(c.add(c.add(per_row, both), two))
    folded = _folded_copy(c)
    assert folded.meta["folded"] == {"affine": 0, "domain": 0}
    assert static_levels(folded) == static_levels(c)
    X = {"x": rng.normal(size=(4, 8))}
    _close(folded, X)


def test_fold_row_sum_scale_into_newton_and_chebyshev_domains():
    """A LayerNorm (``row_sum -> + eps -> inv_sqrt`` by Newton), power-softmax's ``attn_rowsum -> + eps ->
    reciprocal`` and a Chebyshev series after a row sum with two shifts: each first stage's affine map goes into
    the row sum's scale and the shifts, the Newton steps read ``x`` back through ``x_map``; one level saved per
    polynomial, the same outputs, and the folded approximations survive a JSON round trip."""
    from hf_polyhe.approx.newton import fit_newton_inv_sqrt, fit_newton_reciprocal

    rng = np.random.default_rng(5)
    d, L = 8, 4
    c = he.Circuit(8, 64)
    x = c.input("x", L, d)
    xc = c.sub(x, c.row_sum(x, 1.0 / d))
    var = c.add_plain(c.row_sum(c.mul(xc, xc), 1.0 / d), 1e-3)
    ln = c.mul(xc, c.poly(var, fit_newton_inv_sqrt((0.05, 20.0), 5, newton_steps=1)))
    q = c.linear(x, rng.normal(size=(d, d)) / 3)
    s = c.qk_scores(q, q, heads=2, scale=0.5, causal=True)
    p2 = c.mul(s, s)
    mean = c.add_plain(c.attn_rowsum(p2, mask=np.tril(np.ones((L, L))) / np.arange(1, L + 1)[:, None]), 1e-2)
    att = c.mul(c.attn_apply(p2, q, mask=np.tril(np.ones((L, L)))), c.poly(mean, fit_newton_reciprocal((0.01, 30.0), 5,
                                                                                                    newton_steps=2)))
    two = c.add_plain(c.add_plain(c.row_sum(c.mul(x, x), 0.5), 0.25), -0.125)
    g = c.poly(two, fit_operator("tanh", (0.0, 40.0), 7))
    c.output(c.add(c.add(ln, att), g))
    folded = _folded_copy(c)
    assert folded.meta["folded"]["domain"] == 3
    polys = [n for n in folded.nodes if n.op == "poly"]
    assert all(p.attrs["approximation"]["stages"][0]["interval"] == [-1.0, 1.0] for p in polys)
    assert sum("x_map" in p.attrs["approximation"] for p in polys) == 2
    before, after = static_levels(c), static_levels(folded)
    assert max(after.values()) < max(before.values())
    for p in polys:  # each polynomial's output one level earlier than before
        src = [n for n in c.nodes if n.op == "poly" and n.name == p.name]
        assert src and after[p.name] == before[p.name] - 1
    X = {"x": rng.normal(size=(L, d))}
    ref, out = he.run_reference(c, X), he.run_plain(folded, X)
    out_name = c.outputs[0]
    assert np.abs(out[out_name] - ref[out_name]).max() <= 1e-9 * max(1.0, np.abs(ref[out_name]).max())
    for p in polys:
        a = Approximation.from_dict(json.loads(json.dumps(p.attrs["approximation"])))
        assert a.to_dict() == p.attrs["approximation"]


def test_no_fold_into_a_row_sum_over_a_vector_layout():
    """A row sum over a tiled vector writes its sum into the padding too, where a folded shift would not go: the
    folded inverse square root would see values far outside [-1, 1] there (review finding). It stays unfolded, and
    the polynomial's values stay bounded on every slot."""
    from hf_polyhe.approx.newton import fit_newton_inv_sqrt

    rng = np.random.default_rng(1)
    d = 6
    c = he.Circuit(8, 64)
    x = c.input("x", 1, d, layout=he.TiledVector(d, 8, 64))
    xc = c.sub(x, c.row_sum(x, 1.0 / d))
    var = c.add_plain(c.row_sum(c.mul(xc, xc), 1.0 / d), 1e-2)
    inv = c.poly(var, fit_newton_inv_sqrt((0.05, 20.0), 7, newton_steps=2))
    c.output(c.linear(c.mul(xc, inv), rng.normal(size=(d, 8))))
    folded = _folded_copy(c)
    assert folded.meta["folded"]["domain"] == 0
    xv = rng.normal(size=(1, d))
    X = {"x": (xv - xv.mean()) / xv.std() * 4.0}  # variance 16, near the top of the interval
    assert calibrate_bounds(folded, X)[inv] < 10.0
    _close(folded, X)


def test_x_map_is_checked():
    from hf_polyhe.approx.newton import fit_newton_inv_sqrt

    d = fit_newton_inv_sqrt((0.05, 20.0), 5, newton_steps=1).to_dict()
    for bad in ([0.0, 1.0], [float("nan"), 0.0], [1.0], "12"):
        with pytest.raises(ValueError):
            Approximation.from_dict({**d, "x_map": bad})
    with pytest.raises(ValueError, match="Newton kinds only"):
        Approximation.from_dict({**fit_operator("gelu", (-1.0, 1.0), 3).to_dict(), "x_map": [2.0, 0.0]})


@pytest.mark.parametrize("din,dout", [(8, 8), (20, 13), (8, 30), (5, 3)])
@pytest.mark.parametrize("source", ["clean", "poly", "dirty"])
def test_single_row_linear_matches_reference(din, dout, source):
    """One-row inputs (a decode step's token) use the cyclic-diagonal plan when the padding is zero or a known
    polynomial constant p(0), and the general plan otherwise; all agree with numpy."""
    rng = np.random.default_rng(din * dout)
    c = he.Circuit(8, 64)
    x = c.input("x", 1, din)
    if source == "poly":
        x = c.poly(c.mul_plain(x, 0.5), fit_operator("gelu", (-1.0, 1.0), 7))  # p(0) != 0 in the padding
    elif source == "dirty":
        x = c.rotate(x, 0)  # marks the layout dirty: unknown padding
    c.output(c.linear(x, rng.normal(size=(din, dout)), rng.normal(size=dout)))
    _close(c, {"x": rng.uniform(-1, 1, size=(1, din))})


def test_single_row_linear_needs_fewer_plaintext_products():
    """The cyclic plan multiplies by the D cyclic diagonals of a block instead of the 2D - 1 generalised ones."""
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(0)
    counts = {}
    for rows in (1, 2):
        c = he.Circuit(16, 256)
        c.output(c.linear(c.input("x", rows, 16), rng.normal(size=(16, 16))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts[rows] = PL.plan(c, P.toy(), bootstrap="never").counts["mul_plain"]
    assert counts[1] == 16 and counts[2] == 31


# ---------------------------------------------------------------- row groups (packing.grouped_plan)


def test_grouped_layouts_pack_replicated_and_stacked():
    from hf_polyhe.he.circuit.packing import MatrixLayout
    from hf_polyhe.he.errors import LayoutError

    rng = np.random.default_rng(0)
    rep = MatrixLayout(5, 8, 8, 64, groups=4)  # one block: every group holds it
    X = rng.normal(size=(5, 8))
    (v,) = rep.pack(X)
    assert v.shape == (256,) and np.array_equal(v, np.tile(v[:64], 4))
    assert np.array_equal(rep.unpack([v]), X)
    st = MatrixLayout(5, 20, 8, 64, groups=4)  # three blocks stacked, groups 0/1/2, group 3 empty
    assert st.stacked and st.per_ct == 4 and st.num_cts == 1
    Y = rng.normal(size=(5, 20))
    (w,) = st.pack(Y)
    assert np.array_equal(st.unpack([w]), Y) and not np.any(w[192:])
    wide = MatrixLayout(2, 40, 8, 64, groups=2)  # five blocks, two per ciphertext
    assert wide.num_cts == 3 and np.array_equal(wide.unpack(wide.pack(Y[:2, :20].repeat(2, axis=1))), Y[:2, :20].repeat(2, axis=1))
    with pytest.raises(LayoutError, match="one group"):
        MatrixLayout(9, 8, 8, 64, groups=2)  # 9 rows > R = 8
    with pytest.raises(LayoutError, match="power of two"):
        MatrixLayout(2, 8, 8, 64, groups=3)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("source", ["clean", "poly", "dirty"])
def test_grouped_linears_match_reference(groups, rows, source):
    """Wide linears on row groups: replicated -> stacked (MLP in, LM head), a polynomial on the stacked
    tensor, stacked -> replicated (MLP out, group sum), for full, one-row (doubled row, p(0) padding) and
    unknown-padding inputs; every group count gives numpy's answer."""
    rng = np.random.default_rng(groups * 100 + rows)
    c = he.Circuit(16, 256, groups=groups)
    x = c.input("x", rows, 16)
    if source == "poly":
        x = c.poly(c.mul_plain(x, 0.5), fit_operator("gelu", (-2.0, 2.0), 7))
    elif source == "dirty":
        x = c.add_plain(x, 0.25)  # padding 0.25 but not a known polynomial constant: the general plan
    h = c.linear(x, rng.normal(size=(16, 40)) / 4, rng.normal(size=40))
    h = c.poly(h, fit_operator("gelu", (-9.0, 9.0), 7))
    y = c.linear(h, rng.normal(size=(40, 16)) / 6, rng.normal(size=16))
    c.output(c.linear(c.add(y, x), rng.normal(size=(16, 70)) / 4))
    lay = c.layouts()
    if groups > 1:
        assert lay[h].stacked and not lay[y].stacked and lay[y].clean
    _close(c, {"x": rng.uniform(-1, 1, size=(rows, 16))})


def test_grouped_linears_save_plaintext_products_and_refuse_what_they_cannot_do():
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(1)
    counts = {}
    for groups in (1, 4):
        c = he.Circuit(16, 256, groups=groups)
        h = c.linear(c.input("x", 9, 16), rng.normal(size=(16, 64)))
        c.output(c.linear(c.mul(h, h), rng.normal(size=(64, 16))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl = PL.plan(c, P.toy(2**13), bootstrap="never")
        counts[groups] = pl.counts
        assert pl.params.slots == 256 * groups
    # 4 output + 4 input blocks of 31 generalised diagonals each, against one pass over 4 stacked blocks
    assert counts[1]["mul_plain"] == 8 * 31 and counts[4]["mul_plain"] == 2 * 31
    assert counts[4]["mul"] == counts[1]["mul"] // 4  # the square runs on one stacked ciphertext
    c = he.Circuit(16, 256, groups=4)
    h = c.linear(c.input("x", 4, 16), rng.normal(size=(16, 64)))
    with pytest.raises(he.CircuitError, match="stacked"):
        c.linear(h, rng.normal(size=(64, 32)))
    with pytest.raises(he.CircuitError, match="stacked"):
        c.row_sum(h)
    with pytest.raises(he.CircuitError, match="row group"):
        c.rotate(h, 1)


@pytest.mark.parametrize("groups", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_spread_attention_matches_reference(groups, rows, causal):
    """Keys/values confined to one row group: each ct x ct product serves ``groups`` shifts (doubling, walked
    and one-by-one batches, incomplete last batches), values summed over the groups; padding mask included.
    The replicated cache copy (``replicate``) equals the keys."""
    rng = np.random.default_rng(groups * 10 + rows)
    c = he.Circuit(8, 128, groups=groups)  # R = 16 rows per group, prompts up to 8
    x = c.input("x", rows, 8)
    q = c.linear(x, rng.normal(size=(8, 8)) / 3)
    k, v = (c.linear(x, rng.normal(size=(8, 8)) / 3, confine=True) for _ in range(2))
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=causal)
    mask = np.ones((rows, rows))
    if not causal and rows > 1:
        mask[:, -1] = 0.0
    w = c.poly(s, fit_operator("gelu", (-4, 4), 7))
    o = c.attn_apply(w, v, mask=mask, scale=1 / rows)
    c.output(c.add(o, x), s, c.replicate(k), c.attn_rowsum(w, mask=mask))  # + power-softmax's row sums
    lay = c.layouts()
    assert lay[s].spread and lay[k].confined and not lay[o].confined
    assert lay[s].num_cts == -(-len(lay[s].shifts) // (lay[s].head_dim * groups))
    _close(c, {"x": rng.uniform(-1, 1, size=(rows, 8))})


def test_spread_attention_saves_rotations_and_products():
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(3)
    counts = {}
    for groups, confine in ((1, False), (8, True)):
        c = he.Circuit(16, 32 * 16, groups=groups)
        x = c.input("x", 16, 16)
        q = c.linear(x, rng.normal(size=(16, 16)))
        k, v = (c.linear(x, rng.normal(size=(16, 16)), confine=confine) for _ in range(2))
        c.output(c.attn_apply(c.qk_scores(q, k, heads=2, causal=True), v))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts[groups] = PL.plan(c, P.toy(2**13), bootstrap="never").counts
    # 16 causal shifts: 32 ct x ct products one by one, 4 in two batches of 8 (2 per op)
    assert counts[1]["mul"] == 32 and counts[8]["mul"] == 4
    assert counts[8]["rotate"] < counts[1]["rotate"] / 3
    c = he.Circuit(8, 128, groups=4)
    x = c.input("x", 9, 8)
    q, k = c.linear(x, rng.normal(size=(8, 8))), c.linear(x, rng.normal(size=(8, 8)), confine=True)
    with pytest.raises(he.CircuitError, match="R/2"):  # 9 rows > R/2 = 8
        c.qk_scores(q, k, heads=2)
    with pytest.raises(he.CircuitError, match="confined"):
        c.poly(k, fit_operator("gelu", (-4, 4), 7))


def test_linear_after_decode_attention_reads_the_row_copies():
    """attn_decode / decode_rowsum leave their row in every row of the ciphertext: the next one-row linear uses
    the D cyclic diagonals without doubling the row or a padding correction (instead of 2D - 1 diagonals)."""
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(5)
    c = he.Circuit(8, 64)
    a, v = c.input("a", 6, 8), c.input("v", 6, 8)
    o = c.attn_decode(c.mul(a, a), v, heads=2, key_weights=rng.random(6))
    r = c.poly(c.add_plain(c.decode_rowsum(c.mul(a, a), heads=2, key_weights=rng.random(6)), 0.5),
               fit_operator("gelu", (-1, 9), 7))
    c.output(c.linear(c.mul(o, r), rng.normal(size=(8, 8)), rng.normal(size=8)))
    _close(c, {"a": rng.uniform(-1, 1, (6, 8)), "v": rng.uniform(-1, 1, (6, 8))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = PL.plan(c, P.toy(), bootstrap="never").counts
    assert counts["mul_plain"] == 8 + 3  # the linear's 8 cyclic diagonals + 1 + 2 masks of the decode ops


def test_single_row_plan_looks_through_a_bootstrap():
    """A bootstrap keeps its input's values in every slot (its bound covers the padding): a one-row linear after
    ``bootstrap(poly(clean))`` still corrects for the known padding p(0), and one after ``bootstrap(attn_decode)``
    still reads the row copies -- the D cyclic diagonals, as without the bootstrap, not the 2D - 1 general ones."""
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(8)
    act = fit_operator("gelu", (-1.0, 1.0), 7)
    products = {}
    for with_bootstrap in (False, True):
        refresh = (lambda t: c.bootstrap(t, 4.0)) if with_bootstrap else (lambda t: t)
        c = he.Circuit(8, 64)
        x = refresh(c.poly(c.mul_plain(c.input("x", 1, 8), 0.5), act))  # p(0) != 0 in the padding
        a, v = c.input("a", 6, 8), c.input("v", 6, 8)
        o = refresh(c.attn_decode(c.mul(a, a), v, heads=2, key_weights=rng.random(6)))
        c.output(c.linear(x, rng.normal(size=(8, 8)), rng.normal(size=8)), c.linear(o, rng.normal(size=(8, 8))))
        _close(c, {"x": rng.uniform(-1, 1, (1, 8)), "a": rng.uniform(-1, 1, (6, 8)), "v": rng.uniform(-1, 1, (6, 8))})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            products[with_bootstrap] = PL.plan(c, P.toy(), bootstrap="auto" if with_bootstrap else "never").counts["mul_plain"]
    assert products[False] == products[True] == 8 + 8 + 1  # 8 cyclic diagonals per linear, attn_decode's mask


def test_linears_on_one_input_share_their_baby_rotations():
    """q, k and v read the same ciphertext with the same baby steps: the rotations are made once (and the
    input rescaled once); a later run through the same evaluator does not reuse the previous run's."""
    from hf_polyhe.he.compile import planner as PL
    from hf_polyhe.he.circuit.packing import bsgs_plan

    rng = np.random.default_rng(6)
    rot = {}
    for n in (1, 3):
        c = he.Circuit(16, 256)
        x = c.input("x", 9, 16)
        Ws = [rng.normal(size=(16, 16)) for _ in range(n)]
        outs = [c.linear(x, W) for W in Ws]
        c.output(*outs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rot[n] = PL.plan(c, P.toy(), bootstrap="never").counts["rotate"]
        ev = he.Evaluator(c, he.PlainBackend(c.ct_slots))
        for _ in range(2):  # two runs on different inputs through one evaluator
            X = rng.uniform(-1, 1, (9, 16))
            got = ev.run({"x": he.Packed(ev.layouts["x"], ev.layouts["x"].pack(X))})
            for o, W in zip(outs, Ws):
                assert np.abs(ev.layouts[o].unpack(got[o].cts) - X @ W).max() < 1e-9
    plan = bsgs_plan(Ws[0], c.layouts()["x"], 16)
    babies, giants = len(plan.baby), len([g for g in plan.giant if g])
    assert babies > 0 and rot[1] == babies + giants and rot[3] == babies + 3 * giants


# ---------------------------------------------------------------- one-row vectors (decode steps on vectors)
def test_vector_layouts_pack_and_round_trip():
    from hf_polyhe.he.circuit.packing import layout_from_dict

    x = np.arange(1.0, 6.0)[None]
    t = he.TiledVector(5, 8, 64)
    v = t.pack(x)[0]
    assert v.shape == (64,) and np.array_equal(v[8:16], [1, 2, 3, 4, 5, 0, 0, 0]) and np.array_equal(t.unpack([v]), x)
    col = he.ColumnVector(5, 8, 64, valid=3)
    m = col.pack(x)[0].reshape(8, 8)
    assert np.array_equal(m[:5, :3], np.repeat(x.T, 3, axis=1)) and not m[:, 3:].any() and not m[5:].any()
    assert np.array_equal(col.unpack([m.reshape(-1)]), x)
    for lay in (t, col, he.ColumnVector(5, 8, 64)):
        back = layout_from_dict(json.loads(json.dumps(lay.to_dict())))
        assert back == lay and back.to_dict() == lay.to_dict()
    # a circuit with a vector input saves as IR version 2 and loads back with its input layout
    c = he.Circuit(8, 64)
    c.output(c.linear(c.input("x", 1, 5, layout=col), np.ones((5, 3))))
    d = c.to_dict()
    assert d["version"] == 2 and d["input_layouts"]["x"] == col.to_dict()
    back = he.Circuit.from_dict(json.loads(json.dumps(d)), c.weights)
    assert back.layouts()["x"] == col and back.layouts()["x"].valid == 3
    assert he.Circuit(8, 64).to_dict()["version"] == 1 and "input_layouts" not in he.Circuit(8, 64).to_dict()
    with pytest.raises(he.CircuitError, match="does not hold"):
        he.Circuit(8, 64).input("x", 1, 6, layout=col)
    # a column vector packed with fewer valid columns than the circuit reads is refused
    ev = he.Evaluator(c, he.PlainBackend(64))
    short = col.with_(valid=1)
    with pytest.raises(he.LayoutError, match="circuit expects"):
        ev.check_inputs({"x": he.Packed(short, short.pack(x))})
    # the decode ops' new options alone make a matrix circuit version 2 as well
    m = he.Circuit(8, 64)
    a = m.input("a", 6, 8)
    m.output(m.decode_rowsum(m.mul(a, a), heads=2, key_weights=np.ones(6), scale=0.5))
    assert m.to_dict()["version"] == 2
    assert he.ColumnVector(5, 8, 64).valid == 8
    with pytest.raises(he.LayoutError, match="needs 9 rows"):
        he.ColumnVector(9, 8, 64)
    with pytest.raises(he.LayoutError, match="period"):
        he.TiledVector(9, 8, 64)


def _vector_input(c, name, n, kind, width=None):
    lay = he.TiledVector(n, 1 << (n - 1).bit_length(), c.ct_slots) if kind == "tiled" else \
        he.ColumnVector(n, width or c.ct_slots // (1 << (n - 1).bit_length()), c.ct_slots)
    return c.input(name, 1, n, layout=lay)


@pytest.mark.parametrize("din,dout", [(8, 8), (5, 3), (8, 30), (16, 64)])
@pytest.mark.parametrize("source", ["clean", "poly"])
def test_vector_linears_match_reference(din, dout, source):
    """tiled -> column (one product, a window sum) then column -> tiled (one product per valid-wide chunk of the
    output period, a sum over the rows, the period tiled over the row), with biases, non-power-of-two sizes
    and a polynomial's p(0) in the padding; the row widths chosen so both the one-chunk and the chunked
    column -> tiled plans run."""
    rng = np.random.default_rng(din * 7 + dout)
    c = he.Circuit(8, 1024)
    x = _vector_input(c, "x", din, "tiled")
    if source == "poly":
        x = c.poly(c.mul_plain(x, 0.5), fit_operator("gelu", (-1.0, 1.0), 7))
    h = c.linear(x, rng.normal(size=(din, 16)), rng.normal(size=16))  # column, rows of 1024/16 = 64
    lay = c.layouts()
    assert lay[h].kind == "column" and lay[h].width == 64 and lay[h].valid == 64 - lay[x].period + 1
    y = c.linear(h, rng.normal(size=(16, dout)), rng.normal(size=dout))
    assert c.layouts()[y].kind == "tiled"
    z = c.linear(c.poly(y, fit_operator("gelu", (-4.0, 4.0), 5)), rng.normal(size=(dout, 4)))
    c.output(y, z)
    out, be = _close(c, {"x": rng.uniform(-1, 1, size=(1, din))})
    # the tiled output really is tiled: every period of the slot vector holds it
    ev = he.Evaluator(c, he.PlainBackend(c.ct_slots))
    X = rng.uniform(-1, 1, size=(1, din))
    got = ev.run({"x": he.Packed(ev.layouts["x"], ev.layouts["x"].pack(X))})[y].cts[0]
    P = ev.layouts[y].period
    assert np.abs(got.reshape(-1, P) - got[:P]).max() < 1e-9


def test_vector_linear_counts():
    """One plaintext product per linear when the valid columns hold the output period (more, one per chunk,
    when they do not), log2 rotations."""
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(3)
    c = he.Circuit(16, 4096)
    x = _vector_input(c, "x", 16, "column")  # 16 rows of 256
    h = c.linear(x, rng.normal(size=(16, 64)))  # column -> tiled, period 64
    y = c.linear(h, rng.normal(size=(64, 16)))  # tiled -> column: valid 256 - 64 + 1 = 193
    c.output(c.linear(y, rng.normal(size=(16, 256))))  # 193 valid columns < period 256: two chunks of 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = PL.plan(c, P.toy(2**13), bootstrap="never").counts
    # h: the row sum over 16 rows (the plaintext lays out 256 / 64 copies of the period, no tiling); y: window 64;
    # out: chunk placement 1 + rows 16 (nothing to tile: the period is the row). A sum over 4^m terms is m hoisted
    # radix-4 steps of 3 rotations each (ops._rot_sum): 16 -> 6, 64 -> 9
    assert counts["mul_plain"] == 1 + 1 + 2 and counts["rotate"] == 6 + 9 + (1 + 6)
    _close(c, {"x": rng.uniform(-1, 1, size=(1, 16))})
    with pytest.raises(he.CircuitError, match="rows of at least 512"):
        c.linear(x, rng.normal(size=(16, 300)))


def test_vector_row_sum_and_layernorm():
    """row_sum on both vector kinds (padding masked out, the sum in every slot); a LayerNorm on a column vector."""
    rng = np.random.default_rng(4)
    c = he.Circuit(8, 512)
    for kind in ("tiled", "column"):
        x = c.poly(_vector_input(c, kind, 6, kind), fit_operator("gelu", (-1.0, 1.0), 5))  # p(0) in the padding
        mean = c.row_sum(x, 1 / 6)
        xc = c.sub(x, mean)
        c.output(c.mul(xc, c.row_sum(c.mul(xc, xc), 1 / 6)))
    _close(c, {"tiled": rng.uniform(-1, 1, (1, 6)), "column": rng.uniform(-1, 1, (1, 6))})


def test_decode_ops_on_tiled_vectors():
    """qk_decode / append_row / attn_decode / decode_rowsum with tiled q, k, v rows (the vector decode path):
    the row is masked into the cache (1 level, no rotation), the query needs no copies, and without key
    weights attn_decode takes one level (scores must stay clean)."""
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(8)
    c = he.Circuit(8, 64, groups=4)
    x = _vector_input(c, "x", 8, "column")
    q, k, v = (c.linear(x, rng.normal(size=(8, 8))) for _ in range(3))
    keys = c.append_row(c.input("kc", 5, 8), k)
    vals = c.append_row(c.input("vc", 5, 8), v)
    s = c.qk_decode(q, keys, heads=2, scale=0.5)
    a = c.mul(s, s)
    o = c.attn_decode(a, vals, heads=2, tiled=True)
    r = c.decode_rowsum(a, heads=2, key_weights=rng.random(6), tiled=True)
    lay = c.layouts()
    assert lay[o].kind == lay[r].kind == "tiled" and lay[keys].rows == 6
    c.output(c.linear(c.mul(o, r), rng.normal(size=(8, 8))), keys)
    X = {"x": rng.uniform(-1, 1, (1, 8)), "kc": rng.uniform(-1, 1, (5, 8)), "vc": rng.uniform(-1, 1, (5, 8))}
    _close(c, X)
    lev = static_levels(c)
    assert lev[keys] == lev[q] + 1 and lev[o] == lev[a] + 1 and lev[r] == lev[a] + 2
    from hf_polyhe.he.compile.planner import insert_bootstraps

    boot, _ = insert_bootstraps(c, 4)  # bootstraps keep the vector input
    assert boot.layouts()["x"] == c.layouts()["x"] and any(n.op == "bootstrap" for n in boot.nodes)
    _close(boot, X)
    assert c.to_dict()["version"] == 2
    for bad in (c.poly(s, fit_operator("gelu", (-4, 4), 5)), c.add_plain(s, 0.5)):  # nonzero off the score columns
        with pytest.raises(he.CircuitError, match="zero off the heads' columns"):
            c.attn_decode(bad, vals, heads=2)
    with pytest.raises(he.LayoutError, match="zero off the heads"):
        he.OPS["attn_decode"].reference(c, he.Node("attn_decode", "t", [a, vals], {"heads": 2}),
                                        [np.ones((6, 8)), np.ones((6, 8))], None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = PL.plan(c, P.toy(), bootstrap="never").counts
    assert counts["mul_plain"] == 3 + 2 + 1 + 2 + 1  # q, k, v; two row masks; qk's mask; rowsum's 2; the linear


@pytest.mark.parametrize("cached", [4, 5])
def test_append_row_takes_a_part_of_a_wider_tiled_row(cached):
    """Keys and values from one linear ([k | v], period 2D): part 0 / 1 go to row n of their caches, with one
    rotation when row n holds the other part (n odd for the keys, even for the values)."""
    from hf_polyhe.he.compile import planner as PL

    rng = np.random.default_rng(cached)
    c = he.Circuit(8, 64, groups=4)
    kv = c.linear(_vector_input(c, "x", 8, "column"), rng.normal(size=(8, 16)), rng.normal(size=16))
    keys = c.append_row(c.input("kc", cached, 6), kv)
    vals = c.append_row(c.input("vc", cached, 8), kv, part=1)
    c.output(keys, vals)
    X = {"x": rng.uniform(-1, 1, (1, 8)), "kc": rng.uniform(-1, 1, (cached, 6)), "vc": rng.uniform(-1, 1, (cached, 8))}
    _close(c, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rot = PL.plan(c, P.toy(), bootstrap="never").counts["rotate"]
    assert rot == 3 + 1 + 1  # the row sum over 8 rows (one hoisted radix-4 step of 3, one plain), one row move
    with pytest.raises(he.CircuitError, match="part 2"):
        c.append_row(c.input("wc", cached, 8), kv, part=2)


@pytest.mark.parametrize("seed", range(6))
def test_evaluator_drops_values_after_their_last_use(seed, monkeypatch):
    """The server keeps only the ciphertexts still to be read (plus outputs): the most alive at once, counted on a
    real run, is what the planner's ``peak_live_values`` predicts -- far fewer than the circuit's values."""
    import weakref

    from hf_polyhe.he.circuit import evaluator as E

    alive = {}

    class Tracked(E.Packed):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            alive[id(self)] = (weakref.ref(self), len(self.cts))

    rng = np.random.default_rng(seed)
    c = random_circuit(rng, n_ops=12, polys=False)
    lay = c.layouts()
    ev = E.Evaluator(c, he.PlainBackend(c.ct_slots))
    X = {"x": rng.uniform(-1, 1, (5, 8)), "y": rng.uniform(-1, 1, (5, 8))}
    monkeypatch.setattr(E, "Packed", Tracked)
    inputs = {n: E.Packed(lay[n], lay[n].pack(X[n])) for n in c.inputs}
    alive.clear()  # count what the evaluator holds (its copies of the inputs too), not the caller's inputs
    counts = []
    count = lambda: sum(n for r, n in alive.values() if r() is not None)  # noqa: E731
    out = ev.run(inputs, observer=lambda node, dt: counts.append(count()))
    want = he.run_reference(c, X)[c.outputs[0]]
    assert np.abs(lay[c.outputs[0]].unpack(out[c.outputs[0]].cts) - want).max() < 1e-9
    peak, _ = E.peak_live_values(c)
    # what the observer sees after each node: inputs (held here too) and live values; the peak is reached just
    # before a node's inputs are dropped, so the observed maximum is at most the predicted one
    assert max(counts) <= peak
    total = sum(lay[n].num_cts for n in [*c.inputs, *(node.name for node in c.nodes)])
    assert peak < total or len(c.nodes) <= 2
