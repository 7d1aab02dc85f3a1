"""Tests of hf_polyhe.approx: every registered operator against its exact function, true depth, serialisation."""

import json
import math

import numpy as np
import pytest

from hf_polyhe.approx import (
    APPROXIMATORS,
    EXACT_FUNCTIONS,
    Approximation,
    ChebyshevSeries,
    chebyshev_depth,
    fit_chebyshev,
    fit_minimax,
    fit_operator,
    register_approximator,
    remez_series,
)
from hf_polyhe.approx.base import openfhe_chebyshev_depth

# a realistic calibrated interval per operator (LayerNorm variance range for inv_sqrt, as in the paper)
INTERVALS = {
    "gelu": (-8.0, 8.0),
    "gelu_new": (-8.0, 8.0),
    "silu": (-8.0, 8.0),
    "tanh": (-4.0, 4.0),
    "exp": (-8.0, 2.0),
    "squared_relu": (-4.0, 4.0),
    "relu": (-8.0, 8.0),
    "sign": (-8.0, 8.0),
    "inv_sqrt": (1e-2, 300.0),
    "reciprocal": (0.5, 10.0),
}
OPS = sorted(APPROXIMATORS)


class LevelTracker:
    """A stand-in ciphertext that counts CKKS levels: every product (by a ciphertext or by a constant)
    costs one level, sums are free, and a Chebyshev series costs what the runtime's least-depth Paterson-Stockmeyer
    costs (checked against openfhe in test_chebyshev_depth_matches_openfhe). It also carries the plaintext value."""

    def __init__(self, value, level=0):
        self.value, self.level = np.asarray(value, dtype=np.float64), level

    @staticmethod
    def _split(other):
        return (other.value, other.level) if isinstance(other, LevelTracker) else (other, 0)

    def __add__(self, other):
        v, lv = self._split(other)
        return LevelTracker(self.value + v, max(self.level, lv))

    __radd__ = __add__

    def __sub__(self, other):
        v, lv = self._split(other)
        return LevelTracker(self.value - v, max(self.level, lv))

    def __rsub__(self, other):
        v, lv = self._split(other)
        return LevelTracker(v - self.value, max(self.level, lv))

    def __mul__(self, other):
        v, lv = self._split(other)
        return LevelTracker(self.value * v, max(self.level, lv) + 1)

    __rmul__ = __mul__

    def eval_chebyshev_series(self, series):
        return LevelTracker(series(self.value), self.level + series.depth)


def _sample(op, approx, n=20000, seed=0):
    a, b = approx.interval
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(a, b, n), [a, b]])
    if a > 0:  # wide positive ranges: sample every decade too
        x = np.concatenate([x, np.exp(rng.uniform(math.log(a), math.log(b), n))])
    if approx.kind == "composite_sign":
        x = x[np.abs(x) >= approx.meta["eps"]]
    return x


@pytest.fixture(scope="module")
def default_fits():
    return {op: fit_operator(op, INTERVALS[op]) for op in OPS}


def test_every_exact_function_has_a_fitter():
    assert set(EXACT_FUNCTIONS) <= set(APPROXIMATORS)


@pytest.mark.parametrize("op", OPS)
def test_default_fit_within_reported_error(op, default_fits):
    approx = default_fits[op]
    assert approx.op == op and approx.interval == INTERVALS[op]
    x = _sample(op, approx)
    err = np.abs(approx(x) - EXACT_FUNCTIONS[op](x))
    assert np.isfinite(approx.max_error)
    assert err.max() <= approx.max_error * (1 + 1e-6) + 1e-12
    # the reported error is attained, not a loose bound (unless it is float64 round-off, which other sample
    # points resolve differently: a few ulps of the output range)
    roundoff = 64 * np.finfo(float).eps * max(1.0, np.abs(EXACT_FUNCTIONS[op](x)).max())
    assert err.max() >= 0.9 * approx.max_error or approx.max_error <= roundoff


@pytest.mark.parametrize("op", OPS)
def test_default_fit_is_accurate(op, default_fits):
    """Defaults are useful: small error relative to the output range (sign: outside its gap)."""
    approx = default_fits[op]
    x = _sample(op, approx)
    y = EXACT_FUNCTIONS[op](x)
    assert approx.max_error <= 0.01 * (y.max() - y.min())
    if "max_rel_error" in approx.meta:
        assert approx.meta["max_rel_error"] <= 1e-3
        assert np.max(np.abs(approx(x) / y - 1)) <= approx.meta["max_rel_error"] * (1 + 1e-6)


