"""Every hot-path op x backend x dtype x pass at the published model's real per-level shapes."""
import pytest

from film_fast import kernel_bench

from conftest import DEVICE, FULL

RESOLUTIONS = list(kernel_bench.RESOLUTIONS) if FULL or DEVICE.type == "cuda" else ["720p"]
DTYPES = ["fp32", "fp16", "bf16"] if DEVICE.type == "cuda" else (["fp32", "bf16"] if FULL else ["fp32"])
CASES = [(res, case) for res in RESOLUTIONS for case in kernel_bench.cases(res)]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cupy"])
@pytest.mark.parametrize("res,case", CASES, ids=[f"{r}-{c.op}-{c.label}" for r, c in CASES])
def test_kernel(benchmark, ceilings, res, case, backend, dtype, backward):
    ok, why = kernel_bench.backend_runs(backend, DEVICE)
    if not ok:
        pytest.skip(why)
    if backward and DEVICE.type == "cpu" and not FULL:
        pytest.skip("CPU backward rows run with FILM_FAST_BENCH_FULL=1")
    if backward and not case.grad_inputs:
        pytest.skip("an inference-only row (a store into a buffer slice)")
    rounds = 10 if DEVICE.type == "cuda" else 2
    row = {}

    def once():
        row.update(kernel_bench.run_case(case, backend, DEVICE, kernel_bench.DTYPES[dtype],
                                         backward=backward, iters=1, warmup=0,
                                         ceilings=ceilings[dtype]))

    benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(row, resolution=res)
    assert row["median_s"] > 0
