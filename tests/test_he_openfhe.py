"""The OpenFHE backend against the plain one on circuits (toy parameters: insecure, fast; one slow 128-bit test),
and key files in parts."""


import numpy as np
import pytest

import hf_polyhe.he as he
from hf_polyhe.he import params as P

import openfhe  # noqa: E402,F401  (a hard dependency: a broken install fails instead of skipping)
from hf_polyhe.he.backends.openfhe import OpenFHEBackend, decrypt_vectors, encrypt_vectors  # noqa: E402
from hf_polyhe.he.circuit.rotations import (ComposedRotations, RotationPaths, choose_rotation_keys,  # noqa: E402
                                             rotation_base)
from hf_polyhe.he.compile.planner import calibrate_bounds  # noqa: E402
from hf_polyhe.he.runtime.keys import generate_keys  # noqa: E402

from test_he_plain import fit_operator, random_circuit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::hf_polyhe.he.errors.ToyParametersWarning")

# CKKS tolerance: leveled toy params (50-bit scale) give ~1e-9 absolute error on O(1) values; we allow 1e-6
# relative to the output's magnitude. After a bootstrap precision drops to ~1e-4..1e-3 (toy ring).
TOL = 1e-6
TOL_BOOT = 1e-2


def ckks_run(circuit, X, params, rotation_keys=None, **plan_kw):
    """Plan ``circuit``, make keys, encrypt ``X`` (name -> array), evaluate on the OpenFHE backend, decrypt:
    ``(outputs, plan)``. One process holds the secret key: a test harness for the backend, not a deployment (that
    is hf_polyhe.he.Client / Server, tests/test_encrypted.py). ``rotation_keys``: generate only these; the backend
    composes every other rotation from them."""
    pl = he.plan(circuit, params, rotation_keys=rotation_keys, **plan_kw)
    cc, kp = generate_keys(pl.params, pl.rotation_keys if rotation_keys is None else rotation_keys)
    be = OpenFHEBackend(cc, pl.params.slots)
    if rotation_keys is not None:
        be = ComposedRotations(be, RotationPaths(rotation_keys, pl.params.slots))
    ev = he.compile_evaluator(pl, be, budget_bytes=float("inf"))  # every plaintext encoded once, here
    assert ev.compiled["pinned"] == ev.compiled["distinct"] == pl.plaintexts["count"]
    lay, slots = pl.circuit.layouts(), pl.params.slots
    inputs = {n: he.Packed(lay[n], encrypt_vectors(cc, kp.publicKey, lay[n].pack(x), pl.start_level, slots))
              for n, x in X.items()}
    out = ev.run(inputs)
    # the trace foresaw every plaintext at the level OpenFHE met it: nothing was encoded during the run
    assert be.encode_stats["encoded"] == 0 and be.encode_stats["pinned"] == pl.plaintexts["uses"], be.encode_stats
    return {k: v.layout.unpack(decrypt_vectors(cc, kp.secretKey, v.cts, slots)) for k, v in out.items()}, pl


def _roundtrip(circuit, X, tol=TOL, params=None, rotation_keys=None, **plan_kw):
    got, pl = ckks_run(circuit, X, params or P.toy(), rotation_keys, **plan_kw)
    ref, be = he.run_plain(pl.circuit, X, return_backend=True)
    lay = pl.circuit.layouts()
    for k in circuit.outputs:
        err = np.abs(got[k] - ref[k])
        if lay[k].kind == "scores":
            err = err[lay[k].coverage()]
        assert err.max() <= tol * max(1.0, np.abs(ref[k]).max()), (k, err.max())
    return pl, be


