"""The HTTP server behind ``hf-polyhe serve EXPORT_DIR`` (FastAPI + uvicorn). Endpoints: see :mod:`hf_polyhe.serve`.

It loads only the export's server part (``server/``: architecture, polynomials, weights) and never sees a
secret key: clients register their public evaluation keys, send ciphertexts and fetch ciphertexts. All CKKS
work runs on one worker thread (jobs queue; the event loop stays free for health checks and uploads).

Limits: ``max_sessions`` (429 beyond), ``max_request_bytes`` for a ciphertext and ``max_bundle_bytes`` for a key
bundle (413 beyond), ``max_jobs_per_session`` unfetched jobs (429), idle sessions expire after
``session_ttl_s``. Malformed input gets a 4xx naming what is wrong: 400 (not a bundle / not a ciphertext /
corrupted), 403 (a bundle that contains a secret key), 404 (unknown session, stream or job), 409 (a ciphertext
made under another session's key, keys for another export), 422 (wrong shape or parameters).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from ..he import Server
from ..he.compile.export_plan import spec_digest
from ..he.compile.transformer import TransformerSpec
from ..he.errors import (CircuitError, HEError, KeyMismatchError, LayoutError, PlanningError, SerializationError,
                         StreamError)
from ..he.export import part_dir, read_pipeline_json
from ..he.runtime.ciphertext import read_header
from ..he.runtime.keys import BUNDLE_FILES

MiB = 1 << 20


def status_of(error: Exception) -> int:
    """The HTTP status for an error of the encrypted runtime."""
    if isinstance(error, KeyMismatchError):
        return 409
    if isinstance(error, StreamError):
        return 409
    if isinstance(error, (LayoutError, CircuitError, PlanningError)):
        return 422
    if isinstance(error, SerializationError):
        return 400
    if isinstance(error, (ValueError, HEError)):
        return 422
    return 500


@dataclass
class Job:
    op: str
    status: str = "queued"
    result: Optional[bytes] = None
    error: Optional[tuple] = None
    timings: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)


@dataclass
class Session:
    server: Server
    directory: str
    key_tag: str
    ring_dim: int
    jobs: dict = field(default_factory=dict)
    streams: set = field(default_factory=set)
    last_used: float = field(default_factory=time.time)


class ServerState:
    """Sessions, jobs and the single CKKS worker of one served export."""

    def __init__(self, export_dir, max_sessions: int = 4, max_request_bytes: int = 64 * MiB,
                 max_bundle_bytes: int = 4096 * MiB, max_jobs_per_session: int = 8, session_ttl_s: float = 3600.0,
                 work_dir: Optional[str] = None):
        self.export_dir = str(export_dir)
        self.meta = read_pipeline_json(export_dir)
        self.spec = TransformerSpec.load(part_dir(export_dir, self.meta, "server"))
        self.digest = spec_digest(self.spec)
        self.max_sessions, self.max_request_bytes, self.max_bundle_bytes = max_sessions, max_request_bytes, max_bundle_bytes
        self.max_jobs_per_session, self.session_ttl_s = max_jobs_per_session, session_ttl_s
        self._tmp = tempfile.TemporaryDirectory(prefix="hf_polyhe_serve_", dir=work_dir)
        self.sessions: dict = {}
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckks")
        self.started = time.time()

    # -- sessions -----------------------------------------------------------------------------------
    def expire(self):
        now = time.time()
        with self.lock:
            old = [sid for sid, s in self.sessions.items() if now - s.last_used > self.session_ttl_s]
        for sid in old:
            self.drop(sid)

    def drop(self, sid: str):
        with self.lock:
            s = self.sessions.pop(sid, None)
        if s is not None:
            shutil.rmtree(s.directory, ignore_errors=True)

    def session(self, sid: str) -> Session:
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise HTTPException(404, f"unknown or expired session {sid!r}; register keys with POST /v1/sessions")
        s.last_used = time.time()
        return s

    def open_session(self, zip_path: str) -> str:
        """Unpack and load a bundle (worker thread). Raises HTTPException for bad bundles."""
        sid = uuid.uuid4().hex
        directory = os.path.join(self._tmp.name, sid)
        try:
            with zipfile.ZipFile(zip_path) as z:
                infos = z.infolist()
                names = [i.filename for i in infos]
                if any("secret" in n.lower() for n in names):
                    raise HTTPException(403, "the bundle contains a secret key; send only the public server bundle")
                bad = [n for n in names if n not in BUNDLE_FILES]
                if bad or "bundle.json" not in names:
                    raise HTTPException(400, f"a bundle holds {', '.join(BUNDLE_FILES)} (bundle.json required); got {names}")
                if sum(i.file_size for i in infos) > self.max_bundle_bytes:
                    raise HTTPException(413, f"the unpacked bundle exceeds {self.max_bundle_bytes} bytes")
                os.makedirs(directory)
                for n in names:
                    with z.open(n) as src, open(os.path.join(directory, n), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile as e:
            raise HTTPException(400, f"the body is not a bundle zip ({e}); send hf_polyhe.serve.bundle_zip(dir)") from e
        try:
            server = Server(directory, spec=self.spec)
        except Exception as e:
            shutil.rmtree(directory, ignore_errors=True)
            code = status_of(e)
            raise HTTPException(code if code != 500 else 400, f"cannot load the bundle: {e}") from e
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                shutil.rmtree(directory, ignore_errors=True)
                raise HTTPException(429, f"the server holds its maximum of {self.max_sessions} sessions; retry later")
            self.sessions[sid] = Session(server, directory, server.key_tag, server.ring_dim)
        return sid

    # -- jobs ---------------------------------------------------------------------------------------
    def execute(self, s: Session, job: Job, data: bytes, query: dict):
        job.status = "running"
        try:
            op = job.op
            if op == "run":
                out = s.server.run(data)
            elif op == "prefill":
                out = s.server.prefill(query["stream"], data)
            else:
                out = s.server.decode(query["stream"], data)
            job.result, job.timings, job.status = out, dict(s.server.last_timings), "done"
        except Exception as e:  # a bad job fails alone; the worker keeps serving
            job.error, job.status = (status_of(e), f"{type(e).__name__}: {e}"), "failed"


async def read_body(request: Request, limit: int, what: str, spool_dir: Optional[str] = None):
    """The body as bytes (or a temp file path when ``spool_dir``), refusing more than ``limit`` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"{what} of {declared} bytes exceeds the limit of {limit} bytes")
    size, chunks = 0, []
    f = tempfile.NamedTemporaryFile(dir=spool_dir, delete=False) if spool_dir else None
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"{what} exceeds the limit of {limit} bytes")
            if f is not None:
                f.write(chunk)
            else:
                chunks.append(chunk)
    except BaseException:
        if f is not None:
            f.close()
            os.unlink(f.name)
        raise
    if f is not None:
        f.close()
        return f.name
    return b"".join(chunks)


