"""Stage 1 -- describing a circuit: what is computed, and how tensors lie in CKKS slots.

- :mod:`.ir`: :class:`~.ir.Circuit`, a graph of HE-level ops (linear, poly, products, row sums, attention
  scores, ...) with its weights; saved as JSON + safetensors.
- :mod:`.packing`: how a tensor is packed into slot vectors (matrix, score and one-row vector layouts).
- :mod:`.ops`: every op's semantics: shape/layout rules, levels, the numpy reference and the packed algorithm
  on a backend's primitives.
- :mod:`.evaluator`: :class:`~.evaluator.Evaluator` walks a circuit on a backend (plain, OpenFHE, or the
  planner's trace).
- :mod:`.optimize`: folds plaintext affine maps into neighbouring linears (no level spent).

Nothing here knows about keys, models or files beyond the circuit itself.
"""
