"""CUDA-graph replay of FILM for fixed shapes (a video has one shape).

A FILM forward launches a few hundred kernels; at 1080p on an H100 each launch is a
few microseconds of CPU work next to ~30 ms of GPU work, but at small sizes or
batch 1 the launch overhead and Python dispatch dominate. Capturing the forward
once per input shape into a ``torch.cuda.CUDAGraph`` and replaying it replaces all
of those launches by one.

Rules that make capture safe here (each is what ``torch.cuda.graph`` requires):

* inputs are copied into *static* tensors allocated before capture, and the
  output lives in a static tensor that the next replay overwrites -- so
  :class:`CUDAGraphFILM` returns a clone unless ``copy_output=False``;
* warm-up runs happen on a side stream before capture, so lazily created state
  (Triton compilation and autotuning, cached sampling grids, cuDNN plans) exists
  before the graph is recorded;
* nothing inside the captured region synchronises with the host: the input
  checks (which may read shapes, never values) run outside it;
* all graphs of one wrapper share one memory pool, so several shapes do not
  multiply the activation memory.

Usage::

    model = film_fast.load(path, device="cuda", dtype="fp16")
    graphed = CUDAGraphFILM(model)
    with torch.inference_mode():
        mid = graphed(x0, x1, 0.5)        # captures on first use of a shape, then replays
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch


class CUDAGraphError(RuntimeError):
    """CUDA graphs cannot be used here (no CUDA device, or capture failed)."""


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: Tuple[torch.Tensor, ...]
    output: torch.Tensor


def capture(fn: Callable[..., torch.Tensor], example: Sequence[torch.Tensor], *,
            warmup: int = 2, pool=None) -> _Captured:
    """Records ``fn(*static_inputs)`` into a CUDA graph.

    Args:
        fn: a function of CUDA tensors returning one tensor, free of host syncs.
        example: tensors whose shapes, dtypes and devices the static inputs copy.
        warmup: eager runs on a side stream before capture (compilation, caches).
        pool: a ``torch.cuda.graph_pool_handle()`` to share memory between graphs.
    Returns:
        the graph, its static inputs (copy new values into them) and its static output.
    """
    if not torch.cuda.is_available():
        raise CUDAGraphError("CUDA graphs need a CUDA device; none is available")
    for k, t in enumerate(example):
        if not (isinstance(t, torch.Tensor) and t.is_cuda):
            raise CUDAGraphError(f"input {k} must be a CUDA tensor, got "
                                 f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
    inputs = tuple(t.detach().clone() for t in example)
    side = torch.cuda.Stream(device=inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn(*inputs)
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            output = fn(*inputs)
    except RuntimeError as e:
        raise CUDAGraphError(f"CUDA graph capture failed ({e}); run without CUDA graphs") from e
    return _Captured(graph, inputs, output)


class CUDAGraphFILM:
    """``FILM.forward`` replayed from CUDA graphs, one per input shape/dtype (LRU, ``max_graphs``).

    Args:
        model: a :class:`film_fast.FILM` on a CUDA device, in eval mode.
        warmup: eager runs before each capture.
        max_graphs: shapes kept captured; the least recently used is dropped beyond it.
        copy_output: return a clone of the static output (safe; the default) or the static
            tensor itself (valid only until the next call).
    """

    def __init__(self, model, *, warmup: int = 2, max_graphs: int = 4,
                 copy_output: bool = True) -> None:
        if model.device.type != "cuda":
            raise CUDAGraphError(f"CUDAGraphFILM needs the model on a CUDA device, it is on "
                                 f"{model.device}")
        if model.training:
            raise CUDAGraphError("CUDAGraphFILM replays inference only; call model.eval() first")
        self.model = model
        self.warmup = warmup
        self.max_graphs = max(1, int(max_graphs))
        self.copy_output = copy_output
        self._graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def _forward(self, x0: torch.Tensor, x1: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        return self.model._run(x0, x1, dt, debug=False)["image"]

    def __call__(self, x0: torch.Tensor, x1: torch.Tensor, batch_dt=0.5) -> torch.Tensor:
        """Same contract as ``FILM.forward``: ``[B, 3, H, W]`` in, ``[B, 3, H, W]`` out."""
        if torch.is_grad_enabled():
            raise CUDAGraphError("CUDAGraphFILM is for inference: call it under "
                                 "torch.inference_mode() or torch.no_grad()")
        dt = self.model._check_inputs(x0, x1, batch_dt)
        device = self.model.device
        x0 = x0.to(device=device, dtype=self.model.dtype)
        x1 = x1.to(device=device, dtype=self.model.dtype)
        # The ensemble is part of what a graph captured (model.set_ensemble after a capture
        # must not replay the old one).
        key = (tuple(x0.shape), x0.dtype, str(device), self.model.ensemble)
        entry = self._graphs.get(key)
        if entry is None:
            entry = capture(self._forward, (x0, x1, dt), warmup=self.warmup, pool=self._pool)
            self._graphs[key] = entry
            self.captures += 1
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        for static, value in zip(entry.inputs, (x0, x1, dt)):
            static.copy_(value, non_blocking=True)
        entry.graph.replay()
        return entry.output.clone() if self.copy_output else entry.output


def maybe_graphed(model, enabled: Optional[bool]):
    """``CUDAGraphFILM(model)`` when ``enabled`` (or, for None, when the model is on CUDA), else
    the model itself."""
    if enabled is None:
        enabled = model.device.type == "cuda"
    return CUDAGraphFILM(model) if enabled else model


class CUDAGraphEncoded:
    """``FILM.encode`` and ``FILM.interpolate_encoded`` replayed from CUDA graphs: the two
    calls the streaming engine makes (``film_fast.interpolate(..., cuda_graphs=True)``,
    ``film-fast video --cuda-graphs``). A video has one frame size, so after the first pairs
    every call replays a captured graph: one launch instead of ~100 kernel launches and the
    Python around them.

    One graph per input shape for each call (``max_graphs`` of each, least recently used
    dropped): the engine encodes ``batch + 1`` frames in its first chunk and ``batch`` later,
    and may interpolate fewer pairs in its last chunk. The two kinds capture into separate
    memory pools (the engine interleaves them in no fixed order).

    What replay costs besides the kernels: the features :meth:`encode` returns are copied out
    of the graph's static outputs (they must outlive the next replay: the engine keeps them
    for the next pair), and :meth:`interpolate_encoded` copies its two encoded batches into
    the graph's static inputs, which the eager call does too unless both came from one encode
    (its concatenation). Memory: each pool holds its graph's peak for as long as the wrapper
    lives, on top of the static inputs and outputs.

    Args:
        model: a :class:`film_fast.FILM` on a CUDA device, in eval mode.
        warmup: eager runs before each capture (Triton compilation, cached weights and tables).
        max_graphs: shapes kept per call.
        capture_fn: replaces :func:`capture` (tests emulate capture and replay on a CPU).
    """

    def __init__(self, model, *, warmup: int = 2, max_graphs: int = 4,
                 capture_fn: Optional[Callable] = None) -> None:
        if capture_fn is None and model.device.type != "cuda":
            raise CUDAGraphError(f"CUDA graphs need the model on a CUDA device, it is on "
                                 f"{model.device}")
        if model.training:
            raise CUDAGraphError("CUDAGraphEncoded replays inference only; call model.eval() "
                                 "first")
        self.model = model
        self.warmup = warmup
        self.max_graphs = max(1, int(max_graphs))
        self._capture = capture_fn if capture_fn is not None else capture
        self._encoders: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self._decoders: "OrderedDict[tuple, _Captured]" = OrderedDict()
        cuda = model.device.type == "cuda"
        self._pools = ((torch.cuda.graph_pool_handle(), torch.cuda.graph_pool_handle())
                       if cuda else (None, None))
        self.captures = 0

    def _entry(self, table: "OrderedDict[tuple, _Captured]", key: tuple, fn,
               example: Callable[[], Sequence[torch.Tensor]], pool) -> _Captured:
        """The graph of ``key``, captured from ``example()`` (built only then) on first use."""
        entry = table.get(key)
        if entry is None:
            entry = self._capture(fn, example(), warmup=self.warmup, pool=pool)
            table[key] = entry
            self.captures += 1
            while len(table) > self.max_graphs:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return entry

    def _check_mode(self) -> None:
        if torch.is_grad_enabled():
            raise CUDAGraphError("CUDA graph replay is for inference: call it under "
                                 "torch.inference_mode() or torch.no_grad()")

    def encode(self, frames: torch.Tensor):
        """Same contract as ``FILM.encode``; the features are the caller's own tensors."""
        from .model import FrameFeatures
        self._check_mode()
        model = self.model
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
            return model.encode(frames)  # (raises the model's error)
        x = frames.to(device=model.device, dtype=model.dtype)
        key = (tuple(x.shape), x.dtype, model.ensemble)
        entry = self._entry(self._encoders, key, model.encode, lambda: (x,), self._pools[0])
        entry.inputs[0].copy_(x)
        entry.graph.replay()
        out = entry.output
        return FrameFeatures([lv.clone() for lv in out.levels], out.pads, out.size,
                             out.variants)

    def interpolate_encoded(self, f0, f1, batch_dt=0.5) -> torch.Tensor:
        """Same contract as ``FILM.interpolate_encoded``."""
        from .model import _pair_rows
        self._check_mode()
        model = self.model
        model.check_encoded_pair(f0, f1)
        dt = model._check_time(batch_dt, f0.frames)
        rows = f0.levels[0].shape[0]
        n, k, pads = f0.frames, f0.variants, f0.pads
        key = (tuple(tuple(lv.shape) for lv in f0.levels), f0.levels[0].dtype, pads, k)

        def decode(*tensors: torch.Tensor) -> torch.Tensor:
            return model.decode_pairs(list(tensors[:-1]), pads, n, k, tensors[-1])

        entry = self._entry(self._decoders, key, decode,
                            lambda: [_pair_rows(a, b) for a, b in zip(f0.levels, f1.levels)]
                            + [dt], self._pools[1])
        for static, a, b in zip(entry.inputs[:-1], f0.levels, f1.levels):
            static[:rows].copy_(a)
            static[rows:].copy_(b)
        entry.inputs[-1].copy_(dt)
        entry.graph.replay()
        return entry.output.clone()
