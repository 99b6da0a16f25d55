"""``film-fast video``: interpolate a video file with PyAV (FFmpeg), resumably, on 1..P processes.

Pipeline (nothing holds more than a chunk of frames in memory):

1. **Decode** the first video stream with PyAV, frame by frame, to 8-bit RGB
   (colour matrix and range taken from the stream, so decode and encode use the
   same conversion); a source with more than 8 bits per component (10/12-bit
   YUV, ``rgb48``, ...) is decoded to 16-bit RGB (``rgb48le``) and interpolated
   as float frames, see "Bit depth" below. Timestamps come from each frame's
   ``pts`` (variable frame rate is kept: in-between frames sit between their
   neighbours' timestamps); a missing or non-increasing ``pts`` is replaced by the
   previous one plus one nominal frame duration.
2. **Interpolate** with :func:`film_fast.stream.run_stream` and write every output
   frame as ``<OUT>.film-fast-work/frames/<k>.png`` (``k`` = output frame number,
   written under a temporary name and renamed, so a file that exists is complete).
   ``manifest.json`` in that folder records the job (input, model, options); the
   set of PNGs on disk is the record of what is done.
3. **Encode** the PNGs in order with PyAV to ``.<name>.tmp-<pid><ext>`` next to
   OUT, interleaving the audio streams (packets copied when the output container
   accepts the codec, else decoded and re-encoded), then rename it to OUT and
   remove the work folder.

``--resume`` reruns steps 1-3 with the same work folder: decoding restarts from
the first frame (it is cheap next to FILM), chunks whose PNGs all exist are
skipped, a partly written chunk is redone, and the encode runs again. Frames are
identical to an uninterrupted run because chunks always start at the same pair
(multiples of the batch size).

Bit depth
---------
The work folder holds 8-bit RGB PNGs when every component of the input's pixel
format has at most 8 bits (exactly the original pipeline: uint8 frames in, uint8
frames out), else 16-bit RGB PNGs (written and read with FFmpeg's PNG codec,
``rgb48be``): frames are decoded to ``rgb48le``, handed to the model as ``[3, H, W]``
float32 tensors (value / 65535), and written back as ``round(x * 65535)``, so input
frames pass through bit-exact. ``manifest.json`` records the depth (``bit_depth``:
8 or 16; a manifest without it is 8-bit) and ``--resume`` refuses a work folder
written at another depth. The encoder gets the input's pixel format when it takes
it, else the closest one with more than 8 bits (``yuv420p10le`` for libx264,
``yuv444p10le`` for an RGB input, ...); an encoder with none falls back to 8 bits
with a one-line warning naming it.

Frame timing rules
------------------
``--factor F``: each pair (i, i+1) gives frames at ``t_i + j/F (t_{i+1} - t_i)``,
j = 0..F-1, then the last frame: ``(n - 1) F + 1`` frames at F times the frame
rate (time base = the input's / F, so timestamps are exact). F a power of two uses
the official recursive mid-point scheme (K = log2 F); other F use F - 1 evenly
spaced frames by the port's nearest-mid-point recursion.

``--fps R``: output frame k has time ``T_k = t_0 + k / R`` for every k with
``T_k <= t_last`` (``floor((t_last - t_0) R) + 1`` frames). For ``t_i <= T_k <
t_{i+1}``, with ``s = (T_k - t_i) / (t_{i+1} - t_i)``, the pair is refined by
recursive mid-points to the smallest level K (<= 10) with ``2^K >= R (t_{i+1} -
t_i)`` (grid spacing at most one output frame) and frame k is the grid frame
nearest to s (``round(s 2^K)``, halves up; 0 and 2^K are the input frames). Only
the grid frames that are used, and their recursion ancestors, are computed.

Scale-out: under ``torchrun --nproc_per_node=P`` (``WORLD_SIZE`` > 1) every
process decodes the input, segment s (a run of ``segment_pairs`` pairs) is
interpolated by rank ``s mod P`` into the shared frames folder, and rank 0 encodes
after a barrier (gloo on CPU, nccl on CUDA; each rank uses ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import FilmFastError, InputError
from .interpolation import _device_dtype
from .stream import (DEFAULT_SCENE_THRESHOLD, HOLD, dyadic_subset_schedule, even_schedule,
                     grid_node, prepare_frame, recursive_schedule, run_stream)
from .tiling import Tiling, choose_tiling

PROG = "film-fast"
WORK_SUFFIX = ".film-fast-work"
MANIFEST = "manifest.json"
FRAMES = "frames"
PTS_FILE = "pts.txt"
MANIFEST_VERSION = 1
MAX_FPS_LEVELS = 10
SEGMENT_MIN_PAIRS = 8
DIST_TIMEOUT = timedelta(days=7)  # rank 0 may wait at the barrier for slower ranks
PNG_COMPRESS_LEVEL = 1  # fast; the PNGs are temporary
HIGH_DEPTH = 16  # the work folder's bits per component for inputs above 8 bits
PNG16_FORMAT = "rgb48be"  # what FFmpeg's PNG codec writes (and decodes) 16-bit RGB as
PROGRESS_INTERVAL_S = 10.0  # progress lines when stderr is not a terminal

# AVColorSpace -> swscale colour matrix (SWS_CS_*): BT.709, FCC, BT.601 (BT470BG and
# SMPTE170M), SMPTE 240M, BT.2020 (NCL and CL). Anything else: swscale's default, BT.601.
_SWS_COLORSPACE = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
_STANDARD_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1",
                     8: "7.1"}
_FORMAT_PREFERENCE = {"mp4": "mp4", "m4v": "ipod", "mkv": "matroska", "mov": "mov",
                      "webm": "webm", "ts": "mpegts", "avi": "avi"}


class VideoError(FilmFastError):
    """Writing or encoding the output video failed (exit code 1)."""


def _require_av():
    try:
        import av
    except ImportError:
        raise InputError("film-fast video needs PyAV: pip install av (or pip install "
                         "'film_fast[video]')") from None
    av.logging.set_level(av.logging.ERROR)
    return av


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- probing and decoding -----------------------------------------------------------------
@dataclass
class VideoInfo:
    path: str
    width: int
    height: int
    codec: str
    pix_fmt: str
    time_base: Fraction
    rate: Optional[Fraction]
    frames: int
    duration: Optional[float]
    color_range: int
    colorspace: int
    color_primaries: int
    color_trc: int
    sample_aspect_ratio: Optional[Fraction]
    audio: List[Tuple[int, str]] = field(default_factory=list)
    bits: int = 8  # most bits of any colour component of pix_fmt

    @property
    def work_depth(self) -> int:
        """Bits per component of the work folder's frames: 8, or 16 for inputs above 8 bits."""
        return HIGH_DEPTH if self.bits > 8 else 8

    @property
    def sws_colorspace(self) -> int:
        return _SWS_COLORSPACE.get(self.colorspace, 5)

    @property
    def rgb_range(self) -> int:
        """The YUV range to convert from/to: the stream's, else full for yuvj*, else limited."""
        if self.color_range in (1, 2):
            return self.color_range
        return 2 if self.pix_fmt.startswith("yuvj") else 1

    def estimated_frames(self) -> int:
        if self.frames > 0:
            return self.frames
        if self.duration and self.rate:
            return max(2, round(self.duration * float(self.rate)))
        return 0


