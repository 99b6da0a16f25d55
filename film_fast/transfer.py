"""Frame transfers between the host and a CUDA GPU that overlap the model's compute.

The streaming engine (:func:`film_fast.interpolate`, ``film-fast video``) moves every input
frame to the device and every generated frame back. Done the plain way, each move stalls
the GPU: PyTorch's ``tensor.to("cuda")`` from pageable memory (``non_blocking=False``)
waits for the compute stream to drain before it returns, ``tensor.cpu()`` waits for the
forward that produced the frame, and only then does the host enqueue the next forward
(about a hundred kernel launches). At 1080p a float32 frame is 24.9 MB each way; at the
goal of 30 frames/s a frame's whole budget is 33 ms.

On CUDA, :class:`Transfers` instead

* **uploads** a frame the engine has read ahead (one chunk before the model needs it) on
  a dedicated stream, from pinned memory (``prepare_frame(pin=True)`` stages it there on the
  read-ahead thread), as uint8 when the frame came as uint8 (6.2 MB at 1080p instead of
  24.9) and converts it to the model's dtype on that stream; the compute stream waits for
  the upload's event only when it uses the frame;
* **downloads** a generated frame by converting it where it is (uint8 pixels, or the
  clamped float32 frame) and copying it on a second stream into pinned memory. The engine
  hands out a :class:`PendingFrame`, and :func:`deliver` resolves it only once
  ``DELIVERY_DEPTH`` items are queued behind it, i.e. after the next forward has been
  enqueued: the copy and the host's wait overlap that forward.

On any other device every method is the plain synchronous conversion the engine used
before: same values, no streams. The values are the same bytes either way: the uint8 ->
float32 conversion divides by 255 in IEEE float32 on both sides (on the GPU by a 0-dim
device tensor: PyTorch turns a division by a host scalar into a multiplication by its
reciprocal, which rounds differently), and the output conversions are
:func:`film_fast.imageio.uint8_pixels` and a clamp, computed where the frame is.

:class:`HostSyncs` finds the ops that would make the host wait for a GPU (blocking
host<->device copies, ``.item()``); the tests run it over the GPU graph on the ``meta``
device (:func:`film_fast.memory_plan.dry_run`), so a new sync is caught without a GPU.
"""
from __future__ import annotations

import collections
import os
import traceback
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .imageio import uint8_pixels

#: ``FILM_FAST_TRANSFER_OVERLAP=0`` turns the overlap off: every copy is the plain blocking one
#: (what the engine did before; ``benchmarks/stream_overlap.py`` compares the two).
OVERLAP_ENV = "FILM_FAST_TRANSFER_OVERLAP"

# How many output items deliver() queues before it waits for a pending frame: the engine
# emits a generated frame and its pair's first frame (2 items per pair at factor 2), so 3
# lets the host enqueue the next forward before it waits for the previous one's copy.
DELIVERY_DEPTH = 3


class PendingFrame:
    """A generated frame on its way to the host: a pinned buffer and the event after which
    it holds the frame. :meth:`result` waits for it and returns an ordinary (pageable)
    ``[H, W, 3]`` uint8 array or ``[3, H, W]`` float32 tensor, releasing the pinned buffer
    (page-locked memory is scarce: a caller keeping every frame of a video must not pin
    them all)."""

    __slots__ = ("_host", "_event", "_value")

    def __init__(self, host: torch.Tensor, event) -> None:
        self._host, self._event, self._value = host, event, None

    def result(self):
        if self._value is None:
            self._event.synchronize()
            host, self._host = self._host, None
            self._value = host.numpy().copy() if host.dtype == torch.uint8 else host.clone()
        return self._value


def resolve(frame):
    """``frame``, or what it resolves to when it is a :class:`PendingFrame`."""
    return frame.result() if isinstance(frame, PendingFrame) else frame


