"""Planner: automatic levels after bootstrap, clear errors for ops too deep, the measured cost model.
Planner only (no keys, no openfhe): milliseconds each."""

import json
import math

import numpy as np
import pytest

import hf_polyhe.he as he
from hf_polyhe.approx.base import Approximation
from hf_polyhe.approx.chebyshev import fit_chebyshev
from hf_polyhe.approx.functions import EXACT_FUNCTIONS
from hf_polyhe.approx.registry import fit_operator as fit_registry  # noqa: E402
from hf_polyhe.he import params as P
from hf_polyhe.he.compile import planner as PL
from hf_polyhe.he.circuit.ops import approximation_depth
from hf_polyhe.he.compile.transformer import TransformerSpec, build_circuit

pytestmark = pytest.mark.filterwarnings("ignore::hf_polyhe.he.errors.ToyParametersWarning")


def _cheb(op, interval, degree):
    return fit_chebyshev(EXACT_FUNCTIONS[op], interval, degree, op=op)


def _poly_circuit(approx, slots=64):
    c = he.Circuit(8, slots)
    x = c.input("x", 4, 8)
    c.output(c.mul_plain(c.poly(c.mul_plain(x, 0.5), approx), 2.0))
    return c


def _deep_inv_sqrt(levels_at_least=18):
    a = fit_registry("inv_sqrt", (0.05, 20), degree=31, newton_steps=6)
    assert approximation_depth(a) >= levels_at_least
    return a


def _tiny_gpt(d=8, heads=2, L=4, vocab=10, seed=0):
    """A 1-layer pre-norm GPT spec with layernorms using the registry's default (Newton) inverse sqrt."""
    rng = np.random.default_rng(seed)
    s = TransformerSpec(config={})
    W = lambda name, *shape: s.add(name, rng.normal(size=shape) * 0.3)  # noqa: E731

    def lin(name, a, b):
        return {"weight": W(name + ".w", a, b), "bias": W(name + ".b", b)}

    # what the registry's default Newton fit gives on (1e-4, 100): 20 levels (built directly: fitting is slow)
    guess = _cheb("inv_sqrt", (1e-4, 100), 27).stages[0]
    inv_sqrt = Approximation(op="inv_sqrt", kind="newton_inv_sqrt", stages=[guess], interval=(1e-4, 100),
                             newton_steps=7).to_dict()
    assert approximation_depth(Approximation.from_dict(inv_sqrt)) == 20

    def ln(name):
        return {"kind": "layernorm", "eps": 1e-5, "weight": W(name + ".g", d), "bias": W(name + ".b", d),
                "inv_sqrt": inv_sqrt}

    gelu = {"kind": "poly", "approximation": fit_registry("gelu", (-6, 6), degree=7).to_dict()}
    s.config = {"family": "gpt", "hidden_size": d, "num_heads": heads, "max_length": L, "causal": True,
                "embedding_norm": None, "final_norm": ln("lnf"),
                "layers": [{"pre_norm": True, "attention_norm": ln("ln1"), "mlp_norm": ln("ln2"),
                            "attn": {**{n: lin(n, d, d) for n in ("q", "k", "v", "o")},
                                     "activation": {"kind": "square"}, "scaling": "length"},
                            "mlp": {"fc_in": lin("fc1", d, 2 * d), "norm": None, "act": gelu,
                                    "fc_out": lin("fc2", 2 * d, d)}}],
                "head": {"kind": "last_token", "lm_head": {"weight": W("lm.w", d, vocab), "bias": None}}}
    return build_circuit(s, L)


# -- levels after bootstrap -------------------------------------------------------------------------------


def test_levels_after_bootstrap_chosen_from_deepest_op():
    a = _deep_inv_sqrt()
    need = approximation_depth(a) + 2
    assert need > P.default().levels_after_bootstrap
    c = _poly_circuit(a)
    X = {"x": np.random.default_rng(0).uniform(0.5, 1.5, (4, 8))}
    pl = he.plan(c, bootstrap="always", bounds=PL.calibrate_bounds(c, X))
    p = pl.params
    assert p.bootstrap and p.levels_after_bootstrap == need
    assert p.depth == need + p.bootstrap_depth and p.scale_bits >= 59
    assert p.ring_dim == 2**17 and p.security == "HEStd_128_classic"
    assert max(pl.levels.values()) <= need - 1
    assert any("chosen" in n and "poly_1" in n for n in pl.notes)
    rep = pl.report()
    assert f"levels after bootstrap {need}" in rep and "bootstrapping memory (estimate)" in rep
    # the planned circuit runs on the plain backend with no level violation and the same result
    out, be = he.run_plain(pl.circuit, X, return_backend=True)
    ref = he.run_reference(pl.circuit, X)
    k = pl.circuit.outputs[0]
    assert be.violations == [] and np.allclose(out[k], ref[k], atol=1e-9)


