"""How far film_fast's fp16 and bf16 modes are from fp32, on real frames.

For each triplet (any folder ``film-fast eval`` reads; default: the triplets in
``tests/data/triplets``) the model runs at t = 0.5 in fp32 (the truth) and in each
low-precision dtype, on the same device, with the same weights. Per dtype it reports:

- ``psnr_vs_fp32``: PSNR of the low-precision output against the fp32 output (both clipped
  to [0, 1], RGB, mean over triplets), with the max and mean absolute error;
- ``gain_db`` next to fp32's: PSNR against the ground truth minus frame averaging's, i.e.
  what the dtype costs in the evaluation;
- ``torch_*``: the same errors with every op on the plain PyTorch backend in that dtype, and
  ``error_ratio``: film_fast's max error over plain PyTorch's (the project's standard for
  kernels is at most 2). On a CPU the auto backend is torch, so the ratio is 1 by
  construction; it means something on a GPU, where auto picks the Triton/CuPy kernels.

Low precision on a CPU: bf16 runs natively only with AVX512-BF16/AMX (elsewhere emulated,
10x or more slower) and fp16 convolutions take minutes per frame, so use few, small
triplets there. On a GPU it takes seconds.

    python benchmarks/dtype_accuracy.py [DATASET_ROOT ...] [--model PATH] [--device cuda]
        [--dtypes fp16,bf16] [--max-examples N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import film_fast  # noqa: E402
from film_fast import ops  # noqa: E402
from film_fast.api import resolve_device, resolve_dtype  # noqa: E402
from film_fast.evaluation import discover_triplets, load_triplet, psnr  # noqa: E402

DEFAULT_ROOTS = [os.path.join(os.path.dirname(HERE), "tests", "data", "triplets", name)
                 for name in ("davis", "ucf101")]


def _psnr_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against ``b`` ([1, 3, H, W] in [0, 1]); inf when identical."""
    mse = (a - b).square().mean().item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


@torch.inference_mode()
def _run(model, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    device, dtype = model.device, model.dtype
    out = model(x0.to(device=device, dtype=dtype), x1.to(device=device, dtype=dtype), 0.5)
    return out.float().clamp(0, 1).cpu()


def measure(model_path, roots, device, dtypes, backend="auto", max_examples=None):
    """Returns the report dict (see the module docstring); prints nothing."""
    triplets = []  # (data set name, triplet)
    for root in roots:
        found = discover_triplets(root)
        if not found:
            raise SystemExit(f"{root}: no triplets found")
        name = os.path.basename(os.path.normpath(os.path.abspath(root)))
        triplets += [(name, t) for t in (found[:max_examples] if max_examples else found)]
    truth = film_fast.load(model_path, device=device, dtype=torch.float32, backend=backend)
    # When every hot op of `backend` resolves to torch (any CPU run with auto), the plain-PyTorch
    # run would repeat the same computation: its numbers are copied instead of recomputed.
    plain = all(ops.resolve(op, backend, device)[0] == "torch"
                for op in ("conv2d", "warp", "upsample_flow", "avg_pool2x2", "upsample_conv2x2"))
    models = {}
    for name in dtypes:
        dtype = resolve_dtype(name)
        models[name] = {"auto": film_fast.load(model_path, device=device, dtype=dtype,
                                               backend=backend)}
        if not plain:
            models[name]["torch"] = film_fast.load(model_path, device=device, dtype=dtype,
                                                   backend="torch")
    rows = {name: [] for name in dtypes}
    fp32_gains = {}
    for dataset, triplet in triplets:
        x0, gt, x1 = load_triplet(triplet)
        avg = psnr((x0 + x1) / 2, gt).item()
        ref = _run(truth, x0, x1)
        fp32_gains.setdefault(dataset, []).append(psnr(ref, gt).item() - avg)
        for name in dtypes:
            row = {"dataset": dataset, "name": triplet.name}
            for label, model in models[name].items():
                t0 = time.perf_counter()
                out = _run(model, x0, x1)
                prefix = "" if label == "auto" else "torch_"
                err = (out - ref).abs()
                row[prefix + "seconds"] = time.perf_counter() - t0
                row[prefix + "psnr_vs_fp32"] = _psnr_between(out, ref)
                row[prefix + "max_abs_error"] = err.max().item()
                row[prefix + "mean_abs_error"] = err.mean().item()
                row[prefix + "gain_db"] = psnr(out, gt).item() - avg
            if plain:
                row.update({"torch_" + k: v for k, v in list(row.items())
                            if k not in ("dataset", "name")})
            rows[name].append(row)

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    report = {
        "model": truth.source, "device": str(device), "backend": truth.backend,
        "film_fast_version": film_fast.__version__, "torch": torch.__version__,
        "triplets": len(triplets), "roots": [os.path.abspath(r) for r in roots],
        "plain_torch_is_the_backend": plain,
        "fp32_gain_db": {d: mean(g) for d, g in fp32_gains.items()}, "dtypes": {},
    }
    for name, items in rows.items():
        summary = {key: mean(r[key] for r in items)
                   for key in ("psnr_vs_fp32", "mean_abs_error", "seconds",
                               "torch_psnr_vs_fp32", "torch_mean_abs_error")}
        summary["gain_db"] = {d: mean(r["gain_db"] for r in items if r["dataset"] == d)
                              for d in fp32_gains}
        summary["torch_gain_db"] = {d: mean(r["torch_gain_db"] for r in items
                                            if r["dataset"] == d) for d in fp32_gains}
        summary["max_abs_error"] = max(r["max_abs_error"] for r in items)
        summary["torch_max_abs_error"] = max(r["torch_max_abs_error"] for r in items)
        denom = summary["torch_max_abs_error"]
        summary["error_ratio"] = summary["max_abs_error"] / denom if denom > 0 else None
        summary["items"] = items
        report["dtypes"][name] = summary
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", metavar="DATASET_ROOT",
                   help="folders of triplets (default: tests/data/triplets/davis and ucf101)")
    p.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto", help="film_fast's backend (default auto)")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated (default fp16,bf16)")
    p.add_argument("--max-examples", type=int, default=None, help="first N triplets per folder")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name in dtypes:
        resolve_dtype(name)  # fails early on a typo
    report = measure(args.model, args.roots or DEFAULT_ROOTS, device, dtypes, args.backend,
                     args.max_examples)
    gains = report["fp32_gain_db"]
    print(f"{report['model']} on {report['device']}, backend {report['backend']}, "
          f"{report['triplets']} triplets; gain over frame averaging in fp32: "
          + ", ".join(f"{d} {g:+.3f} dB" for d, g in gains.items()))
    print(f"{'dtype':6} {'PSNR vs fp32':>12} {'max err':>9} {'mean err':>9} "
          f"{'torch max err':>13} {'ratio':>6} {'s/frame':>8}  gain dB")
    for name, s in report["dtypes"].items():
        ratio = "n/a" if s["error_ratio"] is None else f"{s['error_ratio']:.2f}"
        gain = ", ".join(f"{d} {g:+.3f}" for d, g in s["gain_db"].items())
        print(f"{name:6} {s['psnr_vs_fp32']:12.2f} {s['max_abs_error']:9.2e} "
              f"{s['mean_abs_error']:9.2e} {s['torch_max_abs_error']:13.2e} "
              f"{ratio:>6} {s['seconds']:8.2f}  {gain}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, allow_nan=True)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
