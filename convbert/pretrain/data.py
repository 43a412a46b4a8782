"""Glue between the data area (`convbert.data`) and the trainer: open a built dataset, its vocab and held-out split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from convbert.errors import ConvBertError

MANIFEST_NAMES = ("manifest.json",)


@dataclass
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int


@dataclass
class DataBundle:
    train: Any  # dataset: len(), example(i) -> dict of numpy arrays
    eval: Any | None
    vocab_path: Path | None
    vocab_size: int
    special: SpecialIds
    max_seq_length: int
    manifest: dict
    holdout: int | None = None  # examples held out of --data for evaluation (None: a separate eval set)
    eval_dir: Path | None = None  # that separate set: --eval-data, or the eval/ (…) folder found inside --data


def read_vocab(path: str | Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read vocab ({err.strerror})") from None


def special_ids_from_vocab(tokens: list[str], source: str = "vocab") -> SpecialIds:
    index: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        index[tok] = i  # a duplicate keeps its last id, like the original loader
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in index]
    if missing:
        raise ConvBertError(f"{source}: missing special token(s) {', '.join(missing)}")
    return SpecialIds(index["[PAD]"], index["[UNK]"], index["[CLS]"], index["[SEP]"], index["[MASK]"])


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    for name in MANIFEST_NAMES:
        p = directory / name
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ConvBertError(f"{p}: line {err.lineno}: not valid JSON ({err.msg})") from None
    return {}


def _find_eval_dir(directory: Path) -> Path | None:
    for name in ("eval", "heldout", "held-out", "valid", "validation", "dev"):
        p = directory / name
        if p.is_dir():
            return p
    return None


def _open_dataset(directory: Path, max_seq_length: int | None):
    try:
        from convbert.data.dataset import PretrainingDataset
    except ImportError as err:  # the data area is missing
        raise ConvBertError(f"cannot open {directory}: convbert.data.dataset is unavailable ({err})") from None
    dataset = PretrainingDataset(directory, max_seq_length=max_seq_length)
    dataset.spot_check()
    return dataset


class DatasetView:
    """A contiguous range of a dataset's examples (the loader only needs len, batch, example and path)."""

    def __init__(self, dataset, start: int, stop: int) -> None:
        self.dataset = dataset
        self.start, self.stop = int(start), int(stop)
        self.path = getattr(dataset, "path", None)
        self.max_seq_length = getattr(dataset, "max_seq_length", None)

    def __len__(self) -> int:
        return self.stop - self.start

    def example(self, i: int):
        if not 0 <= int(i) < len(self):
            raise IndexError(f"example {i} out of range for a view of {len(self)}")
        return self.dataset.example(self.start + int(i))

    __getitem__ = example

    def batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.dataset.batch(idx + self.start)


def base_dataset(ds):
    while isinstance(ds, DatasetView):
        ds = ds.dataset
    return ds


