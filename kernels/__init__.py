"""Hand-written Triton and CuPy kernels for FILM's hot paths (installed as ``film_fast.kernels``).

One file per op per backend (``triton/warp.py``, ``cupy/warp.py`` + ``.cu``), each
registered with :mod:`film_fast.ops.dispatch` and tested against
:mod:`film_fast.ops.reference`. None ship yet: every op currently runs on the
torch reference backend.
Triton: ``triton/`` now implements all eight ops (CUDA; CPU tensors only under TRITON_INTERPRET=1).
"""
