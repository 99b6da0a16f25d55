"""Kernel benchmarks: every hot-path op x backend x the published model's real per-level shapes.

Shared by ``film-fast bench --kernels`` and the pytest-benchmark suites in
``benchmarks/``. Each case reports its median time, an achieved rate (GB/s of
compulsory traffic for memory-bound ops, TFLOP/s for convolutions) and that
rate as a fraction of the device's measured ceiling:

* memory ceiling: a large device-to-device ``copy_`` (bytes read + written);
* compute ceiling: a large square matmul in the case's dtype
  (:func:`film_fast.benchmark.matmul_ceiling`).

"Compulsory traffic" counts every input read once and every output written
once (a bilinear warp that re-reads neighbouring pixels from cache reaches
100%; one that misses to DRAM on every tap does not).

Shapes are those the published film_net runs at 720p, 1080p and 4K (padded to
multiples of 64: 1280x768, 1920x1088, 3840x2176), taken at the finest level and
at a coarse level, batch 2 (both frames, or both flow directions) where the
model batches, batch 1 in the fusion decoder.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .benchmark import matmul_ceiling, sync
from .options import Options

RESOLUTIONS: Dict[str, Tuple[int, int]] = {"720p": (1280, 720), "1080p": (1920, 1080),
                                           "4k": (3840, 2160)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    """One benchmark row: ``op`` at ``shape`` (a label), with input factory and cost model."""

    op: str
    label: str
    make: Callable[[torch.device, torch.dtype], tuple]  # -> (args, kwargs)
    run: Callable[..., object]  # run(*args, backend=..., **kwargs)
    bytes_moved: Callable[[torch.dtype], int]
    flops: int = 0
    grad_inputs: Tuple[int, ...] = field(default_factory=tuple)  # arg indices that need grads

    @property
    def compute_bound(self) -> bool:
        return self.flops > 0


def _padded(resolution: str, multiple: int) -> Tuple[int, int]:
    w, h = RESOLUTIONS[resolution]
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nhwc(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).contiguous(
        memory_format=torch.channels_last)


def cases(resolution: str, options: Optional[Options] = None) -> List[Case]:
    """The benchmark rows of one resolution for ``options`` (default: the published model)."""
    opts = options or Options()
    H, W = _padded(resolution, opts.size_multiple)
    out: List[Case] = []
    coarse = min(3, opts.fusion_pyramid_levels - 1)
    for level in (0, coarse):
        h, w = H >> level, W >> level
        c = 3 + opts.feature_channels(level)
        tag = f"L{level}-{w}x{h}"

        def make_warp(device, dtype, c=c, h=h, w=w):
            image = _nhwc(2, c, h, w, device=device, dtype=dtype)
            flow = torch.randn(2, 2, h, w, device=device) * 8
            return (image, flow), {}

        out.append(Case("warp", f"{tag}-C{c}", make_warp, ops.warp,
                        lambda dt, c=c, h=h, w=w: 2 * h * w * (2 * c * _size(dt) + 2 * 4),
                        grad_inputs=(0, 1)))

        def make_up(device, dtype, h=h, w=w):
            flow = torch.randn(2, 2, h // 2, w // 2, device=device) * 4
            return (flow, (h, w)), {}

        out.append(Case("upsample_flow", f"{tag}", make_up, ops.upsample_flow,
                        lambda dt, h=h, w=w: 2 * 2 * 4 * (h * w + h * w // 4), grad_inputs=(0,)))

        cf = opts.feature_channels(level)

        def make_upwarp(device, dtype, cf=cf, h=h, w=w):
            flow = torch.randn(2, 2, h // 2, w // 2, device=device) * 4
            feats = _nhwc(2, cf, h, w, device=device, dtype=dtype)
            return (flow, feats), {}

        out.append(Case("upsample_flow_warp", f"{tag}-C{cf}", make_upwarp, ops.upsample_flow_warp,
                        lambda dt, cf=cf, h=h, w=w: 2 * h * w * (2 * cf * _size(dt) + 2 * 4)
                        + 2 * 2 * 4 * h * w // 4, grad_inputs=(0, 1)))

        def make_pool(device, dtype, cf=cf, h=h, w=w):
            return (_nhwc(2, cf, h, w, device=device, dtype=dtype),), {}

        out.append(Case("avg_pool2x2", f"{tag}-C{cf}", make_pool, ops.avg_pool2x2,
                        lambda dt, cf=cf, h=h, w=w: 2 * cf * h * w * _size(dt) * 5 // 4,
                        grad_inputs=(0,)))

    # Convolutions: (label, level, batch, cin, cout, k)
    s = opts.specialized_levels
    conv_rows = [
        ("extract-s0c1", 0, 2, opts.filters, opts.filters, 3),
        ("flow-L0-c0", 0, 2, 2 * opts.feature_channels(0), opts.flow_filters[0], 3),
        ("flow-shared-c0", s, 2, 2 * opts.feature_channels(s), opts.flow_filters[s], 3),
        ("fusion-L0-c0", 0, 1, opts.fusion_input_channels(0) + opts.fusion_filters(0),
         opts.fusion_filters(0), 3),
        ("fusion-Lc-c0", coarse, 1, opts.fusion_input_channels(coarse) + opts.fusion_filters(coarse),
         opts.fusion_filters(coarse), 3),
    ]
    for label, level, n, cin, cout, k in conv_rows:
        h, w = H >> level, W >> level

        def make_conv(device, dtype, n=n, cin=cin, cout=cout, k=k, h=h, w=w):
            x = _nhwc(n, cin, h, w, device=device, dtype=dtype)
            weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
            bias = torch.randn(cout, device=device).to(dtype)
            return (x, weight, bias, "leaky_relu"), {}

        flops = 2 * n * cin * cout * k * k * h * w
        out.append(Case("conv2d", f"{label}-{n}x{cin}->{cout}-{w}x{h}", make_conv, ops.conv2d,
                        lambda dt, n=n, cin=cin, cout=cout, k=k, h=h, w=w:
                        (n * (cin + cout) * h * w + cout * cin * k * k) * _size(dt),
                        flops=flops, grad_inputs=(0, 1, 2)))
    # The feature extractor's stores into its level buffers (conv2d_levels with out=): FILM's
    # layout [features | image | pad] (every 16-bit slice 16-byte aligned: the big Triton
    # tiles) against the image-first layout it had before (slices 3 channels in: small
    # tiles). The second conv of stage 0 at level 0, the largest of them.
    cf0, c_level = opts.filters, opts.feature_channels(0) + 3
    for name, start in (("features-first", 0), ("image-first", 3)):
        def make_into(device, dtype, start=start, h=H, w=W):
            x = _nhwc(2, cf0, h, w, device=device, dtype=dtype)
            weight = (torch.randn(cf0, cf0, 3, 3, device=device) / (cf0 * 9) ** 0.5).to(dtype)
            bias = torch.randn(cf0, device=device).to(dtype)
            total = c_level + (-c_level % 16 if _size(dtype) == 2 else 0)  # (16-bit padding)
            buf = torch.empty(2, total, h, w, device=device, dtype=dtype,
                              memory_format=torch.channels_last).zero_()
            return ([x], weight, bias, "leaky_relu"), {"out": [buf[:, start:start + cf0]]}

        out.append(Case("conv2d_levels", f"extract-s0c1-into-{name}-2x{cf0}->{cf0}-{W}x{H}",
                        make_into, ops.conv2d_levels,
                        lambda dt, h=H, w=W: (2 * 2 * cf0 * h * w + cf0 * cf0 * 9) * _size(dt),
                        flops=2 * 2 * cf0 * cf0 * 9 * H * W))
    for level in (0, coarse - 1):
        h, w = H >> level, W >> level
        last = opts.fusion_pyramid_levels - 2
        cin = opts.fusion_input_channels(last + 1) if level == last else opts.fusion_filters(level + 1)
        cout = opts.fusion_filters(level)

        def make_upconv(device, dtype, cin=cin, cout=cout, h=h, w=w):
            x = _nhwc(1, cin, h // 2, w // 2, device=device, dtype=dtype)
            weight = (torch.randn(cout, cin, 2, 2, device=device) / (cin * 4) ** 0.5).to(dtype)
            bias = torch.randn(cout, device=device).to(dtype)
            return (x, (h, w), weight, bias), {}

        out.append(Case("upsample_conv2x2", f"L{level}-{cin}->{cout}-{w}x{h}", make_upconv,
                        ops.upsample_conv2x2,
                        lambda dt, cin=cin, cout=cout, h=h, w=w:
                        (cin * h * w // 4 + cout * h * w + cout * cin * 4) * _size(dt),
                        flops=2 * cin * cout * 4 * h * w, grad_inputs=(0, 2, 3)))
    return out


def copy_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Median bytes/s (read + write) of a large device-to-device copy."""
    n = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    a = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / statistics.median(times[1:])


