"""The recipes' tiny presets run end to end (with very few steps) and write model cards with their numbers."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--tiny", "--steps", "12", "--poly-steps", "12", "--eval-samples", "40"]
CARD_SECTIONS = ("Model description", "Intended use", "How to use", "Training", "Evaluation", "Polynomial operators",
                 "Threat model", "Limitations")


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, tmp_path):
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _check_card(out: Path, results: dict, run_snippet: bool = False):
    """The card is Hub-form (it parses with huggingface_hub, licence, data, model-index, no pipeline_tag), has every
    section, shows every measured number, and -- with ``run_snippet`` -- its how-to-use snippet runs."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "card" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    # no widget can serve these models (they need hf_polyhe, and keys when encrypted): no task, inference off
    assert "pipeline_tag" not in meta and meta["inference"] is False
    # the tiny presets' data ships with packages, not on the Hub: no invented dataset ids, a statement instead
    assert not meta.get("datasets") and "The data is not on the Hub" in card.text
    assert "base_model" not in meta  # trained from scratch
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] and result["dataset"]["name"] and result["dataset"]["type"]
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert {n.split(" ")[0] for n in values} == {"P0", "P2"} and len(card.data.eval_results) == 2
    measured = {float(f"{v:.4g}") for v in results.values() if isinstance(v, float)}
    assert set(values.values()) <= measured
    headings = re.findall(r"^## (.+)$", card.text, flags=re.M)
    assert all(s in headings for s in CARD_SECTIONS), headings
    for key, value in results.items():
        if isinstance(value, float):
            assert f"{value:.4g}" in card.text, key
    if run_snippet:
        snippet = re.search(r"```python\n(.*?)```", card.text, flags=re.S).group(1)
        # the card's snippet encrypts at 128-bit; here its encrypted part runs on the plain float64 backend instead
        # (same export, pipeline and packing, no keys): 128-bit keys take minutes, and the tiny GPT and BERT have no
        # 128-bit plan within 24 GiB (the card says so, and the snippet's comment)
        assert snippet.count('he_params="default"') == 1
        snippet = snippet.replace('he_params="default"', 'backend="plain"')
        proc = subprocess.run([sys.executable, "-c", snippet], cwd=out, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (snippet, proc.stdout[-2000:], proc.stderr[-4000:])
        assert proc.stdout.strip()


def _check_outputs(out: Path, metric_word: str, run_snippet: bool = False):
    import hf_polyhe
    from transformers import AutoConfig

    results = json.loads((out / "card" / "results.json").read_text())
    assert any(metric_word in k for k in results)
    _check_card(out, results, run_snippet)
    # load the saved model as the class it was saved from (AutoModel would add e.g. ViT's unused pooler)
    (architecture,) = AutoConfig.from_pretrained(out / "poly_model").architectures
    model = getattr(hf_polyhe, architecture).from_pretrained(out / "poly_model")
    assert hf_polyhe.polynomial_status(model).is_polynomial
    return results


@pytest.mark.parametrize("recipe,metric", [("poly_vit_images.py", "accuracy"), ("poly_bert_glue.py", "accuracy"),
                                           ("poly_gpt_wikitext.py", "perplexity")])
def test_tiny_preset_runs(tmp_path, recipe, metric):
    out = tmp_path / "run"
    _run([sys.executable, str(ROOT / "recipes" / recipe), *FAST, "--export", "--output-dir", str(out)], tmp_path)
    results = _check_outputs(out, metric, run_snippet=True)
    # equal budgets: the exact baseline and P1 trained on with exact operators get as many steps as P2 in total, so
    # P2 minus the latter is the polynomials' cost alone
    (key,) = [k for k in results if k.startswith("training steps ")]
    totals = {name: sum(int(n) for n in part.split(" (")[0].split(" + "))
              for name, part in zip(key[len("training steps "):].split(" / "), results[key].split(" / "))}
    assert totals["P2"] == totals["P1 same total"] == totals.get("P0 same budget", totals["P0"]) == max(totals.values())
    assert totals["P1"] < totals["P2"]
    assert any(k.startswith("P1 HE-friendly, exact operators, same total steps as P2") for k in results)
    # the exported circuit reproduces the polynomial torch model (plain CKKS-packing backend)
    assert results["export: max rel. error of circuit (plain backend) vs torch"] <= 1e-6
    # the card carries the export's 128-bit plan (or the reason there is none), with its server's predicted memory
    assert any(k.startswith("128-bit plan") for k in results)
    if "128-bit plan (HEStd_128_classic)" in results:
        assert "Predicted server memory: ~" in (out / "card" / "README.md").read_text()


def test_recipe_encrypted_evaluation_on_ciphertexts(tmp_path):
    """--encrypted-samples runs held-out samples on CKKS (toy parameters here: a smaller ViT keeps it quick) and
    the card reports the measured latency, the ring and the error against the plain polynomial circuit."""
    out = tmp_path / "run"
    _run([sys.executable, str(ROOT / "recipes" / "poly_vit_images.py"), *FAST, "--layers", "1", "--hidden", "16",
          "--heads", "2", "--mlp", "32", "--degree", "7", "--export", "--encrypted-samples", "1", "--he-params", "toy",
          "--output-dir", str(out)], tmp_path)
    results = _check_outputs(out, "accuracy")
    tag = "encrypted (toy params, INSECURE)"
    assert results[f"{tag}: max error / logit range vs plain circuit"] <= 1e-2
    assert results[f"{tag}: argmax agreement"] == 1.0
    assert results[f"{tag}: measured seconds per input (mean of 1)"] > 0
    assert results[f"{tag}: ring / levels / mode"].startswith("2^12 / ")
    plan_row = results["128-bit plan (HEStd_128_classic)"]
    assert plan_row.startswith("ring 2^") and "rotation keys" in plan_row
    # the card gives the plan and the measured run in words
    card = (out / "card" / "README.md").read_text()
    assert "Encrypted inference at 128-bit security (HEStd_128_classic):** CKKS ring 2^" in card and "rotation keys" in card
    assert "Measured on ciphertexts** (OpenFHE CKKS, INSECURE toy parameters" in card


def test_yaml_config_and_two_process_torchrun(tmp_path):
    """Two CPU processes (gloo) through torchrun, arguments from a YAML config."""
    config = tmp_path / "tiny.yaml"
    config.write_text("tiny: true\nsteps: 8\npoly-steps: 8\neval_samples: 20\nuse_cpu: true\n")
    out = tmp_path / "run2"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    with socket.socket() as sock:  # a free port: a fixed one may be taken on a shared machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(ROOT / "recipes" / "poly_gpt_wikitext.py"),
          "--config", str(config), "--output-dir", str(out)], tmp_path)
    _check_outputs(out, "perplexity")


