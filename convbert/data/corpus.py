"""Corpus readers: find the input files, cut them into work units, and read units back as lines.

Inputs (each ``--input`` is a file, a folder (searched recursively, hidden entries skipped, sorted) or a glob):

* plain text (any other name): one line = one "sentence"; large files are cut into units of about
  `chunk_bytes` at a line boundary (at a blank line in ``blank-lines`` mode, so no document is split there);
* ``*.gz``: gzip-compressed plain text (one unit);
* ``*.jsonl`` / ``*.ndjson`` (optionally ``.gz``): one JSON object per line, the text in ``--text-field``; every
  record is one "file" (document source);
* ``*.parquet``: a column of documents (``--text-field``), as the HF hub stores corpora (FineWeb, Wikipedia, the
  hub's OpenWebText); every row is one "file" (document source); units are runs of row groups (read with pyarrow,
  the optional ``parquet`` extra);
* ``*.xz`` (not ``.tar.xz``): an OpenWebText sub-archive, i.e. an xz-compressed tar of ``.txt`` documents; one unit;
* ``*.tar``, ``*.tar.xz``, ``*.txz``, ``*.tar.gz``, ``*.tgz``, ``*.tar.bz2``: streamed in order without
  extracting; every nested archive member (e.g. OpenWebText's ``openwebtext/*.xz``) becomes one unit and runs of
  plain members are grouped into units of at most `MEMBERS_PER_UNIT` files.

Archive members with an absolute path, a ``..`` component, or that are links or special files are refused with a
`ConvBertError`. Invalid UTF-8 is replaced with U+FFFD (which the tokenizer then drops) and counted. A file whose
first 8 KiB contain a NUL byte or mostly control bytes is binary: it is skipped and counted.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from convbert.errors import ConvBertError
from convbert.utils import replace_lone_surrogates

SNIFF_BYTES = 8192
READ_BLOCK = 1 << 22
MEMBERS_PER_UNIT = 256
MEMBER_BYTES_PER_UNIT = 1 << 24
DOCS_MODES = ("blank-lines", "files")

TAR_SUFFIXES = (".tar", ".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
NESTED_ARCHIVE_SUFFIXES = (".xz",) + TAR_SUFFIXES


# --------------------------------------------------------------------------------------------------------------
# Counting invalid UTF-8


class _Counter:
    replaced = 0


_COUNTER = _Counter()


def _count_and_replace(err: UnicodeDecodeError):
    _COUNTER.replaced += 1
    return "\ufffd", err.end


codecs.register_error("convbert-count-replace", _count_and_replace)


def decode_text(data: bytes, stats: "UnitStats") -> str:
    """UTF-8 decode; invalid sequences become U+FFFD and are counted in `stats`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        before = _COUNTER.replaced
        text = data.decode("utf-8", errors="convbert-count-replace")
        stats.invalid_utf8 += _COUNTER.replaced - before
        return text


def is_binary(head: bytes) -> bool:
    """NUL bytes, or more than 30 % control bytes other than common whitespace, in the first bytes of a file."""
    if not head:
        return False
    if b"\0" in head:
        return True
    control = sum(1 for c in head if c < 32 and c not in (9, 10, 12, 13, 27, 8))
    return control > 0.3 * len(head)


# --------------------------------------------------------------------------------------------------------------
# Units


@dataclass
class Unit:
    """One independent piece of work. Its examples depend only on its content, the settings and `key`."""

    seq: int
    input_index: int
    file_index: int
    key: str
    kind: str  # text | gzip-text | jsonl | gzip-jsonl | parquet | tar | members | binary
    path: str
    start: int = 0
    end: int | None = None
    payload: bytes | list | None = None
    weight: int = 0
    display: str = ""

    def label(self) -> str:
        return self.display or self.path


