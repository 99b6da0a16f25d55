"""Streaming interpolation of whole frame sequences: :func:`film_fast.interpolate`.

The engine reads frames one chunk at a time (``batch_size`` pairs) and yields the
output sequence in order, so memory does not grow with the length of the input.

* Every input frame is encoded once (:meth:`FILM.encode`) and its features serve
  both pairs it belongs to (:meth:`FILM.interpolate_encoded`); generated frames
  that later calls use as end points (recursive and evenly spaced schemes) are
  encoded once too, and dropped when no pending call needs them.
* Each pair follows a *schedule*: a list of model calls ``(node, left, right, dt)``
  in an order where every call's end points already exist (depth first for the
  recursive scheme, the port's greedy order for evenly spaced frames). Ready calls
  of all pairs of a chunk are batched, up to ``batch_size`` samples per forward,
  taking the earliest step first (so pairs advance in lockstep and the recursion
  holds ``O(K * batch_size)`` frames).
* Scene cuts: a pair whose :func:`scene_change_score` exceeds the threshold is not
  interpolated; its in-between frames repeat the earlier frame (the cut then stays
  exactly where it was, at the later frame's time).
* Large frames can be processed in overlapping tiles (:mod:`film_fast.tiling`).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import torch
import torch.nn.functional as F

from .cuda_graphs import CUDAGraphEncoded, CUDAGraphError
from .errors import InputError
from .interpolation import (_check_k, _check_n, _device_dtype, even_steps, recursive_steps,
                            resolve_schedule)
from .model import FrameFeatures
from .tiling import Tiling, blend_tiles, choose_tiling, make_grid, smaller_tiling
from .transfer import Transfers, deliver, stage_pinned

FrameLike = Union[torch.Tensor, np.ndarray]

# Scene-cut metric (see scene_change_score): thumbnail width and histogram bins.
SCENE_THUMB_WIDTH = 64
SCENE_HIST_BINS = 16
# The CLI default. Measured with this metric on real footage: 51 consecutive-frame pairs with
# large motion (30 DAVIS + 21 UCF101 triplets, end frames) score at most 0.120; 1275 cuts
# (every pair of different clips) score at least 0.131.
DEFAULT_SCENE_THRESHOLD = 0.125


# ---- schedules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One model call: the frame ``node`` at ``dt`` between nodes ``left`` and ``right``."""

    node: int
    left: int
    right: int
    dt: float


@dataclass(frozen=True)
class Schedule:
    """The model calls of one pair. Node 0 is the pair's first frame, node 1 its second,
    nodes >= 2 are generated; ``encode`` holds the generated nodes later calls use."""

    steps: Tuple[Step, ...]
    clamp: bool = False

    @functools.cached_property
    def encode(self) -> FrozenSet[int]:
        return frozenset(n for s in self.steps for n in (s.left, s.right) if n >= 2)

    @functools.cached_property
    def max_live(self) -> int:
        """Most generated frames whose features are alive at once, run one call at a time."""
        remaining: Dict[int, int] = {}
        for s in self.steps:
            for n in (s.left, s.right):
                if n >= 2:
                    remaining[n] = remaining.get(n, 0) + 1
        live, peak = set(), 0
        for s in self.steps:
            if s.node in remaining:
                live.add(s.node)
            peak = max(peak, len(live))
            for n in (s.left, s.right):
                if n >= 2:
                    remaining[n] -= 1
                    if remaining[n] == 0:
                        live.discard(n)
        return peak


HOLD = Schedule(())  # no calls: a scene cut, or a pair whose outputs are its inputs

# A pair's plan: its schedule and its outputs in order, ``(node, tag)``; tags are handed back
# with the frames (the video writer's output frame numbers; None for the library).
PairPlan = Tuple[Schedule, Sequence[Tuple[int, Any]]]


def grid_node(pos: int, m: int) -> int:
    """Grid position (0..m) -> node id: 0 and m are the inputs, 1..m-1 generated."""
    return 0 if pos == 0 else 1 if pos == m else pos + 1


