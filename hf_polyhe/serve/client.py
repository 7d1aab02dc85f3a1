"""HTTP client of ``hf-polyhe serve``: :class:`RemoteServer`, the :class:`~hf_polyhe.he.ServerProtocol` over HTTP
(httpx: connection retries, timeouts, and the key bundle streamed from disk -- gigabytes at 128-bit)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from typing import Optional

import httpx

from ..he.runtime.ciphertext import read_header
from ..he.runtime.keys import BUNDLE_FILES
from ..he.runtime.protocol import ServerProtocol


class ServerError(RuntimeError):
    """The server refused a request (``status``: the HTTP status, ``detail``: its explanation, ``code``: the
    machine-readable ``error`` of the reply, e.g. ``"unknown_session"``, when the server sends one)."""

    def __init__(self, status: int, detail: str, code: Optional[str] = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.code = status, detail, code


def write_bundle_zip(bundle_dir, out) -> None:
    """Write the server bundle as one uncompressed zip to ``out`` (a path or a binary file), file by file in
    chunks: public files only; refuses a directory with a secret key."""
    names = os.listdir(bundle_dir)
    if any("secret" in n for n in names):
        raise ValueError(f"{bundle_dir!r} contains a secret key: a server bundle must never hold one")
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name in BUNDLE_FILES:
            path = os.path.join(bundle_dir, name)
            if os.path.exists(path):
                with open(path, "rb") as src, z.open(name, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def bundle_zip(bundle_dir) -> bytes:
    """:func:`write_bundle_zip` in memory (small bundles, tests)."""
    buf = io.BytesIO()
    write_bundle_zip(bundle_dir, buf)
    return buf.getvalue()


class RemoteServer(ServerProtocol):
    """The :class:`~hf_polyhe.he.ServerProtocol` of ``hf-polyhe serve`` at ``url``.

    ``RemoteServer(url, client)`` registers ``client``'s public server bundle (a session) on first use; ``run``,
    ``open_stream``, ``prefill``, ``decode`` and ``close_stream`` take and return ciphertext bytes exactly like
    the in-process :class:`~hf_polyhe.he.Server`. ``token``: the server's ``--auth-token`` (default
    ``$HF_POLYHE_AUTH_TOKEN``); ``poll_s``: delay between result polls; ``timeout_s``: per job.

    When the server no longer knows the session (it expired, or a server without ``--state-dir`` restarted), the
    keys are registered again and ``run`` / ``open_stream`` retried once, transparently; a ``run`` job lost by a
    restart is resubmitted once. A generation stream cannot be recovered that way (its KV cache was on the
    server): ``prefill`` / ``decode`` then raise :class:`ServerError`.

    Connections are retried ``retries`` times (refused or reset before a reply); ``connect_timeout_s`` bounds a
    connection attempt, ``request_timeout_s`` one request (an upload of keys included)."""

    def __init__(self, url: str, client=None, bundle_dir=None, poll_s: float = 0.05, timeout_s: float = 3600.0,
                 token: Optional[str] = None, connect_timeout_s: float = 10.0, request_timeout_s: float = 600.0,
                 retries: int = 3):
        self.url = url.rstrip("/")
        self.client, self.bundle_dir = client, bundle_dir
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self.token = token if token is not None else (os.environ.get("HF_POLYHE_AUTH_TOKEN") or None)
        self.session_id = None
        self.last_timings: dict = {}
        self.verbose = True
        self._http = httpx.Client(base_url=f"{self.url}/v1", transport=httpx.HTTPTransport(retries=retries),
                                  timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
                                  headers={"Authorization": f"Bearer {self.token}"} if self.token else None)

    # -- HTTP -------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, query: dict = None, timeout: Optional[float] = None,
                size: Optional[int] = None):
        """``(status, headers, body bytes)``; ``body``: bytes or a binary file (streamed); raises
        :class:`ServerError` for 4xx/5xx and ``ConnectionError`` / ``TimeoutError`` when the server cannot be
        reached in time. ``size``: the length of a streamed ``body`` (sent as Content-Length, so a server can
        refuse an oversized upload before reading it)."""
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if size is not None:
            headers["Content-Length"] = str(int(size))
        kw = {} if timeout is None else {"timeout": httpx.Timeout(timeout, connect=self._http.timeout.connect)}
        try:
            r = self._http.request(method, path, content=body, params=query, headers=headers, **kw)
        except httpx.TimeoutException as e:
            raise TimeoutError(f"{method} {self.url}/v1{path}: no answer in time ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise ConnectionError(f"{method} {self.url}/v1{path}: {e}") from e
        if r.status_code >= 400:
            code = None
            try:
                doc = r.json()
                detail, code = doc.get("detail", r.text), doc.get("error")
            except (ValueError, AttributeError):
                detail = r.text
            if code is None and r.status_code == 404 and "unknown or expired session" in str(detail):
                code = "unknown_session"  # servers before error codes
            raise ServerError(r.status_code, str(detail), code)
        return r.status_code, dict(r.headers), r.content

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health")[2])

    # -- session ----------------------------------------------------------------------------------------
    def register(self) -> str:
        """Send the public bundle (context + evaluation keys) and open a session; returns its id."""
        h = self.health()
        if h["sessions"] >= h["max_sessions"]:  # do not upload keys a full server would refuse
            raise ServerError(429, f"the server holds its maximum of {h['max_sessions']} sessions; retry later",
                              "too_many_sessions")
        self.request("GET", "/info")  # a missing or wrong token gets its 401 here, not after an upload
        bundle_dir = self.bundle_dir or (self.client.bundle_dir if self.client is not None else None)
        if bundle_dir is None and self.client is None:
            raise ValueError("RemoteServer needs client= or bundle_dir= to register keys")
        with tempfile.TemporaryDirectory(prefix="hf_polyhe_bundle_") as tmp:
            if bundle_dir is None:
                bundle_dir = self.client.write_bundle(os.path.join(tmp, "bundle"))
            path = os.path.join(tmp, "bundle.zip")  # on disk, then streamed: never the whole bundle in memory
            write_bundle_zip(bundle_dir, path)
            with open(path, "rb") as f:
                _, _, body = self.request("POST", "/sessions", f, size=os.path.getsize(path))
        self.session_id = json.loads(body)["session_id"]
        return self.session_id

    def _sid(self) -> str:
        return self.session_id or self.register()

    def _again(self, error: ServerError, lost=("unknown_session",)) -> bool:
        """Whether a call that failed with ``error`` may be retried (once): the session (or job) was lost."""
        if error.code not in lost:
            return False
        if error.code == "unknown_session":
            self.session_id = None  # the next call registers the keys again
        return True

    def close(self):
        if self.session_id is not None:
            try:
                self.request("DELETE", f"/sessions/{self.session_id}")
            except (ServerError, OSError):
                pass
            self.session_id = None

    # -- jobs -------------------------------------------------------------------------------------------
    def submit(self, data: bytes, **query) -> str:
        _, _, body = self.request("POST", f"/sessions/{self._sid()}/jobs", bytes(data), query)
        return json.loads(body)["job_id"]

    def result(self, job_id: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        delay = self.poll_s
        while True:
            status, headers, body = self.request("GET", f"/sessions/{self._sid()}/jobs/{job_id}")
            if status == 200:
                self.last_timings = json.loads(headers.get("X-HE-Timings") or headers.get("x-he-timings") or "{}")
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {self.timeout_s} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def run(self, x, attention_mask=None) -> bytes:
        if attention_mask is not None:
            raise ValueError("RemoteServer.run: padding masks are not sent over HTTP; run unpadded sequences")
        rows = read_header(x).rows
        try:
            return self.result(self.submit(x, op="run", seq_len=rows))
        except ServerError as e:
            if not self._again(e, ("unknown_session", "unknown_job")):
                raise
        return self.result(self.submit(x, op="run", seq_len=rows))

    def open_stream(self) -> str:
        try:
            _, _, body = self.request("POST", f"/sessions/{self._sid()}/streams")
        except ServerError as e:
            if not self._again(e):
                raise
            _, _, body = self.request("POST", f"/sessions/{self._sid()}/streams")
        return json.loads(body)["stream_id"]

    def prefill(self, stream_id: str, x) -> bytes:
        return self.result(self.submit(x, op="prefill", stream=stream_id))

    def decode(self, stream_id: str, x) -> bytes:
        return self.result(self.submit(x, op="decode", stream=stream_id))

    def close_stream(self, stream_id: str) -> None:
        if self.session_id is None:
            return
        try:
            self.request("DELETE", f"/sessions/{self.session_id}/streams/{stream_id}")
        except (ServerError, OSError):
            pass