@dataclass
class UnitStats:
    files: int = 0  # documents sources read: files, archive members, JSONL records, parquet rows
    lines: int = 0
    examples: int = 0
    tokens: int = 0  # real positions incl. [CLS]/[SEP] (= sum of input_mask)
    text_tokens: int = 0
    single_segment: int = 0
    two_segment: int = 0
    invalid_utf8: int = 0
    files_with_invalid_utf8: int = 0
    binary_skipped: int = 0
    binary_files: list = field(default_factory=list)

    def add(self, other: "UnitStats | dict") -> None:
        d = other if isinstance(other, dict) else other.to_dict()
        for k, v in d.items():
            if k == "binary_files":
                room = 100 - len(self.binary_files)
                if room > 0:
                    self.binary_files.extend(v[:room])
            else:
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UnitStats":
        s = cls()
        for k, v in d.items():
            if hasattr(s, k):
                setattr(s, k, list(v) if isinstance(v, list) else v)
        return s


def _has_suffix(name: str, suffixes) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in suffixes)


def classify(name: str) -> str:
    if _has_suffix(name, JSONL_SUFFIXES):
        return "gzip-jsonl" if name.lower().endswith(".gz") else "jsonl"
    if _has_suffix(name, PARQUET_SUFFIXES):
        return "parquet"
    if _has_suffix(name, TAR_SUFFIXES):
        return "archive"
    if name.lower().endswith(".xz"):
        return "tar"
    if name.lower().endswith(".gz"):
        return "gzip-text"
    return "text"


_GLOB_CHARS = set("*?[")


DATASET_FORMAT = "convbert-pretraining-data"  # `format` in a build-data manifest.json


def is_dataset_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a `convbert build-data` output (its manifest.json names our format)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        with open(manifest, "rb") as f:
            head = f.read(4096)  # "format" is the manifest's first key; a large build's manifest runs to MBs
    except OSError:
        return False
    return re.match(rb'\s*\{\s*"format"\s*:\s*"' + DATASET_FORMAT.encode() + rb'"', head) is not None


def expand_inputs(inputs: list[str], exclude: str | os.PathLike | None = None,
                  repeated: list[str] | None = None, skip_files=()) -> list[list[tuple[str, str]]]:
    """For each input argument: the sorted list of (path, name relative to the argument).

    Folders are walked recursively; `exclude` (the output folder) and earlier datasets inside an input folder
    (their manifest.json is not corpus text) are never entered, and `skip_files` (the vocabulary file being read or
    written) are passed over. A file reached through more than one argument
    (`--input corpus/ 'corpus/*.txt'`) is read once, under the first; the later paths go to `repeated`. An argument
    all of whose files came earlier is an error: it adds nothing, so it is probably not what was meant.
    """
    if not inputs:
        raise ConvBertError("--input: expected at least one file, folder or glob")
    skip = os.path.realpath(exclude) if exclude is not None else None
    passed_over = {os.path.realpath(f) for f in skip_files}
    out = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir() and is_dataset_folder(p):  # its shards and manifest.json are not corpus text
            raise ConvBertError(f"--input {arg}: is a dataset folder written by `convbert build-data` (its shards are "
                                "token ids, not text); give the text it was built from, or use it as "
                                "`convbert pretrain --data`")
        if p.is_dir():
            files = [(path, Path(path).relative_to(p).as_posix()) for path in _walk(p, skip)
                     if os.path.realpath(path) not in passed_over]
            files.sort(key=lambda t: t[1])
            if not files:
                raise ConvBertError(f"--input {arg}: folder contains no files")
            out.append(files)
        elif p.is_file():
            out.append([(str(p), p.name)])
        elif p.exists():
            raise ConvBertError(f"--input {arg}: not a regular file or folder")
        elif _GLOB_CHARS & set(arg):
            found: dict[str, str] = {}  # real path -> the first name it was found under
            seen: set[str] = set()
            for m in sorted(glob.glob(arg, recursive=True)):
                if Path(m).is_file():
                    found.setdefault(os.path.realpath(m), m)
                elif Path(m).is_dir() and _enterable(m, skip, set()):  # a folder the pattern names: read it all
                    for f in _walk(Path(m), skip, seen):
                        real = os.path.realpath(f)
                        if real not in passed_over:
                            found.setdefault(real, f)
            matches = sorted((name, name) for name in found.values())
            if not matches:
                raise ConvBertError(f"--input {arg}: the pattern matches no files")
            out.append(matches)
        else:
            raise ConvBertError(f"--input {arg}: no such file or folder")
    return _read_once(inputs, out, repeated)


