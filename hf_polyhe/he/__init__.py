"""Torch-free encrypted runtime: circuit IR, packing, CKKS planner, plain and OpenFHE backends, Client/Server.

Imports numpy (and ``hf_polyhe.approx``) only; ``openfhe`` is imported lazily by the OpenFHE backend and the
Client/Server roles, with a clear error when it is unavailable.
"""

from . import params
from .errors import (BackendUnavailable, CircuitError, HEError, KeyMismatchError, LayoutError, PlanningError,
                     RangeViolation, SerializationError, ToyParametersWarning)
from .interpreter import Evaluator, Packed, run_reference
from .ir import IR_VERSION, Circuit, Node
from .ops import OPS, register_op
from .packing import ColumnVector, MatrixLayout, ScoreLayout, TiledVector
from .backends.plain import PlainBackend, run_plain
from .planner import Plan, plan

__all__ = [
    "params", "BackendUnavailable", "CircuitError", "HEError", "KeyMismatchError", "LayoutError", "PlanningError",
    "RangeViolation", "SerializationError", "ToyParametersWarning", "Evaluator", "Packed", "run_reference",
    "IR_VERSION", "Circuit", "Node", "OPS", "register_op", "MatrixLayout", "ScoreLayout", "TiledVector",
    "ColumnVector", "PlainBackend",
    "run_plain", "Plan", "plan", "Client", "Server",
]


def __getattr__(name):  # Client/Server need openfhe: import lazily
    if name in ("Client", "Server"):
        from . import roles

        return getattr(roles, name)
    raise AttributeError(name)
