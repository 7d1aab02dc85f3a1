"""The ``hf-polyhe`` command.

    hf-polyhe export MODEL_DIR OUT_DIR [--max-length N]      Poly model (save_pretrained dir) -> encrypted export
    hf-polyhe inspect EXPORT_DIR [--toy]                      what the export is and the planner's report
    hf-polyhe keygen EXPORT_DIR --keys KEY_DIR [--toy]        secret key (0600) + public server bundle
    hf-polyhe encrypt EXPORT_DIR --keys KEY_DIR (--text T | --image F.npy) --out X.ct
    hf-polyhe run EXPORT_DIR --bundle BUNDLE_DIR --in X.ct --out Y.ct       server side: no secret key involved
    hf-polyhe decrypt EXPORT_DIR --keys KEY_DIR --in Y.ct [--top-k K]      prints labels / next tokens as JSON
    hf-polyhe serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--state-dir D] [--auth-token T]   HTTP server
    hf-polyhe demo [--fast]                                               train, make polynomial, run encrypted
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _params(args):
    from .he import params as P

    if getattr(args, "toy", False):
        print("WARNING: --toy uses INSECURE toy CKKS parameters (no security; tests and demos only)", file=sys.stderr)
        return P.resolve("toy")
    return P.resolve("default")


def _export(args) -> int:
    import transformers
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForSequenceClassification)

    from .export import save_encrypted_pipeline  # importing hf_polyhe registered the Poly Auto classes

    config = AutoConfig.from_pretrained(args.model_dir)
    archs = " ".join(config.architectures or [])
    auto = (AutoModelForCausalLM if "CausalLM" in archs else AutoModelForSequenceClassification
            if "SequenceClassification" in archs else AutoModelForImageClassification if "ImageClassification" in archs
            else AutoModel)
    model = auto.from_pretrained(args.model_dir).eval()
    pre = None
    for loader in ("AutoTokenizer", "AutoImageProcessor"):
        try:
            pre = getattr(transformers, loader).from_pretrained(args.model_dir)
            break
        except Exception:
            continue
    save_encrypted_pipeline(model, pre, args.out_dir, max_length=args.max_length)
    print(f"exported {type(model).__name__} to {args.out_dir} (server/: spec + weights, client/: embeddings"
          f"{' + ' + type(pre).__name__ if pre is not None else ''})")
    return 0


def _inspect(args) -> int:
    from .he import Export, plan_for_export, plan_report

    model = Export(args.export_dir)
    meta = model.meta
    print(f"export      : {os.path.abspath(args.export_dir)}")
    print(f"task        : {meta['task']} ({meta['family']}, {meta['num_layers']} layers, d={meta['hidden_size']}, "
          f"max_length {meta['max_length']})")
    print(f"threat model: {meta.get('threat_model', '')}")
    t0 = time.perf_counter()
    plan = plan_for_export(model, _params(args))
    print(f"planned in  : {time.perf_counter() - t0:.1f} s")
    print(plan_report(plan))
    return 0


def _keygen(args) -> int:
    from .he import Client

    t0 = time.perf_counter()
    client = Client.keygen(args.export_dir, _params(args))
    client.save(args.keys)
    bundle = args.bundle or os.path.join(args.keys, "server_bundle")
    client.write_bundle(bundle)
    print(f"keys in {args.keys} (SECRET: keep private, files 0600); public server bundle in {bundle} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _client(args, export):
    from .he import Client

    return Client.load(export, args.keys)


def _encrypt(args) -> int:
    import numpy as np

    from .he import Export

    model = Export(args.export_dir)
    if model.family == "vit":
        if not args.image:
            raise SystemExit("error: this export classifies images: pass --image FILE.npy (C x H x W floats)")
        x = model.embed(pixel_values=np.load(args.image))
    else:
        if args.text is None:
            raise SystemExit("error: pass --text")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.client_dir)
        x = model.embed(input_ids=tok(args.text, add_special_tokens=model.family != "gpt")["input_ids"])
    data = _client(args, model).encrypt(x)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"encrypted {x.shape[0]} x {x.shape[1]} embeddings -> {args.out} ({len(data)} bytes)")
    return 0


def _run(args) -> int:
    from .he import Server
    from .he.runtime.ciphertext import read_header

    server = Server(args.bundle, spec=args.export_dir)
    with open(args.inp, "rb") as f:
        data = f.read()
    rows = read_header(data).rows
    t0 = time.perf_counter()
    out = server.run(data)
    with open(args.out, "wb") as f:
        f.write(out)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in server.last_timings.items())
    print(f"evaluated {rows} encrypted rows in {time.perf_counter() - t0:.1f} s ({timings}) -> {args.out}")
    return 0


def _decrypt(args) -> int:
    import numpy as np

    from .he import Export
    from .pipelines.text_classification import top_labels

    model = Export(args.export_dir)
    with open(args.inp, "rb") as f:
        logits = _client(args, model).decrypt(f.read())
    if model.family == "gpt":
        order = np.argsort(-logits)[: args.top_k]
        out = {"next_token_ids": [int(i) for i in order], "logits": [float(logits[i]) for i in order]}
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model.client_dir)
            out["next_tokens"] = [tok.decode([i]) for i in out["next_token_ids"]]
        except Exception:
            pass
    else:
        out = top_labels(logits, model.meta.get("id2label", {}), args.top_k)
    print(json.dumps(out, indent=1))
    return 0


def _serve(args) -> int:
    from .serve.app import MiB, serve

    token = args.auth_token or os.environ.get("HF_POLYHE_AUTH_TOKEN") or None
    if args.allow_toy:
        print("WARNING: --allow-toy accepts keys with INSECURE toy CKKS parameters (tests only)", file=sys.stderr)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("WARNING: serving beyond loopback without --auth-token: anyone who reaches the port can register keys",
              file=sys.stderr)
    print(f"serving {args.export_dir} on http://{args.host}:{args.port}/v1 (server part only: no secret keys"
          f"{'; token required' if token else ''})", flush=True)
    try:
        serve(args.export_dir, host=args.host, port=args.port, log_level=args.log_level,
              max_sessions=args.max_sessions, max_request_bytes=args.max_request_mb * MiB,
              max_bundle_bytes=args.max_bundle_mb * MiB, session_ttl_s=args.session_ttl, state_dir=args.state_dir,
              max_streams=args.max_streams, max_jobs_per_session=args.max_jobs_per_session,
              job_timeout_s=args.job_timeout, load_timeout_s=args.load_timeout,
              worker_memory_bytes=int(args.worker_memory_mb * MiB) if args.worker_memory_mb else None,
              parallel_jobs=args.parallel_jobs, allow_toy=args.allow_toy, auth_token=token)
    except (RuntimeError, ValueError) as e:  # not an export, a state directory in use or of another export
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps, degree=args.degree, max_new_tokens=args.max_new_tokens, fast=args.fast,
                      encrypted=not args.no_encrypt, encrypted_tokens=args.encrypted_tokens)
    return 0 if result["fully_polynomial"] and result.get("encrypted_matches", True) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-polyhe", description="Polynomial transformers on encrypted data.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a fully polynomial Poly model (save_pretrained dir) for encrypted inference")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-length", type=int, default=None, help="longest sequence the export accepts")
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="print an export's description and the CKKS planner report")
    p.add_argument("export_dir")
    p.add_argument("--toy", action="store_true", help="plan for INSECURE toy parameters instead of 128-bit")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("keygen", help="generate a key set for an export: secret key + public server bundle")
    p.add_argument("export_dir")
    p.add_argument("--keys", required=True, help="client key directory (holds the SECRET key, made 0700/0600)")
    p.add_argument("--bundle", default=None, help="where to write the public server bundle (default KEYS/server_bundle)")
    p.add_argument("--toy", action="store_true", help="INSECURE toy parameters (tests only)")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("encrypt", help="embed and encrypt a text or an image (client side)")
    p.add_argument("export_dir")
    p.add_argument("--keys", required=True)
    p.add_argument("--text", default=None)
    p.add_argument("--image", default=None, help=".npy file of pixel values (C x H x W)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_encrypt)

    p = sub.add_parser("run", help="evaluate the export on a ciphertext (server side, public keys only)")
    p.add_argument("export_dir")
    p.add_argument("--bundle", required=True, help="the client's public server bundle")
    p.add_argument("--in", dest="inp", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_run)

    p = sub.add_parser("decrypt", help="decrypt encrypted logits and print labels / next tokens (client side)")
    p.add_argument("export_dir")
    p.add_argument("--keys", required=True)
    p.add_argument("--in", dest="inp", required=True)
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=_decrypt)

    p = sub.add_parser("serve", help="HTTP server holding only the server part of an export")
    p.add_argument("export_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-sessions", type=int, default=4)
    p.add_argument("--max-request-mb", type=int, default=64, help="largest ciphertext upload (MiB)")
    p.add_argument("--max-bundle-mb", type=int, default=4096, help="largest key bundle upload (MiB)")
    p.add_argument("--session-ttl", type=float, default=3600.0, help="idle seconds before a session expires")
    p.add_argument("--state-dir", default=None,
                   help="keep sessions (keys, KV caches) here so that a restart loses none (default: a temporary "
                        "directory removed at exit)")
    p.add_argument("--auth-token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every request but /v1/health "
                        "(default $HF_POLYHE_AUTH_TOKEN; none: open)")
    p.add_argument("--allow-toy", action="store_true", help="accept keys with INSECURE toy parameters (tests only)")
    p.add_argument("--job-timeout", type=float, default=1800.0, help="wall-clock seconds per job (the worker is killed)")
    p.add_argument("--load-timeout", type=float, default=1800.0, help="seconds to load a session's keys")
    p.add_argument("--worker-memory-mb", type=float, default=0,
                   help="address-space limit of a session's worker (default: 3x its keys + 4 GiB, at most 90%% of RAM)")
    p.add_argument("--max-streams", type=int, default=16, help="open KV-cache generation streams per session")
    p.add_argument("--max-jobs-per-session", type=int, default=8, help="unfetched jobs per session")
    p.add_argument("--parallel-jobs", type=int, default=1, help="jobs evaluated at once (sessions take turns)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="train a tiny PolyGPT, make it polynomial, export it, generate encrypted")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--degree", type=int, default=15, help="polynomial degree of the GELU (default 15)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated in the clear (default 12)")
    p.add_argument("--encrypted-tokens", type=int, default=None,
                   help="tokens generated under encryption (default: 2 at 128-bit, 3 with --fast)")
    p.add_argument("--fast", action="store_true", help="INSECURE toy CKKS parameters (quick look; prints a warning)")
    p.add_argument("--no-encrypt", action="store_true", help="skip the encrypted part")
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import _HAS_TORCH

    if _HAS_TORCH:  # a torch-free server (HF_POLYHE_NO_TORCH=1, or no torch installed) has no transformers to quieten
        import transformers

        transformers.logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