def _read_once(inputs: list[str], expanded: list[list[tuple[str, str]]],
               repeated: list[str] | None) -> list[list[tuple[str, str]]]:
    """Each file (by device and inode: links, hard links and overlapping arguments alike) in the first argument that
    reaches it only: packing a text twice would also put copies of it on both sides of the held-out split."""
    first: dict[tuple[int, int], tuple[str, str, str]] = {}  # file -> (argument, path, name) it was first read under
    out = []
    for arg, files in zip(inputs, expanded):
        kept, keys = [], [(st.st_dev, st.st_ino) for st in map(os.stat, (path for path, _ in files))]
        for (path, rel), key in zip(files, keys):
            if key in first:
                _, first_path, first_rel = first[key]
                if classify(rel) != classify(first_rel):  # the name decides how a file is read
                    raise ConvBertError(f"--input {arg}: {path} is the same file as {first_path}, but their names "
                                        f"say to read it as {classify(rel)} and as {classify(first_rel)}; give it "
                                        "once, under a name that says what it holds")
                if repeated is not None:
                    repeated.append(path)
                continue
            first[key] = (arg, path, rel)
            kept.append((path, rel))
        if not kept:
            earlier = sorted({first[key][0] for key in keys})
            raise ConvBertError(f"--input {arg}: every file it names is already read through an earlier --input "
                                f"({', '.join(earlier)}); give each file once")
        out.append(kept)
    return out


def _walk(folder: Path, skip: str | None, seen: set[str] | None = None) -> Iterator[str]:
    """The regular files under `folder`, hidden ones left out, never entering `skip` (the output) or an earlier
    dataset. Linked folders are followed, each real folder once (a link back up would otherwise loop)."""
    seen = set() if seen is None else seen
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _enterable(os.path.join(root, d), skip, seen))
        for n in sorted(names):
            full = Path(root) / n
            if not n.startswith(".") and full.is_file():
                yield str(full)


def _enterable(path: str, skip: str | None, seen: set[str]) -> bool:
    real = os.path.realpath(path)
    return real != skip and real not in seen and not is_dataset_folder(path)


def _find_boundary(f, pos: int, size: int, blank_lines: bool) -> int:
    """First line start at or after `pos` that may start a unit (after a blank line in blank-lines mode)."""
    f.seek(pos)
    # Skip to the next line start.
    if pos > 0:
        f.seek(pos - 1)
        f.readline()
    scanned = 0
    while True:
        line_start = f.tell()
        if line_start >= size:
            return size
        line = f.readline()
        if not blank_lines:
            return line_start
        if not line.strip():
            return f.tell()
        scanned += len(line)
        if scanned > (1 << 24):  # no blank line within 16 MiB: cut at a line boundary
            return f.tell()


