"""A dependency-free TensorBoard event-file writer and reader (scalars only).

File format, as TensorFlow's ``EventsWriter`` writes it and TensorBoard reads it:

* name ``events.out.tfevents.<unix seconds, 10 digits>.<hostname>`` (TensorBoard
  picks up any file whose name contains ``tfevents``);
* a sequence of TFRecords, each ``uint64 length | uint32 masked_crc32c(length bytes)
  | data | uint32 masked_crc32c(data)``, little-endian; the CRC is CRC-32C
  (Castagnoli) masked as ``((crc >> 15 | crc << 17) + 0xa282ead8) mod 2^32``;
* each record's data is a serialized ``tensorflow.Event``:
  ``wall_time`` (1, double), ``step`` (2, int64), ``file_version`` (3, string; the
  first record says ``"brain.Event:2"``) or ``summary`` (5, ``Summary``), where
  ``Summary.value`` (1) is ``{tag (1, string), simple_value (2, float)}``.

The protobuf bytes are encoded by hand (varints, fixed64 double, fixed32 float) with
the wire helpers of :mod:`film_fast.checkpoints.protowire`; CRC-32C is the
table-driven pure-Python one of :mod:`film_fast.checkpoints.tf_bundle` (events are
tiny, so its ~10 MB/s is plenty).
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import List, Mapping, Optional, Tuple

from ..checkpoints.protowire import ProtoError, decode, encode_varint, field_bytes, field_varint, first
from ..checkpoints.tf_bundle import crc32c, masked_crc32c

__all__ = ["EventWriter", "read_scalars", "EventFileError", "crc32c", "masked_crc32c",
           "encode_event", "FILE_VERSION"]

FILE_VERSION = "brain.Event:2"


class EventFileError(ValueError):
    """An event file is truncated, corrupt (CRC mismatch) or not an event file."""


def _field_double(number: int, value: float) -> bytes:
    return encode_varint((number << 3) | 1) + struct.pack("<d", value)


def _field_float(number: int, value: float) -> bytes:
    return encode_varint((number << 3) | 5) + struct.pack("<f", value)


def encode_event(wall_time: float, step: int = 0, file_version: Optional[str] = None,
                 scalars: Optional[Mapping[str, float]] = None) -> bytes:
    """Serializes one ``Event`` with either ``file_version`` or a scalar ``summary``.

    proto3 omits default scalars, so ``step == 0`` is not written (readers default it).
    """
    out = _field_double(1, float(wall_time))
    if step:
        out += field_varint(2, int(step))  # negative int64 -> 10-byte two's complement varint
    if file_version is not None:
        out += field_bytes(3, file_version)
    if scalars:
        summary = b"".join(field_bytes(1, field_bytes(1, tag) + _field_float(2, float(value)))
                           for tag, value in scalars.items())
        out += field_bytes(5, summary)
    return out


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Appends scalar summaries to a new event file in ``logdir``.

    Usage::

        with EventWriter("runs/exp1") as tb:
            tb.add_scalar("loss/total", 0.12, step=100)

    Args:
        logdir: created if missing.
        filename_suffix: appended to the file name (like TF's ``filename_suffix``).
        flush_secs: ``add_*`` flushes to disk when this long has passed since the last
            flush, so a running TensorBoard sees progress; ``flush()`` forces it.

    ``self.path`` is the file. If a file of that name already exists (two writers in
    the same second), ``.<pid>.<n>`` is appended rather than overwriting it.
    """

    def __init__(self, logdir: str, filename_suffix: str = "", flush_secs: float = 10.0):
        logdir = os.fspath(logdir)
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        base = os.path.join(logdir, f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}")
        path = base + filename_suffix
        n = 0
        while os.path.exists(path):
            n += 1
            path = f"{base}.{os.getpid()}.{n}{filename_suffix}"
        self.path = path
        # "xb": never clobber a file another writer created between the check and the open.
        self._f = open(path, "xb")
        self._flush_secs = float(flush_secs)
        self._last_flush = time.monotonic()
        self._write(encode_event(now, 0, file_version=FILE_VERSION))
        self.flush()

    def _write(self, data: bytes) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: EventWriter is closed")
        self._f.write(_frame(data))
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def add_scalar(self, tag: str, value: float, step: int, wall_time: Optional[float] = None) -> None:
        """Writes one scalar (stored as float32, like TensorBoard's ``simple_value``)."""
        self.add_scalars({tag: value}, step, wall_time)

    def add_scalars(self, values: Mapping[str, float], step: int, wall_time: Optional[float] = None) -> None:
        """Writes several ``{tag: value}`` scalars as one event at ``step``."""
        if not values:
            return
        scalars = {str(tag): float(v) for tag, v in values.items()}  # float() also takes 0-d tensors
        self._write(encode_event(time.time() if wall_time is None else wall_time, int(step), scalars=scalars))

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flushes and closes; later ``close()`` calls do nothing."""
        if self._f is not None:
            self._f.flush()
            self._f.close()
            self._f = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def read_events(path: str) -> List[dict]:
    """Parses every record of an event file, verifying both CRCs of each.

    Returns ``[{"wall_time": float, "step": int, "file_version": str | None,
    "scalars": [(tag, value)]}]``. Raises :class:`EventFileError` naming the file and
    the record's byte offset on a truncated record or a CRC mismatch.
    """
    with open(path, "rb") as f:
        data = f.read()
    events = []
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise EventFileError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack_from("<Q", data, pos)
        (len_crc,) = struct.unpack_from("<I", data, pos + 8)
        if masked_crc32c(header) != len_crc:
            raise EventFileError(f"{path}: length CRC mismatch in the record at byte {pos}")
        start = pos + 12
        end = start + length
        if end + 4 > len(data):
            raise EventFileError(f"{path}: record at byte {pos} runs past the end of the file")
        body = data[start:end]
        (data_crc,) = struct.unpack_from("<I", data, end)
        if masked_crc32c(body) != data_crc:
            raise EventFileError(f"{path}: data CRC mismatch in the record at byte {pos}")
        try:
            events.append(_decode_event(body))
        except (ProtoError, UnicodeDecodeError, struct.error) as e:
            raise EventFileError(f"{path}: record at byte {pos} is not an Event proto: {e}") from e
        pos = end + 4
    return events


def _decode_event(body: bytes) -> dict:
    msg = decode(body)
    wall = first(msg, 1)
    version = first(msg, 3)
    scalars = []
    for summary in msg.get(5, []):
        for value in decode(summary).get(1, []):
            v = decode(value)
            if 2 in v:  # simple_value; tensor/image/histogram values are skipped
                tag = first(v, 1, b"").decode("utf-8")
                scalars.append((tag, struct.unpack("<f", struct.pack("<I", first(v, 2)))[0]))
    return {
        "wall_time": struct.unpack("<d", struct.pack("<Q", wall))[0] if wall is not None else 0.0,
        "step": _signed64(first(msg, 2, 0)),
        "file_version": version.decode("utf-8") if version is not None else None,
        "scalars": scalars,
    }


def read_scalars(path: str) -> List[Tuple[str, int, float]]:
    """``[(tag, step, value)]`` of every ``simple_value`` in the file, in file order.

    CRCs are verified (see :func:`read_events`); values are float32-exact.
    """
    return [(tag, ev["step"], value) for ev in read_events(path) for tag, value in ev["scalars"]]