@pytest.mark.parametrize("op", OPS)
def test_depth_is_true(op, default_fits):
    approx = default_fits[op]
    x = np.linspace(*approx.interval, 101)
    out = approx(LevelTracker(x))
    assert out.level == approx.depth
    np.testing.assert_allclose(out.value, approx(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_round_trip(op, default_fits):
    approx = default_fits[op]
    d = json.loads(json.dumps(approx.to_dict()))
    back = Approximation.from_dict(d)
    x = np.linspace(*approx.interval, 257)
    np.testing.assert_array_equal(back(x), approx(x))
    assert (back.op, back.kind, back.depth, back.degree, back.newton_steps) == (
        approx.op, approx.kind, approx.depth, approx.degree, approx.newton_steps)
    assert back.max_error == approx.max_error and back.meta == approx.meta


@pytest.mark.parametrize("op", OPS)
def test_torch_matches_numpy(op, default_fits):
    import torch
    approx = default_fits[op]
    x = np.linspace(*approx.interval, 513)
    y = approx(torch.tensor(x, dtype=torch.float64))
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), approx(x), rtol=1e-10, atol=1e-12)
    y32 = approx(torch.tensor(x, dtype=torch.float32))
    assert y32.dtype == torch.float32


@pytest.mark.parametrize("op", ["gelu", "silu", "tanh", "squared_relu", "relu"])
def test_minimax_beats_interpolation(op):
    func, iv = EXACT_FUNCTIONS[op], INTERVALS[op]
    for degree in (7, 15, 31):
        mm = fit_minimax(func, iv, degree, op=op)
        ch = fit_chebyshev(func, iv, degree, op=op)
        assert mm.max_error < ch.max_error
        assert mm.meta["method"] == "minimax" and mm.meta["remez_converged"]


def test_remez_equioscillates():
    series, info = remez_series(np.tanh, (-4, 4), 11)
    assert info["converged"]
    x = np.linspace(-4, 4, 200001)
    e = series(x) - np.tanh(x)
    assert abs(np.abs(e).max() - info["levelled_error"]) <= 1e-3 * info["levelled_error"]
    # degree n minimax error alternates sign at >= n + 2 extrema (tanh is odd: 11 -> 13 points)
    big = np.abs(e) > 0.99 * np.abs(e).max()
    runs = np.count_nonzero(np.diff(np.sign(e[big])) != 0) + 1
    assert runs >= 13


def test_relu_low_depth_methods_available():
    a = fit_operator("relu", (-8, 8), degree=15, method="chebyshev")
    b = fit_operator("relu", (-8, 8), degree=15, method="minimax")
    assert a.kind == b.kind == "chebyshev" and a.depth == b.depth == 5  # EvalChebyshevSeries: 6
    assert b.max_error < a.max_error < 0.3


def test_composite_relu_error_near_zero_bounded_by_eps():
    approx = fit_operator("relu", (-4, 4), eps=0.05)
    assert approx.meta["eps"] == 0.05 and approx.max_error <= 0.05
    x = np.linspace(-0.05, 0.05, 2001)
    assert np.max(np.abs(approx(x) - np.maximum(x, 0))) <= 0.05


def test_composite_sign_stages_stay_bounded():
    """Every stage's input stays in [-1, 1] (its series interval), also inside the gap."""
    approx = fit_operator("sign", (-10, 10), degree=13, eps=0.1)
    x = np.linspace(-10, 10, 100001)
    s = x
    for stage in approx.stages[:-1]:
        s = stage(s)
        assert np.max(np.abs(s)) <= 1 + 1e-9
    assert approx.stages[0].interval == (-10.0, 10.0)
    assert all(st.interval == (-1.0, 1.0) for st in approx.stages[1:])
    assert np.max(np.abs(approx(x))) <= 1 + approx.max_error + 1e-9


@pytest.mark.parametrize("op,target", [("gelu", 1e-3), ("tanh", 1e-4), ("exp", 1e-6)])
def test_degree_from_error_is_smallest(op, target):
    approx = fit_operator(op, INTERVALS[op], max_error=target)
    assert approx.max_error <= target
    smaller = fit_operator(op, INTERVALS[op], degree=approx.degree - 1)
    assert smaller.max_error > target


@pytest.mark.parametrize("op,target", [("relu", 0.05), ("sign", 1e-3), ("inv_sqrt", 1e-2), ("reciprocal", 1e-4)])
def test_degree_from_error_structured(op, target):
    approx = fit_operator(op, INTERVALS[op], max_error=target)
    x = _sample(op, approx)
    assert approx.max_error <= target
    assert np.max(np.abs(approx(x) - EXACT_FUNCTIONS[op](x))) <= target
    assert approx(LevelTracker(x)).level == approx.depth


