"""Encrypted pipelines: registration, loading (export dir / model object), outputs, kwargs, keys, progress.

Encrypted runs use toy CKKS parameters (insecure, by name, with a warning) on 1-layer d=8 models whose depth
fits a leveled toy ring: BatchNorm-style affine norms, square attention and activations."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # OpenFHE's OpenMP threads crawl on a busy 2-core machine

import stat  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import pipeline  # noqa: E402
from transformers.pipelines import PIPELINE_REGISTRY  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.he.errors import ToyParametersWarning  # noqa: E402
from hf_polyhe.pipelines import EncryptedExport, PIPELINES, write_pipeline_config  # noqa: E402

WORDS = "the a cat dog sat ran on mat fast slow big small red blue and".split()
HE_FRIENDLY = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                   attention_type="pointwise", attention_activation="square", attention_scaling="length",
                   norm_type="batchnorm", hidden_act="square", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def make_model(family: str):
    torch.manual_seed(0)
    V = len(WORDS) + 3
    if family == "gpt":
        model = hf_polyhe.PolyGPTForCausalLM(hf_polyhe.PolyGPTConfig(vocab_size=V, max_position_embeddings=8, eos_token_id=2,
                                                                     pad_token_id=0, **HE_FRIENDLY))
        batch = {"input_ids": torch.randint(3, V, (16, 6))}
    elif family == "bert":
        model = hf_polyhe.PolyBertForSequenceClassification(hf_polyhe.PolyBertConfig(
            vocab_size=V, max_position_embeddings=8, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
            label2id={"neg": 0, "neu": 1, "pos": 2}, **HE_FRIENDLY))
        batch = {"input_ids": torch.randint(3, V, (16, 6))}
    else:
        model = hf_polyhe.PolyViTForImageClassification(hf_polyhe.PolyViTConfig(
            image_size=8, patch_size=4, num_channels=3, num_labels=4, **HE_FRIENDLY))
        batch = {"pixel_values": torch.randn(16, 3, 8, 8)}
    model.train()
    with torch.no_grad():  # BatchNorm running statistics
        for _ in range(3):
            model(**batch)
    model.eval()
    hf_polyhe.to_polynomial(model)
    return model


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for family in ("gpt", "bert", "vit"):
        model = make_model(family)
        d = root / family
        hf_polyhe.save_encrypted_pipeline(model, tok if family != "vit" else None, d, max_length=4 if family != "vit" else None)
        write_pipeline_config(d)
        out[family] = (model, d)
    return out


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("keys")


def toy_pipe(task, model, key_dir, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        return pipeline(task, model=model, he_params="toy", key_dir=str(key_dir), **kw)


def test_tasks_are_registered_in_v5_form():
    tasks = PIPELINE_REGISTRY.get_supported_tasks()
    for task, cls in PIPELINES.items():
        assert task in tasks
        impl = PIPELINE_REGISTRY.supported_tasks[task]
        assert impl["impl"] is cls and impl["pt"] == (EncryptedExport,)


@torch.no_grad()
def test_text_classification_plain_backend_kwargs_and_batching(exports, tok):
    model, d = exports["bert"]
    pipe = pipeline("encrypted-text-classification", model=str(d), backend="plain")
    assert pipe.tokenizer is not None  # loaded from the export's client/ directory
    text = "the cat sat"
    ids = torch.tensor([tok(text)["input_ids"]])
    expected = torch.softmax(model.double()(input_ids=ids).logits[0], -1).numpy()
    (out,) = pipe(text)
    assert out["label"] == ["neg", "neu", "pos"][int(expected.argmax())]
    assert out["score"] == pytest.approx(expected.max(), rel=1e-6)
    assert out["he"]["backend"] == "plain" and out["he"]["encrypted"] is False
    top = pipe(text, top_k=2)
    assert [t["score"] for t in top] == pytest.approx(sorted(expected)[::-1][:2], rel=1e-6)
    many = pipe(["the cat sat", "a dog ran fast"], batch_size=2)
    assert len(many) == 2 and all("label" in m for m in many)
    with pytest.raises(ValueError, match="at most 4"):
        pipe("the cat sat on the mat")
    assert pipe("the cat sat on the mat", truncation=True)[0]["label"] in ("neg", "neu", "pos")


def test_text_classification_encrypted_keys_cached_and_reused(exports, key_dir, caplog):
    model, d = exports["bert"]
    pipe = toy_pipe("encrypted-text-classification", str(d), key_dir)
    (out,) = pipe("a big red dog")
    plain = pipeline("encrypted-text-classification", model=str(d), backend="plain")("a big red dog")[0]
    assert out["label"] == plain["label"] and out["score"] == pytest.approx(plain["score"], abs=1e-6)
    he = out["he"]
    assert he["encrypted"] and he["backend"] == "openfhe" and "NONE" in he["security"]
    assert he["levels"] > 0 and he["rotation_keys"] > 0 and he["counts"]["depth"] > 0
    assert set(he["timings"]) >= {"encrypt_s", "server_s", "decrypt_s", "total_s", "by_block"}
    secrets = list(key_dir.rglob("secret_key.bin"))
    assert len(secrets) == 1
    assert stat.S_IMODE(secrets[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets[0].parent.stat().st_mode) == 0o700
    assert not any("secret" in p.name for p in (secrets[0].parent.parent / "server_bundle").iterdir())
    assert "generating toy CKKS keys" in caplog.text  # a log record (logging), not a print
    caplog.clear()
    mtime = secrets[0].stat().st_mtime_ns
    again = toy_pipe("encrypted-text-classification", str(d), key_dir, verbose=False)
    assert again.client.key_tag == pipe.client.key_tag  # cached keys, not new ones
    assert secrets[0].stat().st_mtime_ns == mtime and "generating" not in caplog.text
    # existing keys by directory (as written by `hf-polyhe keygen`) or as a client object
    by_dir = toy_pipe("encrypted-text-classification", str(d), secrets[0].parent, verbose=False)
    assert by_dir.client.key_tag == pipe.client.key_tag
    by_obj = toy_pipe("encrypted-text-classification", str(d), key_dir, client=pipe.client)
    assert by_obj.client is pipe.client


@torch.no_grad()
def test_text_generation_on_the_fly_export_matches_generate(exports, tok, key_dir, capsys):
    model, _ = exports["gpt"]
    pipe = toy_pipe("encrypted-text-generation", model, key_dir, tokenizer=tok, max_length=4)
    prompt = "the cat"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    ref = model.float().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
    (out,) = pipe(prompt, max_new_tokens=2, eos_token_id=-1)
    assert out["he"]["token_ids"] == ref[0].tolist()
    assert out["generated_text"].startswith(prompt)
    assert out["he"]["new_tokens"] == 2 and len(out["he"]["timings"]["per_token_s"]) == 2
    err = capsys.readouterr().err
    assert "encrypted generation" in err and "layer" in err  # tqdm per token and per layer


def test_text_generation_sampling_kwargs_and_lists(exports):
    _, d = exports["gpt"]
    pipe = pipeline("encrypted-text-generation", model=str(d), backend="plain", verbose=False)
    a = pipe("the cat", max_new_tokens=2, do_sample=True, temperature=0.7, top_k=3, seed=1)
    b = pipe("the cat", max_new_tokens=2, do_sample=True, temperature=0.7, top_k=3, seed=1)
    assert a[0]["generated_text"] == b[0]["generated_text"]
    both = pipe(["the cat", "a dog"], max_new_tokens=1)
    assert len(both) == 2 and both[1][0]["generated_text"].startswith("a dog")
    assert pipe("the cat", max_new_tokens=2, return_full_text=False)[0]["generated_text"] != ""
    with pytest.raises(ValueError, match="exceeds the export.s max_length 4"):
        pipe("the cat sat on", max_new_tokens=2)
    with pytest.raises(TypeError, match="unexpected arguments"):
        pipe("the cat", num_beamz=2)
    with pytest.raises(ValueError, match="beam search"):
        pipe("the cat", num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens. must be greater than 0"):  # GenerationConfig's check
        pipe("the cat", max_new_tokens=-1)


@torch.no_grad()
def test_text_generation_uses_transformers_generation_options(exports, tok):
    """Token choice on decrypted logits goes through transformers' processors: the same options give
    model.generate's tokens; stopping criteria and a GenerationConfig are honoured; unsupported ones refused."""
    from transformers import GenerationConfig, StoppingCriteria

    model, d = exports["gpt"]
    pipe = pipeline("encrypted-text-generation", model=str(d), backend="plain", verbose=False)
    prompt = "the cat"
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    opts = dict(repetition_penalty=1.7, no_repeat_ngram_size=1)
    ref = model.float().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, **opts)
    (out,) = pipe(prompt, max_new_tokens=2, eos_token_id=-1, **opts)
    assert out["he"]["token_ids"] == ref[0].tolist()
    assert len(set(out["he"]["token_ids"])) == 4  # no_repeat_ngram_size=1: no token twice
    (by_config,) = pipe(prompt, generation_config=GenerationConfig(max_new_tokens=2, eos_token_id=-1, **opts))
    assert by_config["he"]["token_ids"] == ref[0].tolist()
    (short,) = pipe(prompt, max_length=3, eos_token_id=-1)  # max_length counts the prompt, as in generate()
    assert len(short["he"]["token_ids"]) == 3

    class StopAfterOne(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3, dtype=torch.bool)

    (stopped,) = pipe(prompt, max_new_tokens=2, eos_token_id=-1, stopping_criteria=[StopAfterOne()])
    assert stopped["he"]["new_tokens"] == 1
    draw = dict(max_new_tokens=2, do_sample=True, top_p=0.9, top_k=0, temperature=0.8, seed=4)
    assert pipe(prompt, **draw)[0]["he"]["token_ids"] == pipe(prompt, **draw)[0]["he"]["token_ids"]
    with pytest.raises(ValueError, match="does not support"):
        pipe(prompt, max_new_tokens=2, diversity_penalty=0.5)


