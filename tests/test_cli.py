"""`hf-polyhe` verbs: export, inspect, keygen, encrypt / run / decrypt (toy parameters), and the parser.
`serve` is exercised in test_serving.py, `demo` in test_demo.py."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import stat  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from test_pipelines import make_model, word_tokenizer  # noqa: E402
from transformers import pipeline  # noqa: E402

from hf_polyhe.cli import build_parser, main  # noqa: E402
from hf_polyhe.he.errors import ToyParametersWarning  # noqa: E402

VERBS = ["export", "inspect", "keygen", "encrypt", "run", "decrypt", "serve", "demo"]


def test_parser_has_every_verb(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
    args = build_parser().parse_args(["serve", "exp", "--port", "9000"])
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    assert build_parser().parse_args(["demo"]).fast is False  # 128-bit unless --fast is asked for


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_model("bert")
    model.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    assert main(["export", str(root / "model"), str(root / "export"), "--max-length", "4"]) == 0
    return root


def test_export_then_pipeline_loads_it(exported, capsys):
    exp = exported / "export"
    assert (exp / "pipeline.json").exists() and (exp / "config.json").exists()
    assert (exp / "client" / "tokenizer.json").exists()
    pipe = pipeline("encrypted-text-classification", model=str(exp), backend="plain")
    assert pipe("the cat sat")[0]["label"] in ("neg", "neu", "pos")


def test_inspect_prints_the_plan(exported, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        assert main(["inspect", str(exported / "export"), "--toy"]) == 0
    out = capsys.readouterr()
    assert "encrypted-text-classification" in out.out and "rotation keys" in out.out and "full circuit" in out.out
    assert "INSECURE" in out.err


def test_keygen_encrypt_run_decrypt(exported, capsys):
    exp, keys = str(exported / "export"), exported / "keys"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        assert main(["keygen", exp, "--keys", str(keys), "--toy"]) == 0
        assert stat.S_IMODE((keys / "secret_key.bin").stat().st_mode) == 0o600
        assert not any("secret" in p.name for p in (keys / "server_bundle").iterdir())
        assert main(["encrypt", exp, "--keys", str(keys), "--text", "a big red dog", "--out", str(exported / "x.ct")]) == 0
        # the server side gets the public bundle only
        assert main(["run", exp, "--bundle", str(keys / "server_bundle"), "--in", str(exported / "x.ct"),
                     "--out", str(exported / "y.ct")]) == 0
        capsys.readouterr()
        assert main(["decrypt", exp, "--keys", str(keys), "--in", str(exported / "y.ct"), "--top-k", "3"]) == 0
    labels = json.loads(capsys.readouterr().out)
    plain = pipeline("encrypted-text-classification", model=exp, backend="plain")("a big red dog", top_k=None)
    assert [x["label"] for x in labels] == [x["label"] for x in plain]
    assert [x["score"] for x in labels] == pytest.approx([x["score"] for x in plain], abs=1e-6)
    # the input ciphertext is not logits: refused in one line (it used to print labels such as LABEL_71)
    capsys.readouterr()
    assert main(["decrypt", exp, "--keys", str(keys), "--in", str(exported / "x.ct")]) == 1
    err = capsys.readouterr().err
    assert "holds embeddings, expected logits" in err and "Traceback" not in err and err.count("\n") == 1


def test_help_version_and_argument_errors_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, hf_polyhe_cli\n"
            "for argv in (['--help'], ['--version'], ['export'], ['serve', '--help'], ['nope']):\n"
            "    try:\n"
            "        hf_polyhe_cli.main(argv)\n"
            "    except SystemExit as e:\n"
            "        print('exit', e.code)\n"
            "print('heavy', 'torch' in sys.modules, 'transformers' in sys.modules, 'hf_polyhe' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "heavy False False False"
    assert [x for x in lines if x.startswith("exit")] == ["exit 0", "exit 0", "exit 2", "exit 0", "exit 2"]
    assert "hf-polyhe " in r.stdout and "the following arguments are required" in r.stderr


def test_every_option_has_help_text():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    assert sorted(subs) == sorted(VERBS)
    for verb, p in subs.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{verb} {action.option_strings or action.dest} has no help text"


def test_user_errors_are_one_line_and_hub_mode_is_left_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-polyhe inspect: error:") and "not an encrypted pipeline export" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "HF_HUB_OFFLINE" not in os.environ  # the command does not force offline mode on its user
    with pytest.raises(Exception, match="not an encrypted pipeline export"):
        main(["--traceback", "inspect", str(tmp_path)])
