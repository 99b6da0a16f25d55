"""Native CPU kernels (C, compiled on first use with the machine's C compiler).

``winograd_transforms.c`` holds the Winograd input and output transforms of
:mod:`film_fast.ops.winograd`: one pass over the data each, vectorised over the contiguous
channels of NHWC tensors, instead of ~50 PyTorch elementwise ops (see the source's header).

Building
    :func:`library` compiles the source once per machine with ``$CC`` (default ``cc``)
    ``-O3 -march=native -shared -fPIC -fopenmp`` (without ``-fopenmp`` where that fails) into
    ``<cache>/film_fast/native/<key>.so`` and loads it with :mod:`ctypes`. Its loops run on
    PyTorch's OpenMP pool (see the source's header), ``torch.get_num_threads()`` wide. The
    key hashes the source, the flags, the compiler's version and the CPU's flags (``-march=
    native`` code must not run on another CPU sharing the cache). ``<cache>`` is
    ``$FILM_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME``, else ``~/.cache``. The library is
    written under a temporary name and renamed, so concurrent first uses are safe.

Without a compiler
    Nothing fails: :func:`library` returns None (:func:`unavailable_reason` says why) and the
    transforms run as PyTorch ops. ``FILM_FAST_NATIVE=0`` switches the native path off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

ENV = "FILM_FAST_NATIVE"
SOURCE = "winograd_transforms.c"
FLAGS = ("-O3", "-march=native", "-std=c99", "-fPIC", "-shared", "-fno-math-errno")
#: tried first; a compiler without OpenMP (Apple clang) builds single-threaded loops instead
OPENMP_FLAGS = ("-fopenmp",)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_reason: Optional[str] = None

_i64, _int, _f32 = ctypes.c_longlong, ctypes.c_int, ctypes.c_float
_ptr = ctypes.c_void_p
SIGNATURES = {
    # x, B, H, W, C, sb, sh, sw, m, ty0, ty1, tiles_x, v, i0, i1, threads
    "film_wino_input": (_ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _int, _i64, _i64, _i64,
                        _ptr, _i64, _i64, _int),
    # prod, B, H, W, K, m, ty0, ty1, tiles_x, bias, leaky, slope, out, ob, oh, ow, i0, i1,
    # threads
    "film_wino_output": (_ptr, _i64, _i64, _i64, _i64, _int, _i64, _i64, _i64, _ptr, _int, _f32,
                         _ptr, _i64, _i64, _i64, _i64, _i64, _int),
}


def source() -> str:
    """The C source as shipped next to this file (package data of the installed package;
    read by path, so it is also found when this module is loaded from a checkout)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), SOURCE),
              encoding="utf-8") as f:
        return f.read()


def enabled() -> bool:
    """False when ``FILM_FAST_NATIVE=0`` (or ``off``/``false``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> str:
    root = (os.environ.get("FILM_FAST_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
            or os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "film_fast", "native")


def _cpu_identity() -> str:
    """What -march=native depends on: the architecture and (on Linux) the CPU's model and flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return text


def build(compiler: Optional[str] = None, out_dir: Optional[str] = None) -> str:
    """Compiles the source (if its library is not cached) and returns the library's path.

    Raises:
        RuntimeError: no compiler, or the compile failed (with the compiler's message).
    """
    cc = compiler or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; set CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from None
    text = source()
    key = hashlib.sha256("\0".join([text, " ".join(FLAGS + OPENMP_FLAGS), version,
                                     _cpu_identity()])
                         .encode()).hexdigest()[:24]
    folder = out_dir or cache_dir()
    path = os.path.join(folder, f"winograd_transforms-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = os.path.join(tmp, SOURCE)
        with open(src, "w", encoding="utf-8") as f:
            f.write(text)
        lib = os.path.join(tmp, "lib.so")
        for extra in (OPENMP_FLAGS, ()):
            try:
                done = subprocess.run([cc, *FLAGS, *extra, "-o", lib, src], capture_output=True,
                                      text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise RuntimeError(f"{cc} failed to run: {e}") from None
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(f"{cc} could not compile {SOURCE}: "
                               f"{' '.join(done.stderr.split())[:400]}")
        os.replace(lib, path)
    return path


def load(path: str) -> ctypes.CDLL:
    """Loads a built library and declares its functions' argument types."""
    lib = ctypes.CDLL(path)
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled transforms, or None where they cannot be built (see
    :func:`unavailable_reason`) or ``FILM_FAST_NATIVE=0``. Built at most once per process."""
    global _lib, _tried, _reason
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = load(build())
            except (RuntimeError, OSError) as e:
                _lib, _reason = None, str(e)
            _tried = True
    return _lib


def unavailable_reason() -> Optional[str]:
    """Why :func:`library` returned None (None if it did not, or was not called yet)."""
    if not enabled():
        return f"{ENV}=0"
    return _reason