class UnitEnumerator:
    """Yields the units of all inputs in a fixed order; records per-input progress as it goes."""

    def __init__(self, inputs: list[str], *, docs: str, chunk_bytes: int, exclude: str | None = None,
                 skip_files=()):
        self.repeated: list[str] = []  # files reached through a second --input: read once, under the first
        self.files = expand_inputs(inputs, exclude, self.repeated, skip_files)
        self.inputs = list(inputs)
        self.docs = docs
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.total_bytes = sum(os.path.getsize(p) for files in self.files for p, _ in files)
        self.total_files = sum(len(files) for files in self.files)
        self.last_seq: dict[int, int] = {}  # input index -> last unit seq (-1 if none); set when it is finished

    def __iter__(self) -> Iterator[Unit]:
        seq = 0
        file_index = 0
        for i, files in enumerate(self.files):
            last = -1
            for path, rel in files:
                for unit in self._file_units(i, file_index, path, rel, seq):
                    yield unit
                    last = seq
                    seq += 1
                file_index += 1
            self.last_seq[i] = last

    def _file_units(self, i: int, fi: int, path: str, rel: str, seq: int) -> Iterator[Unit]:
        kind = classify(rel)
        key = f"{i}:{rel}"
        size = os.path.getsize(path)
        if kind == "archive":
            yield from self._archive_units(i, fi, path, key, seq)
            return
        if kind == "parquet":
            yield from self._parquet_units(i, fi, path, key, seq)
            return
        if kind in ("text", "jsonl"):
            try:
                with open(path, "rb") as f:
                    head = f.read(SNIFF_BYTES)
                    if is_binary(head):
                        yield Unit(seq, i, fi, key, "binary", path, weight=size)
                        return
                    if size <= self.chunk_bytes:
                        yield Unit(seq, i, fi, key, kind, path, 0, size, weight=size)
                        return
                    start = 0
                    n = 0
                    blank = kind == "text" and self.docs == "blank-lines"
                    while start < size:
                        end = _find_boundary(f, min(size, start + self.chunk_bytes), size, blank)
                        if end <= start:
                            end = size
                        yield Unit(seq, i, fi, f"{key}@{n}", kind, path, start, end, weight=end - start,
                                   display=f"{path} (bytes {start}-{end})")
                        seq += 1
                        n += 1
                        start = end
            except OSError as err:
                raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
            return
        yield Unit(seq, i, fi, key, kind, path, weight=size)

    def _parquet_units(self, i: int, fi: int, path: str, key: str, seq: int) -> Iterator[Unit]:
        """Runs of whole row groups of about `chunk_bytes` on disk: row groups [start, end) of the file. The weights
        (progress) add up to the file's size, footer included."""
        sizes = [sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
                 for meta in _parquet_row_groups(path)]
        left = os.path.getsize(path)
        start = n = 0
        while start < len(sizes):
            end, total = start, 0
            while end < len(sizes) and (end == start or total + sizes[end] <= self.chunk_bytes):
                total += sizes[end]
                end += 1
            weight = left if end == len(sizes) else min(total, left)
            left -= weight
            yield Unit(seq, i, fi, f"{key}@{n}", "parquet", path, start, end, weight=weight,
                       display=f"{path} (row groups {start}-{end - 1})")
            seq += 1
            n += 1
            start = end

    def _archive_units(self, i: int, fi: int, path: str, key: str, seq: int) -> Iterator[Unit]:
        group: list[tuple[str, bytes]] = []
        group_bytes = 0
        counting = _PositionReader(path)
        last_pos = 0

        def flush():
            nonlocal group, group_bytes, seq, last_pos
            unit = Unit(seq, i, fi, f"{key}!{group[0][0]}", "members", path, payload=group,
                        weight=counting.pos - last_pos, display=f"{path}!{group[0][0]}")
            last_pos = counting.pos
            group, group_bytes = [], 0
            seq += 1
            return unit

        try:
            with open_tar_stream(None, fileobj=counting) as tar:
                last = None
                for member in tar:
                    tar.members = []  # stream mode would otherwise keep every member's header in memory
                    last = member.name
                    if not check_member(path, member):
                        continue
                    data = _read_member(tar, member, path)
                    if _has_suffix(member.name, NESTED_ARCHIVE_SUFFIXES):
                        if group:
                            yield flush()
                        yield Unit(seq, i, fi, f"{key}!{member.name}", "tar", path, payload=data,
                                   weight=counting.pos - last_pos, display=f"{path}!{member.name}")
                        last_pos = counting.pos
                        seq += 1
                    else:
                        group.append((member.name, data))
                        group_bytes += len(data)
                        if len(group) >= MEMBERS_PER_UNIT or group_bytes >= MEMBER_BYTES_PER_UNIT:
                            yield flush()
                check_tar_end(tar, path, last)  # before the last group: a cut archive yields nothing more
                if group:
                    yield flush()
        except ConvBertError:  # an unsafe or unreadable member, already named (and itself a ValueError)
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error) as err:
            if isinstance(err, OSError) and not isinstance(err, (tarfile.TarError,)) and err.errno is not None:
                raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
            raise ConvBertError(f"{path}: not a readable tar archive ({err}); expected e.g. openwebtext.tar.xz")
        finally:
            counting.close()


