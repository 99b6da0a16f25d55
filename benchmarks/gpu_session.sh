#!/usr/bin/env bash
# One command for a lent GPU machine (see the README's Benchmarks section): GPU tests, then kernel
# and end-to-end benchmarks, all results as JSON under $OUT (default benchmarks/results).
# The GPU machine has torch/triton/cupy but no network: install film_fast without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

# 1. Correctness on the GPU: kernel parity (triton + cupy), model golden parity, everything else.
timeout 300 python -m pytest -q -x tests/test_cupy_kernels.py tests/test_triton_kernels.py \
    tests/test_backend_model_gpu.py tests/test_triton_model.py tests/test_golden_parity.py \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -30

# 2. End to end per dtype: 720p/1080p/4K, each kernel backend timed next to the torch backend.
for dtype in fp16 bf16 fp32; do
  for backend in triton cupy torch; do
    timeout 240 film-fast bench --device cuda --dtype "$dtype" --backend "$backend" \
      --sizes 1280x720,1920x1080,3840x2160 --iters 10 --warmup 3 \
      --json "$OUT/bench-gpu-$dtype-$backend.json" 2>&1 | tail -6
  done
done

# 3. Kernel tables (forward and forward+backward), fp16 at the three resolutions.
timeout 300 film-fast bench --kernels --device cuda --dtype fp16 --resolutions 720p,1080p,4k \
  --json "$OUT/kernels-gpu-fp16-fwd.json" 2>&1 | tail -50
timeout 300 film-fast bench --kernels --device cuda --dtype fp16 --resolutions 1080p --backward \
  --json "$OUT/kernels-gpu-fp16-bwd.json" 2>&1 | tail -30
