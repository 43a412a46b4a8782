"""GLUE test predictions → the 11 submission TSVs and `submission.zip` (spec §5.5, peers §5.2).

Each file: header ``index<TAB>prediction``, one row per test example in the test file's order, ``index`` = the
test file's index column. Values: ``0``/``1`` for CoLA, SST-2, MRPC, QQP, WNLI; ``entailment``/``neutral``/
``contradiction`` for MNLI-m, MNLI-mm and AX; ``entailment``/``not_entailment`` for QNLI and RTE; STS-B a float,
the model's [0, 1]-scale output ×5 clipped to [0, 5], printed with 3 decimals. The zip holds the 11 files at its
top level.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from convbert.errors import ConvBertError
from convbert.finetune.tasks import (
    STANDARD_TEST_SIZES,
    SUBMISSION_FILES,
    SUBMISSION_SOURCE,
    TASKS,
    find_split_file,
    read_split,
)
from convbert.utils import atomic_path, write_text_atomic

HEADER = "index\tprediction"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can store

# Constant predictions used by --fill-missing: majority classes of the GLUE training sets where one dominates,
# "entailment" for the nearly balanced MNLI, QNLI and RTE, and STS-B's mid-scale. A placeholder, not a score.
FILL_CONSTANTS = {
    "CoLA": "1", "SST-2": "1", "MRPC": "1", "QQP": "0", "STS-B": "2.500", "MNLI-m": "entailment",
    "MNLI-mm": "entailment", "QNLI": "entailment", "RTE": "entailment", "WNLI": "0", "AX": "entailment",
}


def submission_task(name: str) -> str:
    """The TaskSpec whose labels a submission file uses (AX uses its own spec, which carries MNLI's labels)."""
    return "ax" if name == "AX" else SUBMISSION_SOURCE[name]


def valid_values(name: str) -> set[str] | None:
    labels = TASKS[submission_task(name)].labels
    return None if labels is None else set(labels)


def format_predictions(task: str, outputs: np.ndarray, scale: float = 5.0) -> list[str]:
    """Logits [N, C] → label strings; regression outputs [N] or [N, 1] → ×scale clipped to [0, 5], 3 decimals."""
    spec = TASKS[task]
    outputs = np.asarray(outputs)
    if spec.is_regression:
        vals = np.clip(outputs.reshape(-1).astype(np.float64) * scale, 0.0, 5.0)
        return [f"{v:.3f}" for v in vals]
    return [spec.labels[int(k)] for k in outputs.argmax(axis=-1)]


def write_prediction_file(path: str | os.PathLike, indexes: Sequence[str], values: Sequence[str]) -> None:
    if len(indexes) != len(values):
        raise ConvBertError(f"{path}: {len(indexes)} indexes but {len(values)} predictions")
    lines = [HEADER] + [f"{i}\t{v}" for i, v in zip(indexes, values)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def test_file_indexes(glue_dir, name: str) -> list[str] | None:
    """Index column of a submission file's test file, or None when the file is absent."""
    task = submission_task(name)
    split = name if name in TASKS[task].test else "test"
    path = find_split_file(glue_dir, task, split) if glue_dir is not None else None
    if path is None:
        return None
    return [e.index for e in read_split(None, task, split, path=path).examples]


def check_prediction_file(path: str | os.PathLike, name: str, expected_indexes: Sequence[str] | None) -> int:
    """Validate one submission TSV (header, values, and indexes against the test file); return its row count."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
    except UnicodeDecodeError as err:
        raise ConvBertError(f"{path}: not UTF-8 (byte {err.start}); the prediction file is damaged")
    if not lines or lines[0] != HEADER:
        raise ConvBertError(f"{path}:1: header must be 'index<TAB>prediction'")
    allowed = valid_values(name)
    got_idx = []
    for ln, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ConvBertError(f"{path}:{ln}: expected 2 tab-separated fields, found {len(parts)}")
        idx, val = parts
        if allowed is not None and val not in allowed:
            raise ConvBertError(f"{path}:{ln}: prediction {val!r} is not one of {', '.join(sorted(allowed))}")
        if allowed is None:
            try:
                v = float(val)
            except ValueError:
                raise ConvBertError(f"{path}:{ln}: STS-B prediction {val!r} is not a number")
            if not 0.0 <= v <= 5.0:
                raise ConvBertError(f"{path}:{ln}: STS-B prediction {v} outside [0, 5]")
        got_idx.append(idx)
    if expected_indexes is not None:
        if len(got_idx) != len(expected_indexes):
            raise ConvBertError(
                f"{path}: {len(got_idx)} predictions but the {name} test file has {len(expected_indexes)} examples"
            )
        for k, (a, b) in enumerate(zip(got_idx, expected_indexes)):
            if a != b:
                raise ConvBertError(f"{path}:{k + 2}: index {a} but the test file's row {k + 1} has index {b}")
    return len(got_idx)


def majority_label(glue_dir, task: str) -> str | None:
    """Most frequent training label (ties: the earlier label in the task's list), or None without a train file."""
    path = find_split_file(glue_dir, task, "train")
    if path is None:
        return None
    labels = TASKS[task].labels
    counts = Counter(e.label for e in read_split(None, task, "train", path=path).examples)
    if not counts:
        return None
    return max(labels, key=lambda l: (counts.get(l, 0), -labels.index(l)))


def build_submission(
    output: str | os.PathLike,
    sources: dict[str, Path | None],
    glue_dir,
    fill_missing: bool = False,
    wnli_majority: bool = True,
    log=print,
) -> Path:
    """Write OUTPUT/submission/<11 files> and OUTPUT/submission.zip.

    `sources[name]` is a finished run's prediction TSV for that file (or None). WNLI is the majority training class
    unless `wnli_majority` is False. A missing file is an error unless `fill_missing`, which writes a constant.
    """
    output = Path(output)
    sub_dir = output / "submission"
    missing = [n for n in SUBMISSION_FILES if sources.get(n) is None and not (n == "WNLI" and wnli_majority)]
    if missing and not fill_missing:
        raise ConvBertError(
            "no predictions for " + ", ".join(missing) + " (run those tasks with --predict, AX comes from mnli; "
            "or pass --fill-missing to fill them with a constant)"
        )
    # Every run's predictions are checked before anything in submission/ is replaced.
    for name in SUBMISSION_FILES:
        src = sources.get(name)
        if src is not None and not (name == "WNLI" and wnli_majority):
            check_prediction_file(src, name, test_file_indexes(glue_dir, name))
    sub_dir.mkdir(parents=True, exist_ok=True)
    notes: dict[str, str] = {}
    for name in SUBMISSION_FILES:
        dest = sub_dir / f"{name}.tsv"
        expected = test_file_indexes(glue_dir, name)
        src = sources.get(name)
        if name == "WNLI" and wnli_majority:
            label = majority_label(glue_dir, "wnli") if glue_dir is not None else None
            if label is None or expected is None:
                if not fill_missing:
                    raise ConvBertError(
                        f"{glue_dir}: WNLI majority class needs WNLI/train.tsv and WNLI/test.tsv (or --fill-missing)"
                    )
            else:
                write_prediction_file(dest, expected, [label] * len(expected))
                notes[name] = f"majority class {label!r} of the training set"
                continue
        if src is not None and not (name == "WNLI" and wnli_majority):
            text = Path(src).read_text(encoding="utf-8")
            write_text_atomic(dest, text)
            notes[name] = f"predicted ({src.parent.name})"
        else:
            const = FILL_CONSTANTS[name]
            if expected is None:
                n = STANDARD_TEST_SIZES[name]
                expected_rows = [str(i) for i in range(n)]
                where = f"no test file found; {n} rows (standard GLUE size), indexes 0..{n - 1}"
            else:
                expected_rows = expected
                where = f"{len(expected)} rows from the test file"
            write_prediction_file(dest, expected_rows, [const] * len(expected_rows))
            notes[name] = f"FILLED with the constant {const!r} ({where}); not a model prediction"
            log(f"--fill-missing: {name}.tsv filled with the constant {const!r} ({where})")
        check_prediction_file(dest, name, expected)
    zpath = output / "submission.zip"
    with atomic_path(zpath) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in SUBMISSION_FILES:  # a fixed date: the same predictions give the same zip, byte for byte
                entry = zipfile.ZipInfo(f"{name}.tsv", date_time=ZIP_DATE)
                entry.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(entry, (sub_dir / f"{name}.tsv").read_bytes())
    lines = ["# GLUE submission", "", "| File | Source |", "| --- | --- |"]
    lines += [f"| {n}.tsv | {notes.get(n, '')} |" for n in SUBMISSION_FILES]
    write_text_atomic(sub_dir.parent / "submission.md", "\n".join(lines) + "\n")
    return zpath
