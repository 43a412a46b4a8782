"""Data building (raw text / OpenWebText / JSONL → WordPiece → packed shards) and reading (spec §4).

See docs/data.md. Heavy modules are imported lazily so `import convbert.data` stays cheap.
"""

from __future__ import annotations

from convbert.data.tokenize import WordPieceTokenizer

__all__ = [
    "WordPieceTokenizer",
    "ExampleBuilder",
    "PretrainingDataset",
    "PretrainingLoader",
    "build_dataset",
    "train_vocab",
    "data_stats",
]


def __getattr__(name: str):
    if name == "build_dataset":
        from convbert.data.build import build_dataset

        return build_dataset
    if name == "train_vocab":
        from convbert.data.vocab import train_vocab

        return train_vocab
    if name in ("PretrainingDataset", "PretrainingLoader"):
        from convbert.data import dataset

        return getattr(dataset, name)
    if name == "ExampleBuilder":
        from convbert.data.packing import ExampleBuilder

        return ExampleBuilder
    if name == "data_stats":
        from convbert.data.stats import data_stats

        return data_stats
    raise AttributeError(f"module 'convbert.data' has no attribute {name!r}")
