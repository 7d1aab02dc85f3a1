"""Backends: ``plain`` (float64 numpy, the reference) and ``openfhe`` (CKKS). Same primitive interface."""

from .plain import PlainBackend, run_plain

__all__ = ["PlainBackend", "run_plain"]