def deliver(items: Iterable[Tuple[Any, Any]],
            depth: int = DELIVERY_DEPTH) -> Iterator[Tuple[Any, Any]]:
    """Yields ``(tag, frame)`` from ``items`` in order, with every :class:`PendingFrame`
    resolved, holding a pending frame back until ``depth`` items are queued behind it (or the
    items end). Ready items behind a pending one wait their turn: the order never changes.
    If ``items`` raises, the items queued before the failure are yielded first."""
    queue: "collections.deque" = collections.deque()
    it = iter(items)
    error: Optional[Exception] = None
    try:
        while True:
            try:
                item = next(it)
            except StopIteration:
                break
            except Exception as e:  # yield what was made before it, then raise it
                error = e
                break
            queue.append(item)
            while queue and (len(queue) > depth or not isinstance(queue[0][1], PendingFrame)):
                tag, frame = queue.popleft()
                yield tag, resolve(frame)
        while queue:
            tag, frame = queue.popleft()
            yield tag, resolve(frame)
        if error is not None:
            raise error
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def stage_pinned(src: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of a CPU tensor (needs CUDA): the source of an asynchronous upload."""
    return src.pin_memory()


def to_device_async(t: torch.Tensor, device: torch.device,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t.to(device, dtype)`` without a host sync for a small CPU tensor going to a CUDA
    device (staged in pinned memory, copied ``non_blocking``: stream-ordered). Elsewhere,
    while tracing, or with autograd on ``t``, the plain copy."""
    device = torch.device(device)
    if device.type == "meta" and t.device.type == "cpu":  # a dry run's stand-in for the GPU
        return t.to(device=device, dtype=dtype, non_blocking=True)
    if (device.type != "cuda" or t.device.type != "cpu" or t.requires_grad
            or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
        return t.to(device=device, dtype=dtype)
    if dtype is not None:
        t = t.to(dtype)
    return stage_pinned(t).to(device, non_blocking=True)


class Transfers:
    """Input uploads and output downloads of one engine run (see the module docstring).

    Frames are the engine's ``_Frame`` objects: they carry ``kind`` (``"numpy"`` for
    ``[H, W, 3]`` uint8 arrays, ``"tensor"`` for ``[3, H, W]`` float tensors), ``x`` (float32
    ``[3, H, W]`` on the CPU), ``staged()`` (a pinned host copy to upload) and an ``upload``
    slot this class fills with ``(device image, event)``.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.cuda = self.device.type == "cuda" and os.environ.get(OVERLAP_ENV, "1") != "0"
        if self.cuda:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._up = torch.cuda.Stream(self.device)
            self._down = torch.cuda.Stream(self.device)
            self._scale = torch.full((), 255.0, dtype=torch.float32, device=self.device)
            self._up.wait_stream(torch.cuda.current_stream(self.device))  # (the fill above)

    # ---- uploads ------------------------------------------------------------------------
    def start_upload(self, frame) -> None:
        """Starts copying ``frame`` to the device on the upload stream (CUDA; else nothing)."""
        if not self.cuda or frame.upload is not None:
            return
        src = frame.staged()
        with torch.cuda.stream(self._up):
            d = src.to(self.device, non_blocking=True)
            if d.dtype == torch.uint8:  # [H, W, 3] -> [3, H, W] in [0, 1], as _Frame.x
                d = d.permute(2, 0, 1).contiguous().to(torch.float32).div_(self._scale)
            image = d.to(self.dtype).contiguous()
            event = torch.cuda.Event()
            event.record(self._up)
        frame.upload = (image, event)
        frame.release_staged()  # (the pinned block is not reused before the copy ends)

    def device_image(self, frame) -> torch.Tensor:
        """``[3, H, W]`` in the model's dtype on its device, usable on the current stream."""
        if not self.cuda:
            return frame.x.to(device=self.device, dtype=self.dtype)
        self.start_upload(frame)
        image, event = frame.upload
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        image.record_stream(current)  # freed only after the compute stream is done with it
        return image

    def device_images(self, frames: List[Any]) -> List[torch.Tensor]:
        return [self.device_image(f) for f in frames]

    # ---- downloads ----------------------------------------------------------------------
    def download(self, image: torch.Tensor, kind: str):
        """A generated ``[3, H, W]`` frame for the caller: ``[H, W, 3]`` uint8 (``kind ==
        "numpy"``) or float32 ``[3, H, W]`` clamped to [0, 1] on the CPU; on CUDA a
        :class:`PendingFrame` of that."""
        if kind == "numpy":
            out = uint8_pixels(image)
        else:
            out = image.detach().to(dtype=torch.float32).clamp(0.0, 1.0)
        if out.device.type == "meta":  # a dry run (memory_plan.plan_stream): no values
            return out
        if not self.cuda or out.device.type != "cuda":
            return out.to(device="cpu").numpy() if kind == "numpy" else out.to(device="cpu")
        out = out.contiguous()
        self._down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._down):
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._down)
        out.record_stream(self._down)  # (its memory is not reused before the copy ends)
        return PendingFrame(host, event)


# ---- finding host syncs ------------------------------------------------------------------
_COPIES = {"aten.to", "aten._to_copy", "aten.copy_"}
_ALWAYS_SYNC = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select",
                "aten.unique_dim", "aten._unique2", "aten.repeat_interleave"}


def _device_of(value) -> Optional[torch.device]:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, (str, torch.device)):
        return torch.device(value)
    return None


class HostSyncs(TorchDispatchMode):
    """Records the ops of a region that make the host wait for a (GPU or ``meta``) device:
    host<->device copies that are not ``non_blocking`` (PyTorch synchronises the stream after
    them), ``.item()`` and ops with data-dependent output sizes.
    ``syncs``: ``(op, detail)`` in order. Run it over a graph on ``meta`` (which stands in for
    the GPU in :func:`film_fast.memory_plan.dry_run`) to audit it without a GPU.

    ``repeat_interleave`` is listed because its tensor-repeats form reads the repeats; the
    integer form (FILM's ensemble) does not, so it is only recorded with a tensor argument.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[Tuple[str, str]] = []
        self.where: List[str] = []  # per sync: the innermost film_fast / kernels frame

    def _record(self, name: str, detail: str) -> None:
        self.syncs.append((name, detail))
        here = next((f"{f.filename}:{f.lineno} ({f.name})" for f in
                     reversed(traceback.extract_stack()[:-3])
                     if "film_fast" in f.filename or "kernels" in f.filename), "?")
        self.where.append(here)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in _COPIES:
            self._copy(name, func._schema, args, kwargs)
        elif name in _ALWAYS_SYNC:
            if name != "aten.repeat_interleave" or any(isinstance(a, torch.Tensor)
                                                       for a in args[1:2]):
                devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
                if devices - {"cpu"}:
                    self._record(name, f"on {sorted(devices)}")
        return func(*args, **kwargs)

    def _copy(self, name: str, schema, args, kwargs) -> None:
        bound = {a.name: (args[i] if i < len(args) else kwargs.get(a.name))
                 for i, a in enumerate(schema.arguments)}
        if name == "aten.copy_":
            dst, src = bound["self"].device, bound["src"].device
        else:
            src = bound["self"].device
            dst = _device_of(bound.get("device")) or _device_of(bound.get("other")) or src
        if src.type != dst.type and "cpu" in (src.type, dst.type) \
                and not bound.get("non_blocking"):
            self._record(name, f"{src.type} -> {dst.type}, blocking")