def time_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of ``fn`` (CUDA: events around each call; CPU: perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def backend_runs(backend: str, device: torch.device) -> Tuple[bool, str]:
    reasons = ops.available_backends(device)
    why = reasons.get(backend, f"unknown backend {backend}")
    if backend == "triton" and device.type != "cuda":
        return False, "Triton on CPU runs only under the interpreter (a test tool, not a benchmark)"
    return (not why), why


def run_case(case: Case, backend: str, device: torch.device, dtype: torch.dtype, *,
             backward: bool, iters: int, warmup: int, ceilings: Dict[str, float]) -> dict:
    """Times one case; returns a row with seconds, rate and fraction of ceiling."""
    args, kwargs = case.make(device, dtype)
    if backward:
        args = tuple(a.detach().requires_grad_(True) if i in case.grad_inputs and
                     isinstance(a, torch.Tensor) else a for i, a in enumerate(args))

        def fn():
            out = case.run(*args, backend=backend, **kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            grads = [torch.ones_like(o) for o in outs]
            torch.autograd.backward(list(outs), grads)
    else:
        def fn():
            with torch.inference_mode():
                case.run(*args, backend=backend, **kwargs)

    seconds = time_call(fn, device, iters, warmup)
    row = {"op": case.op, "case": case.label, "backend": backend, "dtype": str(dtype)[6:],
           "pass": "fwd+bwd" if backward else "fwd", "median_s": seconds}
    # Backward passes move ~2-3x the forward traffic and do 3x the conv FLOPs.
    factor = 3 if backward else 1
    if case.compute_bound:
        rate = factor * case.flops / seconds
        row.update(tflops=rate / 1e12, fraction_of_ceiling=rate / ceilings["matmul"])
    else:
        rate = factor * case.bytes_moved(dtype) / seconds
        row.update(gbps=rate / 1e9, fraction_of_ceiling=rate / ceilings["copy"])
    return row


def run_table(resolutions: Sequence[str], backends: Sequence[str], dtypes: Sequence[str],
              device: torch.device, *, backward: bool = False, iters: int = 5, warmup: int = 2,
              ops_filter: Optional[Sequence[str]] = None,
              options: Optional[Options] = None) -> Tuple[List[dict], Dict[str, float]]:
    rows: List[dict] = []
    ceilings_by_dtype: Dict[str, Dict[str, float]] = {}
    bandwidth = copy_bandwidth(device)
    for dname in dtypes:
        dtype = DTYPES[dname]
        ceilings_by_dtype[dname] = {"copy": bandwidth, "matmul": matmul_ceiling(device, dtype)}
    for res in resolutions:
        for case in cases(res, options):
            if ops_filter and case.op not in ops_filter:
                continue
            if backward and not case.grad_inputs:
                continue  # (an inference-only row: stores into a buffer slice)
            for dname in dtypes:
                for backend in backends:
                    ok, why = backend_runs(backend, device)
                    if not ok:
                        rows.append({"op": case.op, "case": case.label, "backend": backend,
                                     "dtype": dname, "resolution": res, "skipped": why})
                        continue
                    row = run_case(case, backend, device, DTYPES[dname], backward=backward,
                                   iters=iters, warmup=warmup, ceilings=ceilings_by_dtype[dname])
                    row["resolution"] = res
                    rows.append(row)
    summary = {"copy_gbps": bandwidth / 1e9,
               **{f"matmul_tflops_{d}": c["matmul"] / 1e12 for d, c in ceilings_by_dtype.items()}}
    return rows, summary


def format_rows(rows: List[dict]) -> str:
    columns = ["res", "op", "case", "backend", "dtype", "pass", "ms", "rate", "of ceiling"]
    table = []
    for r in rows:
        if "skipped" in r:
            continue
        rate = f"{r['tflops']:.3f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.1f} GB/s"
        table.append([r.get("resolution", ""), r["op"], r["case"], r["backend"], r["dtype"],
                      r["pass"], f"{1e3 * r['median_s']:.2f}", rate,
                      f"{100 * r['fraction_of_ceiling']:.1f}%"])
    if not table:
        return "(no runnable rows)"
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    skipped = {(r["backend"], r["skipped"]) for r in rows if "skipped" in r}
    lines += [f"skipped {b}: {why}" for b, why in sorted(skipped)]
    return "\n".join(lines)
