"""``hf-polyhe serve``: the server part of an export behind HTTP, and the client that talks to it.

The server (:mod:`hf_polyhe.serve.app`, FastAPI + uvicorn) holds only the export's ``server/`` spec. A client
registers its *public* server bundle (CKKS context + evaluation keys, never a secret key) and gets a session;
it then submits ciphertexts as jobs and fetches the encrypted results. :class:`~.client.RemoteServer` is that
client: it implements :class:`hf_polyhe.he.ServerProtocol` like the in-process :class:`hf_polyhe.he.Server`, so
a pipeline does not care where its server is (``server_url=``) and the secret key never leaves the client process.

The server runs no OpenFHE itself: each session's keys live in a worker process (:mod:`~.worker`) that parses
and evaluates everything the client sent, so a crafted key or ciphertext that crashes OpenFHE ends that worker
only (issue #18). Plans come from the server, never from the client (see :mod:`~.app` for every check).

Endpoints (all under ``/v1``; with ``--auth-token`` every one but ``/health`` needs ``Authorization: Bearer T``)::

    GET    /health                          status, task, sessions in use / allowed (no token needed)
    GET    /info                            the export's pipeline.json, spec digest, accepted parameter sets, limits
    POST   /sessions                        body: zip of the server bundle -> 201 {"session_id", "params"}
    DELETE /sessions/{sid}                  forget the session, end its worker (its keys are freed)
    POST   /sessions/{sid}/streams          start an encrypted KV-cache generation -> 201 {"stream_id"}
    DELETE /sessions/{sid}/streams/{stid}   end it
    POST   /sessions/{sid}/jobs?op=run&seq_len=L | op=prefill&stream=.. | op=decode&stream=..
                                            body: an encrypted tensor -> 202 {"job_id"}
    GET    /sessions/{sid}/jobs/{jid}       202 {"status": "queued"|"running"} or 200 the encrypted result
                                            (header X-HE-Timings: seconds per block)

Errors are JSON ``{"detail": ..., "error": code}`` (``code`` e.g. ``unknown_session``, ``parser_crashed``,
``plan_mismatch``, ``timeout``); the statuses are listed in :mod:`~.app`. Flags of ``hf-polyhe serve``:
``--state-dir`` (sessions survive a restart), ``--auth-token`` / ``$HF_POLYHE_AUTH_TOKEN``, ``--allow-toy``
(tests only), ``--job-timeout``, ``--load-timeout``, ``--worker-memory-mb``, ``--max-sessions``,
``--max-streams``, ``--max-jobs-per-session``, ``--max-request-mb``, ``--max-bundle-mb``, ``--session-ttl``,
``--parallel-jobs``. Run it with ``HF_POLYHE_NO_TORCH=1`` to keep torch out of the server's processes.
"""

from .client import RemoteServer, ServerError, bundle_zip

__all__ = ["RemoteServer", "ServerError", "bundle_zip"]
