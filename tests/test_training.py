"""Training side: range tracking, range / variance losses (with gradient accumulation), progressive replacement
with the stock Trainer and in a hand-written loop, and a 2-process torchrun run."""

import copy
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config, tiny_inputs
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_polyhe
from hf_polyhe.data import lm_blocks, load_tiny_corpus, split_paragraphs, tiny_tokenizer, train_test_split
from hf_polyhe.status import select_operators
from hf_polyhe.training import (
    PolyReplacementCallback,
    PolyTrainer,
    RangeLoss,
    RangeLossConfig,
    RangeTracker,
    ReplacementStage,
    calibrate,
    default_schedule,
    range_penalty,
    refit_drifted_operators,
    schedule_by_layer,
    schedule_by_operator,
    widen_interval,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- data ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_blocks():
    """Real text (the packaged Python reference excerpt), split by paragraph: (train, held-out, vocab size)."""
    train, test = train_test_split(split_paragraphs(load_tiny_corpus()), test_fraction=0.2, seed=0)
    tok = tiny_tokenizer(vocab_size=256)
    return lm_blocks(tok, train, 16), lm_blocks(tok, test, 16), len(tok)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = torch.tensor(self.blocks[i])
        return {"input_ids": ids, "labels": ids}


def gpt(vocab=97, **kw):
    cfg = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_cache=False)
    cfg.update(kw)
    c = tiny_config("gpt", **cfg)
    c.vocab_size = vocab
    return hf_polyhe.PolyGPTForCausalLM(c)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                seed=0, dataloader_num_workers=0, logging_steps=5)
    base.update(kw)
    return TrainingArguments(**base)


@torch.no_grad()
def heldout_loss(model, blocks):
    model.eval()
    ids = torch.tensor(blocks)
    return float(model(input_ids=ids, labels=ids).loss)


# -- RangeTracker -------------------------------------------------------------------------------------------
def test_range_tracker_matches_direct_measurement():
    model = gpt(attention_activation="relu").eval()
    batches = [tiny_inputs("gpt") for _ in range(3)]
    seen = {}
    handles = [op.register_forward_pre_hook(lambda m, a, p=p: seen.setdefault(p, []).append(a[0].detach().clone()))
               for p, op in select_operators(model).items()]
    tracker = calibrate(model, batches, embedding_tables=False)  # the batches only (default: + the whole table)
    for h in handles:
        h.remove()
    ranges = tracker.ranges()
    with_table = calibrate(model, batches).ranges()["transformer.h.0.attention_norm.inv_sqrt"]
    table = hf_polyhe.training.embedding_table_ranges(model)["transformer.h.0.attention_norm.inv_sqrt"]
    assert (with_table.lo, with_table.hi) == (min(table.lo, ranges[table.path].lo), max(table.hi, ranges[table.path].hi))
    assert set(ranges) == set(select_operators(model))  # every non-polynomial operator, norms included
    for path, r in ranges.items():
        xs = torch.cat([x.flatten() for x in seen[path]])
        assert r.lo == pytest.approx(float(xs.min()), rel=1e-6) and r.hi == pytest.approx(float(xs.max()), rel=1e-6)
        assert r.count == xs.numel()
    norm = ranges["transformer.h.0.attention_norm.inv_sqrt"]
    assert 0 < norm.lo < norm.hi  # var + eps of the LayerNorm: the variance range
    report = tracker.report(bound=8.0)
    assert "transformer.h.1.mlp.act" in report and "var+eps" in report and "attn_act" in report
    assert model.training is False  # calibrate restores the mode


