"""Host-side helpers shared by the Triton kernels of ``film_fast.kernels.triton``.

Nothing here launches a kernel: these are the small pieces every launcher
needs (dtype mapping, memory-format choice, determinism switch, the fp32
rounding of resize scales, launch-size heuristics). Kernel code lives in the
per-op files.
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import numpy as np
import torch
import triton
import triton.language as tl

DETERMINISTIC_ENV = "FILM_FAST_DETERMINISTIC"

# torch dtype -> Triton element type (used for constexpr pointer casts and accumulators).
TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its Python interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def deterministic_requested() -> bool:
    """Bitwise-reproducible backward passes wanted (torch's global switch or FILM_FAST_DETERMINISTIC=1)."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(DETERMINISTIC_ENV) == "1"


def check_supported(name: str, t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPE:
        raise TypeError(f"triton backend: {name} has unsupported dtype {t.dtype}; expected "
                        "float16, bfloat16, float32 or float64")


def acc_dtype(*dtypes: torch.dtype):
    """Accumulator type: fp64 when any operand is fp64 (gradcheck), else fp32."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def coord_dtype(flow_dtype: torch.dtype):
    """Sample coordinates are fp32 whatever the data dtype (fp64 only for fp64 flows, like the reference)."""
    return tl.float64 if flow_dtype == torch.float64 else tl.float32


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout an op's output should take to follow its input: NHWC stays NHWC (as torch does)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1:  # NHWC-like views (e.g. channel slices)
        return torch.channels_last
    return torch.contiguous_format


def empty_4d(shape, dtype, device, like) -> torch.Tensor:
    """Uninitialised ``[B, C, H, W]`` output in ``like``'s layout family (NCHW or NHWC).

    ``like`` is a tensor or directly a ``torch.memory_format``.
    """
    fmt = like if isinstance(like, torch.memory_format) else memory_format_of(like)
    return torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=device, memory_format=fmt)


def empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialised contiguous buffer (kernel outputs that every element of gets written)."""
    return torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=device)


def fp32_ratio(num: int, den: int) -> float:
    """``float(num) / den`` rounded to fp32, exactly as ATen computes resize scales.

    ATen's ``area_pixel_compute_scale`` / ``compute_scales_value`` divide in
    float32; passing the same fp32 value (a Python float holds it exactly) keeps
    the kernels' source indices identical to torch's.
    """
    return float(np.float32(num) / np.float32(den))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, next_pow2(n)))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter.

    Used only to size split-K grids: under the interpreter fewer programs simply
    run faster, so 4 "SMs" keep split-K exercised without slowing tests.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def strides(t: torch.Tensor) -> Tuple[int, ...]:
    """Element strides of ``t`` (Triton kernels take them as plain integer arguments)."""
    return tuple(int(s) for s in t.stride())


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(int(a), int(b))


def window(fine: int, coarse: int) -> int:
    """How many fine indices can map onto one coarse index under nearest-exact resizing.

    Integer ratios map exactly ``fine // coarse`` fine rows per coarse row (the
    kernels start the window at its exact first row); other ratios need one
    spare row of slack for the floating-point window start.
    """
    if fine % coarse == 0:
        return fine // coarse
    return math.ceil(fine / coarse) + 1