def test_unknown_yaml_key_is_an_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("tiny: true\nlearning_rat: 0.1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "poly_gpt_wikitext.py"), "--config", str(config)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown keys" in proc.stderr and "learning_rat" in proc.stderr


def test_distillation_recipe_tiny_preset(tmp_path):
    """recipes/poly_bert_distill.py --tiny: a tiny BERT distilled into a fully polynomial PolyBert; every held-out
    embedding finite at both lengths, the results name the four models, and the export reproduces torch."""
    out = tmp_path / "run"
    _run([sys.executable, str(ROOT / "recipes" / "poly_bert_distill.py"), *FAST, "--export",
          "--output-dir", str(out)], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["fully polynomial"] is True
    assert results["teacher"].startswith("tiny random BERT")
    for name in ("HE-friendly conversion, before training", "P1 distilled, exact operators", "P2 fully polynomial"):
        assert set(results[name]) == {"32", "64"}, name  # the served length and twice it
        for m in results[name].values():
            assert m["nonfinite"] == 0 and m["n"] == 40 and -1.0 <= m["cos_mean"] <= 1.0
    assert results["exact conversion (softmax, exact norms)"]["32"]["cos_mean"] > 0.9999
    assert results["export"]["task"] == "encrypted-feature-extraction"
    assert results["export"]["max_rel_error_plain_backend"] <= 1e-6
    assert results["range_loss (alpha, beta)"] == {"P1": [1e-2, 1e-3], "P2": [1e-2, 1e-3]}  # the tiny preset's
    import hf_polyhe

    model = hf_polyhe.PolyBertModel.from_pretrained(out / "poly_model")
    assert hf_polyhe.polynomial_status(model).is_polynomial


def test_distillation_recipe_p1_only_and_student_options(tmp_path):
    """--poly-steps 0 stops after P1 (no P2 rows, not polynomial); --poly-degrees and --dropout reach the student's
    config; bad values and --export without P2 are refused before any training."""
    recipe = str(ROOT / "recipes" / "poly_bert_distill.py")
    out = tmp_path / "run"
    _run([sys.executable, recipe, "--tiny", "--steps", "2", "--poly-steps", "0", "--eval-samples", "8",
          "--poly-degrees", "gelu=31", "--dropout", "0.05", "--output-dir", str(out)], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert "P1 distilled, exact operators" in results and not any(k.startswith("P2") for k in results)
    assert results["fully polynomial"] is False and results["steps"]["P2"] == 0
    assert results["student"] == {"dropout": 0.05, "poly_degrees": {"gelu": 31}, "attention_mse": 0.0}
    config = json.loads((out / "poly_model" / "config.json").read_text())
    assert config["poly_degrees"] == {"gelu": 31} and config["hidden_dropout_prob"] == 0.05
    for bad, message in ((["--export", "--poly-steps", "0"], "--poly-steps must be > 0"),
                         (["--poly-degrees", "gelu=x"], "op=degree"), (["--poly-degrees", "gelu=0"], ">= 1")):
        proc = subprocess.run([sys.executable, recipe, "--tiny", *bad], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, (bad, proc.stderr[-2000:])
