"""Predicted device memory of a forward pass, from a dry run on the meta device.

A GPU's peak memory decides whether a resolution fits without tiling (the issue's goal:
4K fp16 of the published model within 24 GB), and it can be predicted without the GPU:
the model's memory is the sum of the tensors alive at each moment, and every one of them
is allocated through an ATen op that a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
sees. :func:`plan` builds the model on the ``meta`` device (tensors with shapes, dtypes,
strides and storages, but no data), runs the same graph a CUDA device runs (the same
Python code, the same buffers written in place, the same launchers: for ``backend="triton"``
every Triton launcher allocates its outputs, packs its weights and builds its descriptor
tables as on a GPU, and only the kernel launch itself is skipped), and
:class:`LiveBytes` adds up the storages alive after every op.

What it predicts is ``torch.cuda.max_memory_allocated()`` of the same call on a CUDA
device: every storage rounded up to the caching allocator's 512-byte blocks, weights and
inputs included. Not predicted: allocator fragmentation (``memory_reserved`` minus
``memory_allocated``, typically a few percent), the CUDA context (~0.5 GB, outside
PyTorch's counters), and workspaces that libraries allocate inside one op: cuDNN and
cuBLAS (the torch backend's convolutions), Triton's autotuning (film_fast's kernels do
not autotune). The CuPy backend (cuDNN GEMMs) is not covered.

The prediction is checked on the CPU against real runs: the Triton kernels under
``TRITON_INTERPRET=1`` and the torch backend's reference path, with :class:`LiveBytes`
watching real tensors, give the same peak as the dry run (``tests/test_memory_plan.py``);
``benchmarks/gpu_session.sh`` compares it with ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .ops import dispatch

#: ``film-fast bench --memory-plan``'s default sizes: 720p, 1080p, 1440p and 4K UHD.
DEFAULT_SIZES = ("1280x720", "1920x1080", "2560x1440", "3840x2160")
DRY_RUN_BACKENDS = dispatch.DRY_RUN_BACKENDS

#: The CUDA caching allocator hands out multiples of 512 bytes (``kMinBlockSize``), and
#: ``max_memory_allocated`` counts those rounded sizes.
CUDA_BLOCK_BYTES = 512


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclasses.dataclass
class Allocation:
    """One live storage: its (rounded) bytes, the ATen op that allocated it and the shape
    and dtype of the tensor that op returned."""

    nbytes: int
    op: str
    shape: Tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.nbytes / 2**20:.1f} MiB {self.dtype}{list(self.shape)} ({self.op})"


class LiveBytes(TorchDispatchMode):
    """Adds up the storages alive during a block: ``current``, ``peak`` and what was
    alive at the peak (:attr:`at_peak`, largest first).

    ``with LiveBytes(block=512) as m: ...`` counts every storage an ATen op returns that
    it has not seen before, until the storage is freed (a ``weakref.finalize`` on it);
    :meth:`adopt` registers tensors that existed before (weights, inputs), so that they
    are counted from the start and in-place ops on them are not counted twice.

    It only watches (``observes_only``), so film_fast's CPU fast paths stay on under it,
    exactly as under :class:`film_fast.profiling.LaunchCounter`.
    """

    observes_only = True

    def __init__(self, block: int = CUDA_BLOCK_BYTES, device_type: Optional[str] = None) -> None:
        super().__init__()
        self.block = max(1, int(block))
        self.device_type = device_type  # count only storages on this device type (None: all)
        self.current = 0
        self.peak = 0
        self.at_peak: List[Allocation] = []
        self._snapshot_due = False
        self._live: Dict[int, Allocation] = {}
        self._finalizers: List[weakref.finalize] = []

    # -- bookkeeping -------------------------------------------------------------------------
    def _track(self, t: torch.Tensor, op: str) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        rounded = _round_up(nbytes, self.block)
        self._live[key] = Allocation(rounded, op, tuple(t.shape), str(t.dtype).replace("torch.", ""))
        self.current += rounded
        # (the storage object lives as long as its StorageImpl: PyObject preservation)
        self._finalizers.append(weakref.finalize(storage, self._free, key))
        if self.current > self.peak:
            self.peak = self.current
            self._snapshot_due = True

    def _free(self, key: int) -> None:
        alloc = self._live.pop(key, None)
        if alloc is not None:
            self.current -= alloc.nbytes

    def adopt(self, tensors: Iterable[torch.Tensor], op: str = "existing") -> None:
        """Counts already existing ``tensors`` (each storage once) from now on."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, op)
        self._take_snapshot()

    def _take_snapshot(self) -> None:
        if self._snapshot_due:
            self.at_peak = sorted(self._live.values(), key=lambda a: -a.nbytes)
            self._snapshot_due = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).replace("aten.", "")
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, name)
        self._take_snapshot()
        return out

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for f in self._finalizers:
                f.detach()
            self._finalizers.clear()


