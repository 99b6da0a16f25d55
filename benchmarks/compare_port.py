"""Side-by-side CPU/GPU comparison of film_fast against the PyTorch port (dajes/frame-interpolation-pytorch).

The port is not shipped with film_fast: clone it yourself and pass its folder::

    git clone https://github.com/dajes/frame-interpolation-pytorch /tmp/port
    python benchmarks/compare_port.py --port /tmp/port --size 512x512 --dtype fp32

Both models get the same random published-config weights (mapped by name) and the
same inputs; runs are interleaved in one process and the ratio of medians is
reported with the maximum output difference.

On a CPU the process's malloc policy (film_fast.cpu_memory) applies to both models:
film_fast sets ``reuse`` by default, which also spares the port its page faults, so the
default comparison is the conservative one. ``FILM_FAST_CPU_MALLOC=system`` runs both
with glibc's defaults (how the port runs on its own).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types

import torch

import film_fast
from film_fast import cpu_memory
from film_fast.api import resolve_dtype
from film_fast.checkpoints.naming import to_port


def load_port(path: str):
    """Imports the port's Interpolator from its checkout (cv2 stubbed: only its image loader uses it)."""
    if "cv2" not in sys.modules:
        try:
            importlib.import_module("cv2")
        except ImportError:
            sys.modules["cv2"] = types.ModuleType("cv2")
    sys.path.insert(0, os.path.abspath(path))
    try:
        return importlib.import_module("interpolator").Interpolator
    finally:
        sys.path.pop(0)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", required=True, help="path of a frame-interpolation-pytorch checkout")
    p.add_argument("--size", default="512x512", help="HxW (multiples of 64 for the port)")
    p.add_argument("--dtype", default="fp32", help="film_fast's dtype")
    p.add_argument("--port-dtype", default="fp32",
                   help="the port's dtype (bf16/fp16 grid_sample is broken on CPU: keep fp32 there)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--torchscript", action="store_true", help="run the port through torch.jit.script")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    port_dtype = resolve_dtype(args.port_dtype)

    malloc = cpu_memory.ensure() if device.type == "cpu" else None  # both models, from the start
    torch.manual_seed(0)
    ours = film_fast.FILM().eval()
    Interpolator = load_port(args.port)
    port = Interpolator().eval()
    port.load_state_dict(to_port(ours.state_dict()))
    # The port runs convs in the model dtype, like its film_net_fp16.pt; film_fast keeps warp
    # coordinates in fp32 whatever the dtype.
    port = port.to(device=device, dtype=port_dtype)
    if args.torchscript:
        port = torch.jit.script(port)
    ours = ours.to(device=device, dtype=dtype)
    x0 = torch.rand(1, 3, h, w, device=device)
    x1 = torch.rand(1, 3, h, w, device=device)
    dt = torch.full((1, 1), 0.5, device=device)

    with torch.inference_mode():
        out_port = port(x0.to(port_dtype), x1.to(port_dtype), dt.to(port_dtype)).float()
        out_ours = ours(x0, x1, dt).float()
        t_port, t_ours = [], []
        for _ in range(args.iters):
            t_port.append(timed(lambda: port(x0.to(port_dtype), x1.to(port_dtype), dt.to(port_dtype)), device))
            t_ours.append(timed(lambda: ours(x0, x1, dt), device))
    result = {
        "size": [h, w], "dtype": str(dtype), "port_dtype": str(port_dtype), "device": str(device), "torch": torch.__version__,
        "port_s": statistics.median(t_port), "film_fast_s": statistics.median(t_ours),
        "speedup": statistics.median(t_port) / statistics.median(t_ours),
        "max_abs_diff": (out_port - out_ours).abs().max().item(),
        "psnr_vs_port_db": (10 * torch.log10(1.0 / (out_port - out_ours).square().mean())).item(),
        "threads": torch.get_num_threads(),
        "cpu_malloc": malloc,
        "port_times_s": t_port, "film_fast_times_s": t_ours,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
