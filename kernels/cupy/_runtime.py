"""Loading, compiling, caching and launching film_fast's CuPy kernels.

Sources
    Each op ships a ``<op>.cu`` file inside the installed package
    (``film_fast.kernels.cupy``); :func:`kernel_source` reads it through
    :mod:`importlib.resources` and prepends ``common.cuh`` (dtype conversions,
    indexing helpers), so the text handed to the compiler is self-contained: no
    ``#include`` of toolkit headers, which GPU hosts may not have.

Compilation
    The only compile-time parameter is the storage dtype (``-DFILM_DTYPE=0/1/2``
    for float32/float16/bfloat16). Sizes and strides are kernel arguments, so a
    module is compiled once per (source, dtype, device) and each kernel function
    is cached under exactly ``(kernel name, dtype name, device index)``: a new
    resolution or pyramid level never recompiles. :data:`compile_counts` counts
    cache misses per key for tests.

Launching
    :func:`launch` runs a kernel on PyTorch's current stream of the tensors'
    device, passing tensors by ``data_ptr()`` (64-bit pointers), integers as
    ``int64`` and floats as ``float32`` -- the kernels declare every integer
    parameter ``long long`` and every floating one ``float``.

CI without a GPU
    :func:`compile_source_for_ci` compiles the same text with the same options
    through NVRTC directly (``cupy_backends.cuda.libs.nvrtc``), which needs no
    device, to PTX (``compute_XX``) or PTX + cubin (``sm_XX``; the latter also
    runs ptxas, which checks the inline PTX).
"""
from __future__ import annotations

import collections
import importlib.resources
import re
import threading
import warnings
from typing import Dict, Iterable, Tuple

import numpy as np
import torch

PACKAGE = __name__.rpartition(".")[0]  # "film_fast.kernels.cupy"
COMMON_HEADER = "common.cuh"

#: torch dtype -> (dtype name used in cache keys, FILM_DTYPE value)
DTYPES: Dict[torch.dtype, Tuple[str, int]] = {
    torch.float32: ("float32", 0),
    torch.float16: ("float16", 1),
    torch.bfloat16: ("bfloat16", 2),
}
DTYPE_NAMES = tuple(name for name, _ in DTYPES.values())
_DTYPE_DEFINE = {name: value for name, value in DTYPES.values()}

#: compile options besides the dtype define. No --use_fast_math: the kernels must round like
#: PyTorch (IEEE division and sqrt, precise floorf/fminf, no approximate intrinsics).
BASE_OPTIONS = ("--std=c++17",)
#: options CuPy itself appends to every NVRTC compile (cupy.cuda.compiler: fp32 denormals are
#: flushed to zero); compile_source_for_ci appends them too, so CI compiles what runs.
CUPY_IMPLICIT_OPTIONS = ("-ftz=true",)

