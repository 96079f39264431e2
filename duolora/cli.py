"""The ``duolora`` command: inspect, params, merge, demo.

Each sub-command's work lives in the engine module it belongs to; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duolora",
        description="DuoLoRA: merge a content LoRA and a style LoRA for SDXL (ZipRank, layer priors, Constyle).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a LoRA file: key style, base model, layers, ranks, alpha, dtype")
    p.add_argument("file", help="a .safetensors LoRA file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "params",
        help="trainable-parameter count of every merger on full SDXL attention shapes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rank", type=int, default=64, help="rank of both LoRAs")
    p.set_defaults(func=_params)
    return parser


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import run_inspect

    return run_inspect(args.file, as_json=args.json)


def _params(args: argparse.Namespace) -> int:
    from .mergers import print_parameter_counts

    return print_parameter_counts(rank=args.rank)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
