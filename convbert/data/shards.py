"""The on-disk shard format: token ids + per-example segment lengths, no padding, no special tokens.

One shard is one file (little-endian)::

    header   64 bytes: magic b"CVBSHRD1", u32 token_bytes (2 = uint16, 4 = uint32), u32 block_size,
             u64 n_examples, u64 n_tokens, u64 lengths_offset, u64 blocks_offset, u64 n_blocks, 8 bytes zero
    tokens   n_tokens ids (token_bytes each): every example's segment A then segment B, back to back
    lengths  n_examples × 2 uint16: (len_a, len_b) per example   [8-byte aligned]
    blocks   n_blocks int64: token offset of examples 0, block_size, 2·block_size, …   [8-byte aligned]

An example's offset is ``blocks[j // block_size]`` plus the lengths of the examples before it in its block, so
the per-example overhead is 4 bytes (+ 8/block_size). The same format is used for the per-unit part files the
workers write and for the final shards. Files are written through `convbert.utils.atomic_path`: a reader never
sees a torn file.
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from convbert.errors import ConvBertError
from convbert.utils import atomic_path

MAGIC = b"CVBSHRD1"
HEADER = struct.Struct("<8sIIQQQQQ8x")
HEADER_SIZE = 64
BLOCK_SIZE = 64
_FLUSH_TOKENS = 1 << 20
_COPY_CHUNK = 1 << 22
assert HEADER.size == HEADER_SIZE


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _align8(n: int) -> int:
    return (n + 7) & ~7


class ShardWriter:
    """Streams examples (or whole part files) into one shard file, written atomically on `close()`."""

    def __init__(self, path: str | os.PathLike, token_bytes: int):
        if token_bytes not in (2, 4):
            raise ValueError("token_bytes must be 2 or 4")
        self.path = Path(path)
        self.token_bytes = token_bytes
        self._typecode = "H" if token_bytes == 2 else "I"
        if array(self._typecode).itemsize != token_bytes:  # pragma: no cover - exotic platforms
            self._typecode = "L" if token_bytes == 4 else self._typecode
        self.n_examples = 0
        self.n_tokens = 0
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._f = self._stack.enter_context(open(tmp, "wb"))
        self._f.write(b"\0" * HEADER_SIZE)
        fd, lengths_tmp = tempfile.mkstemp(prefix=f".{self.path.name}.lengths.", suffix=".tmp", dir=self.path.parent)
        self._lengths_path = Path(lengths_tmp)
        self._lf = os.fdopen(fd, "wb")
        self._tok = array(self._typecode)
        self._len = array("H")
        self._closed = False

    def add(self, a: list[int], b: list[int]) -> None:
        self._tok.extend(a)
        self._tok.extend(b)
        self._len.append(len(a))
        self._len.append(len(b))
        self.n_examples += 1
        self.n_tokens += len(a) + len(b)
        if len(self._tok) >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._tok:
            self._f.write(self._tok.tobytes() if _LITTLE else _swapped(self._tok))
            self._tok = array(self._typecode)
        if self._len:
            self._lf.write(self._len.tobytes() if _LITTLE else _swapped(self._len))
            self._len = array("H")

    def add_raw(self, tokens: bytes, lengths: bytes) -> None:
        """Append examples given as raw little-endian bytes: token ids and (len_a, len_b) uint16 pairs."""
        self._flush()
        n_tok = len(tokens) // self.token_bytes
        n_ex = len(lengths) // 4
        self._f.write(tokens)
        self._lf.write(lengths)
        self.n_examples += n_ex
        self.n_tokens += n_tok

    def add_shard(self, reader: "ShardReader") -> None:
        """Append every example of another shard file (a worker's part), copying raw bytes."""
        if reader.token_bytes != self.token_bytes:
            raise ConvBertError(f"{reader.path}: token width {reader.token_bytes} bytes, expected {self.token_bytes}")
        self._flush()
        with open(reader.path, "rb") as src:
            _copy_range(src, self._f, HEADER_SIZE, reader.n_tokens * reader.token_bytes)
            _copy_range(src, self._lf, reader.lengths_offset, reader.n_examples * 4)
        self.n_examples += reader.n_examples
        self.n_tokens += reader.n_tokens

    def close(self) -> int:
        """Finish the file and rename it into place. Returns its size in bytes."""
        self._flush()
        self._lf.close()
        f = self._f
        pos = HEADER_SIZE + self.n_tokens * self.token_bytes
        lengths_offset = _align8(pos)
        f.write(b"\0" * (lengths_offset - pos))
        n_blocks = (self.n_examples + BLOCK_SIZE - 1) // BLOCK_SIZE
        blocks = np.empty(n_blocks, dtype="<i8")
        with open(self._lengths_path, "rb") as lf:
            start_tokens = 0
            done = 0
            chunk_examples = BLOCK_SIZE * 16384
            while done < self.n_examples:
                raw = lf.read(chunk_examples * 4)
                f.write(raw)
                lens = np.frombuffer(raw, dtype="<u2").reshape(-1, 2).astype(np.int64)
                tot = lens[:, 0] + lens[:, 1]
                starts = np.cumsum(tot) - tot + start_tokens
                blocks[done // BLOCK_SIZE : (done + len(tot) + BLOCK_SIZE - 1) // BLOCK_SIZE] = starts[::BLOCK_SIZE]
                start_tokens += int(tot.sum())
                done += len(tot)
        self._lengths_path.unlink(missing_ok=True)
        pos = lengths_offset + self.n_examples * 4
        blocks_offset = _align8(pos)
        f.write(b"\0" * (blocks_offset - pos))
        f.write(blocks.tobytes())
        size = blocks_offset + n_blocks * 8
        f.seek(0)
        f.write(
            HEADER.pack(
                MAGIC, self.token_bytes, BLOCK_SIZE, self.n_examples, self.n_tokens, lengths_offset, blocks_offset,
                n_blocks,
            )
        )
        f.flush()
        self._closed = True
        self._stack.close()  # closes the file, fsyncs, gives it the usual mode and renames it into place
        return size

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._lf.close()
        finally:
            self._lengths_path.unlink(missing_ok=True)
            # Exit the stack as if an exception happened: atomic_path deletes its temporary file.
            self._stack.__exit__(_Abort, _Abort(), None)


class _Abort(Exception):
    pass


_LITTLE = np.little_endian


def _swapped(arr: array) -> bytes:  # pragma: no cover - big-endian hosts
    a = array(arr.typecode, arr)
    a.byteswap()
    return a.tobytes()


def _copy_range(src, dst, offset: int, length: int) -> None:
    src.seek(offset)
    left = length
    while left > 0:
        buf = src.read(min(_COPY_CHUNK, left))
        if not buf:
            raise ConvBertError(f"{getattr(src, 'name', '?')}: shard file is truncated")
        dst.write(buf)
        left -= len(buf)


class ShardReader:
    """Memory-maps one shard file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except OSError as err:
            raise ConvBertError(f"{self.path}: cannot read shard ({err.strerror or err})")
        if len(head) < HEADER_SIZE or head[:8] != MAGIC:
            raise ConvBertError(f"{self.path}: not a convbert data shard (bad header)")
        (_, tb, bs, n_ex, n_tok, l_off, b_off, n_blocks) = HEADER.unpack(head)
        corrupt = f"{self.path}: shard is truncated or corrupt"
        if tb not in (2, 4) or bs < 1:
            raise ConvBertError(f"{corrupt} (header: {tb} bytes per token, blocks of {bs}; expected 2 or 4, and >= 1)")
        layout = (_align8(HEADER_SIZE + n_tok * tb), _align8(l_off + n_ex * 4), (n_ex + bs - 1) // bs)
        if (l_off, b_off, n_blocks) != layout:
            raise ConvBertError(f"{corrupt} (the header's table offsets do not fit its counts)")
        expected = b_off + n_blocks * 8
        if size != expected:
            raise ConvBertError(f"{corrupt} ({size} bytes, expected {expected})")
        self.size = size
        self.token_bytes = tb
        self.block_size = bs
        self.n_examples = n_ex
        self.n_tokens = n_tok
        self.lengths_offset = l_off
        self.blocks_offset = b_off
        dtype = np.dtype("<u2") if tb == 2 else np.dtype("<u4")
        if n_tok:
            self.tokens = np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n_tok,))
        else:
            self.tokens = np.zeros(0, dtype=dtype)
        if n_ex:
            self.lengths = np.memmap(self.path, dtype="<u2", mode="r", offset=l_off, shape=(n_ex, 2))
            self.blocks = np.memmap(self.path, dtype="<i8", mode="r", offset=b_off, shape=(n_blocks,))
        else:
            self.lengths = np.zeros((0, 2), dtype="<u2")
            self.blocks = np.zeros(0, dtype="<i8")

    def __len__(self) -> int:
        return self.n_examples

    def offset(self, j: int) -> int:
        blk = j // self.block_size
        start = blk * self.block_size
        off = int(self.blocks[blk])
        if j > start:
            off += int(self.lengths[start:j].sum(dtype=np.int64))
        return off

    def offsets(self, js: np.ndarray) -> np.ndarray:
        """Token offsets of examples `js` (vectorised `offset`)."""
        js = np.asarray(js, dtype=np.int64)
        bs = self.block_size
        blk = js // bs
        start = blk * bs
        pos = np.arange(bs, dtype=np.int64)
        idx = np.minimum(start[:, None] + pos, self.n_examples - 1)
        lens = np.asarray(self.lengths[idx.ravel()], dtype=np.int64).reshape(len(js), bs, 2).sum(-1)
        lens[pos[None, :] >= (js - start)[:, None]] = 0
        return np.asarray(self.blocks[blk], dtype=np.int64) + lens.sum(1)

    def segments(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of segment A and segment B of example `j` (views into the map)."""
        off = self.offset(j)
        la, lb = (int(x) for x in self.lengths[j])
        return self.tokens[off : off + la], self.tokens[off + la : off + la + lb]
