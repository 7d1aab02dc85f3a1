"""Issue #18: serving that one hostile request cannot take down.

Every attack of the issue is replayed against ``hf-polyhe serve`` (a subprocess, toy keys, loopback): crash inputs
for OpenFHE's parsers (zeroed ring dimensions in context / key files, zeroed bytes in a ciphertext's OpenFHE
header with the container's checksums and sizes recomputed so that our own checks pass), edited plans, zip
bombs, out-of-memory loads, header type errors, endless jobs, unbounded streams, restarts, missing tokens and ids
in the access log. Each must get a 4xx naming what is wrong (5xx only for real server faults, never with a
server path), the server must stay up and the other sessions must keep working. A soak test and 20 register /
DELETE cycles bound the memory of the server's process tree; a malicious *server* must not crash the client.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_pipelines import make_model, word_tokenizer  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.he import Client, Export, PlainServer  # noqa: E402
from hf_polyhe.he.errors import SerializationError, ToyParametersWarning  # noqa: E402
from hf_polyhe.he.runtime.ciphertext import MAGIC, read_header  # noqa: E402
from hf_polyhe.serve import RemoteServer, ServerError  # noqa: E402

TOKEN = "s3cret-test-token"
N = 4096  # the toy ring
RING = struct.pack("<II", 2 * N, N)  # cyclotomic order and ring dimension, as OpenFHE writes them
LEAKS = ("/root/", "openfhe-development", "/tmp/", "/work/", "site-packages", "Traceback")
SEEN: dict = {"details": [], "ids": set()}  # every error detail and every id handed out, checked at the end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An ``hf-polyhe serve`` subprocess; ``start()`` again after ``stop()`` restarts it on the same port."""

    def __init__(self, export, log, args=(), env=None):
        self.export, self.log, self.args, self.port = str(export), str(log), list(args), _free_port()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_POLYHE_NO_TORCH": "1",
                    **(env or {})}
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "hf_polyhe.cli", "serve", self.export, "--port",
                                          str(self.port), *self.args], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError("server did not start:\n" + open(self.log).read()[-3000:])
                time.sleep(0.3)

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None and RemoteServer(self.url).health()["status"] == "ok"

    def children(self) -> list:
        """Pids of the server's worker processes."""
        out = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            out.append(int(pid))
                except (OSError, ValueError, IndexError):
                    pass
        return out

    def worker_of(self, sid) -> int:
        """The worker process of session ``sid`` (its stderr is the session's worker.log)."""
        for pid in self.children():
            try:
                if sid in os.readlink(f"/proc/{pid}/fd/2"):
                    return pid
            except OSError:
                pass
        raise LookupError(f"no worker for session {sid[:6]}")

    def tree_rss_mb(self) -> float:
        def rss(pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
            except (OSError, StopIteration):
                return 0.0
        return rss(self.proc.pid) + sum(rss(p) for p in self.children())


def _toy(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        return fn(*a, **k)


def refused(fn, *args, **kwargs) -> ServerError:
    """The ServerError ``fn`` raises (recorded for the leak check)."""
    with pytest.raises(ServerError) as e:
        fn(*args, **kwargs)
    SEEN["details"].append(e.value.detail)
    return e.value


def bundle_files(client, directory) -> dict:
    path = client.write_bundle(directory)
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def zipped(files: dict, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def edited(files: dict, name: str, edit) -> dict:
    """``files`` with ``edit(bytearray)`` applied to ``name`` (in place, or returning the new bytes)."""
    data = bytearray(files[name])
    return {**files, name: bytes(edit(data) or data)}


def zero_at(pattern: bytes, n: int = 8, start: int = 0):
    def edit(b: bytearray):
        i = b.find(pattern, start)
        assert i >= 0
        b[i : i + n] = bytes(n)
    return edit


def rewrap(data: bytes, edit_payload=None, edit_header=None) -> bytes:
    """An encrypted tensor with its OpenFHE payloads / JSON header edited and sizes + SHA-256 recomputed, so
    that the container checks pass and only OpenFHE's bytes are wrong."""
    (hlen,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + hlen])
    h = read_header(data)
    payloads = [bytearray(data[s : s + n]) for s, n in h.offsets]
    if edit_payload is not None:
        edit_payload(payloads[0])
    header["sizes"] = [len(p) for p in payloads]
    header["sha256"] = [hashlib.sha256(p).hexdigest() for p in payloads]
    if edit_header is not None:
        edit_header(header)
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + raw + b"".join(bytes(p) for p in payloads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    hf_polyhe.save_encrypted_pipeline(make_model("gpt"), word_tokenizer(), root / "export", max_length=4)
    model = Export(root / "export")
    clients = {name: _toy(Client.keygen, model, "toy") for name in ("alice", "bob", "mallory")}
    server = Served(root / "export", root / "server.log",
                    ["--allow-toy", "--auth-token", TOKEN, "--state-dir", str(root / "state"), "--max-sessions", "4",
                     "--max-streams", "3", "--job-timeout", "120", "--max-request-mb", "8", "--log-level", "info"])
    server.start()
    remotes = {n: RemoteServer(server.url, c, token=TOKEN) for n, c in clients.items()}
    x = clients["alice"].encrypt(model.embed([3, 4]))
    w = dict(root=root, model=model, clients=clients, server=server, remotes=remotes, x=x,
             plain=PlainServer(model).run(model.embed([3, 4])).reshape(-1),
             bundle=bundle_files(clients["mallory"], root / "mallory_bundle"))
    yield w
    server.stop()


def run_ok(w, who: str, rows=(3, 4)):
    """A legitimate job of ``who`` gives the plaintext result."""
    client, remote, model = w["clients"][who], w["remotes"][who], w["model"]
    logits = client.decrypt(remote.run(client.encrypt(model.embed(list(rows)))))
    ref = PlainServer(model).run(model.embed(list(rows))).reshape(-1)
    assert np.abs(logits - ref).max() < 1e-6
    SEEN["ids"].add(remote.session_id)


def test_token_required_and_health_public(world):
    url = world["server"].url
    for anonymous in (RemoteServer(url, token=""), RemoteServer(url, token="wrong")):
        assert anonymous.health()["status"] == "ok"
        assert refused(anonymous.request, "GET", "/info").status == 401
        assert refused(anonymous.request, "POST", "/sessions", b"PK").status == 401
        assert refused(anonymous.request, "GET", "/sessions/abc/jobs/def").status == 401
    e = refused(RemoteServer(url, world["clients"]["alice"], token="").register)  # 401 before any upload
    assert e.status == 401 and "token" in e.detail
    from transformers import pipeline

    pipe = pipeline("encrypted-text-generation", model=str(world["root"] / "export"), server_url=url,
                    server_token=TOKEN, client=world["clients"]["alice"], verbose=False)
    assert pipe.server.token == TOKEN  # the pipeline hands its token to RemoteServer
    world["remotes"]["alice"].register()
    world["remotes"]["bob"].register()
    run_ok(world, "bob")


@pytest.mark.parametrize("attack, status, says", [
    # SIGFPE in OpenFHE's context parser: caught before any parser, the bytes differ from the server's context
    ("context_ring_zeroed", 422, "context.bin is not the crypto context"),
    # the same in a key file: the worker that parses it dies, the server answers
    ("mult_keys_ring_zeroed", 400, "crashed while loading eval_mult_keys.bin"),
    ("rotation_keys_ring_zeroed", 400, "crashed while loading eval_automorphism_keys.bin"),
    # a vector that claims 2^34 coefficients: out of memory inside the worker's limit, with the reason
    ("mult_keys_huge_vector", 413, "needs more memory than this server allows"),
    # key files of zeros (accepted with 201 before)
    ("rotation_keys_all_zeros", 409, "rotation keys do not cover"),
    ("mult_keys_all_zeros", 409, "relinearisation key file"),
    # the client's plan is never trusted
    ("plan_groups_edited", 409, "planned differently"),
    ("plan_bootstrap_requested", 409, "does not bootstrap"),
    ("plan_rotations_removed", 409, "lacks rotation keys"),
    ("plan_digest_edited", 409, "another export"),
    ("key_tag_edited", 409, "key tag"),
    # zip bomb: 64 MiB of zeros in 64 kB
    ("zip_bomb", 413, "decompresses to over"),
    ("duplicate_members", 400, "once each"),
    ("not_a_zip", 400, "not a bundle zip"),
])
def test_hostile_bundle(world, attack, status, says):
    files = world["bundle"]
    compression = zipfile.ZIP_STORED
    tag = json.loads(files["bundle.json"])["key_tag"]

    def plan_edit(fn):
        def edit(b):
            doc = json.loads(bytes(b))
            fn(doc["plan"])
            return json.dumps(doc).encode()
        return edit

    if attack == "context_ring_zeroed":
        files = edited(files, "context.bin", zero_at(RING))
    elif attack == "mult_keys_ring_zeroed":
        files = edited(files, "eval_mult_keys.bin", zero_at(RING))
    elif attack == "rotation_keys_ring_zeroed":
        files = edited(files, "eval_automorphism_keys.bin", zero_at(RING))
    elif attack == "mult_keys_huge_vector":
        def huge(b):
            i = b.find(struct.pack("<Q", N), 1300)  # the first coefficient vector's length
            b[i : i + 8] = struct.pack("<Q", 1 << 34)
        files = edited(files, "eval_mult_keys.bin", huge)
    elif attack.endswith("all_zeros"):
        name = "eval_automorphism_keys.bin" if attack.startswith("rotation") else "eval_mult_keys.bin"
        files = {**files, name: bytes(len(files[name]))}
    elif attack == "plan_groups_edited":
        files = edited(files, "bundle.json", plan_edit(lambda p: p.update(groups=p["groups"] * 2)))
    elif attack == "plan_bootstrap_requested":
        files = edited(files, "bundle.json", plan_edit(lambda p: p["params"].update(bootstrap=True)))
    elif attack == "plan_rotations_removed":
        files = edited(files, "bundle.json", plan_edit(lambda p: p.update(rotation_keys=p["rotation_keys"][:3])))
    elif attack == "plan_digest_edited":
        files = edited(files, "bundle.json", plan_edit(lambda p: p.update(digest="0" * 64)))
    elif attack == "key_tag_edited":
        files = edited(files, "bundle.json", lambda b: bytes(b).replace(tag.encode(), b"f" * len(tag)))
    elif attack == "zip_bomb":
        files, compression = {**files, "eval_automorphism_keys.bin": bytes(64 << 20)}, zipfile.ZIP_DEFLATED
    body = zipped(files, compression)
    if attack == "duplicate_members":
        buf = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
            warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
            for name in ("bundle.json", "bundle.json", "context.bin", "eval_mult_keys.bin"):
                z.writestr(name, files[name])
        body = buf.getvalue()
    elif attack == "not_a_zip":
        body = b"PK\x03\x04 not really a zip" * 10
    e = refused(world["remotes"]["mallory"].request, "POST", "/sessions", body)
    assert e.status == status and says in e.detail, (e.status, e.detail)
    server = world["server"]
    assert server.alive()
    assert RemoteServer(server.url).health()["sessions"] == 2  # alice and bob only: nothing half-registered
    state = world["root"] / "state"
    assert os.listdir(state / "incoming") == []  # failed extractions leave nothing
    assert sorted(os.listdir(state / "sessions")) == sorted(world["remotes"][n].session_id for n in ("alice", "bob"))
    assert len(server.children()) == 2  # no stray worker: only alice's and bob's


def test_other_session_unaffected_by_hostile_bundles(world):
    run_ok(world, "bob")
    run_ok(world, "alice")


def test_hostile_ciphertexts(world):
    ra, x = world["remotes"]["alice"], world["x"]
    ring_zeroed = rewrap(x, zero_at(RING))  # crashed OpenFHE's ciphertext parser (SIGFPE)
    e = refused(ra.submit, ring_zeroed, op="run", seq_len=2)
    assert e.status == 400 and "differs from what this session's crypto context writes" in e.detail
    # the 1-in-12: 8 zeroed bytes anywhere in the OpenFHE header; every change of a nonzero byte is refused
    rng = np.random.default_rng(0)
    payload = bytes(x[read_header(x).offsets[0][0]:])
    for start in rng.choice([i for i in range(0, 1300, 8) if any(payload[i : i + 8])], 12, replace=False):
        def edit(b, start=int(start)):
            b[start : start + 8] = bytes(8)
        assert refused(ra.submit, rewrap(x, edit), op="run", seq_len=2).status == 400

    def above_modulus(b):  # a coefficient of the first tower set to 2^64 - 1
        start = b.find(struct.pack("<Q", N), 1285) + 8
        b[start : start + 8] = b"\xff" * 8
    e = refused(ra.submit, rewrap(x, above_modulus), op="run", seq_len=2)
    assert e.status == 400 and "above the modulus" in e.detail
    # header type errors are 400, not 500
    for bad in ({"ring_dim": "4096"}, {"ring_dim": 3}, {"sizes": ["1"]}, {"key_tag": 7},
                {"layout": {"kind": "matrix", "rows": "2", "cols": 8, "block": 8, "slots": 64}}, {"layout": [1]},
                {"role": None}, {"sha256": "x"}):
        e = refused(ra.submit, rewrap(x, edit_header=lambda h, bad=bad: h.update(bad)), op="run", seq_len=2)
        assert e.status == 400, (bad, e.status, e.detail)
    e = refused(ra.submit, rewrap(x, edit_header=lambda h: h["layout"].update(groups=16)), op="run", seq_len=2)
    assert e.status in (400, 422)
    e = refused(world["remotes"]["bob"].submit, x, op="run", seq_len=2)  # alice's ciphertext in bob's session
    assert e.status == 409
    assert world["server"].alive()
    run_ok(world, "alice")
    run_ok(world, "bob")


def test_worker_crash_during_a_job_is_contained(world):
    """A worker that dies mid-evaluation (here: SIGFPE sent to it) fails that job with a 500 without a path; the
    session's next job gets a new worker with its keys reloaded; the other session never notices."""
    server, ra, x = world["server"], world["remotes"]["alice"], world["x"]
    job = ra.submit(x, op="run", seq_len=2)
    deadline = time.time() + 60
    while json.loads(ra.request("GET", f"/sessions/{ra.session_id}/jobs/{job}")[2])["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(server.worker_of(ra.session_id), signal.SIGFPE)
    e = refused(ra.result, job)
    assert e.status == 500 and "SIGFPE" in e.detail and "restarted" in e.detail
    assert server.alive()
    run_ok(world, "bob")
    run_ok(world, "alice")


def test_streams_are_bounded(world):
    ra = world["remotes"]["alice"]
    streams = [ra.open_stream() for _ in range(3)]
    e = refused(ra.open_stream)
    assert e.status == 429 and "limit 3" in e.detail
    for st in streams:
        ra.close_stream(st)
    SEEN["ids"].update(streams)
    ra.close_stream(ra.open_stream())


def test_a_malicious_server_cannot_crash_the_client(world):
    """The client's decrypt of server bytes: a zeroed ring dimension is refused before any parser; a zeroed
    modulus (OpenFHE parses it, then divides by zero while decrypting) kills only the client's sandbox process."""
    alice, ra = world["clients"]["alice"], world["remotes"]["alice"]
    out = ra.run(world["x"])

    def zero_modulus(b):
        i = b.find(struct.pack("<Q", N), 1285)
        b[i + 8 + 8 * N : i + 16 + 8 * N] = bytes(8)

    with pytest.raises(SerializationError, match="refused before parsing"):
        alice.decrypt(rewrap(out, zero_at(RING)))
    with pytest.raises(SerializationError, match="crashed OpenFHE"):
        alice.decrypt(rewrap(out, zero_modulus))
    with pytest.raises(SerializationError):
        alice.decrypt(rewrap(out, edit_header=lambda h: h.update(ring_dim="x")))
    t0 = time.perf_counter()
    logits = alice.decrypt(out)  # the sandbox restarted: the genuine result still decrypts
    assert np.abs(logits - world["plain"]).max() < 1e-6
    print(f"decrypt after a sandbox restart: {time.perf_counter() - t0:.3f} s")


def test_restart_keeps_sessions_and_streams(world):
    server, model = world["server"], world["model"]
    alice, ra, rb = world["clients"]["alice"], world["remotes"]["alice"], world["remotes"]["bob"]
    st = ra.open_stream()
    SEEN["ids"].add(st)
    ra.prefill(st, alice.encrypt(model.embed([3, 4])))
    sids = (ra.session_id, rb.session_id)
    server.stop()  # SIGTERM: uvicorn shuts the application down, then exits by that signal
    assert open(server.log).read().rstrip().splitlines()[-1].endswith(f"Finished server process [{server.proc.pid}]")
    time.sleep(1.5)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == server.proc.pid]  # workers gone
    incoming = world["root"] / "state" / "incoming"
    assert not incoming.exists() or os.listdir(incoming) == []
    server.start()
    assert RemoteServer(server.url).health()["sessions"] == 2
    logits = alice.decrypt(ra.decode(st, alice.encrypt(model.embed([3, 4, 5])[-1:], decode=True)))
    plain = PlainServer(model)
    ps = plain.open_stream()
    plain.prefill(ps, model.embed([3, 4]))
    assert np.abs(logits - plain.decode(ps, model.embed([3, 4, 5])[-1:]).reshape(-1)).max() < 1e-6
    ra.close_stream(st)
    run_ok(world, "bob")
    assert (ra.session_id, rb.session_id) == sids  # no re-registration was needed


def test_state_dir_is_exclusive(world, tmp_path):
    second = Served(world["root"] / "export", tmp_path / "second.log", ["--allow-toy", "--state-dir",
                                                                        str(world["root"] / "state")])
    with pytest.raises(RuntimeError, match="did not start"):
        second.start()
    assert second.proc.returncode == 2 and "another hf-polyhe serve uses the state directory" in open(second.log).read()
    assert world["server"].alive()


@pytest.mark.parametrize("edit, says", [
    ("server_outside", "points outside the export"),
    ("spec_dev_zero", "not a regular file"),
])
def test_export_paths_and_reads_are_confined(world, tmp_path, edit, says):
    """pipeline.json's "server" may not point outside the export; spec.json linked to /dev/zero is refused."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(world["root"] / "export", export)
    if edit == "server_outside":
        meta = json.loads((export / "pipeline.json").read_text())
        meta["server"] = str(world["root"] / "state")
        (export / "pipeline.json").write_text(json.dumps(meta))
    else:
        (export / "server" / "spec.json").unlink()
        (export / "server" / "spec.json").symlink_to("/dev/zero")
    r = subprocess.run([sys.executable, "-m", "hf_polyhe.cli", "serve", str(export), "--port", str(_free_port())],
                       env={**os.environ, "HF_POLYHE_NO_TORCH": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-1000:]


def test_lost_session_is_registered_again(world):
    ra = world["remotes"]["alice"]
    old = ra.session_id
    ra.request("DELETE", f"/sessions/{old}")  # the server forgets it (as after an expiry)
    run_ok(world, "alice")  # RemoteServer registers the keys again and retries
    assert ra.session_id != old


def _ppid(pid) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_register_delete_cycles_free_memory(world):
    """20 register / DELETE cycles: the keys live in the session's worker, which DELETE ends."""
    server = world["server"]
    remote = RemoteServer(server.url, bundle_dir=world["clients"]["mallory"].write_bundle(world["root"] / "mb"),
                          token=TOKEN)
    rss = []
    for _ in range(20):
        remote.register()
        SEEN["ids"].add(remote.session_id)
        remote.close()
        rss.append(server.tree_rss_mb())
    print(f"server tree RSS after register/DELETE cycles 1, 10, 20: {rss[0]:.0f} / {rss[9]:.0f} / {rss[-1]:.0f} MB")
    assert rss[-1] <= 1.10 * rss[0]
    assert len(server.children()) == 2  # alice's and bob's workers only


def _soak(world, rounds: int):
    server, model = world["server"], world["model"]
    names = ["alice", "bob", "dave", "erin"]
    for n in ("dave", "erin"):
        world["clients"].setdefault(n, _toy(Client.keygen, model, "toy"))
        world["remotes"].setdefault(n, RemoteServer(server.url, world["clients"][n], token=TOKEN))
    errors, rss = [], []

    def round_of(requests: int):
        def client(name):
            try:
                for _ in range(requests):
                    run_ok(world, name)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name}: {e!r}")

        threads = [threading.Thread(target=client, args=(name,)) for name in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    round_of(1)  # warm-up: every session has its worker, evaluator and plaintext caches
    rss.append(server.tree_rss_mb())
    t0 = time.perf_counter()
    round_of(rounds)
    rss.append(server.tree_rss_mb())
    assert not errors, errors
    print(f"soak: 4 clients x {rounds} requests in {time.perf_counter() - t0:.1f} s; server tree RSS "
          f"{rss[0]:.0f} MB after warm-up, {rss[1]:.0f} MB after")
    assert rss[1] <= 1.15 * rss[0] + 50
    for n in ("dave", "erin"):
        world["remotes"][n].close()


def test_soak_short(world):
    _soak(world, 3)


@pytest.mark.slow
def test_soak_long(world):
    _soak(world, 20)


def test_time_limit_toy_refusal_and_cleanup(world, tmp_path):
    """A job past --job-timeout is stopped with a 503; a server without --allow-toy refuses toy keys (403); SIGTERM
    leaves no temporary folder and no worker behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale = tmp / "hf_polyhe_serve_999999_old"  # left by a server that was killed: cleaned at start-up
    stale.mkdir()
    (stale / "server.pid").write_text("999999")
    quick = Served(world["root"] / "export", tmp_path / "quick.log", ["--allow-toy", "--job-timeout", "0.3"],
                   env={"TMPDIR": str(tmp)}).start()
    try:
        assert not stale.exists()
        alice = world["clients"]["alice"]
        r = RemoteServer(quick.url, alice, token="")
        e = refused(r.run, world["x"])
        assert e.status == 503 and "limit of 0.3 s" in e.detail
        assert quick.alive()
        workers = quick.children()
    finally:
        quick.stop()
    assert os.listdir(tmp) == []  # the state directory, uploads and session folders are gone
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")]
    strict = Served(world["root"] / "export", tmp_path / "strict.log", env={"TMPDIR": str(tmp)}).start()
    try:
        e = refused(RemoteServer(strict.url, alice, token="").register)
        assert e.status == 403 and "toy" in e.detail
    finally:
        strict.stop()


def test_no_paths_in_answers_no_ids_in_the_log(world):
    assert SEEN["details"]
    for detail in SEEN["details"]:
        assert not any(leak in detail for leak in LEAKS), detail
    log = open(world["server"].log).read()
    assert "POST /v1/sessions/<id>/jobs" in log  # the access log is on, with ids redacted
    for i in SEEN["ids"]:
        assert i and i not in log


def test_public_messages_and_redacted_paths():
    from hf_polyhe.he.runtime.sandbox import public_message
    from hf_polyhe.serve.app import redact_path

    openfhe = ("/root/openfhe-python-packager/build/openfhe-development/src/core/include/math/hal/intnat/ubintnat.h"
               ":l.741:ComputeMu(): NativeIntegerT ComputeMu: Divide by zero")
    assert public_message(openfhe) == "<path>:l.741:ComputeMu(): NativeIntegerT ComputeMu: Divide by zero"
    assert public_message("cannot read '/srv/state/sessions/ab/context.bin'") == "cannot read '<path>'"
    assert public_message("start one with POST /v1/sessions/<id>/streams") == "start one with POST /v1/sessions/<id>/streams"
    assert redact_path("/v1/sessions/0123abcd/jobs/ffee?op=decode&stream=9988") == \
        "/v1/sessions/<id>/jobs/<id>?op=decode&stream=<id>"


def test_sessions_take_turns_on_the_lane():
    """A session with many queued jobs does not hold back another's (issue #18: one session's work kept the
    single CKKS worker for 17 minutes while another's job waited)."""
    from hf_polyhe.serve.app import Scheduler, Session

    lane, order, gate = Scheduler(1), [], threading.Event()
    a, b = Session("a", "", "", 0, "toy"), Session("b", "", "", 0, "toy")
    lane.submit(a, gate.wait)  # occupies the lane while the rest is queued
    for i in range(3):
        lane.submit(a, lambda i=i: order.append(f"a{i}"))
    lane.submit(b, lambda: order.append("b0"))
    gate.set()
    deadline = time.time() + 10
    while len(order) < 4 and time.time() < deadline:
        time.sleep(0.01)
    lane.stop()
    assert order == ["b0", "a0", "a1", "a2"]
