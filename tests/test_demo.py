"""The demo's building blocks on a short budget (the full demo is `make demo`)."""

import os

import pytest

from hf_polyhe.demo import run_demo

os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_demo_short_run_is_polynomial_and_close(capsys):
    result = run_demo(steps=40, max_new_tokens=4, verbose=False, encrypted=False)
    out = capsys.readouterr().out
    assert result["fully_polynomial"]  # made polynomial by PolyReplacementCallback during training
    assert "Greedy generation, side by side" in out
    # the polynomial GELU, fitted on the range it sees, stays within 2% perplexity of the exact one
    assert abs(result["ppl_poly"] / result["ppl_exact"] - 1) < 0.02


@pytest.mark.slow
def test_demo_fast_encrypted_generation_matches_plaintext(capsys):
    result = run_demo(steps=40, max_new_tokens=2, verbose=False, fast=True, encrypted_tokens=2)
    out = capsys.readouterr().out
    assert "INSECURE" in out and "encrypted :" in out
    assert result["encrypted_matches"], (result["encrypted_ids"], result["plain_ids"])
