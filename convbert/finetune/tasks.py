"""GLUE task definitions and readers (spec §5.4, peers §5.1).

Both folder layouts are found automatically:

* the standard one left by ``download_glue_data.py``: ``CoLA/ SST-2/ MRPC/ STS-B/ QQP/ MNLI/ QNLI/ RTE/ WNLI/
  diagnostic/diagnostic.tsv``;
* ConvBERT's renamed one: ``cola/ sst/ mrpc/ sts/ qqp/ mnli/ (with diagnostic.tsv inside) qnli/ rte/ wnli/``,
  optionally under ``finetuning_data/``.

Files are read with the csv module, tab delimiter and quoting disabled (sentences hold unbalanced ``"``). A
train/dev row with the wrong number of fields or an unknown label is skipped and counted; a test row that cannot be
read raises `ConvBertError` naming the file and line, because a GLUE submission must be complete.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from convbert.errors import ConvBertError
from convbert.utils import decode_utf8

csv.field_size_limit(1 << 30)


@dataclass(frozen=True)
class SplitSpec:
    """How to read one split file: which columns hold the texts and the label."""

    filename: str
    header: bool
    text_a: int
    text_b: int | None
    label: int | None  # None for test files
    ncols: int | None = None  # expected field count when there is no header (otherwise: the header's)
    index: int | None = None  # test files: the column holding the GLUE index


@dataclass(frozen=True)
class TaskSpec:
    name: str  # our key: cola, sst, mrpc, sts, qqp, mnli, qnli, rte, wnli, ax
    glue_name: str  # the standard directory name
    dir_names: tuple[str, ...]  # directory names searched, standard first
    labels: tuple[str, ...] | None  # None = regression
    train: SplitSpec | None
    dev: dict[str, SplitSpec]  # dev split name -> spec (MNLI: dev_matched, dev_mismatched)
    test: dict[str, SplitSpec]  # submission file stem -> spec
    epochs: int = 3
    double_unordered: bool = False

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def _std(filename, text_a, text_b, label, header=True, ncols=None, index=None):
    return SplitSpec(filename, header, text_a, text_b, label, ncols, index)


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola", "CoLA", ("CoLA", "cola"), ("0", "1"),
        train=_std("train.tsv", 3, None, 1, header=False, ncols=4),
        dev={"dev": _std("dev.tsv", 3, None, 1, header=False, ncols=4)},
        test={"CoLA": _std("test.tsv", 1, None, None, index=0)},
    ),
    "sst": TaskSpec(
        "sst", "SST-2", ("SST-2", "sst", "SST", "sst-2", "sst2"), ("0", "1"),
        train=_std("train.tsv", 0, None, 1),
        dev={"dev": _std("dev.tsv", 0, None, 1)},
        test={"SST-2": _std("test.tsv", 1, None, None, index=0)},
    ),
    "mrpc": TaskSpec(
        "mrpc", "MRPC", ("MRPC", "mrpc"), ("0", "1"),
        train=_std("train.tsv", 3, 4, 0),
        dev={"dev": _std("dev.tsv", 3, 4, 0)},
        test={"MRPC": _std("test.tsv", 3, 4, None, index=0)},
        double_unordered=True,
    ),
    "sts": TaskSpec(
        "sts", "STS-B", ("STS-B", "sts", "STS", "sts-b", "stsb"), None,
        train=_std("train.tsv", -3, -2, -1),
        dev={"dev": _std("dev.tsv", -3, -2, -1)},
        test={"STS-B": _std("test.tsv", -2, -1, None, index=0)},
        epochs=10, double_unordered=True,
    ),
    "qqp": TaskSpec(
        "qqp", "QQP", ("QQP", "qqp"), ("0", "1"),
        train=_std("train.tsv", 3, 4, 5),
        dev={"dev": _std("dev.tsv", 3, 4, 5)},
        test={"QQP": _std("test.tsv", 1, 2, None, index=0)},
    ),
    "mnli": TaskSpec(
        "mnli", "MNLI", ("MNLI", "mnli"), ("contradiction", "entailment", "neutral"),
        train=_std("train.tsv", 8, 9, -1),
        dev={
            "dev_matched": _std("dev_matched.tsv", 8, 9, -1),
            "dev_mismatched": _std("dev_mismatched.tsv", 8, 9, -1),
        },
        test={
            "MNLI-m": _std("test_matched.tsv", 8, 9, None, index=0),
            "MNLI-mm": _std("test_mismatched.tsv", 8, 9, None, index=0),
        },
    ),
    "qnli": TaskSpec(
        "qnli", "QNLI", ("QNLI", "qnli"), ("entailment", "not_entailment"),
        train=_std("train.tsv", 1, 2, 3),
        dev={"dev": _std("dev.tsv", 1, 2, 3)},
        test={"QNLI": _std("test.tsv", 1, 2, None, index=0)},
    ),
    "rte": TaskSpec(
        "rte", "RTE", ("RTE", "rte"), ("entailment", "not_entailment"),
        train=_std("train.tsv", 1, 2, 3),
        dev={"dev": _std("dev.tsv", 1, 2, 3)},
        test={"RTE": _std("test.tsv", 1, 2, None, index=0)},
        epochs=10,
    ),
    "wnli": TaskSpec(
        "wnli", "WNLI", ("WNLI", "wnli"), ("0", "1"),
        train=_std("train.tsv", 1, 2, 3),
        dev={"dev": _std("dev.tsv", 1, 2, 3)},
        test={"WNLI": _std("test.tsv", 1, 2, None, index=0)},
    ),
    # AX has no train/dev: it is predicted by the MNLI model with MNLI's label list.
    "ax": TaskSpec(
        "ax", "diagnostic", ("diagnostic", "mnli", "MNLI", "AX", "ax"), ("contradiction", "entailment", "neutral"),
        train=None, dev={},
        test={"AX": _std("diagnostic.tsv", 1, 2, None, index=0)},
    ),
}

GLUE_TASKS = ("cola", "sst", "mrpc", "sts", "qqp", "mnli", "qnli", "rte", "wnli")
SUBMISSION_FILES = (
    "AX", "CoLA", "MNLI-m", "MNLI-mm", "MRPC", "QNLI", "QQP", "RTE", "SST-2", "STS-B", "WNLI",
)
# Which task's run produces each submission file.
SUBMISSION_SOURCE = {
    "AX": "mnli", "CoLA": "cola", "MNLI-m": "mnli", "MNLI-mm": "mnli", "MRPC": "mrpc", "QNLI": "qnli",
    "QQP": "qqp", "RTE": "rte", "SST-2": "sst", "STS-B": "sts", "WNLI": "wnli",
}
# Standard GLUE test sizes (peers §5.1); used only to size constant fill-ins when a test file is absent.
STANDARD_TEST_SIZES = {
    "CoLA": 1063, "SST-2": 1821, "MRPC": 1725, "STS-B": 1379, "QQP": 390965, "MNLI-m": 9796,
    "MNLI-mm": 9847, "QNLI": 5463, "RTE": 3000, "WNLI": 146, "AX": 1104,
}

# The header names of each GLUE test file's text columns (AX: diagnostic.tsv). `import-tf --task` writes them into
# finetune_task.json, so that `convbert predict` reads a GLUE test file as it is.
TEST_TEXT_COLUMNS = {
    "cola": ("sentence",), "sst": ("sentence",), "mrpc": ("#1 String", "#2 String"),
    "sts": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "ax": ("sentence1", "sentence2"),
}

_ALIASES = {
    "cola": "cola", "sst": "sst", "sst-2": "sst", "sst2": "sst", "mrpc": "mrpc", "sts": "sts", "sts-b": "sts",
    "stsb": "sts", "qqp": "qqp", "mnli": "mnli", "qnli": "qnli", "rte": "rte", "wnli": "wnli", "ax": "ax",
    "diagnostic": "ax",
}


def canonical_task(name: str) -> str:
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise ConvBertError(
            f"unknown GLUE task {name!r} (expected one of cola, sst, mrpc, sts, qqp, mnli, qnli, rte, wnli, ax, all)"
        )
    return key


def parse_task_list(text: str) -> list[str]:
    """'all' or a comma list → canonical names in GLUE order ('ax' kept as its own entry)."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise ConvBertError("--tasks is empty (expected 'all' or a comma list such as cola,sts)")
    chosen: set[str] = set()
    for p in parts:
        if p.lower() == "all":
            chosen.update(GLUE_TASKS)
            chosen.add("ax")
        else:
            chosen.add(canonical_task(p))
    order = list(GLUE_TASKS) + ["ax"]
    return [t for t in order if t in chosen]


