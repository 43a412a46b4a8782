"""Benchmark `build_dataset` against raw HF `tokenizers` batch encoding of the same text.

For each worker count N it measures, on the same corpus files:

* raw: N processes, each encoding 1/N of the corpus's lines with `Tokenizer.encode_batch_fast` (batches of 4096
  lines, the text already in memory, tokenizers' own threading off) — an upper bound for any builder;
* build: `convbert.data.build_dataset(..., workers=N)` end to end (reading, tokenising, packing, writing shards
  and the manifest), in a fresh folder;

and reports tokens/s of both (tokens = WordPiece tokens of the corpus, the same count for both), the ratio
(goal >= 80 %), the same ratio in tokens per CPU-second (all processes; robust on a shared, busy machine), and
bytes per token on disk (goal <= 2.1). Raw and build runs are interleaved; the best of --repeats is kept. Without --input it writes a corpus of Python standard
library documentation (pydoc text) of about --corpus-mb MiB. Prints a table and writes JSON to --output.

    python benchmarks/build_data.py --workers 1 2 --corpus-mb 8 --output benchmarks/results/build_data.json
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import machine_info, write_report  # noqa: E402

STDLIB_MODULES = [
    "os", "json", "tarfile", "argparse", "collections", "random", "re", "textwrap", "pathlib", "subprocess",
    "typing", "functools", "itertools", "logging", "email", "http.client", "unittest", "decimal", "datetime",
    "string", "socket", "threading", "asyncio", "sqlite3", "csv", "zipfile", "shutil", "inspect", "ast", "dis",
    "pickle", "urllib.request", "xml.etree.ElementTree", "statistics", "fractions", "math", "heapq", "bisect",
]


def make_corpus(folder: Path, target_mb: float) -> list[str]:
    import importlib
    import pydoc

    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for name in STDLIB_MODULES:
        try:
            docs.append(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
        except Exception:  # noqa: BLE001 - a module missing on this platform is fine
            continue
    target = int(target_mb * (1 << 20))
    size = 0
    k = 0
    files = []
    while size < target:
        text = docs[k % len(docs)]
        p = folder / f"doc{k:04d}.txt"
        p.write_text(text, encoding="utf-8")
        files.append(str(p))
        size += len(text.encode("utf-8"))
        k += 1
    return files


_TOK = {}


def _init(vocab: str) -> None:
    from convbert.data.tokenize import WordPieceTokenizer

    _TOK["t"] = WordPieceTokenizer.from_vocab(vocab)


def _encode_slice(lines: list[str]) -> tuple[int, float, float]:
    tok = _TOK["t"].backend
    enc = tok.encode_batch_fast if hasattr(tok, "encode_batch_fast") else tok.encode_batch
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(lines), 4096):
        for e in enc(lines[i : i + 4096], add_special_tokens=False):
            n += len(e.ids)
    return n, time.perf_counter() - t0, time.process_time() - c0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _warm(_: int) -> int:
    return os.getpid()


def raw_throughput(files: list[str], vocab: str, workers: int) -> dict:
    lines = []
    for f in files:
        for ln in Path(f).read_text(encoding="utf-8").split("\n"):
            ln = ln.strip()
            if ln:
                lines.append(ln)
    slices = [lines[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init, initargs=(vocab,)) as pool:
        list(pool.map(_warm, range(workers * 4)))
        t0 = time.perf_counter()
        results = list(pool.map(_encode_slice, slices))
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    cpu = sum(r[2] for r in results)
    return {"tokens": tokens, "lines": len(lines), "seconds": wall, "tokens_per_s": tokens / wall,
            "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu}


def build_throughput(files: list[str], vocab: str, workers: int, out: Path, corpus_tokens: int) -> dict:
    from convbert.data.build import build_dataset

    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    m = build_dataset([str(Path(files[0]).parent)], vocab, str(out), workers=workers, progress=False)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0 + _children_cpu() - k0
    c = m["counts"]
    return {
        "seconds": wall,
        "tokens_per_s": corpus_tokens / wall,
        "cpu_seconds": cpu,
        "tokens_per_cpu_s": corpus_tokens / cpu,
        "examples": c["examples"],
        "stored_tokens": c["tokens"],
        "stored_text_tokens": c["text_tokens"],
        "bytes_on_disk": m["bytes_on_disk"],
        "bytes_per_token": m["bytes_on_disk"] / c["tokens"],
        "bytes_per_text_token": m["bytes_on_disk"] / c["text_tokens"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="*", help="text files (default: generate a stdlib-docs corpus)")
    ap.add_argument("--vocab", help="vocab.txt (default: train a 8000-token WordPiece vocabulary on the corpus)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement; the best is kept")
    ap.add_argument("--output", default="benchmarks/results/build_data.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="convbert-bench-") as tmp:
        tmp = Path(tmp)
        if args.input:
            files = sorted(str(Path(p)) for p in args.input)
            src = tmp / "corpus"
            src.mkdir()
            for i, f in enumerate(files):  # build_dataset reads the folder: link the files into one
                os.symlink(os.path.abspath(f), src / f"{i:05d}-{Path(f).name}")
            files = [str(src / p) for p in sorted(os.listdir(src))]
        else:
            files = make_corpus(tmp / "corpus", args.corpus_mb)
        vocab = args.vocab
        if not vocab:
            from convbert.data.vocab import train_vocab

            vocab = train_vocab([str(Path(files[0]).parent)], 8000, str(tmp / "vocab.txt"))
        corpus_bytes = sum(os.path.getsize(f) for f in files)
        rows = []
        for w in args.workers:
            raws, builds = [], []
            for r in range(args.repeats):  # interleaved, so both see the same machine load
                raws.append(raw_throughput(files, vocab, w))
                builds.append(build_throughput(files, vocab, w, tmp / f"out-{w}-{r}", raws[-1]["tokens"]))
                shutil.rmtree(tmp / f"out-{w}-{r}")
            raw = max(raws, key=lambda r: r["tokens_per_s"])
            build = max(builds, key=lambda r: r["tokens_per_s"])
            rows.append({"workers": w, "raw": raw, "build": build,
                         "ratio": build["tokens_per_s"] / raw["tokens_per_s"],
                         "cpu_ratio": max(b["tokens_per_cpu_s"] for b in builds)
                         / max(r["tokens_per_cpu_s"] for r in raws)})

    result = {
        "corpus_bytes": corpus_bytes,
        "corpus_tokens": rows[0]["raw"]["tokens"],
        "vocab": args.vocab or "trained (8000 tokens)",
        "machine": machine_info(threads=1),  # each worker process tokenises on one thread
        "rows": rows,
    }
    print(f"corpus: {corpus_bytes / (1 << 20):.1f} MiB, {result['corpus_tokens']:,} WordPiece tokens")
    head = f"{'workers':>7} | {'raw tok/s':>12} | {'build tok/s':>12} | {'ratio':>6} | {'CPU ratio':>9} | " \
           f"{'build s':>7} | {'bytes/token':>11} | {'bytes/text token':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        b = r["build"]
        print(f"{r['workers']:>7} | {r['raw']['tokens_per_s']:>12,.0f} | {b['tokens_per_s']:>12,.0f} | "
              f"{100 * r['ratio']:>5.1f}% | {100 * r['cpu_ratio']:>8.1f}% | {b['seconds']:>7.2f} | {b['bytes_per_token']:>11.3f} | "
              f"{b['bytes_per_text_token']:>16.3f}")
    write_report(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
