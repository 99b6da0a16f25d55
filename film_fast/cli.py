"""The ``film-fast`` command line (also ``python -m film_fast``).

Subcommands::

    film-fast interpolate A.png B.png -o DIR [--times-to-interpolate K | --num-frames N]
    film-fast convert SRC DST.safetensors
    film-fast info MODEL
    film-fast bench [--sizes 256x256,512x512] [--config published|small] [--json PATH]

Errors are printed as one line, ``film-fast: error: <message>``, on stderr; the
exit code is 2 for bad arguments and unusable inputs (images, checkpoints,
devices, output folders), 1 for failures while working (writing files, an
unavailable backend, running out of memory) and 130 on Ctrl-C. ``interpolate``
writes nothing unless every frame succeeds.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__
from .api import load, resolve_device, resolve_dtype
from .checkpoints import read_checkpoint, save_safetensors
from .errors import CheckpointError, FilmFastError, InputError
from .flops import conv_flops
from .imageio import read_image, write_image
from .interpolation import MAX_TIMES_TO_INTERPOLATE, frame_times, iter_frames, resolve_schedule
from .model import FILM
from .options import Options

PROG = "film-fast"
BACKEND_CHOICES = ("auto", "torch", "triton", "cupy")
DTYPE_CHOICES = ("fp32", "fp16", "bf16")
FRAME_GLOB = "frame_*.png"

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


def _times_to_interpolate(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > MAX_TIMES_TO_INTERPOLATE:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TIMES_TO_INTERPOLATE} (2^K + 1 frames), got {value}")
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


def _cmd_interpolate(args: argparse.Namespace) -> int:
    # Validate everything cheap first: arguments, both images, the output folder.
    dtype = resolve_dtype(args.dtype)
    device = _check_device(args.device)
    _check_backend(args.backend, device)
    resolve_schedule(args.times_to_interpolate, args.num_frames)
    frame0 = read_image(args.frame0)
    frame1 = read_image(args.frame1)
    if frame0.shape != frame1.shape:
        raise InputError(f"the frames differ in size: {args.frame0} is {frame0.shape[2]}x"
                         f"{frame0.shape[1]}, {args.frame1} is {frame1.shape[2]}x{frame1.shape[1]}")
    out_dir = args.output
    _preflight_output(out_dir, args.overwrite)

    model = load(args.model, device=device, dtype=dtype, backend=args.backend,
                 pyramid_levels=args.pyramid_levels)
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
        staging.commit(args.overwrite)
    finally:
        staging.cleanup()

    if not args.quiet:
        inner = written - 2
        last = f"frame_{written - 1:0{digits}d}.png"
        print(f"wrote {written} frames to {out_dir} (frame_{0:0{digits}d}.png .. {last})")
        per = f", {compute / inner:.3f} s each" if inner > 0 else ""
        print(f"{inner} in-between frame(s){per}; model {model.source} on {device}, "
              f"{_dtype_name(dtype)}, backend {model.backend}")
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
    model = load(args.src, device="cpu", pyramid_levels=args.pyramid_levels)
    save_safetensors(model, dst)
    print(f"wrote {dst}: {model.num_parameters()} parameters from {model.source}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.model, pyramid_levels=args.pyramid_levels)
    count = sum(t.numel() for t in ckpt.state.values())
    lines = [f"source:     {ckpt.path}",
             f"format:     {ckpt.format}",
             f"dtype:      {_dtype_name(ckpt.dtype)}",
             f"parameters: {count} ({count / 1e6:.2f} M)",
             f"size multiple: {ckpt.options.size_multiple} (other sizes are padded internally)",
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark
    dtype = resolve_dtype(args.dtype)
    device = _check_device(args.device)
    _check_backend(args.backend, device)
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
    results = benchmark.bench_sizes(model, [(w, h) for w, h in args.sizes], iters=args.iters,
                                    warmup=args.warmup, ceiling=ceiling, baseline=baseline)
    header = (f"{PROG} bench: {args.config} config ({model.num_parameters() / 1e6:.2f} M params), "
              f"{benchmark.device_name(device)}, {_dtype_name(dtype)}, backend {args.backend}, "
              f"torch {torch.__version__}; matmul ceiling {ceiling / 1e12:.3f} TFLOP/s")
    print(header)
    print(benchmark.format_table(results))
    report = dict(benchmark.report_header(device, dtype, args.backend, args.config, options, ceiling),
                  backends_resolved=_resolved_backends(args.backend, device), results=results)
    paths = [args.json] if args.json else []
    if args.save:
        stamp = report["date"].replace(":", "").replace("-", "")[:15]
        kind = "cuda" if device.type == "cuda" else "cpu"
        paths.append(os.path.join("benchmarks", "results",
                                  f"bench-{kind}-{_dtype_name(dtype)}-{args.backend}-{stamp}.json"))
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _write_text_atomically(path, json.dumps(report, indent=2) + "\n")
        if not args.quiet:
            print(f"wrote {path}")
    return 0


# ---- parser and entry point ------------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="compute dtype")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="kernel backend for the hot ops (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Fast FILM frame interpolation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("interpolate", help="write the in-between frames of two images",
                       description="Interpolates frames between A and B and writes "
                                   "DIR/frame_000.png ... (A and B included).")
    p.add_argument("frame0", metavar="A", help="first frame (t = 0)")
    p.add_argument("frame1", metavar="B", help="second frame (t = 1)")
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
    _add_model_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace frame_*.png files already in DIR")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("convert", help="convert a checkpoint to film_fast .safetensors")
    p.add_argument("src", metavar="SRC", help="any checkpoint film_fast.load reads")
    p.add_argument("dst", metavar="DST", help="output file, must end in .safetensors")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--pyramid-levels", type=_int_at_least(1), default=None, metavar="N")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="frames per second with random weights")
    _add_model_options(p)
    p.add_argument("--sizes", type=_sizes, default=_sizes("256x256,512x512"),
                   metavar="WxH[,WxH...]", help="frame sizes (default: 256x256,512x512)")
    p.add_argument("--iters", type=_int_at_least(1), default=None,
                   help="timed runs per size (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=_int_at_least(0), default=None,
                   help="untimed runs per size (default: 3 on GPU, 1 on CPU)")
    p.add_argument("--config", choices=("published", "small"), default="published",
                   help="architecture: the published film_net or a tiny test config")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/bench-<device>-<dtype>-<backend>-<date>.json")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip timing the torch reference backend next to a kernel backend")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.set_defaults(func=_cmd_bench)
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
        print(f"{PROG}: error: a command is required (interpolate, convert, info, bench)",
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
