"""The HTTP server behind ``hf-polyhe serve EXPORT_DIR`` (FastAPI + uvicorn). Endpoints: see :mod:`hf_polyhe.serve`.

This process (the supervisor) never runs OpenFHE: it holds the export's server part, its own plan of the export
per parameter set, and the sessions' files; every byte a client sends that OpenFHE must parse is parsed in a
worker process (:mod:`hf_polyhe.serve.worker`, one per session), so a crafted key or ciphertext that crashes
OpenFHE ends that worker, never the server or another session. Before a worker sees anything:

- a bundle's ``bundle.json`` must describe the keys of *this server's* plan of the export for the named parameter
  set (:func:`hf_polyhe.he.plan_for_export`, computed here and cached): same digest, parameters, packing, start
  level, mode, rotation keys covering the plan's; bootstrapping keys only when the server's plan bootstraps; toy
  parameters only with ``allow_toy``. The worker then evaluates with the server's plan, never the client's.
- ``context.bin`` must equal, byte for byte, the crypto context the server makes from its plan's parameters;
  key files are extracted with limits on their *actual* decompressed bytes (and on the compression ratio), and
  after loading the worker checks the key tag and that the rotation keys cover the plan.
- a ciphertext must be exactly a fresh ciphertext of the session's parameters at the plan's start level
  (:class:`hf_polyhe.he.runtime.precheck.CiphertextTemplate`), in the layout the plan packs the request in.

Jobs run on ``parallel_jobs`` lanes (default one: CKKS work uses every core), taking sessions in turn (round
robin: a session with many queued jobs does not hold back the others); each job has a wall-clock limit
(``job_timeout_s``, the worker is killed past it) and each worker an address-space limit (``worker_memory_bytes``).
A session whose worker died gets a new one on its next job (its keys load again from its directory).

State (``state_dir``; a temporary directory removed at exit when not given)::

    sessions/<sid>/   bundle files, session.json (written last: a directory without it is removed at start-up),
                      streams/<stream id>/stream.bin (KV cache and position, replaced atomically), worker.log
    plans/<digest>-<params>/   the server's plan, the reference context and ciphertext template
    incoming/         uploads being received or extracted (emptied at start-up and shutdown)

With a ``state_dir``, a restarted server keeps every session and stream; jobs in flight are lost (a
:class:`~hf_polyhe.serve.RemoteServer` resubmits ``run`` jobs). Sessions expire after ``session_ttl_s`` idle.

Errors (JSON ``{"detail", "error"}``, never a server path): 400 malformed (not a zip / ciphertext, corrupted,
a file that crashed OpenFHE's parser), 401 missing or wrong token, 403 a secret key sent / toy parameters not
allowed, 404 unknown session / stream / job (``error``: ``unknown_session`` ...), 409 keys or ciphertext of
another export, key or plan, a stream in the wrong state, 413 too large (upload, decompressed bundle, memory of a
load), 422 wrong shape or parameters, 429 limits (sessions, jobs, streams), 500 a worker died during evaluation,
503 a job past its time or memory limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import warnings
import zipfile
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from .. import he
from ..he import params as P
from ..he.circuit.packing import MatrixLayout, layout_from_dict, same_packing
from ..he.compile.export_plan import PLAN_VERSION, ExportPlan, plan_for_export, spec_digest
from ..he.compile.planner import key_bytes
from ..he.compile.transformer import TransformerSpec
from ..he.errors import (CircuitError, HEError, KeyMismatchError, LayoutError, PlanningError, SerializationError,
                         StreamError, ToyParametersWarning)
from ..he.export import part_dir, read_pipeline_json
from ..he.files import read_json
from ..he.runtime.ciphertext import read_header
from ..he.runtime.keys import BUNDLE_FILES, BUNDLE_FORMAT
from ..he.runtime.precheck import CiphertextTemplate, check_fresh
from ..he.runtime.sandbox import (ChildCrashed, ChildError, ChildFailed, ChildProcess, ChildTimedOut, describe_exit,
                                  public_message)
from ..he.runtime.server import MAX_STREAMS

MiB = 1 << 20
GiB = 1 << 30
logger = logging.getLogger("hf_polyhe.serve")

# status of an error raised in a worker, by its type name
STATUS_OF_TYPE = {"KeyMismatchError": 409, "StreamError": 409, "LayoutError": 422, "CircuitError": 422,
                  "PlanningError": 422, "SerializationError": 400, "ValueError": 422, "HEError": 422,
                  "MemoryError": 503}
SESSION_FORMAT = "hf_polyhe.serve.session"
MAX_BUNDLE_JSON_BYTES = 4 * MiB  # a plan with its report is a few kB
MAX_ZIP_RATIO = 8  # keys are random: a member that decompresses to more than 8x its compressed size is a bomb
_ID = re.compile(r"^[0-9a-f]{32}$")


def status_of(error: Exception) -> int:
    """The HTTP status for an error of the encrypted runtime."""
    if isinstance(error, (KeyMismatchError, StreamError)):
        return 409
    if isinstance(error, (LayoutError, CircuitError, PlanningError)):
        return 422
    if isinstance(error, SerializationError):
        return 400
    if isinstance(error, (ValueError, HEError)):
        return 422
    return 500


class Refused(HTTPException):
    """An HTTP error with a machine-readable ``error`` code next to its ``detail``."""

    def __init__(self, status: int, detail: str, code: Optional[str] = None):
        super().__init__(status, detail)
        self.code = code


@dataclass(eq=False)
class Job:
    op: str
    status: str = "queued"
    result: Optional[bytes] = None
    error: Optional[tuple] = None
    timings: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)


@dataclass(eq=False)
class Session:
    sid: str
    directory: str
    key_tag: str
    ring_dim: int
    params: str  # the parameter set of the server's plan the keys were checked against
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    jobs: dict = field(default_factory=dict)
    streams: set = field(default_factory=set)
    worker: Optional[ChildProcess] = None
    loaded: bool = False
    closed: bool = False
    queue: deque = field(default_factory=deque)  # work waiting for a lane (see Scheduler)
    busy: bool = False
    memory_limit: int = 0  # the worker's address-space limit (bytes)

    def to_dict(self) -> dict:
        return {"format": SESSION_FORMAT, "sid": self.sid, "key_tag": self.key_tag, "ring_dim": self.ring_dim,
                "params": self.params, "created": self.created, "last_used": self.last_used}


class Scheduler:
    """``lanes`` threads running queued work, one item at a time per session, sessions in turn (round robin)."""

    def __init__(self, lanes: int = 1):
        self.cv = threading.Condition()
        self.ready: deque = deque()
        self.running = True
        self.threads = [threading.Thread(target=self._lane, name=f"ckks-lane-{i}", daemon=True) for i in range(lanes)]
        for t in self.threads:
            t.start()

    def submit(self, s: Session, fn) -> None:
        with self.cv:
            s.queue.append(fn)
            if not s.busy and s not in self.ready:
                self.ready.append(s)
                self.cv.notify()

    def _lane(self):
        while True:
            with self.cv:
                while self.running and not self.ready:
                    self.cv.wait()
                if not self.running:
                    return
                s = self.ready.popleft()
                fn = s.queue.popleft()
                s.busy = True
            try:
                fn()
            except Exception:  # noqa: BLE001 - a lane never dies
                logger.error("hf_polyhe serve: unexpected error on a lane:\n%s", traceback.format_exc())
            finally:
                with self.cv:
                    s.busy = False
                    if s.queue and not s.closed:
                        self.ready.append(s)
                        self.cv.notify()

    def stop(self):
        with self.cv:
            self.running = False
            self.cv.notify_all()


class _ServedExport:
    """What :func:`plan_for_export` reads of an export: the server part, and the client's tables when the export
    directory has them (bootstrapping exports calibrate on embeddings)."""

    def __init__(self, directory, meta, spec):
        self.directory, self.meta, self.spec = str(directory), meta, spec
        self.family, self.max_length = meta["family"], int(meta["max_length"])
        self._export = None

    def __getattr__(self, name):  # tables / embed: the full export, loaded when a bootstrapping plan needs it
        if name in ("tables", "embed"):
            if self._export is None:
                self._export = he.Export(self.directory)
            return getattr(self._export, name)
        raise AttributeError(name)


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        return 64 * GiB


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: str, doc: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)


def redact_path(path: str) -> str:
    """A request path without session, stream and job ids (they are credentials)."""
    path = re.sub(r"/(sessions|jobs|streams)/[^/?#\s]+", r"/\1/<id>", str(path))
    return re.sub(r"([?&]stream=)[^&#\s]+", r"\1<id>", path)


class RedactIds(logging.Filter):
    """uvicorn's access log with ids replaced by ``<id>``."""

    def filter(self, record):
        if isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            args[2] = redact_path(args[2])
            record.args = tuple(args)
        elif isinstance(record.msg, str):
            record.msg = redact_path(record.msg)
        return True


