"""The `convbert` command: one subcommand per job.

Each module in `SUBCOMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on each. Bad input raises `ConvBertError`; it is printed on one line (no traceback unless
`--debug`) and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import traceback
from pathlib import Path

from convbert import __version__
from convbert.errors import ConvBertError

SUBCOMMAND_MODULES = [
    "convbert.cli.info",
    "convbert.cli.data",
    "convbert.cli.pretrain",
    "convbert.cli.glue",
    "convbert.cli.interop",
]


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error (`convbert <cmd>: error: ...`), exit status 2. Flags are
    not abbreviated: argparse would read `glue --seed 3` as `--seeds 3` (three runs, not seed 3)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # (subcommands' parsers are this class too)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def check_seed(seed: int, flag: str = "--seed") -> int:
    """A seed in numpy's range (every command's --seed and --seeds take the same one)."""
    if not 0 <= seed < 2**32:
        raise ConvBertError(f"{flag}: a seed must be in 0..{2**32 - 1}, got {seed}")
    return seed


def _out_of_memory_hint(args: argparse.Namespace) -> str:
    if hasattr(args, "grad_accum"):  # pretrain: --batch-size is global, --grad-accum splits it into micro-steps
        return ("out of memory; raise --grad-accum (same global --batch-size, fewer examples per micro-step) or "
                "lower --batch-size")
    flags = [flag for flag, name in (("--batch-size", "batch_size"), ("--max-seq-length", "max_seq_length"))
             if hasattr(args, name)]  # (fine-tuning has no gradient accumulation: a smaller batch is a new recipe)
    return "out of memory; lower " + " or ".join(flags) if flags else "out of memory"


def _is_torch_oom(err: BaseException) -> bool:
    """torch raises its own types on allocation failure: OutOfMemoryError (GPU) or RuntimeError (CPU allocator)."""
    return type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def _os_error_message(err: OSError) -> str:
    """`path: reason` for a filesystem error (e.g. `out/run: Not a directory`), from the error's own fields."""
    reason = err.strerror or str(err)
    if err.filename is not None and err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {reason}"
    if err.filename is not None:
        return f"{err.filename}: {reason}"
    return reason


def _remove_if_new_and_empty(path: str | None, existed: bool) -> None:
    """A folder the failed command created and left without any file is removed (no partial output)."""
    if not path or existed:
        return
    p = Path(path)
    try:
        if p.is_dir() and not any(q.is_file() or q.is_symlink() for q in p.rglob("*")):
            shutil.rmtree(p)
    except OSError:
        pass


# What re-running an interrupted command does (the others start over; their outputs are written whole or not at all)
RESUMABLE = {
    "build-data": "re-run the same command to continue (finished shards are kept)",
    "pretrain": "re-run the same command to continue from the last checkpoint",
    "glue": "re-run the same command to continue (finished runs are kept)",
    "quickstart": "re-run the same command to continue",
}

WORKFLOW = """\
the usual order:
  convbert train-vocab   (or use a published vocab.txt)
  convbert build-data    raw text -> packed 128-token shards
  convbert pretrain      ELECTRA replaced-token detection (torchrun for several GPUs)
  convbert export        a checkpoint -> an HF-layout model folder
  convbert glue          GLUE fine-tuning, results and submission.zip
  convbert finetune      your own CSV/TSV/JSONL task, then convbert predict
released weights: convbert import-tf (TF checkpoints) or any HF-layout folder as --model / --init-from.
a demo on CPU in minutes: convbert quickstart.  each command: convbert COMMAND --help"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convbert",
        description="ConvBERT: build data, pre-train (ELECTRA replaced-token detection), fine-tune and evaluate on GLUE.",
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the line reads `convbert <command>: error: ...`
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        subcommands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    output = getattr(args, "output", None)
    output_existed = bool(output) and Path(output).exists()
    try:
        return int(args.func(args) or 0)
    except ConvBertError as err:
        if debug:
            traceback.print_exc()
        _remove_if_new_and_empty(output, output_existed)
        print(f"convbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _remove_if_new_and_empty(output, output_existed)  # (what can be resumed is kept: it holds files)
        again = RESUMABLE.get(args.command)
        print(f"convbert {args.command}: interrupted" + (f"; {again}" if again else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout piped into `head` and closed: stop quietly, as Unix filters do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit's flush)
        except (OSError, ValueError, AttributeError):  # (a stdout without a file descriptor)
            pass
        return 141  # 128 + SIGPIPE, what the shell reports for a filter killed by it
    except OSError as err:  # a path that cannot be created, read or written: name it, no traceback
        if debug:
            traceback.print_exc()
        _remove_if_new_and_empty(output, output_existed)
        print(f"convbert {args.command}: error: {_os_error_message(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            traceback.print_exc()
        print(f"convbert {args.command}: error: {_out_of_memory_hint(args)}", file=sys.stderr)
        return 2
    except Exception as err:
        if not _is_torch_oom(err):
            raise
        if debug:
            traceback.print_exc()
        print(f"convbert {args.command}: error: {_out_of_memory_hint(args)}", file=sys.stderr)
        return 2
