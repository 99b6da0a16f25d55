"""End to end: the published model per resolution x dtype x backend (the `film-fast bench` numbers)."""
import pytest
import torch

import film_fast
from film_fast.benchmark import bench_sizes, matmul_ceiling
from film_fast.kernel_bench import RESOLUTIONS, backend_runs

from conftest import DEVICE, FULL

if DEVICE.type == "cuda":
    SIZES, DTYPES = ["720p", "1080p", "4k"], [torch.float16, torch.bfloat16, torch.float32]
else:
    SIZES = ["720p"] if FULL else []
    DTYPES = [torch.float32, torch.bfloat16]
CPU_SIZES = [(256, 256), (512, 512)]


@pytest.mark.parametrize("backend", ["torch", "triton", "cupy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("size", [RESOLUTIONS[s] for s in SIZES] + (CPU_SIZES if DEVICE.type == "cpu" else []),
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_model(benchmark, size, dtype, backend):
    ok, why = backend_runs(backend, DEVICE)
    if not ok:
        pytest.skip(why)
    model = film_fast.FILM(backend=backend).to(device=DEVICE, dtype=dtype).eval()
    ceiling = matmul_ceiling(DEVICE, dtype)
    rows = []
    benchmark.pedantic(lambda: rows.append(bench_sizes(model, [size], iters=1, warmup=0,
                                                       ceiling=ceiling)[0]),
                       rounds=3 if DEVICE.type == "cpu" else 10, iterations=1, warmup_rounds=1)
    best = min(rows, key=lambda r: r["median_s"])
    benchmark.extra_info.update(best)
    assert best["fps"] > 0