def test_range_tracker_window_and_training_only():
    model = gpt().train()
    inputs = [tiny_inputs("gpt") for _ in range(2)]
    with RangeTracker(model, roles=["mlp_act"], window=2, training_only=True) as t:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(100.0)
            model(**inputs[0])  # a step with huge inputs ...
            t.end_step()
            model.transformer.wte.weight.div_(100.0)
            for x in inputs:
                model(**x)
                t.end_step()
        windowed = t.ranges()  # ... that fell out of the 2-step window
        model.eval()
        model(**inputs[0])  # eval passes are ignored with training_only
        assert t.ranges() == windowed
    model.train()
    with RangeTracker(model, roles=["mlp_act"]) as ref, torch.no_grad():
        for x in inputs:
            model(**x)
    assert set(windowed) == {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act"}
    for p, r in windowed.items():
        assert (r.lo, r.hi, r.count) == pytest.approx((ref.ranges()[p].lo, ref.ranges()[p].hi, ref.ranges()[p].count))
    assert not model.transformer.h[0].mlp.act._forward_pre_hooks  # removed on exit
    assert t.all_reduce() is t  # not distributed: no-op


# -- losses -------------------------------------------------------------------------------------------------
def test_range_penalty_and_targets():
    x = torch.tensor([-3.0, -1.0, 0.0, 2.0, 5.0], requires_grad=True)
    p = range_penalty(x, -2.0, 2.0)
    assert float(p.detach()) == pytest.approx((1.0 + 9.0) / 5)
    p.backward()
    assert x.grad.tolist() == pytest.approx([-0.4, 0, 0, 0, 1.2])  # pushes outliers back inside
    assert float(range_penalty(torch.linspace(-2, 2, 11), -2.0, 2.0)) == 0.0

    model = gpt(attention_type="power")
    loss = RangeLoss(model, RangeLossConfig(bound=4.0, bounds={"attn_act": 9.0, "transformer.h.1.mlp.act": 3.0},
                                            max_variance=10.0))
    ops = loss.operators
    assert loss.target_interval("transformer.h.0.mlp.act", ops["transformer.h.0.mlp.act"]) == (-4.0, 4.0)
    assert loss.target_interval("transformer.h.1.mlp.act", ops["transformer.h.1.mlp.act"]) == (-3.0, 3.0)
    assert loss.target_interval("transformer.ln_f.inv_sqrt", ops["transformer.ln_f.inv_sqrt"])[1] == 10.0
    recip = ops["transformer.h.0.attn.normalizer"]
    assert loss.target_interval("transformer.h.0.attn.normalizer", recip) == recip.interval  # not symmetric
    op = ops["transformer.h.0.mlp.act"]
    op.fit(interval=(-2.5, 2.5))
    op.set_mode("poly")  # once fitted, the target is the polynomial's interval, contracted (fitted_target=0.75)
    assert loss.target_interval("transformer.h.0.mlp.act", op) == pytest.approx((-1.875, 1.875))
    with pytest.raises(ValueError, match="bound"):
        RangeLossConfig(bound=-1)


def test_range_loss_captures_only_training_forwards():
    model = gpt()
    rl = RangeLoss(model, alpha=1.0, bound=1e-3, beta=1.0, max_variance=1e-6)
    model.eval()
    with torch.no_grad():
        model(**tiny_inputs("gpt"))
    out = rl.compute()
    assert float(out.total) == 0.0  # evaluation never leaks into the loss
    model.train()
    model(**tiny_inputs("gpt"))
    out = rl.compute()
    assert float(out.range.detach()) > 0 and float(out.variance.detach()) > 0 and out.total.requires_grad
    assert float(rl.compute().total) == 0.0  # cleared
    stats = rl.pop_stats()
    assert {"range/mlp_act_absmax", "range/attn_act_absmax", "range/norm_var_max"} <= set(stats)
    rl.remove()
    model(**tiny_inputs("gpt"))
    assert float(rl.compute().total) == 0.0


def _one_sgd_step(tmp_path, batch, accumulation, alpha, data):
    torch.manual_seed(0)
    model = gpt()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PolyTrainer(
        model=model, train_dataset=Blocks(data),
        args=args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                  optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant",
                  warmup_steps=0),
        # extreme_weight=0: the top-k term is per micro-batch (the extremes of each), not linear in the batch
        range_loss=RangeLossConfig(alpha=alpha, bound=0.05, beta=alpha, max_variance=1e-4, extreme_weight=0.0),
    )
    trainer.train()
    return {n: start[n] - p.detach() for n, p in model.named_parameters()}  # = lr * gradient


