"""OpenFHE backend and Client/Server roles (toy parameters: insecure, fast; one slow 128-bit test)."""

import os
import types

import numpy as np
import pytest

import hf_polyhe.he as he
from hf_polyhe.he import params as P

import openfhe  # noqa: E402,F401  (a hard dependency: a broken install fails instead of skipping)
from hf_polyhe.he.roles import Client, EncryptedTensor, Server  # noqa: E402
from hf_polyhe.he.planner import calibrate_bounds  # noqa: E402

from test_he_plain import fit_operator, random_circuit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::hf_polyhe.he.errors.ToyParametersWarning")

# CKKS tolerance: leveled toy params (50-bit scale) give ~1e-9 absolute error on O(1) values; we allow 1e-6
# relative to the output's magnitude. After a bootstrap precision drops to ~1e-4..1e-3 (toy ring).
TOL = 1e-6
TOL_BOOT = 1e-2


def _roundtrip(circuit, X, tmp_path, tol=TOL, **plan_kw):
    client = Client.generate(circuit, P.toy(), **plan_kw)
    client.export_server_bundle(tmp_path / "server")
    server = Server(tmp_path / "server")
    enc = {n: client.encrypt(n, x).to_bytes() for n, x in X.items()}
    out = server.run(enc)
    ref, be = he.run_plain(client.plan.circuit, X, return_backend=True)
    lay = client.plan.circuit.layouts()
    for k in circuit.outputs:
        got = client.decrypt(out[k].to_bytes())
        err = np.abs(got - ref[k])
        if lay[k].kind == "scores":
            err = err[lay[k].coverage()]
        assert err.max() <= tol * max(1.0, np.abs(ref[k]).max()), (k, err.max())
    return client, server, be


@pytest.mark.parametrize("seed", range(4))
def test_random_circuits_openfhe_matches_plain(seed, tmp_path):
    rng = np.random.default_rng(100 + seed)
    c = random_circuit(rng, n_ops=5)
    _roundtrip(c, {"x": rng.uniform(-1, 1, (5, 8)), "y": rng.uniform(-1, 1, (5, 8))}, tmp_path)


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
    _roundtrip(c, {"x": rng.uniform(-1, 1, (5, 8))}, tmp_path)


@pytest.mark.parametrize("rows", [1, 5])
def test_grouped_mlp_openfhe(tmp_path, rows):
    """Stacked MLP on 4 row groups (one pass of plaintext products, group-sum rotations) under CKKS."""
    rng = np.random.default_rng(rows)
    c = he.Circuit(8, 64, groups=4)
    x = c.input("x", rows, 8)
    h = c.poly(c.linear(x, rng.normal(size=(8, 32)) / 3, rng.normal(size=32) / 4), fit_operator("gelu", (-6, 6), 7))
    y = c.linear(h, rng.normal(size=(32, 8)) / 4)
    c.output(c.linear(c.add(y, x), rng.normal(size=(8, 24)) / 3))
    client, _, _ = _roundtrip(c, {"x": rng.uniform(-1, 1, (rows, 8))}, tmp_path)
    assert client.plan.params.slots == 256


def test_bootstrapping_circuit(tmp_path):
    rng = np.random.default_rng(8)
    c = he.Circuit(8, 64)
    v = c.input("x", 4, 8)
    for _ in range(3):
        v = c.poly(v, fit_operator("tanh", (-2, 2), 7))
        v = c.mul_plain(v, 1.5)
    c.output(v)
    X = {"x": rng.uniform(-1, 1, (4, 8))}
    client, _, be = _roundtrip(c, X, tmp_path, tol=TOL_BOOT, bootstrap="always", levels_after_bootstrap=9,
                               bounds=calibrate_bounds(c, X))
    assert client.plan.counts["bootstrap"] >= 1 and be.violations == []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(9)
    c = he.Circuit(8, 64)
    x = c.input("x", 4, 8)
    c.output(c.mul(c.linear(x, rng.normal(size=(8, 8))), x))
    client = Client.generate(c, P.toy())
    d = tmp_path_factory.mktemp("bundle")
    client.export_server_bundle(d)
    client.save(tmp_path_factory.mktemp("client"))
    return c, client, d


