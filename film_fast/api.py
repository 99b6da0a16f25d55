"""``film_fast.load``: one call for every FILM checkpoint people hold."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .checkpoints import read_checkpoint
from .errors import CheckpointError
from .cpu_features import warn_if_slow
from .model import FILM, check_ensemble
from .options import Options

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# Where a trained built-in model will ship (issue: training and the built-in model).
BUILTIN_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                             "film_fast_default.safetensors")


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """``None`` -> float32; accepts torch dtypes and 'fp32' / 'fp16' / 'bf16' (and long names)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of fp32, fp16, bf16")
    return DTYPES[key]


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """``None`` -> the current CUDA device when one is present, else CPU."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of an inference tensor (one read inside inference_mode)."""
    return t.clone() if t.is_inference() else t


def load(path: Optional[Union[str, os.PathLike]] = None, *, device=None, dtype=None,
         backend: Optional[str] = "auto", pyramid_levels: Optional[int] = None,
         options: Optional[Options] = None, padding: Optional[str] = None,
         ensemble: int = 1) -> FILM:
    """Loads FILM weights from any supported checkpoint into a :class:`FILM` in eval mode.

    Args:
        path: a TF2 SavedModel directory (official L1/VGG/Style), the port's
            TorchScript ``film_net_fp32.pt`` / ``film_net_fp16.pt``, a state dict
            ``.pt`` with the port's or film_fast's keys, or a film_fast
            ``.safetensors``. ``None`` loads the built-in default model.
        device: default: CUDA if available, else CPU.
        dtype: ``torch.float32`` (default), ``torch.float16``, ``torch.bfloat16``
            or ``"fp32" | "fp16" | "bf16"``.
        backend: ``"auto" | "torch" | "triton" | "cupy"``; ``None`` reads
            ``FILM_FAST_BACKEND``.
        pyramid_levels: needed only for non-published configs whose file does not
            record it (state dicts, TF checkpoints).
        options: the full architecture, overriding inference.
        padding: how sizes that are not multiples of ``2^(pyramid_levels-1)`` are padded:
            ``"zeros"`` (the official wrapper's) or ``"replicate"``; default: what the
            file records (the built-in model: ``"replicate"``), else ``"zeros"``.
        ensemble: test-time flip ensemble, 1 (off) to 4 (:meth:`FILM.set_ensemble`): N times
            the work for a better frame.
    Returns:
        ``FILM``; call it as ``model(x0, x1, batch_dt)``.
    Raises:
        CheckpointError: the file is missing, unreadable, of an unknown kind, or
            its tensors do not fit (the message names the first offending tensor).
    """
    if path is None:
        if not os.path.isfile(BUILTIN_MODEL):
            raise CheckpointError(
                "film_fast has no built-in trained model yet: pass the weights you have, e.g. "
                "film_fast.load('film_net_fp32.pt') (the PyTorch port's TorchScript file) or "
                "film_fast.load('pretrained_models/film_net/Style/saved_model') (official TF2); "
                "see the README's 'Weights' section")
        path = BUILTIN_MODEL
    check_ensemble(ensemble)  # before any file is read
    target_dtype = resolve_dtype(dtype)
    target_device = resolve_device(device)
    warn_if_slow(target_device, target_dtype, f"film_fast.load(dtype={target_dtype})")
    ckpt = read_checkpoint(path, pyramid_levels=pyramid_levels, options=options,
                           padding=padding)
    # (outside inference_mode even when called in it: see FILM.__init__)
    with torch.inference_mode(False):
        with torch.device("meta"):
            model = FILM(ckpt.options, backend=backend)
        state = {k: _normal(v).to(dtype=target_dtype).contiguous()
                 for k, v in ckpt.state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(target_device)
    model.source = ckpt.describe()
    return model.set_ensemble(ensemble).eval()
