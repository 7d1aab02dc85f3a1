"""The ``hf-polyhe`` command."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps, degree=args.degree, max_new_tokens=args.max_new_tokens)
    return 0 if result["fully_polynomial"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-polyhe", description="Polynomial transformers on encrypted data.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny PolyGPT, make it polynomial, compare outputs")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--degree", type=int, default=31, help="polynomial degree of each operator (default 31)")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