def test_verbose_false_silences_progress(exports, capsys):
    _, d = exports["gpt"]
    pipe = pipeline("encrypted-text-generation", model=str(d), backend="plain")
    pipe("the cat", max_new_tokens=2)
    assert "generation" in capsys.readouterr().err
    pipe.verbose = False
    pipe("the cat", max_new_tokens=2)
    assert capsys.readouterr().err == ""


@torch.no_grad()
def test_image_classification_encrypted(exports, key_dir):
    model, d = exports["vit"]
    pixels = torch.randn(3, 8, 8, dtype=torch.float64)
    expected = torch.softmax(model.double()(pixel_values=pixels[None]).logits[0], -1).numpy()
    pipe = toy_pipe("encrypted-image-classification", str(d), key_dir, verbose=False)
    out = pipe(pixels.numpy(), top_k=2)
    assert len(out) == 2
    assert out[0]["label"] == model.config.id2label[int(expected.argmax())]
    assert out[0]["score"] == pytest.approx(expected.max(), abs=1e-5)
    assert out[0]["he"]["seq_len"] == 5  # CLS + 4 patches
    plain = pipeline("encrypted-image-classification", model=str(d), backend="plain")
    assert len(plain([pixels.numpy(), pixels.numpy()])) == 2
    # a batch array is one result per image (it used to classify the first image only)
    two = torch.stack([pixels, -pixels])
    batch = plain(two.numpy(), top_k=1)
    expected2 = model.double()(pixel_values=two).logits.argmax(-1).tolist()
    assert len(batch) == 2 and [b[0]["label"] for b in batch] == [model.config.id2label[i] for i in expected2]