# ---- skipping kernel launches on meta tensors ---------------------------------------------
def _has_meta(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta
               for a in pytree.tree_leaves((list(args), dict(kwargs))))


@contextlib.contextmanager
def dry_run():
    """Within it, ``backend="triton"`` runs on meta tensors: every Triton launch whose
    arguments include a meta tensor is counted (:func:`launches`) and skipped; the
    launchers' own allocations still happen. Launches on real tensors run as usual.

    (It patches ``run`` of Triton's ``JITFunction`` / ``InterpretedFunction`` for its
    duration: process-wide, but only meta-tensor launches, which cannot run anyway, are
    affected.)
    """
    patched = []
    counts = _LAUNCHES
    try:
        from triton.runtime import jit
        owners = [jit.JITFunction]
        try:
            from triton.runtime import interpreter
            owners.append(interpreter.InterpretedFunction)
        except ImportError:
            pass
    except ImportError:  # no Triton: only the torch backend can be planned
        owners = []
    for owner in owners:
        original = owner.run

        def run(kernel, *args, __original=original, **kwargs):
            if _has_meta(args, kwargs):
                fn = getattr(kernel, "fn", kernel)
                counts[getattr(fn, "__name__", "kernel")] = counts.get(
                    getattr(fn, "__name__", "kernel"), 0) + 1
                return None
            return __original(kernel, *args, **kwargs)

        patched.append((owner, original))
        owner.run = run
    forget_cached("meta")
    try:
        with dispatch.dry_run():
            yield counts
    finally:
        for owner, original in reversed(patched):
            owner.run = original
        forget_cached("meta")


_LAUNCHES: Dict[str, int] = {}


def _device_caches():
    """``(dict, position of the device string in its keys)`` of every module-level tensor
    cache the forward fills (warp grids, row-swap indices, conv descriptor tables)."""
    import sys
    from . import flow_estimator
    from .ops import reference
    caches = [(reference._GRIDS, 3), (flow_estimator._SWAP_INDICES, 1)]
    conv = sys.modules.get("film_fast.kernels.triton.conv2d")
    if conv is not None:
        caches.append((conv._TABLES, 0))
    return caches


def forget_cached(device: str = "meta") -> None:
    """Drops the entries of ``device`` from film_fast's tensor caches, so that the next
    call allocates them again (and a plan or measurement counts them). Dry runs do it for
    ``meta`` on entry and exit: meta tensors all have address 0, so descriptor tables of
    different calls would otherwise share cache entries."""
    for cache, pos in _device_caches():
        for key in [k for k in cache if str(k[pos]).split(":")[0] == device]:
            del cache[key]


# ---- the plan --------------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryPlan:
    """Predicted ``torch.cuda.max_memory_allocated()`` of one forward (bytes), and its parts.

    ``weights_bytes``: the parameters; ``inputs_bytes``: the two input frames;
    ``peak_bytes``: everything at the peak of a fresh model's first call, weights and inputs
    included, with the caches that call builds (``cache_bytes``: packed Triton weights,
    zero-padded and fp32 copies of conv weights, descriptor tables, warp grids), as
    ``benchmarks/memory_check.py`` measures it; ``warm_peak_bytes``: weights, inputs and
    what a later call allocates over the resident caches, as ``film-fast bench`` measures
    it (:func:`film_fast.benchmark.cuda_call_peak`); ``output_bytes``: the returned frame;
    ``launches``: Triton kernel launches of the call (0 for the torch backend); ``at_peak``:
    the largest live storages at the first call's peak.
    """

    width: int
    height: int
    dtype: str
    backend: str
    batch: int
    ensemble: int
    weights_bytes: int
    inputs_bytes: int
    peak_bytes: int
    cache_bytes: int
    warm_peak_bytes: int
    output_bytes: int
    launches: int
    at_peak: List[Allocation]

    @property
    def activation_bytes(self) -> int:
        """First-call peak minus weights, inputs and caches: what grows with the resolution."""
        return self.peak_bytes - self.weights_bytes - self.inputs_bytes - self.cache_bytes

    @property
    def required_bytes(self) -> int:
        """What the device must hold: the larger of the first call's peak and a warm call's
        peak over the resident caches."""
        return max(self.peak_bytes, self.warm_peak_bytes + self.cache_bytes)

    def to_dict(self, top: int = 8) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "at_peak"}
        d["size"] = f"{self.width}x{self.height}"
        d["activation_bytes"] = self.activation_bytes
        d["required_bytes"] = self.required_bytes
        d["at_peak"] = [a.describe() for a in self.at_peak[:top]]
        return d