def test_newton_narrow_range_needs_fewer_levels():
    wide = fit_operator("inv_sqrt", (1e-2, 300))
    narrow = fit_operator("inv_sqrt", (0.5, 4))
    assert narrow.depth < wide.depth
    fixed = fit_operator("inv_sqrt", (1e-2, 300), degree=27, newton_steps=2)
    assert fixed.stages[0].degree == 27 and fixed.newton_steps == 2 and fixed.depth == 6 + 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(op="softmax", interval=(-1, 1)), "softmax.*accepted: .*gelu"),
        (dict(op="gelu", interval=(1, -1)), r"a < b, got \[1.0, -1.0\]"),
        (dict(op="gelu", interval=(0, float("nan"))), "finite"),
        (dict(op="inv_sqrt", interval=(-1, 10)), r"positive.*\[-1.0, 10.0\]"),
        (dict(op="reciprocal", interval=(0, 10)), "positive"),
        (dict(op="relu", interval=(0.5, 8)), "around 0"),
        (dict(op="gelu", interval=(-8, 8), method="newton"), "'newton'.*accepted: chebyshev, minimax"),
        (dict(op="gelu", interval=(-8, 8), degree=0), "degree must be an integer in"),
        (dict(op="gelu", interval=(-8, 8), degree=2.5), "degree must be an integer in"),
        (dict(op="gelu", interval=(-8, 8), max_error=-1.0), "max_error must be a positive"),
        (dict(op="relu", interval=(-8, 8), degree=12), "odd degree"),
        (dict(op="relu", interval=(-8, 8), method="minimax", max_error=1e-4, max_degree=63), "max_error=0.0001.*best reached"),
        (dict(op="gelu", interval=(-8, 8), degree=5, max_error=1e-6), "at degree 5: best reached"),
    ],
)
def test_bad_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_operator(**kwargs)


def test_chebyshev_depth_table():
    # OpenFHE's documented table on a general interval; [-1, 1] saves the affine level
    expected = {1: 2, 2: 3, 3: 4, 5: 4, 6: 5, 13: 5, 14: 6, 27: 6, 28: 7, 59: 7, 60: 8, 119: 8, 120: 9, 247: 9}
    for degree, depth in expected.items():
        assert openfhe_chebyshev_depth(degree) == depth
        assert openfhe_chebyshev_depth(degree, normalized=True) == depth - 1
    # the runtime's least-depth Paterson-Stockmeyer: ceil(log2(d + 1)), plus the affine level
    ps = {1: 2, 2: 3, 3: 3, 4: 4, 7: 4, 8: 5, 15: 5, 16: 6, 31: 6, 59: 7, 63: 7, 64: 8, 127: 8, 247: 9}
    for degree, depth in ps.items():
        assert chebyshev_depth(degree) == depth <= openfhe_chebyshev_depth(degree)
        assert chebyshev_depth(degree, normalized=True) == depth - 1
    assert chebyshev_depth(0) == openfhe_chebyshev_depth(0) == 0
    with pytest.raises(ValueError, match="2031"):
        chebyshev_depth(5000)


def test_series_degree_ignores_trailing_zeros_and_openfhe_convention():
    s = ChebyshevSeries([0.5, 1.0, 0.0, 0.25, 0.0, 0.0], (-1, 1))
    assert s.degree == 3 and s.depth == chebyshev_depth(3, normalized=True)
    assert s.openfhe_coeffs() == [1.0, 1.0, 0.0, 0.25]


def test_legacy_call_and_custom_registration():
    approx = APPROXIMATORS["gelu"]((-4, 4), 15)
    assert approx.degree == 15 and approx.op == "gelu"

    @register_approximator("cube_root_like")
    def fit_cube(interval, degree=None, **kw):
        func = np.cbrt
        return fit_chebyshev(func, interval, degree or 9, op="cube_root_like")

    try:
        assert fit_operator("cube_root_like", (1, 8)).degree == 9
        assert fit_operator("cube_root_like", (1, 8), max_error=1e-4).max_error <= 1e-4
    finally:
        APPROXIMATORS.pop("cube_root_like")


# ---------------------------------------------------------------------------------------------------------
# Against the real CKKS library: depth and values of the runtime's series evaluation, of EvalChebyshevSeries and of
# whole approximations.

