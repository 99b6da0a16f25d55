"""Checkpoint import and export.

Supported inputs (detected from the content, not the file name):

================================  ==========================================================
format                            how it is read
================================  ==========================================================
TF2 SavedModel directory          ``variables/`` tensor bundle read directly (no TensorFlow);
(official L1 / VGG / Style)       names from ``saved_model.pb`` or the checkpoint's graph
TorchScript archive of the port   ``data.pkl`` read by a restricted unpickler (no code runs)
(film_net_fp16.pt / _fp32.pt)
state dict ``.pt`` / ``.pth``     ``torch.load(weights_only=True)``; port or film_fast keys
film_fast ``.safetensors``        ``safetensors``; the config is in the metadata
================================  ==========================================================
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..errors import CheckpointError
from ..options import Options
from .naming import (CheckpointMismatchError, check_state, from_official, from_port, infer_options,
                     is_port_state)
from .tf_bundle import CheckpointFormatError
from .tf_savedmodel import read_savedmodel
from .torchscript import is_torchscript, read_torchscript

__all__ = ["Checkpoint", "read_checkpoint", "save_safetensors", "CheckpointError",
           "CheckpointMismatchError", "CheckpointFormatError", "SAFETENSORS_OPTIONS_KEY"]

SAFETENSORS_OPTIONS_KEY = "film_fast.options"
SAFETENSORS_FORMAT_KEY = "format"


@dataclass
class Checkpoint:
    """Weights in canonical names (OIHW), the inferred architecture and where they came from."""

    state: Dict[str, torch.Tensor]
    options: Options
    format: str
    path: str
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.path} ({self.format})"


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < (1 << 28) and head[8:9] == b"{"


def _canonical(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    if is_port_state(state):
        return from_port(state)
    return dict(state)


def _strip_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # DataParallel / wrapper prefixes ("module.", "model.").
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a global, truncated zip, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(f"{path}: cannot be read as a weights-only PyTorch state dict "
                                    f"({msg})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError(f"{path}: expected a dict of tensors (a state dict), got "
                                    f"{type(obj).__name__}")
    return _strip_prefix(dict(obj))


def read_checkpoint(path: str, *, pyramid_levels: Optional[int] = None,
                    options: Optional[Options] = None,
                    padding: Optional[str] = None) -> Checkpoint:
    """Reads any supported checkpoint into canonical names and infers its :class:`Options`.

    Args:
        path: file or SavedModel directory.
        pyramid_levels: number of pyramid levels when the checkpoint does not
            record it and is not the published config.
        options: the full config, overriding inference (shapes are still checked).
        padding: ``Options.padding`` override (``"zeros"`` | ``"replicate"``); default: the
            file's (film_fast safetensors record it), else ``"zeros"``.
    Raises:
        CheckpointError: unreadable file, unknown format, or tensors that do not fit.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{path}: no such file or directory")
    stored_levels: Optional[int] = None
    stored_options: Optional[Options] = None
    if os.path.isdir(path) or path.endswith(".index"):
        variables, names_from = read_savedmodel(path)
        state = from_official(variables)
        fmt = f"TF2 SavedModel (names from the {names_from})"
    elif os.path.isfile(path) and is_torchscript(path):
        tensors, attrs = read_torchscript(path)
        state = _canonical(_strip_prefix(tensors), path)
        fmt = "TorchScript archive (PyTorch port)"
        if isinstance(attrs.get("pyramid_levels"), int) and not isinstance(attrs.get("pyramid_levels"), bool):
            stored_levels = int(attrs["pyramid_levels"])
    elif os.path.isfile(path) and _is_safetensors(path):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointFormatError(f"{path}: unreadable safetensors file ({e})") from None
        if TRAINING_METADATA_KEY in meta:
            # A `film-fast train` checkpoint: the model's tensors are under "model.", next to the
            # optimizer state, which inference does not need. A run with ema_decay also holds the
            # averaged weights under "ema."; those are what the run exports, so they win.
            ema = {k[len("ema."):]: v for k, v in raw.items() if k.startswith("ema.")}
            raw = {k[len("model."):]: v for k, v in raw.items() if k.startswith("model.")}
            raw.update(ema)
        port = is_port_state(raw)
        state = _canonical(raw, path)
        fmt = "safetensors (PyTorch port keys)" if port else "safetensors (film_fast)"
        if TRAINING_METADATA_KEY in meta:
            fmt = "safetensors (film-fast train checkpoint)"
        if SAFETENSORS_OPTIONS_KEY in meta:
            try:
                stored_options = Options.from_dict(json.loads(meta[SAFETENSORS_OPTIONS_KEY]))
            except (ValueError, TypeError) as e:
                raise CheckpointFormatError(f"{path}: invalid {SAFETENSORS_OPTIONS_KEY} metadata "
                                            f"({e})") from None
    elif os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                magic = f.read(2)
            if magic != b"\x80\x02":  # legacy torch.save pickles start with PROTO 2
                raise CheckpointFormatError(
                    f"{path}: unrecognised checkpoint format (expected a TF2 SavedModel directory, "
                    "a TorchScript .pt, a state dict .pt or a .safetensors file)")
        raw = _read_state_dict(path)
        port = is_port_state(raw)
        state = _canonical(raw, path)
        fmt = "state dict (PyTorch port keys)" if port else "state dict (film_fast)"
    else:
        raise CheckpointFormatError(f"{path}: not a regular file or directory")
    if not state:
        raise CheckpointMismatchError(f"{path}: contains no FILM weights")

    if options is None:
        options = stored_options
    if options is None:
        options = infer_options(state, pyramid_levels if pyramid_levels is not None else stored_levels)
    elif pyramid_levels is not None and pyramid_levels != options.pyramid_levels:
        options = Options.from_dict(dict(options.to_dict(), pyramid_levels=pyramid_levels))
    if padding is not None and padding != options.padding:
        options = Options.from_dict(dict(options.to_dict(), padding=padding))

    from ..model import FILM  # local import: the model imports ops, not checkpoints
    with torch.device("meta"):  # shapes only: no 34 M-parameter allocation
        expected = FILM(options).state_dict()
    check_state(expected, state, path)
    dtypes = {t.dtype for t in state.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return Checkpoint(state=state, options=options, format=fmt, path=path, dtype=dtype)


# Metadata key of `film-fast train` checkpoints (film_fast.training.trainer.META_KEY).
TRAINING_METADATA_KEY = "film_fast.training"


def save_safetensors(model, path: str) -> None:
    """Writes ``model``'s weights and config to ``path`` (film_fast names, config in the metadata).

    Written to a temporary name and renamed, so a failed write leaves nothing behind.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {SAFETENSORS_FORMAT_KEY: "pt", SAFETENSORS_OPTIONS_KEY: model.options.to_json(),
            "film_fast.source": str(getattr(model, "source", ""))}
    write_safetensors_atomically(state, path, meta)


def write_safetensors_atomically(tensors, path: str, metadata) -> None:
    """``safetensors`` ``save_file`` to a temporary name, renamed into place when complete."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
