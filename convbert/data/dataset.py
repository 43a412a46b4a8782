"""Reading a built dataset: `PretrainingDataset` (memory-mapped) and `PretrainingLoader` (shuffled batches).

`PretrainingDataset(dir)` memory-maps every shard; only a small index (shard sizes) lives in memory. Each example
comes back as the original's fixed-length record: ``input_ids`` = ``[CLS] A [SEP] (B [SEP])`` right-padded with the
vocabulary's ``[PAD]`` id (0 in BERT vocabularies) to ``max_seq_length``, ``input_mask`` (1 on real tokens),
``segment_ids`` (0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``), all int64.

`PretrainingLoader(dataset, batch_size, seed, rank, world_size, drop_last)` is an **infinite** iterator over
epochs. ``batch_size`` is the per-rank batch B; one step consumes a global batch of ``B × world_size`` examples
from the epoch's order, and rank r takes the r-th contiguous slice of B. The order of epoch e is a pseudo-random
permutation seeded by (seed, e), computed on the fly (a keyed Feistel network with cycle walking), so memory does
not grow with the dataset. ``drop_last=True`` skips the incomplete global batch at the end of each epoch;
``drop_last=False`` fills it by wrapping around to the start of the same epoch's order. ``state_dict()`` holds
(seed, epoch, position in the epoch); ``load_state_dict`` continues exactly where the saved loader stopped (also with
another world size or batch size: the position is counted in examples).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from convbert.data.shards import ShardReader
from convbert.errors import ConvBertError
from convbert.utils import sha256_file


class PretrainingDataset:
    """A `convbert build-data` folder, memory-mapped: `len()`, `example(i)` and `batch(indices)` give
    fixed-length `input_ids`, `input_mask` and `segment_ids` (docs/data.md)."""
    def __init__(self, path: str | os.PathLike, max_seq_length: int | None = None):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConvBertError(f"{mpath}: not found; expected a folder written by `convbert build-data`")
        except (OSError, ValueError) as err:
            raise ConvBertError(f"{mpath}: unreadable manifest ({err})")
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != "convbert-pretraining-data":
            raise ConvBertError(f"{mpath}: not a convbert pre-training dataset manifest")
        if not m.get("complete"):
            raise ConvBertError(f"{self.path}: the build is not complete; re-run the same `convbert build-data` "
                                "command to finish it")
        self._check_fields(m, mpath)
        self._read_manifest(m, max_seq_length)

    @staticmethod
    def _check_fields(m: dict, mpath: Path) -> None:
        """Name the first missing or mistyped field of an edited or damaged manifest."""

        def need(obj, key: str, kind, label: str) -> None:
            value = obj.get(key) if isinstance(obj, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConvBertError(f"{mpath}: field '{label}' is {value!r}: expected {kind.__name__}; "
                                    "the manifest was edited or damaged (rebuild the dataset)")

        need(m, "max_seq_length", int, "max_seq_length")
        need(m, "vocab", dict, "vocab")
        for key in ("size", "pad_id", "cls_id", "sep_id", "mask_id", "unk_id"):
            need(m["vocab"], key, int, f"vocab.{key}")
        need(m, "shards", list, "shards")
        for i, shard in enumerate(m["shards"]):
            need(shard, "file", str, f"shards[{i}].file")
            need(shard, "examples", int, f"shards[{i}].examples")

        def within(value: int, low: int, high: int, label: str) -> None:
            if not low <= value <= high:
                raise ConvBertError(f"{mpath}: field '{label}' is {value}: expected {low}..{high}; "
                                    "the manifest was edited or damaged (rebuild the dataset)")

        within(m["max_seq_length"], 5, 65535, "max_seq_length")
        within(m["vocab"]["size"], 5, 2**32, "vocab.size")
        for key in ("pad_id", "cls_id", "sep_id", "mask_id", "unk_id"):
            within(m["vocab"][key], 0, m["vocab"]["size"] - 1, f"vocab.{key}")

    def _read_manifest(self, m: dict, max_seq_length: int | None) -> None:
        mpath = self.path / "manifest.json"
        built = int(m["max_seq_length"])
        if max_seq_length is None:
            max_seq_length = built
        if int(max_seq_length) < built:
            raise ConvBertError(f"max_seq_length {max_seq_length} is shorter than the dataset's {built} "
                                f"({self.path}); rebuild with --max-seq-length {max_seq_length}")
        self.max_seq_length = int(max_seq_length)
        v = m["vocab"]
        self.vocab_size = int(v["size"])
        self.pad_id, self.cls_id, self.sep_id = int(v["pad_id"]), int(v["cls_id"]), int(v["sep_id"])
        self.mask_id, self.unk_id = int(v["mask_id"]), int(v["unk_id"])
        self.shards = []
        for s in m["shards"]:
            r = ShardReader(self.path / s["file"])
            if r.n_examples != s["examples"]:
                raise ConvBertError(f"{r.path}: holds {r.n_examples} examples, the manifest says {s['examples']}")
            self.shards.append(r)
        self._starts = np.cumsum([0] + [r.n_examples for r in self.shards]).astype(np.int64)
        self._len = int(self._starts[-1])
        if "examples" in m and int(m["examples"]) != self._len:
            raise ConvBertError(f"{mpath}: field 'examples' says {m['examples']} but the shards hold {self._len}")

    def __len__(self) -> int:
        return self._len

    def spot_check(self, tokens_per_shard: int = 1 << 20) -> None:
        """Cheap checks before a long run starts: every shard's length table (each example fits, and the lengths
        add up to the shard's tokens: a damaged table would shift every later example), and the token ids of its
        start against the vocab size (`batch` checks every batch it reads; `convbert data-stats` scans all)."""
        for shard in self.shards:
            check_example_lengths(shard, shard.lengths, self.max_seq_length)
            total = int(np.asarray(shard.lengths, dtype=np.int64).sum())
            if total != shard.n_tokens:
                raise ConvBertError(f"{shard.path}: shard is corrupt (its length table adds up to {total} tokens, "
                                    f"its header says {shard.n_tokens}); rebuild the dataset")
            check_block_offsets(shard)
            check_token_ids(shard, shard.tokens[:tokens_per_shard], self.vocab_size)
        self.check_hashes()

    def check_hashes(self) -> None:
        """Every shard's SHA-256 against the manifest's (datasets built since stop 25 record one): a changed byte
        among the token ids is otherwise invisible while it stays inside the vocab. Reads each shard once
        (~1 GB/s), which also warms the page cache for training."""
        for entry, shard in zip(self.manifest["shards"], self.shards):
            want = entry.get("sha256")
            if want is None:
                continue
            if not isinstance(want, str):
                raise ConvBertError(f"{self.path / 'manifest.json'}: field 'sha256' of {entry['file']} is {want!r}: "
                                    "expected a hex string; the manifest was edited or damaged (rebuild the dataset)")
            got = sha256_file(shard.path)
            if got != want:
                raise ConvBertError(f"{shard.path}: shard is corrupt (its sha256 is {got[:16]}…, the manifest "
                                    f"records {want[:16]}…); rebuild the dataset or restore the file")

    def _locate(self, i: int) -> tuple[ShardReader, int]:
        if not -self._len <= i < self._len:
            raise IndexError(f"example {i} out of range for a dataset of {self._len}")
        if i < 0:
            i += self._len
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.shards[k], i - int(self._starts[k])

    def segments(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of segments A and B of example `i` (no special tokens)."""
        shard, j = self._locate(int(i))
        return shard.segments(j)

    def _fill(self, i: int, ids: np.ndarray, mask: np.ndarray, seg: np.ndarray) -> None:
        a, b = self.segments(i)
        la, lb = len(a), len(b)
        ids[0] = self.cls_id
        ids[1 : 1 + la] = a
        ids[1 + la] = self.sep_id
        n = la + 2
        if lb:
            ids[n : n + lb] = b
            ids[n + lb] = self.sep_id
            seg[n : n + lb + 1] = 1
            n += lb + 1
        mask[:n] = 1

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Example `i` as int64 arrays of length `max_seq_length`, padded with the vocab's [PAD] id."""
        t = self.max_seq_length
        ids = np.full(t, self.pad_id, dtype=np.int64)
        mask = np.zeros(t, dtype=np.int64)
        seg = np.zeros(t, dtype=np.int64)
        self._fill(int(i), ids, mask, seg)
        return {"input_ids": ids, "input_mask": mask, "segment_ids": seg}

    __getitem__ = example

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Examples `indices` stacked into [B, T] int64 arrays (vectorised gathers from the maps)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self._len):
            raise IndexError(f"example indices out of range for a dataset of {self._len}")
        bsz, t = len(indices), self.max_seq_length
        ids = np.full((bsz, t), self.pad_id, dtype=np.int64)
        la = np.zeros(bsz, dtype=np.int64)
        lb = np.zeros(bsz, dtype=np.int64)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        for k in np.unique(which):
            rows = np.nonzero(which == k)[0]
            shard = self.shards[int(k)]
            local = indices[rows] - self._starts[k]
            lens = np.asarray(shard.lengths[local], dtype=np.int64)
            a, b = lens[:, 0], lens[:, 1]
            check_example_lengths(shard, lens, t)
            la[rows], lb[rows] = a, b
            tl = a + b
            total = int(tl.sum())
            if total:
                first = np.cumsum(tl) - tl
                q = np.arange(total, dtype=np.int64) - np.repeat(first, tl)
                src = np.repeat(shard.offsets(local), tl) + q
                col = 1 + q + (q >= np.repeat(a, tl))
                if src.max() >= shard.n_tokens or src.min() < 0:
                    raise ConvBertError(f"{shard.path}: shard is corrupt (its tables point past its tokens)")
                tokens = shard.tokens[src]
                check_token_ids(shard, tokens, self.vocab_size)
                ids[np.repeat(rows, tl), col] = tokens
        r = np.arange(bsz)
        ids[:, 0] = self.cls_id
        ids[r, 1 + la] = self.sep_id
        two = lb > 0
        ids[r[two], (2 + la + lb)[two]] = self.sep_id
        n = 2 + la + np.where(two, lb + 1, 0)
        cols = np.arange(t)
        mask = (cols[None, :] < n[:, None]).astype(np.int64)
        seg = ((cols[None, :] >= (2 + la)[:, None]) & (cols[None, :] < n[:, None])).astype(np.int64)
        return {"input_ids": ids, "input_mask": mask, "segment_ids": seg}


