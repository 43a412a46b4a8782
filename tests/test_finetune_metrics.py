"""GLUE metrics and both averages against hand-computed values (spec §5.4, peers §5.3)."""

import math

import pytest

from convbert.finetune import metrics as M


def test_binary_metrics_by_hand():
    preds = [1, 1, 0, 0, 1]
    gold = [1, 0, 0, 1, 1]
    # TP 2, FP 1, TN 1, FN 1
    assert M.accuracy(preds, gold) == pytest.approx(60.0)
    assert M.f1_binary(preds, gold) == pytest.approx(100 * 4 / 6)
    assert M.matthews(preds, gold) == pytest.approx(100 * (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert M.matthews([1, 1, 1], [0, 1, 1]) == 0.0  # undefined (constant prediction) → 0, like sklearn


def test_three_class_r3_by_hand():
    gold = [0, 1, 2, 0, 1, 2]
    preds = [0, 1, 2, 0, 2, 1]
    # c = 4 correct of s = 6; row and column sums all 2: (4·6 − 12) / sqrt((36 − 12)(36 − 12)) = 0.5
    assert M.classification_metrics("ax", preds, gold) == {"r3": pytest.approx(50.0)}
    from sklearn.metrics import matthews_corrcoef

    assert M.matthews(preds, gold) == pytest.approx(100 * matthews_corrcoef(gold, preds))


def test_correlations_by_hand():
    # Pearson of (1,2,3) and (1,2,4): cov 3 / (sqrt 2 · sqrt(42/9))
    assert M.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(100 * 3 / (math.sqrt(2) * math.sqrt(42 / 9)))
    # Spearman of ranks (1,2,3,4) vs (1,3,2,4): 1 − 6·2 / (4·15) = 0.8
    assert M.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0)
    r = M.regression_metrics([0.2, 0.4, 0.6], [1.0, 2.0, 3.0])
    assert r["spearman"] == pytest.approx(100.0) and r["pearson"] == pytest.approx(100.0)


def test_a_correlation_of_constant_predictions_is_undefined_and_the_summary_counts_it_apart():
    """scipy (and so the original) call it NaN; it used to be 0.0, which entered medians and the seed choice."""
    from convbert.finetune.runner import choose_run, summarize

    assert math.isnan(M.pearson([0.5, 0.5, 0.5], [1.0, 2.0, 3.0]))
    assert math.isnan(M.spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    runs = [{"task": "sts", "seed": 1, "metrics": {"spearman": None, "pearson": None}},  # as read back from JSON
            {"task": "sts", "seed": 2, "metrics": {"spearman": 80.0, "pearson": 81.0}},
            {"task": "sts", "seed": 3, "metrics": {"spearman": 84.0, "pearson": 85.0}}]
    cell = summarize(runs)["tasks"]["sts"]["metrics"]["spearman"]
    assert cell["median"] == 82.0 and cell["n"] == 2 and cell["undefined"] == 1
    assert cell["values"] == [None, 80.0, 84.0]
    assert choose_run(runs, "best", "sts")["seed"] == 3
    assert choose_run(runs[:1], "best", "sts")["seed"] == 1  # the only run is still the one submitted
    alone = summarize(runs[:1])["tasks"]["sts"]["metrics"]["spearman"]
    assert alone["median"] is None and alone["n"] == 0 and alone["undefined"] == 1


def test_task_metric_sets():
    assert set(M.classification_metrics("mrpc", [1, 0], [1, 1])) == {"accuracy", "f1"}
    assert set(M.classification_metrics("qqp", [1, 0], [1, 1])) == {"accuracy", "f1"}
    assert set(M.classification_metrics("cola", [1, 0], [1, 1])) == {"mcc", "accuracy"}
    assert set(M.classification_metrics("rte", [1, 0], [1, 1])) == {"accuracy"}


def _scores(cola, sst, mrpc, sts, qqp, mnli, qnli, rte, wnli=None):
    s = {
        "cola": {"mcc": cola},
        "sst": {"accuracy": sst},
        "mrpc": {"accuracy": mrpc[0], "f1": mrpc[1]},
        "sts": {"pearson": sts[0], "spearman": sts[1]},
        "qqp": {"accuracy": qqp[0], "f1": qqp[1]},
        "mnli": {"accuracy_m": mnli[0], "accuracy_mm": mnli[1]},
        "qnli": {"accuracy": qnli},
        "rte": {"accuracy": rte},
    }
    if wnli is not None:
        s["wnli"] = {"accuracy": wnli}
    return s


def test_paper_average_reproduces_convbert_base():
    # Paper Table 3 row (spec §6.2), one metric each: MRPC accuracy, STS-B Spearman, QQP accuracy, MNLI-m.
    s = _scores(67.8, 95.7, (88.3, 0.0), (0.0, 89.7), (90.0, 0.0), (88.3, 0.0), 93.2, 77.9)
    assert M.paper_average(s) == pytest.approx(86.3625)
    assert M.leaderboard_average(s) is None  # no WNLI
    assert M.missing_for(s, M.LEADERBOARD_TASKS) == ["wnli"]


def test_leaderboard_average_reproduces_bert_base():
    # BERT-Base test (peers §5.3): MRPC F1/acc 88.9/84.8, STS-B 87.1/85.8, QQP F1/acc 71.2/89.2, MNLI 84.6/83.4.
    s = _scores(52.1, 93.5, (84.8, 88.9), (87.1, 85.8), (89.2, 71.2), (84.6, 83.4), 90.5, 66.4, wnli=65.1)
    expected = (52.1 + 93.5 + 86.85 + 86.45 + 80.2 + 84.0 + 90.5 + 66.4 + 65.1) / 9
    assert M.leaderboard_average(s) == pytest.approx(expected)
    assert round(M.leaderboard_average(s), 1) == 78.3
    # The paper average ignores WNLI and the second metrics.
    assert M.paper_average(s) == pytest.approx((52.1 + 93.5 + 84.8 + 85.8 + 89.2 + 84.6 + 90.5 + 66.4) / 8)


def test_the_averages_name_as_missing_only_what_each_needs():
    """The paper average needs MNLI-m alone: without the mismatched dev file it is computed and MNLI is not listed
    as missing for it; the leaderboard average (MNLI as the mean of m and mm) is not computed and names MNLI."""
    s = _scores(67.8, 95.7, (88.3, 0.0), (0.0, 89.7), (90.0, 0.0), (88.3, 0.0), 93.2, 77.9, wnli=65.1)
    s["mnli"] = {"accuracy_m": 88.3, "accuracy_mm": None}
    assert M.paper_average(s) == pytest.approx(86.3625) and M.paper_missing(s) == []
    assert M.leaderboard_average(s) is None and M.missing_for(s, M.LEADERBOARD_TASKS) == ["mnli"]
    del s["rte"]
    assert M.paper_average(s) is None and M.paper_missing(s) == ["rte"]


def test_column_vectors_are_read_as_their_values_and_other_shapes_refused():
    """A regression head's [N, 1] scores, or a keepdims argmax, against [N] labels broadcast to N x N and gave
    silently wrong scores (accuracy 50.2 for 90)."""
    import numpy as np

    from convbert.errors import ConvBertError

    y = np.array([0, 1, 1, 0, 1, 1, 0, 1, 0, 1])
    p = y.copy()
    p[0] = 1
    assert M.accuracy(p[:, None], y) == M.accuracy(p, y) == 90.0
    assert M.f1_binary(p[:, None], y) == M.f1_binary(p, y)
    assert M.matthews(p[:, None], y[:, None]) == M.matthews(p, y)
    s = np.linspace(0, 1, 10)
    assert M.spearman(s[:, None], s ** 2) == pytest.approx(100.0)
    assert M.pearson(s[:, None], 2 * s) == pytest.approx(100.0)
    with pytest.raises(ConvBertError, match=r"predictions of shape \[10, 2\] and labels of shape \[10\]"):
        M.accuracy(np.zeros((10, 2)), y)
    with pytest.raises(ConvBertError, match=r"shape \[9\] and labels of shape \[10\]"):
        M.accuracy(p[:9], y)
