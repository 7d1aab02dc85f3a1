"""Issue #16: no NaN from range drift.

A polynomial fitted on a range the model later leaves diverges (NaN logits in plaintext, silent garbage under
encryption). These tests rebuild the recipe's failure on a tiny PolyGPT -- layer 0's ``inv_sqrt`` fitted on the
variances of the first batches while the embedding rows of other tokens are larger (what training does to them)
-- and check every defence: calibration with exact operators and the whole embedding table, ``refit_drifted_
operators``, ``polynomial_status(model, data)`` with its ``OutOfIntervalWarning``, the export's refusal and the
callback's handling of an operator that saw no input."""

import copy
import warnings

import pytest
import torch
from conftest import tiny_config
from torch import nn

import hf_polyhe
from hf_polyhe.nn import PolyOperator
from hf_polyhe.status import select_operators
from hf_polyhe.training import (
    DEFAULT_MARGIN,
    PolyReplacementCallback,
    RangeTracker,
    calibrate,
    margin_for,
    refit_drifted_operators,
    widen_interval,
)

FIRST_NORM = "transformer.h.0.attention_norm.inv_sqrt"


def drifted_gpt():
    """A tiny polynomial-LayerNorm PolyGPT whose tokens 48..96 have 4x larger embedding rows than tokens 1..31."""
    cfg = tiny_config("gpt", norm_type="poly_layernorm", attention_type="pointwise", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, use_cache=False)
    model = hf_polyhe.PolyGPTForCausalLM(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[48:].mul_(4.0)
    return model


def narrow_batches(n=2):
    return [{"input_ids": torch.randint(1, 32, (4, 16))} for _ in range(n)]


def other_batches(n=2):
    return [{"input_ids": torch.randint(48, 97, (4, 16))} for _ in range(n)]


def fit_on_narrow_ranges(model, batches):
    """What the callback did at step 1: fit every operator on the ranges the first batches reach (tracker only)."""
    with RangeTracker(model) as tracker, torch.no_grad():
        for b in batches:
            model(**b)
    ops = select_operators(model)
    ranges = {p: widen_interval(ops[p].op, r.lo, r.hi, margin_for(DEFAULT_MARGIN, ops[p]))
              for p, r in tracker.ranges().items()}
    return hf_polyhe.to_polynomial(model, ranges=ranges)


@torch.no_grad()
def logits(model, batches):
    return torch.cat([model(**b).logits for b in batches])


def test_narrow_first_norm_gives_nan_and_refit_with_exact_operators_repairs_it():
    model = drifted_gpt()
    narrow, other = narrow_batches(), other_batches()
    exact = logits(model, other)
    fit_on_narrow_ranges(model, narrow)
    assert torch.isfinite(logits(model, narrow)).all()
    assert not torch.isfinite(logits(model, other)).all()  # the issue: NaN on other text
    refit = refit_drifted_operators(model, other)
    assert FIRST_NORM in refit
    got = logits(model, other)
    assert torch.isfinite(got).all()
    # measured: 2.8e-5 against logits of magnitude ~3 (degree-15 inv_sqrt + Newton, gelu/relu fits)
    assert (got - exact).abs().max() <= 1e-3 * exact.abs().max()
    assert all(op.mode == "poly" for op in select_operators(model).values())


def test_calibration_covers_the_embedding_table():
    """to_polynomial(calibration_data=) on batches of a few tokens still fits the first norm on every (token,
    position) the tables can produce: on other text its inputs stay inside its interval. (The later norms read the
    residual stream, which carries the embeddings too: their ranges come from data -- what refit_drifted_operators
    on representative data, or the callback's refit at the end of training, are for.)"""
    model = drifted_gpt()
    other = other_batches()
    table = hf_polyhe.training.embedding_table_ranges(model)
    assert list(table) == [FIRST_NORM]
    # the table's range is the variance of every wte[t] + wpe[p], computed directly
    e = model.transformer.wte.weight[:, None, :] + model.transformer.wpe.weight[None, :, :]
    var = e.var(-1, unbiased=False).detach().double() + model.transformer.h[0].attention_norm.eps
    assert table[FIRST_NORM].lo == pytest.approx(float(var.min()), rel=1e-6)
    assert table[FIRST_NORM].hi == pytest.approx(float(var.max()), rel=1e-6)
    assert table[FIRST_NORM].count == var.numel()
    hf_polyhe.to_polynomial(model, calibration_data=narrow_batches())
    lo, hi = select_operators(model)[FIRST_NORM].interval
    assert lo <= table[FIRST_NORM].lo and table[FIRST_NORM].hi <= hi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf_polyhe.OutOfIntervalWarning)
        status = hf_polyhe.polynomial_status(model, other)
    rates = {o.path: o.out_of_interval for o in status.operators}
    assert rates[FIRST_NORM] == 0.0


