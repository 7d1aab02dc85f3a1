"""Distillation of a headless encoder (DistillationTrainer, mean_pool) and the encrypted-feature-extraction task."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_pipelines import HE_FRIENDLY, WORDS, word_tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    TrainerCallback,
    TrainingArguments,
    pipeline,
)

import hf_polyhe  # noqa: E402
from hf_polyhe.he.errors import ToyParametersWarning  # noqa: E402
from hf_polyhe.training import (  # noqa: E402
    DistillationConfig,
    DistillationTrainer,
    PolyReplacementCallback,
    RangeLossConfig,
    distillation_loss,
    mean_pool,
    sentence_embeddings,
)

V = 40


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.2)  # a random BERT of the default 0.02 maps every text to one embedding
    return BertModel(cfg, add_pooling_layer=False).eval()


def token_data(n=64, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, length), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    for i, n_tok in enumerate(lengths):
        mask[i, n_tok:] = 0
        ids[i, n_tok:] = 0
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})


def args(tmp_path, steps, **kw):
    return TrainingArguments(str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=3e-3,
                             logging_steps=1, seed=0, **kw)


# -- mean_pool -----------------------------------------------------------------------------------------------------
def test_mean_pool_respects_the_mask_and_ignores_padding_values():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    h_poisoned = h.clone()
    h_poisoned[0, 2:] = float("nan")  # what a padded row holds must not matter
    out = mean_pool(h_poisoned, mask)
    assert torch.allclose(out[0], h[0, :2].mean(0)) and torch.allclose(out[1], h[1].mean(0))
    assert torch.allclose(mean_pool(h), h.mean(1))
    assert torch.allclose(mean_pool(h, mask.bool()), out)


def test_mean_pool_bad_inputs():
    h = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="does not match"):
        mean_pool(h, torch.ones(2, 5))
    with pytest.raises(ValueError, match="keep no token"):
        mean_pool(h, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="zeros and ones"):
        mean_pool(h, torch.full((2, 4), 2))
    with pytest.raises(ValueError, match=r"\(batch, length, hidden\)"):
        mean_pool(torch.randn(2, 3))


# -- the loss and the trainer --------------------------------------------------------------------------------------
def test_distillation_loss_terms_and_config_errors():
    teacher = tiny_teacher()
    batch = token_data(4)[:]
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    loss, terms = distillation_loss(out, out, mask, DistillationConfig(token_mse=1.0, layer_mse=1.0))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)  # a model is its own perfect student
    assert terms["cosine"] == pytest.approx(1.0, abs=1e-6) and set(terms) == {"cosine", "mse", "token_mse", "layer_mse"}
    with pytest.raises(ValueError, match="at least one"):
        DistillationConfig(cosine=0, mse=0)
    with pytest.raises(ValueError, match=">= 0"):
        DistillationConfig(mse=-1.0)
    other = BertModel(BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="same hidden size"):
        distillation_loss(other(input_ids=ids, attention_mask=mask), out, mask)


def test_attention_mse_term_value_and_errors():
    """The attention term: 0 for a model against itself; a student row of zeros against a uniform teacher row costs
    exactly 1 (n keys of error 1/n, weighted by n), whatever n, and padded queries and keys do not count."""
    teacher = tiny_teacher()
    teacher.set_attn_implementation("eager")
    batch = token_data(4)[:]
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    out = teacher(input_ids=ids, attention_mask=mask, output_attentions=True)
    loss, terms = distillation_loss(out, out, mask, DistillationConfig(cosine=0, mse=0, attention_mse=1.0))
    assert set(terms) == {"attention_mse"} and terms["attention_mse"] == pytest.approx(0.0, abs=1e-9)

    class Out:
        def __init__(self, attentions):
            self.last_hidden_state, self.attentions = torch.ones(2, 5, 3), attentions

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    uniform = mask[:, None, None, :].float() / mask.sum(1)[:, None, None, None]
    t = uniform.expand(2, 3, 5, 5).clone()
    t[0, :, 3:] = 7.0  # padded query rows of the teacher: ignored
    s = torch.zeros(2, 3, 5, 5)
    s[0, :, :, 3:] = 5.0  # padded keys of the student: ignored
    cfg = DistillationConfig(cosine=0, mse=0, attention_mse=2.0)
    loss, terms = distillation_loss(Out((s, s)), Out((t, t)), mask, cfg)
    assert terms["attention_mse"] == pytest.approx(1.0, abs=1e-6) and float(loss) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="eager"):
        distillation_loss(Out((s, s)), Out(()), mask, cfg)
    with pytest.raises(ValueError, match="as many layers"):
        distillation_loss(Out((s, s)), Out((t,)), mask, cfg)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(Out((s[:, :2], s[:, :2])), Out((t, t)), mask, cfg)


def test_attention_mse_trains_the_student_attention_towards_the_teacher(tmp_path):
    """With attention_mse the trainer switches an sdpa teacher to eager attention, and training lowers the term."""
    teacher = tiny_teacher()
    assert teacher.config._attn_implementation == "sdpa"
    student = hf_polyhe.convert_to_poly(teacher, attention_type="pointwise", attention_activation="gelu",
                                        attention_scaling="length")
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path, 16), train_dataset=token_data(64),
                                  distillation=DistillationConfig(attention_mse=1.0))
    assert teacher.config._attn_implementation == "eager"
    trainer.train()
    att = [h["distill/attention_mse"] for h in trainer.state.log_history if "distill/attention_mse" in h]
    assert len(att) == 16 and all(np.isfinite(att)) and np.mean(att[-4:]) < 0.7 * np.mean(att[:4])


def test_distillation_trainer_needs_teacher_and_attention_mask(tmp_path):
    teacher = tiny_teacher()
    student = hf_polyhe.convert_to_poly(teacher, attention_type="pointwise", norm_type="poly_layernorm")
    with pytest.raises(ValueError, match="teacher="):
        DistillationTrainer(model=student, args=args(tmp_path, 1))
    with pytest.raises(ValueError, match="the student itself"):
        DistillationTrainer(model=student, teacher=student, args=args(tmp_path, 1))
    no_mask = Dataset.from_dict({"input_ids": token_data(16)["input_ids"]})
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path, 1), train_dataset=no_mask)
    with pytest.raises(ValueError, match="need an attention_mask"):
        trainer.train()


def test_distillation_lowers_the_loss_and_runs_with_the_callback(tmp_path):
    """P1 (exact operators) lowers the distillation loss of the converted student; then a few steps with the
    replacement callback, the range loss and gradient accumulation leave a fully polynomial student that is closer
    to the teacher than the conversion was."""
    teacher = tiny_teacher()
    data = token_data(64)
    student = hf_polyhe.convert_to_poly(teacher, attention_type="pointwise", attention_activation="gelu",
                                        attention_scaling="length", norm_type="poly_layernorm")
    batches = [{k: torch.tensor(data[i:i + 16][k]) for k in ("input_ids", "attention_mask")} for i in (0, 16, 32, 48)]

    def cos_to_teacher():
        s, t = sentence_embeddings(student, batches), sentence_embeddings(teacher, batches)
        return float(torch.nn.functional.cosine_similarity(s, t).mean())

    before = cos_to_teacher()
    p1 = DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path / "p1", 24), train_dataset=data)
    p1.train()
    losses = [h["loss"] for h in p1.state.log_history if "loss" in h]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert all("distill/cosine" in h and "distill/mse" in h for h in p1.state.log_history if "loss" in h)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    after_p1 = cos_to_teacher()
    assert after_p1 > before

    p2 = DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path / "p2", 12, gradient_accumulation_steps=2),
                             train_dataset=data, callbacks=[PolyReplacementCallback()],
                             range_loss=RangeLossConfig(alpha=1e-2, beta=1e-3),
                             distillation={"cosine": 1.0, "mse": 1.0, "token_mse": 0.5})
    p2.train()
    logs = [h for h in p2.state.log_history if "loss" in h]
    assert all(np.isfinite(h["loss"]) for h in logs)
    assert any(h.get("range_loss", 0) > 0 or h.get("variance_loss", 0) > 0 for h in logs)  # range loss is on
    assert "distill/token_mse" in logs[-1] and logs[-1]["poly/fraction_polynomial"] == 1.0
    assert hf_polyhe.polynomial_status(student).is_polynomial
    assert cos_to_teacher() > before


class GradSpy(TrainerCallback):
    """Records a parameter's gradient before each optimizer step."""

    def __init__(self, param):
        self.param, self.seen = param, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append(self.param.grad.detach().clone())


