"""Featurisation for sentence(-pair) tasks (spec §5.4).

``[CLS] a [SEP]`` (segment 0), then ``b [SEP]`` (segment 1) for pairs. Pairs are truncated by dropping the last
token of the longer side (of b when both are equally long) until the total fits in max_seq_length − 3; singles are
cut to max_seq_length − 2. Sequences are zero-padded to max_seq_length (fixed padding, the faithful default: the
convolution branch sees padding, so outputs depend on the pad length), or to the longest in the batch when
``pad_to_max=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from convbert.errors import ConvBertError


def truncate_pair(a: list[int], b: list[int], max_total: int) -> tuple[list[int], list[int]]:
    """Pop from the longer list (b on ties) until len(a) + len(b) <= max_total."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_total:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def build_ids(a: list[int], b: list[int] | None, cls_id: int, sep_id: int, max_seq_length: int):
    """(input_ids, token_type_ids) for one example, truncated as in the original. An empty second text (no
    tokens: e.g. QQP's two empty questions) makes a single-segment example, as the original's `if tokens_b:`."""
    if max_seq_length < 4:
        raise ConvBertError(f"--max-seq-length must be at least 4, got {max_seq_length}")
    if not b:
        a = list(a)[: max_seq_length - 2]
        ids = [cls_id] + a + [sep_id]
        types = [0] * len(ids)
    else:
        a, b = truncate_pair(a, b, max_seq_length - 3)
        ids = [cls_id] + a + [sep_id]
        types = [0] * len(ids)
        if b:  # (truncation can empty it at max_seq_length 4: the original then adds no second [SEP] either)
            ids += b + [sep_id]
            types += [1] * (len(b) + 1)
    return ids, types


@dataclass
class Features:
    input_ids: np.ndarray  # [N, T] int32 (batches are int64 tensors)
    attention_mask: np.ndarray  # [N, T] int8
    token_type_ids: np.ndarray  # [N, T] int8
    labels: np.ndarray  # [N] int64 (classification) or float32 (regression)
    lengths: np.ndarray  # [N] real lengths

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Sequence[int] | np.ndarray, pad_to_max: bool = True) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        T = self.input_ids.shape[1] if pad_to_max else max(1, int(self.lengths[idx].max()))
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx, :T].astype(np.int64)),
            "attention_mask": torch.from_numpy(self.attention_mask[idx, :T].astype(np.int64)),
            "token_type_ids": torch.from_numpy(self.token_type_ids[idx, :T].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[idx]),
        }


def featurize(
    texts_a: Sequence[str],
    texts_b: Sequence[str] | None,
    labels: Sequence,
    tokenizer,
    max_seq_length: int,
    label_list: Sequence[str] | None,
    regression_scale: float = 5.0,
) -> Features:
    """Tokenise and pack examples. Classification labels map through `label_list` (None → first label, the
    original's dummy for test rows); regression labels are divided by `regression_scale` (None → 0.0)."""
    if isinstance(texts_a, str) or isinstance(texts_b, str):
        raise ConvBertError("featurize: texts_a and texts_b are sequences of texts, not one string")
    n = len(texts_a)
    for name, other in (("texts_b", texts_b), ("labels", labels)):
        if other is not None and len(other) != n:
            raise ConvBertError(f"featurize: {len(other)} {name} for {n} texts_a: expected one per example")
    enc_a = tokenizer.encode_batch(list(texts_a)) if n else []
    enc_b = tokenizer.encode_batch(list(texts_b)) if (texts_b is not None and n) else None
    T = max_seq_length
    input_ids = np.full((n, T), tokenizer.pad_id, dtype=np.int32)
    type_ids = np.zeros((n, T), dtype=np.int8)
    mask = np.zeros((n, T), dtype=np.int8)
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        ids, types = build_ids(
            enc_a[i], enc_b[i] if enc_b is not None else None, tokenizer.cls_id, tokenizer.sep_id, T
        )
        L = len(ids)
        input_ids[i, :L] = ids
        type_ids[i, :L] = types
        mask[i, :L] = 1
        lengths[i] = L
    if label_list is None:
        y = np.array([0.0 if l is None else _regression_target(i, l) / regression_scale for i, l in enumerate(labels)],
                     dtype=np.float32)
    else:
        index = {l: k for k, l in enumerate(label_list)}
        unknown = next(((i, l) for i, l in enumerate(labels) if l is not None and l not in index), None)
        if unknown is not None:
            i, l = unknown
            raise ConvBertError(f"featurize: label {l!r} of example {i} is not in label_list {list(label_list)!r}"
                                + (" (labels are compared as given: 1 is not '1')"
                                   if str(l) in map(str, label_list) else ""))
        y = np.array([0 if l is None else index[l] for l in labels], dtype=np.int64)
    return Features(input_ids, mask, type_ids, y, lengths)


def _regression_target(i: int, label) -> float:
    try:
        value = float(label)
    except (TypeError, ValueError):
        raise ConvBertError(f"featurize: label {label!r} of example {i} is not a number (label_list=None means "
                            "regression; pass label_list for classes)") from None
    if not np.isfinite(value):
        raise ConvBertError(f"featurize: label {label!r} of example {i}: expected a finite regression target")
    return value


def featurize_examples(examples, tokenizer, max_seq_length: int, label_list, regression_scale: float = 5.0):
    """Featurise `tasks.Example`s (pairs when any has text_b)."""
    pair = any(e.text_b is not None for e in examples)
    return featurize(
        [e.text_a for e in examples],
        [e.text_b or "" for e in examples] if pair else None,
        [e.label for e in examples],
        tokenizer,
        max_seq_length,
        label_list,
        regression_scale,
    )
