"""Submission formatting and the checks made against the test files (spec §5.5)."""

from __future__ import annotations

import numpy as np
import pytest

from convbert.errors import ConvBertError
from convbert.finetune.submission import (
    check_prediction_file,
    format_predictions,
    majority_label,
    test_file_indexes as read_test_indexes,
    write_prediction_file,
)
from test_finetune_data import write_glue


def test_label_strings_and_stsb_scaling():
    logits = np.array([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert format_predictions("mnli", logits) == ["entailment", "contradiction", "neutral"]
    assert format_predictions("ax", logits) == ["entailment", "contradiction", "neutral"]
    assert format_predictions("qnli", np.array([[0.0, 1.0]])) == ["not_entailment"]
    assert format_predictions("cola", np.array([[0.0, 1.0], [2.0, 1.0]])) == ["1", "0"]
    # STS-B: [0,1]-scale outputs ×5, clipped to [0, 5], 3 decimals.
    assert format_predictions("sts", np.array([[0.5], [1.3], [-0.2], [0.12345]])) == ["2.500", "5.000", "0.000",
                                                                                     "0.617"]


def test_check_against_the_test_file(tmp_path):
    root = write_glue(tmp_path / "g")
    idx = read_test_indexes(root, "RTE")
    assert idx == ["0", "1", "2", "3"]
    p = tmp_path / "RTE.tsv"
    write_prediction_file(p, idx, ["entailment"] * 4)
    assert p.read_text().splitlines()[0] == "index\tprediction"
    assert check_prediction_file(p, "RTE", idx) == 4
    write_prediction_file(p, idx[:3], ["entailment"] * 3)
    with pytest.raises(ConvBertError, match="3 predictions but the RTE test file has 4"):
        check_prediction_file(p, "RTE", idx)
    write_prediction_file(p, ["0", "2", "1", "3"], ["entailment"] * 4)
    with pytest.raises(ConvBertError, match=r"RTE.tsv:3: index 2"):
        check_prediction_file(p, "RTE", idx)
    write_prediction_file(p, idx, ["entailment", "neutral", "entailment", "entailment"])
    with pytest.raises(ConvBertError, match="'neutral' is not one of"):
        check_prediction_file(p, "RTE", idx)
    s = tmp_path / "STS-B.tsv"
    write_prediction_file(s, ["0"], ["5.5"])
    with pytest.raises(ConvBertError, match="outside"):
        check_prediction_file(s, "STS-B", None)
    assert majority_label(root, "wnli") == "1"
    assert read_test_indexes(root, "AX") == [str(i) for i in range(6)]
