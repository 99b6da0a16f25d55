"""pytest-benchmark suites (not part of the test run): ``pytest benchmarks --benchmark-json F``.

On a CPU only the torch rows at 720p, fp32 and bf16, run by default (a 4K fp32 conv row
takes ~30 s there); set ``FILM_FAST_BENCH_FULL=1`` for every resolution and dtype.
GPU rows (triton, cupy) skip without CUDA. Each row's ``extra_info`` carries the
achieved GB/s or TFLOP/s and the fraction of the measured ceiling; pytest-benchmark
writes them into its JSON.
"""
import os

import pytest
import torch

FULL = os.environ.get("FILM_FAST_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def ceilings():
    from film_fast import kernel_bench
    from film_fast.benchmark import matmul_ceiling
    bandwidth = kernel_bench.copy_bandwidth(DEVICE)
    return {name: {"copy": bandwidth, "matmul": matmul_ceiling(DEVICE, dtype)}
            for name, dtype in kernel_bench.DTYPES.items()
            if DEVICE.type == "cuda" or name != "fp16"}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from film_fast.benchmark import device_name, git_commit, versions
    output_json["film_fast"] = {"device": device_name(DEVICE), "commit": git_commit(),
                                "versions": versions()}