class ServerState:
    """Sessions, their workers, jobs and plans of one served export (see the module docstring)."""

    def __init__(self, export_dir, max_sessions: int = 4, max_request_bytes: int = 64 * MiB,
                 max_bundle_bytes: int = 4096 * MiB, max_jobs_per_session: int = 8, session_ttl_s: float = 3600.0,
                 work_dir: Optional[str] = None, state_dir: Optional[str] = None, max_streams: int = MAX_STREAMS,
                 job_timeout_s: float = 1800.0, load_timeout_s: float = 1800.0,
                 worker_memory_bytes: Optional[int] = None, parallel_jobs: int = 1, allow_toy: bool = False,
                 auth_token: Optional[str] = None):
        self.export_dir = str(export_dir)
        self.meta = read_pipeline_json(export_dir)
        self.spec_dir = part_dir(export_dir, self.meta, "server")
        self.spec = TransformerSpec.load(self.spec_dir)
        self.digest = spec_digest(self.spec)
        self.model = _ServedExport(export_dir, self.meta, self.spec)
        self.max_sessions, self.max_request_bytes, self.max_bundle_bytes = max_sessions, max_request_bytes, max_bundle_bytes
        self.max_jobs_per_session, self.session_ttl_s, self.max_streams = max_jobs_per_session, session_ttl_s, max_streams
        self.job_timeout_s, self.load_timeout_s = job_timeout_s, load_timeout_s
        self.worker_memory_bytes, self.allow_toy, self.auth_token = worker_memory_bytes, allow_toy, auth_token or None
        self.persistent = state_dir is not None
        if state_dir is None:
            self._clean_stale_temp(work_dir)
            state_dir = tempfile.mkdtemp(prefix=f"hf_polyhe_serve_{os.getpid()}_", dir=work_dir)
            with open(os.path.join(state_dir, "server.pid"), "w") as f:
                f.write(str(os.getpid()))
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self._claim_state_dir()
        self.incoming = os.path.join(self.state_dir, "incoming")
        self.sessions_dir = os.path.join(self.state_dir, "sessions")
        self.plans_dir = os.path.join(self.state_dir, "plans")
        shutil.rmtree(self.incoming, ignore_errors=True)  # uploads of a previous run that never finished
        for d in (self.incoming, self.sessions_dir, self.plans_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.sessions: dict = {}
        self.pending = 0  # registrations in progress (they hold a session slot)
        self.lock = threading.RLock()
        self._plans: dict = {}
        self._refs: dict = {}
        self._plan_lock = threading.Lock()
        self.scheduler = Scheduler(max(1, int(parallel_jobs)))
        self.started = time.time()
        self._restore_sessions()

    # -- state directory --------------------------------------------------------------------------------------
    @staticmethod
    def _clean_stale_temp(work_dir):
        """Temporary state directories of servers that are gone (killed before they could clean up)."""
        root = work_dir or tempfile.gettempdir()
        try:
            names = os.listdir(root)
        except OSError:
            return
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith("hf_polyhe_serve_") or not os.path.isdir(path):
                continue
            try:
                if os.stat(path).st_uid != os.getuid():
                    continue
                with open(os.path.join(path, "server.pid")) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)

    def _claim_state_dir(self):
        """One server per state directory, and one export: a second server on it, or a server of another export,
        would remove sessions it cannot use."""
        self._lock_file = open(os.path.join(self.state_dir, "server.lock"), "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another hf-polyhe serve uses the state directory {self.state_dir}") from None
        path = os.path.join(self.state_dir, "server.json")
        if os.path.exists(path):
            doc = read_json(path)
            if doc.get("digest") != self.digest:
                raise RuntimeError(f"the state directory {self.state_dir} holds the sessions of another export "
                                   "(or of modified weights): give this export a directory of its own")
        else:
            _write_json(path, {"format": "hf_polyhe.serve.state", "digest": self.digest})

    def _restore_sessions(self):
        """Sessions a previous run of this state directory registered (complete ones only)."""
        now = time.time()
        for sid in os.listdir(self.sessions_dir):
            directory = os.path.join(self.sessions_dir, sid)
            try:
                doc = read_json(os.path.join(directory, "session.json"))
                if doc.get("format") != SESSION_FORMAT or doc.get("digest") != self.digest or not _ID.match(sid):
                    raise ValueError("another export or format")
                if now - float(doc["last_used"]) > self.session_ttl_s:
                    raise ValueError("expired")
                if doc["params"] == "toy" and not self.allow_toy:  # kept on disk for a run with --allow-toy
                    logger.warning("hf_polyhe serve: stored session %s... uses toy parameters: not served without "
                                   "--allow-toy", sid[:6])
                    continue
                s = Session(sid, directory, str(doc["key_tag"]), int(doc["ring_dim"]), str(doc["params"]),
                            created=float(doc["created"]), last_used=float(doc["last_used"]))
                streams = os.path.join(directory, "streams")
                s.streams = {n for n in os.listdir(streams) if _ID.match(n)} if os.path.isdir(streams) else set()
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("hf_polyhe serve: dropping stored session %s... (%s)", sid[:6], public_message(str(e)))
                shutil.rmtree(directory, ignore_errors=True)
                continue
            self.sessions[sid] = s
        if self.sessions:
            logger.warning("hf_polyhe serve: %d stored session(s) restored", len(self.sessions))

    def _save_session(self, s: Session) -> None:
        if not s.closed:
            with contextlib.suppress(OSError):
                _write_json(os.path.join(s.directory, "session.json"), {**s.to_dict(), "digest": self.digest})

    def shutdown(self):
        """Stop every worker and the lanes; remove uploads (and the whole state when it was temporary)."""
        self.scheduler.stop()
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            if s.worker is not None:
                s.worker.kill()
            self._save_session(s)
        shutil.rmtree(self.incoming, ignore_errors=True)
        if not self.persistent:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self._lock_file.close()

    # -- the server's own plan of the export -----------------------------------------------------------------
    def _params(self, name) -> P.CKKSParams:
        if name == "toy" and not self.allow_toy:
            raise Refused(403, "this server does not accept the INSECURE toy parameters (start it with --allow-toy, "
                               "for tests only); generate 128-bit keys", "toy_refused")
        if name not in P.PARAMETER_SETS:
            raise Refused(422, f"unknown parameter set {name!r}; this server plans {', '.join(P.PARAMETER_SETS)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ToyParametersWarning)
            return P.get(name)

    def plan(self, name: str) -> ExportPlan:
        """This server's plan of the export for parameter set ``name`` (made once, kept in ``plans/``)."""
        params = self._params(name)
        with self._plan_lock:
            if name in self._plans:
                return self._plans[name]
            directory = self._plan_dir(name)
            path = os.path.join(directory, "plan.json")
            plan = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ToyParametersWarning)
                if os.path.exists(path):
                    with contextlib.suppress(Exception):
                        plan = ExportPlan.from_dict(read_json(path))
                        if plan.digest != self.digest:
                            plan = None
                if plan is None:
                    t0 = time.perf_counter()
                    try:
                        plan = plan_for_export(self.model, params)
                    except HEError as e:
                        raise Refused(422, f"this server cannot plan the export for {name!r} parameters: "
                                           f"{public_message(str(e))}") from None
                    plan.spec_dir = None
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                    _write_json(path, plan.to_dict())
                    logger.warning("hf_polyhe serve: planned the export for %s parameters in %.1f s", name,
                                   time.perf_counter() - t0)
            self._plans[name] = plan
            return plan

    def _plan_dir(self, name: str) -> str:
        """Where the plan for ``name`` and its reference context are kept: per export, parameter set and planner
        version (a plan cached by an older planner may differ from what clients now plan, and be refused)."""
        return os.path.join(self.plans_dir, f"{self.digest[:16]}-{name}-v{PLAN_VERSION}")

    def plan_path(self, name: str) -> str:
        self.plan(name)
        return os.path.join(self._plan_dir(name), "plan.json")

    def reference(self, name: str) -> tuple:
        """``(context bytes, [CiphertextTemplate])`` of the server's plan for ``name``: made once by a throwaway
        worker from the plan's parameters, kept beside the plan."""
        self.plan(name)
        with self._plan_lock:
            if name in self._refs:
                return self._refs[name]
            directory = self._plan_dir(name)
            ctx_path, tpl_path = os.path.join(directory, "context.bin"), os.path.join(directory, "templates.json")
            try:
                with open(ctx_path, "rb") as f:
                    context = f.read()
                templates = [CiphertextTemplate.from_dict(d) for d in read_json(tpl_path)["templates"]]
            except (OSError, ValueError, KeyError, TypeError, SerializationError):
                child = ChildProcess("hf_polyhe.serve.worker", memory_bytes=self._memory_limit(0))
                try:
                    head, context = child.call({"op": "reference", "plan": os.path.join(directory, "plan.json")},
                                               timeout=self.load_timeout_s)
                except ChildFailed as e:
                    raise Refused(500, f"the server could not build the crypto context of its plan: {e}") from None
                finally:
                    child.stop()
                templates = [CiphertextTemplate.from_dict(d) for d in head["templates"]]
                with open(ctx_path + ".tmp", "wb") as f:
                    f.write(context)
                os.replace(ctx_path + ".tmp", ctx_path)
                _write_json(tpl_path, {"templates": [t.to_dict() for t in templates]})
            self._refs[name] = (context, templates)
            return self._refs[name]

    def _memory_limit(self, bundle_bytes: int) -> int:
        """A worker's address-space limit: ``worker_memory_bytes``, else three times its keys plus 4 GiB (the
        keys in memory are about their size on disk; evaluation needs working room), at most 90% of RAM."""
        if self.worker_memory_bytes:
            return int(self.worker_memory_bytes)
        return int(min(0.9 * _total_memory(), 3 * bundle_bytes + 4 * GiB))

    # -- sessions ----------------------------------------------------------------------------------------------
    def expire(self):
        now = time.time()
        with self.lock:
            old = [sid for sid, s in self.sessions.items()
                   if now - s.last_used > self.session_ttl_s and not s.busy and not s.queue]
        for sid in old:
            self.drop(sid)

    def drop(self, sid: str):
        with self.lock:
            s = self.sessions.pop(sid, None)
        if s is not None:
            s.closed = True
            if s.worker is not None:
                s.worker.kill()  # frees every key the session loaded
            shutil.rmtree(s.directory, ignore_errors=True)

    def session(self, sid: str) -> Session:
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise Refused(404, "unknown or expired session; register keys with POST /v1/sessions", "unknown_session")
        s.last_used = time.time()
        return s

    def reserve(self) -> None:
        """Hold a session slot for a registration (429 when none is free)."""
        with self.lock:
            if len(self.sessions) + self.pending >= self.max_sessions:
                raise Refused(429, f"the server holds its maximum of {self.max_sessions} sessions; retry later",
                              "too_many_sessions")
            self.pending += 1

    def release(self) -> None:
        with self.lock:
            self.pending -= 1

    def check_bundle_plan(self, client: dict) -> tuple:
        """``(parameter set name, server plan)`` for a bundle's plan, or a Refused naming what differs."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ToyParametersWarning)
                theirs = ExportPlan.from_dict(client)
        except Exception as e:  # noqa: BLE001
            raise Refused(400, f"bundle.json holds no readable plan: {public_message(str(e))}") from None
        if theirs.digest != self.digest:
            raise Refused(409, "the keys were made for another export (or modified weights) than this server holds",
                          "other_export")
        name = theirs.params.name
        ours = self.plan(name)
        if theirs.params.bootstrap and not ours.params.bootstrap:
            raise Refused(409, "the bundle brings bootstrapping keys, but this server's plan of the export does not "
                               "bootstrap: generate keys with the export's default plan", "plan_mismatch")
        for what in ("params", "start_level", "mode", "levels_after_bootstrap", "max_leveled_depth", "family",
                     "max_length", "hidden_size", "block", "slots", "groups", "kv_cache", "decode_input",
                     "compose_rotations"):
            a, b = getattr(theirs, what), getattr(ours, what)
            if what == "params":
                a, b = a.to_dict(), b.to_dict()
            if a != b:
                raise Refused(409, f"the keys were planned differently from this server's plan of the export "
                                   f"({what}: keys {json.dumps(a)[:200]}, server {json.dumps(b)[:200]}); make keys with "
                                   f"the export's default plan for {name!r} parameters", "plan_mismatch")
        missing = sorted(set(ours.rotation_keys) - set(int(r) for r in theirs.rotation_keys))
        if missing:
            raise Refused(409, f"the bundle's plan lacks rotation keys {missing[:8]} that this server's plan needs",
                          "plan_mismatch")
        return name, ours

    def extract_bundle(self, zip_path: str, directory: str) -> tuple:
        """Unpack and check an uploaded bundle into ``directory`` (created here): ``(key tag, parameter set
        name, bytes on disk)``. Raises Refused; the caller removes ``directory`` on failure."""
        try:
            z = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise Refused(400, f"the body is not a bundle zip ({e}); send hf_polyhe.serve.bundle_zip(dir)") from None
        with z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if any("secret" in n.lower() for n in names):
                raise Refused(403, "the bundle contains a secret key; send only the public server bundle")
            if len(set(names)) != len(names) or any(n not in BUNDLE_FILES for n in names) or "bundle.json" not in names \
                    or "context.bin" not in names or "eval_mult_keys.bin" not in names:
                raise Refused(400, f"a bundle holds {', '.join(BUNDLE_FILES)} once each (all but "
                                   f"eval_automorphism_keys.bin required); got {names[:8]}")
            os.makedirs(directory, mode=0o700)
            member = {i.filename: i for i in infos}
            self._extract(z, member["bundle.json"], directory, MAX_BUNDLE_JSON_BYTES)
            try:
                meta = read_json(os.path.join(directory, "bundle.json"))
                if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
                    raise ValueError(f"not a {BUNDLE_FORMAT} document")
                key_tag, client_plan = meta["key_tag"], meta["plan"]
                if not isinstance(key_tag, str) or not re.fullmatch(r"[0-9a-f]{1,128}", key_tag):
                    raise ValueError("key_tag must be a hex string")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise Refused(400, f"bundle.json is not a server bundle description: {public_message(str(e))}") from None
            name, plan = self.check_bundle_plan(client_plan)
            context, _ = self.reference(name)
            self._extract(z, member["context.bin"], directory, len(context))
            with open(os.path.join(directory, "context.bin"), "rb") as f:
                theirs = f.read()
            if theirs != context:
                first = next((i for i, (a, b) in enumerate(zip(theirs, context)) if a != b), min(len(theirs), len(context)))
                raise Refused(422, f"context.bin is not the crypto context of this server's plan for {name!r} "
                                   f"parameters (byte {first} differs: ring dimension, moduli or scheme)", "bad_context")
            sizes = key_bytes(plan.params, len(plan.rotation_keys))
            total = len(context) + os.path.getsize(os.path.join(directory, "bundle.json"))
            limits = {"eval_mult_keys.bin": 2 * sizes["relin"] + MiB,
                      "eval_automorphism_keys.bin": 2 * sizes["rotation"] + 3 * sizes["bootstrap"] + MiB}
            for n in ("eval_mult_keys.bin", "eval_automorphism_keys.bin"):
                if n in member:
                    total += self._extract(z, member[n], directory, min(limits[n], self.max_bundle_bytes - total))
        return key_tag, name, total

    @staticmethod
    def _extract(z: zipfile.ZipFile, info: zipfile.ZipInfo, directory: str, limit: int) -> int:
        """Copy one member, counting the bytes it actually decompresses to (the sizes a zip declares can lie)."""
        written, path = 0, os.path.join(directory, info.filename)
        try:
            with z.open(info) as src, open(path, "wb") as dst:
                while True:
                    chunk = src.read(MiB)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > limit:
                        raise Refused(413, f"{info.filename} unpacks to more than the {max(limit, 0)} bytes this "
                                           "server's plan allows for it", "too_large")
                    if written > MiB and written > MAX_ZIP_RATIO * max(info.compress_size, 1):
                        raise Refused(413, f"{info.filename} decompresses to over {MAX_ZIP_RATIO} times its "
                                           "compressed size; keys do not compress: refused", "too_large")
                    dst.write(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
            if isinstance(e, HTTPException):
                raise
            raise Refused(400, f"{info.filename}: the zip is corrupted ({public_message(str(e))})") from None
        return written

    def register(self, zip_path: str) -> Session:
        """Check and unpack a bundle, then load it in a new worker (on a lane). Raises Refused."""
        sid = uuid.uuid4().hex
        directory = os.path.join(self.sessions_dir, sid)
        s = None
        try:
            key_tag, name, size = self.extract_bundle(zip_path, directory)
            s = Session(sid, directory, key_tag, 0, name)
            done = threading.Event()
            outcome = {}

            def load():
                try:
                    outcome["ok"] = self._load(s, size)
                except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                    outcome["error"] = e
                finally:
                    done.set()

            self.scheduler.submit(s, load)
            done.wait()
            if "error" in outcome:
                raise outcome["error"]
            self._save_session(s)
            with self.lock:
                self.sessions[sid] = s
            return s
        except BaseException:
            if s is not None:
                s.closed = True
                if s.worker is not None:
                    s.worker.kill()
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _load(self, s: Session, bundle_bytes: Optional[int] = None) -> None:
        """Start ``s``'s worker and load its keys there (lane thread). Raises Refused naming what failed."""
        if s.closed:
            raise Refused(404, "the session was closed", "unknown_session")
        if bundle_bytes is None:
            bundle_bytes = sum(os.path.getsize(os.path.join(s.directory, n)) for n in BUNDLE_FILES
                               if os.path.exists(os.path.join(s.directory, n)))
        limit = s.memory_limit = self._memory_limit(bundle_bytes)
        if s.worker is not None:
            s.worker.kill()
        s.worker = ChildProcess("hf_polyhe.serve.worker", memory_bytes=limit,
                                stderr=os.path.join(s.directory, "worker.log"))
        s.loaded = False
        try:
            head, _ = s.worker.call({"op": "load", "session": s.directory, "plan": self.plan_path(s.params),
                                     "spec": self.spec_dir}, timeout=self.load_timeout_s)
        except ChildCrashed as e:
            s.worker = None
            what = e.stage or "the bundle"
            raise Refused(400, f"OpenFHE crashed while loading {what} (the worker that parsed it "
                               f"{describe_exit(e.returncode)}): the file is malformed", "parser_crashed") from None
        except ChildTimedOut as e:
            s.worker = None
            raise Refused(503, f"loading the keys ({e.stage or 'bundle'}) ran past the server's limit of "
                               f"{self.load_timeout_s:g} s (--load-timeout)", "timeout") from None
        except ChildError as e:
            s.worker.kill()
            s.worker = None
            if e.type_name == "MemoryError":
                raise Refused(413, f"loading {e.stage or 'the bundle'} needs more memory than this server allows a "
                                   f"session ({limit // MiB} MiB): the file is malformed or too large "
                                   f"({e.message or 'out of memory'})", "too_large") from None
            raise Refused(STATUS_OF_TYPE.get(e.type_name, 400),
                          f"cannot load the bundle ({e.stage or 'bundle'}): {e.type_name}: {e.message}", "bad_keys") from None
        if head.get("key_tag") != s.key_tag:
            s.worker.kill()
            s.worker = None
            raise Refused(409, "the keys carry another key tag than bundle.json says", "plan_mismatch")
        s.ring_dim, s.loaded = int(head["ring_dim"]), True

    # -- jobs ----------------------------------------------------------------------------------------------------
    def expected_layout(self, s: Session, op: str, rows: int):
        plan = self.plan(s.params)
        if op == "decode" and plan.decode_input:
            return layout_from_dict(plan.decode_input)
        return MatrixLayout(rows, plan.hidden_size, plan.block, plan.slots, groups=plan.groups)

    def check_payload(self, s: Session, data: bytes, h) -> None:
        """Every ciphertext of an input must be a fresh ciphertext of the session's parameters (400 otherwise)."""
        _, templates = self.reference(s.params)
        view = memoryview(data)
        for i, (start, n) in enumerate(h.offsets):
            try:
                check_fresh(templates, view[start : start + n], s.key_tag)
            except SerializationError as e:
                raise Refused(400, f"ciphertext {i} of the input: {e}", "bad_ciphertext") from None

    def execute(self, s: Session, job: Job, data: bytes, query: dict):
        """Run one job in the session's worker (lane thread)."""
        job.status = "running"
        try:
            if s.closed:
                raise Refused(404, "the session was closed", "unknown_session")
            if s.worker is None or not s.worker.alive or not s.loaded:
                try:
                    self._load(s)
                except Refused as e:
                    raise Refused(503, f"the session's keys could not be loaded again: {e.detail}") from None
            head = {"op": job.op, **{k: v for k, v in query.items() if v is not None}}
            try:
                reply, body = s.worker.call(head, data, timeout=self.job_timeout_s)
            except ChildCrashed as e:
                s.worker, s.loaded = None, False
                if e.stage is None:  # before the worker reported the input parsed
                    raise Refused(400, f"the ciphertext crashed OpenFHE's parser (the session's worker "
                                       f"{describe_exit(e.returncode)}; it is restarted for the next job)",
                                  "parser_crashed") from None
                raise Refused(500, f"the session's worker {describe_exit(e.returncode)} during evaluation; it is "
                                   "restarted for the next job: retry", "worker_died") from None
            except ChildTimedOut:
                s.worker, s.loaded = None, False
                raise Refused(503, f"the job ran past the server's limit of {self.job_timeout_s:g} s per job "
                                   "(--job-timeout) and was stopped", "timeout") from None
            except ChildError as e:
                if e.type_name == "MemoryError":
                    s.worker.kill()
                    s.worker, s.loaded = None, False
                    raise Refused(503, f"the job needs more memory than this server allows a session "
                                       f"({s.memory_limit // MiB} MiB, --worker-memory-mb)", "out_of_memory") from None
                raise Refused(STATUS_OF_TYPE.get(e.type_name, 500), f"{e.type_name}: {e.message}") from None
            job.result, job.timings, job.status = body, dict(reply.get("timings") or {}), "done"
        except Refused as e:
            job.error, job.status = (e.status_code, e.detail, e.code), "failed"
        except Exception as e:  # noqa: BLE001 - a bad job fails alone
            logger.error("hf_polyhe serve: job failed:\n%s", traceback.format_exc())
            job.error, job.status = (500, f"internal error ({type(e).__name__})", None), "failed"
        finally:
            s.last_used = time.time()
            self._save_session(s)


