"""`convbert build-data`, `convbert train-vocab` and `convbert data-stats`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from convbert.cli import check_seed


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `convbert` parser."""
    p = sub.add_parser(
        "build-data",
        help="tokenise a corpus and pack it into pre-training shards",
        description=(
            "Tokenise plain text, OpenWebText archives, JSONL or parquet with a BERT WordPiece vocabulary and pack "
            "the lines into pre-training examples exactly as ELECTRA/ConvBERT do (spec §4). Writes compact shards and "
            "manifest.json to --output. Re-running the same command after an interruption continues where it "
            "stopped; the result is identical to an uninterrupted build for any --workers."
        ),
    )
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="text files, folders (recursive), globs, OpenWebText .tar.xz / folders of .xz sub-archives, "
                        ".jsonl[.gz], .parquet (several after one --input, or --input repeated)")
    p.add_argument("--vocab", required=True, metavar="FILE", help="BERT-style vocab.txt (one token per line)")
    p.add_argument("--output", required=True, metavar="DIR", help="dataset folder to write (new, empty, or the "
                   "folder of an interrupted build with the same settings)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1; at most one per CPU is used)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the packing (default 0)")
    p.add_argument("--max-seq-length", type=int, default=128, help="example length (default 128)")
    p.add_argument("--docs", choices=["blank-lines", "files"], default="blank-lines",
                   help="document boundaries: blank lines and file ends (default, ELECTRA's generic builder), or "
                        "only file ends, blank lines skipped (the OpenWebText builder; use it for OWT)")
    p.add_argument("--segment-rule", choices=["electra", "convbert-release"], default="electra",
                   help="how lines are split into segments A and B: ELECTRA's fixed rule (default) or the released "
                        "ConvBERT code's pre-fix rule")
    p.add_argument("--text-field", default="text",
                   help="JSONL field or parquet column holding the text (default: text)")
    p.add_argument("--no-lower-case", dest="lower_case", action="store_false",
                   help="keep case (cased vocabularies); accents are then kept too, as in the original")
    p.add_argument("--no-strip-accents", dest="strip_accents", action="store_false", help="keep accents")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_build)

    p = sub.add_parser(
        "train-vocab",
        help="train a WordPiece vocabulary on a corpus",
        description=(
            "Train a BERT-style WordPiece vocabulary with HF tokenizers. The file starts with [PAD] [UNK] [CLS] "
            "[SEP] [MASK] (ids 0-4), then single characters and their ## forms, then learned pieces."
        ),
    )
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="same inputs as build-data")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, e.g. 30522")
    p.add_argument("--output", required=True, metavar="FILE", help="vocab.txt to write")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum count of a learned piece (default 2)")
    p.add_argument("--text-field", default="text",
                   help="JSONL field or parquet column holding the text (default: text)")
    p.add_argument("--no-lower-case", dest="lower_case", action="store_false", help="keep case")
    p.add_argument("--no-strip-accents", dest="strip_accents", action="store_false", help="keep accents")
    p.set_defaults(func=run_train_vocab)

    p = sub.add_parser(
        "data-stats",
        help="summarise a built dataset: examples, tokens, segments, length histogram",
        description="Print what a folder written by build-data holds.",
    )
    p.add_argument("dir", metavar="DIR", help="dataset folder")
    p.add_argument("--bins", type=int, default=None,
                   help="length-histogram buckets (default 8, or max_seq_length if that is smaller)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_stats)


def run_build(args: argparse.Namespace) -> int:
    from convbert.data.build import build_dataset
    from convbert.data.stats import short_examples_note

    check_seed(args.seed)
    t0 = time.monotonic()
    m = build_dataset(
        args.input, args.vocab, args.output, workers=args.workers, seed=args.seed,
        max_seq_length=args.max_seq_length, docs=args.docs, segment_rule=args.segment_rule,
        text_field=args.text_field, lower_case=args.lower_case, strip_accents=args.strip_accents,
        progress=args.progress,
    )
    dt = time.monotonic() - t0
    c = m["counts"]
    ex = c["examples"] or 1
    print(f"wrote {args.output}: {c['examples']:,} examples, {c['tokens']:,} tokens, {len(m['shards'])} shard(s), "
          f"{m['bytes_on_disk']:,} bytes ({m['bytes_per_token']} bytes/token)")
    print(f"  {c['files']:,} source{'s' if c['files'] != 1 else ''} read (files, archive members, JSONL records or "
          f"parquet rows), {c['lines']:,} "
          f"lines; single segment {100 * c['single_segment'] / ex:.1f} %, two segments "
          f"{100 * c['two_segment'] / ex:.1f} %; {dt:.1f} s")
    note = short_examples_note(c["tokens"] / ex, m["max_seq_length"], m["settings"].get("docs"))
    if note and c["examples"]:
        print(f"  note: {note}", file=sys.stderr)
    if c["invalid_utf8"]:
        print(f"  warning: {c['invalid_utf8']:,} invalid UTF-8 sequences replaced in {c['files_with_invalid_utf8']} "
              "file(s) or 16 MiB parts of larger ones", file=sys.stderr)
    if c["binary_skipped"]:
        names = ", ".join(c["binary_files"][:5]) + (" …" if c["binary_skipped"] > 5 else "")
        print(f"  warning: {c['binary_skipped']} binary file(s) skipped: {names}", file=sys.stderr)
    return 0


def run_train_vocab(args: argparse.Namespace) -> int:
    from convbert.data.vocab import train_vocab

    path = train_vocab(args.input, args.vocab_size, args.output, lower_case=args.lower_case,
                       strip_accents=args.strip_accents, min_frequency=args.min_frequency,
                       text_field=args.text_field)
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    print(f"wrote {path}: {n:,} tokens")
    if n > args.vocab_size:
        print(f"note: more than --vocab-size {args.vocab_size:,}: the special tokens, every character of the corpus "
              "and its ## form are always kept", file=sys.stderr)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from convbert.data.stats import data_stats, format_stats

    s = data_stats(args.dir, bins=args.bins)
    print(json.dumps(s, indent=2) if args.json else format_stats(s))
    return 0