def _grid_schedule(steps, m: int, clamp: bool) -> Schedule:
    return Schedule(tuple(Step(grid_node(t, m), grid_node(a, m), grid_node(b, m), float(dt))
                          for t, a, b, dt in steps), clamp)


@functools.lru_cache(maxsize=64)
def recursive_schedule(k: int, clamp: bool = False) -> Schedule:
    """``k`` levels of mid-point recursion (official scheme); node of position p is p + 1."""
    return _grid_schedule(recursive_steps(k), 1 << k, clamp)


@functools.lru_cache(maxsize=64)
def even_schedule(n: int, clamp: bool = True) -> Schedule:
    """``n`` evenly spaced frames by the port's nearest-mid-point recursion."""
    return _grid_schedule(even_steps(n), n + 1, clamp)


@functools.lru_cache(maxsize=4096)
def dyadic_subset_schedule(k: int, positions: FrozenSet[int], clamp: bool = False) -> Schedule:
    """The calls of ``k``-level recursion needed for ``positions`` (in units of 1/2^k):
    those frames and their ancestors, depth first."""
    m = 1 << k
    steps = recursive_steps(k)
    parents = {t: (a, b) for t, a, b, _ in steps}
    needed, todo = set(), [p for p in positions if 0 < p < m]
    while todo:
        p = todo.pop()
        if p in needed:
            continue
        needed.add(p)
        todo.extend(q for q in parents[p] if 0 < q < m)
    return _grid_schedule([s for s in steps if s[0] in needed], m, clamp)


def times_schedule(times: Sequence[float]) -> Schedule:
    """One direct call per time ``t`` (nodes 2, 3, ... in the order of ``times``)."""
    return Schedule(tuple(Step(j + 2, 0, 1, float(t)) for j, t in enumerate(times)))


def uniform_plan(schedule: Schedule, out_nodes: Sequence[int]) -> PairPlan:
    return schedule, tuple((n, None) for n in out_nodes)


def check_times(times) -> List[float]:
    """Validates a ``times`` list: floats strictly inside (0, 1), no duplicates; sorted."""
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise ValueError(f"times must be a sequence of numbers in (0, 1), got {times!r}") from None
    if not values:
        raise ValueError("times must hold at least one time in (0, 1)")
    for t in values:
        if not 0.0 < t < 1.0:
            raise ValueError(f"every time must be strictly between 0 and 1, got {t}")
    ordered = sorted(values)
    for a, b in zip(ordered, ordered[1:]):
        if a == b:
            raise ValueError(f"times holds {a} twice")
    return ordered


