"""Reads the tensors of a TorchScript archive without running TorchScript or untrusted pickles.

A TorchScript ``.pt`` (what ``torch.jit.save`` writes: film_net_fp16.pt,
film_net_fp32.pt) is a zip holding ``<root>/data.pkl`` (the module tree,
pickled), ``<root>/data/<key>`` (raw storages) and ``<root>/code/`` (the
TorchScript program). ``torch.jit.load`` would compile and run that program;
here ``data.pkl`` is read by a restricted unpickler that only understands
module objects (``__torch__.*`` classes, kept as inert attribute dicts),
``OrderedDict``, storages and ``torch._utils._rebuild_tensor_v2``. Anything else
in the pickle is refused.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Dict, Tuple

import torch

from ..errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class TorchScriptFormatError(CheckpointError):
    """Not a readable TorchScript archive; the message names the file and the problem."""


class _ScriptObject:
    """Inert stand-in for a pickled ``__torch__`` module: just its attribute dict."""

    qualified_name = "__torch__"

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity(value, *_):
    return value


# TorchScript wraps typed containers (a Conv2d's kernel_size, stride, ...) in these builders;
# all of them just return their first argument.
_LIST_BUILDERS = {name: _identity for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
    "build_empty_list", "build_empty_dict", "restore_type_tag")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.root = root
        self.path = path
        self.storages: Dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {"qualified_name": f"{module}.{name}"})
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return _LIST_BUILDERS[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise TorchScriptFormatError(f"{self.path}: refusing to load {module}.{name} from the "
                                     "archive's pickle (only module trees of tensors are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchScriptFormatError(f"{self.path}: unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self.storages:
            name = f"{self.root}/data/{key}"
            try:
                raw = self.archive.read(name)
            except KeyError:
                raise TorchScriptFormatError(f"{self.path}: missing storage {name}") from None
            dtype = storage_type.dtype
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise TorchScriptFormatError(f"{self.path}: storage {name} has {len(raw)} bytes, "
                                             f"needs {numel * itemsize} (truncated file?)")
            self.storages[key] = torch.frombuffer(bytearray(raw[:numel * itemsize]), dtype=dtype)
        return self.storages[key]


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def read_torchscript(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Returns ``(tensors by dotted module path, integer/bool attributes of the root module)``."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchScriptFormatError(f"{path}: not a TorchScript archive ({e})") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise TorchScriptFormatError(f"{path}: zip has no <root>/data.pkl; not a TorchScript archive")
        root = pkl[0].split("/")[0]
        try:
            obj = _RestrictedUnpickler(archive.read(pkl[0]), archive, root, path).load()
        except TorchScriptFormatError:
            raise
        except Exception as e:  # corrupt pickle bytes, truncated zip member, ...
            raise TorchScriptFormatError(f"{path}: cannot read {pkl[0]} ({type(e).__name__}: {e})") from None
    tensors: Dict[str, torch.Tensor] = {}
    attrs: Dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        state = node.__dict__.get("_state", {}) if isinstance(node, _ScriptObject) else node
        if not isinstance(state, dict):
            return
        for key, value in state.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif isinstance(value, (_ScriptObject, dict)):
                walk(value, name + ".")
            elif not prefix and isinstance(value, (int, bool)):
                attrs[key] = value

    walk(obj, "")
    return tensors, attrs
