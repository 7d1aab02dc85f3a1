"""The ``hf-polyhe`` command.

    hf-polyhe export MODEL_DIR OUT_DIR [--max-length N]      Poly model (save_pretrained dir) -> encrypted export
    hf-polyhe inspect EXPORT_DIR [--toy] [--rotation-keys K]  what the export is and the planner's report
    hf-polyhe keygen EXPORT_DIR --keys KEY_DIR [--toy] [--rotation-keys K]   secret key (0600) + public server bundle
    hf-polyhe encrypt EXPORT_DIR --keys KEY_DIR (--text T | --image F.npy) --out X.ct
    hf-polyhe run EXPORT_DIR --bundle BUNDLE_DIR --in X.ct --out Y.ct       server side: no secret key involved
    hf-polyhe decrypt EXPORT_DIR --keys KEY_DIR --in Y.ct [--top-k K]      prints labels / next tokens / embedding as JSON
    hf-polyhe serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--state-dir D] [--auth-token T]   HTTP server
    hf-polyhe demo [--fast]                                               train, make polynomial, run encrypted

This module is the entry point; it is outside the ``hf_polyhe`` package on purpose: importing the package
registers the Auto classes (torch and transformers), and ``--help``, ``--version`` and a mistyped argument
should answer in a fraction of a second. The verbs themselves are in :mod:`hf_polyhe.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys

VERBS = ("export", "inspect", "keygen", "encrypt", "run", "decrypt", "serve", "demo")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-polyhe")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown (not installed)"


def _rotation_keys(value: str):
    if value in ("auto", "all", "minimal"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected auto, all, minimal or a positive number of keys, got {value!r}")
    return n


def _rotation_keys_option(p) -> None:
    p.add_argument("--rotation-keys", type=_rotation_keys, default="auto", metavar="K",
                   help="rotation keys to generate: auto (all unless the server would exceed HF_POLYHE_MAX_MEMORY_GIB; "
                        "then as many as fit, other rotations composed of them), all, minimal (signed powers of two) "
                        "or a number")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-polyhe", description="Polynomial transformers on encrypted data.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--version", action="version", version=f"hf-polyhe {_version()}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the full Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    p = sub.add_parser("export", help="export a fully polynomial Poly model (save_pretrained dir) for encrypted inference")
    p.add_argument("model_dir", help="directory written by save_pretrained (a fully polynomial Poly model)")
    p.add_argument("out_dir", help="new (or existing export) directory to write the export to")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sequence the export accepts (default: the model's positions)")

    p = sub.add_parser("inspect", help="print an export's description and the CKKS planner report")
    p.add_argument("export_dir", help="an export directory")
    p.add_argument("--toy", action="store_true", help="plan for INSECURE toy parameters instead of 128-bit")
    _rotation_keys_option(p)

    p = sub.add_parser("keygen", help="generate a key set for an export: secret key + public server bundle")
    p.add_argument("export_dir", help="an export directory")
    p.add_argument("--keys", required=True, help="client key directory (holds the SECRET key, made 0700/0600)")
    p.add_argument("--bundle", default=None, help="where to write the public server bundle (default KEYS/server_bundle)")
    p.add_argument("--toy", action="store_true", help="INSECURE toy parameters (tests only)")
    _rotation_keys_option(p)

    p = sub.add_parser("encrypt", help="embed and encrypt a text or an image (client side)")
    p.add_argument("export_dir", help="an export directory (its client/ part is used)")
    p.add_argument("--keys", required=True, help="client key directory written by keygen")
    p.add_argument("--text", default=None, help="the text to encrypt (text exports)")
    p.add_argument("--image", default=None, help=".npy file of pixel values (C x H x W; image exports)")
    p.add_argument("--out", required=True, help="where to write the ciphertext")

    p = sub.add_parser("run", help="evaluate the export on a ciphertext (server side, public keys only)")
    p.add_argument("export_dir", help="an export directory (its server/ part is used)")
    p.add_argument("--bundle", required=True, help="the client's public server bundle")
    p.add_argument("--in", dest="inp", required=True, help="the client's ciphertext (from encrypt)")
    p.add_argument("--out", required=True, help="where to write the encrypted logits")

    p = sub.add_parser("decrypt", help="decrypt encrypted logits and print labels / next tokens / the embedding (client side)")
    p.add_argument("export_dir", help="an export directory")
    p.add_argument("--keys", required=True, help="client key directory written by keygen")
    p.add_argument("--in", dest="inp", required=True, help="the server's encrypted logits (from run)")
    p.add_argument("--top-k", type=int, default=3, help="how many labels / next tokens to print (default 3)")

    p = sub.add_parser("serve", help="HTTP server holding only the server part of an export")
    p.add_argument("export_dir", help="an export directory (only its server/ part is read)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-sessions", type=int, default=4, help="registered clients at once (default 4)")
    p.add_argument("--max-request-mb", type=int, default=64, help="largest ciphertext upload (MiB, default 64)")
    p.add_argument("--max-bundle-mb", type=int, default=4096, help="largest key bundle upload (MiB, default 4096)")
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
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")

    p = sub.add_parser("demo", help="train a tiny PolyGPT, make it polynomial, export it, generate encrypted")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--degree", type=int, default=15, help="polynomial degree of the GELU (default 15)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated in the clear (default 12)")
    p.add_argument("--encrypted-tokens", type=int, default=None,
                   help="tokens generated under encryption (default: 2 at 128-bit, 3 with --fast)")
    p.add_argument("--fast", action="store_true", help="INSECURE toy CKKS parameters (quick look; prints a warning)")
    p.add_argument("--no-encrypt", action="store_true", help="skip the encrypted part")
    return parser


def _user_error(e: BaseException) -> bool:
    """Errors that describe bad input (a path, a file, a value): one line, not a traceback."""
    if isinstance(e, (ValueError, OSError, LookupError)):
        return True
    try:
        from hf_polyhe.he.errors import HEError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, HEError)


def main(argv=None) -> int:
    """Run ``hf-polyhe`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from hf_polyhe import _HAS_TORCH, cli

        if _HAS_TORCH:  # a torch-free server (HF_POLYHE_NO_TORCH=1, or no torch installed) has no transformers
            import transformers

            transformers.logging.set_verbosity_error()

        return getattr(cli, f"cmd_{args.command}")(args)
    except KeyboardInterrupt:
        print("hf-polyhe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback or not _user_error(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hf-polyhe {args.command}: error: {msg} (--traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