def get_task(name: str) -> TaskSpec:
    return TASKS[canonical_task(name)]


@dataclass
class Example:
    eid: int  # 0-based line index minus the header (as in the original)
    text_a: str
    text_b: str | None
    label: str | float | None  # label string, float score, or None (test)
    index: str | None = None  # test files: the GLUE index column


@dataclass
class SplitData:
    path: Path
    examples: list[Example]
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)  # the first few skipped line numbers (1-based)
    first_problem: str = ""  # what was wrong with the first skipped row
    unterminated: bool = False  # the last line has no newline (GLUE's files end with one: cut short?)


def _candidate_roots(glue_dir: Path) -> list[Path]:
    roots = [glue_dir]
    for sub in ("finetuning_data", "glue_data"):
        if (glue_dir / sub).is_dir():
            roots.append(glue_dir / sub)
    return roots


def find_split_file(glue_dir: str | os.PathLike, task: str, split: str) -> Path | None:
    """Path of a task's split file in either layout, or None. `split` is 'train', a dev name or a test stem."""
    spec = get_task(task)
    split_spec = _split_spec(spec, split)
    glue_dir = Path(glue_dir)
    for root in _candidate_roots(glue_dir):
        for d in spec.dir_names:
            p = root / d / split_spec.filename
            if p.is_file():
                return p
    return None


