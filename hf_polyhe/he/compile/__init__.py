"""Stage 2 -- compiling a model into planned circuits (no keys, no OpenFHE).

- :mod:`.transformer`: :class:`~.transformer.TransformerSpec` (the exported architecture, polynomials and
  weights) and :func:`~.transformer.build_circuit`: the full forward / KV-cache prefill of any prompt length.
- :mod:`.decode`: the decode step of generation with an encrypted KV cache.
- :mod:`.planner`: levels, bootstraps, rotation keys, CKKS parameters and predicted seconds of ONE circuit,
  from a measured cost table (``cost_table.json``).
- :mod:`.plaintexts`: :func:`~.plaintexts.compile_evaluator`: a planned circuit's plaintexts encoded once, when a
  server builds its evaluator (the only part of this stage that touches a backend).
- :mod:`.export_plan`: :class:`~.export_plan.ExportPlan`: one parameter and key set for EVERY circuit an export's
  server may run, and the report ``hf-polyhe inspect`` prints.
"""
