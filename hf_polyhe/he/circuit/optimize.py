"""Level-saving rewrites of a circuit: fold plaintext affine maps into the plaintext matmuls next to them.

Every ``mul_plain`` and every affine input map of a Chebyshev series costs one CKKS level, and the ring (hence
the price of every other op) grows with the levels a circuit needs. Most of those maps sit next to a
``linear``, whose weights can absorb them for free:

- **affine into the previous linear** -- ``linear(x, W, c) * s + b`` becomes ``linear(x, W diag(s), c s + b)``
  when the linear feeds nothing else (a norm right after a matmul, e.g. PolyGPT's MLP BatchNorm).
- **affine into the next linear** -- ``linear(x * s + b, W, c)`` becomes ``linear(x, diag(s) W, c + b W)``
  when every consumer of ``x * s + b`` is a ``linear`` (a pre-norm transformer's BatchNorm / LayerNorm
  gain and shift before Q/K/V and the MLP; also through a ``select_rows``, e.g. the final norm before the LM
  head). ``s``, ``b``: scalars or per-feature vectors. Saves the ``mul_plain``'s level.
- **linear into the next polynomial's domain** -- a Chebyshev series on ``[lo, hi]`` first maps its input to
  ``[-1, 1]`` (one level in ``EvalChebyshevSeries``); when its input is a ``linear`` used by nothing else,
  the map goes into that linear's weights and the series is evaluated on ``[-1, 1]``.
- **score scale into the attention activation's domain** -- the same map for a polynomial after
  ``qk_scores`` / ``qk_decode``: the factor joins the op's ``scale`` (already a plaintext multiply) and the
  offset becomes an ``add_plain`` (no level).
- **row-sum scale into the next polynomial's domain** -- the same for a polynomial after ``row_sum``,
  ``attn_rowsum`` or ``decode_rowsum`` (their ``scale`` is a plaintext multiply already), through any scalar
  ``add_plain`` between them (each shift is mapped too): a LayerNorm's variance ``row_sum -> + eps -> inv_sqrt``,
  power-softmax's ``attn_rowsum -> + eps -> reciprocal``. A Newton approximation (``newton_inv_sqrt``,
  ``newton_reciprocal``) folds its initial guess's map the same way; its steps read ``x`` back from ``t``
  through ``x_map`` (a scalar product on a level the initial guess leaves free). A ``row_sum`` is a base only
  over a matrix layout: over a tiled or column vector its sum lands in the padding slots too, where the folded
  shifts would not reach, so the polynomial would read values far outside its domain there.

Outputs and values named as outputs are never changed; the rewritten circuit computes the same outputs (up to
float64 rounding; ``tests/test_he_plain.py`` checks it against the unrewritten one) with fewer levels.
"""

from __future__ import annotations

import numpy as np

from hf_polyhe.approx.base import Approximation

from .ir import Circuit, Node

_DOMAIN_KINDS = ("chebyshev", "composite_sign")  # the input meets only the first stage
_NEWTON_KINDS = ("newton_inv_sqrt", "newton_reciprocal")  # the steps read x too: through x_map
_SCALED = ("qk_scores", "qk_decode", "row_sum", "attn_rowsum", "decode_rowsum")  # output linear in attrs["scale"]


def _consumers(circuit: Circuit) -> dict:
    uses = {}
    for node in circuit.nodes:
        for i in node.inputs:
            uses.setdefault(i, []).append(node)
    return uses


def _feature_vector(circuit: Circuit, node: Node, cols: int):
    """The plaintext operand of an ``add_plain``/``mul_plain`` as a ``(cols,)`` vector, or None when it varies
    by row (then it cannot move into a weight matrix)."""
    if "scalar" in node.attrs:
        return np.full(cols, float(node.attrs["scalar"]))
    v = np.asarray(circuit.weight(node.attrs["value"]), dtype=np.float64)
    if v.ndim == 0 or v.shape in ((cols,), (1, cols), (1,)):
        return np.broadcast_to(v.reshape(-1), (cols,)).astype(np.float64)
    return None


def _domain_map(approx: Approximation):
    lo, hi = approx.stages[0].interval
    return 2.0 / (hi - lo), -(hi + lo) / (hi - lo)


