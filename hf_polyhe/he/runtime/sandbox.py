"""Child processes that parse and evaluate bytes from someone else, so that a crash cannot spread.

OpenFHE's parsers can crash the process that runs them (a zeroed ring dimension raises SIGFPE), and no check
in Python sees every way to do that. So untrusted bytes are parsed in a child process: :class:`ChildProcess`
starts ``python -m MODULE``, talks to it over its stdin/stdout with length-prefixed frames, and reports a crash
(:class:`ChildCrashed`, with the signal and the last stage the child announced), a time limit
(:class:`ChildTimedOut`: the child is killed) or an error the child raised (:class:`ChildError`). The child
(:func:`child_main`) caps its own address space (``RLIMIT_AS``), exits when its parent is gone, and keeps its
stdout for the protocol only (native code that prints goes to stderr).

Used by ``hf-polyhe serve`` (one worker process per session, :mod:`hf_polyhe.serve.worker`) and by the client:
:class:`Decryptor` parses and decrypts a server's result in a sandbox process (this module's own ``__main__``,
started once per client process and restarted when a ciphertext kills it), so
:meth:`~hf_polyhe.he.Client.decrypt` never hands a server's bytes to OpenFHE in the client's own process.

Frame: ``b"HFPS" | u32 JSON header length | u64 payload length | JSON header | payload``. A reply header has
``kind``: ``"stage"`` (progress, no payload), ``"result"`` or ``"error"`` (``type``, ``message``).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from ..errors import SerializationError

_FRAME = struct.Struct("<4sIQ")
_MAGIC = b"HFPS"
MAX_HEADER_BYTES = 1 << 20


class ChildFailed(Exception):
    """A child process did not answer a call. ``stage``: the last stage it announced (None: none)."""

    def __init__(self, message: str, stage: Optional[str] = None):
        super().__init__(message)
        self.stage = stage


class ChildCrashed(ChildFailed):
    """The child died (``returncode``: negative signal number or exit status)."""

    def __init__(self, returncode, stage=None):
        self.returncode = returncode
        super().__init__(f"the process {describe_exit(returncode)}", stage)


class ChildTimedOut(ChildFailed):
    """The call ran past its time limit; the child was killed."""

    def __init__(self, seconds: float, stage=None):
        self.seconds = seconds
        super().__init__(f"the process ran past its limit of {seconds:g} s and was stopped", stage)


class ChildError(ChildFailed):
    """The child raised ``type``: ``message`` (it is still running)."""

    def __init__(self, type_name: str, message: str, stage=None):
        self.type_name, self.message = type_name, message
        super().__init__(f"{type_name}: {message}", stage)


def describe_exit(returncode) -> str:
    """``"was killed by SIGFPE"`` / ``"exited with status 3"``."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


_PATH = re.compile(r"(?<![\w/.])(?!/v1/)(?:/[\w.+@-]+){2,}/?(?::\d+)?")  # HTTP API paths (/v1/...) stay