def test_gradient_accumulation_scales_like_one_big_batch(tmp_path):
    """Two micro-batches of 8 accumulated give the gradient of one batch of 16 (the loss is a per-batch mean)."""
    data = token_data(16, seed=3)
    data = Dataset.from_dict({k: [data[0][k]] * 16 for k in data.column_names})  # equal rows: equal micro-means
    grads = []
    for bs, ga in ((16, 1), (8, 2)):
        teacher = tiny_teacher()
        student = hf_polyhe.convert_to_poly(teacher, attention_type="pointwise", norm_type="poly_layernorm")
        a = TrainingArguments(str(tmp_path / f"ga{ga}"), max_steps=1, per_device_train_batch_size=bs,
                              gradient_accumulation_steps=ga, report_to=[], save_strategy="no", use_cpu=True,
                              disable_tqdm=True, learning_rate=0.0, max_grad_norm=1e9, seed=0)
        t = DistillationTrainer(model=student, teacher=teacher, args=a, train_dataset=data,
                                range_loss=RangeLossConfig(alpha=1e-2, beta=1e-3))
        spy = GradSpy(student.layers[0].mlp.fc_in.weight)
        t.add_callback(spy)
        t.train()
        grads.append(spy.seen[-1])
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# -- encrypted-feature-extraction ----------------------------------------------------------------------------------
def feature_model():
    torch.manual_seed(0)
    cfg = hf_polyhe.PolyBertConfig(vocab_size=len(WORDS) + 3, max_position_embeddings=8, **HE_FRIENDLY)
    model = hf_polyhe.PolyBertModel(cfg, add_pooling_layer=False)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(3, len(WORDS) + 3, (16, 6)))
    model.eval()
    hf_polyhe.to_polynomial(model)
    return model