def _normalized_approx(approx: Approximation, alpha: float, beta: float) -> dict:
    """``approx`` fed ``t = alpha * x + beta`` instead of ``x``: its first stage on ``[-1, 1]``; a Newton kind's
    steps get ``x = (t - beta) / alpha`` through ``x_map``."""
    d = approx.to_dict()
    d["stages"][0]["interval"] = [-1.0, 1.0]
    d["interval"] = [-1.0, 1.0] if approx.kind in ("chebyshev",) + _NEWTON_KINDS else d["interval"]
    if approx.kind in _NEWTON_KINDS:
        a, b = approx.x_map
        d["x_map"] = [a / alpha, b - a * beta / alpha]
    d.setdefault("meta", {})["folded_input_map"] = [alpha, beta]
    return d


def _shift_chain(src: Node, by_name: dict, uses: dict, outputs: set):
    """The scalar ``add_plain`` nodes from ``src`` back (each the only consumer's input, none an output) and the
    node before them."""
    chain = []
    while (src is not None and src.op == "add_plain" and "scalar" in src.attrs and src.name not in outputs
           and len(uses[src.name]) == 1):
        chain.append(src)
        src = by_name.get(src.inputs[0])
    return chain, src


def _new_weight(circuit: Circuit, value) -> str:
    k = len(circuit.weights)
    while f"folded{k}" in circuit.weights:
        k += 1
    return circuit.add_weight(value, f"folded{k}")


def _set_linear(circuit: Circuit, node: Node, W: np.ndarray, bias: np.ndarray | None):
    node.attrs["weight"] = _new_weight(circuit, W)
    if bias is None:
        node.attrs.pop("bias", None)
    else:
        node.attrs["bias"] = _new_weight(circuit, bias)


def _linear_wb(circuit: Circuit, node: Node):
    W = circuit.weight(node.attrs["weight"])
    b = circuit.weight(node.attrs["bias"]) if "bias" in node.attrs else None
    return W, b


def _fold_affine_into_linears(circuit: Circuit, outputs: set) -> int:
    folded = 0
    changed = True
    while changed:
        changed = False
        drop_dead(circuit)
        uses = _consumers(circuit)
        by_name = {n.name: n for n in circuit.nodes}
        lay = circuit.layouts()
        for node in circuit.nodes:
            if node.op not in ("mul_plain", "add_plain") or node.name in outputs:
                continue
            # the affine chain ending at `node`: [mul_plain] -> [add_plain]
            chain = [node]
            src = by_name.get(node.inputs[0])
            if node.op == "add_plain" and src is not None and src.op == "mul_plain" and len(uses[src.name]) == 1 \
                    and src.name not in outputs:
                chain = [src, node]
            x = chain[0].inputs[0]
            cols = lay[x].cols if lay[x].kind in ("matrix", "tiled", "column") else None
            if cols is None:
                continue
            scale, shift = np.ones(cols), np.zeros(cols)
            ok = True
            for n in chain:
                v = _feature_vector(circuit, n, cols)
                if v is None:
                    ok = False
                    break
                if n.op == "mul_plain":
                    scale, shift = scale * v, shift * v
                else:
                    shift = shift + v
            if not ok:
                continue
            prev = by_name.get(x)
            if prev is not None and prev.op == "linear" and prev.name not in outputs and len(uses[x]) == 1:
                # y = (x W + c) * s + b  ->  x (W diag(s)) + (c * s + b)
                W, b = _linear_wb(circuit, prev)
                _set_linear(circuit, prev, W * scale[None, :], (b if b is not None else 0.0) * scale + shift)
                for u in uses.get(node.name, []):
                    u.inputs = [x if i == node.name else i for i in u.inputs]
                folded += len(chain)
                changed = True
                break
            # consumers: linears, or select_rows whose consumers are all linears
            targets, hops = [], []
            for u in uses.get(node.name, []):
                if u.op == "linear":
                    targets.append(u)
                elif u.op == "select_rows" and u.name not in outputs and uses.get(u.name) and \
                        all(w.op == "linear" for w in uses[u.name]):
                    hops.append(u)
                    targets.extend(uses[u.name])
                else:
                    ok = False
                    break
            if not ok or not targets:
                continue
            for lin in targets:
                W, b = _linear_wb(circuit, lin)
                bias = (b if b is not None else 0.0) + shift @ W
                _set_linear(circuit, lin, scale[:, None] * W, bias)
                if lin.inputs[0] == node.name:
                    lin.inputs[0] = x
            for h in hops:
                h.inputs[0] = x
            folded += len(chain)
            changed = True
            break
    return folded