# ---- scene cuts ------------------------------------------------------------------------------
def _thumbnail(x: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1] -> BT.601 luma, area-averaged to 64 pixels wide."""
    luma = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).float()
    height, width = luma.shape
    tw = min(SCENE_THUMB_WIDTH, width)
    th = max(1, round(height * tw / width))
    return F.adaptive_avg_pool2d(luma[None, None], (th, tw))[0, 0].clamp(0.0, 1.0)


def _histogram(thumb: torch.Tensor) -> torch.Tensor:
    return torch.histc(thumb, bins=SCENE_HIST_BINS, min=0.0, max=1.0) / thumb.numel()


Thumb = Tuple[torch.Tensor, torch.Tensor]  # luma thumbnail, its histogram


def _score_thumbs(a: Thumb, b: Thumb) -> float:
    mad = (a[0] - b[0]).abs().mean()
    hist = 0.5 * (a[1] - b[1]).abs().sum()
    return float((mad + hist) / 2)


def scene_change_score(frame0: FrameLike, frame1: FrameLike) -> float:
    """How different two frames are, in [0, 1]: the mean of

    * the mean absolute difference of their luma thumbnails (BT.601 luma,
      area-averaged to 64 pixels wide: small enough that ordinary motion moves
      little), and
    * the L1 distance of the thumbnails' 16-bin luma histograms, halved (motion
      does not change it; a new shot does).

    Pairs scoring above the threshold (:data:`DEFAULT_SCENE_THRESHOLD` = 0.125 in
    the CLI) are treated as cuts.
    """
    fa, fb = _Frame.wrap(frame0, 0), _Frame.wrap(frame1, 1)
    return _score_thumbs(fa.thumb(), fb.thumb())


# ---- frames ------------------------------------------------------------------------------------
EXPECTED_FRAME = "expected a [3, H, W] float tensor in [0, 1] or an [H, W, 3] uint8 array"


def _describe(obj) -> str:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return f"{type(obj).__name__} of shape {list(obj.shape)} and dtype {obj.dtype}"
    return type(obj).__name__


class _Frame:
    """An input frame: what the caller gave (``orig``) and its float32 CPU ``[3, H, W]``
    (``x``, converted on first use). ``host``: a pinned copy to upload from (see
    :func:`prepare_frame`); ``upload``: its device copy and ready event once
    :class:`film_fast.transfer.Transfers` has started the upload."""

    __slots__ = ("orig", "_x", "kind", "_thumb", "host", "upload")

    def __init__(self, orig, x: Optional[torch.Tensor], kind: str) -> None:
        self.orig, self._x, self.kind, self._thumb = orig, x, kind, None
        self.host, self.upload = None, None

    @classmethod
    def wrap(cls, obj, index: int) -> "_Frame":
        if isinstance(obj, _Frame):  # prepared by a producer (see prepare_frame)
            return obj
        if isinstance(obj, torch.Tensor):
            if obj.dim() != 3 or obj.shape[0] != 3 or not obj.is_floating_point():
                raise InputError(f"frame {index}: {EXPECTED_FRAME}, got a {_describe(obj)}")
            x = obj.detach().to(device="cpu", dtype=torch.float32)
            return cls(x, x, "tensor")
        if isinstance(obj, np.ndarray):
            if obj.dtype != np.uint8 or obj.ndim != 3 or obj.shape[2] != 3:
                raise InputError(f"frame {index}: {EXPECTED_FRAME}, got an {_describe(obj)}")
            return cls(obj, None, "numpy")
        raise InputError(f"frame {index}: {EXPECTED_FRAME}, got {_describe(obj)}")

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            # Exactly film_fast.imageio.read_image's conversion (float32 divide by 255).
            x = torch.from_numpy(self.orig.astype(np.float32) / np.float32(255.0))
            self._x = x.permute(2, 0, 1).contiguous()
        return self._x

    @property
    def size(self) -> Tuple[int, int]:
        if self.kind == "numpy":
            return int(self.orig.shape[0]), int(self.orig.shape[1])
        return int(self.x.shape[1]), int(self.x.shape[2])

    def thumb(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._thumb is None:
            t = _thumbnail(self.x)
            self._thumb = (t, _histogram(t))
        return self._thumb

    def staged(self) -> torch.Tensor:
        """A pinned host copy to upload: the ``[H, W, 3]`` uint8 pixels as given (a quarter
        of the float32 bytes), or the float32 ``[3, H, W]`` frame. Needs CUDA."""
        if self.host is None:
            if self.kind == "numpy":
                self.host = stage_pinned(torch.from_numpy(np.ascontiguousarray(self.orig)))
            else:
                self.host = stage_pinned(self.x)
        return self.host

    def release_staged(self) -> None:
        self.host = None


def prepare_frame(obj, thumb: bool = False, pin: bool = False) -> "_Frame":
    """An input frame (as :func:`interpolate` takes them) converted ahead of time, for a
    producer on another thread: the float conversion (10 ms per 1080p frame on this CPU)
    and, with ``thumb``, the scene-detection thumbnail (6 ms) then run there instead of on
    the thread that drives the model. With ``pin`` (for a model on a CUDA GPU) the frame is
    staged in pinned memory instead, as uint8 when it is uint8, ready for an asynchronous
    upload (:mod:`film_fast.transfer`); the float conversion then happens on the GPU. The
    engine takes the result in place of ``obj``. ``film-fast video`` prepares every decoded
    frame on its read-ahead thread."""
    frame = _Frame.wrap(obj, 0)
    if pin:
        frame.staged()
    else:
        frame.x
    if thumb:
        frame.thumb()
    return frame


class _Node:
    """A frame on the device (``image``) and, when features are reused, its per-tile features."""

    __slots__ = ("image", "feats")

    def __init__(self, image: torch.Tensor, feats: Optional[List[FrameFeatures]] = None) -> None:
        self.image, self.feats = image, feats


def _gather(features: Sequence[FrameFeatures]) -> FrameFeatures:
    if len(features) == 1:
        return features[0]
    first = features[0]
    levels = [torch.cat([f.levels[i] for f in features]) for i in range(len(first.levels))]
    return FrameFeatures(levels, first.pads, first.size, first.variants)


def _split(features: FrameFeatures) -> List[FrameFeatures]:
    """One FrameFeatures per frame (each with its flip variants, see FILM.ensemble)."""
    return [features.rows(i, i + 1) for i in range(features.frames)]


class _Runner:
    """Encodes frames and runs interpolation calls, full frame or tiled."""

    def __init__(self, model, height: int, width: int, tiling: Tiling,
                 transfers: Transfers, graphs=None) -> None:
        self.model = model
        self.device, self.dtype = _device_dtype(model)
        self.transfers = transfers
        self.graphs = graphs  # a cuda_graphs.CUDAGraphEncoded, or None: eager calls
        self.grid = make_grid(height, width, tiling.tile)
        self.reuse = tiling.reuse
        self.weights = None if self.grid.full_frame else self.grid.weights(self.device)

    def to_device(self, frames: List[_Frame]) -> List[torch.Tensor]:
        return self.transfers.device_images(frames)

    def encode(self, images: Sequence[torch.Tensor]) -> List[List[FrameFeatures]]:
        """Per image, per tile, its features (batch of one)."""
        batch = torch.stack(list(images))
        per_tile = []
        with torch.inference_mode():
            for y0, y1, x0, x1 in self.grid.boxes:
                per_tile.append(_split(self._encode(batch[:, :, y0:y1, x0:x1])))
        return [[per_tile[t][i] for t in range(len(per_tile))] for i in range(len(images))]

    def _encode(self, frames: torch.Tensor) -> FrameFeatures:
        if self.graphs is not None:
            try:
                return self.graphs.encode(frames)
            except CUDAGraphError as e:
                self._drop_graphs(e)
        return self.model.encode(frames)

    def _interpolate(self, fa: FrameFeatures, fb: FrameFeatures, dt) -> torch.Tensor:
        if self.graphs is not None:
            try:
                return self.graphs.interpolate_encoded(fa, fb, dt)
            except CUDAGraphError as e:
                self._drop_graphs(e)
        return self.model.interpolate_encoded(fa, fb, dt)

    def _drop_graphs(self, error: Exception) -> None:
        warnings.warn(f"film_fast: CUDA graphs are off for this run: {error}", RuntimeWarning,
                      stacklevel=4)
        self.graphs = None

    def call(self, a: Sequence[_Node], b: Sequence[_Node], dts: Sequence[float]) -> torch.Tensor:
        """``[N, 3, H, W]``: the frame at ``dts[i]`` between ``a[i]`` and ``b[i]``."""
        # (one time for all: a device-side fill; several: an asynchronous copy. FILM's
        # _check_time does either without a host sync.)
        dt = float(dts[0]) if len(set(dts)) == 1 else torch.tensor(list(dts), dtype=torch.float32)
        count = len(a)
        outputs = []
        with torch.inference_mode():
            for t, (y0, y1, x0, x1) in enumerate(self.grid.boxes):
                if self.reuse:
                    fa = _gather([n.feats[t] for n in a])
                    fb = _gather([n.feats[t] for n in b])
                else:  # both ends' tiles encoded together, as FILM.forward does
                    crops = torch.stack([n.image[:, y0:y1, x0:x1] for n in list(a) + list(b)])
                    enc = self._encode(crops)
                    fa, fb = enc.rows(0, count), enc.rows(count, 2 * count)
                outputs.append(self._interpolate(fa, fb, dt))
            if self.grid.full_frame:
                return outputs[0]
            return blend_tiles(outputs, self.grid, self.weights)


# ---- the engine -----------------------------------------------------------------------------
def _cut_plan(plan: PairPlan) -> PairPlan:
    """A scene cut: no calls, every generated output repeats the pair's first frame."""
    _, outputs = plan
    return HOLD, tuple((node if node in (0, 1) else 0, tag) for node, tag in outputs)


