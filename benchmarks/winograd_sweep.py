"""Per-shape timing of FILM's 3x3 convolutions on this CPU: oneDNN direct vs Winograd.

Records every 3x3 conv shape the graph runs (published model at 256x256 and 512x512, the
built-in model at 1024x768), then times each one in fp32 three ways, interleaved: oneDNN's
fused direct conv, Winograd F(2x2, 3x3) and F(4x4, 3x3) (film_fast.ops.winograd). The last
column says which tile film_fast.ops.winograd.tile_size picks, so the rule can be checked
(or re-derived) on another CPU::

    python benchmarks/winograd_sweep.py [--json OUT.json] [--min-channels 128]

Speedups > 1 mean faster than direct. Numbers from the 2-core AMD EPYC (Zen 3) development VM
are in film_fast/ops/winograd.py's docstring.
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch

import film_fast
from film_fast import cpu_memory
from film_fast.ops import dispatch, winograd

_POINTWISE = torch.ops.mkldnn._convolution_pointwise


def conv_shapes() -> collections.Counter:
    """``{((B, Cin, H, W), (Cout, Cin, 3, 3)): calls}`` over the three benchmark frames."""
    shapes: collections.Counter = collections.Counter()
    original = dispatch._IMPLS[("conv2d", "torch")]

    def spy(x, weight, bias, activation=None):
        if tuple(weight.shape[-2:]) == (3, 3):
            shapes[(tuple(x.shape), tuple(weight.shape))] += 1
        return original(x, weight, bias, activation)

    dispatch._IMPLS[("conv2d", "torch")] = spy
    try:
        for config, (h, w) in (("published", (256, 256)), ("published", (512, 512)),
                               ("builtin", (768, 1024))):
            model = (film_fast.load(device="cpu") if config == "builtin"
                     else film_fast.FILM().eval())
            with torch.inference_mode():
                model(torch.rand(1, 3, h, w), torch.rand(1, 3, h, w), 0.5)
    finally:
        dispatch._IMPLS[("conv2d", "torch")] = original
    return shapes


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--min-channels", type=int, default=128,
                   help="skip convs with fewer input or output channels (default 128)")
    args = p.parse_args(argv)
    cpu_memory.ensure()
    rows = []
    native = winograd.native_library() is not None
    print(f"Winograd transforms: {'C (film_fast.kernels.cpu)' if native else 'PyTorch ops'}; "
          "F4 ops = F(4x4) with the PyTorch-op transforms")
    header = (f"{'input':>20} {'Cin->Cout':>11} {'calls':>5} {'direct ms':>10} {'F2x2':>6} "
              f"{'F4x4':>6} {'F4 ops':>6} rule")
    print(header)
    with torch.inference_mode():
        for (xs, ws), calls in sorted(conv_shapes().items(),
                                      key=lambda kv: -(kv[0][0][2] * kv[0][0][3] * kv[0][1][0])):
            b, cin, h, w = xs
            cout = ws[0]
            if cin < args.min_channels or cout < args.min_channels // 2:
                continue
            # Normal tensors: an inference tensor's derived weights are not cached (no version
            # counter), which would time the weight transform with every call.
            with torch.inference_mode(False):
                x = torch.randn(*xs).contiguous(memory_format=torch.channels_last)
                weight, bias = torch.randn(*ws) * 0.02, torch.randn(cout)
            repeats = max(2, min(10, int(2e9 / (18 * cin * cout * h * w * b))))
            direct = _time(lambda: _POINTWISE(x, weight, bias, [1, 1], [1, 1], [1, 1], 1,
                                              "leaky_relu", [0.2], ""), repeats)
            f2 = _time(lambda: winograd.conv3x3(x, weight, bias, "leaky_relu", m=2), repeats)
            f4 = _time(lambda: winograd.conv3x3(x, weight, bias, "leaky_relu", m=4), repeats)
            f4_ops = (_time(lambda: winograd.conv3x3(x, weight, bias, "leaky_relu", m=4,
                                                     native=False), repeats)
                      if native else f4)
            rule = winograd.tile_size(cin, cout, h, w)
            rows.append({"input": list(xs), "weight": list(ws), "calls": calls,
                         "direct_ms": direct * 1e3, "speedup_f2": direct / f2,
                         "speedup_f4": direct / f4, "speedup_f4_torch_ops": direct / f4_ops,
                         "rule": rule})
            print(f"{str(xs):>20} {f'{cin}->{cout}':>11} {calls:>5} {direct * 1e3:>10.2f} "
                  f"{direct / f2:>5.2f}x {direct / f4:>5.2f}x {direct / f4_ops:>5.2f}x "
                  f"{rule or 'direct'}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "native_transforms": native,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
