"""An in-process :class:`~hf_polyhe.he.keys_multi.EncryptedServer` that shows a tqdm bar per layer."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..he.interpreter import Packed
from ..he.keys_multi import EncryptedServer
from ..he.ops import OPS


class ProgressServer(EncryptedServer):
    """Same evaluation as :class:`EncryptedServer` (same per-block ``last_timings``), with a progress bar that
    advances once per transformer layer and once for the head. ``verbose = False`` silences it."""

    verbose = True

    @classmethod
    def from_client(cls, client, spec) -> "ProgressServer":
        """The evaluator for a client *in this process*, sharing its crypto context and the evaluation keys its
        key generation already put in OpenFHE's (process-wide) key store: no bundle is serialised and read back,
        which at 128-bit saves gigabytes and minutes. The secret key is not used (nor reachable from here)."""
        from ..he.backends.openfhe_backend import OpenFHEBackend
        from ..he.errors import KeyMismatchError
        from ..he.keys_multi import spec_digest

        if spec_digest(spec) != client.plan.digest:
            raise KeyMismatchError("the model spec differs from the one the keys were planned for")
        self = cls.__new__(cls)
        self.plan, self.key_tag, self.spec, self.cc = client.plan, client.key_tag, spec, client.cc
        if self.plan.params.bootstrap:
            from ..he.backends.openfhe_backend import setup_bootstrap
            from ..he.roles import import_openfhe

            self.cc.Enable(import_openfhe().FHE)
            setup_bootstrap(self.cc, self.plan.params)
        self.backend = OpenFHEBackend(self.cc, self.plan.params.slots)
        self._evaluators, self.sessions, self.last_timings = {}, {}, {}
        return self

    def _run(self, ev, inputs: dict) -> dict:
        env = ev.check_inputs(inputs)
        blocks = ev.circuit.meta.get("blocks", {})
        nodes = ev.circuit.nodes
        n_layers = len(self.spec.config.get("layers", []))
        bar = tqdm(total=n_layers + 1, desc=f"encrypted {ev.circuit.name}", unit="layer", leave=False,
                   disable=not self.verbose)
        times: dict = {}
        seen_attention, previous = 0, None
        try:
            for node in nodes:
                b = "bootstrap" if node.op == "bootstrap" else blocks.get(node.name, "other")
                # a layer ends where the next attention block (or the head) begins
                if b != previous and b in ("attention", "head") and seen_attention:
                    bar.update(1)
                if b == "attention" and previous != "attention":
                    seen_attention += 1
                previous = b if b != "bootstrap" else previous
                t0 = time.perf_counter()
                cts = OPS[node.op].execute(ev, node, [env[i] for i in node.inputs])
                env[node.name] = Packed(ev.layouts[node.name], cts)
                times[b] = times.get(b, 0.0) + time.perf_counter() - t0
            bar.update(bar.total - bar.n)
        finally:
            bar.close()
            ev.last_babies = None  # release the cached rotations (ops.Linear.babies)
        self.last_timings = times
        return {o: env[o] for o in ev.circuit.outputs}