def run_stream(model, frames: Iterable[FrameLike], plan_for: Callable[[int], PairPlan], *,
               batch_size: int = 1, scene_threshold: Optional[float] = None,
               tile: Union[None, str, int, Tiling] = "auto",
               tail_for: Callable[[int], Sequence[Any]] = lambda n: (None,),
               select: Optional[Callable[[int, List[Any]], bool]] = None,
               on_start: Optional[Callable[[Tiling, int, int], None]] = None,
               budget: Optional[int] = None,
               cuda_graphs: Union[bool, CUDAGraphEncoded] = False,
               retry_oom: Optional[bool] = None
               ) -> Iterator[Tuple[Any, FrameLike]]:
    """The engine behind :func:`interpolate`: yields ``(tag, frame)`` in output order.

    On a CUDA GPU the frames move with :class:`film_fast.transfer.Transfers`: inputs are
    uploaded a chunk ahead on a copy stream, outputs come back on another one and are handed
    out a few items late (:func:`film_fast.transfer.deliver`), so the copies overlap the
    model. The order and the values are those of the synchronous path.

    Args:
        plan_for: ``plan_for(i)`` -> the plan of pair ``i`` (frames ``i`` and ``i + 1``),
            called once frame ``i + 2`` (or the end) has been read.
        tail_for: ``tail_for(n)`` -> tags of the outputs that repeat the last of ``n``
            frames after the last pair (``(None,)``: the last frame once).
        select: ``select(first_pair, tags)`` -> False to skip a chunk of pairs (resumed
            or distributed runs); ``tags`` are the chunk's outputs, the tail included
            on the last chunk. Chunks start at multiples of ``batch_size``.
        tile: as :func:`interpolate`, or a resolved :class:`~film_fast.tiling.Tiling`.
        on_start: called with the resolved tiling and the frame size, and again with
            each smaller tiling an out-of-memory retry switches to.
        retry_oom: if the first chunk runs out of device memory before anything was
            yielded, retry it with :func:`~film_fast.tiling.smaller_tiling` (warning each
            time) instead of raising. Default: only for ``tile="auto"``; ``True`` lets a
            caller that resolved "auto" itself (``film-fast video``, which records the
            tiling for ``--resume``) start from its :class:`Tiling`.
        cuda_graphs: replay the model's calls from CUDA graphs
            (:class:`film_fast.cuda_graphs.CUDAGraphEncoded`); a model on a CUDA device only.
            If a capture fails, the run warns and goes on without them. A
            ``CUDAGraphEncoded`` of the model is used as given (its graphs serve several runs).
    Raises:
        InputError: fewer than 2 frames, a frame of another size or kind, a bad frame.
    """
    if isinstance(cuda_graphs, CUDAGraphEncoded):
        if cuda_graphs.model is not model:
            raise ValueError("cuda_graphs: that CUDAGraphEncoded wraps another model")
        graphs = cuda_graphs
    elif cuda_graphs:
        if _device_dtype(model)[0].type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on "
                             f"{_device_dtype(model)[0]}")
        graphs = CUDAGraphEncoded(model)
    else:
        graphs = None
    return deliver(_stream_items(model, frames, plan_for, batch_size, scene_threshold, tile,
                                 tail_for, select, on_start, budget, graphs, retry_oom))