def test_wrong_task_and_security_defaults(exports, tmp_path):
    _, d = exports["bert"]
    with pytest.raises(ValueError, match="needs a 'gpt' export"):
        pipeline("encrypted-text-generation", model=str(d))
    with pytest.warns(ToyParametersWarning):
        pipeline("encrypted-text-classification", model=str(d), he_params="toy", key_dir=str(tmp_path))
    pipe = pipeline("encrypted-text-classification", model=str(d), key_dir=str(tmp_path))
    assert pipe.he_params.security == "HEStd_128_classic"  # 128-bit unless toy is asked for by name
    with pytest.raises(ValueError, match="he_params must be"):
        pipeline("encrypted-text-classification", model=str(d), he_params="fast")


def test_toy_parameters_warn_once_per_run(exports, tmp_path):
    """Planning, loading the plan and key generation each warn; Python's default filter shows one warning."""
    import subprocess
    import sys

    _, d = exports["bert"]
    code = ("import hf_polyhe; from transformers import pipeline\n"
            f"pipe = pipeline('encrypted-text-classification', model={str(d)!r}, he_params='toy', "
            f"key_dir={str(tmp_path)!r}, verbose=False)\n"
            "print(pipe('the cat sat')[0]['label'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("ToyParametersWarning") == 1, r.stderr[-3000:]


def test_key_cache_location_follows_the_environment(monkeypatch, tmp_path):
    from hf_polyhe.he.runtime.keys import default_key_dir

    for var in ("HF_POLYHE_KEY_DIR", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert default_key_dir() == os.path.join(os.path.expanduser("~"), ".cache", "hf_polyhe", "keys")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_key_dir() == str(tmp_path / "xdg" / "hf_polyhe" / "keys")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_key_dir() == str(tmp_path / "hf" / "hf_polyhe" / "keys")
    monkeypatch.setenv("HF_POLYHE_KEY_DIR", str(tmp_path / "mine"))
    assert default_key_dir() == str(tmp_path / "mine")
