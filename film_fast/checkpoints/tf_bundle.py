"""Reader for TensorFlow's tensor-bundle checkpoints (``variables.index`` + ``.data-*``), no TF needed.

Format (TF 2.x, as found inside a SavedModel's ``variables/`` folder):

* ``variables.index`` is a LevelDB-style sorted table: data blocks of
  prefix-compressed ``key -> value`` entries, an index block, and a 48-byte
  footer ``(metaindex handle, index handle, padding, magic 0xdb4775248b80fb57)``.
  Every block is followed by a 5-byte trailer (compression type, crc). The
  value of the empty key is a ``BundleHeaderProto``; every other value is a
  ``BundleEntryProto`` (dtype, shape, shard_id, offset, size, crc32c).
* ``variables.data-SSSSS-of-NNNNN`` holds the raw little-endian tensor bytes.
  String tensors are stored as varint lengths, a 4-byte checksum of the
  lengths, then the bytes.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import CheckpointError

from .protowire import ProtoError, decode, first, read_varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# tensorflow/core/framework/types.proto DataType -> numpy dtype
_DTYPES = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"),
    5: np.dtype("<i2"), 6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"),
    17: np.dtype("<u2"), 19: np.dtype("<f2"), 22: np.dtype("<u4"), 23: np.dtype("<u8"),
}
DT_STRING = 7
DT_BFLOAT16 = 14


class CheckpointFormatError(CheckpointError):
    """The files are not a readable TF tensor bundle; the message names file and problem."""


@dataclass
class BundleEntry:
    key: str
    dtype: int
    shape: Tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: Optional[int]


def _read_block(data: bytes, offset: int, size: int, path: str) -> bytes:
    if offset + size + BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointFormatError(f"{path}: block at {offset} (+{size}) runs past the end of the file")
    kind = data[offset + size]
    if kind != 0:
        raise CheckpointFormatError(
            f"{path}: block at {offset} is compressed (type {kind}); only uncompressed tables "
            "(what TF writes for checkpoints) are supported")
    return data[offset:offset + size]


def _block_entries(block: bytes, path: str) -> List[Tuple[bytes, bytes]]:
    if len(block) < 4:
        raise CheckpointFormatError(f"{path}: block too short")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointFormatError(f"{path}: corrupt block restart array")
    entries = []
    pos = 0
    key = b""
    while pos < end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        vlen, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise CheckpointFormatError(f"{path}: corrupt block entry at {pos}")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + vlen]))
        pos += vlen
    return entries


def read_table(path: str) -> Dict[bytes, bytes]:
    """Reads every ``key -> value`` of a LevelDB/TF sorted-table file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < FOOTER_SIZE:
        raise CheckpointFormatError(f"{path}: {len(data)} bytes is too short for a TF index table")
    magic = struct.unpack_from("<Q", data, len(data) - 8)[0]
    if magic != TABLE_MAGIC:
        raise CheckpointFormatError(f"{path}: not a TF checkpoint index (bad table magic {magic:#x})")
    pos = len(data) - FOOTER_SIZE
    try:
        _meta_off, pos = read_varint(data, pos)
        _meta_size, pos = read_varint(data, pos)
        index_off, pos = read_varint(data, pos)
        index_size, pos = read_varint(data, pos)
        table: Dict[bytes, bytes] = {}
        for _, handle in _block_entries(_read_block(data, index_off, index_size, path), path):
            block_off, p = read_varint(handle, 0)
            block_size, _ = read_varint(handle, p)
            for key, value in _block_entries(_read_block(data, block_off, block_size, path), path):
                table[key] = value
    except ProtoError as e:
        raise CheckpointFormatError(f"{path}: corrupt index table ({e})") from None
    return table


