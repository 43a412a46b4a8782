"""`convbert glue-diagnostic`: AX predictions scored against a labelled diagnostic-full.tsv (R3 per category)."""

from __future__ import annotations

import json
import random

import pytest
from sklearn.metrics import matthews_corrcoef

from convbert.cli import main
from convbert.errors import ConvBertError
from convbert.finetune.diagnostic import read_diagnostic_full, score_diagnostic
from convbert.finetune.submission import write_prediction_file
from convbert.finetune.tasks import read_split
from test_finetune_data import write_glue

HEADER = ("Lexical Semantics\tPredicate-Argument Structure\tLogic\tKnowledge\tDomain\tPremise\tHypothesis\t"
          "Label")
LABELS = ("entailment", "neutral", "contradiction")
TAGS = {0: ["Negation", "Double negation"], 1: ["Coreference"], 2: ["Negation"], 3: ["Common sense"]}


def write_full(path, glue, seed=0):
    """A labelled file for the fixture's AX rows (same sentence pairs, same order), with category tags."""
    rng = random.Random(seed)
    rows, labels = [HEADER], []
    for k, e in enumerate(read_split(glue, "ax", "AX").examples):
        cells = ["", "", "", ""]
        column = k % 4
        cells[column] = ";".join(TAGS[column][: 1 + k % 2])
        label = rng.choice(LABELS)
        labels.append(label)
        rows.append("\t".join(cells + ["Artificial", e.text_a, e.text_b, label]))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return labels


@pytest.fixture()
def fixture(tmp_path):
    glue = write_glue(tmp_path / "glue", n_train=6, n_dev=3)
    labels = write_full(tmp_path / "diagnostic-full.tsv", glue)
    rng = random.Random(1)
    predictions = [y if rng.random() < 0.6 else rng.choice(LABELS) for y in labels]
    write_prediction_file(tmp_path / "AX.tsv", [str(i) for i in range(len(labels))], predictions)
    return tmp_path, glue, labels, predictions


def test_scores_match_sklearn_overall_and_per_category(fixture, capsys):
    root, glue, labels, predictions = fixture
    out = root / "scores.json"
    assert main(["glue-diagnostic", "--predictions", str(root / "AX.tsv"), "--diagnostic-full",
                 str(root / "diagnostic-full.tsv"), "--glue-dir", str(glue), "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["all"]["examples"] == len(labels)
    assert scores["all"]["r3"] == pytest.approx(100 * matthews_corrcoef(labels, predictions))
    # a category's R3 covers the examples tagged with any of its phenomena (rows k with k % 4 == column)
    for column, category in enumerate(("Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge")):
        rows = [k for k in range(len(labels)) if k % 4 == column]
        entry = scores["categories"][category]
        assert entry["examples"] == len(rows)
        if rows:
            want = matthews_corrcoef([labels[k] for k in rows], [predictions[k] for k in rows])
            assert entry["r3"] == pytest.approx(100 * want)
    negation = scores["categories"]["Lexical Semantics"]["phenomena"]["Negation"]
    assert negation["examples"] == len([k for k in range(len(labels)) if k % 4 == 0])
    double = scores["categories"]["Lexical Semantics"]["phenomena"].get("Double negation")
    assert double is None or double["examples"] == len([k for k in range(len(labels)) if k % 4 == 0 and k % 2])
    printed = capsys.readouterr().out
    assert f"| **all** | **{scores['all']['r3']:.1f}** | {len(labels)} |" in printed
    assert f"| · Negation | {negation['r3']:.1f} | {negation['examples']} |" in printed  # a terminal shows no HTML
    assert "&nbsp;" not in printed


def test_a_glue_output_folder_is_read_and_perfect_predictions_score_100(fixture, capsys):
    root, glue, labels, _ = fixture
    (root / "run" / "submission").mkdir(parents=True)
    write_prediction_file(root / "run" / "submission" / "AX.tsv", [str(i) for i in range(len(labels))], labels)
    assert main(["glue-diagnostic", "--predictions", str(root / "run"), "--diagnostic-full",
                 str(root / "diagnostic-full.tsv")]) == 0
    assert "| **all** | **100.0** |" in capsys.readouterr().out


def _relabel_line_3(text: str) -> str:
    lines = text.splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tmaybe"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("Label", "Gold", 1), r"diagnostic-full.tsv:1: expected the diagnostic-full.tsv header"),
    (_relabel_line_3, r"diagnostic-full.tsv:3: label 'maybe' is not one of"),
    (lambda t: t.replace("\tArtificial\t", "\t", 1), r"diagnostic-full.tsv:2: expected 8 tab-separated fields"),
])
def test_a_damaged_label_file_is_named_with_its_line(fixture, damage, message):
    root, _, _, _ = fixture
    path = root / "diagnostic-full.tsv"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ConvBertError, match=message):
        read_diagnostic_full(path)