def public_message(text: str, limit: int = 600) -> str:
    """``text`` without file system paths (OpenFHE's errors name its build tree, ours name files on the server):
    fit to return to a remote party."""
    text = _PATH.sub("<path>", str(text))
    text = re.sub(r"<path>(?:[\s:,]*<path>)+", "<path>", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- frames -------------------------------------------------------------------------------------------------

def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_frame(fd: int, header: dict, payload=b"") -> None:
    head = json.dumps(header).encode()
    _write_all(fd, _FRAME.pack(_MAGIC, len(head), len(payload)) + head)
    if len(payload):
        _write_all(fd, payload)


def _read_exact(fd: int, n: int, deadline: Optional[float]) -> Optional[bytes]:
    """``n`` bytes from ``fd``; None at end of file; TimeoutError past ``deadline`` (monotonic)."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 22))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: Optional[float] = None, max_payload: int = 1 << 40):
    """``(header, payload)``, or None at end of file."""
    head = _read_exact(fd, _FRAME.size, deadline)
    if head is None:
        return None
    magic, hlen, plen = _FRAME.unpack(head)
    if magic != _MAGIC or hlen > MAX_HEADER_BYTES or plen > max_payload:
        raise OSError("protocol error: not a frame")
    header = _read_exact(fd, hlen, deadline)
    payload = _read_exact(fd, plen, deadline) if plen else b""
    if header is None or payload is None:
        return None
    return json.loads(header), payload


# -- the parent's side ----------------------------------------------------------------------------------------

def package_root() -> str:
    """The directory that holds the ``hf_polyhe`` package (put on the child's ``PYTHONPATH``)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class ChildProcess:
    """``python -m module *args`` as a sandbox: one call at a time, each with an optional time limit.

    ``memory_bytes``: the child's address-space limit (``RLIMIT_AS``; None: unlimited); ``stderr``: where the
    child's stderr goes (a path, or None: inherited)."""

    def __init__(self, module: str, args=(), memory_bytes: Optional[int] = None, env: Optional[dict] = None,
                 stderr: Optional[str] = None):
        self.module, self.args, self.memory_bytes = module, [str(a) for a in args], memory_bytes
        self.env, self.stderr = env, stderr
        self.proc: Optional[subprocess.Popen] = None
        self.lock = threading.RLock()
        self.calls = 0

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "ChildProcess":
        with self.lock:
            if self.alive:
                return self
            env = {**os.environ, **(self.env or {})}
            env["HF_POLYHE_NO_TORCH"] = "1"  # numpy + openfhe only: the child starts in well under a second
            env["HF_POLYHE_PARENT_PID"] = str(os.getpid())
            env["HF_POLYHE_CHILD_MEMORY"] = str(int(self.memory_bytes or 0))
            root = package_root()
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            err = open(self.stderr, "ab") if self.stderr else None
            try:
                self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=err, env=env, close_fds=True,
                                             start_new_session=True)
            finally:
                if err is not None:
                    err.close()
            return self

    def call(self, header: dict, payload=b"", timeout: Optional[float] = None,
             on_stage: Optional[Callable[[str], None]] = None):
        """Send one request, wait for its reply: ``(header, payload)``. Raises :class:`ChildCrashed`,
        :class:`ChildTimedOut` (the child is killed) or :class:`ChildError`."""
        with self.lock:
            self.start()
            proc, stage = self.proc, None
            deadline = None if timeout is None else time.monotonic() + timeout
            self.calls += 1
            try:
                write_frame(proc.stdin.fileno(), header, payload)
            except (BrokenPipeError, OSError):
                raise ChildCrashed(self._reap(), stage) from None
            while True:
                try:
                    frame = read_frame(proc.stdout.fileno(), deadline)
                except TimeoutError:
                    self.kill()
                    raise ChildTimedOut(timeout, stage) from None
                except (OSError, ValueError):
                    self.kill()
                    raise ChildCrashed(self._reap(), stage) from None
                if frame is None:
                    raise ChildCrashed(self._reap(), stage)
                head, body = frame
                kind = head.pop("kind", None)
                if kind == "stage":
                    stage = head.get("stage")
                    if on_stage is not None:
                        on_stage(stage)
                    continue
                if kind == "error":
                    raise ChildError(str(head.get("type")), str(head.get("message")), stage)
                return head, body

    def _reap(self, wait: float = 10.0):
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the child (by its pid) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process always goes
                pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def stop(self, grace: float = 2.0) -> None:
        """Ask the child to exit, kill it after ``grace`` seconds."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None and self.lock.acquire(timeout=0.1):  # a busy child is simply killed
            try:
                write_frame(proc.stdin.fileno(), {"op": "exit"})
                proc.wait(grace)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                self.lock.release()
        self.kill()

    def rss_bytes(self) -> int:
        """Resident memory of the child (0 when it is not running)."""
        return process_rss(self.pid) if self.alive else 0


def process_rss(pid) -> int:
    """Resident set size of process ``pid`` in bytes (Linux ``/proc``; 0 if unknown)."""
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# -- the child's side -----------------------------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # the parent is gone (we were re-parented): nobody will read our results
            os._exit(3)


def child_main(handler: Callable) -> None:
    """Serve requests until told to exit: ``handler(header, payload, stage) -> (header, payload)``, where
    ``stage(name)`` announces progress. An exception becomes an error reply (the child keeps running); the child
    exits at end of input, on ``{"op": "exit"}``, or when its parent dies."""
    out = os.dup(1)
    os.dup2(2, 1)  # native code that prints must not corrupt the protocol
    sys.stdout = sys.stderr
    limit = int(os.environ.get("HF_POLYHE_CHILD_MEMORY") or 0)
    if limit > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    parent = os.getppid()
    if os.environ.get("HF_POLYHE_PARENT_PID") not in (None, "", str(parent)):
        os._exit(3)  # the parent that started us is already gone
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

    def stage(name: str) -> None:
        write_frame(out, {"kind": "stage", "stage": name})

    while True:
        frame = read_frame(0)
        if frame is None:
            os._exit(0)
        header, payload = frame
        if header.get("op") == "exit":
            os._exit(0)  # no destructors: freeing gigabytes of keys one object at a time takes seconds
        try:
            reply, body = handler(header, payload, stage)
            del payload
            write_frame(out, {"kind": "result", **reply}, body)
        except MemoryError as e:
            write_frame(out, {"kind": "error", "type": "MemoryError",
                              "message": public_message(str(e) or "out of memory")})
        except Exception as e:  # noqa: BLE001 - every error goes back to the parent
            message = str(e)
            if "bad_alloc" in message or "_M_default_append" in message or "length_error" in message:
                write_frame(out, {"kind": "error", "type": "MemoryError", "message": public_message(message)})
            else:
                write_frame(out, {"kind": "error", "type": type(e).__name__, "message": public_message(message)})


# -- the client's decryption sandbox ---------------------------------------------------------------------------

PARSER_MEMORY_BYTES = int(float(os.environ.get("HF_POLYHE_PARSER_MEMORY_MB", "4096")) * 2**20)


def sandbox_enabled() -> bool:
    """Whether a client parses and decrypts a server's ciphertexts in a sandbox process
    (``HF_POLYHE_PARSE_SANDBOX=0`` turns it off)."""
    return os.environ.get("HF_POLYHE_PARSE_SANDBOX", "1") not in ("0", "false", "no")


class Decryptor:
    """The client's sandbox: a child process (this module's ``__main__``) that parses a server's ciphertexts and
    decrypts them. OpenFHE parses a ciphertext with a zeroed modulus without complaint and then divides by zero
    while decrypting it, so parsing alone is no test: the child does both and returns the slot values. It holds
    the client's crypto context and secret key (sent once per key over its private pipe; it is this client's own
    process), is started on first use and restarted after a crash."""

    def __init__(self, memory_bytes: int = PARSER_MEMORY_BYTES):
        self.child = ChildProcess("hf_polyhe.he.runtime.sandbox", memory_bytes=memory_bytes)
        self.loaded: set = set()  # key tags the running child holds
        self.lock = threading.Lock()

    def decrypt(self, key_tag: str, keys: Callable[[], tuple], payloads, slots: int, timeout: float = 600.0) -> list:
        """Slot vectors (float64, ``slots`` long) of the ciphertexts ``payloads`` under ``key_tag``.
        ``keys()`` -> ``(serialised crypto context, serialised secret key)``, called when the child lacks them.
        SerializationError when a ciphertext cannot be parsed or decrypted, or kills the child."""
        import numpy as np

        with self.lock:
            if not self.child.alive:
                self.loaded.clear()
            head = {"op": "decrypt", "key_tag": key_tag, "slots": int(slots), "sizes": [len(p) for p in payloads],
                    "context": 0, "secret_key": 0}
            parts = []
            if key_tag not in self.loaded:
                context, secret = keys()
                head.update(context=len(context), secret_key=len(secret))
                parts += [bytes(context), bytes(secret)]
            parts += [bytes(p) for p in payloads]
            try:
                reply, body = self.child.call(head, b"".join(parts), timeout=timeout)
            except ChildCrashed as e:
                self.loaded.clear()
                raise SerializationError(f"the ciphertext crashed OpenFHE (the sandbox process that parsed and "
                                         f"decrypted it {describe_exit(e.returncode)}): refused") from None
            except ChildTimedOut:
                self.loaded.clear()
                raise SerializationError(f"decrypting the ciphertext took over {timeout:g} s: refused") from None
            except ChildError as e:
                self.loaded.add(key_tag) if head["context"] else None
                raise SerializationError(f"OpenFHE could not parse or decrypt the ciphertext ({e.type_name}: "
                                         f"{e.message})") from None
            self.loaded.add(key_tag)
            values = np.frombuffer(body, dtype="<f8")
            if values.size != len(payloads) * int(slots):
                raise SerializationError("the sandbox returned the wrong number of slot values")
            return [values[i * slots : (i + 1) * slots].copy() for i in range(len(payloads))]

    def close(self) -> None:
        self.child.stop()
        self.loaded.clear()


_DECRYPTOR: Optional[Decryptor] = None
_DECRYPTOR_LOCK = threading.Lock()


def decryptor() -> Decryptor:
    """This process's :class:`Decryptor` (one child for every client of the process, ended at exit)."""
    global _DECRYPTOR
    with _DECRYPTOR_LOCK:
        if _DECRYPTOR is None:
            _DECRYPTOR = Decryptor()
            atexit.register(_DECRYPTOR.close)
        return _DECRYPTOR


