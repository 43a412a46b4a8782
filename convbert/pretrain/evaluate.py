"""Held-out pre-training evaluation (spec §3.10, ELECTRA's `do_eval`).

Metrics: `masked_lm_loss`, `masked_lm_accuracy` (argmax of the generator at the weighted slots),
`sampled_masked_lm_accuracy` (the Gumbel sample), `disc_loss`, `disc_auc`, `disc_accuracy`, `disc_precision`,
`disc_recall` (weighted by `input_mask`; a token is predicted "replaced" when its logit is > 0).

The evaluation draws its masks and samples from generators seeded with a fixed seed, so every evaluation of a run
sees the same masks, and it consumes nothing from the training RNG streams (exact resume is unaffected).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from convbert.pretrain.masking import MaskedBatch


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties get half credit); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average ranks over ties (1-based)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    sum_pos = ranks[labels].sum()
    return float((sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class MetricAccumulator:
    def __init__(self) -> None:
        self.mlm_loss_sum = 0.0
        self.mlm_weight = 0.0
        self.mlm_correct = 0.0
        self.sampled_correct = 0.0
        self.disc_loss_sum = 0.0
        self.disc_weight = 0.0
        self.tp = self.fp = self.fn = self.tn = 0.0
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.batches = 0

    @torch.no_grad()
    def update(self, batch: MaskedBatch, out) -> None:
        import torch.nn.functional as F

        self.batches += 1
        w = batch.weights.float()
        logits = out.mlm_logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.target_ids.reshape(-1), reduction="none")
        self.mlm_loss_sum += float((ce * w.reshape(-1)).sum())
        self.mlm_weight += float(w.sum())
        pred = logits.argmax(-1)
        self.mlm_correct += float(((pred == batch.target_ids).float() * w).sum())
        if out.sampled_ids is not None:
            self.sampled_correct += float(((out.sampled_ids == batch.target_ids).float() * w).sum())
        if out.disc_logits is not None:
            m = batch.input_mask.float()
            d = out.disc_logits.float()
            y = out.disc_labels.float()
            bce = F.binary_cross_entropy_with_logits(d, y, reduction="none")
            self.disc_loss_sum += float((bce * m).sum())
            self.disc_weight += float(m.sum())
            p = (d > 0).float()
            self.tp += float((p * y * m).sum())
            self.fp += float((p * (1 - y) * m).sum())
            self.fn += float(((1 - p) * y * m).sum())
            self.tn += float(((1 - p) * (1 - y) * m).sum())
            sel = batch.input_mask.bool()
            self.scores.append(d[sel].cpu().numpy())
            self.labels.append(out.disc_labels[sel].cpu().numpy())

    def result(self) -> dict[str, float]:
        nan = float("nan")
        res = {
            "masked_lm_loss": self.mlm_loss_sum / self.mlm_weight if self.mlm_weight else nan,
            "masked_lm_accuracy": self.mlm_correct / self.mlm_weight if self.mlm_weight else nan,
        }
        if self.disc_weight:
            res["sampled_masked_lm_accuracy"] = self.sampled_correct / self.mlm_weight if self.mlm_weight else nan
            res["disc_loss"] = self.disc_loss_sum / self.disc_weight
            scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
            labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
            res["disc_auc"] = roc_auc(labels, scores)
            res["disc_accuracy"] = (self.tp + self.tn) / self.disc_weight
            res["disc_precision"] = self.tp / (self.tp + self.fp) if (self.tp + self.fp) else 0.0
            res["disc_recall"] = self.tp / (self.tp + self.fn) if (self.tp + self.fn) else 0.0
            res["disc_positive_rate"] = (self.tp + self.fn) / self.disc_weight
        return res


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    mask_fn: Callable[[dict, torch.Generator], MaskedBatch],
    *,
    device: torch.device,
    seed: int = 12345,
    max_batches: int | None = None,
    autocast: Callable | None = None,
) -> dict[str, float]:
    """Run the held-out evaluation; `model` is the bare `ElectraPretrainingModel` (not a DDP wrapper)."""
    was_training = model.training
    model.eval()
    mask_gen = torch.Generator(device="cpu")
    mask_gen.manual_seed(seed)
    sample_gen = torch.Generator(device=device)
    sample_gen.manual_seed(seed + 1)
    acc = MetricAccumulator()
    try:
        for i, raw in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = mask_fn(raw, mask_gen).to(device)
            if autocast is not None:
                with autocast():
                    out = model(batch, sample_generator=sample_gen)
            else:
                out = model(batch, sample_generator=sample_gen)
            acc.update(batch, out)
    finally:
        model.train(was_training)
    res = acc.result()
    res["eval_batches"] = acc.batches
    return res