def test_embedding_table_ranges_bert_chunks():
    cfg = tiny_config("bert", norm_type="poly_layernorm", attention_type="pointwise")
    model = hf_polyhe.PolyBertForSequenceClassification(cfg).eval()
    e = model.bert.embeddings
    full = (e.word_embeddings.weight[:, None, None, :] + e.position_embeddings.weight[None, :, None, :]
            + e.token_type_embeddings.weight[None, None, :, :])
    var = full.var(-1, unbiased=False).detach().double() + e.norm.eps
    (path, r), = hf_polyhe.training.embedding_table_ranges(model, chunk_size=10).items()
    assert path == "bert.embeddings.norm.inv_sqrt"
    assert (r.lo, r.hi) == (pytest.approx(float(var.min()), rel=1e-6), pytest.approx(float(var.max()), rel=1e-6))
    assert hf_polyhe.training.embedding_table_ranges(hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt", norm_type="layernorm"))) == {}


def test_calibration_with_a_blown_up_upstream_polynomial_measures_the_exact_range():
    model = drifted_gpt()
    narrow, other = narrow_batches(), other_batches()
    reference = calibrate(copy.deepcopy(model), other).ranges()  # every operator exact
    fit_on_narrow_ranges(model, narrow)
    assert not torch.isfinite(logits(model, other)).all()
    modes = {p: op.mode for p, op in select_operators(model).items()}
    measured = calibrate(model, other).ranges()
    assert {p: op.mode for p, op in select_operators(model).items()} == modes  # restored
    for path, r in reference.items():
        assert (measured[path].lo, measured[path].hi) == pytest.approx((r.lo, r.hi), rel=1e-6), path
    # the same through to_polynomial(calibration_data=) on the blown-up model
    hf_polyhe.to_polynomial(model, calibration_data=other)
    assert torch.isfinite(logits(model, other)).all()


def test_polynomial_status_reports_out_of_interval_inputs_and_export_refuses(tmp_path):
    model = drifted_gpt()
    narrow, other = narrow_batches(), other_batches()
    fit_on_narrow_ranges(model, narrow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = hf_polyhe.polynomial_status(model, narrow)  # no warning on the data it was fitted on
    assert clean.out_of_interval == [] and all(o.out_of_interval == 0.0 for o in clean.operators)
    with pytest.warns(hf_polyhe.OutOfIntervalWarning, match=FIRST_NORM):
        status = hf_polyhe.polynomial_status(model, other)
    assert issubclass(hf_polyhe.OutOfIntervalWarning, UserWarning)
    assert status.out_of_interval[0].path == FIRST_NORM  # where the divergence starts
    assert status.out_of_interval[0].out_of_interval > 0.5
    assert "outside" in str(status) and FIRST_NORM in str(status)
    with pytest.raises(ValueError, match=rf"{FIRST_NORM} \(inv_sqrt\): inputs \[.*\] vs interval \[.*\]"):
        hf_polyhe.save_encrypted_pipeline(model, None, tmp_path / "refused", plan=False, calibration_data=other)
    assert not (tmp_path / "refused").exists()
    refit_drifted_operators(model, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_polyhe.polynomial_status(model, other).out_of_interval == []
    hf_polyhe.save_encrypted_pipeline(model, None, tmp_path / "ok", plan=False, calibration_data=other)
    assert (tmp_path / "ok" / "pipeline.json").exists()


class _TwoHeads(nn.Module):
    """One operator the data reaches, one it never does (a head of another task)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.used = PolyOperator("gelu", role="mlp_act")
        self.unused = PolyOperator("gelu", role="head_act")

    def forward(self, x):
        return self.used(self.lin(x))


def test_callback_leaves_an_operator_that_saw_no_input_exact():
    model = _TwoHeads()
    cb = PolyReplacementCallback([{"step": 1}], calibration_dataloader=[{"x": torch.randn(8, 4)}])
    with pytest.warns(UserWarning, match=r"unused \(gelu\) saw no input.*stays exact"):
        cb.step(model, 1)
    assert model.used.mode == "poly"
    assert model.unused.mode == "exact" and model.unused.approximation is None
    status = hf_polyhe.polynomial_status(model)
    assert not status.is_polynomial and [o.path for o in status.offending] == ["unused"]
    cb.finish(model)  # nothing to ramp: still exact, no error
    assert model.unused.mode == "exact" and "no input" in cb.fit_report()


def test_callback_refit_after_training_moved_the_weights():
    """What PolyReplacementCallback does at the end of training (refit_on_train_end): re-measure with every
    operator exact and refit the polynomials whose inputs left their interval, with the stage's degree."""
    model = drifted_gpt()
    data = narrow_batches()
    cb = PolyReplacementCallback([{"step": 1, "degree": 13}], calibration_dataloader=data)
    cb.step(model, 1)
    assert all(op.mode == "poly" for op in select_operators(model).values())
    assert cb.refit(model) == []
    with torch.no_grad():
        model.transformer.wte.weight.mul_(3.0)  # "training" made every embedding row larger
    exact_model = copy.deepcopy(model)
    hf_polyhe.set_operator_mode(exact_model, "exact")
    assert not torch.isfinite(logits(model, data)).all()
    refit = cb.refit(model)
    assert FIRST_NORM in refit
    assert [h["path"] for h in cb.history if h["stage"] == "refit"] == refit
    assert torch.isfinite(logits(model, data)).all()
    want = logits(exact_model, data)
    assert (logits(model, data) - want).abs().max() <= 1e-2 * want.abs().max()


def test_positive_operator_interval_too_wide_for_a_polynomial_is_clipped_with_a_warning():
    """Power-softmax row sums measured on [6.8e-4, 1.3e6]: no positive initial guess exists on a ratio of 2e9 (the
    fit raised); the interval is clipped at the bottom to MAX_POSITIVE_RATIO, with a warning."""
    from hf_polyhe.nn.operators import MAX_POSITIVE_RATIO

    op = PolyOperator("reciprocal", role="attn_norm")
    with pytest.warns(UserWarning, match=r"reciprocal interval \[0.00068, 1.3e\+06\].*fitted on \[65, 1.3e\+06\]"):
        approx = op.fit(interval=(6.8e-4, 1.3e6))
    assert approx.interval == pytest.approx((1.3e6 / MAX_POSITIVE_RATIO["reciprocal"], 1.3e6))
    x = torch.logspace(1.82, 6.1, 50, dtype=torch.float64)
    assert torch.isfinite(op.polynomial(x)).all()
    assert approx.meta["max_rel_error"] < 1e-2


class _OneOp(nn.Module):
    def __init__(self, op="inv_sqrt"):
        super().__init__()
        self.op = PolyOperator(op, role="norm")

    def forward(self, x):
        return self.op(x)


def test_final_calibration_pass_keeps_the_margin_and_sees_the_rare_batches():
    """The seed-1 NaN of the quality benchmark: a norm's variance has a heavy upper tail. The stage measured a few
    ordinary batches; one batch in many reaches further (here 1.8x the ordinary max: inside the stage's interval,
    which is 2x wide, but with no margin left), and held-out text then goes past the interval. The final pass
    measures ``refit_batches`` batches (not the stage's 8) and restores the margin over what it saw."""
    ordinary = [{"x": torch.rand(64) * 0.9 + 0.1} for _ in range(20)]  # variances in [0.1, 1]
    rare = {"x": torch.tensor([0.1, 1.8])}
    data = ordinary[:10] + [rare] + ordinary[10:]  # the rare batch after the stage's 8
    model = _OneOp()
    cb = PolyReplacementCallback([{"step": 1}], calibration_dataloader=data, calibration_batches=8)
    cb.step(model, 1)
    lo, hi = model.op.approximation.interval
    assert hi < 1.8 * (1 + DEFAULT_MARGIN["inv_sqrt"])  # the stage saw only ordinary batches
    held_out = torch.tensor([2.5])  # reaches past the stage's interval: the polynomial diverges there
    assert not torch.allclose(model.op(held_out), held_out.rsqrt(), rtol=0.05)
    # without keep_margin the rare batch is inside the interval: nothing is refit
    assert refit_drifted_operators(model, data, max_batches=None) == []
    assert cb.refit(model) == ["op"]
    assert model.op.approximation.interval[1] == pytest.approx(1.8 * (1 + DEFAULT_MARGIN["inv_sqrt"]), rel=1e-6)
    assert torch.allclose(model.op(held_out), held_out.rsqrt(), rtol=0.05)
    assert cb.refit(model) == []  # the margin is kept: a second pass changes nothing
    short = PolyReplacementCallback([{"step": 1}], calibration_dataloader=data, refit_batches=8)
    with pytest.raises(ValueError, match="refit_batches"):
        PolyReplacementCallback(refit_batches=0)
    assert short.refit_batches == 8


def test_a_refit_keeps_the_degree_the_operator_was_fitted_with(tmp_path):
    """An explicit degree (the callback's degree=, to_polynomial(degree=)) becomes the operator's own: a later refit
    without one (refit_drifted_operators) keeps it, also after save / load, instead of the config's default."""
    op = PolyOperator("gelu", degree=15, role="mlp_act")
    op.fit((-8.0, 8.0), degree=31)
    op.fit((-12.0, 12.0))
    assert op.approximation.degree == 31 and op.degree == 31
    fresh = PolyOperator("gelu", degree=15, role="mlp_act")
    fresh.load_spec(op.spec())
    assert fresh.degree == 31
    old_spec = {k: v for k, v in op.spec().items() if k != "degree"}  # written before the field existed
    older = PolyOperator("gelu", degree=15, role="mlp_act")
    older.load_spec(old_spec)
    assert older.degree == 15 and older.approximation.degree == 31

    model = hf_polyhe.PolyGPTForCausalLM(tiny_config("gpt"))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    hf_polyhe.to_polynomial(model, degree=7, roles=["mlp_act"], calibration_data=[{"input_ids": ids}])
    model.save_pretrained(tmp_path)
    loaded = hf_polyhe.PolyGPTForCausalLM.from_pretrained(tmp_path)
    acts = [m for m in loaded.modules() if isinstance(m, PolyOperator) and m.role == "mlp_act"]
    for m in acts:  # shrink the intervals so that the refit must widen them
        m.fit((-0.01, 0.01))
    refit = refit_drifted_operators(loaded, [{"input_ids": ids}])
    assert len(refit) == len(acts) > 0 and {m.approximation.degree for m in acts} == {7}