@pytest.fixture(scope="module")
def feature_export(tmp_path_factory):
    model, tok = feature_model(), word_tokenizer()
    d = tmp_path_factory.mktemp("fx") / "export"
    hf_polyhe.save_encrypted_pipeline(model, tok, d, max_length=6)
    return model, tok, d


@torch.no_grad()
def torch_embedding(model, tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    return mean_pool(model.double()(input_ids=ids).last_hidden_state, torch.ones_like(ids))[0].numpy()


def test_feature_extraction_export_and_plain_pipeline_match_torch(feature_export):
    import json

    model, tok, d = feature_export
    meta = json.loads((d / "pipeline.json").read_text())
    assert meta["task"] == "encrypted-feature-extraction" and meta["pooling"] == "mean" and "id2label" not in meta
    pipe = pipeline("encrypted-feature-extraction", model=str(d), backend="plain")
    for text in ("the cat sat", "a big red dog ran fast"):
        (emb,) = pipe(text)
        ref = torch_embedding(model, tok, text)
        assert len(emb) == 8 and all(isinstance(v, float) for v in emb)
        np.testing.assert_allclose(emb, ref, rtol=1e-6, atol=1e-8)  # float64 circuit vs float64 torch
    many = pipe(["the cat sat", "a dog"])
    assert len(many) == 2 and len(many[0][0]) == 8
    unit = pipe("the cat sat", normalize=True)[0]
    assert np.linalg.norm(unit) == pytest.approx(1.0)
    arr = pipe("the cat sat", return_tensors=True)
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 8)
    out = pipe("the cat sat", return_he=True)
    assert out["he"]["backend"] == "plain" and len(out["embedding"][0]) == 8


@torch.no_grad()
def test_feature_extraction_padding_mask_circuit(feature_export):
    """A circuit built for a padded input pools over the kept tokens only (equal to the unpadded sequence's)."""
    from hf_polyhe.he import Export, PlainServer

    model, tok, d = feature_export
    ex = Export(d)
    ids = tok("the cat sat")["input_ids"]
    padded = ids + [0, 0]
    server = PlainServer(ex)
    got = server.run(ex.embed(input_ids=padded), attention_mask=[1] * len(ids) + [0, 0]).reshape(-1)
    ref = mean_pool(model.double()(input_ids=torch.tensor([padded]),
                                   attention_mask=torch.tensor([[1] * len(ids) + [0, 0]])).last_hidden_state,
                    torch.tensor([[1] * len(ids) + [0, 0]]))[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got, torch_embedding(model, tok, "the cat sat"), rtol=1e-6, atol=1e-8)


def test_feature_extraction_bad_inputs(feature_export, tmp_path):
    model, tok, d = feature_export
    pipe = pipeline("encrypted-feature-extraction", model=str(d), backend="plain")
    with pytest.raises(ValueError, match="at most 6"):
        pipe("the cat sat on the mat and ran")
    assert len(pipe("the cat sat on the mat and ran", truncation=True)[0]) == 8
    with pytest.raises(TypeError, match="unexpected arguments"):
        pipe("the cat", top_k=2)
    with pytest.raises(TypeError, match="string"):
        pipe([[1, 2, 3]])
    with pytest.raises(ValueError, match="needs a 'bert' export"):  # a feature export is not a classifier
        pipeline("encrypted-text-classification", model=str(d), backend="plain")
    cfg = hf_polyhe.PolyBertConfig(**{**model.config.to_dict(), "hidden_act": "gelu"})  # GELU, not yet fitted
    not_poly = hf_polyhe.PolyBertModel(cfg, add_pooling_layer=False).eval()
    with pytest.raises(ValueError, match="not fully polynomial"):
        hf_polyhe.save_encrypted_pipeline(not_poly, tok, tmp_path / "x")


def test_feature_extraction_encrypted_toy_matches_plain(feature_export, tmp_path):
    model, tok, d = feature_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        pipe = pipeline("encrypted-feature-extraction", model=str(d), he_params="toy", key_dir=str(tmp_path),
                        verbose=False)
        out = pipe("a big red dog", return_he=True)
    ref = torch_embedding(model, tok, "a big red dog")
    assert out["he"]["encrypted"]
    # CKKS noise at the toy ring: well inside 1e-3 of the embedding's scale
    np.testing.assert_allclose(out["embedding"][0], ref, atol=1e-3 * np.abs(ref).max())


def test_reciprocal_on_a_too_wide_interval_says_why_and_what_to_do():
    """The power-softmax normalizer's calibration failure of issue #16 ([6.8e-4, 1.3e6]): a clear error."""
    from hf_polyhe.approx import fit_newton_reciprocal

    with pytest.raises(ValueError, match=r"hi/lo = 1\.91e\+09.*Narrow it.*calibration_data=.*RangeLossConfig"):
        fit_newton_reciprocal((6.8e-4, 1.3e6))