@pytest.mark.parametrize("seed", range(4))
def test_random_circuits_openfhe_matches_plain(seed, tmp_path):
    rng = np.random.default_rng(100 + seed)
    c = random_circuit(rng, n_ops=5)
    X = {"x": rng.uniform(-1, 1, (5, 8)), "y": rng.uniform(-1, 1, (5, 8))}
    pl, _ = _roundtrip(c, X)  # no bounds: the chain keeps its spare level
    assert pl.params.depth == pl.depth + 1
    # with calibrated bounds the same circuits run on a chain of exactly their depth (the last level on the first
    # prime alone): still the plain values
    pl, _ = _roundtrip(c, X, bounds=calibrate_bounds(c, X))
    assert pl.params.depth == pl.depth and any("no spare level" in n for n in pl.notes)


def test_values_too_large_for_the_first_prime_keep_the_spare_level():
    """A value of ~1000 at the last level does not fit the first prime's headroom (2^(60 - 50 - 1) = 512 at the
    default 60 / 50 bits: it would decrypt as garbage); with its bounds the planner keeps the spare level and the
    value decrypts right. A value of ~10 drops it."""
    c = he.Circuit(8, 64)
    x = c.input("x", 4, 8)
    c.output(c.mul(c.mul_plain(x, 1.0), c.mul_plain(x, 1.0)))
    for scale, spare in ((32.0, True), (3.0, False)):
        X = {"x": np.full((4, 8), scale)}
        pl, _ = _roundtrip(c, X, bounds=calibrate_bounds(c, X))
        assert pl.params.depth == pl.depth + int(spare), (scale, pl.params.depth, pl.depth)


@pytest.mark.parametrize("groups", [1, 4])
def test_attention_block_openfhe(tmp_path, groups):
    rng = np.random.default_rng(7)
    c = he.Circuit(8, 64 if groups == 1 else 128, groups=groups)  # 4 groups: spread attention (R = 16 >= 2 * 5)
    x = c.input("x", 5, 8)
    mean = c.row_sum(x, 1 / 8)
    xc = c.sub(x, mean)
    q = c.linear(xc, rng.normal(size=(8, 8)) / 3)
    k, v = (c.linear(xc, rng.normal(size=(8, 8)) / 3, confine=groups > 1) for _ in range(2))
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=True)
    o = c.attn_apply(c.poly(s, fit_operator("gelu", (-4, 4), 7)), v, scale=1 / 5)
    c.output(c.select_rows(o, [4]), s)
    _roundtrip(c, {"x": rng.uniform(-1, 1, (5, 8))})


@pytest.mark.parametrize("groups", [1, 4])
def test_rotations_composed_from_a_base_of_keys(groups):
    """Keys for the signed powers of two only (circuit/rotations.py): a linear, attention and row sums (hoisted
    rotations, sums in the extended basis, plain rotations, rotations over whole row groups) still match the
    plain backend under CKKS, OpenFHE holding no other key; the plan charges the chains."""
    rng = np.random.default_rng(3)
    c = he.Circuit(8, 64 if groups == 1 else 128, groups=groups)
    x = c.input("x", 5, 8)
    xc = c.sub(x, c.row_sum(x, 1 / 8))
    q = c.linear(xc, rng.normal(size=(8, 8)) / 3)
    k, v = (c.linear(xc, rng.normal(size=(8, 8)) / 3, confine=groups > 1) for _ in range(2))
    s = c.qk_scores(q, k, heads=2, scale=0.5, causal=True)
    o = c.attn_apply(c.poly(s, fit_operator("gelu", (-4, 4), 7)), v, scale=1 / 5)
    c.output(c.linear(o, rng.normal(size=(8, 24)) / 3), s)
    full = he.plan(c, P.toy())
    keys = choose_rotation_keys(full.rotation_uses, full.params.slots)
    assert set(keys) == set(rotation_base(full.rotation_keys, full.params.slots))
    assert all(abs(k) & (abs(k) - 1) == 0 for k in keys) and len(keys) < len(full.rotation_keys)
    pl, _ = _roundtrip(c, {"x": rng.uniform(-1, 1, (5, 8))}, rotation_keys=keys)
    assert set(pl.rotation_keys) <= set(keys)
    assert pl.counts["rotate"] > full.counts["rotate"] and pl.predicted_seconds > full.predicted_seconds
    assert any("rotations composed from" in n for n in pl.notes)


