"""Hand-written Triton, CuPy and CPU (C) kernels for FILM's hot paths (installed as ``film_fast.kernels``).

One file per op per backend (``triton/warp.py``, ``cupy/warp.py`` + ``.cu``), each
registered with :mod:`film_fast.ops.dispatch` when its package is imported (on first use
of the backend) and tested against :mod:`film_fast.ops.reference`, forward and backward.

* ``triton/``: every op (warp, flow upsampling, fused flow upsampling + warp, convolutions
  one level or all levels per launch, conv + pool, upsample + 2x2 conv, pooling), on CUDA
  tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (how CI runs them).
* ``cupy/``: CUDA C sources (``.cu``) for the warps, flow upsampling, pooling, the
  upsample + 2x2 conv and the conv epilogues (cuDNN does the GEMM), compiled with NVRTC at
  first use; CI compiles every source without a GPU.
* ``cpu/``: C for the CPU's Winograd transforms (``film_fast.ops.winograd``), compiled with
  the machine's C compiler at first use and cached; without a compiler the PyTorch-op
  transforms run instead. CI builds and tests it (gcc).
"""