# (kernel name, dtype name, device index) -> cupy kernel. The cache key by design holds nothing
# shape-dependent.
_FUNCTIONS: Dict[Tuple[str, str, int], object] = {}
# (source file, dtype name, device index) -> cupy.RawModule (compiled)
_MODULES: Dict[Tuple[str, str, int], object] = {}
#: (kernel name, dtype name, device index) -> number of times it was compiled/loaded.
compile_counts: collections.Counter = collections.Counter()
#: (source file, dtype name, device index) -> number of NVRTC compilations of that module.
module_compile_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()
_SOURCES: Dict[str, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``; raises ``TypeError`` for unsupported dtypes."""
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise TypeError(f"CuPy kernels support float32/float16/bfloat16, got {dtype}") from None


def kind(dtype: torch.dtype) -> int:
    """The run-time dtype code (``KIND_*`` in common.cuh) of a secondary tensor's dtype."""
    return DTYPES[dtype][1]


def supported(*tensors) -> bool:
    """True when every given tensor (``None`` ignored) has a dtype the kernels implement."""
    return all(t is None or t.dtype in DTYPES for t in tensors)


def package_files():
    """The installed package folder as an :mod:`importlib.resources` traversable."""
    return importlib.resources.files(PACKAGE)


def kernel_files() -> Tuple[str, ...]:
    """Names of every shipped ``.cu`` source, sorted."""
    return tuple(sorted(p.name for p in package_files().iterdir() if p.name.endswith(".cu")))


def _read(name: str) -> str:
    text = _SOURCES.get(name)
    if text is None:
        text = (package_files() / name).read_text(encoding="utf-8")
        _SOURCES[name] = text
    return text


def kernel_source(name: str) -> str:
    """The complete translation unit compiled for ``name`` (e.g. ``"warp.cu"``).

    It depends on the file name only: ``common.cuh`` followed by the file, with ``#line``
    markers so compiler messages name the right file and line.
    """
    return (f'#line 1 "{COMMON_HEADER}"\n' + _read(COMMON_HEADER)
            + f'\n#line 1 "{name}"\n' + _read(name))


def compile_options(dtype: str) -> Tuple[str, ...]:
    """Options for ``dtype`` (a name from :data:`DTYPE_NAMES`); the architecture is added by
    CuPy (from the device) or by :func:`compile_source_for_ci`."""
    return BASE_OPTIONS + (f"-DFILM_DTYPE={_DTYPE_DEFINE[dtype]}",)


class _DeviceModule:
    """A compiled cupy.RawModule bound to one device (kernels are loaded there)."""

    def __init__(self, module, device: int):
        self.module, self.device = module, device

    def get_function(self, name: str):
        import cupy
        with cupy.cuda.Device(self.device):
            return self.module.get_function(name)


def _compile_module(source: str, dtype: str, device: int):
    """NVRTC-compiles ``source`` for ``dtype`` and loads it on CUDA device ``device``.

    Returns an object with ``get_function(name)``. (The tests swap this function, and
    :func:`_execute`, for a host emulation of the same sources.)
    """
    import cupy
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=kernel_source(source), options=compile_options(dtype))
        module.compile()  # compile now: errors surface here, not at the first launch
    return _DeviceModule(module, device)


def _module(source: str, dtype: str, device: int):
    key = (source, dtype, device)
    module = _MODULES.get(key)
    if module is None:
        module = _compile_module(source, dtype, device)
        _MODULES[key] = module
        module_compile_counts[key] += 1
    return module


def get_kernel(source: str, name: str, dtype: torch.dtype, device: int):
    """The compiled kernel ``name`` of ``source`` for ``dtype`` on CUDA device ``device``."""
    key = (name, dtype_name(dtype), device)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        with _lock:
            fn = _FUNCTIONS.get(key)
            if fn is None:
                fn = _module(source, key[1], device).get_function(name)
                _FUNCTIONS[key] = fn
                compile_counts[key] += 1
    return fn


def clear_cache() -> None:
    """Forgets every compiled module (tests use it to count compilations from scratch)."""
    with _lock:
        _FUNCTIONS.clear()
        _MODULES.clear()


# ---- launching ------------------------------------------------------------------------------
class _TorchStreamHandle:
    """Minimal CUDA stream protocol object (``__cuda_stream__``) for a raw stream pointer."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_STREAMS: Dict[Tuple[int, int], object] = {}


def _cupy_stream(device: int):
    """CuPy view of PyTorch's current stream on ``device`` (cached per stream pointer)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    key = (device, ptr)
    stream = _STREAMS.get(key)
    if stream is None:
        import cupy
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            stream = from_external(_TorchStreamHandle(ptr))
        else:  # CuPy < 14
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = cupy.cuda.ExternalStream(ptr, device)
        _STREAMS[key] = stream
    return stream


def _arg(x):
    """One kernel argument: tensor -> 64-bit pointer, int/bool -> int64, float -> float32."""
    if isinstance(x, torch.Tensor):
        return np.uint64(x.data_ptr())
    if x is None:
        return np.uint64(0)  # null pointer for optional tensors (kernels check a flag)
    if isinstance(x, (bool, int, np.integer)):
        return np.int64(x)
    if isinstance(x, (float, np.floating)):
        return np.float32(x)
    raise TypeError(f"unsupported kernel argument {type(x).__name__}")


def launch(kernel, grid: Iterable[int], block: Iterable[int], args: Iterable, device: int,
           shared_mem: int = 0) -> None:
    """Launches ``kernel`` on torch's current stream of CUDA device ``device``.

    ``args`` may hold tensors (passed as pointers; ``None`` is a null pointer), ints and
    floats; see :func:`_arg`. An empty grid launches nothing.
    """
    grid = tuple(int(g) for g in grid)
    block = tuple(int(b) for b in block)
    if min(grid) <= 0:
        return  # empty tensor: nothing to do
    _execute(kernel, grid, block, tuple(_arg(a) for a in args), device, shared_mem)