def test_poly_trainer_gradient_accumulation_matches_full_batch(tmp_path):
    torch.manual_seed(1)
    data = [torch.randint(0, 97, (12,)).tolist() for _ in range(4)]
    full = _one_sgd_step(tmp_path, 4, 1, 100.0, data)
    halves = _one_sgd_step(tmp_path, 2, 2, 100.0, data)
    task_only = _one_sgd_step(tmp_path, 4, 1, 0.0, data)
    diff = max(float((full[n] - halves[n]).abs().max()) for n in full)
    scale = max(float(full[n].abs().max()) for n in full)
    penalty_effect = max(float((full[n] - task_only[n]).abs().max()) for n in full)
    assert penalty_effect > 0.05 * scale  # the range / variance terms do move the gradient
    assert diff < 1e-5 * max(scale, 1.0)  # 2 accumulated half-batches == 1 full batch


def _inputs_outside(model, blocks, bound):
    outside, total = 0, 0
    model.eval()
    with RangeTracker(model):  # (just to show the tracker doesn't interfere)
        def hook(m, a):
            nonlocal outside, total
            outside += int((a[0].abs() > bound).sum())
            total += a[0].numel()
        ops = select_operators(model, roles=["mlp_act", "attn_act"])
        hs = [op.register_forward_pre_hook(hook) for op in ops.values()]
        with torch.no_grad():
            model(input_ids=torch.tensor(blocks))
        for h in hs:
            h.remove()
    return outside / total


def test_range_loss_keeps_inputs_inside_bound(text_blocks):
    """Hand-written loop: the same training with and without the range loss; B chosen below the natural range."""
    train, test, vocab = text_blocks
    bound = 0.5
    results = {}
    for alpha in (0.0, 100.0):
        torch.manual_seed(0)
        model = gpt(vocab=vocab, attention_activation="gelu")
        rl = RangeLoss(model, RangeLossConfig(alpha=alpha, bound=bound, beta=0.0))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(40):
            i = (step * 8) % (len(train) - 8)
            ids = torch.tensor(train[i : i + 8])
            loss = model(input_ids=ids, labels=ids).loss + rl()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[alpha] = _inputs_outside(model, test, bound)
    assert results[0.0] > 0.05  # without the loss, plenty of inputs leave [-B, B]
    assert results[100.0] < 0.25 * results[0.0], results


# -- progressive replacement ----------------------------------------------------------------------------------
def test_schedules_and_stage_validation():
    model = gpt(attention_type="power")
    stages = schedule_by_layer(2, start=10, every=5, ramp_steps=3)
    assert [s.start for s in stages] == [10, 15] and stages[-1].layers == [1, None]
    cb = PolyReplacementCallback(stages)
    cb.attach(model)
    covered = set().union(*(s.operators for s in cb._stages))
    assert covered == set(select_operators(model))  # every operator, final norm included
    by_op = schedule_by_operator(start=0, every=2, roles=("mlp_act", ("attn_act", "attn_norm"), "norm"))
    assert [s.roles for s in by_op] == [["mlp_act"], ["attn_act", "attn_norm"], ["norm"]]
    assert ReplacementStage.from_dict({"epoch": 2, "roles": ["norm"]}).start == 2
    with pytest.raises(ValueError, match="exactly one"):
        ReplacementStage.from_dict({"roles": ["norm"]})
    with pytest.raises(ValueError, match="unknown stage keys"):
        ReplacementStage.from_dict({"step": 1, "role": ["norm"]})
    with pytest.raises(ValueError, match="unit"):
        PolyReplacementCallback(stages, unit="minute")
    assert widen_interval("gelu", -3.0, 1.0, 0.1) == pytest.approx((-3.3, 3.3))
    lo, hi = widen_interval("inv_sqrt", 0.5, 4.0, 0.1)
    assert 0 < lo < 0.5 and hi == pytest.approx(4.4)
    with pytest.raises(ValueError, match="positive"):
        widen_interval("inv_sqrt", 0.0, 1.0, 0.1)


