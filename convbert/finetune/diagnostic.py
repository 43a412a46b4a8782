"""Score AX (the GLUE diagnostic) locally: R3 overall and per linguistic category.

The GLUE server scores `AX.tsv` against labels that the GLUE folder does not ship. They are published separately
as `diagnostic-full.tsv`: one row per AX example, in AX's order, with the columns

    Lexical Semantics, Predicate-Argument Structure, Logic, Knowledge, Domain, Premise, Hypothesis, Label

where the four category columns hold `;`-separated fine-grained phenomena (or nothing) and `Label` is entailment,
neutral or contradiction. R3 is the Matthews correlation over the three classes (Gorodkin's R_K, as the server
computes it); a category's R3 is taken over the examples tagged with any of its phenomena.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from convbert.errors import ConvBertError
from convbert.finetune.metrics import matthews
from convbert.finetune.submission import check_prediction_file
from convbert.finetune.tasks import find_split_file, read_split

CATEGORIES = ("Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge")
COLUMNS = CATEGORIES + ("Domain", "Premise", "Hypothesis", "Label")
LABELS = ("contradiction", "entailment", "neutral")


@dataclass
class DiagnosticExample:
    premise: str
    hypothesis: str
    label: str
    tags: dict[str, list[str]] = field(default_factory=dict)  # category -> fine-grained phenomena
    domain: str = ""


def read_diagnostic_full(path: str | os.PathLike) -> list[DiagnosticExample]:
    """The labelled diagnostic file, checked: the header, eight fields per row, a known label on every row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConvBertError(f"{path}: not UTF-8 (byte {err.start})") from None
    # Lines end at "\n" (CRLF too), as the GLUE readers take them: str.splitlines would also cut at characters a
    # sentence may hold (U+2028, \x1c, ...). Tab-separated, no quoting.
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    rows = [line.split("\t") if line.strip() else [] for line in lines]
    if not rows or tuple(c.strip() for c in rows[0]) != COLUMNS:
        raise ConvBertError(f"{path}:1: expected the diagnostic-full.tsv header "
                            f"'{chr(9).join(COLUMNS)}' (tab-separated)")
    examples = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise ConvBertError(f"{path}:{line}: expected {len(COLUMNS)} tab-separated fields, found {len(row)}")
        label = row[7].strip()
        if label not in LABELS:
            raise ConvBertError(f"{path}:{line}: label {label!r} is not one of {', '.join(LABELS)}")
        tags = {c: [t.strip() for t in row[i].split(";") if t.strip()] for i, c in enumerate(CATEGORIES)}
        examples.append(DiagnosticExample(row[5], row[6], label, {c: t for c, t in tags.items() if t},
                                          row[4].strip()))
    if not examples:
        raise ConvBertError(f"{path}: no examples after the header")
    return examples


def read_ax_predictions(path: str | os.PathLike, count: int, labels_file: str | os.PathLike | None = None) -> list[str]:
    """AX.tsv's predictions in index order, checked as a submission file with indexes 0..count-1."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "AX.tsv", path / "submission" / "AX.tsv") if p.is_file()]
        if not found:
            raise ConvBertError(f"{path}: no AX.tsv in it or in its submission/ folder (`convbert glue --predict` "
                                "writes OUTPUT/submission/AX.tsv)")
        path = found[0]
    rows = check_prediction_file(path, "AX", None)
    if rows != count:
        raise ConvBertError(f"{path}: {rows} predictions but {labels_file or 'the labelled file'} has {count} "
                            "examples (the AX predictions and diagnostic-full.tsv must cover the same examples)")
    check_prediction_file(path, "AX", [str(i) for i in range(count)])
    return [line.split("\t")[1] for line in path.read_text(encoding="utf-8").splitlines()[1:]]


def check_alignment(examples: list[DiagnosticExample], glue_dir: str | os.PathLike, source: str) -> None:
    """The labelled rows must be AX's rows in AX's order: compare the sentence pairs with the GLUE folder's file."""
    ax = find_split_file(glue_dir, "ax", "AX")
    if ax is None:
        raise ConvBertError(f"{glue_dir}: no diagnostic.tsv (AX) in this GLUE folder to check the labels against")
    pairs = read_split(None, "ax", "AX", path=ax).examples
    if len(pairs) != len(examples):
        raise ConvBertError(f"{source}: {len(examples)} labelled examples but {ax} has {len(pairs)}")
    for k, (a, b) in enumerate(zip(examples, pairs)):
        if (a.premise.strip(), a.hypothesis.strip()) != (b.text_a.strip(), (b.text_b or "").strip()):
            raise ConvBertError(f"{source}:{k + 2}: this row's premise and hypothesis differ from {ax}'s row {k + 2} "
                                "(the labels must be in AX's order)")


def _r3(predictions: list[str], labels: list[str], rows: list[int]) -> dict:
    chosen = [labels[k] for k in rows]
    return {"r3": matthews([predictions[k] for k in rows], chosen) if rows else None, "examples": len(rows)}


def score_diagnostic(predictions: list[str], examples: list[DiagnosticExample]) -> dict:
    """R3 ×100 overall, per coarse category and per fine-grained phenomenon, with the number of examples each."""
    if len(predictions) != len(examples):
        raise ConvBertError(f"{len(predictions)} predictions for {len(examples)} labelled examples")
    labels = [e.label for e in examples]
    every = list(range(len(labels)))
    correct = sum(p == y for p, y in zip(predictions, labels))
    scores = {"all": _r3(predictions, labels, every), "accuracy": 100.0 * correct / len(labels), "categories": {}}
    for category in CATEGORIES:
        tagged = [k for k in every if category in examples[k].tags]
        phenomena = sorted({t for k in tagged for t in examples[k].tags[category]})
        scores["categories"][category] = {
            **_r3(predictions, labels, tagged),
            "phenomena": {t: _r3(predictions, labels, [k for k in tagged if t in examples[k].tags[category]])
                          for t in phenomena},
        }
    return scores


def format_scores(scores: dict) -> str:
    """A markdown table (readable as printed, too): the overall row, each category, and its phenomena marked "·"."""
    def cell(entry):
        return "n/a" if entry["r3"] is None else f"{entry['r3']:.1f}"

    lines = ["| AX (diagnostic) | R3 | Examples |", "| --- | ---: | ---: |",
             f"| **all** | **{cell(scores['all'])}** | {scores['all']['examples']} |"]
    for category, entry in scores["categories"].items():
        lines.append(f"| {category} | {cell(entry)} | {entry['examples']} |")
        for tag, sub in entry["phenomena"].items():
            lines.append(f"| · {tag} | {cell(sub)} | {sub['examples']} |")  # (no HTML: it is printed too)
    lines.append(f"\nAccuracy over all {scores['all']['examples']} examples: {scores['accuracy']:.1f}.")
    return "\n".join(lines)


__all__ = ["CATEGORIES", "DiagnosticExample", "check_alignment", "format_scores", "read_ax_predictions",
           "read_diagnostic_full", "score_diagnostic"]