def check_example_lengths(shard: ShardReader, lengths: np.ndarray, max_seq_length: int) -> None:
    """`lengths` ([n, 2] segment lengths read from `shard`) must fit `max_seq_length` with [CLS] and [SEP]s."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int((lengths.sum(1) + np.where(lengths[:, 1] > 0, 3, 2)).max()) > max_seq_length:
        raise ConvBertError(f"{shard.path}: shard is corrupt (an example longer than max_seq_length {max_seq_length})")


def check_block_offsets(shard: ShardReader) -> None:
    """The offset table (the token offset of every `block_size`-th example) must agree with the length table: a
    damaged entry would send a whole block of examples to the wrong tokens."""
    lengths = np.asarray(shard.lengths, dtype=np.int64).sum(1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    want = starts[:: shard.block_size]
    got = np.asarray(shard.blocks, dtype=np.int64)[: len(want)]
    if len(got) != len(want) or not np.array_equal(got, want):
        raise ConvBertError(f"{shard.path}: shard is corrupt (its offset table disagrees with its length table); "
                            "rebuild the dataset")


def check_token_ids(shard: ShardReader, tokens: np.ndarray, vocab_size: int) -> None:
    """Token ids read from `shard` must be rows of the vocab (a wrong id would index past the embeddings)."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ConvBertError(f"{shard.path}: shard is corrupt (token id {int(tokens.max())} >= the vocab size "
                            f"{vocab_size})")