def _stream_items(model, frames, plan_for, batch_size, scene_threshold, tile, tail_for, select,
                  on_start, budget, graphs=None, retry_oom=None):
    """run_stream's items, generated frames possibly still pending (transfer.PendingFrame)."""
    it = iter(frames)
    first_obj = next(it, None)
    if first_obj is None:
        raise InputError("no frames to interpolate (need at least 2)")
    first = _Frame.wrap(first_obj, 0)
    kind = first.kind
    height, width = first.size

    def take(index: int) -> Optional[_Frame]:
        obj = next(it, None)
        if obj is None:
            return None
        frame = _Frame.wrap(obj, index)
        if frame.kind != kind:
            raise InputError(f"frame {index}: is a {frame.kind} frame but frame 0 was a {kind} "
                             "frame; give every frame the same way")
        if frame.size != (height, width):
            raise InputError(f"frame {index} is {frame.size[1]}x{frame.size[0]}, expected "
                             f"{width}x{height} like frame 0 (the size must not change)")
        return frame

    second = take(1)
    if second is None:
        raise InputError("need at least 2 frames to interpolate, got 1")
    device, dtype = _device_dtype(model)
    transfers = Transfers(device, dtype)
    held = (batch_size + 1) + batch_size * plan_for(0)[0].max_live
    if isinstance(tile, Tiling):
        tiling = tile
    else:
        # A flip ensemble (FILM.ensemble) multiplies every encoded frame and call by its size.
        k = getattr(model, "ensemble", 1)
        tiling = choose_tiling(tile, model.options, height, width, device=device, dtype=dtype,
                               batch=batch_size * k, held=held * k, budget=budget,
                               backend=getattr(model, "backend", None), ensemble=k)
    if on_start is not None:
        on_start(tiling, height, width)
    runner = _Runner(model, height, width, tiling, transfers, graphs)
    passthrough = (lambda f: f.orig)

    def out_generated(image: torch.Tensor):
        return transfers.download(image, kind)

    # tile="auto" is a prediction: if the first chunk runs out of device memory before it
    # made anything, it is retried a step smaller (smaller_tiling) instead of failing.
    if retry_oom is None:
        retry_oom = not isinstance(tile, Tiling) and tile == "auto"
    made = 0
    lookahead = [second]
    next_index = 2
    prev, prev_node = first, None
    pair = 0
    while True:
        while len(lookahead) < batch_size + 1:  # the chunk, and one more to see the end coming
            frame = take(next_index)
            if frame is None:
                break
            lookahead.append(frame)
            next_index += 1
        if not lookahead:
            break
        chunk, lookahead = lookahead[:batch_size], lookahead[batch_size:]
        last = not lookahead
        inputs = [prev] + chunk
        plans = [plan_for(pair + j) for j in range(len(chunk))]
        tail = list(tail_for(pair + len(chunk) + 1)) if last else []
        tags = [tag for _, outputs in plans for _, tag in outputs] + tail
        if select is None or select(pair, tags):
            # This chunk's frames were uploaded with the previous one (or now, after a skip);
            # the next chunk's first frame starts now, behind this chunk's compute.
            for frame in chunk + lookahead[:batch_size]:
                transfers.start_upload(frame)
            while True:
                chunk_items = _run_chunk(runner, inputs, prev_node, plans, batch_size,
                                         scene_threshold, passthrough, out_generated)
                try:
                    while True:
                        item = next(chunk_items)
                        made += 1
                        yield item
                except StopIteration as done:
                    prev_node = done.value
                    break
                except torch.OutOfMemoryError as e:
                    smaller = smaller_tiling(tiling, model.options, height, width)
                    if not retry_oom or made or smaller is None:
                        raise
                    warnings.warn(f"film_fast: out of memory with {tiling.describe()} "
                                  f"({' '.join(str(e).split())[:120]}); retrying with "
                                  f"{smaller.describe()}", RuntimeWarning, stacklevel=2)
                    del chunk_items, e
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    tiling = smaller
                    runner = _Runner(model, height, width, tiling, transfers, runner.graphs)
                    if on_start is not None:
                        on_start(tiling, height, width)
            for tag in tail:
                yield tag, passthrough(inputs[-1])
        else:
            prev_node = None
        prev = inputs[-1]
        pair += len(chunk)