def test_callback_hand_written_loop_with_calibration_data():
    model = gpt()
    batches = [tiny_inputs("gpt") for _ in range(4)]
    cb = PolyReplacementCallback([{"step": 2, "roles": ["mlp_act"]}, {"step": 4, "roles": ["attn_act", "norm"]}],
                                 calibration_dataloader=batches, ramp_steps=2, margin=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    modes = []
    for step in range(1, 8):
        model.train()
        out = model(**batches[step % 4], labels=batches[step % 4]["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        cb.step(model, step)
        modes.append((model.transformer.h[0].mlp.act.mode, model.transformer.h[0].attn.score_activation.mode))
    assert modes[0] == ("exact", "exact")
    assert modes[1] == ("blend", "exact") and model.transformer.h[0].mlp.act.mode == "poly"
    assert modes[3] == ("poly", "blend") and modes[-1] == ("poly", "poly")
    assert cb.finished and hf_polyhe.polynomial_status(model).is_polynomial
    # each polynomial was fitted on its own calibrated range widened by the margin
    for h in cb.history:
        lo, hi = h["measured"]
        assert h["interval"] == pytest.approx(widen_interval(h["op"], lo, hi, 0.2))
    assert len({h["interval"] for h in cb.history}) > 3  # not one shared interval


def test_callback_stock_trainer_end_to_end(tmp_path, text_blocks):
    """Stock Trainer: pre-train exact, then replace everything progressively; the polynomial model stays close
    to the pre-replacement model on held-out text, and save_pretrained / from_pretrained keep the polynomials."""
    train, test, vocab = text_blocks
    torch.manual_seed(0)
    model = gpt(vocab=vocab, attention_activation="gelu", hidden_act="gelu_new")
    Trainer(model=model, args=args(tmp_path, max_steps=150, per_device_train_batch_size=8, learning_rate=3e-3),
            train_dataset=Blocks(train)).train()
    before = copy.deepcopy(model)
    schedule = [{"step": 1, "roles": ["mlp_act"], "layers": [0]},
                {"step": 6, "roles": ["mlp_act", "attn_act"]},
                {"step": 12, "roles": ["norm"]}]
    cb = PolyReplacementCallback(schedule, ramp_steps=4, margin={"inv_sqrt": 1.0, "default": 0.3}, window=12)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
                                             logging_steps=2), train_dataset=Blocks(train), callbacks=[cb])
    trainer.train()
    status = hf_polyhe.polynomial_status(model)
    assert status.is_polynomial, str(status)
    fits = [h for h in cb.history if h["stage"] != "refit"]
    assert [h["step"] for h in fits][:1] == [1] and max(h["step"] for h in fits) == 12
    assert {h["step"] for h in cb.history if h["stage"] == "refit"} <= {30}  # the final calibration pass
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["poly/fraction_polynomial"] < 1.0 <= logged[-1]["poly/fraction_polynomial"]
    assert any("poly/blend_weight" in h for h in logged)

    l_before, l_after = heldout_loss(before, test), heldout_loss(model, test)
    assert math.isfinite(l_after) and abs(l_after - l_before) < 0.05 * l_before, (l_before, l_after)
    with torch.no_grad():
        ids = torch.tensor(test[:4])
        p_before = before(input_ids=ids).logits.softmax(-1)
        p_after = model(input_ids=ids).logits.softmax(-1)
    assert float((p_before - p_after).abs().sum(-1).mean()) < 0.2  # mean total-variation * 2 per token

    model.save_pretrained(tmp_path / "poly")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "poly")
    assert hf_polyhe.polynomial_status(loaded).is_polynomial
    saved = json.loads((tmp_path / "poly" / "config.json").read_text())["poly_operators"]
    fitted = {h["path"]: h["interval"] for h in cb.history}
    for path, interval in fitted.items():
        assert tuple(saved[path.removeprefix("transformer.")]["interval"]) == pytest.approx(interval)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_poly_trainer_logs_ranges_and_finishes_unreached_stages(tmp_path, text_blocks, caplog):
    train, _, vocab = text_blocks
    model = gpt(vocab=vocab)
    cb = PolyReplacementCallback(schedule_by_layer(2, start=3, every=100), window=2)  # layer 1 is never reached
    trainer = PolyTrainer(model=model, args=args(tmp_path, max_steps=6, per_device_train_batch_size=4, logging_steps=3),
                          train_dataset=Blocks(train), callbacks=[cb], range_loss=RangeLossConfig(alpha=0.1, bound=4.0))
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "before 1 replacement stage" in caplog.text
    assert hf_polyhe.polynomial_status(model).is_polynomial
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("range_loss", "variance_loss", "range/mlp_act_absmax", "range/norm_var_max", "poly/stage"):
        assert key in logs[-1], key
    assert logs[-1]["poly/stage"] == 1.0 and logs[-1]["range/norm_var_max"] > 0


