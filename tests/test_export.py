"""Export: the circuit of a fully polynomial model, run by the plain backend, reproduces the torch model."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

import hf_polyhe
from hf_polyhe.export import build_circuit, client_embeddings
from hf_polyhe.he import run_plain, run_reference

CASES = [
    ("gpt", hf_polyhe.PolyGPTForCausalLM, dict(hidden_act="gelu")),
    ("gpt", hf_polyhe.PolyGPTForCausalLM, dict(attention_activation="square", attention_scaling="length", hidden_act="relu")),
    ("gpt", hf_polyhe.PolyGPTForCausalLM, dict(attention_scaling="sqrt_length", attention_scaling_position="pre")),
    ("bert", hf_polyhe.PolyBertForSequenceClassification, {}),
    ("bert", hf_polyhe.PolyBertForSequenceClassification, dict(attention_scaling="length", attention_scaling_position="pre")),
    ("vit", hf_polyhe.PolyViTForImageClassification, {}),
    ("vit", hf_polyhe.PolyViTForImageClassification, dict(norm_type="poly_layernorm", attention_scaling="none")),
    ("gpt", hf_polyhe.PolyGPTForCausalLM, dict(attention_type="power")),
    ("bert", hf_polyhe.PolyBertForSequenceClassification, dict(attention_type="power", attention_power=2)),
    ("vit", hf_polyhe.PolyViTForImageClassification, dict(attention_type="power")),
]


def _poly_model(family, cls, overrides):
    model = cls(tiny_config(family, **overrides)).eval()
    hf_polyhe.to_polynomial(model, degree=15)
    return model.double()


def _only(outputs):
    assert len(outputs) == 1
    return np.asarray(next(iter(outputs.values())))


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("family,cls,overrides", CASES, ids=lambda v: str(v) if isinstance(v, str) else "")
@torch.no_grad()
def test_plain_backend_reproduces_torch(family, cls, overrides, groups):
    """Also with 4 row groups per ciphertext (replicated / stacked layouts: packing.grouped_plan)."""
    model = _poly_model(family, cls, overrides)
    if family == "vit":
        pixels = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        expected = model(pixel_values=pixels).logits[0].numpy()
        x, mask = client_embeddings(model, pixel_values=pixels), None
    else:
        ids = torch.randint(1, 97, (1, 7))
        mask = np.ones(7)
        if family == "bert":
            mask[-2:] = 0
        out = model(input_ids=ids, attention_mask=torch.tensor(mask)[None]).logits[0]
        expected = (out[-1] if family == "gpt" else out).numpy()
        x = client_embeddings(model, input_ids=ids)
    circuit = build_circuit(model, x.shape[0], attention_mask=mask, groups=groups)
    # poly LayerNorm's inv_sqrt and power-softmax's reciprocal (Newton): their input map folded into the row sum
    newton = [n.attrs["approximation"] for n in circuit.nodes
              if n.op == "poly" and n.attrs["approximation"]["kind"].startswith("newton")]
    assert all(a["stages"][0]["interval"] == [-1.0, 1.0] and "x_map" in a for a in newton)
    if overrides.get("norm_type") == "poly_layernorm" or overrides.get("attention_type") == "power":
        assert newton
    got = _only(run_plain(circuit, {"x": x})).reshape(-1)
    ref = _only(run_reference(circuit, {"x": x})).reshape(-1)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-6 * scale
    assert np.abs(ref - expected).max() <= 1e-6 * scale


@torch.no_grad()
def test_all_logits_of_causal_lm():
    model = _poly_model("gpt", hf_polyhe.PolyGPTForCausalLM, {})
    ids = torch.randint(1, 97, (1, 6))
    expected = model(input_ids=ids).logits[0].numpy()
    circuit = build_circuit(model, 6, all_logits=True)
    got = _only(run_plain(circuit, {"x": client_embeddings(model, input_ids=ids)}))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


def test_export_refuses_non_polynomial_and_unsupported():
    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt")).eval()
    with pytest.raises(ValueError, match="not fully polynomial; offending operators: transformer.h.0"):
        build_circuit(model, 4)
    soft = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt", attention_type="softmax")).eval()
    with pytest.raises(ValueError, match=r"offending operators: .*transformer.h.0.attn \(softmax, exact\)"):
        build_circuit(soft, 4)  # softmax has no polynomial form (to_polynomial refuses it too)
    train_mode = hf_polyhe.to_polynomial(hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt")))
    with pytest.raises(ValueError, match="eval"):
        build_circuit(train_mode.train(), 4)


# ---------------------------------------------------------------- saved pipeline directory
from hf_polyhe.export import save_encrypted_pipeline  # noqa: E402
from hf_polyhe.he import CircuitError  # noqa: E402
from hf_polyhe.he import Client, Export, PlainServer  # noqa: E402
from hf_polyhe.he.runtime.client import sample_next_token  # noqa: E402


@torch.no_grad()
def test_saved_pipeline_generation_matches_generate(tmp_path):
    model = _poly_model("gpt", hf_polyhe.PolyGPTForCausalLM, dict(hidden_act="gelu")).float()
    save_encrypted_pipeline(model, None, tmp_path, max_length=16)
    assert not any("secret" in p.name for p in tmp_path.rglob("*"))
    enc = Export(tmp_path)
    assert enc.meta["task"] == "encrypted-text-generation" and enc.max_length == 16
    prompt = torch.randint(1, 97, (1, 5))
    client = Client.plain(enc)
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, do_sample=False, pad_token_id=0)
    for use_cache in (True, False):  # the KV-cache streams and the full re-run per token agree with torch
        ids, info = client.generate(client.server(), prompt[0].tolist(), max_new_tokens=7, use_cache=use_cache)
        assert ids == ref[0].tolist() and info["new_tokens"] == 7 and not info["encrypted"]
    with pytest.raises(ValueError, match="exceeds the export's max_length 16"):
        client.generate(client.server(), list(range(1, 12)), max_new_tokens=6)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            client.generate(client.server(), [1, 2], max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        enc.embed([1, 200])


@pytest.mark.parametrize("family,cls", [("bert", hf_polyhe.PolyBertForSequenceClassification),
                                        ("vit", hf_polyhe.PolyViTForImageClassification)])
@torch.no_grad()
def test_saved_pipeline_classifiers_match_torch(tmp_path, family, cls):
    model = _poly_model(family, cls, {})
    save_encrypted_pipeline(model, None, tmp_path)
    enc = Export(tmp_path)
    assert enc.meta["id2label"]["0"] == "LABEL_0"
    if family == "bert":
        ids = torch.randint(1, 97, (1, 6))
        expected = model(input_ids=ids).logits[0].numpy()
        x = enc.embed(input_ids=ids[0].numpy())
    else:
        pixels = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        expected = model(pixel_values=pixels).logits[0].numpy()
        x = enc.embed(pixel_values=pixels.numpy())
    got = PlainServer(enc).run(x).reshape(-1)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
    if family == "vit":  # one ciphertext, one image: a batch of two is refused, not silently cut to its first
        with pytest.raises(ValueError, match="batch of 2 images"):
            enc.embed(pixel_values=np.concatenate([pixels.numpy()] * 2))


def test_export_writes_the_128bit_plan(tmp_path, monkeypatch):
    """pipeline.json describes both parts and carries the planner's numbers; plan.txt is the readable report."""
    import json

    from hf_polyhe.he import params as P
    from hf_polyhe.he import plan_for_export

    model = hf_polyhe.PolyViTForImageClassification(tiny_config(
        "vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        attention_activation="square", norm_type="batchnorm")).eval()
    hf_polyhe.to_polynomial(model, degree=7)  # shallow enough for a leveled 128-bit plan
    save_encrypted_pipeline(model, None, tmp_path)
    meta = json.loads((tmp_path / "pipeline.json").read_text())
    assert "spec.json" in meta["files"]["server"] and "embeddings.safetensors" in meta["files"]["client"]
    assert "spec_weights.safetensors" in meta["files"]["server"] and (tmp_path / "config.json").exists()
    plan = plan_for_export(Export(tmp_path), P.default())
    overview = meta["plan"]
    assert overview["security"] == "HEStd_128_classic" and overview["ring_dim"] == plan.params.ring_dim >= 2**15
    assert overview["depth"] == plan.params.depth and overview["rotation_keys"] == len(plan.rotation_keys)
    full = overview["circuits"]["full"]
    assert full["counts"] == plan.summary["full"]["counts"] and full["predicted_seconds"] > 0
    text = (tmp_path / "plan.txt").read_text()
    assert "HEStd_128_classic" in text and f"ring 2^{plan.params.ring_dim.bit_length() - 1}" in text
    # the predicted server fits the default limit; under a smaller one the report says what takes the memory
    from hf_polyhe.he.compile.export_plan import memory_over_limit, plan_report

    assert overview["over_memory_limit"] is None and "WARNING" not in text
    over = memory_over_limit(plan, 0.5)
    assert over.startswith("a server needs") and f"{len(plan.rotation_keys)} rotation keys" in over
    monkeypatch.setenv("HF_POLYHE_MAX_MEMORY_GIB", "0.5")
    assert "WARNING: a server needs" in plan_report(plan) and "over the 0.5 GiB limit" in plan_report(plan)
    with pytest.warns(UserWarning, match="does not fit in memory"):  # and the export says so when it is written
        save_encrypted_pipeline(model, None, tmp_path / "small")
    assert json.loads((tmp_path / "small" / "pipeline.json").read_text())["plan"]["over_memory_limit"]
    monkeypatch.delenv("HF_POLYHE_MAX_MEMORY_GIB")
    save_encrypted_pipeline(model, None, tmp_path / "unplanned", plan=False)
    assert not (tmp_path / "unplanned" / "plan.txt").exists()


def test_export_without_a_128bit_plan_says_why(tmp_path, monkeypatch):
    import json

    import hf_polyhe.he.compile.export_plan as km
    from hf_polyhe.he import PlanningError

    def too_deep(*a, **k):
        raise PlanningError("log2(QP) exceeds every 128-bit secure parameter set")

    monkeypatch.setattr(km, "plan_for_export", too_deep)
    model = _poly_model("vit", hf_polyhe.PolyViTForImageClassification, {}).float()
    save_encrypted_pipeline(model, None, tmp_path)  # the export itself still succeeds
    assert json.loads((tmp_path / "pipeline.json").read_text())["plan"]["error"].startswith("log2(QP) exceeds")
    assert (tmp_path / "plan.txt").read_text().startswith("No 128-bit CKKS plan for this export: log2(QP)")


def test_saved_pipeline_refuses_bad_directories(tmp_path):
    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt")).eval()
    with pytest.raises(ValueError, match="not fully polynomial"):
        save_encrypted_pipeline(model, None, tmp_path / "x")
    with pytest.raises(CircuitError, match="not an encrypted pipeline export"):
        Export(tmp_path)
    hf_polyhe.to_polynomial(model)
    save_encrypted_pipeline(model, None, tmp_path / "ok", max_length=8)
    meta = (tmp_path / "ok" / "pipeline.json").read_text().replace('"version": 1', '"version": 99')
    (tmp_path / "ok" / "pipeline.json").write_text(meta)
    with pytest.raises(CircuitError, match="version 99 is not supported"):
        Export(tmp_path / "ok")
    (tmp_path / "ok" / "pipeline.json").write_text(meta.replace('"version": 99', '"version": 1').replace(
        '"server": "server"', '"server": "../../etc"'))
    with pytest.raises(CircuitError, match="points outside the export"):
        Export(tmp_path / "ok")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an export"):  # never replaces a directory that is not an export
        save_encrypted_pipeline(model, None, tmp_path / "stuff", max_length=8)
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_sampling_is_client_side_and_respects_top_k():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert sample_next_token(logits) == 1
    rng = np.random.default_rng(0)
    draws = {sample_next_token(logits, do_sample=True, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, do_sample=True, temperature=0)


@pytest.mark.parametrize("family,hidden,heads", [("bert", 48, 3), ("gpt", 96, 3)])
@torch.no_grad()
def test_hidden_sizes_that_are_not_powers_of_two(tmp_path, family, hidden, heads):
    """LayerNorm over d = 48 / 96 features in blocks of 64 / 128 (as 384 in 512 for a MiniLM-size encoder): the
    mean is spread over the valid columns only, so the variance's row sum reads zero padding; exact against
    torch, and the export plans."""
    import warnings

    from hf_polyhe.export import calibrate_ranges
    from hf_polyhe.he import params as P
    from hf_polyhe.he import plan_for_export

    cls = hf_polyhe.PolyBertForSequenceClassification if family == "bert" else hf_polyhe.PolyGPTForCausalLM
    model = cls(tiny_config(family, hidden_size=hidden, num_attention_heads=heads, intermediate_size=2 * hidden,
                            attention_activation="gelu", norm_type="poly_layernorm")).eval()
    ids = torch.randint(1, 97, (1, 8))
    hf_polyhe.to_polynomial(model, ranges=calibrate_ranges(model, [{"input_ids": torch.randint(1, 97, (8, 8))}]),
                            degree=15)
    save_encrypted_pipeline(model, None, tmp_path, max_length=8, plan=False)
    enc = Export(tmp_path)
    logits = model.double()(input_ids=ids).logits[0]
    expected = (logits[-1] if family == "gpt" else logits).numpy()
    got = PlainServer(enc).run(enc.embed(input_ids=ids[0].numpy())).reshape(-1)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_for_export(enc, P.toy(), lengths=[8], kv_cache=False)
    assert plan.summary["full"]["counts"]["rotate"] > 0