def _split_spec(spec: TaskSpec, split: str) -> SplitSpec:
    if split == "train":
        if spec.train is None:
            raise ConvBertError(f"task {spec.name} has no training split")
        return spec.train
    if split in spec.dev:
        return spec.dev[split]
    if split in spec.test:
        return spec.test[split]
    if split == "test" and len(spec.test) == 1:
        return next(iter(spec.test.values()))
    raise ConvBertError(f"task {spec.name} has no split {split!r}")


def require_split_file(glue_dir: str | os.PathLike, task: str, split: str) -> Path:
    p = find_split_file(glue_dir, task, split)
    if p is None:
        spec = get_task(task)
        fn = _split_spec(spec, split).filename
        dirs = " or ".join(f"{d}/" for d in spec.dir_names[:2])
        raise ConvBertError(
            f"{glue_dir}: no {fn} for task {spec.name} (looked in {dirs} of the standard GLUE layout and ConvBERT's "
            "renamed layout; run `convbert glue-download` or point --glue-dir at the folder holding the task folders)"
        )
    return p


def _read_rows(path: Path) -> tuple[list[tuple[int, list[str], bool]], bool]:
    """(1-based line number, fields, whether a carriage return sits inside the line) per line, tab-separated,
    quoting disabled; and whether the file's last line lacks its newline."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
    text = decode_utf8(raw, path)
    del raw  # (MNLI's train file is 471 MB: each copy of it that is not needed now is let go at once)
    if text.startswith("\ufeff"):
        text = text[1:]
    # Lines end at "\n" only (a CRLF's "\r" is dropped), as the original reads them: a lone "\r" inside a line
    # is then part of that line, and the row is malformed (skipped and counted, or refused in a test file) rather
    # than silently split in two with the line numbers shifted.
    lines = text.split("\n")
    del text
    unterminated = lines[-1] != ""
    if not unterminated:
        lines.pop()
    rows = []
    for i in range(len(lines)):
        line, lines[i] = lines[i], None  # each line freed once split into its fields
        line = line[:-1] if line.endswith("\r") else line
        rows.append((i + 1, line.split("\t") if line else [], "\r" in line))
    return rows, unterminated


def _check_header(path: Path, spec: TaskSpec, sp: SplitSpec, header: list[str]) -> None:
    """A file that should start with a header but starts with an example (its index a number, or its label a
    valid label) lost its header: reading on would silently drop that first example (fatal in a submission)."""
    def field(i: int | None) -> str | None:
        return header[i].strip() if i is not None and i < len(header) else None

    index, label = field(sp.index), field(sp.label)
    found = None
    if index is not None and index.isascii() and index.isdigit():
        found = f"index {index!r}"
    elif label is not None and spec.labels is not None and label in spec.labels:
        found = f"label {label!r}"
    elif label is not None and spec.labels is None:
        try:
            float(label)
            found = f"score {label!r}"
        except ValueError:
            pass
    if found is not None:
        raise ConvBertError(f"{path}:1: expected a header line, found an example ({found}); GLUE's "
                            f"{spec.glue_name} files start with one: restore it (or re-download)")


def _col(row: list[str], i: int) -> str:
    return row[i]


def read_split(
    glue_dir: str | os.PathLike | None,
    task: str,
    split: str,
    path: str | os.PathLike | None = None,
) -> SplitData:
    """Read one split of a GLUE task. Train/dev: malformed rows are skipped and counted; test: they raise."""
    spec = get_task(task)
    sp = _split_spec(spec, split)
    path = Path(path) if path is not None else require_split_file(glue_dir, task, split)
    is_test = sp.label is None
    rows, unterminated = _read_rows(path)
    if sp.header:
        if not rows:
            raise ConvBertError(f"{path}: empty file (expected a header line)")
        if rows[0][1] == []:  # else its 0 fields would become every row's expected count
            raise ConvBertError(f"{path}:{rows[0][0]}: blank line where the header should be (GLUE's "
                                f"{spec.glue_name} files start with one); remove the blank line")
        _check_header(path, spec, sp, rows[0][1])
        ncols = len(rows[0][1])
        body = rows[1:]
    else:
        ncols = sp.ncols
        body = rows
    # Blank lines at the very end of a file are ignored.
    while body and body[-1][1] == []:
        body.pop()
    out = SplitData(path=path, examples=[], unterminated=unterminated and bool(body) and body[-1][1] != [])
    labels = set(spec.labels) if spec.labels is not None else None
    first_line: dict[int | None, int] = {}  # test files: where each index was first seen
    for eid, (line, row, stray_cr) in enumerate(body):
        problem = None
        if stray_cr:
            problem = "a carriage return (\\r) inside the line"
        elif ncols is not None and len(row) != ncols:
            problem = f"expected {ncols} tab-separated fields, found {len(row)}"
        else:
            try:
                text_a = _col(row, sp.text_a)
                text_b = _col(row, sp.text_b) if sp.text_b is not None else None
                label: str | float | None = None
                index = None
                if sp.label is not None:
                    raw_label = _col(row, sp.label).strip()
                    if labels is None:
                        label = float(raw_label)
                        if not 0.0 <= label <= 5.0:  # also refuses nan and inf
                            problem = f"score {raw_label!r} is not a number in [0, 5]"
                    elif raw_label in labels:
                        label = raw_label
                    else:
                        problem = f"label {raw_label!r} is not one of {', '.join(spec.labels)}"
                if sp.index is not None:
                    index = _col(row, sp.index).strip()
                    if not (index.isascii() and index.isdigit()):
                        problem = f"index field {index!r} is not a non-negative integer"
            except IndexError:
                problem = f"too few fields ({len(row)})"
            except ValueError:
                problem = f"label {_col(row, sp.label)!r} is not a number"
        if problem is not None:
            if is_test:
                raise ConvBertError(
                    f"{path}:{line}: unreadable test row ({problem}); a GLUE submission needs every test example"
                )
            out.skipped += 1
            if not out.first_problem:
                out.first_problem = f"line {line}: {problem}"
            if len(out.skipped_lines) < 20:
                out.skipped_lines.append(line)
            continue
        if is_test:
            number = int(index) if index is not None else None  # "1" and "01" are the same example
            if number in first_line:
                raise ConvBertError(f"{path}:{line}: index {index} appears twice (first on line {first_line[number]}); "
                                    "a GLUE test file has unique indexes")
            first_line[number] = line
        out.examples.append(Example(eid, text_a, text_b, label, index))
    return out


def require_examples(data: SplitData, split: str) -> SplitData:
    """A train/dev split whose rows were all malformed is an error naming the file and the first problem."""
    if not data.examples:
        what = f"all {data.skipped} rows are malformed ({data.first_problem})" if data.skipped else "it has no rows"
        raise ConvBertError(f"{data.path}: no usable {split} examples: {what}")
    return data


def find_layout(glue_dir: str | os.PathLike) -> str:
    """'glue' (standard names), 'convbert' (renamed) or 'mixed'/'none' — informational only."""
    glue_dir = Path(glue_dir)
    std = sum((r / TASKS[t].dir_names[0]).is_dir() for r in _candidate_roots(glue_dir) for t in GLUE_TASKS)
    cb = sum((r / t).is_dir() for r in _candidate_roots(glue_dir) for t in GLUE_TASKS)
    if std and not cb:
        return "glue"
    if cb and not std:
        return "convbert"
    return "mixed" if std else "none"