def test_server_bundle_and_object_hold_no_secret_key(small):
    c, client, d = small
    sk = openfhe.Serialize(client.keypair.secretKey, openfhe.BINARY)
    # windows of the secret key's coefficient data: none may appear in any server file
    body = sk[len(sk) // 4 :]
    probes = [body[i : i + 48] for i in range(0, len(body) - 48, max(1, len(body) // 16))]
    for root, _, files in os.walk(d):
        for f in files:
            data = open(os.path.join(root, f), "rb").read()
            assert not any(p in data for p in probes), f
            assert b"PrivateKey" not in data and b"secret" not in data.lower() or f.endswith(".json")
    assert not any("secret" in f for _, _, fs in os.walk(d) for f in fs)
    server = Server(d)
    seen, stack = set(), [server]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType)):
            continue
        seen.add(id(o))
        assert not isinstance(o, openfhe.PrivateKey) and not hasattr(o, "secretKey"), type(o)
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())


def test_bad_inputs_are_clear_errors(small, tmp_path):
    c, client, d = small
    server = Server(d)
    X = np.random.default_rng(0).uniform(-1, 1, (4, 8))
    blob = client.encrypt("x", X).to_bytes()
    with pytest.raises(he.SerializationError):
        server.run({"x": blob[:-10]})
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(he.SerializationError, match="corrupted"):
        server.run({"x": bytes(bad)})
    with pytest.raises(he.SerializationError, match="magic"):
        server.run({"x": b"garbage" * 10})
    other = Client.generate(c, P.toy())  # same circuit and params, another secret key
    with pytest.raises(he.KeyMismatchError):
        server.run({"x": other.encrypt("x", X).to_bytes()})
    with pytest.raises(he.LayoutError):
        client.encrypt("x", np.ones((5, 8)))
    with pytest.raises(he.CircuitError, match="unknown input"):
        server.run({"z": blob})
    wrong = he.Circuit(8, 64)
    wrong.output(wrong.input("x", 3, 8))
    t = EncryptedTensor.from_bytes(blob)
    t.layout = wrong.layouts()["x"]
    with pytest.raises(he.LayoutError):
        server.run({"x": t})
    y = client.decrypt(server.run({"x": blob})[c.outputs[0]])
    assert np.allclose(y, he.run_plain(c, {"x": X})[c.outputs[0]], atol=1e-6)


def test_client_save_load(small, tmp_path):
    c, client, d = small
    client.save(tmp_path / "cl")
    c2 = Client.load(tmp_path / "cl")
    X = np.random.default_rng(1).uniform(-1, 1, (4, 8))
    out = Server(d).run({"x": c2.encrypt("x", X)})
    assert np.allclose(client.decrypt(out[c.outputs[0]]), he.run_plain(c, {"x": X})[c.outputs[0]], atol=1e-6)


@pytest.mark.slow
def test_small_circuit_at_default_128_bit(tmp_path):
    rng = np.random.default_rng(11)
    c = he.Circuit(8, 64)
    x = c.input("x", 4, 8)
    h = c.poly(c.linear(x, rng.normal(size=(8, 8)) / 3), fit_operator("gelu", (-4, 4), 7))
    c.output(c.row_sum(c.mul(h, h), 1 / 8))
    client = Client.generate(c, P.default())
    assert client.plan.params.security == "HEStd_128_classic" and client.cc.GetRingDimension() >= 2**14
    client.export_server_bundle(tmp_path / "s")
    X = rng.uniform(-1, 1, (4, 8))
    out = Server(tmp_path / "s").run({"x": client.encrypt("x", X).to_bytes()})
    assert np.allclose(client.decrypt(out[c.outputs[0]]), he.run_plain(c, {"x": X})[c.outputs[0]], atol=1e-5)


def test_openfhe_backend_refuses_other_pythons_clearly(monkeypatch):
    """The openfhe wheel ships a cp310 extension only: on another Python the runtime says so by name."""
    import collections
    import sys

    from hf_polyhe.he import BackendUnavailable
    from hf_polyhe.he.backends.openfhe_backend import import_openfhe

    version = collections.namedtuple("version_info", "major minor micro releaselevel serial")
    monkeypatch.setattr(sys, "version_info", version(3, 12, 1, "final", 0))
    with pytest.raises(BackendUnavailable, match=r"needs CPython 3\.10 .* this is Python 3\.12"):
        import_openfhe()


def test_rotation_keys_in_parts_roundtrip(tmp_path, monkeypatch):
    """Key sets larger than one batch are generated and serialised part by part (a 128-bit W1 key set is ~10 GB;
    serialising it whole would hold it twice). The bundle file must load into an empty key store and run, and
    keys of another key tag in this process must survive the batched generation."""
    import openfhe as ofhe

    from hf_polyhe.he import roles

    monkeypatch.setattr(roles, "ROTATION_KEY_BATCH", 2)
    monkeypatch.setattr(roles, "KEY_PARTS_MIN_GIB", 0.0)
    rng = np.random.default_rng(11)
    other = Client.generate(_small_linear(rng), P.toy())
    other_tag = other.key_tag
    c = he.Circuit(8, 64)
    x = c.input("x", 5, 8)
    s = c.qk_scores(c.linear(x, rng.normal(size=(8, 8)) / 3), c.linear(x, rng.normal(size=(8, 8)) / 3), heads=2)
    c.output(c.attn_apply(s, x, scale=0.2))
    client = Client.generate(c, P.toy())
    assert len(client.plan.rotation_keys) > 4  # several parts
    path = tmp_path / "server" / "eval_automorphism_keys.bin"
    client.export_server_bundle(tmp_path / "server")
    assert path.read_bytes().startswith(roles.KEY_PARTS_MAGIC)
    assert other_tag in ofhe.CryptoContext.GetAllEvalAutomorphismKeys()
    ofhe.CryptoContext.ClearEvalAutomorphismKeys()  # as in a fresh server process
    server = Server(tmp_path / "server")
    assert len(server.cc.GetExistingEvalAutomorphismKeyIndices(client.key_tag)) == len(client.plan.rotation_keys)
    X = rng.uniform(-1, 1, (5, 8))
    got = client.decrypt(server.run({"x": client.encrypt("x", X).to_bytes()})[c.outputs[0]].to_bytes())
    ref = he.run_plain(client.plan.circuit, {"x": X})[c.outputs[0]]
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


def _small_linear(rng):
    c = he.Circuit(8, 64)
    c.output(c.linear(c.input("x", 2, 8), rng.normal(size=(8, 8))))
    return c