def _run_chunk(runner: _Runner, inputs: List[_Frame], prev_node: Optional[_Node],
               plans: List[PairPlan], batch_size: int, scene_threshold: Optional[float],
               passthrough, out_generated):
    count = len(plans)
    plans = list(plans)
    if scene_threshold:
        for j in range(count):
            if plans[j][0].steps and _score_thumbs(inputs[j].thumb(),
                                                   inputs[j + 1].thumb()) > scene_threshold:
                plans[j] = _cut_plan(plans[j])

    # Input frames on the device, encoded once (the first may come from the previous chunk).
    needed = sorted({k for j, (s, _) in enumerate(plans) if s.steps for k in (j, j + 1)})
    nodes: List[Optional[_Node]] = [prev_node] + [None] * count
    fresh = [k for k in needed if nodes[k] is None]
    if fresh:
        images = runner.to_device([inputs[k] for k in fresh])
        feats = runner.encode(images) if runner.reuse else [None] * len(fresh)
        for k, image, f in zip(fresh, images, feats):
            nodes[k] = _Node(image, f)

    state = []
    for j, (schedule, _) in enumerate(plans):
        uses: Dict[int, int] = {}
        for s in schedule.steps:
            for n in (s.left, s.right):
                if n >= 2:
                    uses[n] = uses.get(n, 0) + 1
        state.append({"nodes": {0: nodes[j], 1: nodes[j + 1]}, "made": {}, "uses": uses})
    pending = sorted((si, j) for j, (schedule, _) in enumerate(plans)
                     for si in range(len(schedule.steps)))
    cursor = [0, 0]  # next pair to emit, next output of that pair

    def emit():
        while cursor[0] < count:
            j = cursor[0]
            outputs = plans[j][1]
            while cursor[1] < len(outputs):
                node, tag = outputs[cursor[1]]
                if node == 0:
                    frame = passthrough(inputs[j])
                elif node == 1:
                    frame = passthrough(inputs[j + 1])
                elif node in state[j]["made"]:
                    frame = state[j]["made"][node]
                else:
                    return
                yield tag, frame
                cursor[1] += 1
            state[j]["made"].clear()
            cursor[0] += 1
            cursor[1] = 0

    while pending:
        batch, rest = [], []
        for item in pending:
            si, j = item
            step = plans[j][0].steps[si]
            have = state[j]["nodes"]
            if len(batch) < batch_size and step.left in have and step.right in have:
                batch.append(item)
            else:
                rest.append(item)
        if not batch:  # cannot happen with a valid schedule (steps are topologically ordered)
            raise RuntimeError("interpolation schedule is not in dependency order")
        steps = [plans[j][0].steps[si] for si, j in batch]
        a = [state[j]["nodes"][s.left] for (_, j), s in zip(batch, steps)]
        b = [state[j]["nodes"][s.right] for (_, j), s in zip(batch, steps)]
        result = runner.call(a, b, [s.dt for s in steps])
        to_encode = []
        for i, ((_, j), s) in enumerate(zip(batch, steps)):
            schedule = plans[j][0]
            raw = result[i]
            state[j]["made"][s.node] = out_generated(raw)
            if s.node in schedule.encode:
                feed = raw.clamp(0.0, 1.0) if schedule.clamp else raw
                node = _Node(feed.to(dtype=runner.dtype))
                state[j]["nodes"][s.node] = node
                to_encode.append(node)
        if to_encode and runner.reuse:
            for node, f in zip(to_encode, runner.encode([n.image for n in to_encode])):
                node.feats = f
        for (_, j), s in zip(batch, steps):
            for n in (s.left, s.right):
                if n >= 2:
                    state[j]["uses"][n] -= 1
                    if state[j]["uses"][n] == 0:
                        del state[j]["nodes"][n]
        del result
        pending = rest
        yield from emit()
    yield from emit()
    last = nodes[count]
    return last if last is not None and (last.feats is not None or not runner.reuse) else None


