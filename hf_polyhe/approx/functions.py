"""Exact numpy versions of the non-polynomial operators we approximate (names match ``hf_polyhe.nn``)."""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def relu(x):
    return np.maximum(x, 0.0)


def squared_relu(x):
    return np.maximum(x, 0.0) ** 2


def gelu(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_new(x):
    """GPT-2's tanh approximation of GELU."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    x = np.asarray(x, dtype=np.float64)
    return x / (1.0 + np.exp(-x))


def tanh(x):
    return np.tanh(x)


def exp(x):
    return np.exp(x)


def inv_sqrt(x):
    return 1.0 / np.sqrt(x)


def reciprocal(x):
    return 1.0 / np.asarray(x, dtype=np.float64)


def sign(x):
    return np.sign(x)


EXACT_FUNCTIONS = {
    "relu": relu,
    "squared_relu": squared_relu,
    "gelu": gelu,
    "gelu_new": gelu_new,
    "silu": silu,
    "tanh": tanh,
    "exp": exp,
    "inv_sqrt": inv_sqrt,
    "reciprocal": reciprocal,
    "sign": sign,
}