def test_default_levels_kept_when_ops_are_shallow():
    pl = he.plan(_poly_circuit(_cheb("tanh", (-2, 2), 7)), bootstrap="always")
    assert pl.params.levels_after_bootstrap == P.default().levels_after_bootstrap
    assert any("default" in n for n in pl.notes)


def test_tiny_transformer_with_default_newton_inv_sqrt_plans():
    """The case seen in practice: 'op poly_5 needs 20 levels but a bootstrap segment offers 8'."""
    c = _tiny_gpt()
    deepest = max(d for _, _, d in PL.op_depths(c))
    assert deepest + 2 > P.default().levels_after_bootstrap
    pl = he.plan(c, bootstrap="always")
    assert pl.params.levels_after_bootstrap == deepest + 2
    assert pl.counts["bootstrap"] >= 1 and max(pl.levels.values()) <= pl.params.levels_after_bootstrap - 1
    assert pl.bootstrap_memory_gib < P.DEFAULT_MAX_MEMORY_GIB
    # an explicit, too small value is a clear error naming the op and the value that would work
    with pytest.raises(he.PlanningError, match=rf"levels_after_bootstrap >= {deepest + 2}"):
        he.plan(c, bootstrap="always", levels_after_bootstrap=10)


def test_explicit_levels_after_bootstrap_is_used_as_given():
    a = _cheb("tanh", (-2, 2), 7)
    pl = he.plan(_poly_circuit(a), bootstrap="always", levels_after_bootstrap=8)
    assert pl.params.levels_after_bootstrap == 8 and any("requested" in n for n in pl.notes)
    d = approximation_depth(a)
    with pytest.raises(he.PlanningError, match=rf"'poly_1' \(poly\) needs {d} levels.*offers {d - 1}"):
        he.plan(_poly_circuit(a), bootstrap="always", levels_after_bootstrap=d + 1)


def test_op_deeper_than_any_secure_ring_is_a_clear_error():
    s59 = _cheb("tanh", (-2, 2), 59).stages[0]
    deep = Approximation(kind="composite_sign", stages=[s59] * 5, interval=(-2, 2), op="sign")
    d = approximation_depth(deep)
    cap = P.default(scale_bits=59).max_levels_after_bootstrap()
    assert d + 2 > cap
    with pytest.raises(he.PlanningError, match=rf"needs {d} levels.*no 128-bit secure ring allows more than {cap}"):
        he.plan(_poly_circuit(deep), bootstrap="always")
    # insecure toy parameters have no such bound (tests only)
    pl = he.plan(_poly_circuit(deep), P.toy(), bootstrap="always")
    assert pl.params.levels_after_bootstrap == d + 2


def test_secure_cap_matches_openfhe_ring_choice():
    # 59-bit scale: depth <= 20 fits N = 2^16 (measured with openfhe 1.6.1), every bootstrapped depth needs 2^17
    assert P.default(scale_bits=59, depth=20).min_secure_ring_dim() == 2**16
    assert P.default(scale_bits=59, depth=21).min_secure_ring_dim() == 2**17
    cap = P.default(scale_bits=59).max_levels_after_bootstrap()
    assert 20 <= cap <= 30
    top = P.default(scale_bits=59, depth=cap + 18)
    assert top.min_secure_ring_dim() == 2**17
    with pytest.raises(he.PlanningError):
        P.default(scale_bits=59, depth=cap + 19).min_secure_ring_dim()
    # a fixed ring bounds it further
    assert P.default(scale_bits=59, ring_dim=2**16).max_levels_after_bootstrap() == 2


