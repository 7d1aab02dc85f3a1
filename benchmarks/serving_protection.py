"""What the protections of issue #18 cost (toy parameters: the overheads are per message, not per operation).

- client: ``Client.decrypt`` of a server's result with the sandbox (parse + decrypt in a child process, after the
  context-prefix check) against ``HF_POLYHE_PARSE_SANDBOX=0`` (in this process);
- server: the ciphertext template check (:func:`hf_polyhe.he.runtime.precheck.check_fresh`) per input;
- server: a job through a session's worker process (``hf_polyhe.serve.worker``) against ``Server.run`` in
  this process, and the worker's start + key load.

    python benchmarks/serving_protection.py EXPORT_DIR      # an export (e.g. the tests' tiny PolyGPT), toy keys

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hf_polyhe.he import Client, Export, Server  # noqa: E402
from hf_polyhe.he.errors import ToyParametersWarning  # noqa: E402
from hf_polyhe.he.runtime.ciphertext import read_header  # noqa: E402
from hf_polyhe.he.runtime.precheck import CiphertextTemplate, check_fresh  # noqa: E402
from hf_polyhe.he.runtime.sandbox import ChildProcess  # noqa: E402


def timed(fn, n: int) -> tuple:
    """``(first call, median of the next n)`` in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    rest = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        rest.append(time.perf_counter() - t0)
    return first, statistics.median(rest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    warnings.simplefilter("ignore", ToyParametersWarning)
    export = Export(args.export_dir)
    client = Client.keygen(export, "toy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = client.write_bundle(os.path.join(tmp, "bundle"))
        server = Server(bundle, spec=export)
        server.verbose = False
        ids = list(range(3, 3 + min(2, export.max_length)))
        x = client.encrypt(export.embed(ids))
        out = server.run(x)

        os.environ["HF_POLYHE_PARSE_SANDBOX"] = "0"
        first, med = timed(lambda: client.decrypt(out), args.repeat)
        rows.append(("client decrypt, in this process", first, med))
        os.environ["HF_POLYHE_PARSE_SANDBOX"] = "1"
        first, med = timed(lambda: client.decrypt(out), args.repeat)
        rows.append(("client decrypt, sandboxed (first: child start + keys)", first, med))

        plan_path = os.path.join(tmp, "plan.json")
        with open(plan_path, "w") as f:
            json.dump(client.plan.to_dict(), f)
        child = ChildProcess("hf_polyhe.serve.worker")
        t0 = time.perf_counter()
        head, _ = child.call({"op": "reference", "plan": plan_path})
        rows.append(("server: reference context + templates (once per parameter set)", time.perf_counter() - t0, None))
        child.stop()
        templates = [CiphertextTemplate.from_dict(d) for d in head["templates"]]
        h = read_header(x)
        payload = memoryview(x)[h.offsets[0][0]:]
        first, med = timed(lambda: check_fresh(templates, payload, client.key_tag), args.repeat)
        rows.append((f"server: template check of one input ciphertext ({len(payload) // 1024} KiB)", first, med))

        first, med = timed(lambda: server.run(x), args.repeat)
        rows.append(("server: run job in this process", first, med))
        session = os.path.join(tmp, "session")
        os.makedirs(session)
        for n in os.listdir(bundle):
            os.link(os.path.join(bundle, n), os.path.join(session, n))
        worker = ChildProcess("hf_polyhe.serve.worker")
        t0 = time.perf_counter()
        worker.call({"op": "load", "session": session, "plan": plan_path, "spec": export.directory})
        rows.append(("server: worker start + key load (per session / restart)", time.perf_counter() - t0, None))
        first, med = timed(lambda: worker.call({"op": "run", "seq_len": len(ids)}, x), args.repeat)
        rows.append(("server: run job in the session's worker", first, med))
        worker.stop()
    print(f"toy ring {client.cc.GetRingDimension()}, input {len(x) // 1024} KiB, result {len(out) // 1024} KiB\n")
    print("| step | first (s) | median of next (s) |\n|---|---|---|")
    for name, first, med in rows:
        print(f"| {name} | {first:.4f} | {'' if med is None else f'{med:.4f}'} |")


if __name__ == "__main__":
    main()
