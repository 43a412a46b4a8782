"""Reading TensorFlow's checkpoint format (the "tensor bundle" that `tf.train.Saver` writes) without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` plus `PREFIX.data-0000i-of-0000n`. The index is a LevelDB-style sorted table:
data blocks of prefix-compressed (key, value) entries, an index block pointing at them, and a 48-byte footer. Each key
is a variable's name; its value is a `BundleEntryProto` (dtype, shape, shard, offset, size, masked CRC32C) that
locates the tensor's raw little-endian bytes in a data file. The entry with the empty key is the `BundleHeaderProto`
(shard count, byte order). We parse the few protobuf fields we need by hand: the format is small and stable, and it
saves a 500 MB TensorFlow install just to read the original ConvBERT weights.

Everything is checked: the footer's magic number, block bounds and trailers, field types, the data files' sizes and
each tensor's checksum, so a truncated or corrupt download fails with the file and the tensor named.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from convbert.errors import ConvBertError
from convbert.utils import shell_abspath

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked CRC32C (4 bytes)

# tensorflow/core/framework/types.proto: the numeric types a weight can have.
DTYPES = {
    1: np.dtype("<f4"),   # DT_FLOAT
    2: np.dtype("<f8"),   # DT_DOUBLE
    3: np.dtype("<i4"),   # DT_INT32
    4: np.dtype("u1"),    # DT_UINT8
    5: np.dtype("<i2"),   # DT_INT16
    6: np.dtype("i1"),    # DT_INT8
    9: np.dtype("<i8"),   # DT_INT64
    10: np.dtype("?"),    # DT_BOOL
    14: np.dtype("<u2"),  # DT_BFLOAT16: raw bits, widened to float32 by `read`
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
}
DT_BFLOAT16 = 14
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 9: "int64",
               10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 20: "resource", 21: "variant"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one variable's bytes are, as its `BundleEntryProto` says."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, f"dtype {self.dtype}")


# --- protobuf wire format: only what the two messages use ------------------------------------------------------

def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ConvBertError(f"{where}: malformed varint (file truncated or corrupt)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, where: str):
    """Yield (field number, wire type, value) of a protobuf message: ints for varint/fixed, bytes for lengths."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ConvBertError(f"{where}: truncated field {number}")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            if pos + length > len(buf):
                raise ConvBertError(f"{where}: truncated field {number}")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ConvBertError(f"{where}: truncated field {number}")
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ConvBertError(f"{where}: unsupported protobuf wire type {wire} (not a TensorFlow checkpoint?)")
        yield number, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_shape(buf: bytes, where: str) -> tuple[int, ...]:
    dims = []
    for number, wire, value in _fields(buf, where):
        if number == 2 and wire == 2:  # TensorShapeProto.dim
            size = 0
            for n, w, v in _fields(value, where):
                if n == 1 and w == 0:
                    size = _signed64(v)
            if size < 0:
                raise ConvBertError(f"{where}: unknown dimension in a saved tensor's shape")
            dims.append(size)
        elif number == 3 and value:  # unknown_rank
            raise ConvBertError(f"{where}: a saved tensor has unknown rank")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes, where: str) -> TensorEntry:
    dtype = shard = offset = size = 0
    shape: tuple[int, ...] = ()
    crc = None
    sliced = False
    for number, wire, value in _fields(buf, where):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            shape = _parse_shape(value, where)
        elif number == 3 and wire == 0:
            shard = value
        elif number == 4 and wire == 0:
            offset = value
        elif number == 5 and wire == 0:
            size = value
        elif number == 6 and wire == 5:
            crc = value
        elif number == 7:
            sliced = True
    return TensorEntry(name, dtype, shape, shard, offset, size, crc, sliced)


# --- the sorted table ---------------------------------------------------------------------------------------------

def _block_handle(buf: bytes, pos: int, where: str) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos, where)
    size, pos = _varint(buf, pos, where)
    return offset, size, pos