def test_memory_limit_bounds_the_choice(monkeypatch):
    # the single-anchor estimate (no measured configurations): what the limit does, not what this machine measured
    costs = PL.load_cost_table(path="/nonexistent")
    a = _deep_inv_sqrt()
    c = _poly_circuit(a, slots=64)
    need = approximation_depth(a) + 2
    pl = he.plan(c, bootstrap="always", cost_table=costs)
    mem = pl.bootstrap_memory_gib
    assert pl.params.levels_after_bootstrap == need and mem > 1
    with pytest.raises(he.PlanningError, match=r"GiB, over the 1\.0 GiB limit"):
        he.plan(c, bootstrap="always", max_memory_gib=1.0, cost_table=costs)
    monkeypatch.setenv("HF_POLYHE_MAX_MEMORY_GIB", "1")
    with pytest.raises(he.PlanningError, match="GiB limit"):
        he.plan(c, bootstrap="always", cost_table=costs)
    monkeypatch.delenv("HF_POLYHE_MAX_MEMORY_GIB")
    # a shallow circuit: the default (10 levels) is lowered to fit, never below what the ops need
    sh = _poly_circuit(_cheb("tanh", (-2, 2), 7), slots=512)
    full = he.plan(sh, bootstrap="always", cost_table=costs)
    assert full.params.levels_after_bootstrap == 10
    limit = (full.bootstrap_memory_gib + he.plan(sh, bootstrap="always", levels_after_bootstrap=8, cost_table=costs).bootstrap_memory_gib) / 2
    # with the level budget fixed at [2, 2], fewer levels after each bootstrap
    fixed = P.default(auto_level_budget=False)
    low = he.plan(sh, fixed, bootstrap="always", max_memory_gib=limit, cost_table=costs)
    assert 7 <= low.params.levels_after_bootstrap < 10 and low.bootstrap_memory_gib <= limit
    assert any("memory limit" in n for n in low.notes) and low.params.level_budget == (2, 2)
    # by default the planner raises the level budget instead (fewer keys) and keeps the 10 levels
    auto = he.plan(sh, bootstrap="always", max_memory_gib=limit, cost_table=costs)
    assert auto.params.level_budget == (3, 3) and auto.params.levels_after_bootstrap == 10
    assert auto.bootstrap_memory_gib <= limit and any("level budget [3, 3]" in n for n in auto.notes)
    assert auto.params.depth == 10 + P.bootstrap_depth_for("UNIFORM_TERNARY", (3, 3))


def test_memory_estimate_matches_design_anchor_and_grows():
    a = P.BOOTSTRAP_MEMORY_ANCHOR
    p = P.default(bootstrap=True, ring_dim=a["ring_dim"], depth=a["depth"], slots=a["slots"])
    assert math.isclose(p.estimate_bootstrap_memory_gib(), a["peak_gib"])
    assert p.with_(slots=32768).estimate_bootstrap_memory_gib() > 24  # DESIGN: ran out of 24 GB
    assert p.with_(slots=4096).estimate_bootstrap_memory_gib() > 18.6  # measured: OOM-killed at 18.6 GB
    # the measured configuration does not fit the default 24 GiB limit with 20-level ops: a clear error
    deep = _poly_circuit(_deep_inv_sqrt(), slots=512)
    with pytest.raises(he.PlanningError, match="GiB limit"):
        he.plan(deep, P.default(auto_level_budget=False), bootstrap="always")
    # with the level budget left to the planner it takes more CoeffsToSlots / SlotsToCoeffs stages (fewer keys)
    pl = he.plan(deep, bootstrap="always")
    assert pl.params.level_budget in ((3, 3), (4, 4)) and pl.bootstrap_memory_gib <= P.default_max_memory_gib()
    assert p.with_(depth=30).estimate_bootstrap_memory_gib() > p.estimate_bootstrap_memory_gib()


