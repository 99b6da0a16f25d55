#!/usr/bin/env bash
# One command for a lent GPU machine: the measurements the open engine goals need, most important
# first, inside one deadline, every result as JSON under $OUT (default benchmarks/results).
#
#   BUDGET_S  seconds this script may take in all (default 480: a lent machine gives a session about
#             15 minutes of device time, start-up and transfers included, and one command may run
#             at most 10 minutes). Each step runs only if its own timeout still fits.
#   PORT      a checkout of dajes/frame-interpolation-pytorch (default .port, git-ignored: clone it
#             there and pass `carry: [".port"]` to the device tool). Without it step 1 is skipped.
#
#   TRAIN_S   seconds of GPU training for the built-in model (default 0: off). When set, step 2b
#             continues configs/film_fast_default_gpu.json in TRAIN_OUT (default
#             runs/film_fast_default_gpu; resumed when it holds checkpoints, so carry it to go on in
#             a later session) and copies its weights, metrics and last checkpoint to $OUT/train-gpu.
#             Its video source needs PyAV, which the GPU machine lacks: put the wheel in .whl/
#             (git-ignored; `pip download --no-deps --only-binary=:all: --python-version 3.12
#             --platform manylinux_2_28_x86_64 -d .whl av==18.1.0`, 36 MB) and carry ".whl".
#             With the repo (25 MB) and the port's *.py files only (no .git, no photos) in .port,
#             everything stays under the 64 MiB a call may carry.
#
# Order (why): 1 the headline goal (1080p fp16 against the port's fp16 TorchScript on the same GPU),
# 2 frames/s, tensor-core fraction and peak memory at 1080p and 4K, 3 kernel and model parity on
# the GPU (3a: peak memory against the dry-run prediction; 3b: fp16/bf16 accuracy against fp32),
# 4 the per-op kernel table (with both buffer layouts' conv2d_levels rows), 4a the streaming
# engine with and without overlapped transfers, 5 the other dtypes and backends.
# The GPU machine has torch/triton/cupy but no network: film_fast is installed without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PORT="${PORT:-.port}"
BUDGET_S="${BUDGET_S:-480}"
END=$(( $(date +%s) + BUDGET_S ))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# step NAME TIMEOUT_S CMD...: runs CMD under `timeout` if TIMEOUT_S still fits before the deadline.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( END - $(date +%s) ))
  if (( left < limit )); then
    echo "== $name: skipped (${left}s left, needs ${limit}s)" | tee -a "$OUT/gpu-steps.log"
    return 0
  fi
  echo "== $name (limit ${limit}s, ${left}s left)" | tee -a "$OUT/gpu-steps.log"
  local t0=$(date +%s)
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/gpu-steps.log"
}

python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (PyAV for the training step)
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python - <<'EOF' | tee -a "$OUT/gpu.txt"
import subprocess, torch, triton
try:
    import cupy; cp = cupy.__version__
except Exception as e:  # noqa: BLE001 - reported, not fatal
    cp = f"unavailable ({e})"
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} cupy {cp} commit {commit or 'unknown'}")
EOF

# 1. The headline goal: 1080p (1088 rows for the port, which needs multiples of 64) fp16.
if [ -f "$PORT/interpolator.py" ]; then
  step "port fp16 torchscript 1088x1920" 150 python benchmarks/compare_port.py --port "$PORT" \
    --device cuda --size 1088x1920 --dtype fp16 --port-dtype fp16 --torchscript --iters 10 \
    --json "$OUT/compare-port-gpu-1080p-fp16.json"
else
  echo "== port comparison: skipped ($PORT/interpolator.py not found)" | tee -a "$OUT/gpu-steps.log"
fi

# 2. End to end, fp16, the auto backend next to the torch backend: fps, tensor-core fraction, peak memory.
step "bench fp16 auto" 120 film-fast bench --device cuda --dtype fp16 --backend auto \
  --sizes 1920x1080,3840x2160 --iters 10 --warmup 3 --json "$OUT/bench-gpu-fp16-auto.json"

