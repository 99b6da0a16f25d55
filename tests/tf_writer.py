"""Test-only writers for TF2 SavedModel pieces: a tensor bundle and the saved_model.pb object graph.

The golden fixtures ship the small model's ``variables/`` exactly as TF wrote
them but not ``saved_model.pb``; these helpers build the object-graph part of
one (and whole bundles with modified weights) so the reader is exercised the
way a real SavedModel exercises it.
"""
from __future__ import annotations

import os
import struct
from typing import Dict, List, Sequence

import numpy as np

from film_fast.checkpoints.protowire import encode_varint, field_bytes, field_varint
from film_fast.checkpoints.tf_bundle import TABLE_MAGIC, masked_crc32c

_DT = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("float16"): 19}


def _block(entries: Sequence[tuple]) -> bytes:
    out = bytearray()
    restarts = []
    for key, value in entries:
        restarts.append(len(out))
        out += encode_varint(0) + encode_varint(len(key)) + encode_varint(len(value)) + key + value
    if not restarts:
        restarts = [0]
    for r in restarts:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts))
    return bytes(out)


def _write_block(f, block: bytes) -> bytes:
    offset = f.tell()
    f.write(block)
    f.write(b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
    return encode_varint(offset) + encode_varint(len(block))


def write_table(path: str, table: Dict[bytes, bytes]) -> None:
    """Writes a LevelDB-format sorted table with one data block."""
    entries = sorted(table.items())
    with open(path, "wb") as f:
        data_handle = _write_block(f, _block(entries))
        meta_handle = _write_block(f, _block([]))
        index_handle = _write_block(f, _block([(entries[-1][0], data_handle)]))
        footer = meta_handle + index_handle
        f.write(footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC))


def write_bundle(prefix: str, tensors: Dict[str, np.ndarray], extra_strings: Dict[str, bytes] = None) -> None:
    """Writes ``prefix.index`` + ``prefix.data-00000-of-00001`` holding ``tensors``."""
    table = {b"": field_varint(1, 1) + field_bytes(3, field_varint(1, 1))}
    data = bytearray()
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(field_bytes(2, field_varint(1, d)) for d in arr.shape)
        entry = (field_varint(1, _DT[arr.dtype]) + field_bytes(2, shape) + field_varint(4, len(data))
                 + field_varint(5, len(raw)) + encode_varint((6 << 3) | 5)
                 + struct.pack("<I", masked_crc32c(raw)))
        table[key.encode()] = entry
        data += raw
    for key, value in (extra_strings or {}).items():
        raw = encode_varint(len(value)) + b"\x00\x00\x00\x00" + value
        entry = (field_varint(1, 7) + field_bytes(2, b"") + field_varint(4, len(data))
                 + field_varint(5, len(raw)))
        table[key.encode()] = entry
        data += raw
    write_table(prefix + ".index", table)
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(bytes(data))


def _saved_object(children: List[tuple], variable_name: str = None) -> bytes:
    out = b"".join(field_bytes(1, field_varint(1, node) + field_bytes(2, name)) for name, node in children)
    if variable_name is None:
        out += field_bytes(4, field_bytes(1, "_generic_user_object"))  # user_object.identifier
    else:
        out += field_bytes(7, field_varint(1, 1) + field_bytes(6, variable_name))
    return out


def saved_model_pb(variable_names: Sequence[str], decoy_first: bool = True) -> bytes:
    """A ``saved_model.pb`` whose object graph names ``variables/<i>`` -> ``variable_names[i]``.

    Like a Keras export, the root also reaches each variable through layer
    attributes (``layer_with_weights-k/kernel``); with ``decoy_first`` that path
    is listed after ``variables`` so the BFS first-path rule is exercised.
    """
    n = len(variable_names)
    # node 0 root, node 1 the "variables" list, nodes 2.. the variables, node 2+n a layer object
    var_nodes = list(range(2, 2 + n))
    layer_node = 2 + n
    root_children = [("variables", 1), ("layer_with_weights-0", layer_node)]
    if not decoy_first:
        root_children.reverse()
    nodes = [_saved_object(root_children),
             _saved_object([(str(i), var_nodes[i]) for i in range(n)])]
    nodes += [_saved_object([], name) for name in variable_names]
    nodes.append(_saved_object([("kernel", var_nodes[0])]))
    graph = b"".join(field_bytes(1, node) for node in nodes)
    meta_graph = field_bytes(7, graph)
    return field_varint(1, 1) + field_bytes(2, meta_graph)


def write_saved_model(directory: str, variables: Dict[str, np.ndarray], with_pb: bool = True) -> None:
    """Writes a SavedModel-like directory: ``variables/variables.*`` (+ ``saved_model.pb``)."""
    names = list(variables)
    os.makedirs(os.path.join(directory, "variables"), exist_ok=True)
    write_bundle(os.path.join(directory, "variables", "variables"),
                 {f"variables/{i}/.ATTRIBUTES/VARIABLE_VALUE": variables[name]
                  for i, name in enumerate(names)})
    if with_pb:
        with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
            f.write(saved_model_pb([name + ":0" if not name.endswith(":0") else name for name in names]))
