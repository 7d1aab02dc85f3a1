"""Planner-only scaling table (issue #14): what a PolyGPT of 2 / 6 / 12 layers, hidden 64 / 128 / 384 and a prompt
of 32 / 128 tokens would need at 128-bit, under a memory limit of 22 GiB (this 2-core, 24 GB machine) and 256 GiB
(a bigger server).

For each shape a randomly initialised PolyGPT (heads of 16 / 32 / 64 dims, MLP 4 x hidden, vocab 512, square
attention, GELU, the given norm) is made polynomial on ranges calibrated on random tokens (degree ``--degree``),
turned into the export's spec, and the planner (:func:`hf_polyhe.he.compile.planner.plan`, no keys, no OpenFHE) plans
the KV-cache prefill of the whole prompt and the decode step after it, leveled where a 128-bit ring holds the depth
(with the row groups a leveled export would use), else bootstrapped. Columns: the plan's mode and ring, levels (leveled depth, or levels after each bootstrap), bootstraps per run
(prefill / decode step),
rotation keys, predicted prefill and per-token decode seconds (cost table of this machine, one thread), and
predicted memory: evaluation keys (relinearisation + rotations + bootstrapping), all distinct plaintexts of the two
circuits, and the server process's total (``server_memory``, the export's ``predicted_memory``: keys, plaintexts
encoded once capped by the 8 GiB default budget and by half the memory the limit leaves beside the rest, as a
server pins them, the most ciphertexts alive at once, the process base).
"no plan" rows give the planner's reason. The planner bounds the bootstrapping keys by the memory limit (level
budget, levels per segment) and, as ``plan_for_export`` does, holds fewer rotation keys when one per index would not
fit (``fit_rotation_keys``; "(composed)": the other rotations run as chains of those, and the predicted seconds
charge every step). A row marked "(over)" still predicts more than the limit. Planning a 6-layer hidden-384 circuit
takes ~15 min here (the "plan s" column: the planner traces every op in Python).

These are predictions, not measurements: the planner's seconds run about 2x below measured ones on W1 (65 s
predicted, 129 s measured: see the README), its server memory came within 4 % of W1's measured parts (leveled; not
checked on a bootstrapped plan), and its bootstrapping memory comes from the measured configurations of
``he_ops.py --bootstrap-sweep``. Plaintexts a server does not pin are encoded on every use, which the predicted
seconds do not charge. The intervals come from random
weights, so the polynomial LayerNorm's inverse square root is fitted on the variances of
a random model; a trained model's intervals (and degrees) differ.

    python benchmarks/plan_scaling.py                        # poly LayerNorm, degree 7 (~10 min on 2 cores)
    python benchmarks/plan_scaling.py --norm batchnorm       # affine norms
    python benchmarks/plan_scaling.py --layers 2 --hidden 64 --tokens 32   # one shape
    python benchmarks/plan_scaling.py --ring 16 --digits 6   # ring 2^16 with 6 key-switching digits
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hf_polyhe  # noqa: E402
from hf_polyhe.export import calibrate_ranges, model_to_spec  # noqa: E402
from hf_polyhe.he import params as P  # noqa: E402
from hf_polyhe.he.circuit.evaluator import peak_live_values  # noqa: E402
from hf_polyhe.he.compile.decode import build_decode_circuit  # noqa: E402
from hf_polyhe.he.compile.export_plan import _auto_groups, _final_params, fit_rotation_keys, server_memory  # noqa: E402
from hf_polyhe.he.compile.plaintexts import DEFAULT_BUDGET_MIB  # noqa: E402
from hf_polyhe.he.compile.planner import plan as make_plan  # noqa: E402
from hf_polyhe.he.compile.transformer import build_circuit  # noqa: E402
from hf_polyhe.he.errors import PlanningError  # noqa: E402

GIB = 2**30


def make_model(layers: int, hidden: int, tokens: int, norm: str, degree: int):
    torch.manual_seed(0)
    heads = {64: 4, 128: 4, 384: 6}.get(hidden, max(1, hidden // 64))  # head dims 16 / 32 / 64
    cfg = hf_polyhe.PolyGPTConfig(vocab_size=512, max_position_embeddings=tokens + 1, hidden_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                                  attention_activation="square", hidden_act="gelu", norm_type=norm)
    model = hf_polyhe.PolyGPTForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 512, (8, tokens))}]
    hf_polyhe.to_polynomial(model, ranges=calibrate_ranges(model, calib), degree=degree)
    return model, heads


def plan_shape(spec, tokens: int, max_memory_gib: float, max_leveled_depth: int, params=None, rotation_keys=None):
    """``(prefill plan, decode plan)`` with the row groups a leveled export would use (``params``: the parameter set
    to plan on, default :func:`params.default`; ``rotation_keys``: the only keys the server holds, as
    ``plan_for_export`` chooses them when a key per index does not fit)."""
    base = params or P.default()
    kw = dict(bootstrap="never", max_memory_gib=max_memory_gib, max_leveled_depth=max_leveled_depth)
    fin = dict(kw, rotation_keys=rotation_keys)
    try:  # leveled where a 128-bit ring holds the depth (as W1), else bootstrapped
        prefill = make_plan(build_circuit(spec, tokens, kv_cache=True), base, **kw)
    except PlanningError:
        prefill = make_plan(build_circuit(spec, tokens, kv_cache=True), base, **{**kw, "bootstrap": "always"})
        if base.ring_dim and _final_params(prefill.params, "bootstrap").ring_dim > base.ring_dim:
            # an export keeps one spare level (export_plan._final_params): on a fixed ring, one level less per segment
            base = base.with_(level_budget=prefill.params.level_budget, auto_level_budget=False)
            prefill = make_plan(build_circuit(spec, tokens, kv_cache=True), base, **{
                **kw, "bootstrap": "always", "levels_after_bootstrap": prefill.params.levels_after_bootstrap - 1})
    if not prefill.params.bootstrap:
        groups, slots = _auto_groups(build_circuit(spec, tokens), prefill.params.ring_dim)
        if groups > 1:
            prefill = make_plan(build_circuit(spec, tokens, kv_cache=True, groups=groups, slots=slots), base,
                                **{**fin, "bootstrap": "never"})
            decode = make_plan(build_decode_circuit(spec, tokens, groups=groups, slots=slots), base,
                               **{**fin, "bootstrap": "never"})
            return prefill, decode
        if rotation_keys is not None:
            prefill = make_plan(build_circuit(spec, tokens, kv_cache=True), base, **fin)
        decode = make_plan(build_decode_circuit(spec, tokens), base, **{**fin, "bootstrap": "never"})
    else:
        lb = prefill.params.levels_after_bootstrap  # and the level budget the prefill's plan chose, as an export
        b = base.with_(level_budget=prefill.params.level_budget)
        if rotation_keys is not None:
            prefill = make_plan(build_circuit(spec, tokens, kv_cache=True), b, levels_after_bootstrap=lb,
                                **{**fin, "bootstrap": "always"})
        decode = make_plan(build_decode_circuit(spec, tokens), b, levels_after_bootstrap=lb,
                           **{**fin, "bootstrap": "always"})
    return prefill, decode


def plan_within_memory(spec, tokens: int, max_memory_gib: float, max_leveled_depth: int, params=None):
    """:func:`plan_shape`, then again with fewer rotation keys if a key per index would not fit
    (:func:`~hf_polyhe.he.compile.export_plan.fit_rotation_keys`, as ``plan_for_export``); ``(prefill, decode,
    keys or None)``."""
    pre, dec = plan_shape(spec, tokens, max_memory_gib, max_leveled_depth, params)
    uses = dict(pre.rotation_uses)
    for k, n in dec.rotation_uses.items():
        uses[k] = uses.get(k, 0) + n
    final = _final_params(pre.params, "bootstrap" if pre.params.bootstrap else "leveled")  # as an export's
    keep = fit_rotation_keys(uses, final, memory_parts(pre, dec, max_memory_gib), max_memory_gib)
    if keep is None:
        return pre, dec, None
    pre, dec = plan_shape(spec, tokens, max_memory_gib, max_leveled_depth, params, rotation_keys=keep)
    return pre, dec, keep


def short_reason(msg: str) -> str:
    """The planner's refusal in a table cell: the memory it would need, else its first clause."""
    m = re.search(r"levels_after_bootstrap >= (\d+)\).*?need ~([\d.]+) GiB", msg)
    if m:
        return f"bootstrapping keys for {m.group(1)} levels per segment need ~{m.group(2)} GiB"
    return msg.split(";")[0][:140]


