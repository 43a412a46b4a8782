"""GLUE metrics and the two averages (spec §5.4, peers §5.3). All scores are on a 0–100 scale.

* Per task: CoLA MCC; SST-2 accuracy; MRPC accuracy and F1; STS-B Pearson and Spearman; QQP accuracy and F1;
  MNLI matched and mismatched accuracy; QNLI, RTE, WNLI accuracy; AX R3 (Matthews over 3 classes).
* Paper average (ELECTRA/ConvBERT convention): mean of 8 tasks without WNLI, one metric each — CoLA MCC, STS-B
  Spearman, MNLI-m accuracy, accuracy for SST-2, MRPC, QQP, QNLI and RTE.
* Leaderboard average (gluebenchmark.com): mean of 9 tasks including WNLI, a two-metric task counting as the mean of
  its two metrics, MNLI as the mean of m and mm (AX is reported but not averaged).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from convbert.errors import ConvBertError


def _pair(preds, labels, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Both as 1-D arrays of one length: a column vector ([N, 1], what a regression head or a keepdims argmax
    gives) is read as its N values, as scikit-learn does; anything else that is not N values is refused (NumPy
    would broadcast an [N, 1] against an [N] into N x N comparisons and return a wrong score)."""
    p, y = np.asarray(preds, dtype=dtype), np.asarray(labels, dtype=dtype)
    p = p.reshape(-1) if p.ndim == 2 and p.shape[1] == 1 else p
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if p.ndim != 1 or y.ndim != 1 or len(p) != len(y):
        raise ConvBertError(f"metric: predictions of shape {list(p.shape)} and labels of shape {list(y.shape)}: "
                            "expected one value per example for both")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = _pair(preds, labels)
    if len(y) == 0:
        return float("nan")
    return float((p == y).mean() * 100.0)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    p, y = _pair(preds, labels)
    p, y = p == positive, y == positive
    tp = float(np.sum(p & y))
    fp = float(np.sum(p & ~y))
    fn = float(np.sum(~p & y))
    if tp == 0:
        return 0.0
    return 100.0 * 2 * tp / (2 * tp + fp + fn)


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class R_K form, as sklearn) ×100; 0 when undefined."""
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    if len(y) == 0:
        return float("nan")
    k = {c: i for i, c in enumerate(classes)}
    C = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for a, b in zip(y, p):
        C[k[a], k[b]] += 1
    t = C.sum(axis=1)  # true counts per class
    pk = C.sum(axis=0)  # predicted counts
    c = np.trace(C)
    s = C.sum()
    cov_ytyp = c * s - np.dot(t, pk)
    cov_ypyp = s * s - np.dot(pk, pk)
    cov_ytyt = s * s - np.dot(t, t)
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    if denom == 0:
        return 0.0
    return float(100.0 * cov_ytyp / denom)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    x, y = _pair(x, y, np.float64)
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")  # undefined (constant predictions), as scipy and the original say; JSON null
    return float(pearsonr(x, y)[0] * 100.0)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    x, y = _pair(x, y, np.float64)
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")  # undefined (constant predictions), as scipy and the original say; JSON null
    return float(spearmanr(x, y)[0] * 100.0)


# Metric names per task, the first one being the paper's.
TASK_METRICS = {
    "cola": ("mcc",),
    "sst": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "sts": ("spearman", "pearson"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy_m", "accuracy_mm"),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("r3",),
}
PAPER_METRIC = {t: m[0] for t, m in TASK_METRICS.items()}
PAPER_TASKS = ("cola", "sst", "mrpc", "sts", "qqp", "mnli", "qnli", "rte")
LEADERBOARD_TASKS = PAPER_TASKS + ("wnli",)


def classification_metrics(task: str, preds, labels) -> dict[str, float]:
    if task == "cola":
        return {"mcc": matthews(preds, labels), "accuracy": accuracy(preds, labels)}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy(preds, labels), "f1": f1_binary(preds, labels)}
    if task == "ax":
        return {"r3": matthews(preds, labels)}
    return {"accuracy": accuracy(preds, labels)}


def regression_metrics(preds, labels) -> dict[str, float]:
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return {
        "spearman": spearman(p, y),
        "pearson": pearson(p, y),
        "mse": float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
    }


def _defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def paper_average(scores: Mapping[str, Mapping[str, float]]) -> float | None:
    """Mean over the 8 paper tasks of their single paper metric; None if any is missing."""
    vals = [scores.get(t, {}).get(PAPER_METRIC[t]) for t in PAPER_TASKS]
    if not all(_defined(v) for v in vals):
        return None
    return float(sum(vals) / len(vals))


def paper_missing(scores: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The paper tasks without their paper metric (MNLI needs only the matched accuracy here)."""
    return [t for t in PAPER_TASKS if not _defined(scores.get(t, {}).get(PAPER_METRIC[t]))]


def leaderboard_task_score(task: str, metrics: Mapping[str, float]) -> float | None:
    names = TASK_METRICS[task]
    vals = [metrics.get(n) for n in names]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return None
    return float(sum(vals) / len(vals))


def leaderboard_average(scores: Mapping[str, Mapping[str, float]]) -> float | None:
    """Mean over 9 tasks (with WNLI) where two-metric tasks and MNLI m/mm count as their mean; None if incomplete."""
    vals = []
    for t in LEADERBOARD_TASKS:
        s = leaderboard_task_score(t, scores.get(t, {}))
        if s is None:
            return None
        vals.append(s)
    return float(sum(vals) / len(vals))


def missing_for(scores: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> list[str]:
    return [t for t in tasks if leaderboard_task_score(t, scores.get(t, {})) is None]