# -- resuming from a checkpoint -------------------------------------------------------------------------------
class _ModeRecorder(TrainerCallback):
    """Mode and blend weight of every operator after each step (added after the replacement callback)."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {p: (op.mode, round(op.blend_weight, 6))
                                         for p, op in select_operators(model).items()}


def _numbers(tree) -> list:
    """Every number in a JSON tree (an approximation's coefficients, interval, error), in order."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _train_with_checkpoints(out, resume_from=None, restore_callback_states=False):
    torch.manual_seed(0)
    model = gpt(attention_activation="gelu")
    # at the step-5 checkpoint the MLP activations are polynomials half-way through their ramp (weight 4/6) and
    # the second stage is still to come; it measures over a 4-step window that reaches back before the checkpoint
    schedule = [{"step": 2, "roles": ["mlp_act"], "ramp_steps": 6},
                {"step": 7, "roles": ["attn_act", "norm"], "ramp_steps": 3}]
    cb = PolyReplacementCallback(schedule, window=4, margin=0.3)
    recorder = _ModeRecorder()
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 97, (12,), generator=g).tolist() for _ in range(48)]
    trainer = Trainer(model=model, train_dataset=Blocks(data), callbacks=[cb, recorder],
                      args=args(out, max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                                save_strategy="steps", save_steps=5,
                                restore_callback_states_from_checkpoint=restore_callback_states))
    trainer.train(resume_from_checkpoint=resume_from)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    # with restore_callback_states_from_checkpoint the Trainer replaces cb by one rebuilt from the checkpoint
    used = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PolyReplacementCallback))
    assert (used is not cb) == (restore_callback_states and resume_from is not None)
    return model, used, recorder, losses


