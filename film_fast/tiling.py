"""High-resolution inference: overlapping tiles, feathered blending, and a memory estimate.

A frame too large for the device is cut into overlapping tiles; each tile pair is
interpolated on its own and the tiles are blended with linear ramps across every
overlap (weights sum to one everywhere, so a flat area stays flat). Motion larger
than a tile cannot be matched inside that tile: FILM then sees a flow it cannot
find and the warp clamps at the tile border, so those pixels degrade (towards a
blend of the two frames) but nothing is read outside the frame and the result
stays finite; use the largest tile that fits.

Memory model (derived from the graph, then checked by measurement)
-----------------------------------------------------------------
With ``C_i`` the feature channels and ``F_i`` the fusion width at pyramid level
``i`` (:class:`film_fast.Options`), per padded pixel of one frame, in elements of
the model dtype:

* held features of an encoded frame: ``feat = sum_i (3 + C_i) / 4^i``
  (image + cascaded features per level; 163.9 for the published model, i.e.
  656 bytes/pixel in fp32 -- measured: 655.7);
* encoding transient: about ``2 * feat`` per frame (measured 1.87x on the CPU);
* one interpolation call (per sample): the two frames' level buffers are
  concatenated (``2 * feat``) and the fusion buffers
  ``sum_{i < fusion levels} (2 (3 + C_i) + 4 + F_i) / 4^i`` are allocated
  (450.8 for the published model), plus ~10% for decoder temporaries and the
  fp32 flows: 778.6 elements = 3.11 KB/pixel fp32 (measured on the CPU at
  512x512 / 768x768: 3.14 / 3.04 KB/pixel, 3.38 with batch 2).

The streaming engine holds the features of ``held`` frames (the chunk's input
frames plus generated frames that later calls still use), so its peak is
``elem * P * (held * feat + max(batch * 1.1 * (2 feat + fusion), n_encode * 2 feat))``
for ``P`` padded pixels. Without feature reuse (tiles re-encoded per call) only
the images are held and each call encodes ``2 * batch`` tiles.

In a real run the process grows more than the live tensors: allocators keep freed
blocks (the encoder's temporaries are not returned before the call allocates its
own), oneDNN keeps scratch buffers. Measured on the CPU with the published model
(fp32, ``film-fast video --factor 2`` on 960x506 frames): peak RSS 3.45 GB above the
loaded model, against 2.33 GB from the formula; so budgets are compared with the
formula times ``PEAK_FACTOR = 1.5``. On CUDA, where the graph writes its buffers in
place, the engine's live tensors are predicted exactly by
:func:`film_fast.memory_plan.plan_stream` (a dry run of the engine, checked against real
runs); :func:`choose_tiling` scales the formula to that plan and uses
``CUDA_PLAN_FACTOR = 1.15`` when it knows the model's backend. Against the forward's plan
prediction, one call of the formula (``reuse=False``, batch 1) is 1.29x the Triton
path's activations in fp16 and 1.30x in fp32, and 1.18x the torch backend's in fp32.
It is only 0.93x the torch backend's in fp16/bf16, whose warps read fp32 copies of
the features, so there ``PEAK_FACTOR`` is the margin (guarded by
``tests/test_memory_plan.py``).

Available memory: CUDA ``torch.cuda.mem_get_info`` free bytes plus what torch's
caching allocator holds unused; CPU ``MemAvailable`` from ``/proc/meminfo``
(no psutil). The engine plans for 85% (CUDA) / 70% (CPU, shared with other
processes) of it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .errors import InputError
from .options import Options

Box = Tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)

DEFAULT_OVERLAP_FRACTION = 4  # overlap = tile // 4
CPU_BUDGET_FRACTION = 0.70
CUDA_BUDGET_FRACTION = 0.85
TRANSIENT_MARGIN = 1.10
PEAK_FACTOR = 1.5  # process growth / live-tensor estimate, measured (module docstring)
# On CUDA with a dry-run plan (exact for live tensors, checked on the CPU to the byte): the
# margin for what it does not count, the caching allocator's fragmentation and rounding of
# large blocks to 2 MiB, typically a few percent. Not yet measured on a GPU
# (benchmarks/memory_check.py reports max_memory_reserved next to the plan for that).
CUDA_PLAN_FACTOR = 1.15


# ---- tile grids ---------------------------------------------------------------------------
def _axis_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles covering ``[0, length)``: first at 0, last flush with the end,
    evenly spread, every overlap at least ``overlap``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    count = max(count, 2)
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def _axis_weights(starts: Sequence[int], tile: int, length: int) -> List[torch.Tensor]:
    """Per tile, a 1-D weight: 1 inside, a linear ramp across each overlap with a neighbour,
    (x + 0.5) / overlap rising and falling; neighbouring ramps sum to exactly 1."""
    size = min(tile, length)
    out = []
    for k, s in enumerate(starts):
        w = torch.ones(size, dtype=torch.float64)
        x = torch.arange(size, dtype=torch.float64) + 0.5
        if k > 0:
            ov = starts[k - 1] + size - s
            if ov > 0:
                w = torch.minimum(w, (x / ov).clamp(max=1.0))
        if k + 1 < len(starts):
            ov = s + size - starts[k + 1]
            if ov > 0:
                w = torch.minimum(w, ((size - x) / ov).clamp(max=1.0))
        out.append(w)
    return out


@dataclass(frozen=True)
class TileGrid:
    """Tiles of a ``height x width`` frame; ``tile = None`` means one tile, the whole frame."""

    height: int
    width: int
    tile: Optional[int]
    overlap: int
    boxes: Tuple[Box, ...]

    @property
    def full_frame(self) -> bool:
        return len(self.boxes) == 1

    def weights(self, device, dtype=torch.float32) -> List[torch.Tensor]:
        """Per tile, ``[1, 1, h, w]`` blending weights normalised so all tiles sum to 1."""
        if self.full_frame:
            return [torch.ones(1, 1, self.height, self.width, dtype=dtype, device=device)]
        size_h = min(self.tile, self.height)
        size_w = min(self.tile, self.width)
        ys = sorted({b[0] for b in self.boxes})
        xs = sorted({b[2] for b in self.boxes})
        wy = dict(zip(ys, _axis_weights(ys, size_h, self.height)))
        wx = dict(zip(xs, _axis_weights(xs, size_w, self.width)))
        maps = [wy[y0][:, None] * wx[x0][None, :] for y0, _, x0, _ in self.boxes]
        total = torch.zeros(self.height, self.width, dtype=torch.float64)
        for (y0, y1, x0, x1), m in zip(self.boxes, maps):
            total[y0:y1, x0:x1] += m
        return [(m / total[y0:y1, x0:x1]).to(device=device, dtype=dtype)[None, None]
                for (y0, y1, x0, x1), m in zip(self.boxes, maps)]


def make_grid(height: int, width: int, tile: Optional[int] = None,
              overlap: Optional[int] = None) -> TileGrid:
    """A grid of ``tile x tile`` boxes (overlap default ``tile // 4``) or one full-frame box."""
    if tile is None or (tile >= height and tile >= width):
        return TileGrid(height, width, None, 0, ((0, height, 0, width),))
    if tile < 2:
        raise InputError(f"tile size must be at least 2, got {tile}")
    ov = tile // DEFAULT_OVERLAP_FRACTION if overlap is None else int(overlap)
    if not 0 <= ov < tile:
        raise InputError(f"tile overlap must be in [0, {tile}), got {ov}")
    size_h, size_w = min(tile, height), min(tile, width)
    boxes = tuple((y, y + size_h, x, x + size_w)
                  for y in _axis_starts(height, tile, ov) for x in _axis_starts(width, tile, ov))
    return TileGrid(height, width, tile, ov, boxes)


def round_tile(tile: int, options: Options) -> int:
    """A tile size rounded up to a multiple of the model's size multiple (64 published),
    at least two multiples (the coarsest pyramid level is then >= 2 pixels)."""
    m = options.size_multiple
    return max(2 * m, -(-int(tile) // m) * m)


# ---- memory -------------------------------------------------------------------------------
def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def feature_elements(options: Options, dtype=torch.float32, device="cpu") -> float:
    """Held elements per padded pixel of one encoded frame: ``sum_i (3 + C_i) / 4^i``, each
    level's channels rounded up to the dtype's channel alignment (16 in 16-bit: 181.3
    instead of 163.9 for the published model; see :mod:`film_fast.buffers`)."""
    from .buffers import aligned, channel_align
    align = channel_align(torch.device(device), dtype)
    return sum(aligned(3 + options.feature_channels(i), align) / 4 ** i
               for i in range(options.pyramid_levels))


def fusion_elements(options: Options) -> float:
    """Fusion-buffer elements per padded pixel of one interpolation call."""
    total = 0.0
    last = options.fusion_pyramid_levels - 1
    for i in range(options.fusion_pyramid_levels):
        extra = 0 if i == last else options.fusion_filters(i)
        total += (2 * (3 + options.feature_channels(i)) + 4 + extra) / 4 ** i
    return total


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_bytes(options: Options, height: int, width: int, *, dtype=torch.float32,
                   batch: int = 1, held: float = 3.0, reuse: bool = True, device="cpu") -> int:
    """Peak bytes of the streaming engine on ``height x width`` frames (or tiles).

    ``held``: encoded frames kept alive (inputs of a chunk + generated frames still
    needed); ``reuse=False``: features are not kept, each call encodes its 2*batch tiles.
    """
    pixels = _padded(height, options.size_multiple) * _padded(width, options.size_multiple)
    elem = _elem_size(dtype)
    feat = feature_elements(options, dtype, device)
    call = TRANSIENT_MARGIN * (2 * feat + fusion_elements(options))
    if reuse:
        live = held * feat + max(batch * call, (batch + 1) * 2 * feat)
    else:
        live = 2 * batch * feat + batch * call  # two encoded tiles per sample, then the call
    return int(elem * pixels * live)


def cpu_fast_path_reserve(options: Options, device, dtype=torch.float32) -> int:
    """Bytes the CPU fp32 fast paths hold apart from the live tensors :func:`estimate_bytes`
    counts, for a model with ``options``: Winograd's cached transformed weights (F(4x4)
    kernels are 36/9 the size of the 3x3 ones, and shared weights also keep an F(2x2) copy:
    16/9; bounded here by 6x the weights of the convs wide enough for Winograd, ~0.8 GB for
    the published model) and one band of its temporaries. 0 where no conv qualifies."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return 0
    from .layers import Conv  # (the graph imports nothing from here)
    from .model import FILM
    from .ops import winograd
    with torch.device("meta"):
        convs = [m for m in FILM(options).modules() if isinstance(m, Conv)]
    wide = [c for c in convs if c.kernel_size == 3
            and winograd.tile_size(c.in_channels, c.out_channels, 64, 64) is not None]
    if not wide:
        return 0
    return 6 * 4 * sum(c.weight.numel() for c in wide) + winograd.MAX_BAND_BYTES


def available_bytes(device: Union[str, torch.device]) -> int:
    """Free memory on ``device`` (see the module docstring); 0 when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_budget(device: Union[str, torch.device]) -> int:
    device = torch.device(device)
    fraction = CUDA_BUDGET_FRACTION if device.type == "cuda" else CPU_BUDGET_FRACTION
    return int(available_bytes(device) * fraction)


@dataclass(frozen=True)
class Tiling:
    """How frames are processed: ``tile`` None = full frame; ``reuse`` = keep per-frame
    (per-tile) features across pairs (else re-encode the tiles of each call)."""

    tile: Optional[int]
    reuse: bool = True

    def describe(self) -> str:
        where = "full frame" if self.tile is None else f"{self.tile}px tiles"
        return where + ("" if self.reuse else " (features re-encoded per call)")


def smaller_tiling(tiling: Tiling, options: Options, height: int,
                   width: int) -> Optional[Tiling]:
    """The next step down after running out of memory with ``tiling``: the same tiles
    without feature reuse, then tiles of half the size (rounded up to the size multiple, at
    least two of them); None when nothing smaller is left."""
    if tiling.reuse:
        return Tiling(tiling.tile, False)
    m = options.size_multiple
    current = tiling.tile if tiling.tile is not None else _padded(max(height, width), m)
    size = round_tile(current // 2, options)
    return Tiling(size, False) if size < current else None


def _grid_fits(options, grid: TileGrid, *, dtype, batch, held, reuse, budget,
               device="cpu", scale: float = 1.0) -> bool:
    if reuse:
        # Every tile's features of every held frame stay alive; the largest tile's call runs.
        pix_feat = sum((b[1] - b[0]) * (b[3] - b[2]) for b in grid.boxes)
        h = grid.boxes[0][1] - grid.boxes[0][0]
        w = grid.boxes[0][3] - grid.boxes[0][2]
        per_tile = estimate_bytes(options, h, w, dtype=dtype, batch=batch, held=0, reuse=True,
                                  device=device)
        held_bytes = held * feature_elements(options, dtype, device) * _elem_size(dtype) * pix_feat
        return scale * (held_bytes + per_tile) <= budget
    h = grid.boxes[0][1] - grid.boxes[0][0]
    w = grid.boxes[0][3] - grid.boxes[0][2]
    return scale * estimate_bytes(options, h, w, dtype=dtype, batch=batch, reuse=False,
                                  device=device) <= budget


def choose_tiling(tile: Union[None, str, int], options: Options, height: int, width: int, *,
                  device, dtype=torch.float32, batch: int = 1, held: float = 3.0,
                  budget: Optional[int] = None, backend: Optional[str] = None,
                  ensemble: int = 1) -> Tiling:
    """Resolves ``tile`` ("auto" | "off" | None | N) for frames of ``height x width``.

    "auto": the full frame when its estimate (times :data:`PEAK_FACTOR`) fits the
    budget, otherwise the largest tile (a multiple of the size multiple, down to 2 of
    them) that fits, keeping features when they fit too. N: that tile size (rounded
    up to the size multiple). ``budget``: bytes (default: measured, see
    :func:`memory_budget`; ``FILM_FAST_MEMORY_BUDGET`` overrides it). ``batch`` and
    ``held`` count encoded variants (frames times ``ensemble``).

    On a CUDA device, with the model's ``backend`` given and dry-runnable (Triton, torch),
    the formula is calibrated by :func:`film_fast.memory_plan.plan_stream`: the engine's
    own calls dry-run on the meta device at the full frame size (0.1 s at 1080p, ~2 s at
    4K on this CPU), whose ratio to the formula scales every estimate, and the margin is
    :data:`CUDA_PLAN_FACTOR` instead of :data:`PEAK_FACTOR`. The formula alone overstates
    the Triton path by 1.29x, which with the 1.5x margin tiled 4K fp16 on a 24 GB GPU
    although the untiled run needs 16.5 GB.
    """
    if tile is None or tile == "off":
        return Tiling(None, True)
    scale = _plan_scale(options, height, width, device=device, dtype=dtype, batch=batch,
                        held=held, backend=backend, ensemble=ensemble)
    if budget is None:
        override = env_budget_override()
        budget = memory_budget(device) if override is None else override
    known = budget > 0  # (0: free memory unknown)
    if known:
        budget = max(budget - cpu_fast_path_reserve(options, device, dtype), 0)
    # estimate_bytes counts live tensors only
    budget = int(budget / (PEAK_FACTOR if scale is None else CUDA_PLAN_FACTOR))
    scale = scale or (lambda reuse: 1.0)
    if isinstance(tile, str):
        if tile != "auto":
            raise InputError(f"tile must be 'auto', 'off' or a size in pixels, got {tile!r}")
        if not known:  # unknown memory: assume it fits
            return Tiling(None, True)
        full = make_grid(height, width, None)
        if _grid_fits(options, full, dtype=dtype, batch=batch, held=held, reuse=True,
                      budget=budget, device=device, scale=scale(True)):
            return Tiling(None, True)
        m = options.size_multiple
        top = _padded(max(height, width), m)
        for size in range(top, 2 * m - 1, -m):
            grid = make_grid(height, width, size)
            for reuse in (True, False):
                if _grid_fits(options, grid, dtype=dtype, batch=batch, held=held, reuse=reuse,
                              budget=budget, device=device, scale=scale(reuse)):
                    return Tiling(None if grid.full_frame else size, reuse)
        return Tiling(2 * m, False)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise InputError(f"tile must be 'auto', 'off' or a positive size in pixels, got {tile!r}")
    size = round_tile(tile, options)
    grid = make_grid(height, width, size)
    if grid.full_frame:
        return Tiling(None, True)
    if not known:
        return Tiling(size, True)
    reuse = _grid_fits(options, grid, dtype=dtype, batch=batch, held=held, reuse=True,
                       budget=budget, device=device, scale=scale(True))
    return Tiling(size, reuse)


def _plan_scale(options: Options, height: int, width: int, *, device, dtype, batch: int,
                held: float, backend: Optional[str], ensemble: int):
    """``scale(reuse)`` -> dry-run plan / formula at the full frame (computed on first use),
    or None where there is no plan: not CUDA, no backend given, or a backend the dry run
    does not cover (CuPy)."""
    if backend is None or torch.device(device).type != "cuda":
        return None
    from .memory_plan import DRY_RUN_BACKENDS, plan_stream
    from .ops import dispatch
    from .ops.library import backend_for
    try:
        name = backend_for("conv2d", backend, torch.device(device))
    except dispatch.BackendUnavailable:  # (planning for a device this machine lacks)
        name = dispatch.normalize_backend(backend)
    if name not in DRY_RUN_BACKENDS:
        return None
    k = max(1, int(ensemble))
    ratios: dict = {}

    def scale(reuse: bool) -> float:
        if reuse not in ratios:
            planned = plan_stream(options, height, width, dtype=dtype, backend=name,
                                  batch=max(1, batch // k), held=held / k, reuse=reuse,
                                  ensemble=k)
            formula = estimate_bytes(options, height, width, dtype=dtype, batch=batch,
                                     held=held, reuse=reuse, device=device)
            ratios[reuse] = planned / max(formula, 1)
        return ratios[reuse]
    return scale


def blend_tiles(outputs: Sequence[torch.Tensor], grid: TileGrid,
                weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feathered sum of per-tile ``[N, 3, h, w]`` outputs into ``[N, 3, H, W]`` float32."""
    first = outputs[0]
    out = torch.zeros(first.shape[0], first.shape[1], grid.height, grid.width,
                      dtype=torch.float32, device=first.device)
    for (y0, y1, x0, x1), y, w in zip(grid.boxes, outputs, weights):
        out[:, :, y0:y1, x0:x1].addcmul_(y.float(), w)
    return out


def env_budget_override() -> Optional[int]:
    """``FILM_FAST_MEMORY_BUDGET`` (bytes) replaces the measured budget (tests, shared hosts)."""
    value = os.environ.get("FILM_FAST_MEMORY_BUDGET")
    if not value:
        return None
    try:
        return int(float(value))
    except ValueError:
        raise InputError(f"FILM_FAST_MEMORY_BUDGET must be a number of bytes, got "
                         f"{value!r}") from None
