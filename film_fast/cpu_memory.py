"""CPU memory policy: keep freed tensor memory in the process instead of unmapping it.

PyTorch's CPU allocator is glibc ``malloc``. glibc serves every block over 32 MiB (and, by
default, over 128 KiB until its adaptive threshold grows) with a fresh ``mmap`` and returns it
with ``munmap`` when the tensor dies. FILM allocates gigabytes of short-lived tensors per frame
(conv outputs, concat buffers, warp tables), so every frame faults every page in again: for
the published model at 512x512 that is ~820,000 page faults (3.3 GB zeroed by the kernel) and
3.6 s of system time per frame on the 2-core AMD EPYC development VM, where a page fault costs
~2 us. With the ``reuse`` policy glibc keeps freed blocks in its heap (``M_MMAP_MAX = 0``: no
``mmap`` for large blocks; ``M_TRIM_THRESHOLD`` = unlimited: never give the top of the heap
back), so the second frame onwards reuses the same pages: 66,000 faults and 0.9 s of system time
per frame, 12.5 s -> 9.6 s per frame (fp32, 512x512, published model, same VM).

The cost is resident memory: the process keeps its peak heap until :func:`release` (or exit).
That is what a frame-interpolation job wants, but the policy is process-wide, so it is
applied only where film_fast runs a model on the CPU (:func:`ensure`, called by
:class:`film_fast.FILM` on its first CPU forward and by the ``film-fast`` CLI), and it can be
switched off with ``FILM_FAST_CPU_MALLOC=system`` (or :func:`configure`). It is a no-op where
the C library is not glibc (macOS, Windows, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Optional

ENV = "FILM_FAST_CPU_MALLOC"
MODES = ("reuse", "system")

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: Optional[str] = None


def _glibc():
    """The process's glibc (with ``mallopt`` and ``malloc_trim``), or None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


def requested_mode() -> str:
    """The policy asked for through ``FILM_FAST_CPU_MALLOC`` (default ``reuse``)."""
    mode = os.environ.get(ENV, "reuse").strip().lower() or "reuse"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def configure(mode: str) -> bool:
    """Applies ``mode`` (``"reuse"`` or ``"system"``) to this process; True if glibc took it.

    ``system`` restores glibc's default settings (mmap for large blocks, 128 KiB mmap and trim
    thresholds) and returns the free heap to the OS. glibc's adaptive mmap threshold (it grows
    up to 32 MiB as mmapped blocks are freed) stays off once any ``mallopt`` has run, so a
    process that never wants the policy should set ``FILM_FAST_CPU_MALLOC=system`` before its
    first forward: :func:`ensure` then leaves malloc untouched.
    """
    global _applied
    if mode not in MODES:
        raise ValueError(f"unknown CPU malloc mode {mode!r}; expected one of {', '.join(MODES)}")
    libc = _glibc()
    with _lock:
        if libc is None:
            _applied = mode
            return False
        if mode == "reuse":
            # -1 as size_t: no trim threshold at all (an int cannot say more than 2 GiB, and a
            # 4K frame's working set is larger).
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
        else:
            ok = (libc.mallopt(_M_MMAP_MAX, 65536) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1
                  and libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) == 1)
            libc.malloc_trim(0)
        _applied = mode
        return ok


def ensure() -> Optional[str]:
    """Applies the requested policy once per process (cheap after the first call); returns it.

    A ``system`` request leaves malloc as it is (glibc's defaults, adaptive threshold included)."""
    global _applied
    if _applied is None:
        mode = requested_mode()
        if mode == "system":
            with _lock:
                _applied = mode
        else:
            configure(mode)
    return _applied


def active() -> Optional[str]:
    """The policy applied so far (None before the first :func:`ensure` / :func:`configure`)."""
    return _applied


def release() -> bool:
    """Returns the free part of the heap to the OS (``malloc_trim(0)``); the policy stays."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
