"""Frames per second of the streaming engine with and without overlapped transfers.

``film_fast.interpolate`` on a CUDA GPU uploads frames a chunk ahead on a copy stream, from
pinned uint8, and hands out generated frames after the next forward is queued
(``film_fast.transfer``). ``FILM_FAST_TRANSFER_OVERLAP=0`` restores the blocking copies. This
script times both on the same synthetic uint8 video (factor 2: one generated frame per
pair), interleaved, in one process, and reports output frames/s, the speed-up, and the
model-only time per call for reference (``FILM.forward`` on device tensors, no transfers).
Frames are prepared before the clock starts in both modes, as ``film-fast video`` prepares
them on its read-ahead thread (float32 for the blocking mode, pinned uint8 for the
overlapped one)::

    python benchmarks/stream_overlap.py [--device cuda] [--size 1920x1080] [--frames 10]
        [--dtype fp16] [--backend auto] [--rounds 3] [--cuda-graphs] [--json OUT]

On a CPU both modes are the same code (there are no copies to overlap).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import film_fast  # noqa: E402
from film_fast import benchmark, transfer  # noqa: E402
from film_fast.api import resolve_dtype  # noqa: E402
from film_fast.cuda_graphs import CUDAGraphEncoded  # noqa: E402
from film_fast.stream import prepare_frame  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = {"blocking": (False, False), "overlapped": (True, False),
         "overlapped+graphs": (True, True)}  # name: (overlapped transfers, CUDA graphs)


def run_once(model, frames, device, overlap: bool, graphs=False) -> float:
    """Seconds for the whole stream (every output frame on the host)."""
    os.environ[transfer.OVERLAP_ENV] = "1" if overlap else "0"
    prepared = [prepare_frame(f, pin=overlap and device.type == "cuda") for f in frames]
    _sync(device)
    t0 = time.perf_counter()
    for _ in film_fast.interpolate(model, prepared, times_to_interpolate=1, tile="off",
                                   cuda_graphs=graphs):
        pass
    _sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="1920x1080")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--backend", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time the overlapped engine with CUDA-graph replay (CUDA only; "
                        "the graphs are captured during the warm-up)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.frames < 3:
        p.error("--frames must be at least 3")
    torch.manual_seed(0)
    model = film_fast.FILM(backend=args.backend).eval().to(device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.frames)]
    outputs = 2 * args.frames - 1
    saved = os.environ.get(transfer.OVERLAP_ENV)
    modes = [m for m in MODES if device.type == "cuda" or not MODES[m][1]]
    if not args.cuda_graphs:
        modes = [m for m in modes if not MODES[m][1]]
    times = {m: [] for m in modes}
    # One set of graphs for every run: captured during the warm-up, only replayed when timed.
    graphs = CUDAGraphEncoded(model) if "overlapped+graphs" in modes else None

    def run(mode: str, clip) -> float:
        overlap, graphed = MODES[mode]
        return run_once(model, clip, device, overlap, graphs if graphed else False)
    try:
        for mode in modes:  # warm-up: kernels, caches, pinned blocks, graph captures
            run(mode, frames[:3])
            run(mode, frames[:4])  # (the steady-state chunk shapes after the first)
        for _ in range(args.rounds):
            for mode in modes:
                times[mode].append(run(mode, frames))
    finally:
        if saved is None:
            os.environ.pop(transfer.OVERLAP_ENV, None)
        else:
            os.environ[transfer.OVERLAP_ENV] = saved
    x = torch.rand(1, 3, height, width, device=device).to(dtype)
    with torch.inference_mode():
        model(x, x, 0.5)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            model(x, x, 0.5)
        _sync(device)
    forward_s = (time.perf_counter() - t0) / 3
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": benchmark.device_name(device), "commit": benchmark.git_commit(),
        "versions": benchmark.versions(), "size": f"{width}x{height}", "dtype": args.dtype,
        "backend": args.backend, "input_frames": args.frames, "output_frames": outputs,
        "seconds": times,
        "fps": {m: outputs / med[m] for m in modes},
        "fps_blocking": outputs / med["blocking"], "fps_overlapped": outputs / med["overlapped"],
        "speedup": med["blocking"] / med["overlapped"],
        "forward_ms": forward_s * 1e3,
        "note": "factor 2: each pair is one call of encoded features (interpolate_encoded) plus "
                "one encode per input frame; forward_ms is FILM.forward (encode of both frames "
                "included) for reference",
    }
    rates = ", ".join(f"{m} {outputs / med[m]:.2f} frames/s" for m in modes)
    print(f"{result['device']}: {args.size} {args.dtype}, {outputs} output frames: {rates}; "
          f"overlapped/blocking {result['speedup']:.3f}x; FILM.forward {forward_s * 1e3:.1f} ms")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