def _meta_model(options, dtype: torch.dtype, backend: str, ensemble: int):
    from .model import FILM
    with torch.device("meta"):
        model = FILM(options, backend=backend)
    return model.to(dtype).set_ensemble(ensemble).eval()


def plan(options=None, height: int = 1080, width: int = 1920, *, dtype=torch.float16,
         backend: str = "triton", batch: int = 1, ensemble: int = 1,
         block: int = CUDA_BLOCK_BYTES) -> MemoryPlan:
    """Dry-runs ``model(x0, x1, 0.5)`` on ``[batch, 3, height, width]`` inputs in ``dtype``
    (as ``film-fast bench`` calls it, under ``torch.inference_mode``) and returns the
    predicted peak device memory. ``options``: the architecture (default: the published
    model); ``backend``: ``"triton"`` (what ``auto`` picks on a GPU) or ``"torch"``.
    """
    from .options import Options
    from .api import resolve_dtype
    options = options if options is not None else Options()
    dtype = resolve_dtype(dtype)
    backend = dispatch.normalize_backend(backend)
    if backend == "auto":
        backend = "triton"
    if backend not in dispatch.DRY_RUN_BACKENDS:
        raise ValueError(f"memory plans cover the {' and '.join(dispatch.DRY_RUN_BACKENDS)} "
                         f"backends, got {backend!r}")
    if height < 1 or width < 1 or batch < 1:
        raise ValueError(f"need a positive size and batch, got {width}x{height}, batch {batch}")
    with dry_run() as counts:
        counts.clear()
        model = _meta_model(options, dtype, backend, ensemble)
        with torch.device("meta"):
            x0 = torch.empty(batch, 3, height, width, dtype=dtype)
            x1 = torch.empty(batch, 3, height, width, dtype=dtype)
        params = list(model.parameters()) + list(model.buffers())
        meter = LiveBytes(block)
        with meter:
            meter.adopt(params, "weights")
            weights = meter.current
            meter.adopt([x0, x1], "input")
            inputs = meter.current - weights
            with torch.inference_mode():
                y = model(x0, x1, 0.5)
            output = _round_up(y.untyped_storage().nbytes(), meter.block)
            del y
            launches = sum(counts.values())
            # A second call, with the caches of the first in place (what a video's frames
            # after the first see): its growth over what is resident now.
            first_peak, resident, meter.peak = meter.peak, meter.current, meter.current
            first_at_peak = meter.at_peak
            with torch.inference_mode():
                model(x0, x1, 0.5)
            warm_growth = meter.peak - resident
        cache = resident - weights - inputs
    return MemoryPlan(width=width, height=height, dtype=str(dtype).replace("torch.", ""),
                      backend=backend, batch=batch, ensemble=model.ensemble,
                      weights_bytes=weights, inputs_bytes=inputs, peak_bytes=first_peak,
                      cache_bytes=cache, warm_peak_bytes=weights + inputs + warm_growth,
                      output_bytes=output, launches=launches, at_peak=first_at_peak)


@functools.lru_cache(maxsize=32)
def plan_stream(options=None, height: int = 1080, width: int = 1920, *,
                dtype=torch.float16, backend: str = "triton", batch: int = 1, held: float = 2,
                reuse: bool = True, ensemble: int = 1, block: int = CUDA_BLOCK_BYTES) -> int:
    """Predicted peak device bytes, above the weights, of the streaming engine
    (:func:`film_fast.stream.run_stream`) on ``height x width`` frames: what ``tile="auto"``
    must fit into a GPU's free memory (:func:`film_fast.tiling.choose_tiling` calibrates
    its formula with it on CUDA).

    The engine itself runs, on a model on the ``meta`` device, over enough frames to reach
    its steady state: its first chunk encodes ``batch + 1`` frames at once, later chunks
    keep the previous frame and the generated frames that calls still use. ``held``: the
    encoded frames the engine holds, as run_stream counts them (``(batch + 1) + batch *
    live``, without the ensemble factor); the schedule run is the recursive one with that
    many ``live`` generated frames. ``reuse=False``: features are not kept, each call
    encodes its ``2 * batch`` frames. Only meta tensors are counted (the frames' CPU copies
    are not device memory). Results are cached per arguments: a pair that the CLI first
    checks and then streams is planned once (~2 s at 4K).
    """
    import math
    from .options import Options
    from .stream import grid_node, recursive_schedule, run_stream, uniform_plan
    from .tiling import Tiling
    from .api import resolve_dtype
    options = options if options is not None else Options()
    dtype = resolve_dtype(dtype)
    backend = dispatch.normalize_backend(backend)
    backend = "triton" if backend == "auto" else backend
    if backend not in dispatch.DRY_RUN_BACKENDS:
        raise ValueError(f"memory plans cover the {' and '.join(dispatch.DRY_RUN_BACKENDS)} "
                         f"backends, got {backend!r}")
    if height < 1 or width < 1 or batch < 1:
        raise ValueError(f"need a positive size and batch, got {width}x{height}, batch {batch}")
    live = max(0, math.ceil((held - batch - 1) / batch))
    k = live + 1  # recursive_schedule(k).max_live == k - 1
    schedule = recursive_schedule(k)
    pair_plan = uniform_plan(schedule, [grid_node(p, 1 << k) for p in range(1 << k)])
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    with dry_run():
        model = _meta_model(options, dtype, backend, ensemble)
        meter = LiveBytes(block, device_type="meta")
        with meter:
            meter.adopt(list(model.parameters()) + list(model.buffers()), "weights")
            base = meter.current
            stream = run_stream(model, [frame] * (2 * batch + 2), lambda i: pair_plan,
                                batch_size=batch, tile=Tiling(None, reuse))
            for _ in stream:
                pass
    return meter.peak - base


