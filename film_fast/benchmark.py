"""End-to-end benchmarking: frames per second, FLOP rate against the measured ceiling, memory.

Used by ``film-fast bench``. Every number is measured on the machine it runs on:

* the ceiling is the median rate of a large square matmul in the benchmark's
  dtype (2048^3 on CPU, 8192^3 on CUDA), the best dense rate this device gives
  PyTorch; a frame's conv FLOPs (:func:`film_fast.flops.conv_flops`) divided by
  its time, over that ceiling, is the fraction reported;
* peak memory on CUDA is ``torch.cuda.max_memory_allocated`` of one more call of the
  model alone (:func:`cuda_call_peak`: its weights, inputs and activations, not the
  baseline's), and on CPU the process's peak resident set size (monotonic over the run);
  ``film-fast bench --memory-plan`` predicts the CUDA number without a GPU;
* when a kernel backend is benchmarked, the torch reference backend runs on
  the same weights and inputs, interleaved, and the speedup is their ratio.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import cpu_memory
from .flops import conv_flops
from .model import FILM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def matmul_ceiling(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median FLOP/s of a large square matmul in ``dtype`` on ``device`` (cached per device/dtype)."""
    key = (str(device), dtype)
    if key not in _CEILINGS:
        _CEILINGS[key] = _matmul_rate(device, dtype, repeats)
    return _CEILINGS[key]


_CEILINGS: Dict[tuple, float] = {}


def _matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    # Big enough to reach the dense rate: 8192^3 on a GPU, 4096^3 (137 GFLOP, ~1 s) on a CPU.
    n = 8192 if device.type == "cuda" else 4096
    if device.type == "cpu" and dtype == torch.float16:
        n = 512  # CPU fp16 matmul is emulated and far slower: keep the probe short
    repeats = repeats if device.type == "cuda" else min(repeats, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)  # (no allocation, no page faults, in the timing)
    times = []
    with torch.inference_mode():
        torch.mm(a, b, out=c)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(device)
            times.append(time.perf_counter() - t0)
    # the best run: a ceiling is what the machine can reach (2-core VMs are noisy)
    return 2 * n ** 3 / min(times)


def peak_rss_bytes() -> Optional[int]:
    try:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kib) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):
        return None


def git_commit() -> str:
    """The commit of the film_fast source tree, when it is a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> Dict[str, str]:
    from . import __version__
    out = {"film_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "cupy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or fails to import without a GPU
            out[name] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        try:
            out["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out["driver"] = "unknown"
    return out


def _time_once(model: FILM, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
               device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    model(x0, x1, t)
    sync(device)
    return time.perf_counter() - t0


def cuda_call_peak(model: FILM, x0: torch.Tensor, x1: torch.Tensor, t) -> int:
    """Peak ``torch.cuda.max_memory_allocated`` of one warm ``model(x0, x1, t)``: the
    model's weights, the inputs and what the call allocates, not whatever else is resident
    (another model, earlier sizes' tensors, this model's caches from earlier calls).
    :attr:`film_fast.memory_plan.MemoryPlan.warm_peak_bytes` predicts it without a GPU."""
    device = x0.device
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        y = model(x0, x1, t)
    sync(device)
    del y
    growth = torch.cuda.max_memory_allocated(device) - before
    own = sum(p.untyped_storage().nbytes() for p in model.parameters())
    return growth + own + x0.untyped_storage().nbytes() + x1.untyped_storage().nbytes()


def bench_sizes(model: FILM, sizes: Sequence[Tuple[int, int]], *, iters: int, warmup: int,
                ceiling: float, baseline: Optional[FILM] = None) -> List[dict]:
    """Times ``model`` at each ``(width, height)``; ``baseline`` (if given) is timed interleaved."""
    device, dtype = model.device, model.dtype
    t = torch.full((1, 1), 0.5, device=device)
    results = []
    for width, height in sizes:
        gen = torch.Generator().manual_seed(0)
        x0 = torch.rand(1, 3, height, width, generator=gen).to(device=device, dtype=dtype)
        x1 = torch.rand(1, 3, height, width, generator=gen).to(device=device, dtype=dtype)
        mine, base = [], []
        with torch.inference_mode():
            for i in range(warmup + iters):
                s = _time_once(model, x0, x1, t, device)
                if i >= warmup:
                    mine.append(s)
                if baseline is not None:
                    s = _time_once(baseline, x0, x1, t, device)
                    if i >= warmup:
                        base.append(s)
        median = statistics.median(mine)
        flops = conv_flops(model.options, height, width)
        row = {"size": f"{width}x{height}", "width": width, "height": height,
               "median_s": median, "min_s": min(mine), "fps": 1.0 / median,
               "conv_gflop": flops / 1e9, "conv_gflops_per_s": flops / median / 1e9,
               "fraction_of_ceiling": flops / median / ceiling, "iters": iters, "warmup": warmup}
        if device.type == "cuda":
            # One more call of each model alone: the interleaved baseline's activations must
            # not count as the model's.
            row["peak_memory_bytes"] = cuda_call_peak(model, x0, x1, t)
            if baseline is not None:
                row["torch_backend_peak_memory_bytes"] = cuda_call_peak(baseline, x0, x1, t)
        else:
            row["peak_rss_bytes"] = peak_rss_bytes()
        if baseline is not None:
            row["torch_backend_median_s"] = statistics.median(base)
            row["speedup_vs_torch_backend"] = statistics.median(base) / median
        results.append(row)
    return results


def report_header(device: torch.device, dtype: torch.dtype, backend: str, config: str,
                  options, ceiling: float) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "versions": versions(), "device": device_name(device),
            "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
            "backend": backend, "config": config, "options": options.to_dict(),
            "matmul_ceiling_tflops": ceiling / 1e12, "batch": 1, "t": 0.5,
            "cpu_malloc": cpu_memory.active() if device.type == "cpu" else None,
            "cpu_winograd_transforms": (cpu_winograd_transforms() if device.type == "cpu"
                                        else None)}


def cpu_winograd_transforms() -> str:
    """Which Winograd transforms the CPU fp32 path runs: "C" (film_fast.kernels.cpu) or, without
    a C compiler or with FILM_FAST_NATIVE=0, "PyTorch ops" (with the reason)."""
    from .ops import winograd
    if winograd.native_library() is not None:
        return "C"
    cpu = winograd.cpu_kernels()
    return f"PyTorch ops ({cpu.unavailable_reason() if cpu is not None else 'no kernels/cpu'})"


def format_table(results: List[dict]) -> str:
    columns = ["size", "s/frame", "frames/s", "GFLOP/frame", "GFLOP/s", "of ceiling", "peak mem"]
    has_base = any("speedup_vs_torch_backend" in r for r in results)
    if has_base:
        columns.append("vs torch")
    rows = []
    for r in results:
        mem = r.get("peak_memory_bytes") or r.get("peak_rss_bytes")
        row = [r["size"], f"{r['median_s']:.4f}", f"{r['fps']:.2f}", f"{r['conv_gflop']:.1f}",
               f"{r['conv_gflops_per_s']:.1f}", f"{100 * r['fraction_of_ceiling']:.1f}%",
               f"{mem / 2**30:.2f} GiB" if mem else "n/a"]
        if has_base:
            row.append(f"{r['speedup_vs_torch_backend']:.2f}x")
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    for row in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
