"""The commands of ``hf-polyhe``: one ``cmd_<verb>(args)`` per verb.

The parser and the entry point live in the top-level module :mod:`hf_polyhe_cli` so that ``--help``, ``--version``
and argument errors answer at once without importing torch; a verb imports what it needs here.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings


def _params(args):
    from .he import params as P

    if getattr(args, "toy", False):
        print("WARNING: --toy uses INSECURE toy CKKS parameters (no security; tests and demos only)", file=sys.stderr)
        warnings.filterwarnings("ignore", category=P.ToyParametersWarning)  # said once, above
        return P.resolve("toy")
    return P.resolve("default")


def cmd_export(args) -> int:
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


def cmd_inspect(args) -> int:
    from .he import Export, plan_for_export, plan_report

    model = Export(args.export_dir)
    meta = model.meta
    print(f"export      : {os.path.abspath(args.export_dir)}")
    print(f"task        : {meta['task']} ({meta['family']}, {meta['num_layers']} layers, d={meta['hidden_size']}, "
          f"max_length {meta['max_length']})")
    print(f"threat model: {meta.get('threat_model', '')}")
    t0 = time.perf_counter()
    plan = plan_for_export(model, _params(args), rotation_keys=args.rotation_keys)
    print(f"planned in  : {time.perf_counter() - t0:.1f} s")
    print(plan_report(plan))
    return 0


def cmd_keygen(args) -> int:
    from .he import Client

    t0 = time.perf_counter()
    client = Client.keygen(args.export_dir, _params(args), rotation_keys=args.rotation_keys)
    client.save(args.keys)
    bundle = args.bundle or os.path.join(args.keys, "server_bundle")
    client.write_bundle(bundle)
    print(f"keys in {args.keys} (SECRET: keep private, files 0600); public server bundle in {bundle} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _client(args, export):
    from .he import Client

    return Client.load(export, args.keys)


def cmd_encrypt(args) -> int:
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


def cmd_run(args) -> int:
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


def cmd_decrypt(args) -> int:
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
    elif model.meta.get("task") == "encrypted-feature-extraction":
        out = {"embedding": [float(v) for v in np.asarray(logits).reshape(-1)]}  # the mean-pooled sentence embedding
    else:
        out = top_labels(logits, model.meta.get("id2label", {}), args.top_k)
    print(json.dumps(out, indent=1))
    return 0


def cmd_serve(args) -> int:
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps, degree=args.degree, max_new_tokens=args.max_new_tokens, fast=args.fast,
                      encrypted=not args.no_encrypt, encrypted_tokens=args.encrypted_tokens)
    return 0 if result["fully_polynomial"] and result.get("encrypted_matches", True) else 1


from hf_polyhe_cli import build_parser, main  # noqa: E402,F401  (``python -m hf_polyhe.cli`` and older imports)

if __name__ == "__main__":
    sys.exit(main())