def probe(path: str) -> VideoInfo:
    """Describes the first video stream of ``path``; InputError naming the file if unusable."""
    av = _require_av()
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a video file")
    try:
        container = av.open(path)
    except Exception as e:  # av.error.InvalidDataError, PermissionError, ...
        raise InputError(f"{path}: cannot open as a video ({_one_line(e)})") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if not cc.width or not cc.height:
            raise InputError(f"{path}: the video stream has no frame size (unreadable)")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        sar = cc.sample_aspect_ratio
        return VideoInfo(
            path=path, width=cc.width, height=cc.height, codec=cc.name,
            pix_fmt=cc.pix_fmt or "yuv420p", time_base=Fraction(stream.time_base),
            rate=Fraction(rate) if rate else None, frames=int(stream.frames or 0),
            duration=duration, color_range=int(cc.color_range or 0),
            colorspace=int(cc.colorspace or 2), color_primaries=int(cc.color_primaries or 2),
            color_trc=int(cc.color_trc or 2),
            sample_aspect_ratio=Fraction(sar) if sar else None,
            audio=[(s.index, s.codec_context.name) for s in container.streams.audio],
            bits=_format_bits(av, cc.pix_fmt or "yuv420p"))


def _format_bits(av, name: str) -> int:
    """The most bits of any colour component of pixel format ``name`` (8 when unknown)."""
    try:
        return max((int(c.bits) for c in av.VideoFormat(name).components if not c.is_alpha),
                   default=8)
    except Exception:  # a format this FFmpeg does not describe
        return 8


def decode_frames(info: VideoInfo, on_pts, read_ahead: int = 2, bit_depth: int = 8,
                  prepare: Optional[Callable[[Any], Any]] = None) -> Iterator[Any]:
    """Yields every frame as ``[H, W, 3]`` uint8 RGB (``bit_depth`` 8), or as a ``[3, H, W]``
    float32 tensor in [0, 1] (``bit_depth`` 16: 16-bit RGB divided by 65535), or as
    ``prepare(frame)`` of that; calls ``on_pts(index, pts)`` first (pts in the stream's time
    base, repaired to increase strictly).

    Decoding (and ``prepare``) runs ``read_ahead`` frames ahead on a background thread
    (:mod:`film_fast.prefetch`), so FFmpeg's work overlaps the model's; ``on_pts`` is
    still called on the consumer's thread, just before its frame is handed out.
    """
    from .prefetch import prefetch

    def prepared(item):
        index, pts, pixels = item
        return index, pts, prepare(pixels)

    for index, pts, pixels in prefetch(_decode_items(info, bit_depth), depth=read_ahead,
                                       transform=None if prepare is None else prepared):
        on_pts(index, pts)
        yield pixels


def _decode_items(info: VideoInfo, bit_depth: int = 8) -> Iterator[Tuple[int, int, object]]:
    av = _require_av()
    step = 1
    if info.rate:
        step = max(1, round(1 / (info.rate * info.time_base)))
    previous = None
    index = 0
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames, None)
            except Exception as e:
                raise InputError(f"{info.path}: cannot decode frame {index} "
                                 f"({_one_line(e)})") from None
            if frame is None:
                break
            if (frame.width, frame.height) != (info.width, info.height):
                raise InputError(f"{info.path}: frame {index} is {frame.width}x{frame.height}, "
                                 f"expected {info.width}x{info.height}: the resolution changes "
                                 "mid-stream (re-encode it at one size first)")
            pts = frame.pts
            if pts is None or (previous is not None and pts <= previous):
                pts = 0 if previous is None else previous + step
            previous = pts
            if bit_depth == 8:
                yield index, int(pts), frame.to_ndarray(format="rgb24",
                                                        src_colorspace=info.sws_colorspace,
                                                        src_color_range=info.rgb_range)
            else:  # converted here, on the read-ahead thread
                yield index, int(pts), _from_rgb48(frame.to_ndarray(
                    format="rgb48le", src_colorspace=info.sws_colorspace,
                    src_color_range=info.rgb_range))
            index += 1


def _from_rgb48(pixels: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint16 -> ``[3, H, W]`` float32 ``value / 65535`` (contiguous)."""
    x = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    x /= np.float32(65535.0)
    return torch.from_numpy(x)


def _to_rgb48(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint16 (clamp, x65535, round half to
    even): the exact inverse of :func:`_from_rgb48` on its outputs."""
    x = image.detach().to(dtype=torch.float32)  # (on its device, like imageio.to_uint8)
    x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0) * 65535.0
    values = torch.round(x).to(torch.int32).permute(1, 2, 0).to(device="cpu")
    return values.numpy().astype(np.uint16, order="C")