def _fold_domains(circuit: Circuit, outputs: set) -> int:
    folded = 0
    uses = _consumers(circuit)
    by_name = {n.name: n for n in circuit.nodes}
    lay = circuit.layouts()
    new_nodes = []
    for node in circuit.nodes:
        if node.op == "poly":
            approx = Approximation.from_dict(node.attrs["approximation"])
            src = by_name.get(node.inputs[0])
            # (a constant first stage has no map to save)
            if (approx.kind in _DOMAIN_KINDS + _NEWTON_KINDS and approx.stages[0].interval != (-1.0, 1.0)
                    and approx.stages[0].ps_degree >= 1 and src is not None and src.name not in outputs
                    and len(uses[src.name]) == 1):
                alpha, beta = _domain_map(approx)
                chain, base = _shift_chain(src, by_name, uses, outputs)
                # a row sum over a vector layout writes its sum into the padding too, where the shifts do not
                # go: scaling it would take those slots far outside [-1, 1] (CKKS overflow); only matrix inputs
                vector_sum = base is not None and base.op == "row_sum" and lay[base.inputs[0]].kind != "matrix"
                if (base is not None and base.op in ("linear",) + _SCALED and base.name not in outputs
                        and len(uses[base.name]) == 1 and not vector_sum):
                    # base -> [+ s_1 -> ... -> + s_n] -> poly: alpha into the base's weights or scale, every
                    # shift times alpha, beta into the last shift (else the bias, else a new add_plain)
                    for a in chain:
                        a.attrs["scalar"] = float(a.attrs["scalar"]) * alpha
                    if chain:
                        chain[0].attrs["scalar"] += beta
                    if base.op == "linear":
                        W, b = _linear_wb(circuit, base)
                        bias = None if b is None and chain else (
                            alpha * (b if b is not None else np.zeros(W.shape[1])) + (0.0 if chain else beta))
                        _set_linear(circuit, base, alpha * W, bias)
                    else:
                        base.attrs["scale"] = float(base.attrs.get("scale", 1.0)) * alpha
                        if beta != 0.0 and not chain:
                            name = circuit._name_ok(circuit._fresh(f"{node.name}_shift"))
                            new_nodes.append(Node("add_plain", name, [base.name], {"scalar": float(beta)}))
                            node.inputs[0] = name
                    node.attrs["approximation"] = _normalized_approx(approx, alpha, beta)
                    folded += 1
        new_nodes.append(node)
    circuit.nodes = new_nodes
    return folded


def drop_dead(circuit: Circuit) -> None:
    """Remove the nodes no output depends on, and the weights only they used (in place)."""
    live = set(circuit.outputs)
    keep = []
    for node in reversed(circuit.nodes):
        if node.name in live:
            keep.append(node)
            live.update(node.inputs)
    dead = {n.name for n in circuit.nodes} - {n.name for n in keep}
    circuit.nodes = list(reversed(keep))
    circuit._names -= dead
    used = {v for n in circuit.nodes for v in n.attrs.values() if isinstance(v, str) and v in circuit.weights}
    circuit.weights = {k: v for k, v in circuit.weights.items() if k in used}


def fold_plaintext_maps(circuit: Circuit) -> Circuit:
    """Rewrite ``circuit`` in place (see the module docstring); returns it, with
    ``meta["folded"] = {"affine": n, "domain": m}`` (maps removed)."""
    outputs = set(circuit.outputs)
    n_aff = _fold_affine_into_linears(circuit, outputs)
    n_dom = _fold_domains(circuit, outputs)
    drop_dead(circuit)
    circuit.layouts()
    circuit.meta["folded"] = {"affine": n_aff, "domain": n_dom}
    return circuit
