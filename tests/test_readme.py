"""The README's usage and training examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# this checkout's hf_polyhe, not whichever copy is installed
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(README.parent)}


def _python_blocks() -> list:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks


def test_readme_usage_example_runs(tmp_path):
    code = _python_blocks()[0].replace("/tmp/poly-gpt", str(tmp_path / "poly-gpt"))
    assert len(code.strip().splitlines()) <= 12
    assert "calibration_data=" in code  # the quick path calibrates (default intervals give NaN on real checkpoints)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "never saw calibration data" not in proc.stderr
    assert "model is fully polynomial" in proc.stdout
    # torch pads the printed ids to a common width once one has 3 digits (the example's model is random)
    assert re.search(r"tensor\(\[\[\s*1,\s+2,\s+3(,\s+\d+){5}\]\]\)", proc.stdout), proc.stdout[-500:]
    assert (tmp_path / "poly-gpt" / "config.json").exists()


def test_readme_training_example_runs(tmp_path):
    """The plain-Trainer example: PolyReplacementCallback() with its default schedule makes the model fully
    polynomial during training (every stage started before the end, none replaced untrained)."""
    code = next(b for b in _python_blocks() if "PolyReplacementCallback()" in b)
    code = code.replace("/tmp/poly-train", str(tmp_path / "poly-train"))
    assert "Trainer(" in code and "PolyTrainer" not in code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model is fully polynomial" in proc.stdout, proc.stdout[-2000:]
    assert "replacing them untrained" not in proc.stderr


def test_readme_client_server_example_runs(tmp_path):
    """The he.Client / he.Server example, on a tiny export made here, with the INSECURE toy parameters in place
    of the 128-bit ones (128-bit keys take minutes; the code path is the same)."""
    code = next(b for b in _python_blocks() if "Client.keygen(" in b)
    assert 'Client.keygen(export, "default")' in code
    code = code.replace('Client.keygen(export, "default")', 'Client.keygen(export, "toy")')
    make = ("import torch, hf_polyhe\n"
            "cfg = hf_polyhe.PolyGPTConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,\n"
            "    intermediate_size=8, max_position_embeddings=8, attention_type='pointwise', attention_activation='square',\n"
            "    norm_type='batchnorm', hidden_act='square')\n"
            "model = hf_polyhe.to_polynomial(hf_polyhe.PolyGPTForCausalLM(cfg).eval())\n"
            "hf_polyhe.save_encrypted_pipeline(model, None, 'exports/poly-gpt', max_length=8)\n")
    check = ("\nplain_ids, _ = Client.plain(export).generate(Client.plain(export).server(), prompt_ids, max_new_tokens=4)\n"
             "assert ids == plain_ids, (ids, plain_ids)\n"
             "assert info['encrypted'] and logits.shape == (32,)\n"
             "print('client/server example ok')\n")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", make + code + check], capture_output=True, text=True,
                          timeout=600, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "client/server example ok" in proc.stdout
