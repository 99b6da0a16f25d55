"""Streaming film_fast.interpolate (each frame encoded once) vs pair by pair (FILM.forward).

    python benchmarks/sequence_reuse.py --config published --size 240x128 --frames 6 --k 1 2

Random weights (the timing does not depend on them); frames are random too. Repetitions of the
two ways alternate and the best time of each is reported, so that a load spike on a shared
machine hits neither side alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import film_fast  # noqa: E402
from film_fast.cli import SMALL_OPTIONS  # noqa: E402
from film_fast.interpolation import interpolate_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("published", "small"), default="published")
    parser.add_argument("--size", default="240x128", help="WxH")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2], help="times_to_interpolate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.config == "published":
        options = film_fast.Options()
    else:
        options = film_fast.Options(**SMALL_OPTIONS)
    torch.manual_seed(0)
    model = film_fast.FILM(options, backend="torch").eval()
    frames = [torch.rand(3, height, width) for _ in range(args.frames)]
    print(f"{args.config} config, {width}x{height}, {args.frames} frames, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for k in args.k:
        list(film_fast.interpolate(model, frames[:2], times_to_interpolate=k))  # warm-up
        best = {"streaming": float("inf"), "pairwise": float("inf")}
        for _ in range(args.repeats):
            start = time.perf_counter()
            list(film_fast.interpolate(model, frames, times_to_interpolate=k))
            best["streaming"] = min(best["streaming"], time.perf_counter() - start)
            start = time.perf_counter()
            for a, b in zip(frames, frames[1:]):
                interpolate_pair(model, a, b, times_to_interpolate=k)
            best["pairwise"] = min(best["pairwise"], time.perf_counter() - start)
        new = (args.frames - 1) * ((1 << k) - 1)
        print(f"K={k}: {new} new frames; streaming {best['streaming']:.2f} s "
              f"({best['streaming'] / new:.3f} s/frame), pair by pair {best['pairwise']:.2f} s "
              f"({best['pairwise'] / new:.3f} s/frame): "
              f"{best['pairwise'] / best['streaming']:.2f}x")


if __name__ == "__main__":
    main()