def measure(model, x0: torch.Tensor, x1: torch.Tensor, batch_dt=0.5,
            block: int = CUDA_BLOCK_BYTES) -> int:
    """The same count as :func:`plan` on a real run: peak bytes of the storages alive during
    ``model(x0, x1, batch_dt)`` (weights and inputs included), measured by :class:`LiveBytes`.
    On the CPU this is what the dry run is checked against."""
    meter = LiveBytes(block)
    with meter:
        meter.adopt(list(model.parameters()) + list(model.buffers()), "weights")
        meter.adopt([x0, x1], "input")
        with torch.inference_mode():
            y = model(x0, x1, batch_dt)
        del y
    return meter.peak


@contextlib.contextmanager
def gpu_graph_on_cpu(backend: str):
    """CPU tensors run the graph a GPU runs, to check :func:`plan` against real tensors:
    the in-place buffer graph (not the CPU dense path), the GPU's channel alignment, and
    either the Triton launchers with their kernels skipped (what they allocate does not
    depend on values; needs ``TRITON_INTERPRET=1``) or the torch backend's reference ops
    without the CPU-only fused oneDNN conv. Process-wide while it lasts (a test tool)."""
    from . import buffers
    from .model import FILM
    from .ops import eager, torch_fast
    saved = [(FILM, "_dense_on_cpu", FILM._dense_on_cpu),
             (buffers, "GPU_ALIGNMENT_ON_CPU", buffers.GPU_ALIGNMENT_ON_CPU)]
    FILM._dense_on_cpu = lambda self, device: False
    buffers.GPU_ALIGNMENT_ON_CPU = True
    try:
        if backend == "triton":
            from triton.runtime import interpreter
            saved.append((interpreter.InterpretedFunction, "run",
                          interpreter.InterpretedFunction.run))
            interpreter.InterpretedFunction.run = lambda *a, **k: None
            yield
        else:
            saved.append((torch_fast, "_POINTWISE", torch_fast._POINTWISE))
            torch_fast._POINTWISE = None
            with eager.reference_only():
                yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def format_table(plans: Sequence[MemoryPlan], device_bytes: Optional[int] = None,
                 streams: Optional[Sequence[Tuple[int, int]]] = None) -> str:
    """The ``bench --memory-plan`` table. ``streams``: per plan, the streaming engine's peak
    (:func:`plan_stream`, weights added) with and without feature reuse, as two columns."""
    columns = ["size", "dtype", "backend", "weights", "caches", "activations", "peak",
               "warm peak", "launches"]
    if streams:
        columns += ["video, reuse", "video, no reuse"]
    if device_bytes:
        columns.append(f"fits {device_bytes / 1e9:g} GB")
    rows = []
    for i, p in enumerate(plans):
        row = [f"{p.width}x{p.height}", p.dtype, p.backend, f"{p.weights_bytes / 2**20:.0f} MiB",
               f"{p.cache_bytes / 2**20:.0f} MiB", f"{p.activation_bytes / 2**30:.2f} GiB",
               f"{p.peak_bytes / 2**30:.2f} GiB", f"{p.warm_peak_bytes / 2**30:.2f} GiB",
               str(p.launches) if p.backend == "triton" else "-"]
        if streams:
            row += [f"{b / 2**30:.2f} GiB" for b in streams[i]]
        if device_bytes:
            row.append("yes" if p.required_bytes <= device_bytes else "NO")
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