def test_bootstrap_estimates_come_from_the_nearest_measured_configuration():
    """``benchmarks/he_ops.py --bootstrap-sweep`` rows: memory and time of a planned bootstrapped set come from the
    measurement with the same ring / level budget / digits and the nearest slots and depth, scaled from there."""
    rows = [
        {"ring_dim": 2**16, "slots": 512, "level_budget": [2, 2], "digits": 0, "depth": 20, "peak_gib": 7.4,
         "bootstrap_min_s": 10.8, "bootstrap_median_s": 11.3},
        {"ring_dim": 2**16, "slots": 4096, "level_budget": [2, 2], "digits": 0, "depth": 20, "peak_gib": 9.0,
         "bootstrap_min_s": 14.0, "bootstrap_median_s": 15.0},
        {"ring_dim": 2**16, "slots": 512, "level_budget": [3, 3], "digits": 6, "depth": 23, "peak_gib": 6.0,
         "bootstrap_min_s": 9.0, "bootstrap_median_s": 9.5},
        {"ring_dim": 2**17, "slots": 512, "level_budget": [2, 2], "digits": 0, "depth": 30, "peak_gib": 21.0,
         "over_cap": True},
        {"ring_dim": 2**16, "slots": 256, "level_budget": [2, 2], "digits": 0, "depth": 20, "refused": "insecure"},
    ]
    p = P.default(bootstrap=True, ring_dim=2**16, depth=20, slots=512)
    assert P.nearest_bootstrap_measurement(rows, p) is rows[0]
    assert math.isclose(p.estimate_bootstrap_memory_gib(rows), 7.4)  # the measured point itself
    assert P.nearest_bootstrap_measurement(rows, p.with_(slots=2048)) is rows[1]  # log2 distance: 4096 is nearer
    q = p.with_(level_budget=(3, 3), num_large_digits=6, depth=23)
    assert P.nearest_bootstrap_measurement(rows, q) is rows[2]
    # a deeper set on the same ring: the nearest row scaled by towers and keys, so more memory and time
    deep = p.with_(depth=22)
    assert deep.estimate_bootstrap_memory_gib(rows) > 7.4
    costs = {**PL.DEFAULT_COSTS, "bootstrap_measured": rows}
    assert math.isclose(PL.bootstrap_seconds(costs, p), 11.3)
    assert math.isclose(PL.bootstrap_seconds(costs, deep), 11.3 * 23 / 21)
    # over-cap rows are lower bounds, still used where nothing nearer was measured; refused rows never are
    big = P.default(bootstrap=True, ring_dim=2**17, depth=30, slots=512)
    assert P.nearest_bootstrap_measurement(rows, big) is rows[3] and big.estimate_bootstrap_memory_gib(rows) >= 21.0
    assert PL.bootstrap_seconds(costs, big) == pytest.approx(11.3 * 2 * 31 / 21)  # time from a finished row
    assert P.nearest_bootstrap_measurement([rows[4]], p) is None
    assert math.isclose(PL.bootstrap_seconds({**PL.DEFAULT_COSTS}, p), 18.0)  # no rows: the single table entry


def test_level_budget_alternatives_never_replace_a_plan_that_fits():
    """A [2, 2] plan that fits its memory limit after lowering its levels is kept when the raised budgets cannot be
    planned at all (ring 2^16, 6 digits: [3, 3] holds fewer levels than the op needs); no other error replaces it."""
    c = _poly_circuit(_cheb("tanh", (-2, 2), 2), slots=4096)
    p16 = P.default(ring_dim=2**16, num_large_digits=6)
    costs = PL.load_cost_table(path="/nonexistent")
    rows = [{"ring_dim": 2**16, "slots": 4096, "level_budget": [2, 2], "digits": 6, "depth": d, "peak_gib": g,
             "bootstrap_min_s": 18.5, "bootstrap_median_s": 18.5} for d, g in ((21, 17.0), (23, 19.2))]
    costs["bootstrap_measured"] = rows
    full = he.plan(c, p16, bootstrap="always", cost_table=costs)
    assert full.params.level_budget == (2, 2) and full.params.levels_after_bootstrap == 5
    lim = he.plan(c, p16, bootstrap="always", cost_table=costs, max_memory_gib=18.0)
    assert lim.params.level_budget == (2, 2) and 3 <= lim.params.levels_after_bootstrap < 5
    assert any("lowered to fit" in n for n in lim.notes)


