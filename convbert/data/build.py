"""`build_dataset`: corpus → WordPiece → packed examples → shards + manifest.json (parallel, resumable).

How determinism and resume work:

* The inputs are cut into *units* (a file, a chunk of a large file, an archive member, …) in a fixed order
  (`corpus.UnitEnumerator`). Each unit is packed by its own `ExampleBuilder` whose RNG is seeded from
  ``sha256(seed, unit key)``, so a unit's examples do not depend on which worker runs it or when.
* Workers return a unit's examples in memory, or, past `SPILL_TOKENS` tokens, write them to a *part* file in
  ``<output>/parts/`` (atomically, plus a small JSON with the unit's counts). The main process appends the units in
  order into shards of about `shard_tokens` tokens (``shard-00000.bin``, …); a shard is renamed into place only
  when complete, then ``manifest.json`` is rewritten (atomically) to record it, and only then are its parts
  deleted.
* Re-running the same command skips the units already in finished shards, reuses finished parts, and redoes the
  rest; the shard boundaries depend only on the unit order, so the folder ends up byte-identical to an
  uninterrupted build. Different settings into a folder that holds a dataset raise `ConvBertError`.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import functools
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from array import array
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from convbert.data.corpus import DATASET_FORMAT, DOCS_MODES, Unit, UnitEnumerator, UnitStats, read_unit
from convbert.data.packing import SEGMENT_RULES, ExampleBuilder, line_token_cap
from convbert.data.shards import ShardReader, ShardWriter, token_dtype_for
from convbert.data.tokenize import WordPieceTokenizer
from convbert.errors import ConvBertError
from convbert.utils import sha256_file, write_json_atomic

FORMAT = DATASET_FORMAT
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = "parts"
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens = 128 MiB of uint16 ids per shard
DEFAULT_CHUNK_BYTES = 1 << 24  # large plain-text files are cut into ~16 MiB units
SPILL_TOKENS = 1 << 23  # a unit with more tokens than this goes through a part file instead of memory
BATCH_LINES = 4096
BATCH_CHARS = 1 << 20


def unit_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"convbert-data:{seed}:{key}".encode("utf-8")).digest()[:8], "little")


# --------------------------------------------------------------------------------------------------------------
# Worker side


class _WorkerConfig:
    def __init__(self, vocab, lower_case, strip_accents, max_seq_length, segment_rule, docs, text_field, seed,
                 token_bytes, parts_dir):
        self.vocab = vocab
        self.lower_case = lower_case
        self.strip_accents = strip_accents
        self.max_seq_length = max_seq_length
        self.segment_rule = segment_rule
        self.docs = docs
        self.text_field = text_field
        self.seed = seed
        self.token_bytes = token_bytes
        self.parts_dir = parts_dir


_STATE: dict = {}
_LITTLE = np.little_endian


def _exit_with_parent() -> None:
    """Linux: have the kernel kill this worker when the builder dies, so a SIGKILLed build leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # best effort: without it an orphaned worker idles until killed
        pass


def _init_worker(cfg: _WorkerConfig, single_threaded: bool) -> None:
    _exit_with_parent()
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE["cfg"] = cfg
    _STATE["tok"] = WordPieceTokenizer.from_vocab(cfg.vocab, lower_case=cfg.lower_case,
                                                  strip_accents=cfg.strip_accents)


def part_paths(parts_dir: str | Path, seq: int) -> tuple[Path, Path]:
    base = Path(parts_dir) / f"unit-{seq:08d}"
    return base.with_suffix(".bin"), base.with_suffix(".json")


def pack_unit(unit: Unit, tok: WordPieceTokenizer, builder: ExampleBuilder, files_mode: bool, text_field: str,
              stats: UnitStats, sink) -> None:
    """Read `unit`, tokenise its lines in batches and feed them to `builder`; `sink(a, b)` gets each example."""
    items: list = []
    chars = 0
    # No example takes more than max_seq_length tokens of a line, and a line this long decides every length
    # comparison of the packer the same way as the whole line would (see `line_token_cap`): the rest of a very
    # long line (a one-line 50 MB file) is not tokenised, nor held as a list of ids.
    cap = line_token_cap(builder.max_length)

    def run(items: list) -> None:
        builder.feed(items, iter(tok.encode_batch([s for s in items if s], max_tokens=cap)), sink)

    for block in read_unit(unit, text_field, stats):
        for line in block:
            if line is not None:
                line = line.strip()
                if not line and files_mode:
                    continue
                chars += len(line)
            items.append(line)
            # checked per line: one block can be a whole document (a JSONL record, a parquet row group, an
            # archive member), and tokenising all of it at once cost ~57 bytes of memory per byte of text
            if len(items) >= BATCH_LINES or chars >= BATCH_CHARS:
                run(items)
                items = []
                chars = 0
    if items:
        run(items)