def memory_gib(prefill, decode, limit_gib: float) -> tuple:
    """``(keys, plaintexts, server)`` in GiB: evaluation keys (relinearisation, rotations, bootstrapping), every
    distinct plaintext of the prefill and decode circuits, and what a server process holds at its peak
    (:func:`hf_polyhe.he.compile.export_plan.server_memory`, as ``predicted_memory`` of an export: keys, the
    plaintexts it encodes once capped by its 8 GiB default budget, the most ciphertexts alive at once, the
    process base)."""
    m = memory_parts(prefill, decode, limit_gib)
    return m["keys"] / GIB, m["all_plaintexts"] / GIB, m["total"] / GIB


def memory_parts(prefill, decode, limit_gib: float) -> dict:
    """:func:`~hf_polyhe.he.compile.export_plan.server_memory` of a server running both plans (bytes), and
    ``all_plaintexts``: every distinct plaintext before the server's budget caps them."""
    rot = len(set(prefill.rotation_keys) | set(decode.rotation_keys))
    pts = prefill.plaintexts.get("bytes", 0) + decode.plaintexts.get("bytes", 0)
    peak = max(peak_live_values(prefill.circuit)[0], peak_live_values(decode.circuit)[0])
    final = _final_params(prefill.params, "bootstrap" if prefill.params.bootstrap else "leveled")  # as an export's
    m = server_memory(final, rot, prefill.start_level, pts, peak, DEFAULT_BUDGET_MIB, limit_gib=limit_gib)
    return {**m, "all_plaintexts": pts}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,6,12")
    ap.add_argument("--hidden", default="64,128,384")
    ap.add_argument("--tokens", default="32,128")
    ap.add_argument("--memory", default="22,256", help="max_memory_gib values")
    ap.add_argument("--norm", default="poly_layernorm", choices=["poly_layernorm", "batchnorm"])
    ap.add_argument("--degree", type=int, default=7)
    ap.add_argument("--max-leveled-depth", type=int, default=24)
    ap.add_argument("--ring", type=int, default=0, help="log2 of a fixed ring dimension (0: the smallest secure)")
    ap.add_argument("--digits", type=int, default=0,
                    help="HYBRID key-switching digits (0: OpenFHE's 3); more digits hold more levels on a ring "
                         "(benchmarks/bootstrap_sweep.py: 6 digits keep 5 levels after a bootstrap on 2^16)")
    args = ap.parse_args(argv)
    params = P.default(ring_dim=2**args.ring if args.ring else 0, num_large_digits=args.digits)
    warnings.simplefilter("ignore")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    print(f"norm {args.norm}, degree {args.degree}, 128-bit (HEStd_128_classic), predicted by the planner"
          + (f", ring 2^{args.ring}" if args.ring else "") + (f", {args.digits} key-switching digits" if args.digits
                                                              else "") + "\n")
    print("| layers | hidden | heads | tokens | max GiB | mode | ring | levels | bootstraps (prefill / decode) | rot keys "
          "| prefill s | decode s/token | keys GiB | plaintexts GiB | server GiB | plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layers in ints(args.layers):
        for hidden in ints(args.hidden):
            for tokens in ints(args.tokens):
                model, heads = make_model(layers, hidden, tokens, args.norm, args.degree)
                spec = model_to_spec(model, max_length=tokens + 1)
                del model
                for mem in [float(m) for m in args.memory.split(",")]:
                    t0 = time.perf_counter()
                    head = f"| {layers} | {hidden} | {heads} | {tokens} | {mem:g} |"
                    try:
                        pre, dec, keep = plan_within_memory(spec, tokens, mem, args.max_leveled_depth, params)
                    except PlanningError as e:
                        reason = short_reason(str(e))
                        print(f"{head} no plan: {reason} | | | | | | | | | | {time.perf_counter() - t0:.0f} |", flush=True)
                        continue
                    p = _final_params(pre.params, "bootstrap" if pre.params.bootstrap else "leveled")
                    keys, pts, server = memory_gib(pre, dec, mem)
                    mode = "bootstrap" if p.bootstrap else f"leveled, {pre.circuit.groups} groups"
                    levels = f"{p.levels_after_bootstrap} per segment" if p.bootstrap else str(p.depth)
                    print(f"{head} {mode} | 2^{p.ring_dim.bit_length() - 1} | {levels} | {pre.counts['bootstrap']} / {dec.counts['bootstrap']} "
                          f"| {len(set(pre.rotation_keys) | set(dec.rotation_keys))}{' (composed)' if keep else ''} "
                          f"| {pre.predicted_seconds:.0f} "
                          f"| {dec.predicted_seconds:.1f} | {keys:.1f} | {pts:.1f} | {server:.1f}{' (over)' if server > mem else ''} "
                          f"| {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