def test_misaligned_labels_and_short_predictions_are_refused(fixture, capsys):
    root, glue, labels, predictions = fixture
    full = root / "diagnostic-full.tsv"
    lines = full.read_text().splitlines()
    swapped = root / "swapped.tsv"
    swapped.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    rc = main(["glue-diagnostic", "--predictions", str(root / "AX.tsv"), "--diagnostic-full", str(swapped),
               "--glue-dir", str(glue)])
    assert rc != 0
    assert "swapped.tsv:2: this row's premise and hypothesis differ" in capsys.readouterr().err
    write_prediction_file(root / "short.tsv", [str(i) for i in range(len(labels) - 1)], predictions[:-1])
    rc = main(["glue-diagnostic", "--predictions", str(root / "short.tsv"), "--diagnostic-full", str(full)])
    assert rc != 0
    assert f"short.tsv: {len(labels) - 1} predictions but {full} has {len(labels)} examples" in capsys.readouterr().err
    rc = main(["glue-diagnostic", "--predictions", str(root / "glue"), "--diagnostic-full", str(full)])
    assert rc != 0 and "no AX.tsv in it or in its submission/ folder" in capsys.readouterr().err


def test_score_diagnostic_counts_each_phenomenon_once_per_example():
    from convbert.finetune.diagnostic import DiagnosticExample

    examples = [DiagnosticExample("p", "h", y, {"Logic": ["Negation", "Conditionals"]} if k < 3 else {})
                for k, y in enumerate(["entailment", "neutral", "contradiction", "neutral"])]
    scores = score_diagnostic(["entailment", "neutral", "neutral", "neutral"], examples)
    assert scores["categories"]["Logic"]["examples"] == 3
    assert scores["categories"]["Logic"]["phenomena"]["Conditionals"]["examples"] == 3
    assert scores["categories"]["Knowledge"] == {"r3": None, "examples": 0, "phenomena": {}}
    assert scores["accuracy"] == 75.0


def test_r3_of_many_examples_matches_sklearn_per_category_and_phenomenon():
    from convbert.finetune.diagnostic import DiagnosticExample

    rng = random.Random(3)
    phenomena = {"Logic": ["Negation", "Conditionals", "Universal"], "Knowledge": ["Common sense", "World knowledge"]}
    examples, predictions = [], []
    for _ in range(300):
        tags = {c: rng.sample(ts, rng.randint(1, 2)) for c, ts in phenomena.items() if rng.random() < 0.5}
        label = rng.choice(LABELS)
        examples.append(DiagnosticExample("p", "h", label, tags))
        predictions.append(label if rng.random() < 0.5 else rng.choice(LABELS))
    scores = score_diagnostic(predictions, examples)
    for category, tags in phenomena.items():
        rows = [k for k, e in enumerate(examples) if category in e.tags]
        want = matthews_corrcoef([examples[k].label for k in rows], [predictions[k] for k in rows])
        assert scores["categories"][category]["r3"] == pytest.approx(100 * want)
        for tag in tags:
            sub = [k for k in rows if tag in examples[k].tags[category]]
            got = scores["categories"][category]["phenomena"][tag]
            assert got["examples"] == len(sub) > 20
            want = matthews_corrcoef([examples[k].label for k in sub], [predictions[k] for k in sub])
            assert got["r3"] == pytest.approx(100 * want)


def test_sentences_holding_line_separator_characters_and_trailing_spaces_read(fixture, capsys):
    """Lines end at \\n only, as in the GLUE readers: U+2028, \\x1c or \\x85 inside a sentence stay in it, and a
    last line of spaces is blank."""
    root, glue, labels, predictions = fixture
    full = root / "diagnostic-full.tsv"
    lines = full.read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1].replace("\tArtificial\t", "\tArtificial\tA\u2028B\x1cC\x85 ", 1)
    full.write_bytes(("\r\n".join(lines).rstrip("\r\n") + "\r\n   \r\n").encode("utf-8"))
    examples = read_diagnostic_full(full)
    assert len(examples) == len(labels) and examples[0].premise.startswith("A\u2028B\x1cC\x85 ")
    assert [e.label for e in examples] == labels