class _EndMarkingTarInfo(tarfile.TarInfo):
    """Records on the TarFile when the archive's end-of-archive block (all zeros) was read. Stream-mode tarfile stops
    without an error at a header cut short or garbled after the first member (an interrupted download): only this
    mark tells a complete archive from one that ended early."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.convbert_reached_end = True
            raise


def open_tar_stream(source, **kwargs) -> tarfile.TarFile:
    """`tarfile.open(..., mode="r|*")` whose end can be checked with `check_tar_end`."""
    tar = tarfile.open(source, mode="r|*", tarinfo=_EndMarkingTarInfo, **kwargs)
    tar.convbert_reached_end = False
    return tar


def check_tar_end(tar: tarfile.TarFile, label: str, last_member: str | None) -> None:
    if not tar.convbert_reached_end:
        after = f" after member {last_member!r}" if last_member else ""
        raise ConvBertError(f"{label}: the tar archive ends early{after} (no end-of-archive block): truncated or "
                            "damaged, e.g. an interrupted download; fetch it again")


class _PositionReader(io.RawIOBase):
    """A file reader that remembers how many compressed bytes were consumed (for the progress bar)."""

    def __init__(self, path: str):
        self._f = open(path, "rb")
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self.pos += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def check_member(archive: str, member: tarfile.TarInfo) -> bool:
    """Refuse unsafe members; return True for a regular file to read, False for a folder entry."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ConvBertError(f"{archive}: member {name!r} has an absolute path; refusing the archive "
                            "(expected relative member names)")
    if ".." in parts:
        raise ConvBertError(f"{archive}: member {name!r} contains '..'; refusing the archive "
                            "(expected members inside the archive's own folder)")
    if member.issym() or member.islnk():
        raise ConvBertError(f"{archive}: member {name!r} is a link; refusing the archive (expected regular files)")
    if member.isdir():
        return False
    if not member.isfile():
        raise ConvBertError(f"{archive}: member {name!r} is a device/FIFO/special file; refusing the archive "
                            "(expected regular files)")
    return True


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: str) -> bytes:
    f = tar.extractfile(member)
    if f is None:  # pragma: no cover - check_member filters these
        raise ConvBertError(f"{archive}: member {member.name!r} cannot be read")
    return f.read()


# --------------------------------------------------------------------------------------------------------------
# Reading a unit back: a stream of "files", each a list of blocks of lines.
#
# `read_unit` yields items for the packer: a `str` (one line, not yet stripped) or `None` (end of a file).


def read_unit(unit: Unit, text_field: str, stats: UnitStats) -> Iterator[list]:
    """Yield lists of items: lines (str) and None at the end of each file / member / record."""
    kind = unit.kind
    if kind == "binary":
        stats.binary_skipped += 1
        stats.binary_files.append(unit.path)
        return
    if kind == "text":
        yield from _text_blocks(unit, stats)
    elif kind == "gzip-text":
        yield from _gzip_text_blocks(unit, stats)
    elif kind in ("jsonl", "gzip-jsonl"):
        yield from _jsonl_blocks(unit, text_field, stats)
    elif kind == "parquet":
        yield from _parquet_blocks(unit, text_field, stats)
    elif kind == "tar":
        yield from _tar_blocks(unit, stats)
    elif kind == "members":
        for name, data in unit.payload:
            yield from _bytes_document(data, f"{unit.path}!{name}", stats)
    else:  # pragma: no cover
        raise ConvBertError(f"{unit.label()}: unknown unit kind {kind}")


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _note_invalid(stats: UnitStats, before: int) -> None:
    if stats.invalid_utf8 > before:
        stats.files_with_invalid_utf8 += 1


def _iter_byte_blocks(f, length: int | None) -> Iterator[bytes]:
    """Blocks of whole lines (each ends at a newline, except possibly the last) from a binary stream."""
    rest = b""
    left = length
    while True:
        n = READ_BLOCK if left is None else min(READ_BLOCK, left)
        buf = f.read(n) if n > 0 else b""
        if left is not None:
            left -= len(buf)
        if not buf:
            if rest:
                yield rest
            return
        buf = rest + buf
        cut = buf.rfind(b"\n")
        if cut < 0:
            rest = buf
            continue
        rest = buf[cut + 1 :]
        yield buf[: cut + 1]


