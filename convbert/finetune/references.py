"""Published GLUE dev scores to read a run against, task by task.

A 1–4 point gap on one task can be a bug, seed noise or a different recipe: `results.md` shows each task's median
next to a published row of the same kind of model, with the gap in units of the run's own seed spread. Only dev
scores are comparable with what `convbert glue` measures (test scores come from the leaderboard). Each row is the
paper metric of each task (CoLA MCC, STS-B Spearman, MNLI-m accuracy, accuracy elsewhere), ×100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convbert.errors import ConvBertError
from convbert.finetune import metrics as M

if TYPE_CHECKING:  # the CLI's parser reads CHOICES: keep this module free of torch
    from convbert.model.config import ConvBertConfig


@dataclass(frozen=True)
class Reference:
    key: str
    label: str
    source: str
    scores: dict[str, float]  # task -> paper metric, ×100

    @property
    def paper_average(self) -> float:
        return M.paper_average({t: {M.PAPER_METRIC[t]: s} for t, s in self.scores.items()})


def _row(cola, sst, mrpc, sts, qqp, mnli, qnli, rte) -> dict[str, float]:
    return dict(zip(M.PAPER_TASKS, (cola, sst, mrpc, sts, qqp, mnli, qnli, rte)))


REFERENCES = {r.key: r for r in (
    Reference("electra-small-owt", "ELECTRA-Small-OWT (1M steps on OpenWebText with the original code: the recipe "
              "`convbert pretrain --size small` follows)", "google-research/electra README, GLUE dev medians",
              _row(56.8, 88.3, 87.4, 86.8, 88.3, 78.9, 87.9, 68.5)),
    Reference("electra-small", "ELECTRA-Small as released (the \"++\" model: 4M steps, length 512; the hub's "
              "google/electra-small-discriminator)", "google-research/electra README, GLUE dev medians",
              _row(57.0, 91.2, 88.0, 87.5, 89.0, 81.3, 88.4, 66.7)),
    Reference("electra-base", "ELECTRA-Base as released (google/electra-base-discriminator)",
              "google-research/electra README, GLUE dev medians", _row(67.7, 95.1, 89.5, 91.2, 91.5, 88.8, 93.2, 82.7)),
    Reference("convbert-base", "ConvBERT-base, the released weights (YituTech/conv-bert-base) fine-tuned by a "
              "reproduction; not a paper number (the paper reports test scores only)",
              "JunnYu/paddle_convbert README, GLUE dev", _row(69.2, 94.6, 90.4, 90.7, 92.0, 88.1, 93.0, 83.4)),
)}
CHOICES = ("auto", "none") + tuple(REFERENCES)


def choose_reference(name: str, config: "ConvBertConfig") -> Reference | None:
    """`name` from `CHOICES`. "auto": ELECTRA-Small-OWT for the small and medium-small widths (256, 384: the
    same-recipe baseline of spec §6.3), ConvBERT-base's or ELECTRA-Base's released weights at base's 768 (mixed or
    plain attention); none for other sizes (tiny)."""
    if name == "none":
        return None
    if name != "auto":
        if name not in REFERENCES:
            raise ConvBertError(f"--reference {name!r}: expected one of {', '.join(CHOICES)}")
        return REFERENCES[name]
    if config.hidden_size in (256, 384):
        return REFERENCES["electra-small-owt"]
    if config.hidden_size == 768:
        return REFERENCES["convbert-base" if config.attention_type == "mixed" else "electra-base"]
    return None


def compare(summary: dict, ref: Reference) -> dict:
    """Per paper task: our median and its seed std, the reference, the gap, and the gap in stds (None with one seed
    or no spread); plus both paper averages when every task is there."""
    rows = {}
    for task in M.PAPER_TASKS:
        cell = summary["tasks"].get(task, {}).get("metrics", {}).get(M.PAPER_METRIC[task])
        if cell is None or cell["median"] is None or not math.isfinite(cell["median"]):
            continue
        gap = cell["median"] - ref.scores[task]
        spread = cell["std"] if cell["n"] > 1 and cell["std"] > 0 else None
        rows[task] = {"ours": cell["median"], "std": cell["std"], "n": cell["n"], "reference": ref.scores[task],
                      "gap": gap, "gap_in_std": gap / spread if spread else None}
    ours_avg = summary["paper_average"]["of_medians"]
    return {"key": ref.key, "label": ref.label, "source": ref.source, "tasks": rows,
            "paper_average": {"ours": ours_avg, "reference": ref.paper_average,
                              "gap": None if ours_avg is None else ours_avg - ref.paper_average}}