class _UnitSink:
    """Collects a unit's examples in memory; spills them to a part file once they exceed `SPILL_TOKENS`."""

    def __init__(self, token_bytes: int, part_path: Path, stats: UnitStats):
        self.token_bytes = token_bytes
        self.typecode = "H" if token_bytes == 2 else "I"
        self.part_path = part_path
        self.stats = stats
        self.tok = array(self.typecode)
        self.len = array("H")
        self.writer: ShardWriter | None = None
        self.examples = 0
        self.text_tokens = 0

    def add(self, a: list[int], b: list[int]) -> None:
        tok = self.tok
        tok.extend(a)
        self.len.append(len(a))
        if b:
            tok.extend(b)
            self.stats.two_segment += 1
        else:
            self.stats.single_segment += 1
        self.len.append(len(b))
        self.examples += 1
        self.text_tokens += len(a) + len(b)
        if len(tok) >= SPILL_TOKENS:
            self._spill()

    def _raw(self) -> tuple[bytes, bytes]:
        t, ln = self.tok, self.len
        if not _LITTLE:  # pragma: no cover - big-endian hosts
            t, ln = array(t.typecode, t), array("H", ln)
            t.byteswap()
            ln.byteswap()
        return t.tobytes(), ln.tobytes()

    def _spill(self) -> None:
        if self.writer is None:
            self.writer = ShardWriter(self.part_path, self.token_bytes)
        self.writer.add_raw(*self._raw())
        self.tok = array(self.typecode)
        self.len = array("H")

    def finish(self) -> tuple[bytes, bytes] | None:
        """The examples as raw bytes, or None when they were spilled to the part file (now closed)."""
        if self.writer is None:
            return self._raw()
        self._spill()
        self.writer.close()
        return None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def process_unit(unit: Unit) -> dict:
    """Pack one unit. Runs in a worker (or in-process for --workers 1).

    Small units come back in memory (``data``: raw token and length bytes); a unit larger than `SPILL_TOKENS`
    tokens is written to its part file (atomically, with a JSON record) so memory stays bounded and a resumed
    build can reuse it.
    """
    cfg: _WorkerConfig = _STATE["cfg"]
    tok: WordPieceTokenizer = _STATE["tok"]
    bin_path, json_path = part_paths(cfg.parts_dir, unit.seq)
    stats = UnitStats()
    builder = ExampleBuilder(cfg.max_seq_length, cfg.segment_rule, random.Random(unit_seed(cfg.seed, unit.key)))
    sink = _UnitSink(cfg.token_bytes, bin_path, stats)
    try:
        pack_unit(unit, tok, builder, cfg.docs == "files", cfg.text_field, stats, sink.add)
        data = sink.finish()
    except BaseException:
        sink.abort()
        raise
    stats.examples = sink.examples
    stats.text_tokens = sink.text_tokens
    stats.tokens = sink.text_tokens + 2 * stats.single_segment + 3 * stats.two_segment
    result = {"seq": unit.seq, "key": unit.key, "stats": stats.to_dict()}
    if data is None:
        result["bytes"] = bin_path.stat().st_size
        write_json_atomic(json_path, result)
    result["data"] = data
    return result


