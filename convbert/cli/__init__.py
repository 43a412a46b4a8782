"""The `convbert` command: one subcommand per job.

Each module in `SUBCOMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on each. Bad input raises `ConvBertError`; it is printed on one line (no traceback unless
`--debug`) and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from convbert import __version__
from convbert.errors import ConvBertError

SUBCOMMAND_MODULES = [
    "convbert.cli.info",
    "convbert.cli.data",
    "convbert.cli.pretrain",
    "convbert.cli.glue",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convbert",
        description="ConvBERT: build data, pre-train (ELECTRA replaced-token detection), fine-tune and evaluate on GLUE.",
    )
    parser.add_argument("--version", action="version", version=f"convbert {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--debug` is accepted anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except ConvBertError as err:
        if debug:
            traceback.print_exc()
        print(f"convbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convbert {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            traceback.print_exc()
        print(
            f"convbert {args.command}: error: out of memory; lower --batch-size (use gradient accumulation to keep "
            "the effective batch) or --max-seq-length",
            file=sys.stderr,
        )
        return 2