@pytest.mark.parametrize("restore_callback_states", [False, True], ids=["own-restore", "trainer-rebuilds"])
def test_resume_from_checkpoint_continues_the_replacement(tmp_path, restore_callback_states):
    """Resuming from a mid-schedule checkpoint gives the run that was never interrupted: same operators polynomial
    with the same polynomials, the ramp at the same point, no stage applied twice, same losses and weights. Also
    when the Trainer rebuilds the callback from the checkpoint (restore_callback_states_from_checkpoint=True)."""
    full, full_cb, full_modes, full_losses = _train_with_checkpoints(tmp_path / "full")
    checkpoint = tmp_path / "full" / "out" / "checkpoint-5"
    saved = json.loads((checkpoint / "config.json").read_text())["poly_operators"]
    assert saved["h.0.mlp.act"]["mode"] == "blend" and saved["h.0.mlp.act"]["blend_weight"] == pytest.approx(4 / 6)
    assert "PolyReplacementCallback" in json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]

    resumed, cb, modes, losses = _train_with_checkpoints(tmp_path / "resumed", resume_from=str(checkpoint),
                                                         restore_callback_states=restore_callback_states)
    assert min(modes.steps) == 6
    # (a rebuilt callback comes after the recorder, which then sees each step's modes one step late)
    lag = 1 if restore_callback_states else 0
    for step in range(6 + lag, 13):  # the ramp goes on where it stopped (step 6: 5/6), the second stage starts at 7
        assert modes.steps[step] == full_modes.steps[step - lag], step
    assert modes.steps[6 + lag]["transformer.h.0.mlp.act"] == ("blend", round(5 / 6, 6))
    # every stage fitted once, at its own step, on the same intervals (the window of ranges survived the restart)
    assert [(h["path"], h["step"]) for h in cb.history] == [(h["path"], h["step"]) for h in full_cb.history]
    assert [h["step"] for h in cb.history].count(2) == 2
    for h, ref in zip(cb.history, full_cb.history):
        assert h["interval"] == pytest.approx(ref["interval"], rel=1e-6)
    specs, ref_specs = resumed.poly_operator_specs(), full.poly_operator_specs()
    assert {p: s["mode"] for p, s in specs.items()} == {p: s["mode"] for p, s in ref_specs.items()}
    assert set(s["mode"] for s in specs.values()) == {"poly"}
    for p, spec in specs.items():
        assert spec["interval"] == pytest.approx(ref_specs[p]["interval"], rel=1e-6)
        assert _numbers(spec["approximation"]) == pytest.approx(_numbers(ref_specs[p]["approximation"]),
                                                                rel=1e-5, abs=1e-9), p
    for step in range(6, 13):
        assert losses[step] == pytest.approx(full_losses[step], rel=1e-4), step
    for (name, a), b in zip(resumed.named_parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_refit_drifted_operators():
    """After training moved the weights, operators whose inputs left their polynomial's interval are refitted (on
    an interval covering the old one and the new range); the others keep their polynomial."""
    model = gpt().eval()
    batches = [tiny_inputs("gpt") for _ in range(2)]
    hf_polyhe.to_polynomial(model, calibration_data=batches)
    assert refit_drifted_operators(model, batches) == []  # nothing moved yet
    before = {p: op.approximation for p, op in select_operators(model).items()}
    with torch.no_grad():
        model.transformer.h[0].mlp.fc_in.weight.mul_(5.0)  # "training" made layer 0's MLP inputs larger
    refit = refit_drifted_operators(model, batches, margin=0.25)
    assert "transformer.h.0.mlp.act" in refit
    measured = calibrate(model, batches).ranges()
    for path, op in select_operators(model).items():
        assert op.mode == "poly"
        if path in refit:
            old, (lo, hi) = before[path].interval, op.approximation.interval
            assert lo <= min(old[0], measured[path].lo) and max(old[1], measured[path].hi) <= hi
        else:
            assert op.approximation is before[path]


# -- default schedule, misspelt names ------------------------------------------------------------------------
def test_callback_without_arguments_spreads_a_default_schedule(tmp_path, caplog):
    """PolyReplacementCallback() with the stock Trainer: one role at a time between 10 % and 70 % of max_steps,
    each ramped over its slot, fully polynomial by 70 %, the rest of the run to recover."""
    assert [(s.start, s.roles, s.ramp_steps) for s in default_schedule(gpt(), 100)] == \
        [(10, ["mlp_act"], 20), (30, ["attn_act"], 20), (50, ["norm"], 20)]
    assert [s.roles for s in default_schedule(gpt(attention_type="power"), 100)] == [["mlp_act"], ["attn_norm"], ["norm"]]
    model = gpt()
    cb, recorder = PolyReplacementCallback(), _ModeRecorder()
    g = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 97, (12,), generator=g).tolist() for _ in range(80)]
    with caplog.at_level("WARNING"):
        Trainer(model=model, args=args(tmp_path, max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3),
                train_dataset=Blocks(data), callbacks=[cb, recorder]).train()
    assert "replacing them untrained" not in caplog.text  # every stage started during training
    assert {(h["stage"], h["step"]) for h in cb.history} - {("refit", 20)} == {("mlp_act", 2), ("attn_act", 6), ("norm", 10)}
    modes = lambda step, role: {recorder.steps[step][p] for p, op in select_operators(model, roles=[role]).items()}
    assert modes(5, "mlp_act") == {("poly", 1.0)} and modes(5, "attn_act") == {("exact", 0.0)}
    assert modes(11, "norm") == {("blend", 0.5)}
    assert all(mode == ("poly", 1.0) for step in range(14, 21) for mode in recorder.steps[step].values())
    assert hf_polyhe.polynomial_status(model).is_polynomial
    with pytest.raises(ValueError, match="needs its length.*max_steps"):
        PolyReplacementCallback().step(gpt(), 1)  # a hand-written loop must say how long the run is


