"""Triton kernels for FILM's hot paths (``backend="triton"``).

Importing this package registers every op with :mod:`film_fast.ops.dispatch`
(an ``ImportError`` from ``import triton`` propagates, and dispatch reports it
as the reason the backend is unavailable) plus a device verifier: CUDA tensors
need a CUDA device; CPU tensors run only under the Triton interpreter
(``TRITON_INTERPRET=1``, a test tool, ~1000x slower than the torch backend).

One file per op (kernels, host launcher, ``torch.autograd.Function``):

* ``warp.py``               backward bilinear warp, atomic and deterministic backward
* ``upsample_flow.py``      ``resize_bilinear(2 flow) (+ residual)``
* ``upsample_flow_warp.py`` fused flow upsample + warp (writes into an ``out=`` slice)
* ``conv2d.py``             implicit-GEMM 'same' conv (+bias, LeakyReLU), its backward kernels
* ``conv2d_levels.py``      one conv over several pyramid levels in one launch (``out=``:
  straight into level-buffer slices)
* ``conv2d_pool.py``        conv with a fused 2x2 average-pool epilogue
* ``upsample_conv2x2.py``   nearest resize + 2x2 conv without materialising the resize
  (``out=``: straight into a fusion-buffer slice)
* ``avg_pool2x2.py``        2x2 average pooling (``out=``: straight into a buffer slice)
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError -> "triton backend unavailable (...)")

from film_fast.ops.dispatch import register, register_verifier

# Submodules stay importable as modules (film_fast.kernels.triton.warp is the file, and the op is
# film_fast.kernels.triton.warp.warp): the ops are reached through film_fast.ops anyway.
from . import (avg_pool2x2, conv2d, conv2d_levels, conv2d_pool, upsample_conv2x2, upsample_flow,
               upsample_flow_warp, warp, utils)

# triton.jit picks compiled vs interpreted kernels when the decorators run, i.e. now.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

OPS = {
    "warp": warp.warp,
    "warp_into": lambda image, flow, out: warp.warp_fwd(image, flow, out=out),
    "upsample_flow": upsample_flow.upsample_flow,
    "upsample_flow_warp": upsample_flow_warp.upsample_flow_warp,
    "conv2d": conv2d.conv2d,
    "conv2d_levels": conv2d_levels.conv2d_levels,
    "conv2d_levels_into": conv2d_levels.conv2d_levels_into,
    "conv2d_pool": conv2d_pool.conv2d_pool,
    "upsample_conv2x2": upsample_conv2x2.upsample_conv2x2,
    "upsample_conv2x2_into": upsample_conv2x2.upsample_conv2x2_into,
    "avg_pool2x2": avg_pool2x2.avg_pool2x2,
    "avg_pool2x2_into": avg_pool2x2.avg_pool2x2_into,
}

for _name, _fn in OPS.items():
    register(_name, "triton")(_fn)


def _verify(device: torch.device):
    """``(ok, reason)``: can the Triton kernels run on tensors of ``device``?"""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available():
            return True, ""
        return False, "Triton needs a CUDA device, and torch.cuda.is_available() is False"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if _INTERPRETED:
            return True, ""
        return False, ("TRITON_INTERPRET=1 was set after film_fast.kernels.triton was imported; "
                       "set it before the first import to run Triton kernels on CPU tensors")
    return False, "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"


register_verifier("triton", _verify)

__all__ = ["OPS", "avg_pool2x2", "conv2d", "conv2d_levels", "conv2d_pool", "upsample_conv2x2",
           "upsample_flow", "upsample_flow_warp", "warp", "utils"]