def test_bootstrap_depth_for_level_budgets():
    assert P.bootstrap_depth_for("UNIFORM_TERNARY", (2, 2)) == 18  # measured
    assert P.bootstrap_depth_for("UNIFORM_TERNARY", (3, 3)) == 20  # one level per extra stage
    assert P.default(bootstrap=True, level_budget=(4, 4)).bootstrap_depth == 22
    # budgets not in the table: OpenFHE's formula from the measured [2, 2] (one level per stage)
    assert P.bootstrap_depth_for("SPARSE_TERNARY", (3, 3)) == 20
    assert P.bootstrap_depth_for("UNIFORM_TERNARY", (1, 5)) == 20
    # OpenFHE's default digits (ComputeNumLargeDigits), and no claim below the measured digit counts
    assert [P.key_switch_digits(0, d) for d in (0, 1, 3, 4, 27)] == [1, 2, 2, 3, 3]
    assert P.key_switch_digits(6, 2) == 6
    costs = {"keyswitch_digits": {"3": {"rotate": 1.0, "mul": 1.0}, "6": {"rotate": 1.2, "mul": 1.1}}}
    assert PL.digits_factor(costs, 2) == 1.0 and math.isclose(PL.digits_factor(costs, 4), 1.2 / 3 + 2 / 3)
    assert math.isclose(PL.digits_factor(costs, 9, "mul"), 1.2)
    with pytest.raises(he.PlanningError, match="level budget"):
        P.bootstrap_depth_for("UNIFORM_TERNARY", (0, 2))


def test_leveled_plans_unchanged():
    c = _poly_circuit(_cheb("gelu", (-4, 4), 7))
    pl = he.plan(c)
    assert not pl.params.bootstrap and pl.notes == [] and pl.bootstrap_memory_gib == 0.0


# -- cost model -----------------------------------------------------------------------------------------


def test_chebyshev_cost_follows_paterson_stockmeyer_not_degree():
    table = PL.DEFAULT_COSTS["cheb_mults"]
    for k, v in table.items():
        assert math.isclose(PL.cheb_mults(int(k), table), v)
    m = [PL.cheb_mults(d, table) for d in (3, 7, 11, 15, 31, 59, 119)]
    assert all(x < y for x, y in zip(m, m[1:]))
    assert m[4] / m[1] < 0.6 * 31 / 7  # far from proportional to the degree
    assert PL.cheb_mults(119, table) / PL.cheb_mults(59, table) < 1.6
    tb = PL.TraceBackend(64, 13, 0, 13, 2**16, PL.load_cost_table(path="/nonexistent"))
    assert tb.cheb_seconds(31, 0) < 2.5 * tb.cheb_seconds(7, 0)


def test_costs_depend_on_level_and_hoisting():
    costs = PL.load_cost_table(path="/nonexistent")
    tb = PL.TraceBackend(64, 13, 0, 13, 2**16, costs)
    for kind in ("rotate", "mul", "rotate_fast"):
        assert tb.unit(kind, 0) > tb.unit(kind, 6) > tb.unit(kind, 11) > 0
    assert tb.cheb_seconds(15, 0) > tb.cheb_seconds(15, 6)
    # rotate_many is hoisted like the OpenFHE backend's: cheaper than separate rotations, same keys and counts
    c = he.Circuit(8, 64)
    x = c.input("x", 8, 8)
    c.output(c.linear(x, np.random.default_rng(0).normal(size=(8, 8))))
    pl = he.plan(c, cost_table=costs)
    hoisted = pl.predicted_seconds
    flat = dict(costs, rotate_precompute=[0.0, 0.0], rotate_fast=costs["rotate"])
    assert he.plan(c, cost_table=flat).predicted_seconds > hoisted
    assert he.plan(c, cost_table=flat).counts == pl.counts


def test_bootstrap_cost_scales_with_ring():
    costs = dict(PL.load_cost_table(path="/nonexistent"), bootstrap=[30.0, 0.0], bootstrap_ring_dim=2**17)
    c = he.Circuit(8, 64)
    c.output(c.poly(c.bootstrap(c.input("x", 4, 8), 4.0), _cheb("tanh", (-2, 2), 7)))
    pl = he.plan(c, cost_table=costs)
    assert pl.params.ring_dim == 2**17 and pl.counts["bootstrap"] == 1
    assert math.isclose(pl.time_by_op["bootstrap"], 30.0, rel_tol=1e-2)  # + the 1/bound scalings