@pytest.mark.parametrize("make,match", [
    (lambda: PolyReplacementCallback([{"step": 1, "roles": ["mlp_actt"]}]),
     r"unknown operator role\(s\) 'mlp_actt'; accepted: mlp_act, attn_act"),
    (lambda: PolyReplacementCallback([ReplacementStage(1, ops=["gleu"])]), r"unknown operator name\(s\) 'gleu'; accepted: .*gelu"),
    (lambda: PolyReplacementCallback([{"step": 1}], margin={"inv_sqr": 1.0}), r"unknown margin key\(s\) 'inv_sqr'; accepted: default, .*inv_sqrt"),
    (lambda: PolyReplacementCallback([{"step": 1}], degree={"gleu": 7}), r"'gleu'.*accepted: .*gelu"),
    (lambda: PolyReplacementCallback([{"step": 1}], fit_kwargs={"gleu": {"method": "chebyshev"}}), r"'gleu'"),
    (lambda: PolyReplacementCallback(unit="epoch"), "default schedule counts steps"),
    (lambda: RangeTracker(gpt(), roles=["mlp"]), r"unknown operator role\(s\) 'mlp'"),
    (lambda: RangeLoss(gpt(), RangeLossConfig(bounds={"atn_act": 4.0})), r"'atn_act'.*accepted: .*attn_act"),
    (lambda: hf_polyhe.to_polynomial(gpt(), roles=["norms"]), r"unknown operator role\(s\) 'norms'"),
    (lambda: hf_polyhe.to_polynomial(gpt(), ranges={"transformer.h.0.mlp": (-1, 1)}),
     r"unknown module path\(s\) in ranges 'transformer.h.0.mlp'; accepted: .*transformer.h.0.mlp.act"),
])
def test_misspelt_names_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- 2 processes ----------------------------------------------------------------------------------------------
DDP_SCRIPT = r"""
import json, os, sys
import torch
from transformers import TrainingArguments
import hf_polyhe
from hf_polyhe.training import PolyReplacementCallback, PolyTrainer, RangeLossConfig, RangeTracker, schedule_by_operator

torch.manual_seed(0)
out = sys.argv[1]
cfg = hf_polyhe.PolyGPTConfig(vocab_size=97, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64, attention_activation="gelu", use_cache=False)
model = hf_polyhe.PolyGPTForCausalLM(cfg)
g = torch.Generator().manual_seed(1)
data = [torch.randint(0, 97, (16,), generator=g) * (1 + i % 3) % 97 for i in range(64)]

class DS(torch.utils.data.Dataset):
    def __len__(self): return len(data)
    def __getitem__(self, i): return {"input_ids": data[i], "labels": data[i]}

local = RangeTracker(model, training_only=True)  # this rank's own batches, never all-reduced
cb = PolyReplacementCallback(schedule_by_operator(start=3, every=3, roles=("mlp_act", "attn_act", "norm"), ramp_steps=2),
                             window=3)
args = TrainingArguments(output_dir=os.path.join(out, "run"), use_cpu=True, report_to=[], save_strategy="no",
                         max_steps=12, per_device_train_batch_size=4, logging_steps=4, disable_tqdm=True, seed=0)
trainer = PolyTrainer(model=model, args=args, train_dataset=DS(), callbacks=[cb],
                      range_loss=RangeLossConfig(alpha=0.1, bound=4.0))
trainer.train()
rank = trainer.args.process_index
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world_size": trainer.args.world_size, "specs": model.poly_operator_specs(),
               "local": {p: [r.lo, r.hi] for p, r in local.ranges().items()},
               "polynomial": hf_polyhe.polynomial_status(model).is_polynomial}, f)
if trainer.is_world_process_zero():
    trainer.save_model(os.path.join(out, "model"))
# orderly shutdown: without it a rank that exits while the other still saves can abort in gloo's threads
# ("terminate called without an active exception", seen once in a fresh-clone CI run)
trainer.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


# ~40 s of CPU (two interpreters importing transformers): in the default suite, since the callback must work on 2 ranks
def test_two_process_torchrun(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
           "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["polynomial"] and r1["polynomial"]
    assert r0["local"] != r1["local"]  # the ranks saw different batches ...
    assert r0["specs"] == r1["specs"]  # ... yet fitted bit-identical polynomials on all-reduced ranges
    for spec in r0["specs"].values():
        assert spec["mode"] == "poly" and spec["approximation"] is not None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert hf_polyhe.polynomial_status(loaded).is_polynomial
    assert loaded.poly_operator_specs() == r0["specs"]


def test_default_margins_widen_norm_ranges_more():
    """Held-out LayerNorm variances exceed the calibrated ones far more than activations do: inv_sqrt is fitted on
    [lo/2, 2 hi], activations on 1.5x their range, unless the caller says otherwise."""
    from hf_polyhe.nn.operators import PolyOperator
    from hf_polyhe.training import DEFAULT_MARGIN, PolyReplacementCallback, margin_for, schedule_by_layer, widen_interval

    norm, act = PolyOperator("inv_sqrt", role="norm"), PolyOperator("gelu", role="mlp_act")
    assert margin_for(DEFAULT_MARGIN, norm) == 1.0 and margin_for(DEFAULT_MARGIN, act) == 0.5
    assert widen_interval("inv_sqrt", 0.2, 3.0, margin_for(DEFAULT_MARGIN, norm)) == pytest.approx((0.1, 6.0))
    assert widen_interval("gelu", -2.0, 4.0, margin_for(DEFAULT_MARGIN, act)) == pytest.approx((-6.0, 6.0))
    assert margin_for(0.2, norm) == 0.2 and margin_for({"mlp_act": 0.3}, act) == 0.3
    assert margin_for({"mlp_act": 0.3}, norm) == DEFAULT_MARGIN["default"]
    assert PolyReplacementCallback(schedule_by_layer(2, start=1, every=1)).margin == DEFAULT_MARGIN


def test_held_out_text_of_another_source():
    """The quality benchmark's second held-out set: standard-library docstrings, deterministic, English, and
    almost disjoint from the language reference it trains on."""
    from hf_polyhe.data import load_python_docs_corpus, load_stdlib_docstrings_corpus

    text = load_stdlib_docstrings_corpus()
    assert text == load_stdlib_docstrings_corpus() and len(text) > 300_000
    paras = split_paragraphs(text)
    reference = set(split_paragraphs(load_python_docs_corpus()))
    assert len(paras) > 2000 and sum(p in reference for p in paras) < 0.01 * len(paras)
    assert sum(w in text.split() for w in ("the", "of", "returns", "and")) == 4


def test_dependency_docstrings_are_a_third_source_disjoint_from_the_held_out_text():
    """The distillation recipe's extra training text (numpy / datasets / accelerate docstrings): deterministic,
    sizeable, no paragraph in common with the standard library's held-out docstrings, and the stdlib corpus itself is
    unchanged by the shared loader (only the dependency corpus follows re-exports from submodules)."""
    from hf_polyhe.data import (
        STDLIB_DOC_MODULES,
        load_dependency_docstrings_corpus,
        load_docstrings_corpus,
        load_stdlib_docstrings_corpus,
    )

    text = load_dependency_docstrings_corpus()
    assert text == load_dependency_docstrings_corpus() and len(text) > 500_000
    held = set(split_paragraphs(load_stdlib_docstrings_corpus(), 80))
    paras = split_paragraphs(text, 80)
    assert len(paras) > 2000 and not any(p in held for p in paras)
    assert "numpy" in text and load_docstrings_corpus(STDLIB_DOC_MODULES) == load_stdlib_docstrings_corpus()
    # without following submodules, numpy's top level (whose functions live in numpy.core...) gives far less
    assert len(load_docstrings_corpus(["numpy"])) < len(load_docstrings_corpus(["numpy"], defined_in_submodules=True)) / 4
