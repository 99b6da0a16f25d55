"""CuPy backend of ``film_fast.ops`` (installed as ``film_fast.kernels.cupy``).

Importing this package imports :mod:`cupy` (an ImportError propagates: the dispatcher turns
it into the backend's "unavailable" reason), registers every op with
:func:`film_fast.ops.dispatch.register` under ``"cupy"`` and a verifier that accepts CUDA
devices CuPy can see. CuPy may import fine on a machine without a usable GPU; the verifier
then says no.

Each op is a ``<op>.py`` launcher + ``<op>.cu`` source pair, compiled once per
(kernel, dtype, device) by :mod:`._runtime` and launched on PyTorch's current stream:

=====================  =========================  =============================================
op                     module                     kernels
=====================  =========================  =============================================
warp                   warp                       forward, atomic / deterministic image grad,
                                                  flow grad
upsample_flow          upsample_flow              forward, gather backward
upsample_flow_warp     upsample_flow_warp         fused forward (backward reuses the above)
conv2d, conv2d_levels, conv2d                     cuDNN GEMM + fused bias/LeakyReLU(/pool)
conv2d_pool                                       epilogue and its backward
upsample_conv2x2       upsample_conv2x2           direct conv of the implicit nearest upsample
avg_pool2x2            avg_pool2x2                forward, gather backward
=====================  =========================  =============================================

The ``*_into`` variants (``out=`` of ``film_fast.ops``) store through the destination's
strides from the same kernels (the conv epilogue, the pool and up-conv kernels) without
autograd; with gradients recorded they compute and copy.

float64 tensors (e.g. gradcheck) fall back to :mod:`film_fast.ops.reference`.
"""
from __future__ import annotations

from typing import Tuple

import cupy  # noqa: F401  (ImportError -> "cupy backend unavailable (...)")
import torch

from film_fast.ops.dispatch import register, register_verifier

from .avg_pool2x2 import avg_pool2x2, avg_pool2x2_into
from .conv2d import conv2d, conv2d_levels, conv2d_levels_into, conv2d_pool
from .upsample_conv2x2 import upsample_conv2x2, upsample_conv2x2_into
from .upsample_flow import upsample_flow
from .upsample_flow_warp import upsample_flow_warp
from .warp import warp, warp_into

OPS = {
    "warp": warp,
    "warp_into": warp_into,
    "upsample_flow": upsample_flow,
    "upsample_flow_warp": upsample_flow_warp,
    "conv2d": conv2d,
    "conv2d_levels": conv2d_levels,
    "conv2d_levels_into": conv2d_levels_into,
    "conv2d_pool": conv2d_pool,
    "upsample_conv2x2": upsample_conv2x2,
    "upsample_conv2x2_into": upsample_conv2x2_into,
    "avg_pool2x2": avg_pool2x2,
    "avg_pool2x2_into": avg_pool2x2_into,
}

for _name, _fn in OPS.items():
    register(_name, "cupy")(_fn)

_NO_DEVICE = "CuPy kernels need a CUDA device"
_device_count = None


def _cupy_device_count() -> int:
    """GPUs CuPy can use (0 when the driver/runtime is missing); probed once."""
    global _device_count
    if _device_count is None:
        try:
            _device_count = int(cupy.cuda.runtime.getDeviceCount())
        except Exception:  # CUDARuntimeError without a driver, or no device at all
            _device_count = 0
    return _device_count


def verifier(device: torch.device) -> Tuple[bool, str]:
    """``(True, "")`` for a CUDA device CuPy sees, else ``(False, reason)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, _NO_DEVICE
    count = _cupy_device_count()
    if count == 0:
        return False, _NO_DEVICE
    if device.index is not None and device.index >= count:
        return False, f"{_NO_DEVICE} (CuPy sees {count} device(s), asked for {device})"
    return True, ""


register_verifier("cupy", verifier)

__all__ = ["OPS", "verifier"] + list(OPS)