# ----------------------------------------------------------------------------------------------------------------


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit mixing function (splitmix64 finaliser) of x xor key. Call under np.errstate(over="ignore")."""
    z = (x ^ key) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class EpochPermutation:
    """A seeded bijection of [0, n) evaluated element-wise (Feistel network + cycle walking); O(1) memory.

    The network permutes [0, 2^bits) with 2^bits < 2n (an unbalanced split when bits is odd), so cycle walking
    needs fewer than two rounds on average.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("n must be positive")
        self.n = int(n)
        self.bits = max(2, (self.n - 1).bit_length())
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(epoch)])
        self.keys = [np.uint64(k) for k in ss.generate_state(self.ROUNDS, dtype=np.uint64)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        wl = self.bits // 2  # width of the left part
        wr = self.bits - wl
        left = x >> np.uint64(wr)
        right = x & np.uint64((1 << wr) - 1)
        with np.errstate(over="ignore"):
            for k in self.keys:
                # (L, R) -> (R, L ^ F(R)); the widths swap
                left, right = right, left ^ (_mix(right, k) & np.uint64((1 << wl) - 1))
                wl, wr = wr, wl
        return (left << np.uint64(wr)) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        x = self._encrypt(x)
        n = np.uint64(self.n)
        out_of_range = x >= n
        while out_of_range.any():
            x[out_of_range] = self._encrypt(x[out_of_range])
            out_of_range = x >= n
        return x.astype(np.int64)


class PretrainingLoader:
    """Infinite iterator of batches: dicts of torch int64 tensors [B, T] (see the module docstring)."""

    def __init__(self, dataset: PretrainingDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if int(batch_size) < 1:
            raise ConvBertError(f"batch_size: expected at least 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ConvBertError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_examples = len(dataset)
        if self.num_examples == 0:
            raise ConvBertError(f"{dataset.path}: the dataset has no examples")
        if self.drop_last and self.num_examples < self.global_batch_size:
            raise ConvBertError(
                f"{dataset.path}: {self.num_examples} examples are fewer than one batch of the loader "
                f"({self.batch_size} per rank x {self.world_size} rank(s): one micro-step of --batch-size / "
                "--grad-accum); use a smaller --batch-size, a larger --grad-accum or more data"
            )
        self.epoch = 0
        self.position = 0  # examples of the current epoch already handed out (by all ranks together)
        self._perm: EpochPermutation | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch."""
        g = self.global_batch_size
        return self.num_examples // g if self.drop_last else -(-self.num_examples // g)

    def __iter__(self):
        return self

    def _permutation(self) -> EpochPermutation:
        if self._perm is None or self._perm_epoch != self.epoch:
            self._perm = EpochPermutation(self.num_examples, self.seed, self.epoch)
            self._perm_epoch = self.epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """Dataset indices of this rank's next batch (advances the cursor)."""
        g, n = self.global_batch_size, self.num_examples
        if (self.drop_last and self.position + g > n) or (not self.drop_last and self.position >= n):
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.int64) % n
        self.position += g
        return self._permutation()(positions)

    def __next__(self) -> dict:
        import torch

        batch = self.dataset.batch(self.next_indices())
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def state_dict(self) -> dict:
        """Where the loader is (seed, epoch, position, and the sizes it checks): JSON, for exact resume."""
        return {
            "seed": self.seed, "epoch": self.epoch, "position": self.position, "num_examples": self.num_examples,
            "batch_size": self.batch_size, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` (the batch size may differ; the order of examples is kept)."""
        if int(state["num_examples"]) != self.num_examples:
            raise ConvBertError(
                f"loader state is for a dataset of {state['num_examples']} examples, this one has "
                f"{self.num_examples}; resume with the same --data folder"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = None
