"""Torch-free encrypted runtime: from an exported model to CKKS ciphertexts and back.

Three stages, one sub-package each, plus the arithmetic under them::

    circuit/   describing a circuit: IR, packing, op semantics, the evaluator, plaintext folding
    compile/   compiling an export into planned circuits: transformer / decode circuits, planner, ExportPlan
    runtime/   running with keys: Client (secret key), Server (evaluation keys), the wire format, key files
    backends/  plain (float64 reference) and openfhe (CKKS), behind one primitive interface

The public names::

    export = Export("exports/poly-gpt")            # an export directory (save_encrypted_pipeline)
    client = Client.keygen(export, "default")    # 128-bit keys for every circuit of the export
    server = client.server()                       # or Server(bundle_dir, spec=export) elsewhere
    ids, info = client.generate(server, prompt_ids, max_new_tokens=4)

Imports numpy, safetensors and ``hf_polyhe.approx`` only; ``openfhe`` is imported when keys or ciphertexts are
first needed, with a clear error when it is unavailable.
"""

from . import params
from .backends.plain import PlainBackend, run_plain
from .circuit.evaluator import Evaluator, Packed, run_reference
from .circuit.ir import IR_VERSION, Circuit, Node
from .circuit.ops import OPS, register_op
from .circuit.packing import ColumnVector, MatrixLayout, ScoreLayout, TiledVector
from .compile.export_plan import ExportPlan, plan_for_export, plan_report
from .compile.plaintexts import compile_evaluator
from .compile.planner import Plan, plan
from .errors import (BackendUnavailable, CircuitError, HEError, KeyMismatchError, LayoutError, PlanningError,
                     RangeViolation, SerializationError, StreamError, ToyParametersWarning)
from .export import Export
from .runtime.ciphertext import EncryptedTensor
from .runtime.client import Client
from .runtime.protocol import ServerProtocol
from .runtime.server import PlainServer, Server

__all__ = [
    "params", "Export", "Client", "Server", "PlainServer", "ServerProtocol", "EncryptedTensor", "ExportPlan",
    "plan_for_export", "plan_report", "BackendUnavailable", "CircuitError", "HEError", "KeyMismatchError",
    "LayoutError", "PlanningError", "RangeViolation", "SerializationError", "StreamError", "ToyParametersWarning",
    "Evaluator", "Packed", "run_reference", "IR_VERSION", "Circuit", "Node", "OPS", "register_op", "MatrixLayout",
    "ScoreLayout", "TiledVector", "ColumnVector", "PlainBackend", "run_plain", "Plan", "plan", "compile_evaluator",
]