def holdout_size(n: int, eval_examples: int, min_train: int = 1, min_holdout: int = 1) -> int:
    """Examples held out at the end of a dataset without a separate eval split: 2 %, no more than one evaluation
    reads, and at least `min_holdout` (one, so that a small dataset is still evaluated; 0 for a run begun before
    that rule, which held none out of a dataset under 50 examples); never so many that fewer than `min_train` (the
    loader's batch) are left to train on."""
    if eval_examples <= 0:
        return 0
    want = min(eval_examples, max(min_holdout, n // 50))
    return max(0, min(want, n - max(1, min_train)))  # (the rest must still fill a batch)


def _vocab_matches(path: Path, manifest: dict) -> bool:
    want = (manifest.get("vocab") or {}).get("sha256")
    if not want:
        return True
    from convbert.utils import sha256_file

    return sha256_file(path) == want


def find_vocab(directory: Path, manifest: dict, explicit: str | None = None) -> Path | None:
    """The vocab the data was built with: --vocab, <data>/vocab.txt, or the manifest's record (checked by sha256)."""
    if explicit:
        p = Path(explicit)
        if p.is_dir():
            raise ConvBertError(f"--vocab {explicit}: is a folder; expected the vocab.txt file the data was built with")
        if not p.is_file():
            raise ConvBertError(f"--vocab {explicit}: no such file")
        if not _vocab_matches(p, manifest):
            raise ConvBertError(f"--vocab {explicit}: not the vocab {directory} was built with (sha256 differs)")
        return p.resolve()
    candidates = [directory / "vocab.txt"]
    v = manifest.get("vocab") or {}
    for key in ("path", "file"):
        if isinstance(v.get(key), str):
            p = Path(v[key])
            candidates.append(p if p.is_absolute() else directory / p)
            if not p.is_absolute():  # a vocab kept next to the data folder (checked by sha256 below)
                candidates.append(directory.parent / p)
    for c in candidates:
        if c.is_file() and _vocab_matches(c, manifest):
            return c.resolve()
    return None


def recorded_vocab(directory: Path, manifest: dict) -> tuple[str | None, str | None]:
    """(path, sha256) of the vocab the manifest records, whether or not the file is still there: what a run
    keeps when it cannot find the vocab, so `convbert export` can still name and check the right file."""
    v = manifest.get("vocab") or {}
    path = next((v[key] for key in ("path", "file") if isinstance(v.get(key), str)), None)
    if path is not None and not Path(path).is_absolute():
        path = str(directory / path)
    sha = v.get("sha256")
    return path, sha if isinstance(sha, str) else None


def open_data(data: str, eval_data: str | None = None, max_seq_length: int | None = None, *,
              vocab: str | None = None, eval_examples: int = 0, min_train: int = 1,
              min_holdout: int = 1) -> DataBundle:
    """Open --data (and --eval-data, or an eval/ subfolder, or else hold out the last examples of --data)."""
    directory = Path(data)
    if not directory.is_dir():
        raise ConvBertError(f"--data {data}: no such folder (build one with `convbert build-data`)")
    train = _open_dataset(directory, max_seq_length)
    manifest = getattr(train, "manifest", None) or read_manifest(directory)
    if len(train) == 0:
        raise ConvBertError(f"--data {data}: the dataset holds no examples")
    eval_dir = Path(eval_data) if eval_data else _find_eval_dir(directory)
    holdout = None
    if eval_dir is not None:
        eval_ds = _open_dataset(eval_dir, train.max_seq_length)
        ours = (manifest.get("vocab") or {}).get("sha256")
        theirs = ((getattr(eval_ds, "manifest", None) or {}).get("vocab") or {}).get("sha256")
        if int(eval_ds.vocab_size) != int(train.vocab_size) or (ours and theirs and ours != theirs):
            raise ConvBertError(f"--eval-data {eval_dir}: built with another vocab than --data {data} (the manifests' "
                                "vocab hashes differ: its token ids mean other words); rebuild it with --data's vocab")
    else:
        holdout = holdout_size(len(train), eval_examples, min_train, min_holdout)
        eval_ds = DatasetView(train, len(train) - holdout, len(train)) if holdout else None
        train = DatasetView(train, 0, len(train) - holdout) if holdout else train
    base = base_dataset(train)
    special = SpecialIds(int(base.pad_id), int(base.unk_id), int(base.cls_id), int(base.sep_id), int(base.mask_id))
    return DataBundle(train, eval_ds, find_vocab(directory, manifest, vocab), int(base.vocab_size), special,
                      int(base.max_seq_length), manifest, holdout, eval_dir)


def casing(manifest: dict | None) -> dict:
    """How a dataset's text was tokenized, from its manifest's settings (lower-cased and accents stripped where
    they are absent, as every builder version did by default), so an exported model is fine-tuned the same way."""
    settings = (manifest or {}).get("settings") or {}
    lower = bool(settings.get("lower_case", True))
    return {"lower_case": lower, "strip_accents": bool(settings.get("strip_accents", lower)) and lower}


def tokenizer_settings(bundle: DataBundle) -> dict:
    return casing(bundle.manifest)


def data_fingerprint(bundle: DataBundle) -> str | None:
    """What identifies the --data folder's examples wherever it lives: the manifest's shards, counts and vocab,
    and the first 64 KiB of the first shard. A run is not resumed on other data (None: no manifest). The
    held-out split is checked on its own (`eval_holdout_examples`)."""
    manifest = bundle.manifest or {}
    shards = manifest.get("shards")
    if not shards:
        return None
    digest = hashlib.sha256(json.dumps({
        "shards": [[s.get("file"), s.get("examples"), s.get("bytes")] for s in shards],
        "counts": manifest.get("counts"), "vocab": (manifest.get("vocab") or {}).get("sha256"),
    }, sort_keys=True).encode())
    first = getattr(base_dataset(bundle.train), "path", None)
    if first is not None and (Path(first) / shards[0]["file"]).is_file():
        with open(Path(first) / shards[0]["file"], "rb") as f:
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def default_loader_factory(dataset, batch_size: int, seed: int, rank: int, world_size: int):
    from convbert.data.dataset import PretrainingLoader

    return PretrainingLoader(dataset, batch_size, seed, rank=rank, world_size=world_size)


LoaderFactory = Callable[[Any, int, int, int, int], Any]


def collate_examples(dataset, indices) -> dict[str, torch.Tensor]:
    if hasattr(dataset, "batch"):
        b = dataset.batch(np.asarray(list(indices), dtype=np.int64))
        return {k: torch.from_numpy(np.asarray(b[k], dtype=np.int64)) for k in ("input_ids", "input_mask", "segment_ids")}
    rows = [dataset.example(int(i)) for i in indices]
    return {
        key: torch.from_numpy(np.stack([np.asarray(r[key], dtype=np.int64) for r in rows]))
        for key in ("input_ids", "input_mask", "segment_ids")
    }


def sequential_batches(dataset, batch_size: int, max_batches: int | None = None):
    """Fixed-order batches over a (held-out) dataset, for evaluation."""
    n = len(dataset)
    count = 0
    for start in range(0, n, batch_size):
        if max_batches is not None and count >= max_batches:
            return
        yield collate_examples(dataset, range(start, min(n, start + batch_size)))
        count += 1


class InfiniteLoader:
    """Cycles a loader epoch after epoch; `state_dict()` is the wrapped loader's (epoch + position)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._it = None

    def next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise ConvBertError("the training data yields no batch (fewer examples than one batch per rank?)")

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)
        self._it = None