def test_cost_table_file(tmp_path):
    f = tmp_path / "costs.json"
    f.write_text(json.dumps({"mul": [1.0, 0.0], "cheb_per_degree": [1, 0], "cheb_mults": {"7": 5.0}}))
    t = PL.load_cost_table(str(f))
    assert t["mul"] == [1.0, 0.0] and t["rotate"] == PL.DEFAULT_COSTS["rotate"]
    assert "cheb_per_degree" not in t and t["cheb_mults"] == {"7": 5.0}
    f.write_text("{not json")
    with pytest.raises(he.PlanningError, match="cost table"):
        PL.load_cost_table(str(f))


def test_shipped_cost_table_is_complete():
    t = PL.load_cost_table()
    for k in ("rotate", "rotate_precompute", "rotate_fast", "mul", "mul_plain", "add_plain", "mul_scalar", "add",
              "bootstrap"):
        assert len(t[k]) == 2 and t[k][0] >= 0 and t[k][1] >= 0, k
    assert t["cheb_mults"] and all(v > 0 for v in t["cheb_mults"].values())
    assert t["ref_ring_dim"] in (2**14, 2**15, 2**16, 2**17)


def _chain(depth):
    """A leveled circuit of ``depth`` levels (plaintext products)."""
    c = he.Circuit(8, 64)
    x = c.input("x", 4, 8)
    for _ in range(depth):
        x = c.mul_plain(x, 0.9)
    c.output(x)
    return c


def test_scale_lowered_when_it_halves_the_ring():
    """29 levels do not fit 2^16 at a 50-bit scale (log QP > 1747 bits) but do at 40 bits: the planner takes the
    smaller ring and says so; with ``min_scale_bits = scale_bits`` the scale stays and the ring doubles."""
    c = _chain(28)  # depth 29 with the fresh ciphertext's first rescale
    pl = PL.plan(c, P.default(), bootstrap="never")
    assert pl.params.depth == 29 and pl.params.ring_dim == 2**16 and pl.params.scale_bits == 40
    assert any("scale lowered from 50 to 40 bits" in n for n in pl.notes)
    fixed = PL.plan(c, P.default(min_scale_bits=50), bootstrap="never")
    assert fixed.params.ring_dim == 2**17 and fixed.params.scale_bits == 50 and not fixed.notes
    # the largest scale that reaches the smallest ring wins: 11 levels fit 2^15 at 45 bits (not at 50 with the
    # safety bits), 5 levels keep 50 bits
    shallow = PL.plan(_chain(10), P.default(), bootstrap="never")
    assert shallow.params.scale_bits == 45 and shallow.params.ring_dim == 2**15
    assert PL.plan(_chain(4), P.default(), bootstrap="never").params.scale_bits == 50
    # the choice never breaks 128-bit security: the chosen set is one OpenFHE's table allows
    assert pl.params.estimate_log_qp() <= P.MAX_LOGQP_128[2**16]


def test_plan_reports_the_plaintexts_a_compile_encodes():
    """Distinct (vector, level) plaintexts, their uses, bytes (N * towers * 8 each) and predicted encoding seconds:
    a one-row 16 x 16 linear has 16 cyclic diagonals and a bias, all at the fresh level; two linears reading the
    same plaintext at the same level share it; the same plaintext one level lower is another one."""
    rng = np.random.default_rng(0)
    c = he.Circuit(16, 64)
    W = rng.normal(size=(16, 16))
    x = c.input("x", 1, 16)
    c.output(c.linear(x, W, rng.normal(size=16)))
    pl = he.plan(c, P.default(), bootstrap="never")
    N, T = pl.params.ring_dim, pl.params.depth + 1
    assert pl.plaintexts["count"] == pl.plaintexts["uses"] == 17
    assert pl.plaintexts["bytes"] == 17 * PL.plaintext_bytes(N, T) == 17 * N * T * 8
    assert pl.plaintexts["seconds"] > 0 and "plaintexts: 17 distinct" in pl.report()
    assert pl.to_dict()["plaintexts"] == pl.plaintexts
    c2 = he.Circuit(16, 64)
    x = c2.input("x", 1, 16)
    y = c2.linear(x, W)  # the same diagonals as the linear below: shared
    z = c2.linear(x, W)
    c2.output(c2.linear(c2.add(y, z), W))  # one level lower: other plaintexts
    pl2 = he.plan(c2, P.default(), bootstrap="never")
    assert pl2.plaintexts["uses"] == 48 and pl2.plaintexts["count"] == 32