# 2b. Optional: train the built-in model further on GPU-scale batches and crops (its goals are met
# on CPU since session 9; this is for a better model, not a required one).
TRAIN_S="${TRAIN_S:-0}"
TRAIN_OUT="${TRAIN_OUT:-runs/film_fast_default_gpu}"
if (( TRAIN_S > 0 )); then
  resume=""
  if ls "$TRAIN_OUT"/checkpoints/step_*.safetensors >/dev/null 2>&1; then resume="--resume"; fi
  minutes=$(python -c "print($TRAIN_S / 60)")
  # --max-time stops at a log step once the time is up; the extra 120 s cover start-up, the
  # last log interval and the export.
  step "train built-in model ${TRAIN_S}s" $(( TRAIN_S + 120 )) film-fast train \
    --config configs/film_fast_default_gpu.json --out "$TRAIN_OUT" $resume --max-time "$minutes" \
    2>&1 | tr '\r' '\n' | tail -40 | tee "$OUT/train-gpu.log"
  mkdir -p "$OUT/train-gpu"
  cp "$TRAIN_OUT/model.safetensors" "$TRAIN_OUT/metrics.csv" "$TRAIN_OUT/config.json" \
    "$OUT/train-gpu/" 2>/dev/null
  last=$(ls "$TRAIN_OUT"/checkpoints/step_*.safetensors 2>/dev/null | tail -1)
  [ -n "$last" ] && cp "$last" "$OUT/train-gpu/"
fi

# 3. Correctness on the GPU: kernel parity (triton + cupy) and model golden parity.
step "gpu tests" 180 python -m pytest -q -x tests/test_cupy_kernels.py tests/test_triton_kernels.py \
  tests/test_backend_model_gpu.py tests/test_triton_model.py tests/test_golden_parity.py \
  tests/test_memory_plan.py tests/test_transfer.py tests/test_cuda_graphs.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -30

# 3a. Peak memory: the dry-run prediction (film-fast bench --memory-plan, exact on the CPU) against
# torch.cuda.max_memory_allocated of a fresh model's first call, 1080p and 4K fp16 (the 24 GB goal).
step "memory check fp16 triton" 60 python benchmarks/memory_check.py --device cuda \
  --sizes 1920x1080,3840x2160 --dtype fp16 --backend triton --json "$OUT/memory-check-gpu-fp16-triton.json"

# 3b. Accuracy of fp16 and bf16 against fp32 with the built-in model on the repo's triplets, and
# the kernels' error against plain PyTorch's in the same dtype (the project's 2x standard).
step "dtype accuracy" 90 python benchmarks/dtype_accuracy.py --device cuda \
  --json "$OUT/dtype-accuracy-builtin-gpu.json"

# 4. Per-op kernel table, fp16 at 1080p, forward.
step "kernels fp16 1080p" 90 film-fast bench --kernels --device cuda --dtype fp16 --resolutions 1080p \
  --json "$OUT/kernels-gpu-fp16-fwd.json"

# 4a. The streaming engine with overlapped transfers (pinned uint8 uploads, delayed delivery)
# against the blocking copies, interleaved: output frames/s at 1080p fp16.
step "stream overlap fp16 1080p" 90 python benchmarks/stream_overlap.py --device cuda \
  --size 1920x1080 --dtype fp16 --frames 10 --rounds 3 --cuda-graphs \
  --json "$OUT/stream-overlap-gpu-fp16.json"

# 5. The rest while time remains.
for spec in "bf16 auto" "fp32 auto" "fp16 triton" "fp16 cupy"; do
  set -- $spec
  step "bench $1 $2" 90 film-fast bench --device cuda --dtype "$1" --backend "$2" \
    --sizes 1920x1080 --iters 10 --warmup 3 --json "$OUT/bench-gpu-$1-$2.json"
done
step "memory check fp16 torch" 60 python benchmarks/memory_check.py --device cuda \
  --sizes 1920x1080,3840x2160 --dtype fp16 --backend torch --json "$OUT/memory-check-gpu-fp16-torch.json"
step "kernels fp16 1080p backward" 90 film-fast bench --kernels --device cuda --dtype fp16 \
  --resolutions 1080p --backward --json "$OUT/kernels-gpu-fp16-bwd.json"
echo "== done, $(( END - $(date +%s) ))s of the budget left" | tee -a "$OUT/gpu-steps.log"