def _text_stream(f, length: int | None, stats: UnitStats, first_part: bool = True) -> Iterator[list]:
    """`first_part`: the unit starts the file (a large file is read in several units; it counts as one file)."""
    before = stats.invalid_utf8
    stats.files += 1 if first_part else 0
    for block in _iter_byte_blocks(f, length):
        lines = _split_lines(decode_text(block, stats))
        stats.lines += len(lines)
        yield lines
    _note_invalid(stats, before)
    yield [None]


def _text_blocks(unit: Unit, stats: UnitStats) -> Iterator[list]:
    try:
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            yield from _text_stream(f, (unit.end if unit.end is not None else os.path.getsize(unit.path)) - unit.start,
                                    stats, first_part=unit.start == 0)
    except OSError as err:
        raise ConvBertError(f"{unit.path}: cannot read ({err.strerror or err})")


def _gzip_text_blocks(unit: Unit, stats: UnitStats) -> Iterator[list]:
    try:
        with gzip.open(unit.path, "rb") as f:
            head = f.peek(SNIFF_BYTES)[:SNIFF_BYTES] if hasattr(f, "peek") else b""
            if is_binary(head):
                stats.binary_skipped += 1
                stats.binary_files.append(unit.path)
                return
            yield from _text_stream(f, None, stats)
    except (OSError, EOFError, zlib.error) as err:
        raise ConvBertError(f"{unit.path}: not a readable gzip file ({err})")


def _bytes_document(data: bytes, name: str, stats: UnitStats) -> Iterator[list]:
    if is_binary(data[:SNIFF_BYTES]):
        stats.binary_skipped += 1
        stats.binary_files.append(name)
        return
    before = stats.invalid_utf8
    lines = _split_lines(decode_text(data, stats))
    _note_invalid(stats, before)
    stats.files += 1
    stats.lines += len(lines)
    lines.append(None)
    yield lines


def _tar_blocks(unit: Unit, stats: UnitStats) -> Iterator[list]:
    src = unit.payload if unit.payload is not None else None
    label = unit.label()
    try:
        tar = open_tar_stream(None, fileobj=io.BytesIO(src)) if src is not None else open_tar_stream(unit.path)
        with tar:
            last = None
            for member in tar:
                tar.members = []
                last = member.name
                if not check_member(label, member):
                    continue
                data = _read_member(tar, member, label)
                yield from _bytes_document(data, f"{label}!{member.name}", stats)
            check_tar_end(tar, label, last)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as err:
        if isinstance(err, OSError) and not isinstance(err, tarfile.TarError) and err.errno is not None:
            raise ConvBertError(f"{label}: cannot read ({err.strerror or err})")
        raise ConvBertError(f"{label}: not a readable tar archive ({err}); expected an OpenWebText sub-archive "
                            "(an xz-compressed tar of .txt files)")


def _jsonl_blocks(unit: Unit, text_field: str, stats: UnitStats) -> Iterator[list]:
    path = unit.path
    try:
        if unit.kind == "gzip-jsonl":
            f = gzip.open(path, "rb")
            length = None
        else:
            f = open(path, "rb")
            f.seek(unit.start)
            length = (unit.end if unit.end is not None else os.path.getsize(path)) - unit.start
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
    lineno = 0
    try:
        with f:
            before = stats.invalid_utf8
            for block in _iter_byte_blocks(f, length):
                items: list = []
                for raw in _split_lines(decode_text(block, stats)):
                    lineno += 1
                    if lineno == 1 and raw.startswith("\ufeff"):  # a byte-order mark some editors write
                        raw = raw[1:]
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as err:
                        raise ConvBertError(
                            f"{path}:{_abs_line(unit, lineno)}: invalid JSON ({err.msg} at column {err.colno}); "
                            "expected one JSON object per line"
                        )
                    if not isinstance(obj, dict):
                        raise ConvBertError(f"{path}:{_abs_line(unit, lineno)}: expected a JSON object, got "
                                            f"{_json_kind(obj)}")
                    if text_field not in obj:
                        fields = ", ".join(list(obj)[:8]) or "none"
                        raise ConvBertError(f"{path}:{_abs_line(unit, lineno)}: no field {text_field!r} "
                                            f"(fields: {fields}); choose one with --text-field")
                    text = obj[text_field]
                    if not isinstance(text, str):
                        raise ConvBertError(f"{path}:{_abs_line(unit, lineno)}: field {text_field!r} is "
                                            f"{_json_kind(text)}, expected a string")
                    text, replaced = replace_lone_surrogates(text)  # \ud800-style escapes
                    stats.invalid_utf8 += replaced
                    lines = _split_lines(text)
                    stats.files += 1
                    stats.lines += len(lines)
                    items.extend(lines)
                    items.append(None)
                if items:
                    yield items
            _note_invalid(stats, before)
    except (OSError, EOFError, zlib.error) as err:
        raise ConvBertError(f"{path}: not readable ({err})")