def test_bsgs_split_weights_follow_the_cost_table():
    """The fixed split weights (packing.bsgs_cost; fixed so that client and server choose the same keys) agree with
    the shipped cost table to within a factor 1.5, and pick the cheaper split: 15 hoisted baby steps and 7 giant
    steps summed in the extended basis for a 128-wide one-row linear, where counting rotations alone ties with 7 + 15."""
    from hf_polyhe.he.circuit import packing as K

    t = PL.load_cost_table()
    T = 7  # towers (the MLP of issue #15)
    unit = lambda k: t[k][0] * T + t[k][1] * T * T  # noqa: E731
    rot = unit("rotate")
    for w, measured in ((K.HOIST_PRECOMPUTE, unit("rotate_precompute")), (K.HOISTED_BABY, unit("rotate_fast")),
                        (K.GIANT_STEP, unit("rotate_precompute") + unit("rotate_ext")),
                        (K.MOD_DOWN, unit("keyswitch_down"))):
        assert 1 / 1.5 < w / (measured / rot) < 1.5, (w, measured / rot)
    assert K.choose_n1_cyclic(128, 1, 1) == 16
    c = he.Circuit(128, 256)
    c.output(c.linear(c.input("x", 1, 128), np.random.default_rng(0).normal(size=(128, 128))))
    pl = he.plan(c, P.default(), bootstrap="never")
    assert pl.counts["rotate"] == 1 + 15 + 7  # the row doubling, baby and giant steps
    # the giant steps cost precompute + key switch each and one ModDown, below full rotations
    tb = PL.TraceBackend(256, 4, 0, 4, 2**16, t)
    a = [PL.TraceCt(0, True) for _ in range(7)]
    tb.rotate_sum(zip(a, range(16, 128, 16)))
    assert tb.counts["rotate"] == 7 and tb.time < 7 * tb.unit("rotate", 0)


def test_plaintext_budget(monkeypatch):
    """Half the available memory on top of what is pinned, at most 8 GiB; a bootstrapped plan keeps what its
    bootstrap will still need; the environment variable wins."""
    from hf_polyhe.he.compile import plaintexts as PT

    monkeypatch.delenv("HF_POLYHE_COMPILED_PLAINTEXTS_MIB", raising=False)
    monkeypatch.setattr(PT, "mem_available_bytes", lambda: 4.0 * 2**30)
    monkeypatch.setattr(PT, "rss_bytes", lambda: 1.0 * 2**30)
    assert PT.plaintext_budget_bytes() == 2 * 2**30
    assert PT.plaintext_budget_bytes(pinned_bytes=2**30) == 3 * 2**30
    monkeypatch.setattr(PT, "mem_available_bytes", lambda: 64.0 * 2**30)
    assert PT.plaintext_budget_bytes() == 8 * 2**30
    monkeypatch.setattr(PT, "mem_available_bytes", lambda: 4.0 * 2**30)
    boot = type("Plan", (), {"params": P.default(bootstrap=True), "bootstrap_memory_gib": 3.0})()
    assert PT.plaintext_budget_bytes(boot) == 1 * 2**30  # (4 - (3 - 1)) / 2
    monkeypatch.setenv("HF_POLYHE_COMPILED_PLAINTEXTS_MIB", "100")
    assert PT.plaintext_budget_bytes(boot) == 100 * 2**20
    monkeypatch.setenv("HF_POLYHE_COMPILED_PLAINTEXTS_MIB", "lots")
    with pytest.raises(he.PlanningError, match="COMPILED_PLAINTEXTS_MIB"):
        PT.plaintext_budget_bytes()


def test_no_secure_ring_says_whether_slots_or_modulus_is_the_limit():
    """A 128-token prompt of hidden 384 in blocks of 512 with doubled rows needs 2^17 slots: the refusal names the
    slots, not a modulus that would fit (it said "log2(QP) ~ 2343 bits exceeds ... max 3524 bits")."""
    with pytest.raises(he.PlanningError, match="131072 slots need a ring of 262144"):
        P.default().with_(slots=2**17, depth=28).min_secure_ring_dim()
    with pytest.raises(he.PlanningError, match="log2\\(QP\\)"):
        P.default().with_(slots=2**10, depth=80).min_secure_ring_dim()
    assert P.default().with_(slots=2**16, depth=28).min_secure_ring_dim() == 2**17


