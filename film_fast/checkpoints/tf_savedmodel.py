"""Official TF2 SavedModels (film_net L1/VGG/Style) read without TensorFlow.

The weights live in ``variables/variables.{index,data-*}`` under keys such as
``variables/12/.ATTRIBUTES/VARIABLE_VALUE``. Their layer names are resolved,
in order of preference, from

1. ``saved_model.pb``: the ``SavedObjectGraph`` (``SavedModel.meta_graphs[0]
   .object_graph_def``); the key's path (``variables`` -> ``12``) is walked
   from the root object through ``children`` local names to a node whose
   ``SavedVariable.name`` is the layer name;
2. the checkpoint's own ``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor, whose
   serialized tensors carry ``full_name`` next to ``checkpoint_key``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from .protowire import ProtoError, decode, first
from .tf_bundle import CheckpointFormatError, TensorBundle

ATTRIBUTE_MARK = ".ATTRIBUTES"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def split_checkpoint_key(key: str) -> List[str]:
    """Splits ``a/b/.ATTRIBUTES/X`` into object-path local names (TF escapes '/' as './' and '.' as '..')."""
    path = key[:key.index("/" + ATTRIBUTE_MARK)] if ("/" + ATTRIBUTE_MARK) in key else key
    names, cur, i = [], [], 0
    while i < len(path):
        c = path[i]
        if c == "." and i + 1 < len(path) and path[i + 1] in "./":
            cur.append(path[i + 1])
            i += 2
            continue
        if c == "/":
            names.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    names.append("".join(cur))
    return names


def names_from_saved_model(pb_path: str) -> Dict[Tuple[str, ...], str]:
    """Maps object paths (``("variables", "12")``) to variable names, from saved_model.pb."""
    with open(pb_path, "rb") as f:
        data = f.read()
    try:
        saved_model = decode(data)
        meta_graphs = saved_model.get(2, [])
        if not meta_graphs:
            raise CheckpointFormatError(f"{pb_path}: SavedModel has no meta graph")
        graph = decode(first(decode(meta_graphs[0]), 7, b""))
        nodes = [decode(n) for n in graph.get(1, [])]
    except ProtoError as e:
        raise CheckpointFormatError(f"{pb_path}: not a SavedModel protobuf ({e})") from None
    if not nodes:
        raise CheckpointFormatError(f"{pb_path}: SavedModel has no object graph")
    children = []
    for node in nodes:
        refs = {}
        for ref in node.get(1, []):
            r = decode(ref)
            refs[first(r, 2, b"").decode("utf-8")] = first(r, 1, 0)
        children.append(refs)
    out: Dict[Tuple[str, ...], str] = {}

    # Breadth-first from the root, first path wins (as TF's checkpoint view does).
    seen = {0}
    queue: List[Tuple[int, Tuple[str, ...]]] = [(0, ())]
    while queue:
        node_id, path = queue.pop(0)
        variable = first(nodes[node_id], 7)
        if variable is not None and path:
            name = first(decode(variable), 6, b"").decode("utf-8")
            if name:
                out[path] = name
        for local, child in children[node_id].items():
            if child not in seen and 0 <= child < len(nodes):
                seen.add(child)
                queue.append((child, path + (local,)))
    return out


def names_from_object_graph(bundle: TensorBundle) -> Dict[str, str]:
    """Maps checkpoint keys to ``full_name`` from the bundle's ``_CHECKPOINTABLE_OBJECT_GRAPH``."""
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in bundle.entries:
        return {}
    try:
        graph = decode(bundle.read_strings("_CHECKPOINTABLE_OBJECT_GRAPH")[0])
        out = {}
        for node in graph.get(1, []):
            for attr in decode(node).get(2, []):
                a = decode(attr)
                full_name = first(a, 2, b"").decode("utf-8")
                key = first(a, 3, b"").decode("utf-8")
                if full_name and key:
                    out[key] = full_name
        return out
    except ProtoError as e:
        raise CheckpointFormatError(f"{bundle.prefix}: corrupt _CHECKPOINTABLE_OBJECT_GRAPH ({e})") from None


def find_variables_prefix(path: str) -> Tuple[str, Optional[str]]:
    """``(checkpoint prefix, saved_model.pb path or None)`` for a SavedModel dir or a checkpoint."""
    if os.path.isdir(path):
        pb = os.path.join(path, "saved_model.pb")
        for prefix in (os.path.join(path, "variables", "variables"), os.path.join(path, "variables")):
            if os.path.isfile(prefix + ".index"):
                return prefix, pb if os.path.isfile(pb) else None
        parent_pb = os.path.join(os.path.dirname(os.path.abspath(path)), "saved_model.pb")
        if os.path.basename(os.path.normpath(path)) == "variables" and os.path.isfile(parent_pb):
            return os.path.join(path, "variables"), parent_pb
        raise CheckpointFormatError(f"{path}: directory has no variables/variables.index; not a "
                                    "TF SavedModel")
    prefix = path[:-len(".index")] if path.endswith(".index") else path
    pb = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(prefix))), "saved_model.pb")
    return prefix, pb if os.path.isfile(pb) else None


def read_savedmodel(path: str) -> Tuple[Dict[str, np.ndarray], str]:
    """Returns ``({official variable name: HWIO array}, where the names came from)``."""
    prefix, pb = find_variables_prefix(path)
    bundle = TensorBundle(prefix)
    keys = [k for k in bundle.keys() if k.endswith(VALUE_SUFFIX)]
    names: Dict[str, str] = {}
    source = ""
    if pb is not None:
        by_path = names_from_saved_model(pb)
        for k in keys:
            name = by_path.get(tuple(split_checkpoint_key(k)))
            if name:
                names[k] = name
        source = "saved_model.pb object graph"
    if len(names) < len(keys):
        graph_names = names_from_object_graph(bundle)
        for k in keys:
            if k not in names and k in graph_names:
                names[k] = graph_names[k]
                source = source or "checkpoint object graph"
    unnamed = [k for k in keys if k not in names]
    if unnamed:
        raise CheckpointFormatError(
            f"{prefix}: cannot resolve the layer name of {unnamed[0]!r} ({len(unnamed)} unresolved); "
            "keep saved_model.pb next to the variables/ folder")
    out = {}
    for key in keys:
        name = names[key]
        if name.endswith(":0"):
            name = name[:-2]
        out[name] = bundle.read(key)
    return out, source
