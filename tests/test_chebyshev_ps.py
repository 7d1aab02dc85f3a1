"""The least-depth Paterson-Stockmeyer evaluation (hf_polyhe/he/backends/chebyshev.py): exact on numpy, the
minimal depth ceil(log2(degree + 1)) for every degree -- what the planner counts (chebyshev_depth) -- and the same
depth and values under CKKS (toy ring), where the runtime's poly op runs it (OpenFHEBackend.cheb)."""

import math

import numpy as np
import pytest

from hf_polyhe.approx.base import ChebyshevSeries, chebyshev_depth, openfhe_chebyshev_depth
from hf_polyhe.approx.chebyshev import fit_chebyshev
from hf_polyhe.approx.functions import EXACT_FUNCTIONS
from hf_polyhe.he.backends.chebyshev import DepthArithmetic, NumpyArithmetic, evaluate_ps, ps_schedule


@pytest.mark.parametrize("degree", list(range(1, 34)) + [59, 63, 64, 119, 127])
def test_ps_is_exact_in_the_least_depth(degree):
    rng = np.random.default_rng(degree)
    c = rng.normal(size=degree + 1)
    s = ps_schedule(c)
    t = np.linspace(-1, 1, 257)
    ar = NumpyArithmetic()
    got = evaluate_ps(ar, t, c, s)
    assert np.abs(got - ChebyshevSeries(c, (-1, 1)).evaluate(t)).max() < 1e-12 * np.abs(c).sum()
    assert s.depth == math.ceil(math.log2(degree + 1)) and ar.products == s.products
    assert evaluate_ps(DepthArithmetic(), 0, c, s) == s.depth
    assert chebyshev_depth(degree, normalized=True) == s.depth == ChebyshevSeries(c, (-1, 1)).depth
    # EvalChebyshevSeries' depth on [-1, 1]: never less, one more at 2^j - 1 (7, 15, 31, 63, 127 ...)
    assert openfhe_chebyshev_depth(degree, normalized=True) >= s.depth
    if degree in (7, 15, 31, 63, 127):
        assert openfhe_chebyshev_depth(degree, normalized=True) == s.depth + 1


def test_ps_product_counts_and_zero_coefficients():
    """Degree 15: 8 products in 4 levels; degree 59: 16 in 6. An odd function (tanh) skips the even terms."""
    rng = np.random.default_rng(0)
    assert (ps_schedule(rng.normal(size=16)).products, ps_schedule(rng.normal(size=60)).products) == (8, 16)
    odd = fit_chebyshev(EXACT_FUNCTIONS["tanh"], (-8, 8), 59).stages[0]
    s = ps_schedule(odd.coeffs)
    assert s.degree == 59 and s.depth == 6 and s.products < 16
    t = np.linspace(-1, 1, 101)
    assert np.abs(evaluate_ps(NumpyArithmetic(), t, odd.coeffs) - odd.evaluate(t * 8)).max() < 1e-12
    assert ps_schedule([0.5]).degree == 0 and evaluate_ps(NumpyArithmetic(), t, [0.5])[3] == 0.5


@pytest.mark.filterwarnings("ignore::hf_polyhe.he.errors.ToyParametersWarning")
def test_ps_under_ckks_spends_what_it_says():
    """OpenFHEBackend.cheb (the runtime's poly op) at degree 15 (tanh on [-8, 8] and [-1, 1]): EvalChebyshevSeries'
    values in the depth the planner counts, one level less than EvalChebyshevSeries (the affine map onto [-1, 1]
    costs one more on [-8, 8])."""
    from hf_polyhe.he import params as P
    from hf_polyhe.he.backends.openfhe import OpenFHEBackend, decrypt_vectors, encrypt_vectors
    from hf_polyhe.he.runtime.keys import generate_keys

    p = P.toy().with_(depth=8, slots=64)
    cc, kp = generate_keys(p, [])
    be = OpenFHEBackend(cc, 64)
    for lo, hi in ((-8.0, 8.0), (-1.0, 1.0)):
        x = np.linspace(lo, hi, 64)
        ct = encrypt_vectors(cc, kp.publicKey, [x], 0, 64)[0]
        s = fit_chebyshev(EXACT_FUNCTIONS["tanh"], (lo, hi), 15).stages[0]
        ps, ref = be.cheb(ct, s), be.cheb_openfhe(ct, s)
        level = lambda c: c.GetLevel() + c.GetNoiseScaleDeg() - 1  # noqa: E731  (settled)
        affine = int(not s.normalized)
        assert level(ps) == ps_schedule(s.coeffs).depth + affine == s.depth
        assert level(ref) == openfhe_chebyshev_depth(s.degree, s.normalized) == s.depth + 1
        got = decrypt_vectors(cc, kp.secretKey, [ps], 64)[0]
        assert np.abs(got - s.evaluate(x)).max() < 1e-6


@pytest.mark.parametrize("degree", [3, 8, 15, 27, 31, 59])
def test_ps_under_ckks_on_a_chain_of_exactly_its_depth(degree):
    """A series that is neither odd nor even (GELU on [-6, 6]), on a modulus chain of exactly ``s.depth`` levels (what
    the planner now gives a leveled circuit: no spare level) and, once more, from a ciphertext that arrives with a
    pending rescale: the values match the series, and the basis elements settled and aligned once (the runtime's
    savings) change nothing but time."""
    from hf_polyhe.he import params as P
    from hf_polyhe.he.backends.openfhe import OpenFHEBackend, decrypt_vectors, encrypt_vectors
    from hf_polyhe.he.runtime.keys import generate_keys

    s = fit_chebyshev(EXACT_FUNCTIONS["gelu"], (-6.0, 6.0), degree).stages[0]
    x = np.linspace(-6.0, 6.0, 64)
    for pending in (False, True):
        p = P.toy().with_(depth=s.depth + int(pending), slots=64)
        cc, kp = generate_keys(p, [])
        be = OpenFHEBackend(cc, 64)
        ct = encrypt_vectors(cc, kp.publicKey, [x], 0, 64)[0]
        if pending:
            ct = cc.EvalMult(ct, 1.0)  # a product's output: its rescale is still to do
            assert ct.GetNoiseScaleDeg() == 2
        got = decrypt_vectors(cc, kp.secretKey, [be.cheb(ct, s)], 64)[0]
        assert np.abs(got - s.evaluate(x)).max() < 1e-5 * max(1.0, np.abs(s.evaluate(x)).max())