# ---- timing ---------------------------------------------------------------------------------
def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class FactorTiming:
    """``--factor F``: F - 1 new frames per pair, output k = i F + j."""

    def __init__(self, factor: int) -> None:
        self.factor = factor
        if _is_power_of_two(factor):
            self.schedule = recursive_schedule(factor.bit_length() - 1)
        else:
            self.schedule = even_schedule(factor - 1)
        self.nodes = [grid_node(p, factor) for p in range(factor)]

    def plan(self, i: int, pts: Dict[int, int]):
        return self.schedule, tuple((n, i * self.factor + p) for p, n in enumerate(self.nodes))

    def tail(self, n: int, pts: Dict[int, int]):
        return ((n - 1) * self.factor,)

    def total(self, n: int, pts_first: int, pts_last: int, tb: Fraction) -> int:
        return (n - 1) * self.factor + 1

    def time_base(self, tb: Fraction) -> Fraction:
        return tb / self.factor

    def rate(self, rate: Optional[Fraction]) -> Optional[Fraction]:
        return rate * self.factor if rate else None

    def output_pts(self, pts: array) -> Iterator[int]:
        f = self.factor
        for i in range(len(pts) - 1):
            a, b = pts[i], pts[i + 1]
            for j in range(f):
                yield a * f + j * (b - a)
        yield pts[-1] * f


class FpsTiming:
    """``--fps R``: output k at ``t_0 + k / R``, nearest recursive mid-point frame."""

    def __init__(self, fps: Fraction, tb: Fraction) -> None:
        self.fps = fps
        self.tb = tb

    def _t(self, pts: int) -> Fraction:
        return pts * self.tb

    def plan(self, i: int, pts: Dict[int, int]):
        t0, ta, tb_ = self._t(pts[0]), self._t(pts[i]), self._t(pts[i + 1])
        k0 = math.ceil((ta - t0) * self.fps)
        k1 = math.ceil((tb_ - t0) * self.fps)
        if k1 <= k0:
            return HOLD, ()
        span = tb_ - ta
        level = 0
        while (1 << level) < span * self.fps and level < MAX_FPS_LEVELS:
            level += 1
        m = 1 << level
        outputs, positions = [], set()
        for k in range(k0, k1):
            s = (t0 + Fraction(k) / self.fps - ta) / span
            p = math.floor(s * m + Fraction(1, 2))
            outputs.append((grid_node(p, m), k))
            if 0 < p < m:
                positions.add(p)
        schedule = dyadic_subset_schedule(level, frozenset(positions)) if positions else HOLD
        return schedule, tuple(outputs)

    def tail(self, n: int, pts: Dict[int, int]):
        offset = (self._t(pts[n - 1]) - self._t(pts[0])) * self.fps
        return (int(offset),) if offset.denominator == 1 else ()

    def total(self, n: int, pts_first: int, pts_last: int, tb: Fraction) -> int:
        return math.floor((pts_last - pts_first) * tb * self.fps) + 1

    def time_base(self, tb: Fraction) -> Fraction:
        return 1 / self.fps

    def rate(self, rate: Optional[Fraction]) -> Optional[Fraction]:
        return self.fps

    def output_pts(self, pts: array) -> Iterator[int]:
        start = round(pts[0] * self.tb * self.fps)
        total = self.total(len(pts), pts[0], pts[-1], self.tb)
        return iter(range(start, start + total))


# ---- progress ------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``film-fast video: 120/600 frames, 3.20 frames/s, ETA 2:30`` on stderr: rewritten in
    place on a terminal, otherwise one line every 10 s."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = self.start
        self.done = 0
        self.shown = False

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last < PROGRESS_INTERVAL_S:
            return
        if self.tty and now - self.last < 0.2 and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        total = max(self.total, done)
        eta = (total - done) / rate if rate > 0 else 0.0
        text = (f"{PROG} {self.label}: {done}/{total} frames, {rate:.2f} frames/s, "
                f"ETA {_clock(eta)}")
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
        self.shown = True

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.tty and self.shown:
            print(file=sys.stderr, flush=True)
        return elapsed


