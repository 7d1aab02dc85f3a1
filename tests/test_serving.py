"""`hf-polyhe serve` on loopback in a subprocess: a pipeline runs against it with server_url=, the secret key
stays in this process; wrong-session, malformed and oversized requests get 4xx and the server keeps serving."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from test_pipelines import make_model, word_tokenizer  # noqa: E402
from transformers import pipeline  # noqa: E402

import hf_polyhe  # noqa: E402
from hf_polyhe.he.errors import ToyParametersWarning  # noqa: E402
from hf_polyhe.he import Client, Export, PlainServer  # noqa: E402
from hf_polyhe.serve import RemoteServer, ServerError, bundle_zip  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = word_tokenizer()
    hf_polyhe.save_encrypted_pipeline(make_model("gpt"), tok, root / "export", max_length=4)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_POLYHE_NO_TORCH": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hf_polyhe.cli", "serve", str(root / "export"), "--port", str(port),
                             "--max-sessions", "3", "--max-request-mb", "8", "--log-level", "warning", "--allow-toy"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=2) as r:
                assert json.load(r)["status"] == "ok"
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("server did not start:\n" + proc.stdout.read().decode(errors="replace"))
            time.sleep(0.5)
    yield url, root
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _declared_upload(url, path, size) -> int:
    """Status of a POST that announces ``size`` bytes (refused on the header, before any upload)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def _toy_client(export_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        model = Export(export_dir)
        return model, Client.keygen(model, "toy")


def test_pipeline_against_server_and_bad_requests(served, tmp_path):
    url, root = served
    export = str(root / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToyParametersWarning)
        pipe = pipeline("encrypted-text-generation", model=export, server_url=url, he_params="toy",
                        key_dir=str(tmp_path / "keys"), verbose=False)
    health = RemoteServer(url).health()
    assert health["task"] == "encrypted-text-generation" and health["sessions"] == 0

    # two other clients, each with its own keys and session
    model, alice = _toy_client(export)
    _, bob = _toy_client(export)
    ra, rb = RemoteServer(url, alice), RemoteServer(url, bob)
    ra.register(), rb.register()
    x = alice.encrypt(model.embed([3, 4]))
    with pytest.raises(ServerError) as e:  # Alice's ciphertext in Bob's session
        rb.submit(x, op="run", seq_len=2)
    assert e.value.status == 409 and "another key" in e.value.detail
    with pytest.raises(ServerError) as e:  # garbage
        ra.submit(b"not a ciphertext at all", op="run", seq_len=2)
    assert e.value.status == 400
    corrupted = bytearray(x)
    corrupted[-10] ^= 0xFF
    with pytest.raises(ServerError) as e:
        ra.submit(bytes(corrupted), op="run", seq_len=2)
    assert e.value.status == 400 and "corrupted" in e.value.detail
    with pytest.raises(ServerError) as e:  # shape does not match what the request says
        ra.submit(x, op="run", seq_len=3)
    assert e.value.status == 422
    assert _declared_upload(url, f"/v1/sessions/{ra.session_id}/jobs?op=run&seq_len=2", 9 << 20) == 413  # > 8 MiB
    with pytest.raises(ServerError) as e:
        ra.request("GET", "/sessions/nope/jobs/nothing")
    assert e.value.status == 404
    with pytest.raises(ServerError) as e:
        ra.request("POST", "/sessions", b"PK not really a zip")
    assert e.value.status == 400
    (tmp_path / "leaky").mkdir()
    alice.save(tmp_path / "leaky")
    with pytest.raises(ValueError, match="secret key"):
        bundle_zip(tmp_path / "leaky")
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(tmp_path / "leaky" / "secret_key.bin", "secret_key.bin")
        z.writestr("bundle.json", "{}")
    with pytest.raises(ServerError) as e:
        ra.request("POST", "/sessions", buf.getvalue())
    assert e.value.status == 403
    rb2 = RemoteServer(url, bob)
    rb2.register()  # third session: the limit
    with pytest.raises(ServerError) as e:
        RemoteServer(url, alice).register()
    assert e.value.status == 429
    rb2.close()
    rb.close()

    # the server kept serving: Alice's job runs, and the pipeline generates with the secret key kept here
    logits = alice.decrypt(ra.result(ra.submit(x, op="run", seq_len=2)))
    assert abs(logits - PlainServer(model).run(model.embed([3, 4])).reshape(-1)).max() < 1e-6
    ra.close()
    (out,) = pipe("the cat", max_new_tokens=2, eos_token_id=-1)
    plain = pipeline("encrypted-text-generation", model=export, backend="plain", verbose=False)
    assert out["he"]["token_ids"] == plain("the cat", max_new_tokens=2, eos_token_id=-1)[0]["he"]["token_ids"]
    assert out["he"]["where"] == url and out["he"]["encrypted"]
    assert RemoteServer(url).health()["status"] == "ok"


def test_remote_pipeline_in_a_new_process_with_cached_keys(served, tmp_path):
    """A later process whose keys come from the key cache (their evaluation keys are only in the bundle on disk)
    registers with the server: it used to fail with "Failed to serialize EvalMultKey"."""
    url, root = served
    export, keys = str(root / "export"), str(tmp_path / "keys")
    code = ("import warnings, json; warnings.simplefilter('ignore')\n"
            "import hf_polyhe; from transformers import pipeline\n"
            f"pipe = pipeline('encrypted-text-generation', model={export!r}, server_url={url!r}, he_params='toy', "
            f"key_dir={keys!r}, verbose=False)\n"
            "out = pipe('the cat', max_new_tokens=1, eos_token_id=-1)[0]['he']\n"
            "pipe.server.close()\n"
            "print(json.dumps({'tag': pipe.client.key_tag, 'ids': out['token_ids']}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]  # the first makes and caches the keys, the second reads them from the cache
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second  # the same cached keys, the same tokens
    plain = pipeline("encrypted-text-generation", model=export, backend="plain", verbose=False)
    assert first["ids"] == plain("the cat", max_new_tokens=1, eos_token_id=-1)[0]["he"]["token_ids"]


def test_remote_server_errors_and_streamed_bundle_zip(tmp_path):
    """The HTTP client (httpx): an unreachable server is a ConnectionError after its retries, not a hang; the
    bundle zip is written file by file (what register streams from disk) and refuses a secret key."""
    import zipfile

    from hf_polyhe.serve.client import write_bundle_zip

    port = _free_port()  # nobody listens there
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError):
        RemoteServer(f"http://127.0.0.1:{port}", retries=2, connect_timeout_s=1.0).health()
    assert time.perf_counter() - t0 < 30
    d = tmp_path / "bundle"
    d.mkdir()
    payload = os.urandom(3 << 20)
    (d / "bundle.json").write_text("{}")
    (d / "eval_automorphism_keys.bin").write_bytes(payload)
    (d / "notes.txt").write_text("not a bundle file")
    write_bundle_zip(d, tmp_path / "b.zip")
    with zipfile.ZipFile(tmp_path / "b.zip") as z:
        assert sorted(z.namelist()) == ["bundle.json", "eval_automorphism_keys.bin"]
        assert z.read("eval_automorphism_keys.bin") == payload
    import io

    with zipfile.ZipFile(io.BytesIO(bundle_zip(d))) as z:  # the in-memory form of the same zip
        assert z.read("eval_automorphism_keys.bin") == payload
    (d / "secret_key.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="secret key"):
        write_bundle_zip(d, tmp_path / "c.zip")
