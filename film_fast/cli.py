"""The ``film-fast`` command line (also ``python -m film_fast``).

Subcommands::

    film-fast interpolate A.png B.png -o DIR [--times-to-interpolate K | --num-frames N]
    film-fast interpolate FRAMES_DIR -o DIR [...]     (a whole sequence, natural order)
    film-fast video IN.mp4 -o OUT.mp4 (--factor F | --fps R) [--resume] [...]
    film-fast convert SRC DST.safetensors
    film-fast info MODEL
    film-fast bench [--sizes 256x256,512x512] [--config published|small] [--json PATH]
    film-fast bench --memory-plan [--sizes 1920x1080,3840x2160] [--dtype fp16]   (no GPU needed)

Errors are printed as one line, ``film-fast: error: <message>``, on stderr; the
exit code is 2 for bad arguments and unusable inputs (images, checkpoints,
devices, output folders), 1 for failures while working (writing files, an
unavailable backend, running out of memory) and 130 on Ctrl-C. ``interpolate``
writes nothing unless every frame succeeds.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import shutil
import sys
import time
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__, evaluation
from .api import load, resolve_device, resolve_dtype
from .checkpoints import read_checkpoint, save_safetensors
from .errors import CheckpointError, FilmFastError, InputError
from .prefetch import prefetch
from .imageio import read_image, write_image
from .interpolation import MAX_TIMES_TO_INTERPOLATE, frame_times, iter_frames, resolve_schedule
from .model import FILM
from .options import PADDINGS, Options
from .stream import DEFAULT_SCENE_THRESHOLD, interpolate as interpolate_stream, prepare_frame

PROG = "film-fast"
BACKEND_CHOICES = ("auto", "torch", "triton", "cupy")
DTYPE_CHOICES = ("fp32", "fp16", "bf16")
FRAME_GLOB = "frame_*.png"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm")

# The small config of the test fixtures: runs in well under a second per 256x256 frame on a CPU.
SMALL_OPTIONS = dict(pyramid_levels=5, fusion_pyramid_levels=4, specialized_levels=2, sub_levels=3,
                     filters=8, flow_convs=(2, 2, 2), flow_filters=(16, 32, 32))


# ---- argument types -------------------------------------------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):  # (also refuses nan)
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _times_to_interpolate(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > MAX_TIMES_TO_INTERPOLATE:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TIMES_TO_INTERPOLATE} (2^K + 1 frames), got {value}")
    return value


def _tile(text: str):
    """``--tile auto|off|N``."""
    text = text.strip().lower()
    if text in ("auto", "off"):
        return text
    value = _int_at_least(1)(text)
    return value


def _fps(text: str) -> Fraction:
    """``--fps 60``, ``29.97`` or ``30000/1001`` -> an exact Fraction > 0."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a frame rate like 60, 29.97 or 30000/1001, "
                                         f"got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 disables), got {text}")
    return value


def _sizes(text: str) -> List[Tuple[int, int]]:
    """``"256x256,640x360"`` -> ``[(256, 256), (640, 360)]`` as (width, height)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            w, h = (int(v) for v in part.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {part!r}") from None
        if w < 1 or h < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {part!r}")
        sizes.append((w, h))
    return sizes


# ---- shared helpers ---------------------------------------------------------------------------
def _check_device(name: Optional[str]) -> torch.device:
    """Resolves ``--device`` now, so a bad name fails before any work (torch asserts later)."""
    try:
        device = resolve_device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name!r}: {' '.join(str(e).split())}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _check_backend(name: str, device: torch.device) -> None:
    """Fails before any work when an explicitly requested backend cannot run on ``device``."""
    from . import ops
    if name != "auto":
        reason = ops.available_backends(device).get(name, "unknown backend")
        if reason:
            raise ops.BackendUnavailable(f"--backend {name} cannot run on {device}: {reason}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- interpolate: output folder handling ------------------------------------------------------
def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _staging_path(out_dir: str) -> str:
    """``DIR.tmp-<pid>`` next to DIR; inside an existing DIR when its parent is read-only (``-o .``)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and not _writable_dir(os.path.dirname(out_dir)):
        return os.path.join(out_dir, f".film-fast.tmp-{os.getpid()}")
    return f"{out_dir}.tmp-{os.getpid()}"