@pytest.mark.parametrize("rows", [1, 5])
def test_grouped_mlp_openfhe(tmp_path, rows):
    """Stacked MLP on 4 row groups (one pass of plaintext products, group-sum rotations) under CKKS."""
    rng = np.random.default_rng(rows)
    c = he.Circuit(8, 64, groups=4)
    x = c.input("x", rows, 8)
    h = c.poly(c.linear(x, rng.normal(size=(8, 32)) / 3, rng.normal(size=32) / 4), fit_operator("gelu", (-6, 6), 7))
    y = c.linear(h, rng.normal(size=(32, 8)) / 4)
    c.output(c.linear(c.add(y, x), rng.normal(size=(8, 24)) / 3))
    pl, _ = _roundtrip(c, {"x": rng.uniform(-1, 1, (rows, 8))})
    assert pl.params.slots == 256


def test_bootstrapping_circuit(tmp_path):
    rng = np.random.default_rng(8)
    c = he.Circuit(8, 64)
    v = c.input("x", 4, 8)
    for _ in range(3):
        v = c.poly(v, fit_operator("tanh", (-2, 2), 7))
        v = c.mul_plain(v, 1.5)
    c.output(v)
    X = {"x": rng.uniform(-1, 1, (4, 8))}
    pl, be = _roundtrip(c, X, tol=TOL_BOOT, bootstrap="always", levels_after_bootstrap=9, bounds=calibrate_bounds(c, X))
    assert pl.counts["bootstrap"] >= 1 and be.violations == []


@pytest.mark.slow
def test_small_circuit_at_default_128_bit(tmp_path):
    rng = np.random.default_rng(11)
    c = he.Circuit(8, 64)
    x = c.input("x", 4, 8)
    h = c.poly(c.linear(x, rng.normal(size=(8, 8)) / 3), fit_operator("gelu", (-4, 4), 7))
    c.output(c.row_sum(c.mul(h, h), 1 / 8))
    X = rng.uniform(-1, 1, (4, 8))
    got, pl = ckks_run(c, {"x": X}, P.default())
    assert pl.params.security == "HEStd_128_classic" and pl.params.ring_dim >= 2**14
    assert np.allclose(got[c.outputs[0]], he.run_plain(c, {"x": X})[c.outputs[0]], atol=1e-5)


def test_openfhe_backend_refuses_other_pythons_clearly(monkeypatch):
    """The openfhe wheel ships a cp310 extension only: on another Python the runtime says so by name."""
    import collections
    import sys

    from hf_polyhe.he import BackendUnavailable
    from hf_polyhe.he.backends.openfhe import import_openfhe

    version = collections.namedtuple("version_info", "major minor micro releaselevel serial")
    monkeypatch.setattr(sys, "version_info", version(3, 12, 1, "final", 0))
    with pytest.raises(BackendUnavailable, match=r"needs CPython 3\.10 .* this is Python 3\.12"):
        import_openfhe()