def _pyarrow():
    """(pyarrow, pyarrow.parquet), or a one-line error saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvBertError("reading .parquet files needs pyarrow: pip install 'convbert[parquet]' (or pyarrow)") \
            from None
    return pa, pq


def _open_parquet(path: str):
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ConvBertError(f"{path}: not a readable parquet file ({err})") from None


def _parquet_row_groups(path: str) -> list:
    meta = _open_parquet(path).metadata
    return [meta.row_group(g) for g in range(meta.num_row_groups)]


def _is_text_type(pa, kind) -> bool:
    """string, large_string, string_view, or a dictionary-encoded one of those (as pandas' categoricals save)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind))


def _parquet_blocks(unit: Unit, text_field: str, stats: UnitStats) -> Iterator[list]:
    """One block per row group: each row's `text_field` is one document."""
    pa, _ = _pyarrow()
    path = unit.path
    pf = _open_parquet(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ConvBertError(f"{path}: no column {text_field!r} (columns: {', '.join(names[:8]) or 'none'}); "
                            "choose one with --text-field")
    kind = pf.schema_arrow.field(text_field).type
    if not _is_text_type(pa, kind):
        raise ConvBertError(f"{path}: column {text_field!r} holds {kind}, expected strings")
    first_row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    for g in range(unit.start, unit.end):
        try:
            texts = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        except (OSError, pa.ArrowException) as err:
            raise ConvBertError(f"{path}: row group {g} is not readable (truncated or corrupt file?): {err}") from None
        items: list = []
        for k, text in enumerate(texts):
            if text is None:
                raise ConvBertError(f"{path}: row {first_row + k} (counting from 0): column {text_field!r} is null, "
                                    "expected a string")
            lines = _split_lines(text)
            stats.files += 1
            stats.lines += len(lines)
            items.extend(lines)
            items.append(None)
        first_row += len(texts)
        if items:
            yield items


def _abs_line(unit: Unit, lineno: int) -> int:
    """Line number in the whole file (units of a large file start mid-file)."""
    if unit.kind != "jsonl" or unit.start == 0:
        return lineno
    with open(unit.path, "rb") as f:
        before = 0
        left = unit.start
        while left > 0:
            buf = f.read(min(READ_BLOCK, left))
            if not buf:
                break
            before += buf.count(b"\n")
            left -= len(buf)
    return before + lineno


def iter_lines(inputs: list[str], text_field: str = "text", docs: str = "blank-lines",
               skip_files=()) -> Iterator[str]:
    """All non-blank lines of the corpus, in order (used to train a vocabulary); `skip_files` as `expand_inputs`."""
    stats = UnitStats()
    for unit in UnitEnumerator(inputs, docs=docs, chunk_bytes=1 << 62, skip_files=skip_files):
        for block in read_unit(unit, text_field, stats):
            for line in block:
                if line is not None:
                    line = line.strip()
                    if line:
                        yield line


def _json_kind(value) -> str:
    """A JSON value's kind in JSON's words (null, not NoneType)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "int", float: "a number", list: "a list", dict: "an object", str: "a string"}.get(type(value),
                                                                                               type(value).__name__)