# ---- distributed ------------------------------------------------------------------------------
class Dist:
    """The torchrun environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or a single process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.active = False

    def init(self, device: torch.device) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
        self.active = True
        self.device = device

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.active = False


# ---- the work folder ---------------------------------------------------------------------------
def _file_identity(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_json_atomically(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _frame_name(k: int) -> str:
    return f"{k:09d}.png"


def _write_png(folder: str, k: int, pixels: np.ndarray) -> None:
    path = os.path.join(folder, _frame_name(k))
    tmp = os.path.join(folder, f".{_frame_name(k)}.tmp-{os.getpid()}")
    try:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FrameWriter:
    """Writes the work folder's frames on background threads, at most ``2 * workers`` in flight.

    PNG compression is the video job's slowest CPU step after the model: 100 ms per 1080p
    frame at level 1 on one core of the 2-core AMD EPYC, every output frame, where a GPU
    makes the frame itself in tens of milliseconds. zlib (and FFmpeg's PNG encoder for
    16-bit frames) release the GIL, so ``workers`` threads compress in parallel with each
    other and with the model. Each file still lands atomically (temporary name, renamed), so
    a resume sees only whole frames. A failed write is raised by the next
    :meth:`submit` or by :meth:`close`; :meth:`abort` (Ctrl-C, errors) waits for the writes
    already running, drops the queued ones and raises nothing.
    """

    def __init__(self, write: Callable[[str, int, Any], None], folder: str,
                 workers: Optional[int] = None,
                 on_written: Optional[Callable[[int], None]] = None) -> None:
        from concurrent.futures import ThreadPoolExecutor
        if workers is None:
            workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        self.write, self.folder, self.on_written = write, folder, on_written
        self.limit = 2 * workers
        self.written = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="film-fast-png")
        self._pending: list = []

    def _reap(self, wait_for: int) -> None:
        """Collects finished writes in submission order; blocks until at most ``wait_for``
        remain in flight. Raises the first failure."""
        while self._pending and (len(self._pending) > wait_for or self._pending[0].done()):
            self._pending.pop(0).result()  # (re-raises the write's exception)
            self.written += 1
            if self.on_written is not None:
                self.on_written(self.written)

    def submit(self, k: int, pixels) -> None:
        self._reap(self.limit - 1)
        self._pending.append(self._pool.submit(self.write, self.folder, k, pixels))

    def close(self) -> None:
        """Waits for every write; raises the first failure."""
        try:
            self._reap(0)
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()


def _write_png16(folder: str, k: int, image: torch.Tensor) -> None:
    """Writes ``image`` (``[3, H, W]`` float in [0, 1]) as a 16-bit RGB PNG (FFmpeg's encoder:
    Pillow writes no 16-bit RGB), under a temporary name renamed into place."""
    av = _require_av()
    pixels = _to_rgb48(image)
    codec = av.codec.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = pixels.shape[1], pixels.shape[0], PNG16_FORMAT
    codec.options = {"compression_level": str(PNG_COMPRESS_LEVEL)}
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb48le")
    packets = list(codec.encode(frame)) + list(codec.encode(None))
    path = os.path.join(folder, _frame_name(k))
    tmp = os.path.join(folder, f".{_frame_name(k)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for packet in packets:
                f.write(bytes(packet))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_png16(av, path: str):
    """A 16-bit RGB PNG of the work folder as an ``rgb48be`` VideoFrame; VideoError if the file
    holds another format (an 8-bit frame in a 16-bit work folder)."""
    with open(path, "rb") as f:
        data = f.read()
    codec = av.codec.CodecContext.create("png", "r")
    frames = list(codec.decode(av.Packet(data))) + list(codec.decode(None))
    if len(frames) != 1 or frames[0].format.name != PNG16_FORMAT:
        found = frames[0].format.name if frames else "nothing"
        raise VideoError(f"{path}: holds {found}, expected 16-bit RGB ({PNG16_FORMAT}); the work "
                         "folder was written at another bit depth: delete it and start over")
    return frames[0]


# ---- output -------------------------------------------------------------------------------------
def output_format(path: str) -> str:
    """The muxer for OUT's extension (mp4, matroska, mov, webm, ...); InputError if none."""
    av = _require_av()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not ext:
        raise InputError(f"{path}: give the output a file extension (.mp4, .mkv, .mov, .webm) "
                         "so the container format is known")
    if ext in _FORMAT_PREFERENCE:
        return _FORMAT_PREFERENCE[ext]
    matches = []
    for name in sorted(av.formats_available):
        try:
            fmt = av.format.ContainerFormat(name, "w")
        except Exception:
            continue
        if fmt.is_output and ext in fmt.extensions:
            matches.append(name)
    if ext in matches:
        return ext
    if matches:
        return matches[0]
    raise InputError(f"{path}: no container format writes .{ext} files (use .mp4, .mkv, .mov, "
                     ".webm)")