def _preflight_output(out_dir: str, overwrite: bool) -> None:
    """Checks that ``out_dir`` can be created or filled, without creating anything."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise InputError(f"{out_dir}: exists and is not a directory")
        old = glob.glob(os.path.join(glob.escape(out_dir), FRAME_GLOB))
        if old and not overwrite:
            raise InputError(f"{out_dir}: already holds {len(old)} {FRAME_GLOB} file(s); pass "
                             "--overwrite to replace them")
        if not _writable_dir(out_dir):
            raise InputError(f"{out_dir}: directory is not writable")
        return
    # DIR and the staging folder next to it will be created: the nearest existing
    # ancestor must be a writable directory.
    ancestor = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise InputError(f"{out_dir}: cannot create the output directory: {ancestor} is not a "
                         "directory")
    if not _writable_dir(ancestor):
        raise InputError(f"{out_dir}: cannot create the output directory: {ancestor} is not "
                         "writable")


class _Staging:
    """A temporary folder (normally the sibling ``DIR.tmp-<pid>``) that frames are rendered into.

    :meth:`commit` moves the frames into ``DIR``; :meth:`cleanup` (always call
    it, in a ``finally``) removes the temporary folder and any parent folders
    this run created, unless they now hold the committed output.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.path = _staging_path(self.out_dir)
        self.created_parents: List[str] = []
        self.committed = False

    def create(self) -> str:
        missing = []
        parent = os.path.dirname(self.path)
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):  # outermost first
            os.mkdir(folder)
            self.created_parents.append(folder)
        if os.path.exists(self.path):  # left by a killed run that had our pid
            shutil.rmtree(self.path)
        os.mkdir(self.path)
        return self.path

    def commit(self, overwrite: bool) -> None:
        if not os.path.exists(self.out_dir):
            os.rename(self.path, self.out_dir)  # one atomic step
        else:
            if overwrite:
                for old in glob.glob(os.path.join(glob.escape(self.out_dir), FRAME_GLOB)):
                    os.remove(old)
            for name in sorted(os.listdir(self.path)):
                os.replace(os.path.join(self.path, name), os.path.join(self.out_dir, name))
            os.rmdir(self.path)
        self.committed = True

    def cleanup(self) -> None:
        if os.path.isdir(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        if not self.committed:
            for folder in reversed(self.created_parents):  # innermost first
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def _natural_key(name: str):
    """``frame2`` before ``frame10``: digit runs compare as numbers, the rest case-folded."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.casefold())
            for part in re.split(r"(\d+)", name) if part]


def _sequence_paths(inputs: Sequence[str]) -> List[str]:
    """One folder (its image files in natural order) or a list of image files."""
    if len(inputs) == 1:
        folder = inputs[0]
        if not os.path.exists(folder):
            raise InputError(f"{folder}: no such file or folder")
        if not os.path.isdir(folder):
            raise InputError(f"{folder}: give two images (A B) or a folder of frames")
        try:
            names = os.listdir(folder)
        except PermissionError:
            raise InputError(f"{folder}: permission denied") from None
        names = [n for n in names if not n.startswith(".")
                 and n.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, n))]
        if not names:
            raise InputError(f"{folder}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        names.sort(key=_natural_key)
        if len(names) < 2:
            raise InputError(f"{folder}: holds 1 frame ({names[0]}); need at least 2 to "
                             "interpolate")
        return [os.path.join(folder, n) for n in names]
    for path in inputs:
        if os.path.isdir(path):
            raise InputError(f"{path}: is a directory; give one folder of frames, or image files")
    return list(inputs)


def _image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the header alone; read_image's one-line error when unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:
        read_image(path)  # raises the InputError that names the file and the problem
        raise


def _check_sequence(paths: Sequence[str]) -> Tuple[int, int]:
    width, height = _image_size(paths[0])
    for path in paths[1:]:
        w, h = _image_size(path)
        if (w, h) != (width, height):
            raise InputError(f"{path}: frame is {w}x{h}, expected {width}x{height} like "
                             f"{paths[0]} (every frame must have the same size)")
    return width, height


def _cmd_interpolate(args: argparse.Namespace) -> int:
    inputs = args.inputs
    simple = (args.tile is None and args.batch_size == 1 and args.scene_threshold is None)
    if len(inputs) == 2 and simple and not any(os.path.isdir(p) for p in inputs):
        args.frame0, args.frame1 = inputs
        return _interpolate_two(args)
    return _interpolate_sequence(args, _sequence_paths(inputs))


def _check_clip(args: argparse.Namespace) -> None:
    """Fails before any work when --clip cannot be written (format, folder)."""
    if not getattr(args, "clip", None):
        return
    from .video import output_format
    output_format(args.clip)
    if not args.clip_fps > 0:
        raise InputError(f"--clip-fps must be positive, got {args.clip_fps}")
    parent = os.path.dirname(os.path.abspath(args.clip))
    if not os.path.isdir(parent):
        raise InputError(f"--clip {args.clip}: folder {parent} does not exist")
    if os.path.exists(args.clip) and not args.overwrite:
        raise InputError(f"--clip {args.clip}: exists; pass --overwrite to replace it")


def _write_clip(args: argparse.Namespace, folder: str, count: int, digits: int) -> None:
    from .video import write_clip
    names = [os.path.join(folder, f"frame_{k:0{digits}d}.png") for k in range(count)]
    write_clip(names, args.clip, fps=args.clip_fps)
    if not args.quiet:
        print(f"wrote {args.clip} ({count} frames at {args.clip_fps:g} fps)")


def _interpolate_sequence(args: argparse.Namespace, paths: List[str], model=None) -> int:
    """Every frame of ``paths`` and the in-between frames, as DIR/frame_000.png ..."""
    dtype = resolve_dtype(args.dtype)
    device = _check_device(args.device)
    _check_backend(args.backend, device)
    _check_cuda_graphs(args, device)
    mode, value = resolve_schedule(args.times_to_interpolate, args.num_frames)
    if len(paths) < 2:
        raise InputError("need at least 2 frames to interpolate")
    _check_sequence(paths)
    out_dir = args.output
    _preflight_output(out_dir, args.overwrite)
    _check_clip(args)
    if model is None:
        model = load(args.model, device=device, dtype=dtype, backend=args.backend,
                     pyramid_levels=args.pyramid_levels, padding=getattr(args, "padding", None),
                     ensemble=getattr(args, "ensemble", 1))
    per_pair = (1 << value) - 1 if mode == "recursive" else value
    total = (len(paths) - 1) * (per_pair + 1) + 1
    digits = max(3, len(str(total - 1)))
    if args.scene_threshold is None:
        threshold = DEFAULT_SCENE_THRESHOLD if len(paths) > 2 else None
    else:
        threshold = args.scene_threshold or None
    show_progress = not args.quiet and sys.stderr.isatty()
    # Images are read two ahead on a background thread: PNG/JPEG decoding overlaps the model
    # (and for a GPU, staging in pinned memory for an asynchronous upload: film_fast.transfer).
    pin = next(model.parameters()).device.type == "cuda"
    frames = prefetch((read_image(p) for p in paths), depth=2,
                      transform=lambda x: prepare_frame(x, pin=pin))
    staging = _Staging(out_dir)
    start = time.perf_counter()
    try:
        folder = staging.create()
        stream = interpolate_stream(model, frames, times_to_interpolate=args.times_to_interpolate,
                                    num_frames=args.num_frames, batch_size=args.batch_size,
                                    scene_threshold=threshold,
                                    tile="auto" if args.tile is None else args.tile,
                                    cuda_graphs=getattr(args, "cuda_graphs", False))
        written = 0
        for index, frame in enumerate(stream):
            write_image(os.path.join(folder, f"frame_{index:0{digits}d}.png"), frame)
            written += 1
            if show_progress:
                rate = written / max(time.perf_counter() - start, 1e-9)
                print(f"\r{PROG}: frame {written}/{total}, {rate:.2f} frames/s", end="",
                      file=sys.stderr, flush=True)
        if show_progress:
            print(file=sys.stderr)
        if args.clip:
            _write_clip(args, folder, written, digits)
        staging.commit(args.overwrite)
    finally:
        staging.cleanup()
    elapsed = time.perf_counter() - start
    if not args.quiet:
        last = f"frame_{written - 1:0{digits}d}.png"
        print(f"wrote {written} frames to {out_dir} (frame_{0:0{digits}d}.png .. {last})")
        inner = written - len(paths)
        print(f"{inner} in-between frame(s) from {len(paths)} input frames in {elapsed:.1f} s; "
              f"model {model.source} on {device}, {_dtype_name(dtype)}, backend {model.backend}"
              f"{_ensemble_note(model)}")
    return 0


def _ensemble_note(model) -> str:
    k = getattr(model, "ensemble", 1)
    return f", flip ensemble of {k}" if k > 1 else ""


def _interpolate_two(args: argparse.Namespace) -> int:
    # Validate everything cheap first: arguments, both images, the output folder.
    dtype = resolve_dtype(args.dtype)
    device = _check_device(args.device)
    _check_backend(args.backend, device)
    _check_cuda_graphs(args, device)
    resolve_schedule(args.times_to_interpolate, args.num_frames)
    frame0 = read_image(args.frame0)
    frame1 = read_image(args.frame1)
    if frame0.shape != frame1.shape:
        raise InputError(f"the frames differ in size: {args.frame0} is {frame0.shape[2]}x"
                         f"{frame0.shape[1]}, {args.frame1} is {frame1.shape[2]}x{frame1.shape[1]}")
    out_dir = args.output
    _preflight_output(out_dir, args.overwrite)
    _check_clip(args)

    model = load(args.model, device=device, dtype=dtype, backend=args.backend,
                 pyramid_levels=args.pyramid_levels, padding=args.padding,
                 ensemble=args.ensemble)
    if isinstance(model, FILM) and getattr(args, "cuda_graphs", False):
        return _interpolate_sequence(args, [args.frame0, args.frame1], model=model)
    if isinstance(model, FILM):
        # Too large for memory as one frame: the streaming engine tiles it.
        from .tiling import choose_tiling
        height, width = frame0.shape[1:]
        k = model.ensemble
        if choose_tiling("auto", model.options, height, width, device=device, dtype=dtype,
                         batch=k, held=3.0 * k, backend=model.backend,
                         ensemble=k).tile is not None:
            return _interpolate_sequence(args, [args.frame0, args.frame1], model=model)
    times = frame_times(args.times_to_interpolate, args.num_frames)
    digits = max(3, len(str(len(times) - 1)))
    show_progress = not args.quiet and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show_progress:
            print(f"\r{PROG}: frame {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    staging = _Staging(out_dir)
    try:
        folder = staging.create()
        frames = iter_frames(model, frame0, frame1, times_to_interpolate=args.times_to_interpolate,
                             num_frames=args.num_frames, progress=progress)
        compute = 0.0
        written = 0
        while True:
            start = time.perf_counter()
            item = next(frames, None)
            compute += time.perf_counter() - start
            if item is None:
                break
            index, _, frame = item
            write_image(os.path.join(folder, f"frame_{index:0{digits}d}.png"), frame)
            written += 1
        if args.clip:
            _write_clip(args, folder, written, digits)
        staging.commit(args.overwrite)
    finally:
        staging.cleanup()

    if not args.quiet:
        inner = written - 2
        last = f"frame_{written - 1:0{digits}d}.png"
        print(f"wrote {written} frames to {out_dir} (frame_{0:0{digits}d}.png .. {last})")
        per = f", {compute / inner:.3f} s each" if inner > 0 else ""
        print(f"{inner} in-between frame(s){per}; model {model.source} on {device}, "
              f"{_dtype_name(dtype)}, backend {model.backend}{_ensemble_note(model)}")
    return 0


# ---- convert / info ---------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    dst = args.dst
    if not dst.endswith(".safetensors"):
        raise InputError(f"{dst}: the output file name must end in .safetensors")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise InputError(f"{dst}: folder {parent} does not exist")
    if os.path.isdir(dst):
        raise InputError(f"{dst}: is a directory")
    model = load(args.src, device="cpu", pyramid_levels=args.pyramid_levels,
                 padding=args.padding)
    save_safetensors(model, dst)
    print(f"wrote {dst}: {model.num_parameters()} parameters from {model.source}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.model, pyramid_levels=args.pyramid_levels,
                           padding=args.padding)
    count = sum(t.numel() for t in ckpt.state.values())
    lines = [f"source:     {ckpt.path}",
             f"format:     {ckpt.format}",
             f"dtype:      {_dtype_name(ckpt.dtype)}",
             f"parameters: {count} ({count / 1e6:.2f} M)",
             f"size multiple: {ckpt.options.size_multiple} (other sizes are padded "
             f"internally: {ckpt.options.padding})",
             "options:"]
    lines += [f"  {key}: {value}" for key, value in ckpt.options.to_dict().items()]
    print("\n".join(lines))
    return 0


# ---- bench ------------------------------------------------------------------------------------
def _resolved_backends(backend: str, device: torch.device) -> Dict[str, str]:
    from . import ops
    out = {}
    for op in ("conv2d", "warp", "upsample_flow", "avg_pool2x2", "upsample_conv2x2"):
        try:
            out[op] = ops.resolve(op, backend, device)[0]
        except Exception as e:  # an explicitly requested backend that cannot run here
            out[op] = f"unavailable ({' '.join(str(e).split())})"
    return out


def _cmd_bench_kernels(args: argparse.Namespace, device: torch.device) -> int:
    from . import benchmark, kernel_bench
    resolutions = [r.strip().lower() for r in args.resolutions.split(",") if r.strip()]
    unknown = [r for r in resolutions if r not in kernel_bench.RESOLUTIONS]
    if unknown:
        raise InputError(f"--resolutions: unknown {unknown[0]!r}; use "
                         f"{', '.join(kernel_bench.RESOLUTIONS)}")
    backends = ["torch", "triton", "cupy"] if args.backend == "auto" else [args.backend]
    iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    options = (load(None, device="cpu").options if args.config == "builtin" else
               Options() if args.config == "published" else Options(**SMALL_OPTIONS))
    rows, ceilings = kernel_bench.run_table(resolutions, backends, [args.dtype], device,
                                            backward=args.backward, iters=iters, warmup=warmup,
                                            options=options)
    print(f"{PROG} bench --kernels: {benchmark.device_name(device)}, {args.dtype}, "
          f"copy {ceilings['copy_gbps']:.1f} GB/s, matmul "
          f"{ceilings['matmul_tflops_' + args.dtype]:.3f} TFLOP/s")
    print(kernel_bench.format_rows(rows))
    if args.json:
        report = dict(benchmark.report_header(device, resolve_dtype(args.dtype), args.backend,
                                              args.config, options,
                                              ceilings["matmul_tflops_" + args.dtype] * 1e12),
                      ceilings=ceilings, rows=rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        _write_text_atomically(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _bench_options(config: str) -> Options:
    if config == "builtin":
        from .api import BUILTIN_MODEL
        return read_checkpoint(BUILTIN_MODEL).options
    return Options() if config == "published" else Options(**SMALL_OPTIONS)


def _cmd_bench_memory_plan(args: argparse.Namespace) -> int:
    """``bench --memory-plan``: predicted peak GPU memory per size (film_fast.memory_plan)."""
    from . import benchmark, memory_plan
    if args.kernels:
        raise InputError("--memory-plan and --kernels are separate tables: pick one")
    backend = "triton" if args.backend == "auto" else args.backend
    if backend not in memory_plan.DRY_RUN_BACKENDS:
        raise InputError(f"--memory-plan covers --backend "
                         f"{' or '.join(memory_plan.DRY_RUN_BACKENDS)}, not {backend!r}")
    dtype = resolve_dtype(args.dtype)
    options = _bench_options(args.config)
    sizes = args.sizes or _sizes(",".join(memory_plan.DEFAULT_SIZES))
    plans = [memory_plan.plan(options, h, w, dtype=dtype, backend=backend) for w, h in sizes]
    # The streaming engine (film-fast video, factor 2, batch 1), weights included: what tile=auto
    # plans with on a GPU.
    streams = [tuple(p.weights_bytes + memory_plan.plan_stream(
        options, p.height, p.width, dtype=dtype, backend=backend, held=2, reuse=reuse)
        for reuse in (True, False)) for p in plans]
    limit = int(args.device_memory * 1e9)
    if not args.quiet:
        print(f"{PROG} bench --memory-plan: {args.config} config, {_dtype_name(dtype)}, backend "
              f"{backend}, batch 1; predicted torch.cuda.max_memory_allocated from a dry run on "
              f"the meta device (no GPU used; CUDA context and cuDNN/cuBLAS workspaces not "
              f"included); 'video': the streaming engine at factor 2 with and without "
              f"feature reuse")
    print(memory_plan.format_table(plans, limit, streams))
    report = {"date": benchmark.report_header(torch.device("cpu"), dtype, backend, args.config,
                                              options, 0.0)["date"],
              "commit": benchmark.git_commit(), "versions": benchmark.versions(),
              "kind": "memory plan (dry run on the meta device, no GPU)", "config": args.config,
              "options": options.to_dict(), "dtype": _dtype_name(dtype), "backend": backend,
              "device_memory_bytes": limit,
              "plans": [dict(p.to_dict(), fits=p.required_bytes <= limit,
                             video_reuse_bytes=s[0], video_no_reuse_bytes=s[1])
                        for p, s in zip(plans, streams)]}
    _save_bench_report(report, args, f"memory-plan-{_dtype_name(dtype)}-{backend}")
    return 0


def _save_bench_report(report: dict, args: argparse.Namespace, stem: str) -> None:
    """Writes ``report`` to ``--json`` and, with ``--save``, to
    ``benchmarks/results/<stem>-<date>.json``."""
    paths = [args.json] if args.json else []
    if args.save:
        stamp = report["date"].replace(":", "").replace("-", "")[:15]
        paths.append(os.path.join("benchmarks", "results", f"{stem}-{stamp}.json"))
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _write_text_atomically(path, json.dumps(report, indent=2) + "\n")
        if not args.quiet:
            print(f"wrote {path}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark
    if args.memory_plan:
        return _cmd_bench_memory_plan(args)
    dtype = resolve_dtype(args.dtype)
    device = _check_device(args.device)
    if args.kernels:
        return _cmd_bench_kernels(args, device)
    _check_backend(args.backend, device)
    if args.config == "builtin":
        model = load(None, device=device, dtype=dtype, backend=args.backend)
        options = model.options
    else:
        options = Options() if args.config == "published" else Options(**SMALL_OPTIONS)
        model = FILM(options, backend=args.backend).to(device=device, dtype=dtype).eval()
    baseline = None
    if args.backend != "torch" and not args.no_baseline:
        resolved = set(_resolved_backends(args.backend, device).values())
        if resolved != {"torch"}:  # a kernel backend runs: time the reference next to it
            baseline = FILM(options, backend="torch").to(device=device, dtype=dtype).eval()
            baseline.load_state_dict(model.state_dict())
    # A published-model frame takes seconds on a CPU and milliseconds on a GPU.
    if args.iters is None:
        args.iters = 10 if device.type == "cuda" else 3
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    ceiling = benchmark.matmul_ceiling(device, dtype)
    sizes = args.sizes or _sizes("256x256,512x512")
    results = benchmark.bench_sizes(model, [(w, h) for w, h in sizes], iters=args.iters,
                                    warmup=args.warmup, ceiling=ceiling, baseline=baseline)
    header = (f"{PROG} bench: {args.config} config ({model.num_parameters() / 1e6:.2f} M params), "
              f"{benchmark.device_name(device)}, {_dtype_name(dtype)}, backend {args.backend}, "
              f"torch {torch.__version__}; matmul ceiling {ceiling / 1e12:.3f} TFLOP/s")
    if device.type == "cpu" and dtype == torch.float32:
        header += f"; Winograd transforms: {benchmark.cpu_winograd_transforms()}"
    print(header)
    print(benchmark.format_table(results))
    report = dict(benchmark.report_header(device, dtype, args.backend, args.config, options, ceiling),
                  backends_resolved=_resolved_backends(args.backend, device), results=results)
    kind = "cuda" if device.type == "cuda" else "cpu"
    _save_bench_report(report, args, f"bench-{kind}-{_dtype_name(dtype)}-{args.backend}")
    return 0


# ---- eval -------------------------------------------------------------------------------------
def _finite_or_none(value):
    """JSON has no inf / nan: non-finite numbers (PSNR of identical images) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _check_report_path(path: Optional[str], flag: str) -> None:
    """Fails before any work when ``path`` cannot be written (it is written only at the end)."""
    if not path:
        return
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not _writable_dir(ancestor):
        raise InputError(f"{flag} {path}: cannot write there ({ancestor} is not a writable "
                         "directory)")


def _eval_table(rows: List[Tuple[str, ...]], header: Tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        # First column left-aligned (names), numbers right-aligned.
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    dtype = resolve_dtype(args.dtype)
    device = _check_device(args.device)
    _check_backend(args.backend, device)
    _check_report_path(args.json, "--json")
    _check_report_path(args.csv, "--csv")
    if args.json and args.csv and os.path.abspath(args.json) == os.path.abspath(args.csv):
        raise InputError(f"--json and --csv name the same file {args.json}")
    # Find and check every triplet (headers only: missing files, non-images, mismatched sizes)
    # before loading the model, so bad input fails in seconds, not after an hour.
    datasets = []  # (label, root, layout, triplets)
    for root in args.roots:
        layout = evaluation.detect_layout(root) if args.layout == "auto" else args.layout
        # Xiph is reported both ways, like the paper: 2K (downsized) and 4K (centre crop).
        for variant in (("xiph-2k", "xiph-4k") if layout == "xiph" else (layout,)):
            triplets = evaluation.discover_triplets(root, variant)
            if args.max_examples is not None:
                triplets = triplets[:args.max_examples]
            for triplet in triplets:
                evaluation.check_triplet(triplet)
            base = os.path.basename(os.path.normpath(os.path.abspath(root)))
            datasets.append((f"{base} ({evaluation.LAYOUT_LABELS[variant]})", root, variant,
                             triplets))

    model = load(args.model, device=device, dtype=dtype, backend=args.backend,
                 pyramid_levels=args.pyramid_levels, padding=args.padding,
                 ensemble=args.ensemble)
    source = getattr(model, "source", args.model or "built-in model")
    backend = getattr(model, "backend", args.backend)
    options = getattr(model, "options", None)  # (None: a model-like callable)
    padding = f", {options.padding} padding" if options is not None else ""
    ensemble = getattr(model, "ensemble", 1)
    if ensemble > 1:
        padding += f", flip ensemble of {ensemble}"
    if not args.quiet:
        print(f"{PROG} eval: model {source} on {device}, {_dtype_name(dtype)}, backend "
              f"{backend}{padding}; PSNR/SSIM as tf.image.psnr/ssim on RGB in [0, 1], "
              "prediction clipped, t = 0.5")
    show_progress = not args.quiet and sys.stderr.isatty()
    results = []
    for label, root, layout, triplets in datasets:
        def progress(done: int, total: int, row, label=label) -> None:
            if show_progress:
                print(f"\r{PROG}: {label}: {done}/{total}", end="" if done < total else "\n",
                      file=sys.stderr, flush=True)
        results.append(evaluation.evaluate(model, triplets, device=device, dtype=dtype,
                                           progress=progress))

    if args.per_item:
        for (label, _, _, _), result in zip(datasets, results):
            rows = [(r.name, f"{r.psnr:.2f}", f"{r.ssim:.4f}", f"{r.avg_psnr:.2f}",
                     f"{r.avg_ssim:.4f}", f"{r.psnr - r.avg_psnr:+.2f}", f"{r.seconds:.3f}")
                    for r in result.rows]
            print(f"\n{label}")
            print(_eval_table(rows, ("item", "PSNR", "SSIM", "avg PSNR", "avg SSIM", "gain dB",
                                     "seconds")))
        print()
    rows = [(label, str(result.n), f"{result.psnr:.2f}", f"{result.ssim:.4f}",
             f"{result.avg_psnr:.2f}", f"{result.avg_ssim:.4f}", f"{result.gain_db:+.2f}")
            for (label, _, _, _), result in zip(datasets, results)]
    print(_eval_table(rows, ("dataset", "n", "PSNR", "SSIM", "avg PSNR", "avg SSIM", "gain dB")))

    reports = []
    if args.json:
        report = dict(film_fast_version=__version__, model=source, device=str(device),
                      dtype=_dtype_name(dtype), backend=backend,
                      options=(dict(options.to_dict(), padding=options.padding)
                               if options is not None else None),
                      ensemble=ensemble,
                      protocol="official FILM eval: RGB float in [0, 1], prediction clipped to "
                               "[0, 1], batch 1, t = 0.5; tf.image.psnr and tf.image.ssim "
                               "(max_val 1) per triplet, then the mean; avg_* = frame averaging "
                               "(frame0 + frame2) / 2; null = not finite (identical images)",
                      datasets=[dict(name=label, root=os.path.abspath(root), layout=layout,
                                     **result.to_dict(items=True))
                                for (label, root, layout, _), result in zip(datasets, results)])
        text = json.dumps(_finite_or_none(report), indent=2, allow_nan=False) + "\n"
        reports.append((args.json, text))
    if args.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["dataset", "layout", "item", "n", "psnr", "ssim", "avg_psnr", "avg_ssim",
                         "gain_db", "seconds"])
        for (label, _, layout, _), result in zip(datasets, results):
            if args.per_item:
                for r in result.rows:
                    writer.writerow([label, layout, r.name, 1, r.psnr, r.ssim, r.avg_psnr,
                                     r.avg_ssim, r.psnr - r.avg_psnr, r.seconds])
            writer.writerow([label, layout, "mean", result.n, result.psnr, result.ssim,
                             result.avg_psnr, result.avg_ssim, result.gain_db, result.seconds])
        reports.append((args.csv, buffer.getvalue()))
    for path, text in reports:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _write_text_atomically(path, text)
        if not args.quiet:
            print(f"wrote {path}")
    return 0


# ---- parser and entry point ------------------------------------------------------------------
def _add_inference_options(p: argparse.ArgumentParser, ensemble: bool = True) -> None:
    """--padding (and --ensemble): how a loaded checkpoint runs, beyond its weights."""
    p.add_argument("--padding", choices=PADDINGS, default=None,
                   help="padding of sizes that are not multiples of the model's size multiple: "
                        "zeros (the official wrapper's) or replicate (default: what the "
                        "checkpoint records; the built-in model: replicate)")
    if ensemble:
        p.add_argument("--ensemble", type=int, choices=(1, 2, 3, 4), default=1, metavar="N",
                       help="test-time flip ensemble: average the model over N flipped copies "
                            "of each pair (1 off, default; 2 + horizontal flip; 3 + vertical; "
                            "4 + both): N times the time for a better frame")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="compute dtype")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="kernel backend for the hot ops (default: auto)")


