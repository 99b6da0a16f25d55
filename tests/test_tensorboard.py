"""The dependency-free TensorBoard event writer: CRC, hand-encoded protos, round trip."""
from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest

from film_fast.training.tensorboard import (EventFileError, EventWriter, crc32c, encode_event, masked_crc32c,
                                            read_events, read_scalars)

SCALARS = [("loss/total", 0, 1.25), ("loss/l1", 1, 0.1), ("loss/vgg", 7, -3.5e-7),
           ("lr", 2 ** 40, 1e-4), ("loss/total", 1_500_001, 123456.789)]


def write(logdir):
    with EventWriter(str(logdir)) as tb:
        for tag, step, value in SCALARS:
            tb.add_scalar(tag, value, step)
        tb.add_scalars({"a": 1.0, "b": 2.0}, step=3)
        return tb.path


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4 test vector
    crc = crc32c(b"abc")
    assert masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_bytes_match_hand_encoding():
    got = encode_event(1.5, 3, scalars={"a": 2.0})
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 2.0)           # tag=1 (string), simple_value=2 (fixed32)
    summary = b"\x0a" + bytes([len(value)]) + value                   # Summary.value = 1
    want = b"\x09" + struct.pack("<d", 1.5) + b"\x10\x03" + b"\x2a" + bytes([len(summary)]) + summary
    assert got == want
    assert encode_event(2.0, 0, file_version="brain.Event:2") == (
        b"\x09" + struct.pack("<d", 2.0) + b"\x1a\x0dbrain.Event:2")


def test_round_trip(tmp_path):
    path = write(tmp_path)
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+", os.path.basename(path))
    events = read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["step"] == 0
    want = [(t, s, float(np.float32(v))) for t, s, v in SCALARS] + [("a", 3, 1.0), ("b", 3, 2.0)]
    assert read_scalars(path) == want
    # Framing: the first record's length field is the size of its Event bytes.
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack_from("<Q", data, 0)
    assert data[12:12 + length] == encode_event(events[0]["wall_time"], 0, file_version="brain.Event:2")


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_corruption_is_detected(tmp_path, where):
    path = write(tmp_path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    (first_len,) = struct.unpack_from("<Q", data, 0)
    second = 12 + first_len + 4  # offset of the second record
    (length,) = struct.unpack_from("<Q", data, second)
    offset = {"length": second, "length_crc": second + 9, "data": second + 12 + length // 2,
              "data_crc": second + 12 + length + 1}[where]
    data[offset] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(EventFileError, match=f"byte {second}"):
        read_scalars(path)


def test_truncated_file_raises(tmp_path):
    path = write(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-3])
    with pytest.raises(ValueError, match="past the end"):
        read_scalars(path)


def test_two_writers_never_share_a_file_and_closed_writer_raises(tmp_path):
    a = EventWriter(str(tmp_path))
    b = EventWriter(str(tmp_path))
    assert a.path != b.path
    a.close()
    a.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        a.add_scalar("x", 1.0, 1)
    b.add_scalar("x", 2.0, 5)
    b.flush()
    assert read_scalars(b.path) == [("x", 5, 2.0)]  # readable while the writer is still open
    b.close()


def test_tensorboard_package_reads_the_file(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    path = write(tmp_path)
    acc = ea_mod.EventAccumulator(path, size_guidance={ea_mod.SCALARS: 0})
    acc.Reload()
    got = [(t, e.step, e.value) for t in acc.Tags()["scalars"] for e in acc.Scalars(t)]
    want = [(t, s, float(np.float32(v))) for t, s, v in SCALARS] + [("a", 3, 1.0), ("b", 3, 2.0)]
    assert sorted(got) == sorted(want)