def _block_entries(data: bytes, offset: int, size: int, where: str):
    """Yield (key, value) of one table block, undoing the prefix compression of the keys."""
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data):
        raise ConvBertError(f"{where}: a block runs past the end of the file (truncated?)")
    block = data[offset:end]
    stored_crc = struct.unpack_from("<I", data, end + 1)[0]
    if masked_crc32c(block + data[end:end + 1]) != stored_crc:
        raise ConvBertError(f"{where}: a table block fails its checksum (corrupt file)")
    if data[end] != 0:
        raise ConvBertError(f"{where}: compressed table blocks (type {data[end]}) are not supported; re-save the "
                            "checkpoint with TensorFlow's default (uncompressed) index")
    if len(block) < 4:
        raise ConvBertError(f"{where}: a table block is too short")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise ConvBertError(f"{where}: a table block's restart array is out of range (corrupt file)")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        unshared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise ConvBertError(f"{where}: a table entry is out of range (corrupt file)")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def resolve_prefix(path: str | os.PathLike) -> Path:
    """The checkpoint prefix for `path`: the prefix itself, its `.index` file, or a folder holding one checkpoint (or
    a TensorFlow `checkpoint` file that names the latest)."""
    p = Path(path)
    if p.name in ("", ".", ".."):  # `--checkpoint .`: a folder with no name of its own to put ".index" after
        p = shell_abspath(p)
    if p.name.endswith(".index") and p.is_file():
        return p.with_name(p.name[: -len(".index")])
    if p.with_name(p.name + ".index").is_file():
        return p
    if p.is_dir():
        state = p / "checkpoint"
        if state.is_file():
            for line in state.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("model_checkpoint_path:"):
                    named = line.split(":", 1)[1].strip().strip('"')
                    # The file often holds an absolute path from the machine that trained; the folder is what counts.
                    candidate = p / Path(named).name
                    if candidate.with_name(candidate.name + ".index").is_file():
                        return candidate
        indexes = sorted(p.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_name(indexes[0].name[: -len(".index")])
        if len(indexes) > 1:
            names = ", ".join(i.name for i in indexes[:4])
            raise ConvBertError(f"{p}: holds {len(indexes)} checkpoints ({names}{' …' if len(indexes) > 4 else ''}); "
                                "name one by its prefix (e.g. model.ckpt-1000000)")
        raise ConvBertError(f"{p}: no TensorFlow checkpoint here (no *.index file)")
    raise ConvBertError(f"{p}: not a TensorFlow checkpoint (expected PREFIX.index and PREFIX.data-*-of-* files, "
                        "or a folder holding them)")


class TFCheckpoint:
    """The variables of one TensorFlow checkpoint: `names()`, `entry(name)`, `read(name)` as a numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.prefix = resolve_prefix(path)
        index = self.prefix.with_name(self.prefix.name + ".index")
        where = str(index)
        data = index.read_bytes()
        if len(data) < FOOTER_SIZE or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
            raise ConvBertError(f"{where}: not a TensorFlow checkpoint index (bad footer; truncated download?)")
        footer = data[len(data) - FOOTER_SIZE:]
        _, _, pos = _block_handle(footer, 0, where)  # the metaindex block: unused by checkpoints
        index_offset, index_size, _ = _block_handle(footer, pos, where)
        self.entries: dict[str, TensorEntry] = {}
        num_shards, big_endian = 1, False
        for _, handle in _block_entries(data, index_offset, index_size, where):
            offset, size, _ = _block_handle(handle, 0, where)
            for key, value in _block_entries(data, offset, size, where):
                name = key.decode("utf-8", errors="replace")
                if name == "":  # BundleHeaderProto
                    for number, wire, v in _fields(value, where):
                        if number == 1 and wire == 0:
                            num_shards = v
                        elif number == 2 and wire == 0:
                            big_endian = v == 1
                    continue
                self.entries[name] = _parse_entry(name, value, f"{where}: entry {name}")
        if big_endian:
            raise ConvBertError(f"{where}: a big-endian checkpoint; only little-endian files are supported")
        if num_shards < 1:
            raise ConvBertError(f"{where}: header names {num_shards} data shards")
        self.num_shards = num_shards
        self._maps: dict[int, mmap.mmap | bytes] = {}

    def data_file(self, shard: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def names(self) -> list[str]:
        return sorted(self.entries)

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name]

    def _shard(self, shard: int):
        if shard not in self._maps:
            path = self.data_file(shard)
            if not path.is_file():
                raise ConvBertError(f"{path}: missing (the checkpoint's data shard {shard} of {self.num_shards})")
            with open(path, "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
        return self._maps[shard]

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor `name` (float32 for bfloat16), its size and, with `verify`, its CRC32C checked."""
        e = self.entries[name]
        if e.sliced:
            raise ConvBertError(f"{self.prefix}: variable {name} is saved in slices (a partitioned variable); "
                                "not supported")
        if e.dtype not in DTYPES:
            raise ConvBertError(f"{self.prefix}: variable {name} has type {e.dtype_name}, not a numeric tensor")
        dtype = DTYPES[e.dtype]
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.size != count * dtype.itemsize:
            raise ConvBertError(f"{self.prefix}.index: variable {name}: {e.size} bytes recorded for shape "
                                f"{list(e.shape)} of {e.dtype_name} ({count * dtype.itemsize} expected)")
        if not 0 <= e.shard < self.num_shards:
            raise ConvBertError(f"{self.prefix}.index: variable {name} names data shard {e.shard} of {self.num_shards}")
        buf = self._shard(e.shard)
        if e.offset + e.size > len(buf):
            raise ConvBertError(f"{self.data_file(e.shard)}: {len(buf)} bytes, but variable {name} ends at byte "
                                f"{e.offset + e.size} (truncated download?)")
        raw = bytes(buf[e.offset:e.offset + e.size])
        if verify and e.crc32c is not None and masked_crc32c(raw) != e.crc32c:
            raise ConvBertError(f"{self.data_file(e.shard)}: variable {name}: checksum mismatch (corrupt file)")
        array = np.frombuffer(raw, dtype=dtype).reshape(e.shape)
        if e.dtype == DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.copy()

    def close(self) -> None:
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                m.close()
        self._maps.clear()

    def __enter__(self) -> "TFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC32C (the checksum its checkpoints store for each tensor)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
