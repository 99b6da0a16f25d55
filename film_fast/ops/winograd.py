"""Winograd F(2x2, 3x3) and F(4x4, 3x3) for FILM's wide 3x3 convolutions on the CPU.

A 3x3 'same' conv computes each m x m output tile from an (m + 2) x (m + 2) input tile.
Winograd's minimal filtering algorithm (Lavin & Gray, 2016) writes it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, per channel pair)

with ``d`` the input tile, ``g`` the 3x3 kernel and constant matrices ``B^T``, ``G``, ``A^T``
(below; interpolation points 0, +-1 for m = 2 and 0, +-1, +-2 for m = 4). Summed over input
channels, the ``(m + 2)^2`` elementwise products become that many independent GEMMs
``M[k] = V[k] @ U[k]`` (``[tiles, Cin] @ [Cin, Cout]``): per output pixel 4 multiplies
(m = 2) or 2.25 (m = 4) instead of the direct conv's 9, i.e. 2.25x or 4x fewer FLOPs. The
transforms are small linear combinations that cost memory traffic in proportion to the
channel counts. Two implementations:

* C (``kernels/cpu/winograd_transforms.c``, built on first use with the machine's C compiler,
  see :mod:`film_fast.kernels.cpu`): one pass over the data per transform, vectorised over the
  NHWC channels, bias and LeakyReLU fused into the output transform, OpenMP threads shared
  with PyTorch's pool. The 36 GEMMs then dominate, and F(4x4) beats oneDNN's direct conv for
  every FILM conv with 64+ channels on both sides (see :func:`tile_size`). The published
  model at 512x512 fp32 runs 1.18x faster end to end than with the PyTorch-op transforms
  (3.74 s vs 4.40 s per frame, medians of 4 interleaved runs; 2-core AMD EPYC).
* PyTorch ops (no compiler, or ``FILM_FAST_NATIVE=0``): separably (rows, then columns), a
  few dozen elementwise ops on strided NHWC views. The saving then wins only where the GEMMs
  dominate: wide layers. Measured on the 2-core AMD EPYC (Zen 3) development machine against
  oneDNN's direct fp32 conv (165-185 GFLOP/s), ``reuse`` malloc policy, F(4x4, 3x3):
  2442->512 at 64x64 3.2x faster, 1920->256 at 64x64 (batch 2) 2.7x, 1162->256 at 128x128
  2.6x, 512->512 at 64x64 2.7x, 256->256 at 128x128 2.1x, 896->128 at 128x128 1.6x, 522->128
  at 256x256 1.1-1.5x, 128->128 at 256x256 1.4x; but 384->64 0.85x and 202->64 at 512x512
  0.7x. F(2x2, 3x3) wins over F(4x4, 3x3) only below 32x32.

Accuracy (fp32, max error over the output's largest magnitude, against a float64 conv):
oneDNN's direct conv 1e-6..4e-6, F(2x2, 3x3) 5e-7, F(4x4, 3x3) 7e-6..1e-5 (its G has
1/6, 1/12, 1/24 and its B, A entries up to 8, which amplify rounding). CPU, float32,
inference only (:func:`eligible`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .eager import plain_eager
from .weight_cache import DerivedWeights

LEAKY_SLOPE = 0.2
# Temporaries of one band of tile rows (see conv3x3). Every band streams the whole transformed
# weight U through its 36 GEMMs again, so wide-weight convs want few bands; otherwise smaller
# bands cost little and hold less memory. Measured on the 2-core AMD EPYC, one conv, ms, band
# budget 256 / 64 / 32 MiB: with film_fast's malloc policy (cpu_memory "reuse") 522->128 at
# 256x256 236 / 223 / 244, 128->128 at 256x256 78 / 76 / 87, 2442->512 at 64x64 162 / 160 /
# 160; with glibc's defaults (FILM_FAST_CPU_MALLOC=system: each band's temporaries are fresh
# mmaps, i.e. page faults) 489 / 233 / 244 and 206 / 77 / 77. Hence BAND_BYTES, raised to twice
# U's size for wide-weight convs, up to MAX_BAND_BYTES (which bounds memory: a 4K level-1
# fusion conv, 522->128 at 1920x1080, needs ~16 GB of temporaries in one band).
BAND_BYTES = 64 * 2 ** 20
MAX_BAND_BYTES = 256 * 2 ** 20
# With the C transforms a band's only temporaries are its tiles V and products M, and smaller
# bands keep both in the L3 cache between the transform that writes them and the GEMMs that read
# them. Native F(4x4) conv, ms, band of 1 / 2 / 4 / 8 tile rows (V + M 8 / 16 / 32 / 63 MB),
# same AMD EPYC (32 MiB L3): 384->64 at 256x256 b2 183 / 206 / 229 / 224; 202->64 at 512x512
# 225 / 235 / 258 / 263; 522->128 at 256x256 (U 9.6 MB, re-read per band) 227 / 221 / 218 / 208.
NATIVE_BAND_BYTES = 8 * 2 ** 20

# (B^T, G, A^T) per output tile size m
_MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}

_WEIGHTS = DerivedWeights()  # U [(m+2)^2, Cin, Cout] per (weight, m)


def tile_size(cin: int, cout: int, height: int, width: int,
              native: Optional[bool] = None) -> Optional[int]:
    """The Winograd output tile (4 or 2) that beats oneDNN's direct conv for this shape, or
    None. Measured per FILM conv shape (published model at 256x256 and 512x512, built-in
    model at 1024x768, `benchmarks/winograd_sweep.py`, 2-core AMD EPYC).

    With the C transforms (``native``; default: whether :func:`native_library` loads),
    F(4x4) wins for every conv with 64 or more channels on both sides down to 12 px: 202->64
    at 512x512 1.64x, 384->64 at 256x256 (batch 2) 1.45x, 224->64 at 192x256 1.81x, 64->64 at
    512x512 1.36x, 1162->256 at 128x128 2.75x, 2442->512 at 64x64 3.35x, 1920->256 at 16x16
    2.36x; below that F(2x2) (1920->256 at 4x4: 2.12x, F(4x4) 0.92x). Into 32 or 16 channels
    the GEMMs are too thin to pay for the transforms (128->32 at 512x512 0.91x, 32->32 0.57x).

    With the PyTorch-op transforms (each a few dozen elementwise passes): F(4x4) needs
    channels for its 36 GEMMs to amortise them; below 32x32 F(2x2)'s fewer, cheaper transforms
    win (1920->256 at 16x16: F(2x2) 1.47x, F(4x4) 1.32x; at 4x4: 1.39x and 0.59x); convs into
    64 channels (384->64, 202->64, ...) stay direct (0.7-1.2x)."""
    if native is None:
        native = native_library() is not None
    if native:
        if cin < 64 or cout < 64 or height < 2 or width < 2:
            return None
        return 4 if min(height, width) >= 12 else 2
    if cin < 128 or cout < 128:
        return None
    pixels = height * width
    if cin >= 256 and cout >= 256:
        if pixels >= 32 * 32:
            return 4
        return 2 if height >= 2 and width >= 2 else None
    return 4 if pixels >= 48 * 64 else None


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """CPU fp32 inference of a wide 3x3 conv, outside tracing."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3) or x.dim() != 4:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if tile_size(weight.shape[1], weight.shape[0], x.shape[2], x.shape[3]) is None:
        return False
    if not plain_eager(x, weight, bias):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def transformed_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``U[k] = (G g G^T)[i, j]`` for ``k = (m + 2) i + j``: ``[(m + 2)^2, Cin, Cout]``,
    computed in float64 and cached per weight tensor, version and tile size (transforming a
    2442 x 512 kernel takes ~0.1 s; shared weights run F(4x4) at fine levels, F(2x2) at
    coarse ones)."""
    return _WEIGHTS.get(weight, m, lambda w: _transform_weight(w, m))


def _transform_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    g = torch.tensor(_MATRICES[m][1], dtype=torch.float64)
    u = g @ weight.double() @ g.T  # [Cout, Cin, m + 2, m + 2]
    t = m + 2
    u = u.permute(2, 3, 1, 0).reshape(t * t, weight.shape[1], weight.shape[0])
    return u.to(torch.float32).contiguous()


def _combine(terms: Sequence[torch.Tensor], coefs: Sequence[float], out: torch.Tensor) -> None:
    """``out = sum_k coefs[k] * terms[k]`` over the nonzero coefficients, in as few ops as the
    coefficients allow (a +-1 pair is one add or sub)."""
    nz = [(float(c), t) for c, t in zip(coefs, terms) if c != 0]
    nz.sort(key=lambda ct: ct[0] != 1)  # a unit coefficient first saves the scaling pass
    (c0, t0), rest = nz[0], nz[1:]
    if not rest:
        torch.mul(t0, c0, out=out)
        return
    (c1, t1), rest = rest[0], rest[1:]
    if c0 == 1:
        torch.add(t0, t1, alpha=c1, out=out)
    elif c1 == 1:
        torch.add(t1, t0, alpha=c0, out=out)
    else:
        torch.mul(t0, c0, out=out).add_(t1, alpha=c1)
    for c, t in rest:
        out.add_(t, alpha=c)


def _input_transform(x: torch.Tensor, m: int, ty0: int, ty1: int, tiles_x: int) -> torch.Tensor:
    """``B^T d B`` of the input tiles in tile rows ``[ty0, ty1)``:
    ``[(m + 2)^2, B * (ty1 - ty0) * tiles_x, Cin]``."""
    b, c, h, w = x.shape
    t = m + 2
    bt: List[List[float]] = _MATRICES[m][0]
    n = ty1 - ty0
    # The band's input rows m ty0 - 1 ... m ty1 (zero 'same' padding of 1 px outside the image,
    # and zeros where the size is rounded up to whole tiles at the bottom/right)
    xp = x.new_zeros(b, m * n + 2, m * tiles_x + 2, c)
    top = m * ty0 - 1
    lo, hi = max(top, 0), min(m * ty1 + 1, h)
    xp[:, lo - top:hi - top, 1:w + 1].copy_(x[:, :, lo:hi].permute(0, 2, 3, 1))
    rows = [xp[:, k:k + m * n:m] for k in range(t)]  # tile rows m ty + k: [B, n, Wp, C]
    r = x.new_empty(t, b, n, xp.shape[2], c)
    for i in range(t):
        _combine(rows, bt[i], r[i])
    v = x.new_empty(t, t, b, n, tiles_x, c)
    for i in range(t):
        cols = [r[i][:, :, k:k + m * tiles_x:m] for k in range(t)]  # tile columns m tx + k
        for j in range(t):
            _combine(cols, bt[j], v[i, j])
    return v.view(t * t, b * n * tiles_x, c)


def _band_rows(m: int, batch: int, tiles_y: int, tiles_x: int, cin: int, cout: int) -> int:
    """Tile rows per band so that a band's temporaries stay within :func:`band_budget`."""
    t = m + 2
    # per tile row: xp + r (~t m), v (t^2) per input channel; prod (t^2) + s (t m) per output one
    per_row = 4 * batch * tiles_x * (cin * (t * m + t * t) + cout * (t * t + t * m))
    return max(1, min(tiles_y, band_budget(m, cin, cout) // max(per_row, 1)))


def _native_band_rows(m: int, batch: int, tiles_y: int, tiles_x: int, cin: int,
                      cout: int) -> int:
    """Tile rows per band for the C transforms: V and M within :data:`NATIVE_BAND_BYTES`, or
    twice U's size for wide weights (each band re-reads U), at most :data:`MAX_BAND_BYTES`."""
    t = m + 2
    per_row = 4 * batch * tiles_x * t * t * (cin + cout)
    budget = min(max(NATIVE_BAND_BYTES, 2 * 4 * t * t * cin * cout), MAX_BAND_BYTES)
    return max(1, min(tiles_y, budget // max(per_row, 1)))


def band_budget(m: int, cin: int, cout: int) -> int:
    """Bytes of temporaries per band: :data:`BAND_BYTES`, or twice the transformed weight's
    size ``4 (m + 2)^2 Cin Cout`` where that is larger (each band re-reads the weight: this
    keeps that re-read under half the band's own traffic), at most :data:`MAX_BAND_BYTES`."""
    u_bytes = 4 * (m + 2) ** 2 * cin * cout
    return min(max(BAND_BYTES, 2 * u_bytes), MAX_BAND_BYTES)


def native_library():
    """The compiled C transforms (:mod:`film_fast.kernels.cpu`), or None where no C compiler
    is available or ``FILM_FAST_NATIVE=0``: then the transforms run as PyTorch ops."""
    cpu = cpu_kernels()
    return cpu.library() if cpu is not None else None


_CPU_KERNELS: List = []  # the resolved module (or None), found once per process


def cpu_kernels():
    """:mod:`film_fast.kernels.cpu`, also when film_fast is imported from a checkout that is
    not installed (``PYTHONPATH=<checkout>``, as the torchrun and subprocess tests do): the
    top-level ``kernels/`` folder becomes ``film_fast.kernels`` only when installed, so then
    ``kernels/cpu`` is loaded from the checkout. None if neither exists. Resolved once: it
    is asked for several times per conv, and a failing import costs ~25 us each time."""
    if not _CPU_KERNELS:
        _CPU_KERNELS.append(_find_cpu_kernels())
    return _CPU_KERNELS[0]


def _find_cpu_kernels():
    try:
        from ..kernels import cpu
        return cpu
    except ImportError:
        pass
    name = "film_fast.kernels.cpu"
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "kernels", "cpu")
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        return None
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _conv3x3_native(lib, x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor],
                    leaky: bool, m: int) -> torch.Tensor:
    """conv3x3 with the C transforms: ``[B, H, W, Cout]`` (NHWC, dense)."""
    b, cin, h, w = x.shape
    cout = u.shape[2]
    t = m + 2
    ty, tx = -(-h // m), -(-w // m)
    xh = x.permute(0, 2, 3, 1)
    if xh.stride(3) != 1:
        xh = xh.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = x.new_empty(b, h, w, cout)
    sb, sh, sw = xh.stride(0), xh.stride(1), xh.stride(2)
    ob, oh, ow = out.stride(0), out.stride(1), out.stride(2)
    band = _native_band_rows(m, b, ty, tx, cin, cout)
    bias_ptr = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    for ty0 in range(0, ty, band):
        ty1 = min(ty0 + band, ty)
        tiles = b * (ty1 - ty0) * tx
        v = x.new_empty(t * t, tiles, cin)
        lib.film_wino_input(xh.data_ptr(), b, h, w, cin, sb, sh, sw, m, ty0, ty1, tx,
                            v.data_ptr(), 0, tiles, threads)
        prod = torch.bmm(v, u)
        del v
        lib.film_wino_output(prod.data_ptr(), b, h, w, cout, m, ty0, ty1, tx, bias_ptr,
                             int(leaky), LEAKY_SLOPE, out.data_ptr(), ob, oh, ow, 0, tiles,
                             threads)
        del prod
    return out


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            activation: Optional[str] = None, m: Optional[int] = None,
            native: Optional[bool] = None) -> torch.Tensor:
    """Stride-1 'same' 3x3 conv + bias + optional LeakyReLU(0.2), as
    :func:`film_fast.ops.reference.conv2d`, by F(m x m, 3x3) (``m`` = 2 or 4; default:
    :func:`tile_size`'s choice, else 4).

    The transforms expand the data (F(4x4): the tiles hold 2.25x the input, the products
    2.25x the output), so large convs run in horizontal bands of tile rows whose temporaries
    stay within :func:`band_budget` (a 4K level-1 fusion conv, 522->128 at 1920x1080, would
    otherwise need ~16 GB of them; smaller bands also keep the transforms in cache).

    The transforms run as C (:func:`native_library`, one pass over the data each, bias and
    LeakyReLU fused into the output transform) where a C compiler is available, else as
    PyTorch ops; ``native`` forces one (True raises without the library).

    Args:
        x: ``[B, Cin, H, W]`` float32, any strides (NHWC reads fastest).
        weight: ``[Cout, Cin, 3, 3]``; bias: ``[Cout]`` or None.
    Returns:
        ``[B, Cout, H, W]`` channels_last (dense).
    """
    if activation not in (None, "leaky_relu"):
        raise ValueError(f"unknown activation {activation!r}; expected None or 'leaky_relu'")
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    if m is None:
        m = tile_size(cin, cout, h, w) or 4
    u = transformed_weight(weight, m)
    lib = native_library() if native in (None, True) else None
    if native and lib is None:
        cpu = cpu_kernels()
        why = cpu.unavailable_reason() if cpu is not None else "film_fast.kernels is missing"
        raise RuntimeError(f"the native Winograd transforms are unavailable: {why}")
    if lib is not None:
        return _conv3x3_native(lib, x, u, bias, activation == "leaky_relu",
                               m).permute(0, 3, 1, 2)
    ty, tx = -(-h // m), -(-w // m)
    full = x.new_empty(b, m * ty, m * tx, cout)
    band = _band_rows(m, b, ty, tx, cin, cout)
    for ty0 in range(0, ty, band):
        ty1 = min(ty0 + band, ty)
        _band(x, u, bias, m, ty0, ty1, tx, full[:, m * ty0:m * ty1])
    if activation == "leaky_relu":
        F.leaky_relu_(full, LEAKY_SLOPE)
    if (m * ty, m * tx) != (h, w):
        full = full[:, :h, :w].contiguous()
    return full.permute(0, 3, 1, 2)


def _band(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor], m: int, ty0: int,
          ty1: int, tiles_x: int, out: torch.Tensor) -> None:
    """Output tile rows ``[ty0, ty1)`` into ``out [B, m (ty1 - ty0), m tiles_x, Cout]``."""
    b, n, cout = x.shape[0], ty1 - ty0, u.shape[2]
    t = m + 2
    at: List[List[float]] = _MATRICES[m][2]
    prod = torch.bmm(_input_transform(x, m, ty0, ty1, tiles_x), u).view(t, t, b, n, tiles_x, cout)
    if bias is not None:
        # Column 1 of A^T is all ones (both m), so A^T E A with E = the bias at (1, 1) adds it
        # to every output pixel of the tile: a pass over 1/m^2 of the output instead of all
        prod[1, 1] += bias
    # A^T M A separably: rows (i -> a), then columns (j -> p)
    s = prod.new_empty(m, t, b, n, tiles_x, cout)
    rows = [prod[i] for i in range(t)]
    for a in range(m):
        _combine(rows, at[a], s[a])
    o = out.view(b, n, m, tiles_x, m, cout)
    for a in range(m):
        cols = [s[a, j] for j in range(t)]
        for p in range(m):
            _combine(cols, at[p], o[:, :, a, :, p])
