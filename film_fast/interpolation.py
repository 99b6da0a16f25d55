"""In-between frame schedules for a pair of frames, and a helper that runs the model on them.

Two schedules, each reproducing a public FILM front end:

* recursive (``times_to_interpolate = K``), the official ``interpolator_cli`` /
  ``util.interpolate_recursively_from_memory``: the frame at 0.5 is
  ``model(x0, x1, 0.5)``, then each half is split the same way, ``K`` levels
  deep, giving ``2^K - 1`` in-between frames at ``j / 2^K``. Every call uses
  ``t = 0.5`` (what the published models are trained for).
* evenly spaced (``num_frames = N``), the PyTorch port's ``inference.py``:
  targets ``i / (N + 1)``; repeatedly, among the remaining targets and the
  intervals between frames already made, take the target whose relative
  position in its interval is closest to 0.5 and call the model on the
  interval's end frames with that relative position as ``t``.

Clamping generated frames before they are fed back to the model follows each
reference: the port clamps (``prediction.clamp(0, 1)``), the official
recursion does not (its ``Interpolator`` returns the raw model output and only
``write_image`` clips). ``clamp_between`` overrides this. Frames handed back
to the caller are always clamped to [0, 1].
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterator, List, Optional, Tuple

import torch

MAX_TIMES_TO_INTERPOLATE = 10
Progress = Optional[Callable[[int, int], None]]


# ---- schedules -------------------------------------------------------------------------------
def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"times_to_interpolate must be an int in 0..{MAX_TIMES_TO_INTERPOLATE}, "
                         f"got {k!r}")
    if not 0 <= k <= MAX_TIMES_TO_INTERPOLATE:
        raise ValueError(f"times_to_interpolate must be in 0..{MAX_TIMES_TO_INTERPOLATE} "
                         f"(2^K + 1 frames), got {k}")
    return k


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"num_frames must be an int >= 0, got {n!r}")
    if n < 0:
        raise ValueError(f"num_frames must be >= 0, got {n}")
    return n


def resolve_schedule(times_to_interpolate: Optional[int] = None,
                     num_frames: Optional[int] = None) -> Tuple[str, int]:
    """Validates the two exclusive options; returns ``("recursive", K)`` or ``("even", N)``.

    Neither given means ``times_to_interpolate = 1`` (one frame at t = 0.5).
    """
    if times_to_interpolate is not None and num_frames is not None:
        raise ValueError("give either times_to_interpolate or num_frames, not both")
    if num_frames is not None:
        return "even", _check_n(num_frames)
    return "recursive", _check_k(1 if times_to_interpolate is None else times_to_interpolate)


def recursive_times(k: int) -> List[float]:
    """The ``2^k - 1`` in-between times of ``k`` levels of mid-point recursion, ascending.

    ``recursive_times(2) == [0.25, 0.5, 0.75]``; ``recursive_times(0) == []``.
    """
    k = _check_k(k)
    n = 1 << k
    return [j / n for j in range(1, n)]


def even_times(n: int) -> List[float]:
    """The ``n`` evenly spaced in-between times ``i / (n + 1)``, ascending."""
    n = _check_n(n)
    return [i / (n + 1) for i in range(1, n + 1)]


def recursive_steps(k: int) -> List[Tuple[int, int, int, float]]:
    """The model calls of ``k`` levels of mid-point recursion, depth first (the official order).

    Positions are in units of ``1 / 2^k`` (0 and ``2^k`` are the input frames); each
    entry ``(target, left, right, dt)`` makes ``target`` from the frames at ``left``
    and ``right`` with ``dt = 0.5``. ``recursive_steps(2) == [(2, 0, 4, 0.5),
    (1, 0, 2, 0.5), (3, 2, 4, 0.5)]``.
    """
    k = _check_k(k)
    steps: List[Tuple[int, int, int, float]] = []
    stack = [(0, 1 << k, k)]
    while stack:  # pre-order: a node, then its left subtree, then its right subtree
        lo, hi, depth = stack.pop()
        if depth == 0:
            continue
        mid = (lo + hi) // 2
        steps.append((mid, lo, hi, 0.5))
        stack.append((mid, hi, depth - 1))
        stack.append((lo, mid, depth - 1))
    return steps


def even_steps(n: int) -> List[Tuple[int, int, int, float]]:
    """The model calls of the port's evenly spaced scheme, in its order.

    Positions are output indices (0 and ``n + 1`` are the inputs); each entry
    ``(target, left, right, dt)`` makes ``target`` from the frames at ``left`` and
    ``right`` at relative time ``dt`` (a float32 value). Repeatedly, among the
    remaining targets and the intervals between frames already made, the target
    whose relative position in its interval is closest to 0.5 comes next; times
    are float32 ``linspace`` values and the choice is an argmin over
    (interval, target) like the port, so ties break the same way.
    """
    n = _check_n(n)
    splits = torch.linspace(0, 1, n + 2)
    idxes = [0, n + 1]
    remains = list(range(1, n + 1))
    steps: List[Tuple[int, int, int, float]] = []
    while remains:
        starts = splits[idxes[:-1]]
        ends = splits[idxes[1:]]
        rel = (splits[None, remains] - starts[:, None]) / (ends - starts)[:, None]
        flat = int(torch.argmin((rel - 0.5).abs()))
        start_i, step = divmod(flat, len(remains))
        target = remains.pop(step)
        left, right = idxes[start_i], idxes[start_i + 1]
        dt = (splits[target] - splits[left]) / (splits[right] - splits[left])
        steps.append((target, left, right, float(dt)))  # exact: a float32 value
        idxes.insert(bisect.bisect_left(idxes, target), target)
    return steps


def frame_times(times_to_interpolate: Optional[int] = None,
                num_frames: Optional[int] = None) -> List[float]:
    """Times of every output frame, inputs included: ``[0.0, ..., 1.0]``."""
    mode, value = resolve_schedule(times_to_interpolate, num_frames)
    inner = recursive_times(value) if mode == "recursive" else even_times(value)
    return [0.0] + inner + [1.0]


# ---- running the model -------------------------------------------------------------------
def _device_dtype(model) -> Tuple[torch.device, torch.dtype]:
    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return torch.device("cpu"), torch.float32


def _check_frames(x0: torch.Tensor, x1: torch.Tensor) -> None:
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [3, H, W], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"{name} must be [3, H, W] (RGB), got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor in [0, 1], got {x.dtype}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same size, got {list(x0.shape)} and "
                         f"{list(x1.shape)}")


def iter_frames(model, x0: torch.Tensor, x1: torch.Tensor, *,
                times_to_interpolate: Optional[int] = None, num_frames: Optional[int] = None,
                progress: Progress = None,
                clamp_between: Optional[bool] = None) -> Iterator[Tuple[int, float, torch.Tensor]]:
    """Yields ``(index, time, frame)`` for every output frame, in the order they are made.

    Recursive mode yields in output order (index 0 .. 2^K); evenly spaced mode
    yields ``x0`` and ``x1`` first, then in-between frames in the port's order.
    Frames are ``[3, H, W]`` float32 CPU tensors clamped to [0, 1]; inputs are
    returned unchanged (as float32).

    Args:
        model: ``model(a [1, 3, H, W], b [1, 3, H, W], dt [1, 1]) -> [1, 3, H, W]``
            (a :class:`film_fast.FILM`); inputs are moved to its device and dtype.
        x0, x1: ``[3, H, W]`` frames at t = 0 and t = 1, values in [0, 1].
        times_to_interpolate, num_frames: the schedule (exactly one, default K = 1).
        progress: ``progress(done, total)`` after each model call.
        clamp_between: clamp generated frames to [0, 1] before feeding them back
            to the model; None = as the schedule's reference (see module docstring).
    """
    # Validate now, not at the first next(): a generator body runs lazily.
    mode, value = resolve_schedule(times_to_interpolate, num_frames)
    _check_frames(x0, x1)
    clamp = (mode == "even") if clamp_between is None else bool(clamp_between)
    return _generate(model, x0, x1, mode, value, progress, clamp)


def _generate(model, x0: torch.Tensor, x1: torch.Tensor, mode: str, value: int,
              progress: Progress, clamp: bool) -> Iterator[Tuple[int, float, torch.Tensor]]:
    device, dtype = _device_dtype(model)
    total = (1 << value) - 1 if mode == "recursive" else value
    done = [0]

    def call(a: torch.Tensor, b: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        # inference_mode only around the call: a context held across the yields below
        # would leak into the caller's loop body.
        with torch.inference_mode():
            out = model(a[None], b[None], dt.reshape(1, 1).to(device))[0]
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        return out

    def output(frame: torch.Tensor) -> torch.Tensor:
        return frame.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0)

    first = x0.detach().to(device="cpu", dtype=torch.float32)
    last = x1.detach().to(device="cpu", dtype=torch.float32)
    a = x0.detach().to(device=device, dtype=dtype)
    b = x1.detach().to(device=device, dtype=dtype)
    if mode == "recursive":
        half = torch.tensor(0.5, dtype=torch.float32)
        scale = 1 << value

        def recurse(fa: torch.Tensor, fb: torch.Tensor, lo: int, hi: int, depth: int):
            # Like the official _recursive_generator: split at the middle, recurse into
            # both halves, yield in time order (excluding the right end frame).
            if depth == 0:
                return
            mid = call(fa, fb, half)
            m = (lo + hi) // 2
            mid_in = mid.clamp(0.0, 1.0) if clamp else mid
            yield from recurse(fa, mid_in, lo, m, depth - 1)
            yield m, m / scale, output(mid)
            yield from recurse(mid_in, fb, m, hi, depth - 1)

        yield 0, 0.0, first
        yield from recurse(a, b, 0, scale, value)
        yield scale, 1.0, last
        return

    # Evenly spaced, the port's greedy order (see even_steps).
    n = value
    yield 0, 0.0, first
    yield n + 1, 1.0, last
    frames = {0: a, n + 1: b}
    for target, left, right, dt in even_steps(n):
        frame = call(frames[left], frames[right], torch.tensor(dt, dtype=torch.float32))
        frames[target] = frame.clamp(0.0, 1.0) if clamp else frame
        yield target, target / (n + 1), output(frame)


def interpolate_pair(model, x0: torch.Tensor, x1: torch.Tensor, *,
                     times_to_interpolate: Optional[int] = None, num_frames: Optional[int] = None,
                     progress: Progress = None,
                     clamp_between: Optional[bool] = None) -> List[torch.Tensor]:
    """All frames from ``x0`` to ``x1`` in time order, both inputs included.

    Returns ``2^K + 1`` frames for ``times_to_interpolate = K`` (default 1) or
    ``N + 2`` for ``num_frames = N``; each ``[3, H, W]`` float32 on the CPU,
    in [0, 1]. See :func:`iter_frames` for the arguments.

    Raises:
        ValueError: both schedules given, K outside 0..10, N < 0, or frames of
            different shapes.
    """
    made = {index: frame for index, _, frame in
            iter_frames(model, x0, x1, times_to_interpolate=times_to_interpolate,
                        num_frames=num_frames, progress=progress, clamp_between=clamp_between)}
    return [made[i] for i in range(len(made))]