async def drain(request: Request, limit: int) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            break


def create_app(export_dir, **limits) -> FastAPI:
    """The FastAPI application serving ``export_dir`` (keyword ``limits``: see :class:`ServerState`)."""
    state = ServerState(export_dir, **limits)
    app = FastAPI(title="hf_polyhe encrypted inference server", version="1")
    app.state.he = state

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/v1/health")
    async def health():
        state.expire()
        return {"status": "ok", "task": state.meta["task"], "family": state.meta["family"],
                "max_length": state.meta["max_length"], "sessions": len(state.sessions),
                "max_sessions": state.max_sessions, "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/v1/info")
    async def info():
        return {"pipeline": state.meta, "spec_digest": state.digest,
                "limits": {"max_sessions": state.max_sessions, "max_request_bytes": state.max_request_bytes,
                           "max_bundle_bytes": state.max_bundle_bytes, "session_ttl_s": state.session_ttl_s}}

    @app.post("/v1/sessions", status_code=201)
    async def register(request: Request):
        state.expire()
        if len(state.sessions) >= state.max_sessions:
            await drain(request, state.max_bundle_bytes)  # answer after the upload: clients see the 429, not a reset
            raise HTTPException(429, f"the server holds its maximum of {state.max_sessions} sessions; retry later")
        path = await read_body(request, state.max_bundle_bytes, "the key bundle", spool_dir=state._tmp.name)
        try:
            sid = await asyncio.get_running_loop().run_in_executor(state.worker, state.open_session, path)
        finally:
            os.unlink(path)
        return {"session_id": sid, "session_ttl_s": state.session_ttl_s}

    @app.delete("/v1/sessions/{sid}")
    async def unregister(sid: str):
        state.session(sid)
        state.drop(sid)
        return {"deleted": sid}

    @app.post("/v1/sessions/{sid}/streams", status_code=201)
    async def start_stream(sid: str):
        s = state.session(sid)
        try:
            stid = s.server.open_stream()
        except Exception as e:
            raise HTTPException(status_of(e), str(e)) from e
        s.streams.add(stid)
        return {"stream_id": stid}

    @app.delete("/v1/sessions/{sid}/streams/{stid}")
    async def end_stream(sid: str, stid: str):
        s = state.session(sid)
        if stid not in s.streams:
            raise HTTPException(404, f"unknown stream {stid!r} in session {sid!r}")
        s.streams.discard(stid)
        s.server.close_stream(stid)
        return {"deleted": stid}

    @app.post("/v1/sessions/{sid}/jobs", status_code=202)
    async def submit(sid: str, request: Request, op: str, seq_len: Optional[int] = None, stream: Optional[str] = None):
        s = state.session(sid)
        if op not in ("run", "prefill", "decode"):
            raise HTTPException(422, f"op must be run, prefill or decode, got {op!r}")
        pending = sum(j.status in ("queued", "running") or j.result is not None for j in s.jobs.values())
        if pending >= state.max_jobs_per_session:
            raise HTTPException(429, f"session {sid!r} has {pending} unfetched jobs (limit {state.max_jobs_per_session})")
        data = await read_body(request, state.max_request_bytes, "the ciphertext")
        try:
            h = read_header(data)
        except SerializationError as e:
            raise HTTPException(400, str(e)) from e
        if h.role != "embeddings":
            raise HTTPException(422, f"the server takes encrypted embeddings, this tensor holds {h.role}")
        if h.key_tag != s.key_tag or h.ring_dim != s.ring_dim:
            raise HTTPException(409, "the ciphertext was encrypted under another key than this session's "
                                     f"(tag {h.key_tag[:12]}..., session key {s.key_tag[:12]}...)")
        max_len = int(state.meta["max_length"])
        if op == "run":
            if seq_len is None or not 1 <= seq_len <= max_len:
                raise HTTPException(422, f"op=run needs seq_len in 1..{max_len}, got {seq_len}")
            if h.rows != seq_len:
                raise HTTPException(422, f"the ciphertext packs {h.rows} rows, seq_len says {seq_len}")
        else:
            if stream not in s.streams:
                raise HTTPException(404, f"unknown stream {stream!r}; start one with POST /v1/sessions/{sid}/streams")
            if op == "decode" and h.rows != 1:
                raise HTTPException(422, f"op=decode takes one token's embedding (1 row), got {h.rows}")
        jid = uuid.uuid4().hex
        job = s.jobs[jid] = Job(op)
        state.worker.submit(state.execute, s, job, data, {"seq_len": seq_len, "stream": stream})
        return {"job_id": jid, "status": job.status}

    @app.get("/v1/sessions/{sid}/jobs/{jid}")
    async def fetch(sid: str, jid: str):
        s = state.session(sid)
        job = s.jobs.get(jid)
        if job is None:
            raise HTTPException(404, f"unknown or already fetched job {jid!r}")
        if job.status in ("queued", "running"):
            return JSONResponse({"job_id": jid, "status": job.status}, status_code=202)
        s.jobs.pop(jid, None)
        if job.status == "failed":
            raise HTTPException(job.error[0], job.error[1])
        return Response(job.result, media_type="application/octet-stream",
                        headers={"X-HE-Timings": json.dumps({k: round(v, 4) for k, v in job.timings.items()})})

    return app


def serve(export_dir, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **limits) -> None:
    """Run the server (blocking) with uvicorn."""
    import uvicorn

    app = create_app(export_dir, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