def write_clip(frame_paths, path: str, fps: float = 30.0, crf: int = 18) -> None:
    """Encodes image files (in order) as a video at ``fps``: the ``--clip`` of ``film-fast
    interpolate`` (the official CLI writes its clip at 30 fps). H.264 yuv420p in .mp4/.mkv/.mov
    (what every player opens; odd sizes are padded by one replicated pixel, since 4:2:0 needs
    even sizes), VP9 in .webm. Written to a temporary name and renamed when complete."""
    from .imageio import read_image, to_uint8
    av = _require_av()
    fmt = output_format(path)
    if not frame_paths:
        raise InputError(f"{path}: no frames to encode")
    if not fps > 0:
        raise InputError(f"--clip-fps must be positive, got {fps}")
    codec = "libvpx-vp9" if fmt == "webm" else "libx264"
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with av.open(tmp, "w", format=fmt) as out:
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            first = to_uint8(read_image(frame_paths[0]))
            height, width = first.shape[:2]
            stream.width, stream.height = width + width % 2, height + height % 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf + 13), "b": "0"}
            for k, name in enumerate(frame_paths):
                pixels = first if k == 0 else to_uint8(read_image(name))
                if pixels.shape[:2] != (height, width):
                    raise InputError(f"{name}: is {pixels.shape[1]}x{pixels.shape[0]}, the clip "
                                     f"is {width}x{height}")
                if (stream.width, stream.height) != (width, height):
                    pixels = np.pad(pixels, ((0, stream.height - height), (0, stream.width - width),
                                             (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _choose_codec(av, requested: Optional[str], info: VideoInfo, fmt: str) -> str:
    probe_out = av.open(io.BytesIO(), "w", format=fmt)
    try:
        supported = probe_out.supported_codecs
        default = probe_out.default_video_codec
    finally:
        probe_out.close()
    if requested:
        try:
            codec = av.codec.Codec(requested, "w")
        except Exception:
            raise InputError(f"--codec {requested}: no such video encoder in this FFmpeg "
                             "build") from None
        if codec.type != "video":
            raise InputError(f"--codec {requested}: is a {codec.type} encoder, not a video one")
        return requested
    try:
        codec = av.codec.Codec(info.codec, "w")
        if codec.type == "video" and (not supported or info.codec in supported):
            return info.codec
    except Exception:
        pass
    return default or "libx264"


def _choose_pix_fmt(av, codec_name: str, wanted: str, bits: int = 8) -> str:
    """The encoder's pixel format: ``wanted`` (the input's) when the encoder takes it; for an
    input above 8 bits (``bits``), else the encoder's closest format above 8 bits; else
    yuv420p, else the encoder's first."""
    formats = [f.name for f in (av.codec.Codec(codec_name, "w").video_formats or [])]
    if not formats or wanted in formats:
        return wanted
    if bits > 8:
        deep = _closest_deep_format(av, formats, wanted, bits)
        if deep is not None:
            return deep
    for name in ("yuv420p", formats[0]):
        if name in formats:
            return name
    return formats[0]


_FLOAT_FORMAT = re.compile(r"f(16|32)(le|be)?$")


def _describe_format(av, name: str):
    """(bits of the deepest colour component, has alpha, has colour, is RGB, chroma
    subsampling), or None for a format this FFmpeg does not describe."""
    try:
        fmt = av.VideoFormat(name, 64, 64)
        comps = list(fmt.components)
        colour = [c for c in comps if not c.is_alpha]
        return (max((int(c.bits) for c in colour), default=0), len(colour) < len(comps),
                len(colour) >= 3, bool(fmt.is_rgb), (fmt.chroma_width(), fmt.chroma_height()),
                bool(fmt.is_bayer or fmt.has_palette))
    except Exception:
        return None


def _closest_deep_format(av, formats: List[str], wanted: str, bits: int) -> Optional[str]:
    """Among ``formats``, the one above 8 bits closest to ``wanted``: colour for colour (never
    grey for colour), alpha as ``wanted``, at least ``bits`` bits if there is one, RGB for RGB,
    the same chroma subsampling, then the fewest extra bits. None when none has more than 8
    bits."""
    ref = _describe_format(av, wanted) or (bits, False, True, False, (32, 32), False)
    best, best_key = None, None
    for index, name in enumerate(formats):
        d = _describe_format(av, name)
        if d is None or _FLOAT_FORMAT.search(name):
            continue
        depth, alpha, colour, rgb, sub, special = d
        if depth <= 8 or special or (ref[2] and not colour):
            continue
        key = (alpha != ref[1], colour != ref[2], depth < bits, rgb != ref[3], sub != ref[4],
               abs(depth - bits), index)
        if best_key is None or key < best_key:
            best, best_key = name, key
    return best


def _audio_can_copy(av, fmt: str, path: str, stream_index: int) -> bool:
    """Dry run: can the ``fmt`` muxer take this audio stream's packets as they are? (A muxer
    checks the codec and its parameters when it writes the header, at the first packet.)"""
    try:
        with av.logging.Capture(), av.open(path) as container:  # the refusal is expected: quiet
            istream = container.streams[stream_index]
            first = None
            for packet in container.demux(istream):
                if packet.size and packet.dts is not None:
                    first = packet
                    break
            if first is None:
                return False
            out = av.open(io.BytesIO(), "w", format=fmt)
            try:
                ostream = out.add_stream_from_template(istream)
                first.stream = ostream
                out.mux(first)
            finally:
                out.close()
        return True
    except Exception:  # av.error.*: the muxer refuses the codec or its parameters
        return False


class _AudioMux:
    """The input's audio streams for the output: each copied (packets as they are) when the
    container takes the codec, else decoded and re-encoded (AAC, or the container's default);
    one demuxer for all of them, drained up to a time so packets interleave with the video."""

    def __init__(self, av, container, out, fmt: str) -> None:
        self.out_streams = {}
        self.labels = []
        audio = list(container.streams.audio)
        for istream in audio:
            if _audio_can_copy(av, fmt, container.name, istream.index):
                self.out_streams[istream.index] = (out.add_stream_from_template(istream), True)
                self.labels.append(f"{istream.codec_context.name} copied")
                continue
            probe_out = av.open(io.BytesIO(), "w", format=fmt)
            try:
                supported = probe_out.supported_codecs
                default = probe_out.default_audio_codec
            finally:
                probe_out.close()
            name = "aac" if "aac" in supported else default
            if name == "opus":
                name = "libopus"
            rate = istream.codec_context.sample_rate or 48000
            if name == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
                rate = 48000
            ostream = out.add_stream(name, rate=rate)
            layout = istream.codec_context.layout
            try:  # "2 channels" (no channel order) -> the standard layout of that many: stereo
                count = len(layout.channels)
                ostream.codec_context.layout = (_STANDARD_LAYOUTS.get(count, layout)
                                                if "channels" in layout.name else layout)
            except Exception:  # a layout the encoder does not take: its default
                pass
            self.out_streams[istream.index] = (ostream, False)
            self.labels.append(f"{istream.codec_context.name} re-encoded as {name}")
        self.demux = container.demux(*audio) if audio else iter(())
        self.pending: deque = deque()
        self.done = not audio

    def _pull(self) -> None:
        packet = next(self.demux, None)
        if packet is None:
            self.done = True
            for ostream, copy in self.out_streams.values():
                if not copy:
                    self.pending.extend(ostream.encode(None))
            return
        ostream, copy = self.out_streams[packet.stream.index]
        if copy:
            if packet.size and packet.dts is not None:
                packet.stream = ostream
                self.pending.append(packet)
        else:
            for frame in packet.decode():
                frame.pts = None  # the encoder numbers the samples from 0
                self.pending.extend(ostream.encode(frame))

    def mux_until(self, out, seconds: Optional[float]) -> None:
        """Muxes the packets that start at or before ``seconds`` (all of them when None)."""
        while True:
            if not self.pending:
                if self.done:
                    return
                self._pull()
                continue
            packet = self.pending[0]
            ts = packet.dts if packet.dts is not None else packet.pts
            if seconds is not None and ts is not None and packet.time_base is not None \
                    and float(ts * packet.time_base) > seconds:
                return
            self.pending.popleft()
            out.mux(packet)


def encode_video(info: VideoInfo, frames_dir: str, pts_out: Iterator[int], total: int,
                 out_path: str, fmt: str, time_base: Fraction, rate: Optional[Fraction], *,
                 codec: Optional[str], crf: Optional[int], progress: Progress,
                 bit_depth: int = 8) -> Dict[str, str]:
    """Encodes ``frames_dir/<k>.png`` (k < total; 8-bit RGB, or 16-bit RGB for ``bit_depth``
    16) with ``pts_out`` into ``out_path``; copies or re-encodes the input's audio. Returns a
    summary."""
    av = _require_av()
    codec_name = _choose_codec(av, codec, info, fmt)
    pix_fmt = _choose_pix_fmt(av, codec_name, info.pix_fmt, info.bits)
    out_bits = _format_bits(av, pix_fmt)
    if info.bits > 8 and out_bits < info.bits:
        encoder = av.codec.Codec(codec_name, "w").name  # "vp9" -> "libvpx-vp9"
        print(f"{PROG} video: warning: {encoder} takes no {info.bits}-bit pixel format like "
              f"the input's {info.pix_fmt}; encoding {out_bits}-bit {pix_fmt}", file=sys.stderr,
              flush=True)
    out = audio_in = audio = None
    try:
        out = av.open(out_path, "w", format=fmt)
        audio_in = av.open(info.path) if info.audio else None
        stream = out.add_stream(codec_name, rate=rate or Fraction(1, 1) / time_base)
        stream.width, stream.height, stream.pix_fmt = info.width, info.height, pix_fmt
        cc = stream.codec_context
        cc.time_base = time_base
        stream.time_base = time_base
        cc.color_range = info.color_range
        cc.colorspace = info.colorspace
        cc.color_primaries = info.color_primaries
        cc.color_trc = info.color_trc
        if info.sample_aspect_ratio:
            cc.sample_aspect_ratio = info.sample_aspect_ratio
        if crf is not None:
            options = dict(cc.options or {})
            options["crf"] = str(crf)
            if codec_name.startswith("libvpx"):
                options["b"] = "0"
            cc.options = options
        audio = _AudioMux(av, audio_in, out, fmt) if audio_in is not None else None
        out_range = info.rgb_range if not pix_fmt.startswith("yuvj") else 2
        done = 0
        for k in range(total):
            pts = next(pts_out)
            path = os.path.join(frames_dir, _frame_name(k))
            if bit_depth == 8:
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert("RGB"))
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                if pix_fmt not in ("rgb24",):
                    frame = frame.reformat(format=pix_fmt, dst_colorspace=info.sws_colorspace,
                                           dst_color_range=out_range)
            else:
                frame = _read_png16(av, path)
                if pix_fmt != PNG16_FORMAT:
                    frame = frame.reformat(format=pix_fmt, dst_colorspace=info.sws_colorspace,
                                           dst_color_range=out_range)
            frame.pts = pts
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
                if audio is not None and packet.pts is not None:
                    audio.mux_until(out, float(packet.pts * time_base))
            done += 1
            progress.update(done)
        for packet in stream.encode(None):
            out.mux(packet)
        if audio is not None:
            audio.mux_until(out, None)
        closing, out = out, None
        closing.close()  # writes the trailer: its errors are encoding errors too
    except FilmFastError:
        raise
    except Exception as e:
        raise VideoError(f"{out_path}: encoding failed ({_one_line(e)})") from None
    finally:
        for container in (out, audio_in):
            if container is not None:
                try:
                    container.close()
                except Exception:
                    pass
    labels = "; ".join(audio.labels) if audio is not None and audio.labels else "none"
    return {"codec": codec_name, "pix_fmt": pix_fmt, "audio": labels}


def read_pts(path: str) -> array:
    values = array("q")
    with open(path, encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if line:
                values.append(int(line))
    return values


# ---- the command ---------------------------------------------------------------------------------
def _preflight(args, info: VideoInfo) -> Tuple[str, str, str]:
    out = args.output
    out_abs = os.path.abspath(out)
    if os.path.abspath(args.input) == out_abs:
        raise InputError(f"{out}: the output must not be the input file")
    if os.path.isdir(out):
        raise InputError(f"{out}: is a directory; give the output video's file name")
    if os.path.exists(out) and not args.overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_abs)
    if not os.path.isdir(parent):
        raise InputError(f"{out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{out}: folder {parent} is not writable")
    fmt = output_format(out)
    return out_abs, out_abs + WORK_SUFFIX, fmt


def run(args, *, load_model, check_device, check_backend, resolve_dtype) -> int:
    """``film-fast video`` (``args`` from :func:`film_fast.cli.build_parser`)."""
    av = _require_av()
    if args.factor is None and args.fps is None:
        raise InputError("give --factor F or --fps R")
    dist_env = Dist()
    dtype = resolve_dtype(args.dtype)
    device_name = args.device
    if dist_env.world > 1 and (device_name in (None, "cuda")) and torch.cuda.is_available():
        device_name = f"cuda:{dist_env.local_rank}"
    device = check_device(device_name)
    check_backend(args.backend, device)
    if getattr(args, "cuda_graphs", False) and device.type != "cuda":
        raise InputError(f"--cuda-graphs needs a CUDA device, got --device {device}")
    info = probe(args.input)
    out_abs, work, fmt = _preflight(args, info)
    if args.codec:
        _choose_codec(av, args.codec, info, fmt)
    if args.crf is not None and args.crf < 0:
        raise InputError(f"--crf must be >= 0, got {args.crf}")
    timing = FactorTiming(args.factor) if args.factor is not None else FpsTiming(args.fps,
                                                                                  info.time_base)
    threshold = DEFAULT_SCENE_THRESHOLD if args.scene_threshold is None else args.scene_threshold
    model = load_model(args.model, device=device, dtype=dtype, backend=args.backend,
                       pyramid_levels=args.pyramid_levels, padding=getattr(args, "padding", None),
                       ensemble=getattr(args, "ensemble", 1))
    batch = args.batch_size
    wanted = args.segment_pairs or SEGMENT_MIN_PAIRS
    segment_pairs = batch * max(1, math.ceil(wanted / batch))  # chunks never straddle segments
    quiet = args.quiet or dist_env.rank != 0
    dist_env.init(device)
    try:
        return _run_job(args, dist_env, info, out_abs, work, fmt, timing, threshold, model,
                        device, dtype, batch, segment_pairs, quiet)
    finally:
        dist_env.close()


def _job_params(args, info, timing, threshold, model_path, dtype, batch, segment_pairs) -> dict:
    from .api import BUILTIN_MODEL
    model_file = model_path or (BUILTIN_MODEL if os.path.exists(BUILTIN_MODEL) else None)
    return {
        "film_fast_video": MANIFEST_VERSION,
        "input": _file_identity(info.path),
        "model": _file_identity(model_file),
        "factor": args.factor,
        "fps": None if args.fps is None else f"{args.fps.numerator}/{args.fps.denominator}",
        "scene_threshold": threshold,
        "tile_option": str(args.tile),
        "batch_size": batch,
        "segment_pairs": segment_pairs,
        "dtype": str(dtype).replace("torch.", ""),
        "bit_depth": info.work_depth,
        # Both change the frames: --padding (None: the checkpoint's) and --ensemble.
        "padding": getattr(args, "padding", None),
        "ensemble": getattr(args, "ensemble", 1),
    }


# Values of job parameters that manifests written before the parameter existed had.
_PARAM_DEFAULTS = {"bit_depth": 8, "padding": None, "ensemble": 1}


def _prepare_work(args, work: str, params: dict, tiling_auto) -> dict:
    """Rank 0: a fresh work folder, or the manifest of the run to resume. Returns the manifest."""
    manifest_path = os.path.join(work, MANIFEST)
    if os.path.exists(work):
        if not args.resume:
            raise InputError(f"{work}: holds the work of an earlier, unfinished run; pass --resume "
                             "to continue it, or delete the folder to start over")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{manifest_path}: cannot resume, unreadable manifest "
                             f"({_one_line(e)}); delete {work} to start over") from None
        for key, value in params.items():
            recorded = manifest.get(key, _PARAM_DEFAULTS.get(key))
            if key == "bit_depth" and recorded != value:
                raise InputError(f"cannot resume from {work}: its frames were written at "
                                 f"{recorded} bits per component, this run writes {value} (the "
                                 "input's pixel format decides); delete the folder to start "
                                 "over")
            if recorded != value:
                raise InputError(f"cannot resume from {work}: {key} was {recorded!r}, now "
                                 f"{value!r}; use the same options or delete the folder")
        os.makedirs(os.path.join(work, FRAMES), exist_ok=True)
        return dict(manifest, fresh=False)
    tile, reuse = tiling_auto()
    manifest = dict(params, tile=tile, reuse=reuse, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    os.makedirs(os.path.join(work, FRAMES))
    _write_json_atomically(manifest_path, manifest)
    return dict(manifest, fresh=True)


def _run_job(args, dist_env: Dist, info: VideoInfo, out_abs: str, work: str, fmt: str,
             timing, threshold, model, device, dtype, batch, segment_pairs, quiet) -> int:
    params = _job_params(args, info, timing, threshold, args.model, dtype, batch, segment_pairs)

    def tiling_auto():
        if isinstance(timing, FactorTiming):
            live = timing.schedule.max_live
        else:  # the recursion depth --fps needs per pair
            ratio = float(timing.fps / info.rate) if info.rate else 2.0
            live = max(1, math.ceil(math.log2(max(ratio, 1.0))))
        held = (batch + 1) + batch * live
        k = getattr(model, "ensemble", 1)  # a flip ensemble multiplies frames and calls
        t = choose_tiling(args.tile, model.options, info.height, info.width, device=device,
                          dtype=dtype, batch=batch * k, held=held * k,
                          backend=getattr(model, "backend", None), ensemble=k)
        return t.tile, t.reuse

    status = None
    if dist_env.rank == 0:
        try:
            manifest = _prepare_work(args, work, params, tiling_auto)
            status = ("ok", manifest)
        except FilmFastError as e:
            status = ("error", str(e))
            dist_env.broadcast(status)
            raise
    status = dist_env.broadcast(status)
    if status[0] != "ok":
        raise InputError(status[1])
    manifest = status[1]
    fresh = manifest.pop("fresh", False)
    tiling = Tiling(manifest.get("tile"), bool(manifest.get("reuse", True)))
    frames_dir = os.path.join(work, FRAMES)
    tb = info.time_base

    already = len([n for n in os.listdir(frames_dir) if n.endswith(".png")])
    # --tile auto is a prediction: if the first chunk runs out of device memory, the engine
    # retries it a step smaller (tiling.smaller_tiling). The manifest then records the tiling
    # that made the frames, so --resume continues with it. Only while no frame exists (frames
    # of two tilings differ slightly) and in one process (every rank must use the same one).
    retry_oom = (manifest.get("tile_option") == "auto" and already == 0 and dist_env.world == 1)

    def on_tiling(resolved: Tiling, height: int, width: int) -> None:
        nonlocal tiling
        if resolved == tiling:
            return
        tiling = resolved
        manifest.update(tile=resolved.tile, reuse=resolved.reuse)
        _write_json_atomically(os.path.join(work, MANIFEST), manifest)
    n_est = info.estimated_frames()
    total_est = 0
    if n_est >= 2:
        if isinstance(timing, FactorTiming):
            total_est = (n_est - 1) * timing.factor + 1
        elif info.rate:
            total_est = math.floor((n_est - 1) / info.rate * timing.fps) + 1
    share = max(1, (total_est - already) // dist_env.world) if total_est else 0
    progress = Progress("video", share, not quiet)

    pts: Dict[int, int] = {}
    pts_tmp = os.path.join(work, f"{PTS_FILE}.tmp-{os.getpid()}")
    pts_file = open(pts_tmp, "w", encoding="ascii") if dist_env.rank == 0 else None
    counts = {"frames": 0, "written": 0}

    def on_pts(index: int, value: int) -> None:
        pts[index] = value
        counts["frames"] = index + 1
        if pts_file is not None:
            pts_file.write(f"{value}\n")

    def plan_for(i: int):
        plan = timing.plan(i, pts)
        for old in [k for k in pts if 0 < k < i]:  # keep pts[0] (t_0) and the current pair
            del pts[old]
        return plan

    def tail_for(n: int):
        return timing.tail(n, pts)

    def select(first_pair: int, tags) -> bool:
        if not tags or (first_pair // segment_pairs) % dist_env.world != dist_env.rank:
            return False
        return any(not os.path.exists(os.path.join(frames_dir, _frame_name(k))) for k in tags)

    depth = manifest.get("bit_depth", 8)
    writer = FrameWriter(_write_png if depth == 8 else _write_png16, frames_dir,
                         on_written=progress.update)
    try:
        # Converted (and thumbnailed for scene detection) on the read-ahead thread too; for
        # a GPU, staged in pinned memory there instead (converted on the GPU).
        pin = _device_dtype(model)[0].type == "cuda"
        frames = decode_frames(info, on_pts, bit_depth=depth,
                               prepare=lambda p: prepare_frame(p, thumb=bool(threshold), pin=pin))
        stream = run_stream(model, frames, plan_for, batch_size=batch,
                            scene_threshold=threshold or None, tile=tiling,
                            tail_for=tail_for, select=select, on_start=on_tiling,
                            retry_oom=retry_oom,
                            cuda_graphs=getattr(args, "cuda_graphs", False))
        for k, pixels in stream:
            if os.path.exists(os.path.join(frames_dir, _frame_name(k))):
                continue
            writer.submit(k, pixels)
            counts["written"] += 1
            if args.stop_after is not None and counts["written"] >= args.stop_after:
                writer.close()  # (the frames submitted so far are written, then it stops)
                raise KeyboardInterrupt
        writer.close()
        if pts_file is not None:
            pts_file.close()
            pts_file = None
            os.replace(pts_tmp, os.path.join(work, PTS_FILE))
    except KeyboardInterrupt:
        progress.finish()
        print(f"{PROG}: interrupted; rerun with --resume to continue from the frames in {work}",
              file=sys.stderr)
        return 130
    except InputError as e:
        # The input cannot be interpolated (too short, a size change, undecodable): nothing
        # here can be resumed, so a work folder made by this run goes.
        progress.finish()
        if pts_file is not None:
            pts_file.close()
            pts_file = None
        if fresh and dist_env.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        if counts["frames"] < 2:
            raise InputError(f"{info.path}: has {counts['frames']} video frame(s); need at least "
                             "2 to interpolate") from None
        message = str(e)
        if not message.startswith(info.path):
            message = f"{info.path}: {message}"
        raise InputError(message) from None
    finally:
        writer.abort()  # (a no-op after close)
        if pts_file is not None:
            pts_file.close()
        if os.path.exists(pts_tmp):
            os.remove(pts_tmp)
    interp_seconds = progress.finish()
    if dist_env.world > 1 and not args.quiet:
        print(f"{PROG} video: rank {dist_env.rank}: wrote {counts['written']} frame(s) in "
              f"{interp_seconds:.1f} s", file=sys.stderr, flush=True)
    dist_env.barrier()
    if dist_env.rank != 0:
        return 0

    all_pts = read_pts(os.path.join(work, PTS_FILE))
    n = len(all_pts)
    total = timing.total(n, all_pts[0], all_pts[-1], tb)
    missing = [k for k in range(total) if not os.path.exists(os.path.join(frames_dir,
                                                                         _frame_name(k)))]
    if missing:
        raise VideoError(f"{work}: {len(missing)} of {total} frames are missing (first: "
                         f"{missing[0]}); a process failed? rerun with --resume")
    manifest.update(frames=n, outputs=total)
    _write_json_atomically(os.path.join(work, MANIFEST), manifest)

    folder, base = os.path.split(out_abs)
    stem, ext = os.path.splitext(base)
    tmp_out = os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")
    enc_progress = Progress("encoding", total, not quiet)
    try:
        summary = encode_video(info, frames_dir, timing.output_pts(all_pts), total, tmp_out, fmt,
                               timing.time_base(tb), timing.rate(info.rate), codec=args.codec,
                               crf=args.crf, progress=enc_progress,
                               bit_depth=manifest.get("bit_depth", 8))
        os.replace(tmp_out, out_abs)
    except KeyboardInterrupt:
        enc_progress.finish()
        print(f"{PROG}: interrupted; rerun with --resume to encode the frames in {work}",
              file=sys.stderr)
        return 130
    finally:
        if os.path.exists(tmp_out):
            os.remove(tmp_out)
    enc_seconds = enc_progress.finish()
    shutil.rmtree(work, ignore_errors=True)
    if not args.quiet:
        rate = timing.rate(info.rate)
        rate_text = f"{float(rate):.3f} fps" if rate else "variable frame rate"
        made = counts["written"]
        speed = f", {made / interp_seconds:.2f} frames/s" if made and interp_seconds > 0 else ""
        print(f"wrote {out_abs}: {total} frames from {n} at {rate_text}, {summary['codec']} "
              f"{summary['pix_fmt']}, audio: {summary['audio']}")
        print(f"interpolation: {made} frame(s) in {interp_seconds:.1f} s{speed} "
              f"({tiling.describe()}, batch {batch}, {dist_env.world} process(es)); "
              f"encoding: {enc_seconds:.1f} s")
    return 0
