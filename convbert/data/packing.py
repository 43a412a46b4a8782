"""Packing tokenised lines into pre-training examples (spec §4.4), both segment rules.

`ExampleBuilder` mirrors the original `ExampleBuilder.add_line` / `_create_example` step by step, including the
order in which random numbers are drawn, so a given RNG stream gives the original's examples:

* per example: one ``rng.random() < 0.1`` draw (single-segment case, A target 100000), then, per pending line, a
  ``rng.random() < 0.5`` coin flip only when the rule's earlier conditions fail and it gets that far (Python's
  short-circuit order), then one ``rng.random() < 0.05`` draw and, if it succeeds, ``rng.randint(5, max_len)``
  for the next target length;
* ``electra``: ELECTRA's fixed rule (commit 1ed0852): a line goes to A if A is empty, or it fits under the A
  target, or (B is empty, A is under its target and the coin flip succeeds); otherwise to B;
* ``convbert-release``: the rule in the released ConvBERT code (pre-fix ELECTRA): a line goes to A if A is
  non-empty, or it fits under the A target, or (B is non-empty, A is under its target and the coin flip
  succeeds); otherwise to B;
* A is cut to ``max_len - 2`` tokens and B to ``max(0, max_len - len(A) - 3)``; lines that do not fit are dropped.

An example is returned as a pair ``(a, b)`` of token-id lists without special tokens; the layout
``[CLS] A [SEP] (B [SEP])`` is applied when the example is read back.
"""

from __future__ import annotations

import random
from typing import Protocol

from convbert.errors import ConvBertError

SEGMENT_RULES = ("electra", "convbert-release")
SINGLE_SEGMENT_PROB = 0.1
SINGLE_SEGMENT_TARGET = 100000
SHORT_TARGET_PROB = 0.05
MIN_SHORT_TARGET = 5


class RandomSource(Protocol):
    def random(self) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


Example = tuple[list[int], list[int]]


def line_token_cap(max_seq_length: int) -> int:
    """Tokens of one line beyond which the rest cannot change the examples: every comparison `ExampleBuilder`
    makes with a line's length is against a target <= max(SINGLE_SEGMENT_TARGET, max_seq_length), and an example
    keeps at most max_seq_length tokens of it, so a line cut to this length packs exactly as the whole line."""
    return max(SINGLE_SEGMENT_TARGET, int(max_seq_length)) + 1


class ExampleBuilder:
    """Accumulates tokenised lines and cuts examples, exactly as the original builder."""

    def __init__(self, max_seq_length: int = 128, segment_rule: str = "electra", rng: RandomSource | None = None):
        if segment_rule not in SEGMENT_RULES:
            raise ConvBertError(f"--segment-rule: expected one of {', '.join(SEGMENT_RULES)}, got {segment_rule!r}")
        if max_seq_length < 5:
            raise ConvBertError(f"--max-seq-length: expected at least 5, got {max_seq_length}")
        self.max_length = int(max_seq_length)
        self.segment_rule = segment_rule
        self._fixed = segment_rule == "electra"
        self.rng = rng if rng is not None else random.Random(0)
        self._pending: list[list[int]] = []
        self._current_length = 0
        self.target_length = self.max_length

    @property
    def pending(self) -> list[list[int]]:
        return self._pending

    def add_line(self, tokens: list[int], blank: bool = False) -> Example | None:
        """Add one line. `blank=True` marks an empty line: it flushes pending text (a document end).

        Mirrors the original: an empty line with nothing pending appends an empty token list (harmless), and a
        non-blank line whose tokenisation is empty is appended too.
        """
        if blank and self._current_length != 0:
            return self._create_example()
        if blank:
            tokens = []
        self._pending.append(tokens)
        self._current_length += len(tokens)
        if self._current_length >= self.target_length:
            return self._create_example()
        return None

    def feed(self, items: list, encoded, sink) -> None:
        """Fast path for a batch of lines; same result as calling `add_line` / `end_document` one by one.

        `items` holds, in order, non-empty strings (a line, whose token ids are the next element of the iterator
        `encoded`), empty strings (a blank line) and None (an end of document, i.e. a blank line too).
        `sink(a, b)` receives every finished example.
        """
        pending = self._pending
        cur = self._current_length
        target = self.target_length
        for s in items:
            if s:
                toks = next(encoded)
                pending.append(toks)
                cur += len(toks)
                if cur < target:
                    continue
            elif cur == 0:
                pending.append([])
                continue
            self._current_length = cur
            sink(*self._create_example())
            pending = self._pending
            cur = 0
            target = self.target_length
        self._current_length = cur

    def end_document(self) -> Example | None:
        """The original calls ``add_line("")`` at the end of every file."""
        return self.add_line([], blank=True)

    def _create_example(self) -> Example:
        rng = self.rng
        if rng.random() < SINGLE_SEGMENT_PROB:
            a_target = SINGLE_SEGMENT_TARGET
        else:
            a_target = (self.target_length - 3) // 2
        a: list[int] = []
        b: list[int] = []
        if self._fixed:
            for line in self._pending:
                if (
                    len(a) == 0
                    or len(a) + len(line) < a_target
                    or (len(b) == 0 and len(a) < a_target and rng.random() < 0.5)
                ):
                    a += line
                else:
                    b += line
        else:
            for line in self._pending:
                if a or len(a) + len(line) < a_target or (b and len(a) < a_target and rng.random() < 0.5):
                    a += line
                else:
                    b += line
        a = a[: self.max_length - 2]
        b = b[: max(0, self.max_length - len(a) - 3)]
        self._pending = []
        self._current_length = 0
        if rng.random() < SHORT_TARGET_PROB:
            self.target_length = rng.randint(MIN_SHORT_TARGET, self.max_length)
        else:
            self.target_length = self.max_length
        return a, b


def layout(a: list[int], b: list[int], cls_id: int, sep_id: int, max_seq_length: int, pad_id: int = 0):
    """`[CLS] A [SEP] (B [SEP])` plus padding → (input_ids, input_mask, segment_ids) as lists."""
    ids = [cls_id] + list(a) + [sep_id]
    seg = [0] * len(ids)
    if b:
        ids += list(b) + [sep_id]
        seg += [1] * (len(b) + 1)
    n = len(ids)
    pad = max_seq_length - n
    return ids + [pad_id] * pad, [1] * n + [0] * pad, seg + [0] * pad
