"""Stage 3 -- running with keys: one client and one server per export.

Read in this order (the path of one request):

- :mod:`.client`: :class:`~.client.Client` owns the secret key: embeds, encrypts, decrypts, samples.
- :mod:`.protocol`: :class:`~.protocol.ServerProtocol`, what a client asks of any server (in-process or HTTP).
- :mod:`.server`: :class:`~.server.Server` evaluates with evaluation keys only (and keeps KV-cache streams);
  :class:`~.server.PlainServer` is the float64 reference without encryption.
- :mod:`.ciphertext`: :class:`~.ciphertext.EncryptedTensor`, the checksummed wire form of a ciphertext.
- :mod:`.keys`: key generation, key directories, server bundles and the key cache.
- :mod:`.precheck`: bytes from someone else checked before OpenFHE parses them (a fresh ciphertext of the
  session's parameters; the context prefix of a server's result).
- :mod:`.sandbox`: child processes that parse and evaluate such bytes, so a crash in OpenFHE cannot spread (the
  client's decryption of a server's result; ``hf-polyhe serve``'s session workers).

Under the server: :class:`hf_polyhe.he.circuit.evaluator.Evaluator` and :mod:`hf_polyhe.he.backends`.
"""