def _execute(kernel, grid: Tuple[int, ...], block: Tuple[int, ...], packed: tuple, device: int,
             shared_mem: int) -> None:
    import cupy
    with cupy.cuda.Device(device), _cupy_stream(device):
        kernel(grid, block, packed, shared_mem=shared_mem)


# Block size of the 1-D kernels and the grid-stride cap (the kernels loop over the rest).
BLOCK = 256
MAX_BLOCKS = 1 << 20


def blocks_for(n: int, block: int = BLOCK) -> int:
    """Number of blocks for a grid-stride loop over ``n`` items."""
    return max(0, min(MAX_BLOCKS, (n + block - 1) // block))


def strides(t: torch.Tensor) -> Tuple[int, ...]:
    """Element strides of a 4-D tensor (size-1 dims included as they are)."""
    return tuple(int(s) for s in t.stride())


def is_channels_last(t: torch.Tensor) -> int:
    """1 when ``t``'s channels are innermost in memory (NHWC): threads then walk channels first."""
    return int(t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout outputs derived from ``t`` are allocated in (NHWC stays NHWC)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def device_index(t: torch.Tensor) -> int:
    """CUDA device ordinal of ``t`` (the cache key's device); 0 for CPU tensors, which only
    the host emulation used by the tests launches."""
    if t.device.type != "cuda":
        return 0
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def channel_groups(pixels: int, channels: int, target_threads: int = 1 << 16) -> Tuple[int, int]:
    """``(groups, channels_per_group)`` splitting a per-pixel channel loop over ``grid.y``.

    Kernels that compute per-pixel coordinates once and then loop over channels (warp) need
    enough threads to fill the GPU on coarse pyramid levels, so small images split the channel
    loop; large ones keep one thread per pixel (coordinates computed once).
    """
    if channels <= 0:
        return 1, 0  # one (empty) group: per-pixel work without channels still runs
    groups = max(1, min(channels, -(-target_threads // max(pixels, 1))))
    per_group = -(-channels // groups)
    return -(-channels // per_group), per_group


def deterministic() -> bool:
    """Deterministic backward requested (torch flag or ``FILM_FAST_DETERMINISTIC=1``)."""
    import os
    return (torch.are_deterministic_algorithms_enabled()
            or os.environ.get("FILM_FAST_DETERMINISTIC", "") not in ("", "0"))


# ---- CI: compile without a GPU --------------------------------------------------------------
_ENTRY_RE = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)")


def compile_source_for_ci(name: str, dtype: str, arch: str = "compute_90") -> Dict[str, object]:
    """Compiles the shipped ``name`` for ``dtype`` with NVRTC alone (no GPU, no CuPy device).

    Uses exactly :func:`kernel_source` and :func:`compile_options`, plus what CuPy adds
    (:data:`CUPY_IMPLICIT_OPTIONS`) and ``--gpu-architecture=arch``. ``arch`` ``"compute_XX"``
    stops at PTX; ``"sm_XX"`` also assembles a cubin (running ptxas, which validates the
    inline PTX).

    Returns:
        ``{"ok": bool, "log": str, "ptx": str, "cubin": bytes | None, "entries": [names]}``.
    """
    from cupy_backends.cuda.libs import nvrtc
    source = kernel_source(name)
    options = list(compile_options(dtype)) + list(CUPY_IMPLICIT_OPTIONS) + [
        f"--gpu-architecture={arch}"]
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
            ok = True
        except nvrtc.NVRTCError:
            ok = False
        log = nvrtc.getProgramLog(prog)
        log = log.decode(errors="replace") if isinstance(log, bytes) else str(log)
        ptx, cubin = "", None
        if ok:
            raw = nvrtc.getPTX(prog)
            ptx = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            ptx = ptx.rstrip("\x00")
            if arch.startswith("sm_"):
                cubin = bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    return {"ok": ok, "log": log, "ptx": ptx, "cubin": cubin, "entries": _ENTRY_RE.findall(ptx),
            "options": options}
