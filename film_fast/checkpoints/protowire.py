"""Minimal protobuf wire-format reader and writer.

Enough to read TensorFlow's BundleEntryProto, SavedModel object graphs and
TrackableObjectGraph messages without installing TensorFlow or protobuf, and
(for tests) to write the small SavedModel object graph the fixtures lack.

A decoded message is a dict ``field number -> list of values``; varints are
ints, length-delimited fields are ``bytes`` (decode nested messages with
:func:`decode` again), fixed32/fixed64 fields are ints.
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

Value = Union[int, bytes]
Message = Dict[int, List[Value]]


class ProtoError(ValueError):
    """Malformed protobuf bytes."""


def read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    """Decodes a base-128 varint at ``pos``; returns ``(value, new_pos)``."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint longer than 10 bytes")


def decode(buf: bytes) -> Message:
    """Decodes one message's fields (groups are not supported: TF does not use them)."""
    fields: Message = {}
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise ProtoError("truncated fixed64")
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > n:
                raise ProtoError(f"field {number}: length {length} runs past the end")
            value = bytes(buf[pos:pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise ProtoError("truncated fixed32")
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise ProtoError(f"unsupported wire type {wire} for field {number}")
        fields.setdefault(number, []).append(value)
    return fields


def first(msg: Message, number: int, default=None):
    """The first value of field ``number`` (proto3 scalars appear at most once)."""
    values = msg.get(number)
    return values[0] if values else default


def packed_varints(values: List[Value]) -> List[int]:
    """Expands a repeated varint field that may be packed (bytes) or not (ints)."""
    out: List[int] = []
    for v in values:
        if isinstance(v, bytes):
            pos = 0
            while pos < len(v):
                x, pos = read_varint(v, pos)
                out.append(x)
        else:
            out.append(v)
    return out


# ---- writer (used to build fixtures) --------------------------------------------------
def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return encode_varint(number << 3) + encode_varint(value)


def field_bytes(number: int, value: Union[bytes, str]) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return encode_varint((number << 3) | 2) + encode_varint(len(value)) + value
