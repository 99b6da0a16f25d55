"""Predicted against measured peak memory of one forward (``film_fast.memory_plan``).

On a CUDA device, for each size: a fresh model (random weights) and its two input frames
are put on the GPU, the peak counters are reset, the first call runs (it builds the
caches: packed Triton weights, descriptor tables, warp grids), and
``torch.cuda.max_memory_allocated`` is compared with the dry-run prediction
(``film-fast bench --memory-plan``). ``memory_reserved`` is reported next to it: what
the caching allocator really took from the device (fragmentation included).

Without a GPU (``--device cpu``) it runs the same comparison on the CPU against real
tensors on the GPU graph: the Triton launchers (kernels skipped: the graph does not
depend on values) or the torch backend's readable reference, with the live storages
counted by :class:`film_fast.memory_plan.LiveBytes`. That is what ``tests/test_memory_plan.py``
checks at small sizes; here any size can be run (a 4K fp16 CPU run needs ~15 GiB of RAM).

    python benchmarks/memory_check.py [--device cuda] [--sizes 1920x1080,3840x2160]
        [--dtype fp16] [--backend triton|torch] [--config published|builtin] [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    # CPU: the Triton launchers run under the interpreter, whose kernels are skipped below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import film_fast  # noqa: E402
from film_fast import benchmark, memory_plan  # noqa: E402
from film_fast.api import BUILTIN_MODEL, resolve_dtype  # noqa: E402
from film_fast.checkpoints import read_checkpoint  # noqa: E402
from film_fast.options import Options  # noqa: E402


def measure_one(options, width: int, height: int, dtype, backend: str, device) -> dict:
    torch.manual_seed(0)
    model = film_fast.FILM(options, backend=backend).eval().to(device=device, dtype=dtype)
    x0 = torch.rand(1, 3, height, width, device=device).to(dtype)
    x1 = torch.rand(1, 3, height, width, device=device).to(dtype)
    memory_plan.forget_cached(device.type)
    row = {"size": f"{width}x{height}"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(x0, x1, 0.5)  # (the output is freed at once, after the peak)
        torch.cuda.synchronize(device)
        params = sum(p.untyped_storage().nbytes() for p in model.parameters())
        inputs = 2 * x0.untyped_storage().nbytes()
        # Everything resident before the call that is not this model's (earlier sizes' cached
        # tables, the CUDA runtime's own tensors) is excluded.
        row["measured_bytes"] = torch.cuda.max_memory_allocated(device) - before + params + inputs
        row["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        with memory_plan.gpu_graph_on_cpu(backend):
            row["measured_bytes"] = memory_plan.measure(model, x0, x1)
    del model, x0, x1
    gc.collect()
    if device.type == "cuda":
        memory_plan.forget_cached("cuda")
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="1920x1080,3840x2160")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--backend", default="triton", choices=memory_plan.DRY_RUN_BACKENDS)
    p.add_argument("--config", default="published", choices=("published", "builtin"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    options = read_checkpoint(BUILTIN_MODEL).options if args.config == "builtin" else Options()
    rows = []
    for part in args.sizes.split(","):
        width, height = (int(v) for v in part.lower().split("x"))
        plan = memory_plan.plan(options, height, width, dtype=dtype, backend=args.backend)
        row = measure_one(options, width, height, dtype, args.backend, device)
        row.update(predicted_bytes=plan.peak_bytes,
                   error_fraction=(plan.peak_bytes - row["measured_bytes"]) / row["measured_bytes"])
        rows.append(row)
        extra = (f", reserved {row['reserved_bytes'] / 2**30:.2f} GiB"
                 if "reserved_bytes" in row else "")
        print(f"{row['size']:>10} {args.dtype} {args.backend}: predicted "
              f"{plan.peak_bytes / 2**30:.3f} GiB, measured {row['measured_bytes'] / 2**30:.3f} GiB "
              f"({100 * row['error_fraction']:+.2f}%){extra}", flush=True)
    if args.json:
        report = {"device": benchmark.device_name(device), "versions": benchmark.versions(),
                  "commit": benchmark.git_commit(), "config": args.config, "dtype": args.dtype,
                  "backend": args.backend, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