def _openfhe_context(depth):
    import openfhe  # a hard dependency: a broken install fails the test instead of skipping it
    p = openfhe.CCParamsCKKSRNS()
    p.SetSecurityLevel(openfhe.SecurityLevel.HEStd_NotSet)  # toy ring: tests only
    p.SetRingDim(1 << 12)
    p.SetMultiplicativeDepth(depth)
    p.SetScalingModSize(50)
    p.SetFirstModSize(60)
    p.SetScalingTechnique(openfhe.ScalingTechnique.FLEXIBLEAUTO)
    p.SetBatchSize(16)
    cc = openfhe.GenCryptoContext(p)
    for f in ("PKE", "KEYSWITCH", "LEVELEDSHE", "ADVANCEDSHE"):
        cc.Enable(getattr(openfhe.PKESchemeFeature, f))
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    return cc, keys


class OpenFHECiphertext:
    """Minimal ciphertext wrapper: what the HE runtime's wrapper must offer to run Approximation.evaluate."""

    def __init__(self, cc, ct):
        self.cc, self.ct = cc, ct

    def _wrap(self, ct):
        return OpenFHECiphertext(self.cc, ct)

    def _arg(self, other):
        return other.ct if isinstance(other, OpenFHECiphertext) else float(other)

    def __add__(self, other):
        return self._wrap(self.cc.EvalAdd(self.ct, self._arg(other)))

    __radd__ = __add__

    def __sub__(self, other):
        return self._wrap(self.cc.EvalSub(self.ct, self._arg(other)))

    def __mul__(self, other):
        return self._wrap(self.cc.EvalMult(self.ct, self._arg(other)))

    __rmul__ = __mul__

    def eval_chebyshev_series(self, series):  # what the runtime runs (OpenFHEBackend.cheb)
        from hf_polyhe.he.backends.openfhe import eval_chebyshev_ps

        return self._wrap(eval_chebyshev_ps(self.cc, self.ct, series))

    def eval_chebyshev_series_openfhe(self, series):
        a, b = series.interval
        return self._wrap(self.cc.EvalChebyshevSeries(self.ct, series.openfhe_coeffs(), a, b))

    @property
    def levels_used(self):
        # FLEXIBLEAUTO defers the last rescale: count it, so levels are settled-input to settled-output
        return self.ct.GetLevel() + self.ct.GetNoiseScaleDeg() - 1


def _encrypt(cc, keys, x):
    return OpenFHECiphertext(cc, cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(list(map(float, x)))))


def _decrypt(cc, keys, c, n):
    pt = cc.Decrypt(keys.secretKey, c.ct)
    pt.SetLength(n)
    return np.array(pt.GetRealPackedValue())


def _check_series_depth_against_openfhe(cases, depth):
    cc, keys = _openfhe_context(depth)
    rng = np.random.default_rng(0)
    for interval, degrees in cases:
        x = np.linspace(*interval, 16)
        ct = _encrypt(cc, keys, x)
        for degree in degrees:
            series = ChebyshevSeries(rng.normal(size=degree + 1) / (1 + np.arange(degree + 1)), interval)
            out = series(ct)
            assert out.levels_used == series.depth, (interval, degree)
            np.testing.assert_allclose(_decrypt(cc, keys, out, 16), series(x), atol=1e-6)
            ref = ct.eval_chebyshev_series_openfhe(series)
            assert ref.levels_used == openfhe_chebyshev_depth(series.degree, series.normalized) >= series.depth
            np.testing.assert_allclose(_decrypt(cc, keys, ref, 16), series(x), atol=1e-6)


def test_chebyshev_depth_matches_openfhe():
    _check_series_depth_against_openfhe([((-1.0, 1.0), (7, 15)), ((-4.0, 4.0), (3, 7, 15))], depth=6)


@pytest.mark.slow
def test_chebyshev_depth_matches_openfhe_every_bin():
    cases = [((-1.0, 1.0), (1, 2, 3, 5, 6, 13, 14, 27, 28, 31, 59)), ((0.5, 3.0), (1, 2, 4, 5, 6, 13, 14, 27, 28, 59))]
    _check_series_depth_against_openfhe(cases, depth=8)


@pytest.mark.slow
@pytest.mark.parametrize("op,interval", [("relu", (-8.0, 8.0)), ("inv_sqrt", (1e-2, 300.0)), ("gelu", (-8.0, 8.0))])
def test_whole_approximation_depth_matches_openfhe(op, interval):
    approx = fit_operator(op, interval)
    cc, keys = _openfhe_context(approx.depth + 1)
    x = np.linspace(*interval, 16)
    out = approx(_encrypt(cc, keys, x))
    assert out.levels_used == approx.depth
    np.testing.assert_allclose(_decrypt(cc, keys, out, 16), approx(x), atol=1e-4)
