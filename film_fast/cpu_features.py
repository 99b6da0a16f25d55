"""What the CPU can do fast, and a warning when a requested dtype would crawl on it."""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True when oneDNN has a native bf16 path here (AVX512-BF16, AMX or AVX-NE-CONVERT).

    Without one (e.g. AMD Zen 3, AVX2 only) oneDNN's fused bf16 convolution refuses to run and
    PyTorch's fallback emulates bf16: slower than fp32, not faster (see
    :func:`slow_dtype_reason`).
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def slow_dtype_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``dtype`` on ``device`` runs far slower than fp32, or None when it does not."""
    if torch.device(device).type != "cpu":
        return None
    if dtype == torch.float16:
        return ("fp16 convolutions on a CPU are emulated and run about 14x slower than fp32 in "
                "film_fast's channels_last layout (a 3x3 conv: 7 vs 95 GFLOP/s on one AMD EPYC Zen "
                "3 core, torch 2.13; 250x in NCHW); use fp32 (or bf16 on a CPU with AMX or "
                "AVX512-BF16)")
    if dtype == torch.bfloat16 and not native_bf16():
        return ("this CPU has no native bf16 (no AMX, AVX512-BF16 or AVX-NE-CONVERT), so bf16 "
                "convolutions are emulated and run 10x or more slower than fp32 (a 3x3 conv: 15 "
                "vs 138 GFLOP/s on an AMD EPYC Zen 3); use fp32")
    return None


def warn_if_slow(device: torch.device, dtype: torch.dtype, what: str) -> None:
    reason = slow_dtype_reason(device, dtype)
    if reason:
        warnings.warn(f"{what}: {reason}", RuntimeWarning, stacklevel=3)