def _load_part(parts_dir: Path, unit: Unit) -> dict | None:
    bin_path, json_path = part_paths(parts_dir, unit.seq)
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
        if info.get("key") != unit.key or bin_path.stat().st_size != info.get("bytes"):
            return None
        ShardReader(bin_path)
        info["data"] = None
        return info
    except (OSError, ValueError, ConvBertError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Main process


def _settings(inputs, vocab_sha, vocab_size, *, seed, max_seq_length, docs, segment_rule, text_field, lower_case,
              strip_accents, shard_tokens, chunk_bytes) -> dict:
    return {
        "inputs": [os.path.abspath(p) for p in inputs],
        "vocab_sha256": vocab_sha,
        "vocab_size": vocab_size,
        "max_seq_length": max_seq_length,
        "docs": docs,
        "segment_rule": segment_rule,
        "seed": seed,
        "text_field": text_field,
        "lower_case": lower_case,
        "strip_accents": strip_accents,
        "shard_tokens": shard_tokens,
        "chunk_bytes": chunk_bytes,
    }


def _usable_workers(workers: int, progress: bool) -> int:
    """At most one worker per CPU this process may use: packing is CPU-bound, so more only add processes (a
    mistyped --workers 10000 would start ten thousand of them). The output is the same for any count."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cpus:
        if progress:
            print(f"build-data: --workers {workers} is more than the {cpus} CPU(s) available: using {cpus}",
                  file=sys.stderr)
        return cpus
    return workers


def _check_args(inputs, workers, max_seq_length, docs, segment_rule) -> None:
    if not inputs:
        raise ConvBertError("inputs: expected at least one path")
    if int(workers) < 1:
        raise ConvBertError(f"--workers: expected at least 1, got {workers}")
    if not 5 <= int(max_seq_length) <= 65535:
        raise ConvBertError(f"--max-seq-length: expected 5..65535, got {max_seq_length}")
    if docs not in DOCS_MODES:
        raise ConvBertError(f"--docs: expected one of {', '.join(DOCS_MODES)}, got {docs!r}")
    if segment_rule not in SEGMENT_RULES:
        raise ConvBertError(f"--segment-rule: expected one of {', '.join(SEGMENT_RULES)}, got {segment_rule!r}")


class _Committer:
    """Appends finished parts, in unit order, into shards; keeps the manifest up to date."""

    def __init__(self, out: Path, manifest: dict, token_bytes: int, shard_tokens: int, enum: UnitEnumerator):
        self.out = out
        self.parts = out / PARTS
        self.manifest = manifest
        self.token_bytes = token_bytes
        self.shard_tokens = shard_tokens
        self.enum = enum
        self.total = UnitStats.from_dict(manifest["counts"])
        self.per_input = [UnitStats.from_dict(d["counts"]) for d in manifest["inputs"]]
        self.units_per_input = [d["units"] for d in manifest["inputs"]]
        self.next_seq = manifest["committed_units"]
        self.writer: ShardWriter | None = None
        self.shard_first = self.next_seq
        self.pending_parts: list[int] = []
        self.tokens_done = 0

    def commit(self, unit: Unit, info: dict) -> None:
        assert unit.seq == self.next_seq
        stats = info["stats"]
        bin_path, _ = part_paths(self.parts, unit.seq)
        if stats["examples"]:
            if self.writer is None:
                name = f"shard-{len(self.manifest['shards']):05d}.bin"
                self.writer = ShardWriter(self.out / name, self.token_bytes)
                self.shard_first = unit.seq
            if info.get("data") is not None:
                self.writer.add_raw(*info["data"])
            else:
                self.writer.add_shard(ShardReader(bin_path))
        self.total.add(stats)
        self.per_input[unit.input_index].add(stats)
        self.units_per_input[unit.input_index] += 1
        if info.get("data") is None:
            self.pending_parts.append(unit.seq)
        self.next_seq += 1
        self.tokens_done += stats["tokens"]
        if self.writer is not None and self.writer.n_tokens >= self.shard_tokens:
            self.close_shard()

    def close_shard(self, final: bool = False) -> None:
        if self.writer is not None:
            w = self.writer
            size = w.close()
            self.manifest["shards"].append({
                "file": w.path.name, "examples": w.n_examples, "text_tokens": w.n_tokens, "bytes": size,
                "sha256": sha256_file(w.path),  # the token bytes have no other check (pretrain and data-stats use it)
                "first_unit": self.shard_first, "last_unit": self.next_seq - 1,
            })
            self.writer = None
        self.checkpoint(final)
        for seq in self.pending_parts:
            for p in part_paths(self.parts, seq):
                p.unlink(missing_ok=True)
        self.pending_parts = []

    def checkpoint(self, final: bool) -> None:
        m = self.manifest
        m["committed_units"] = self.next_seq
        m["complete"] = final
        m["counts"] = self.total.to_dict()
        for i, entry in enumerate(m["inputs"]):
            entry["units"] = self.units_per_input[i]
            entry["counts"] = self.per_input[i].to_dict()
            last = self.enum.last_seq.get(i)
            entry["complete"] = final or (last is not None and last < self.next_seq)
        _fill_totals(m)
        write_json_atomic(self.out / MANIFEST, m)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _fill_totals(m: dict) -> None:
    c = m["counts"]
    shard_bytes = sum(s["bytes"] for s in m["shards"])
    m["bytes_on_disk"] = shard_bytes
    m["examples"] = c["examples"]
    m["tokens"] = c["tokens"]
    m["bytes_per_token"] = round(shard_bytes / c["tokens"], 4) if c["tokens"] else None


def _new_manifest(settings: dict, tok: WordPieceTokenizer, vocab: str, token_bytes: int, inputs,
                  files: list[list[tuple[str, str]]]) -> dict:
    zero = UnitStats().to_dict()
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "settings": settings,
        "vocab": {
            "file": os.path.basename(vocab), "path": os.path.abspath(vocab), "sha256": settings["vocab_sha256"],
            "size": tok.vocab_size,
            "pad_id": tok.pad_id, "unk_id": tok.unk_id, "cls_id": tok.cls_id, "sep_id": tok.sep_id,
            "mask_id": tok.mask_id,
        },
        "token_dtype": "uint16" if token_bytes == 2 else "uint32",
        "max_seq_length": settings["max_seq_length"],
        "shards": [],
        "committed_units": 0,
        "inputs": [{"path": p, "units": 0, "complete": False, "counts": dict(zero)} for p in inputs],
        "input_identity": input_identity(inputs, files),
        "counts": dict(zero),
    }


def input_identity(inputs, files: list[list[tuple[str, str]]]) -> dict[str, list[int]]:
    """Per input path: [files, bytes] of the files the build reads from it (`UnitEnumerator.files`: the same walk,
    so hidden entries, the output folder and earlier datasets are left out here too). A changed corpus is not
    resumed into a dataset built from the old one. No timestamps: a corpus copied or checked out again is the
    same corpus, and the manifest stays reproducible."""
    return {os.path.abspath(p): [len(fs), sum(os.path.getsize(f) for f, _ in fs)] for p, fs in zip(inputs, files)}


def _identity_changes(recorded: dict, fresh: dict) -> list[str]:
    """The inputs whose [files, bytes] differ (older manifests also recorded a newest mtime: not compared)."""
    paths = sorted(set(recorded) | set(fresh))
    return [p for p in paths if (recorded.get(p) or [])[:2] != (fresh.get(p) or [])[:2]]


def _open_output(out: Path, settings: dict, fresh: dict, reads_once: bool = False) -> dict:
    """The manifest to continue: the one in `out` if it was built with the same settings and inputs, else `fresh`.
    `reads_once`: some file is reached twice and read once (older builds read it twice: say so if refused)."""
    mpath = out / MANIFEST
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConvBertError(f"{mpath}: unreadable manifest ({err}); delete the folder to rebuild")
        if old.get("format") != FORMAT or old.get("version") != FORMAT_VERSION:
            raise ConvBertError(f"{mpath}: not a {FORMAT} v{FORMAT_VERSION} manifest; use an empty --output folder")
        if old.get("settings") != settings:
            prev = old.get("settings") or {}
            diffs = [f"{k}: {prev.get(k)!r} -> {v!r}" for k, v in settings.items() if prev.get(k) != v]
            raise ConvBertError(
                f"--output {out} holds a dataset built with different settings ({'; '.join(diffs)}); "
                "use a new folder or delete this one"
            )
        recorded = old.get("input_identity")
        changed = _identity_changes(recorded, fresh.get("input_identity") or {}) if recorded is not None else []
        if changed:
            why = ("; or, if the files did not change, it was built before a file reached twice was read once: "
                   "rebuild it" if reads_once else "")
            raise ConvBertError(
                f"--output {out}: the inputs changed since this dataset was built ({', '.join(changed) or 'the list'}"
                f"){why}; use a new folder or delete this one"
            )
        # Drop shards that went missing or do not match the manifest (and everything after them).
        good = []
        for s in old["shards"]:
            p = out / s["file"]
            if not p.exists() or p.stat().st_size != s["bytes"] or ("sha256" in s and sha256_file(p) != s["sha256"]):
                break
            good.append(s)
        if len(good) != len(old["shards"]):
            raise ConvBertError(
                f"--output {out}: shard {old['shards'][len(good)]['file']} is missing or damaged; "
                "delete the folder and rebuild"
            )
        return old
    if out.exists() and any(p.name != PARTS and not p.name.startswith(".") for p in out.iterdir()):
        raise ConvBertError(f"--output {out}: folder is not empty and holds no {MANIFEST}; expected a new or empty "
                            "folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mpath, fresh)
    return fresh


def _clean_temporaries(out: Path, committed: int) -> None:
    for d in (out, out / PARTS):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
    parts = out / PARTS
    if parts.is_dir():
        for p in parts.iterdir():
            if p.name.startswith("unit-"):
                try:
                    seq = int(p.name[5:13])
                except ValueError:
                    continue
                if seq < committed:
                    p.unlink(missing_ok=True)
    # Shard files not recorded in the manifest (written after its last update) are rebuilt.


class InterruptedBuild(ConvBertError):
    """A build stopped by its machine (a worker killed, a full disk), not by its input: the shards written so far
    are kept for the re-run to continue from."""


def _removes_new_output_on_bad_input(build):
    """Bad input (a `ConvBertError`) leaves nothing behind in an --output folder the call created; a folder that
    already held a partial build is kept, so the build can be resumed, and so is one an interruption stopped."""

    @functools.wraps(build)
    def wrapper(inputs, vocab, output, **options):
        out = Path(output)
        created = not out.exists()
        try:
            return build(inputs, vocab, output, **options)
        except InterruptedBuild:
            raise
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise InterruptedBuild(f"{out}: no space left on the device while writing the dataset; free some "
                                       "and re-run the same command to continue (finished shards are kept)") from None
            raise
        except ConvBertError:
            if created and out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            raise

    return wrapper


@_removes_new_output_on_bad_input
def build_dataset(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    vocab: str,
    output: str,
    *,
    workers: int = 1,
    seed: int = 0,
    max_seq_length: int = 128,
    docs: str = "blank-lines",
    segment_rule: str = "electra",
    text_field: str = "text",
    lower_case: bool = True,
    strip_accents: bool = True,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict:
    """Build (or finish building) a pre-training dataset folder; returns its manifest. `inputs` is a list of
    paths (files, folders, globs), or one path."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    _check_args(inputs, workers, max_seq_length, docs, segment_rule)
    workers = _usable_workers(int(workers), progress)
    inputs = [str(p) for p in inputs]
    tok = WordPieceTokenizer.from_vocab(vocab, lower_case=lower_case, strip_accents=strip_accents)
    token_bytes = token_dtype_for(tok.vocab_size).itemsize
    settings = _settings(
        inputs, sha256_file(vocab), tok.vocab_size, seed=int(seed), max_seq_length=int(max_seq_length), docs=docs,
        segment_rule=segment_rule, text_field=text_field, lower_case=bool(lower_case),
        strip_accents=bool(strip_accents), shard_tokens=int(shard_tokens), chunk_bytes=int(chunk_bytes),
    )
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConvBertError(f"--output {out}: exists and is not a folder")
    enum = UnitEnumerator(inputs, docs=docs, chunk_bytes=chunk_bytes, exclude=out,  # validates the inputs exist
                          skip_files=[vocab])  # (a vocab.txt inside an input folder is not corpus text)
    if enum.repeated:  # a note on what is read, not progress: --no-progress keeps it
        print(f"build-data: note: {len(enum.repeated)} file(s) reached twice (through links or overlapping --input "
              f"arguments) are read once, where first reached (e.g. {enum.repeated[0]} is not read again)",
              file=sys.stderr)
    manifest = _open_output(out, settings, _new_manifest(settings, tok, vocab, token_bytes, inputs, enum.files),
                            reads_once=bool(enum.repeated))
    if manifest.get("complete"):
        if progress:
            print(f"build-data: {out} is already complete ({manifest['examples']} examples); nothing to do",
                  file=sys.stderr)
        return manifest
    # Shards past the manifest's record belong to an interrupted run: they will be rewritten identically.
    for p in out.glob("shard-*.bin"):
        if p.name not in {s["file"] for s in manifest["shards"]}:
            p.unlink()
    committed = manifest["committed_units"]
    _clean_temporaries(out, committed)
    parts = out / PARTS
    parts.mkdir(exist_ok=True)

    cfg = _WorkerConfig(str(vocab), bool(lower_case), bool(strip_accents), int(max_seq_length), segment_rule, docs,
                        text_field, int(seed), token_bytes, str(parts))
    committer = _Committer(out, manifest, token_bytes, int(shard_tokens), enum)
    bar = _Progress(enum, progress)
    pool = None
    if workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, True))
    else:
        _init_worker(cfg, False)
    window = workers + 2
    inflight: dict[int, tuple[Unit, cf.Future]] = {}
    ready: dict[int, tuple[Unit, dict]] = {}

    def drain() -> None:
        while committer.next_seq in ready:
            unit, info = ready.pop(committer.next_seq)
            committer.commit(unit, info)
            bar.committed(unit, info["stats"])

    def collect(block: bool) -> None:
        if not inflight:
            return
        done, _ = cf.wait([f for _, f in inflight.values()], timeout=None if block else 0,
                          return_when=cf.FIRST_COMPLETED)
        for seq in [s for s, (_, f) in inflight.items() if f in done]:
            unit, fut = inflight.pop(seq)
            ready[seq] = (unit, fut.result())

    try:
        for unit in enum:
            if unit.seq < committed:
                bar.skipped(unit)
                continue
            info = _load_part(parts, unit)
            if info is not None:
                ready[unit.seq] = (unit, info)
            elif pool is None:
                ready[unit.seq] = (unit, process_unit(unit))
            else:
                inflight[unit.seq] = (unit, pool.submit(process_unit, unit))
            collect(False)
            drain()
            while len(inflight) + len(ready) >= window:
                collect(True)
                drain()
        while inflight:
            collect(True)
            drain()
        drain()
        if committer.total.examples == 0:
            committer.abort()
            raise ConvBertError(
                f"empty corpus: no text in {', '.join(inputs)} ({committer.total.files} files read, "
                f"{committer.total.binary_skipped} binary files skipped); expected UTF-8 text"
            )
        committer.close_shard(final=True)
        bar.finish()
    except BrokenProcessPool:
        committer.abort()
        raise InterruptedBuild(
            "a worker process died unexpectedly (out of memory or killed); re-run the same command to continue "
            "(finished shards are kept), perhaps with fewer --workers"
        ) from None
    except BaseException:
        committer.abort()
        if pool is not None:
            for _, f in inflight.values():
                f.cancel()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    try:
        parts.rmdir()
    except OSError:
        pass
    return manifest


class _Progress:
    """tqdm bar on stderr: input bytes (for the ETA), files done, tokens/s."""

    def __init__(self, enum: UnitEnumerator, enabled: bool):
        self.enabled = enabled
        self.total_files = enum.total_files
        self.files_done = 0
        self.tokens = 0
        self.t0 = time.monotonic()
        self.bar = None
        if enabled:
            from convbert.utils import progress_bar

            self.bar = progress_bar(total=enum.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                    desc="build-data", smoothing=0.1)

    def skipped(self, unit: Unit) -> None:
        if self.bar is not None:
            self.files_done = unit.file_index
            self.bar.update(unit.weight)

    def committed(self, unit: Unit, stats: dict) -> None:
        self.tokens += stats["tokens"]
        if self.bar is not None:
            self.files_done = unit.file_index
            rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(f"files {self.files_done}/{self.total_files}, {rate:,.0f} tok/s", refresh=False)
            self.bar.update(unit.weight)

    def finish(self) -> None:
        if self.bar is not None:
            rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(f"files {self.total_files}/{self.total_files}, {rate:,.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
