"""What a client asks of a server: :class:`ServerProtocol`, one interface for every transport.

Three implementations:

- :class:`~hf_polyhe.he.runtime.server.Server`: CKKS evaluation in this process (what ``hf-polyhe serve`` runs
  per registered client);
- :class:`~hf_polyhe.serve.client.RemoteServer`: the same calls over HTTP to ``hf-polyhe serve``;
- :class:`~hf_polyhe.he.runtime.server.PlainServer`: the float64 reference on unencrypted arrays (debugging,
  fast tests; NOT encrypted).

A *payload* is what the client's :meth:`~hf_polyhe.he.Client.encrypt` made (encrypted-tensor bytes, or an array
for the plain reference); results come back in the same form for :meth:`~hf_polyhe.he.Client.decrypt`. A
*stream* is one generation with a KV cache that the server keeps between calls.
"""

from __future__ import annotations

import abc


class ServerProtocol(abc.ABC):
    """The server interface a :class:`~hf_polyhe.he.Client` talks to.

    ``last_timings``: seconds per block (norms, attention, mlp, head, bootstrap) of the last evaluation, as the
    server measured them; ``verbose``: progress bars where the work happens in this process."""

    last_timings: dict = {}
    verbose: bool = True

    @abc.abstractmethod
    def run(self, x, attention_mask=None):
        """One forward pass over a prompt's encrypted embeddings -> encrypted logits of its last token (or of
        the classifier)."""

    @abc.abstractmethod
    def open_stream(self) -> str:
        """Start a generation whose KV cache the server keeps; returns the stream id."""

    @abc.abstractmethod
    def prefill(self, stream: str, x):
        """The prompt's encrypted embeddings -> encrypted last-token logits; keeps the prompt's keys/values."""

    @abc.abstractmethod
    def decode(self, stream: str, x):
        """The next token's encrypted embedding (one row) -> encrypted logits; one token's work."""

    @abc.abstractmethod
    def close_stream(self, stream: str) -> None:
        """Forget a stream and its cache (unknown ids are ignored)."""

    def close(self) -> None:
        """Release what the server holds for this client (remote: its session and keys)."""