# ---- the public API ------------------------------------------------------------------------
def interpolate(model, frames: Iterable[FrameLike], *, times_to_interpolate: Optional[int] = None,
                num_frames: Optional[int] = None, times: Optional[Sequence[float]] = None,
                batch_size: int = 1, scene_threshold: Optional[float] = None,
                tile: Union[None, str, int] = "auto",
                clamp_between: Optional[bool] = None,
                cuda_graphs=False) -> Iterator[FrameLike]:
    """Interpolates a whole sequence, streaming: yields every output frame in order.

    Args:
        model: a :class:`film_fast.FILM` (any device / dtype).
        frames: any iterable (a generator is fine: it is read as needed) of
            ``[3, H, W]`` float tensors in [0, 1] or ``[H, W, 3]`` uint8 arrays,
            all the same size and kind; at least 2.
        times_to_interpolate: K, the official recursive mid-point scheme:
            ``2^K - 1`` new frames per pair, all made with t = 0.5.
        num_frames: N evenly spaced new frames per pair, each by recursion from the
            nearest mid-point (the port's CLI scheme).
        times: direct times in (0, 1), one model call per time with ``dt = t``
            (sorted ascending). Give at most one of the three; none means K = 1.
        batch_size: model calls per forward (pairs advance together; >1 helps GPUs).
        scene_threshold: pairs whose :func:`scene_change_score` is above it are not
            interpolated (their new frames repeat the earlier frame); None or 0: off.
        tile: "auto" (full frame when the memory estimate fits, else tiles), "off" /
            None (full frame), or a tile size in pixels (overlap = size / 4).
        clamp_between: clamp generated frames before they are reused as end
            points; None = as each scheme's reference (see :mod:`film_fast.interpolation`).
        cuda_graphs: replay the model's calls from CUDA graphs (one frame size: a graph per
            call shape is captured once); needs a model on a CUDA device. Pass a
            :class:`film_fast.cuda_graphs.CUDAGraphEncoded` of the model to keep its graphs
            across calls.
    Yields:
        The input frames (as given; tensors as float32 CPU) and the new frames
        between them, in time order: ``(n - 1) * (M + 1) + 1`` frames with M new
        frames per pair. New frames come as float32 CPU ``[3, H, W]`` tensors in
        [0, 1] for tensor input, as ``[H, W, 3]`` uint8 arrays for array input.
    Raises:
        ValueError: conflicting or invalid options (at the call).
        InputError: fewer than 2 frames, a frame of another size or kind (naming
            its index), while iterating.
    """
    given = sum(v is not None for v in (times_to_interpolate, num_frames, times))
    if given > 1:
        raise ValueError("give at most one of times_to_interpolate, num_frames and times")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if scene_threshold is not None:
        if isinstance(scene_threshold, bool) or not isinstance(scene_threshold, (int, float)) \
                or not scene_threshold >= 0:
            raise ValueError(f"scene_threshold must be a number >= 0 or None, got "
                             f"{scene_threshold!r}")
    if times is not None:
        ordered = check_times(times)
        schedule = times_schedule(ordered)
        out_nodes = [0] + [j + 2 for j in range(len(ordered))]
    else:
        mode, value = resolve_schedule(times_to_interpolate, num_frames)
        if mode == "recursive":
            clamp = False if clamp_between is None else bool(clamp_between)
            schedule = recursive_schedule(_check_k(value), clamp)
            m = 1 << value
        else:
            clamp = True if clamp_between is None else bool(clamp_between)
            schedule = even_schedule(_check_n(value), clamp)
            m = value + 1
        out_nodes = [grid_node(p, m) for p in range(m)]
    plan = uniform_plan(schedule, out_nodes)
    if tile is not None and not isinstance(tile, (str, int)):
        raise ValueError(f"tile must be 'auto', 'off', None or an int, got {tile!r}")
    stream = run_stream(model, frames, lambda i: plan, batch_size=batch_size,
                        scene_threshold=scene_threshold or None, tile=tile,
                        cuda_graphs=cuda_graphs)
    return (frame for _, frame in stream)