def test_ring_choice_keeps_bits_to_spare_for_openfhe():
    """Depth 27 at a 45-bit scale is estimated at 1760 bits, one under N = 2^16's 1761, and OpenFHE refused it
    (W1 after the Paterson-Stockmeyer change): the planner moves it off the edge."""
    from hf_polyhe.he.backends.openfhe import build_context

    p = P.default().with_(depth=27, scale_bits=45, min_scale_bits=45, slots=2**15)
    assert p.estimate_log_qp() == 1760 and p.min_secure_ring_dim() == 2**17
    assert P.default().with_(depth=27, scale_bits=40, min_scale_bits=40, slots=2**15).min_secure_ring_dim() == 2**16
    # every set near the edges that the planner now accepts, OpenFHE builds (refused ones are measured above)
    for n, scale, depth in ((2**15, 45, 11), (2**15, 50, 10), (2**15, 59, 8), (2**16, 45, 26), (2**16, 40, 29)):
        q = P.default().with_(depth=depth, scale_bits=scale, min_scale_bits=scale, slots=n // 2)
        if q.min_secure_ring_dim() == n:
            build_context(q.with_(ring_dim=n))


def _bootstrap_sweep():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bootstrap_sweep.py")
    spec = importlib.util.spec_from_file_location("bootstrap_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bootstrap_sweep_configurations_and_table():
    """The sweep's 128-bit configurations (no OpenFHE run): ring 2^16 holds 2 levels after a [2, 2] bootstrap with
    OpenFHE's 3 digits and 5 with 6, none with [3, 3] and 3 digits (refused before any child starts); its table
    names refused and stopped rows; a child that fails reports its error instead of a measurement."""
    bs = _bootstrap_sweep()
    assert bs.config_params(16, 512, 2, 0).levels_after_bootstrap == 2
    six = bs.config_params(16, 512, 2, 6)
    assert six.levels_after_bootstrap == 5 and six.depth == 5 + 18 and six.secure_ring_dim() == 2**16
    assert bs.config_params(17, 256, 4, 0).levels_after_bootstrap == bs.MAX_LEVELS
    with pytest.raises(he.PlanningError, match="no level after a bootstrap fits N=2\\^16"):
        bs.config_params(16, 512, 3, 0)
    rows = bs.sweep([16], [512], [3], [0])  # refused without a child process
    assert rows[0]["refused"] and "refused" in bs.table(rows)
    stopped = {"ring_dim": 2**16, "slots": 32768, "level_budget": [2, 2], "digits": 0, "over_cap": True,
               "peak_gib": 21.2, "cap_gib": 21.0, "depth": 20}
    assert "over the 21.0 GiB cap (stopped at 21.2 GiB)" in bs.table([stopped])
    bad = bs.run_one({"ring": 16, "slots": 512, "budget": 0, "digits": 0}, cap_gib=4.0, timeout_s=120)
    assert "failed" in bad and "level budget" in bad["failed"] and "bootstrap_min_s" not in bad


def test_spare_level_only_dropped_when_the_last_level_fits_the_first_prime():
    """A leveled chain drops its spare level only when every value at the last level is calibrated below 1/4 of what
    the first prime holds (2^(first_mod_bits - scale_bits - 1)); without bounds, or with one such value missing or too
    large, it keeps it. A lower scale leaves more room."""
    c = _chain(5)
    small = PL.calibrate_bounds(c, {"x": np.full((4, 8), 1.0)})
    assert PL.plan(c, P.default(), bootstrap="never").params.depth == 6
    assert PL.plan(c, P.default(), bootstrap="never", bounds=small).params.depth == 5
    lev, p = PL.static_levels(c), P.default().with_(depth=5)
    last = [n for n, v in lev.items() if v >= 5]
    assert last and PL.fits_first_prime(lev, 5, small, p)
    assert not PL.fits_first_prime(lev, 5, None, p)
    assert not PL.fits_first_prime(lev, 5, {k: v for k, v in small.items() if k not in last}, p)
    big = {**small, last[0]: 2.0 ** (p.first_mod_bits - p.scale_bits - 1) / PL.LAST_LEVEL_MARGIN * 1.01}
    assert not PL.fits_first_prime(lev, 5, big, p)
    assert PL.fits_first_prime(lev, 5, big, p.with_(scale_bits=45))