def test_rotation_keys_in_parts_roundtrip(tmp_path, monkeypatch):
    """Key sets larger than one batch are generated and serialised part by part (a 128-bit W1 key set is ~10 GB;
    serialising it whole would hold it twice). The bundle file must load into an empty key store and run, and
    keys of another key tag in this process must survive the batched generation."""
    import torch
    from conftest import tiny_config

    import hf_polyhe
    from hf_polyhe.export import save_encrypted_pipeline
    from hf_polyhe.he import Client, Export, PlainServer, Server
    from hf_polyhe.he.runtime import keys as K

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # scratch files: none may be left here
    monkeypatch.setattr(K, "ROTATION_KEY_BATCH", 2)
    monkeypatch.setattr(K, "KEY_PARTS_MIN_GIB", 0.0)
    torch.manual_seed(0)
    model = hf_polyhe.PolyBertForSequenceClassification(tiny_config(
        "bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        attention_activation="square", hidden_act="square", norm_type="batchnorm")).eval()
    hf_polyhe.to_polynomial(model)
    save_encrypted_pipeline(model, None, tmp_path / "export", max_length=4, plan=False)
    enc = Export(tmp_path / "export")
    other = Client.keygen(enc, P.toy(), bootstrap="never", lengths=[3])
    client = Client.keygen(enc, P.toy(), bootstrap="never", lengths=[3])
    assert len(client.plan.rotation_keys) > 4  # several parts
    client.write_bundle(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "eval_automorphism_keys.bin").read_bytes().startswith(K.KEY_PARTS_MAGIC)
    assert other.key_tag in openfhe.CryptoContext.GetAllEvalAutomorphismKeys()
    openfhe.CryptoContext.ClearEvalAutomorphismKeys()  # as in a fresh server process
    server = Server(tmp_path / "bundle", spec=enc)
    assert len(server.cc.GetExistingEvalAutomorphismKeyIndices(client.key_tag)) == len(client.plan.rotation_keys)
    # parts go through unnamed scratch files (a killed key generation leaves nothing behind)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("hf_polyhe_keypart_")]
    x = enc.embed(input_ids=[5, 9, 2])
    got, ref = client.decrypt(server.run(client.encrypt(x))), PlainServer(enc).run(x).reshape(-1)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_compiled_plaintexts_are_encoded_once_within_the_budget():
    """compile_evaluator encodes each plaintext once, at the level it meets its ciphertext; runs then encode
    nothing. Over the budget, the rest are encoded when met (the LRU), with the same result."""
    rng = np.random.default_rng(5)
    c = he.Circuit(8, 16, groups=4)  # the packing in small: stacked input, slots = 2 * block
    h = c.linear(c.input("x", 1, 30), rng.normal(size=(30, 8)) / 5, rng.normal(size=8) / 4)
    c.output(c.linear(c.mul(h, h), rng.normal(size=(8, 5)) / 3, rng.normal(size=5) / 4))
    pl = he.plan(c, P.toy(), bootstrap="never")
    cc, kp = generate_keys(pl.params, pl.rotation_keys)
    X = rng.uniform(-1, 1, (1, 30))
    lay, slots = pl.circuit.layouts()["x"], pl.params.slots
    ref = he.run_plain(pl.circuit, {"x": X})[c.outputs[0]]
    n = pl.plaintexts["count"]
    assert n == pl.plaintexts["uses"] > 10 and pl.plaintexts["bytes"] > 0
    one = pl.plaintexts["bytes"] / n * 1.5  # room for one plaintext (they differ in towers only by a little)
    for budget, pinned in ((float("inf"), n), (one, 1)):
        be = OpenFHEBackend(cc, slots)
        ev = he.compile_evaluator(pl, be, budget_bytes=budget)
        assert ev.compiled["pinned"] == pinned and ev.compiled["over_budget"] == n - pinned
        assert be.pinned_bytes <= budget
        for run in range(2):
            stats = dict(be.encode_stats)
            cts = encrypt_vectors(cc, kp.publicKey, lay.pack(X), pl.start_level, slots)
            out = ev.run({"x": he.Packed(lay, cts)})[c.outputs[0]]
            got = out.layout.unpack(decrypt_vectors(cc, kp.secretKey, out.cts, slots))
            assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())
            new = {k: be.encode_stats[k] - stats[k] for k in stats}
            assert new["pinned"] == pinned  # every plaintext looked up once per run
            # over the budget: encoded by the first run, then found in the LRU
            assert new["encoded"] == (n - pinned if run == 0 else 0) and new["cached"] == (n - pinned) * run
        be.unpin()
        assert be.pinned_bytes == 0 and not be.is_pinned(np.zeros(3), 0)


def test_rotate_sum_in_the_extended_basis():
    """OpenFHEBackend.rotate_sum: rotations summed in Q*P with one KeySwitchDown, k = 0 terms and terms at another
    level added the plain way; the same sum as the plain backend, and its output at the level of its terms."""
    from hf_polyhe.he.backends.plain import PlainBackend

    p = P.toy().with_(depth=3, slots=64)
    cc, kp = generate_keys(p, [1, 5, -8, 16])
    be = OpenFHEBackend(cc, 64)
    rng = np.random.default_rng(0)
    vs = [rng.uniform(-1, 1, 64) for _ in range(5)]
    cts = encrypt_vectors(cc, kp.publicKey, vs, 0, 64)
    lower = be.mul_scalar(cts[4], 1.0)  # pending rescale: another scale degree than the others
    same = be.rotate_sum(iter([(cts[0], 1), (cts[0], 5), (cts[0], 16)]))  # one ciphertext: one precomputation
    want = sum(np.roll(vs[0], -k) for k in (1, 5, 16))
    assert np.abs(decrypt_vectors(cc, kp.secretKey, [same], 64)[0] - want).max() < 1e-6
    for ks in ([1, 5, -8, 16], [0, 5, 0, 16], [5]):
        terms = list(zip(cts, ks))
        got = decrypt_vectors(cc, kp.secretKey, [be.rotate_sum(iter(terms))], 64)[0]
        want = PlainBackend(64).rotate_sum((v, k) for v, k in zip(vs, ks))
        assert np.abs(got - want).max() < 1e-6
    mixed = be.rotate_sum(iter([(cts[0], 1), (lower, 5), (cts[1], 16)]))
    want = np.roll(vs[0], -1) + np.roll(vs[4], -5) + np.roll(vs[1], -16)
    assert np.abs(decrypt_vectors(cc, kp.secretKey, [mixed], 64)[0] - want).max() < 1e-6
    assert be.rotate_sum(iter([])) is None


def test_adopt_keeps_a_deserialised_ciphertext_and_server_inputs_are_adopted():
    """adopt(): a deserialised fresh ciphertext keeps its value, level and scale degree; one with a pending rescale
    (a KV cache read back from disk) is rescaled, as its next product would. A server adopts what it receives: the
    ciphertexts it evaluates are not the deserialised objects (those slow every operation of the first layer)."""
    from hf_polyhe.he.backends.openfhe import adopt, serialize
    from hf_polyhe.he.runtime.ciphertext import EncryptedTensor

    p = P.toy().with_(depth=3, slots=64)
    cc, kp = generate_keys(p, [1])
    v = np.random.default_rng(0).uniform(-1, 1, 64)
    fresh = encrypt_vectors(cc, kp.publicKey, [v], 0, 64)[0]
    product = cc.EvalMult(fresh, 0.5)
    for ct, want, level, degree in ((fresh, v, 0, 1), (product, 0.5 * v, 1, 1)):
        back = openfhe.DeserializeCiphertextString(serialize(ct), openfhe.BINARY)
        got = adopt(cc, back)
        assert (got.GetLevel(), got.GetNoiseScaleDeg()) == (level, degree)
        assert np.abs(decrypt_vectors(cc, kp.secretKey, [got], 64)[0] - want).max() < 1e-6
        assert np.abs(decrypt_vectors(cc, kp.secretKey, [cc.EvalAdd(got, got)], 64)[0] - 2 * want).max() < 1e-6

    class Probe(he.Server):
        def __init__(self):  # only what _tensor reads
            self.cc, self.key_tag, self.ring_dim = cc, kp.publicKey.GetKeyTag(), cc.GetRingDimension()

    layout = he.MatrixLayout(1, 8, 8, 64)
    blob = EncryptedTensor(layout, [fresh], kp.publicKey.GetKeyTag(), cc.GetRingDimension()).to_bytes()
    received = EncryptedTensor.from_bytes(blob, role="embeddings")
    t = Probe()._tensor(received)
    assert t.cts[0] is not received.cts[0] and t.cts[0].GetLevel() == 0
    assert np.abs(decrypt_vectors(cc, kp.secretKey, t.cts, 64)[0] - v).max() < 1e-6