async def read_body(request: Request, limit: int, what: str, spool_dir: Optional[str] = None):
    """The body as bytes (or a temp file path when ``spool_dir``), refusing more than ``limit`` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"{what} of {declared} bytes exceeds the limit of {limit} bytes", "too_large")
    size, chunks = 0, []
    f = tempfile.NamedTemporaryFile(dir=spool_dir, delete=False) if spool_dir else None
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"{what} exceeds the limit of {limit} bytes", "too_large")
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


class TokenAuth:
    """ASGI middleware: every ``/v1`` request but ``GET /v1/health`` needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["path"] != "/v1/health":
            sent = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not (sent.startswith(b"Bearer ") and hmac.compare_digest(sent[7:].strip(), self.token)):
                response = JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                                   "(RemoteServer(url, token=...) or $HF_POLYHE_AUTH_TOKEN)",
                                         "error": "unauthorized"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(export_dir, **limits) -> FastAPI:
    """The FastAPI application serving ``export_dir`` (keyword ``limits``: see :class:`ServerState`)."""
    state = ServerState(export_dir, **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        logging.getLogger("uvicorn.access").addFilter(RedactIds())

        async def reaper():
            while True:
                await asyncio.sleep(30)
                await asyncio.to_thread(state.expire)

        task = asyncio.get_running_loop().create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="hf_polyhe encrypted inference server", version="2", lifespan=lifespan)
    app.state.he = state
    if state.auth_token:
        app.add_middleware(TokenAuth, token=state.auth_token)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        body = {"detail": public_message(str(exc.detail)), "error": getattr(exc, "code", None)}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        ref = uuid.uuid4().hex[:8]
        logger.error("hf_polyhe serve: internal error %s:\n%s", ref, traceback.format_exc())
        return JSONResponse({"detail": f"internal server error (reference {ref} in the server's log)",
                             "error": "internal"}, status_code=500)

    @app.get("/v1/health")
    async def health():
        state.expire()
        return {"status": "ok", "task": state.meta["task"], "family": state.meta["family"],
                "max_length": state.meta["max_length"], "sessions": len(state.sessions),
                "max_sessions": state.max_sessions, "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/v1/info")
    async def info():
        return {"pipeline": state.meta, "spec_digest": state.digest, "auth": bool(state.auth_token),
                "params": [n for n in P.PARAMETER_SETS if n != "toy" or state.allow_toy],
                "limits": {"max_sessions": state.max_sessions, "max_request_bytes": state.max_request_bytes,
                           "max_bundle_bytes": state.max_bundle_bytes, "session_ttl_s": state.session_ttl_s,
                           "max_jobs_per_session": state.max_jobs_per_session, "max_streams": state.max_streams,
                           "job_timeout_s": state.job_timeout_s, "load_timeout_s": state.load_timeout_s,
                           "persistent_sessions": state.persistent}}

    @app.post("/v1/sessions", status_code=201)
    async def register(request: Request):
        await asyncio.to_thread(state.expire)
        try:
            state.reserve()
        except Refused:
            await drain(request, state.max_bundle_bytes)  # answer after the upload: clients see the 429, not a reset
            raise
        try:
            path = await read_body(request, state.max_bundle_bytes, "the key bundle", spool_dir=state.incoming)
            try:
                s = await asyncio.to_thread(state.register, path)
            finally:
                os.unlink(path)
        finally:
            state.release()
        return {"session_id": s.sid, "session_ttl_s": state.session_ttl_s, "params": s.params}

    @app.delete("/v1/sessions/{sid}")
    async def unregister(sid: str):
        state.session(sid)
        await asyncio.to_thread(state.drop, sid)
        return {"deleted": sid}

    @app.post("/v1/sessions/{sid}/streams", status_code=201)
    async def start_stream(sid: str):
        s = state.session(sid)
        if not state.plan(s.params).kv_cache:
            raise Refused(409, "this export was planned without a KV cache: use op=run per token")
        with state.lock:
            if len(s.streams) >= state.max_streams:
                raise Refused(429, f"the session holds {len(s.streams)} open streams (limit {state.max_streams}): "
                                   "close one first", "too_many_streams")
            stid = uuid.uuid4().hex
            os.makedirs(os.path.join(s.directory, "streams", stid), mode=0o700)
            s.streams.add(stid)
        return {"stream_id": stid}

    @app.delete("/v1/sessions/{sid}/streams/{stid}")
    async def end_stream(sid: str, stid: str):
        s = state.session(sid)
        with state.lock:
            if stid not in s.streams:
                raise Refused(404, "unknown stream in this session", "unknown_stream")
            s.streams.discard(stid)
        await asyncio.to_thread(shutil.rmtree, os.path.join(s.directory, "streams", stid), True)
        return {"deleted": stid}

    @app.post("/v1/sessions/{sid}/jobs", status_code=202)
    async def submit(sid: str, request: Request, op: str, seq_len: Optional[int] = None, stream: Optional[str] = None):
        try:
            s = state.session(sid)
            if op not in ("run", "prefill", "decode"):
                raise Refused(422, f"op must be run, prefill or decode, got {op!r}")
            pending = sum(j.status in ("queued", "running") or j.result is not None for j in s.jobs.values())
            if pending >= state.max_jobs_per_session:
                raise Refused(429, f"the session has {pending} unfetched jobs (limit {state.max_jobs_per_session})",
                              "too_many_jobs")
        except Refused:
            await drain(request, state.max_request_bytes)  # the client sees the answer, not a reset mid-upload
            raise
        data = await read_body(request, state.max_request_bytes, "the ciphertext")
        try:
            h = read_header(data)
        except SerializationError as e:
            raise Refused(400, str(e), "bad_ciphertext") from None
        if h.role != "embeddings":
            raise Refused(422, f"the server takes encrypted embeddings, this tensor holds {h.role}")
        if h.key_tag != s.key_tag or h.ring_dim != s.ring_dim:
            raise Refused(409, "the ciphertext was encrypted under another key than this session's "
                               f"(tag {h.key_tag[:12]}..., session key {s.key_tag[:12]}...)", "other_key")
        max_len = int(state.meta["max_length"])
        if op == "run":
            if seq_len is None or not 1 <= seq_len <= max_len:
                raise Refused(422, f"op=run needs seq_len in 1..{max_len}, got {seq_len}")
            if h.rows != seq_len:
                raise Refused(422, f"the ciphertext packs {h.rows} rows, seq_len says {seq_len}")
        else:
            if stream not in s.streams:
                raise Refused(404, "unknown stream; start one with POST /v1/sessions/<id>/streams", "unknown_stream")
            if op == "decode" and h.rows != 1:
                raise Refused(422, f"op=decode takes one token's embedding (1 row), got {h.rows}")
            if op == "prefill" and not 1 <= h.rows <= max_len:
                raise Refused(422, f"a prompt of {h.rows} tokens: this export accepts 1..{max_len}")
        want = state.expected_layout(s, op, h.rows)
        if not same_packing(h.layout, want):
            raise Refused(422, f"the input is packed as {h.layout.to_dict()}; this server's plan packs it as "
                               f"{want.to_dict()}")
        await asyncio.to_thread(state.check_payload, s, data, h)
        jid = uuid.uuid4().hex
        job = s.jobs[jid] = Job(op)
        query = {"seq_len": seq_len} if op == "run" else {"stream": stream}
        state.scheduler.submit(s, lambda: state.execute(s, job, data, query))
        return {"job_id": jid, "status": job.status}

    @app.get("/v1/sessions/{sid}/jobs/{jid}")
    async def fetch(sid: str, jid: str):
        s = state.session(sid)
        job = s.jobs.get(jid)
        if job is None:
            raise Refused(404, "unknown or already fetched job", "unknown_job")
        if job.status in ("queued", "running"):
            return JSONResponse({"job_id": jid, "status": job.status}, status_code=202)
        s.jobs.pop(jid, None)
        if job.status == "failed":
            raise Refused(*job.error)
        return Response(job.result, media_type="application/octet-stream",
                        headers={"X-HE-Timings": json.dumps({k: round(v, 4) for k, v in job.timings.items()})})

    return app


def serve(export_dir, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **limits) -> None:
    """Run the server (blocking) with uvicorn. SIGTERM / Ctrl-C stop the workers and remove the uploads (and the
    state directory when it is temporary)."""
    import uvicorn

    app = create_app(export_dir, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