def _crc32c_table() -> List[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE: Optional[List[int]] = None


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), pure Python (~10 MB/s: used for small tensors only)."""
    global _CRC_TABLE
    if _CRC_TABLE is None:
        _CRC_TABLE = _crc32c_table()
    t = _CRC_TABLE
    c = 0xFFFFFFFF
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TF stores CRCs masked (rotated right by 15 bits plus a constant)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# Pure-Python CRC costs ~0.1 s per MB; above this many bytes per tensor we check sizes only.
CRC_CHECK_LIMIT = 1 << 20


class TensorBundle:
    """A TF checkpoint given its prefix (``.../variables/variables``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        index_path = prefix + ".index"
        if not os.path.isfile(index_path):
            raise CheckpointFormatError(f"{index_path}: no such file (expected a TF checkpoint index)")
        table = read_table(index_path)
        header = decode(table.pop(b"", b""))
        self.num_shards = first(header, 1, 1)
        if first(header, 2, 0) != 0:
            raise CheckpointFormatError(f"{index_path}: big-endian checkpoints are not supported")
        self.entries: Dict[str, BundleEntry] = {}
        for key, value in table.items():
            msg = decode(value)
            shape_msg = decode(first(msg, 2, b""))
            dims = tuple(first(decode(d), 1, 0) for d in shape_msg.get(2, []))
            if msg.get(7):
                raise CheckpointFormatError(f"{index_path}: partitioned variable {key!r} is not supported")
            name = key.decode("utf-8", "replace")
            self.entries[name] = BundleEntry(
                key=name, dtype=first(msg, 1, 0), shape=dims, shard=first(msg, 3, 0),
                offset=first(msg, 4, 0), size=first(msg, 5, 0), crc32c=first(msg, 6))
        self._shards: Dict[int, bytes] = {}

    def keys(self) -> List[str]:
        return sorted(self.entries)

    def _raw(self, entry: BundleEntry) -> bytes:
        if entry.shard not in self._shards:
            path = f"{self.prefix}.data-{entry.shard:05d}-of-{self.num_shards:05d}"
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"{path}: missing data shard for tensor {entry.key!r}")
            with open(path, "rb") as f:
                self._shards[entry.shard] = f.read()
        data = self._shards[entry.shard]
        if entry.offset + entry.size > len(data):
            raise CheckpointFormatError(
                f"{self.prefix}: tensor {entry.key!r} lies past the end of its data shard "
                f"(offset {entry.offset} + {entry.size} > {len(data)}; truncated file?)")
        raw = data[entry.offset:entry.offset + entry.size]
        # String tensors checksum their lengths differently; only numeric ones are checked.
        if (entry.crc32c is not None and entry.size <= CRC_CHECK_LIMIT and entry.dtype != DT_STRING
                and masked_crc32c(raw) != entry.crc32c):
            raise CheckpointFormatError(f"{self.prefix}: checksum mismatch for tensor {entry.key!r}")
        return raw

    def read(self, key: str) -> np.ndarray:
        """The tensor stored under ``key`` (numpy; bfloat16 comes back as float32)."""
        entry = self.entries[key]
        raw = self._raw(entry)
        count = int(np.prod(entry.shape)) if entry.shape else 1
        if entry.dtype == DT_BFLOAT16:
            bits = np.frombuffer(raw, dtype="<u2", count=count).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(entry.shape)
        dtype = _DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointFormatError(f"{self.prefix}: tensor {entry.key!r} has unsupported "
                                        f"TF dtype {entry.dtype}")
        if count * dtype.itemsize != entry.size:
            raise CheckpointFormatError(
                f"{self.prefix}: tensor {entry.key!r} has {entry.size} bytes, shape {entry.shape} "
                f"needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(entry.shape).copy()

    def read_strings(self, key: str) -> List[bytes]:
        """A DT_STRING tensor: varint lengths, 4-byte checksum, then the bytes."""
        entry = self.entries[key]
        if entry.dtype != DT_STRING:
            raise CheckpointFormatError(f"{self.prefix}: {key!r} is not a string tensor")
        raw = self._raw(entry)
        count = int(np.prod(entry.shape)) if entry.shape else 1
        lengths = []
        pos = 0
        for _ in range(count):
            n, pos = read_varint(raw, pos)
            lengths.append(n)
        pos += 4
        out = []
        for n in lengths:
            out.append(raw[pos:pos + n])
            pos += n
        return out