def _add_sequence_options(p: argparse.ArgumentParser, tile_default) -> None:
    p.add_argument("--scene-threshold", type=_threshold, default=None, metavar="X",
                   help=f"pairs whose scene-change score (0..1) is above X are not "
                        f"interpolated: their new frames repeat the earlier frame; 0 disables "
                        f"(default {DEFAULT_SCENE_THRESHOLD} for sequences and videos, off for "
                        f"a pair A B)")
    p.add_argument("--tile", type=_tile, default=tile_default, metavar="auto|off|N",
                   help="full frames when memory allows, else overlapping tiles (auto, the "
                        "default); off; or N-pixel tiles (overlap N/4)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, metavar="B",
                   help="model calls per forward (pairs run together; helps on GPUs)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the model's calls from CUDA graphs (a CUDA device; all frames "
                        "have one size, so each call shape is captured once)")


def _check_cuda_graphs(args: argparse.Namespace, device: torch.device) -> None:
    if getattr(args, "cuda_graphs", False) and device.type != "cuda":
        raise InputError(f"--cuda-graphs needs a CUDA device, got --device {device}")


def _cmd_video(args: argparse.Namespace) -> int:
    from . import video
    return video.run(args, load_model=load, check_device=_check_device,
                     check_backend=_check_backend, resolve_dtype=resolve_dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Fast FILM frame interpolation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("interpolate", help="write the in-between frames of two images or a "
                                           "folder of frames",
                       description="Interpolates frames between A and B (or between every pair "
                                   "of consecutive frames of a folder, in natural order: frame2 "
                                   "before frame10) and writes DIR/frame_000.png ... (the inputs "
                                   "included).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="two images A B, one folder of frames, or several images in order")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--times-to-interpolate", type=_times_to_interpolate, default=None,
                      metavar="K", help="recursive mid-point interpolation, 2^K + 1 frames "
                                        "(the official CLI's scheme; default 1)")
    when.add_argument("--num-frames", type=_int_at_least(0), default=None, metavar="N",
                      help="N evenly spaced in-between frames (the PyTorch port's scheme)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint: TF2 SavedModel dir, TorchScript .pt, state dict, .safetensors")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N",
                   help="pyramid levels, for non-published checkpoints that do not record it")
    _add_inference_options(p)
    _add_model_options(p)
    _add_sequence_options(p, tile_default=None)
    p.add_argument("--clip", default=None, metavar="FILE",
                   help="also write the frames as a video (.mp4, .mkv, .mov: H.264; .webm: VP9; "
                        "needs PyAV: pip install 'film_fast[video]')")
    p.add_argument("--clip-fps", type=float, default=30.0, metavar="R",
                   help="frame rate of --clip (default 30, as the official CLI)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace frame_*.png files already in DIR")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("video", help="interpolate a video file (decoded and encoded with PyAV)",
                       description="Raises the frame rate of IN and writes OUT, keeping its "
                                   "audio and colour metadata. Resumable (--resume); runs on "
                                   "several processes under torchrun.")
    p.add_argument("input", metavar="IN", help="input video file")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output video file; its extension picks the container (.mp4, .mkv, ...)")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--factor", type=_int_at_least(1), default=None, metavar="F",
                      help="F times the frame rate: (n - 1) * F + 1 frames, same duration")
    rate.add_argument("--fps", type=_fps, default=None, metavar="R",
                      help="output frame rate (60, 29.97, 30000/1001): frame k at t0 + k / R, "
                           "the nearest recursive mid-point frame")
    p.add_argument("--crf", type=_int_at_least(0), default=None, metavar="N",
                   help="constant rate factor of the encoder (x264/x265/vpx/svt-av1; default: "
                        "the encoder's)")
    p.add_argument("--codec", default=None, metavar="NAME",
                   help="video encoder, e.g. libx264, libx265, libvpx-vp9 (default: the input's "
                        "codec when the container takes it)")
    p.add_argument("--model", default=None, metavar="PATH", help="checkpoint (see interpolate)")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N")
    _add_inference_options(p)
    _add_model_options(p)
    _add_sequence_options(p, tile_default="auto")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.film-fast-work")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress line, no summary")
    # Hidden, for tests: stop (as if interrupted) after writing N frames; pairs per segment.
    p.add_argument("--stop-after", type=_int_at_least(1), default=None, help=argparse.SUPPRESS)
    p.add_argument("--segment-pairs", type=_int_at_least(1), default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_video)

    p = sub.add_parser("convert", help="convert a checkpoint to film_fast .safetensors")
    p.add_argument("src", metavar="SRC", help="any checkpoint film_fast.load reads")
    p.add_argument("dst", metavar="DST", help="output file, must end in .safetensors")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N")
    _add_inference_options(p, ensemble=False)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N")
    _add_inference_options(p, ensemble=False)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="frames per second with random weights")
    _add_model_options(p)
    p.add_argument("--sizes", type=_sizes, default=None,
                   metavar="WxH[,WxH...]", help="frame sizes (default: 256x256,512x512; with "
                   "--memory-plan 1280x720,1920x1080,2560x1440,3840x2160)")
    p.add_argument("--iters", type=_int_at_least(1), default=None,
                   help="timed runs per size (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=_int_at_least(0), default=None,
                   help="untimed runs per size (default: 3 on GPU, 1 on CPU)")
    p.add_argument("--config", choices=("published", "builtin", "small"), default="published",
                   help="architecture: the published film_net, the built-in model (its trained "
                        "weights and config), or a tiny test config")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/bench-<device>-<dtype>-<backend>-<date>.json")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip timing the torch reference backend next to a kernel backend")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--kernels", action="store_true",
                   help="per-op kernel table (each backend x real per-level shapes) instead")
    p.add_argument("--resolutions", default="720p", metavar="R[,R...]",
                   help="with --kernels: 720p, 1080p, 4k (default: 720p)")
    p.add_argument("--backward", action="store_true", help="with --kernels: time forward+backward")
    p.add_argument("--memory-plan", action="store_true",
                   help="predicted peak GPU memory per size instead (a dry run on the meta "
                        "device: runs anywhere, no GPU needed; --backend triton or torch)")
    p.add_argument("--device-memory", type=_positive_float, default=24.0, metavar="GB",
                   help="with --memory-plan: the device memory the 'fits' column checks "
                        "(default 24 GB)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("eval", help="PSNR / SSIM on frame triplets, next to frame averaging",
                       description="Scores a model the way the official FILM eval does (RGB in "
                                   "[0, 1], prediction clipped, batch 1, t = 0.5, tf.image.psnr "
                                   "and tf.image.ssim) on Vimeo-90K test, Middlebury-Other, "
                                   "UCF101 (DVF), Xiph (2K and 4K) or any folder of triplets, "
                                   "and prints the frame-averaging baseline next to it.")
    p.add_argument("roots", nargs="+", metavar="DATASET_ROOT",
                   help="data set folders: vimeo_triplet or vimeo_interp_test, the Middlebury "
                        "folder holding other-data/ and other-gt-interp/, ucf101_interp_ours, a "
                        "folder of Xiph frames, or folders of triplet subfolders")
    p.add_argument("--layout", choices=evaluation.LAYOUTS, default="auto",
                   help="layout of every DATASET_ROOT (default: detected per folder); xiph "
                        "evaluates both xiph-2k and xiph-4k")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint (see interpolate; default: the built-in model)")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N")
    _add_inference_options(p)
    _add_model_options(p)
    p.add_argument("--max-examples", type=_int_at_least(1), default=None, metavar="N",
                   help="only the first N triplets of each data set")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="also write the results, every triplet included, as JSON")
    p.add_argument("--csv", default=None, metavar="OUT",
                   help="also write one mean row per data set (and the triplets with --per-item)")
    p.add_argument("--per-item", action="store_true",
                   help="also print (and put in --csv) the scores of every triplet")
    p.add_argument("--quiet", action="store_true", help="no progress line or header; the table")
    p.set_defaults(func=_cmd_eval)

    from .training import cli_train
    p = cli_train.add_parser(sub, PROG)
    p.set_defaults(func=cli_train.run)
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())  # one line, whatever the exception held


def _exit_code(e: BaseException) -> int:
    # Usage / input problems (bad images, checkpoints, options, output folders) -> 2;
    # failures while working (writing, backends, the device) -> 1.
    if isinstance(e, (InputError, CheckpointError)):
        return 2
    if isinstance(e, ValueError) and not isinstance(e, FilmFastError):
        return 2
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the CLI; returns the exit code (argparse's 2 for bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, bad arguments: argparse has printed them
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required (interpolate, video, convert, info, bench, eval, train)",
              file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (FilmFastError, ValueError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return _exit_code(e)