_KEYS: dict = {}  # in the child: key tag -> (crypto context, secret key)


def _decrypt_handler(header: dict, payload: bytes, stage):
    import numpy as np
    import openfhe as ofhe

    if header.get("op") != "decrypt":
        raise ValueError(f"unknown op {header.get('op')!r}")
    tag, slots = str(header["key_tag"]), int(header["slots"])
    pos = 0
    if int(header["context"]):
        n, m = int(header["context"]), int(header["secret_key"])
        cc = ofhe.DeserializeCryptoContextString(payload[:n], ofhe.BINARY)
        sk = ofhe.DeserializePrivateKeyString(payload[n : n + m], ofhe.BINARY)
        _KEYS[tag] = (cc, sk)
        pos = n + m
    if tag not in _KEYS:
        raise KeyError(f"no keys for tag {tag[:12]}...")
    cc, sk = _KEYS[tag]
    ring = cc.GetRingDimension()
    out = []
    for size in header["sizes"]:
        stage("parse")
        ct = ofhe.DeserializeCiphertextString(payload[pos : pos + int(size)], ofhe.BINARY)
        pos += int(size)
        if ct.GetKeyTag() != tag:
            raise SerializationError("a ciphertext carries another key tag")
        if ct.GetCryptoContext().GetRingDimension() != ring:
            raise SerializationError("a ciphertext belongs to another crypto context")
        stage("decrypt")
        pt = cc.Decrypt(sk, ct)
        pt.SetLength(slots)
        out.append(np.asarray(pt.GetRealPackedValue(), dtype="<f8"))
    return {"ok": True}, b"".join(v.tobytes() for v in out)


if __name__ == "__main__":
    child_main(_decrypt_handler)
