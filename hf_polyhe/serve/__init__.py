"""``hf-polyhe serve``: the server part of an export behind HTTP, and the client that talks to it.

The server (:mod:`hf_polyhe.serve.app`, FastAPI + uvicorn) holds only the export's ``server/`` spec. A client
registers its *public* server bundle (CKKS context + evaluation keys, never a secret key) and gets a session;
it then submits ciphertexts as jobs and fetches the encrypted results. :class:`~.client.RemoteServer` is that
client: it implements :class:`hf_polyhe.he.ServerProtocol` like the in-process :class:`hf_polyhe.he.Server`, so
a pipeline does not care where its server is (``server_url=``) and the secret key never leaves the client process.

Endpoints (all under ``/v1``)::

    GET    /health                          status, task, sessions in use / allowed
    GET    /info                            the export's pipeline.json and spec digest (no weights)
    POST   /sessions                        body: zip of the server bundle -> 201 {"session_id"}
    DELETE /sessions/{sid}                  forget the session and its keys
    POST   /sessions/{sid}/streams          start an encrypted KV-cache generation -> {"stream_id"}
    DELETE /sessions/{sid}/streams/{stid}   end it
    POST   /sessions/{sid}/jobs?op=run&seq_len=L | op=prefill&stream=.. | op=decode&stream=..
                                            body: an encrypted tensor -> 202 {"job_id"}
    GET    /sessions/{sid}/jobs/{jid}       202 {"status": "queued"|"running"} or 200 the encrypted result
                                            (header X-HE-Timings: seconds per block)
"""

from .client import RemoteServer, ServerError, bundle_zip

__all__ = ["RemoteServer", "ServerError", "bundle_zip"]
