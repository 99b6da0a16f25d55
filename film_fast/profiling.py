"""Counting the kernel-launching ATen ops of a forward pass (a CPU-side proxy for GPU launches).

A TorchDispatchMode sees every ATen op. Views (``slice``, ``view``, ``permute``,
...) and no-op conversions (``.to``, ``.contiguous`` or ``.reshape`` returning
(a view of) their input) launch nothing and are not counted; every op that
writes memory is. Allocations (``empty``, ``new_empty``, ... and ``detach_``)
launch no kernel either: on a GPU they are served by the caching allocator or
only touch metadata. They are counted apart, in :attr:`LaunchCounter.allocations`.
"""
from __future__ import annotations

import collections
from typing import Callable, Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS = frozenset({
    "aten.slice", "aten.select", "aten.view", "aten._unsafe_view", "aten.unsqueeze",
    "aten.squeeze", "aten.permute", "aten.expand", "aten.as_strided", "aten.t",
    "aten.transpose", "aten.alias", "aten.detach", "aten.split", "aten.split_with_sizes",
    "aten.chunk", "aten.unbind", "aten.narrow", "aten.lift_fresh",
    "aten.view_as", "aten.unfold", "aten.diagonal", "aten.expand_as",
    "aten.movedim", "aten.numpy_T", "aten.unflatten", "aten.dim",
    "aten.size", "aten.stride", "aten.is_contiguous", "aten.sym_size", "aten.sym_stride",
    "aten.promote_types", "aten.result_type",
})
# (``reshape``, ``flatten`` and ``contiguous`` are not listed: they copy when no view can
# express the result; the storage check in LaunchCounter tells the two cases apart.)

# Ops that only allocate or change metadata: no kernel on a GPU (caching allocator).
ALLOCATION_OPS = frozenset({
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
    "aten.new_empty_strided", "aten.detach_",
})


def _storages(obj) -> set:
    out = set()
    if isinstance(obj, torch.Tensor):
        out.add(obj.untyped_storage().data_ptr())
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out |= _storages(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            out |= _storages(o)
    return out


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: model(...)``; then ``c.total`` and ``c.by_op``.

    ``c.total`` / ``c.by_op``: the kernel-launching ops only; ``c.allocations`` /
    ``c.allocations_by_op``: the allocation-only ops (:data:`ALLOCATION_OPS`).

    With ``triton=True`` every Triton kernel launch is counted too (as ``triton.<kernel>``),
    on a GPU (``JITFunction.run``) and under ``TRITON_INTERPRET=1`` (the interpreter's
    ``InterpretedFunction.run``); the ATen ops the interpreter itself runs to emulate a
    kernel are not counted, so the total is what a GPU would launch.
    """

    # It only watches: film_fast's CPU fast paths and caches stay on under it, so that it
    # counts what really runs (see film_fast.ops.eager).
    observes_only = True

    def __init__(self, triton: bool = False) -> None:
        super().__init__()
        self.by_op: Counter[str] = collections.Counter()
        self.allocations_by_op: Counter[str] = collections.Counter()
        self._count_triton = triton
        self._inside_kernel = 0
        self._patched: list = []

    def __enter__(self):
        if self._count_triton:
            self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._patched):
                setattr(owner, name, original)
            self._patched.clear()

    def _patch_triton(self) -> None:
        try:
            from triton.runtime import jit
        except ImportError:
            return
        owners = [jit.JITFunction]
        try:
            from triton.runtime import interpreter
            owners.append(interpreter.InterpretedFunction)
        except ImportError:
            pass
        counter = self

        for owner in owners:
            original = owner.run

            def run(kernel, *args, __original=original, **kwargs):
                fn = getattr(kernel, "fn", kernel)
                counter.by_op[f"triton.{getattr(fn, '__name__', 'kernel')}"] += 1
                counter._inside_kernel += 1
                try:
                    return __original(kernel, *args, **kwargs)
                finally:
                    counter._inside_kernel -= 1

            self._patched.append((owner, "run", original))
            owner.run = run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._inside_kernel:
            return out  # the Triton interpreter emulating a kernel: counted once, as the kernel
        name = str(func.overloadpacket)
        if name in VIEW_OPS:
            return out
        if func.is_view and _storages(out) <= _storages((args, kwargs)):
            return out  # (``contiguous`` has a view schema but copies when it must)
        if name in ALLOCATION_OPS:
            self.allocations_by_op[name] += 1
            return out
        inplace = name.endswith("_") or "out" in kwargs
        if not inplace and _storages(out) and _storages(out) <= _storages((args, kwargs)):
            return out  # returned (a view of) an input: no kernel ran
        self.by_op[name] += 1
        return out

    @property
    def total(self) -> int:
        """Kernel-launching ops (ATen ops that write memory, plus Triton kernels when counted)."""
        return sum(self.by_op.values())

    @property
    def allocations(self) -> int:
        """Allocation-only ops (no kernel launch)."""
        return sum(self.allocations_by_op.values())


def count_launches(fn: Callable[[], object], triton: bool = False) -> LaunchCounter:
    with torch.inference_mode(), LaunchCounter(triton=triton) as counter:
        fn()
    return counter
