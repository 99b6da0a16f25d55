"""Stride-1 TF-'same' convolution (+ bias, + LeakyReLU(0.2)) as implicit GEMM in Triton.

``y[b, co, oy, ox] = act(bias[co] + sum_{ci, ty, tx} w[co, ci, ty, tx] *
x[b, ci, oy + ty - PAD_T, ox + tx - PAD_L])`` with TF 'same' padding:
``PAD_T = (kh - 1) // 2``, ``PAD_L = (kw - 1) // 2`` (odd kernels symmetric; a
2x2 kernel pads one row at the bottom / one column at the right), zeros
outside the image.

GEMM view (forward): ``M = B * H * W`` output pixels, ``N = Cout``, ``K = Cin *
kh * kw``. A program computes a ``[BLOCK_M pixels, BLOCK_N out-channels]`` tile
with ONE flat, software-pipelined K loop over ``(tap, Cin chunk)`` pairs (tap
and chunk decoded from the loop index; unrolling the taps into separate loops
spilled registers on sm_90): the A tile is the tap-shifted input (``[BLOCK_M,
BLOCK_K]``, masked to zero outside the image = the padding), the B tile the
tap's ``[BLOCK_K, BLOCK_N]`` weight slice, multiplied with ``tl.dot`` (tensor
cores for fp16/bf16; ``input_precision="ieee"`` for fp32 so fp32 results stay
at rounding level, no TF32). Accumulation in fp32, then the bias / activation
epilogue and one rounding to the output dtype. Tile sizes: :func:`conv_config`.

Layouts: every activation tensor is addressed through its strides, so NCHW,
NHWC (channels_last, FILM's layout: the A tile's K axis is then contiguous,
vector loads per pixel row) and channel slices all work without copies.
Outputs follow the input's layout family. Weights are re-packed per call to
``[kh, kw, K, N]`` (a few hundred KiB at most) so that B tiles coalesce.

The same forward kernel serves four ops through ``constexpr`` switches:

* ``conv2d``: plain;
* ``conv2d_levels`` (``NUM_LEVELS > 0``): the M tiles of several pyramid levels
  form one grid; a small int64 descriptor table ``[levels, 16]`` holds each
  level's first tile, sizes, data addresses (cast back to pointers in the
  kernel) and strides;
* ``conv2d_pool`` (``POOL``): M is enumerated in 2x2 quads (``m = 4 * quad +
  sub``) so every tile holds whole quads and the average pool is computed in
  registers by a reshape + sum of the rounded outputs;
* ``upsample_conv2x2`` (``UPSAMPLE``): the A loader maps each tap's position in
  the (virtual) resized image to its nearest-exact source pixel, so the
  upsampled tensor is never materialised.

Backward (``TritonConv2dFunction``): the activation derivative (from the sign
of the saved output: LeakyReLU(0.2) keeps signs) is applied to grad_output
inside the loaders of both backward kernels;

* ``_conv2d_bwd_input_kernel``: implicit GEMM over input pixels, ``N = Cin``,
  ``K = Cout * taps`` (one flat loop again), reading grad_output at ``(iy + PAD_T - ty, ix + PAD_L -
  tx)`` (flipped taps, transposed weights; the asymmetric 2x2 padding is the
  same formula); with ``UPSAMPLE`` it also sums over the fine pixels that read
  each coarse pixel (the adjoint of the nearest resize, fused);
* ``_conv2d_bwd_weight_kernel``: ``[Cout, Cin]`` tiles per tap with ``K = B * H
  * W`` pixels, split-K over pixel ranges into an fp32 partial buffer that the
  host sums (deterministic, no atomics); the bias gradient comes from the same
  pass.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from . import utils

# int64 fields per level in the conv2d_levels descriptor table (see _level_table); a constexpr
# because jitted code may only read constexpr globals.
DESC_FIELDS = tl.constexpr(16)


class ConvConfig(NamedTuple):
    """Tile sizes of the three conv kernels (saved on ctx: the backward reuses them)."""
    fwd: Tuple[int, int, int, int]        # BLOCK_M, BLOCK_N (Cout), BLOCK_K (Cin), num_warps
    bwd_input: Tuple[int, int, int, int]  # BLOCK_M, BLOCK_N (Cin), BLOCK_K (Cout), num_warps
    bwd_weight: Tuple[int, int, int, int]  # BLOCK_CO, BLOCK_CI, BLOCK_P, num_warps
    num_stages: int


def conv_config(cin: int, cout: int, dtype: torch.dtype, x_aligned: bool = True,
                y_aligned: bool = True) -> ConvConfig:
    """Heuristic tiles; no autotuning (it would multiply interpreter test time, and FILM has
    few distinct channel counts).

    Chosen from sm_90 register / spill reports (ptxas via an offline AOT compile, no GPU
    here). When a tile's channel axis is a multiple of 16 (and the tensor 16-byte aligned,
    NHWC), Triton proves the rows aligned and uses vector loads + cp.async pipelining:
    128-pixel tiles with 8 warps, fp16/bf16 K chunks of 64 and up to 128 output channels.
    Otherwise every element needs its own 64-bit address and predicate and big tiles spill,
    so misaligned operands get 64 x 32 x 32 tiles (K chunks of 16 for grad-input), 4 warps,
    2 stages. 16 is tl.dot's
    minimum tile edge; fp32/fp64 (IEEE dot on FMA units) use K chunks of 32.

    ``y_aligned=False``: the forward stores into a misaligned destination (``out=``, a channel
    slice that does not start 16 bytes in; FILM's 16-bit buffers put every conv output first
    and pad to 16 channels so that this does not happen, see ``film_fast.buffers``; fp32
    level buffers, unpadded, still hit it). The epilogue's stores then lose their
    vectors and the 128 x 64 tiles spill even with aligned inputs (sm_90, fp16 3x3
    ``conv2d_levels``: 255 registers + 72 bytes of stack, against 112 and none into an
    aligned output; every bigger tile tried spilled too), so the forward takes the
    misaligned tiles; the backward tiles do not change (they read a fresh gradient).
    """
    wide = dtype in (torch.float16, torch.bfloat16)
    kmax = 64 if wide else 32
    in_ok = x_aligned and cin % 16 == 0      # A operand of the forward: input channels
    out_ok = cout % 16 == 0                  # A operand of grad-input: grad_output channels
    if in_ok and out_ok and y_aligned:  # (the epilogue's stores: vectors need aligned outputs)
        fwd = (128, utils.clamp_pow2(cout, 16, 128 if wide else 64),
               utils.clamp_pow2(cin, 16, kmax), 8)
    else:
        fwd = (64, utils.clamp_pow2(cout, 16, 32), utils.clamp_pow2(cin, 16, 32), 4)
    if out_ok:
        bwd_input = (128, utils.clamp_pow2(cin, 16, 64), utils.clamp_pow2(cout, 16, kmax), 8)
    else:
        bwd_input = (64, utils.clamp_pow2(cin, 16, 32), 16, 4)
    if in_ok and out_ok:
        bwd_weight = (utils.clamp_pow2(cout, 16, 64), utils.clamp_pow2(cin, 16, 64),
                      128 if wide else 32, 8)
    else:
        bwd_weight = (utils.clamp_pow2(cout, 16, 32), utils.clamp_pow2(cin, 16, 32), 32, 4)
    stages = 3 if (wide and in_ok and out_ok) else 2
    return ConvConfig(fwd, bwd_input, bwd_weight, stages)


def nhwc16_aligned(t: torch.Tensor) -> bool:
    """NHWC-strided (channel stride 1), 16-byte aligned, other strides multiples of 16."""
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and all(s % 16 == 0 for s in (t.stride(0), t.stride(2), t.stride(3))))


def config_for(x: torch.Tensor, weight: torch.Tensor,
               out: Optional[torch.Tensor] = None) -> ConvConfig:
    """:func:`conv_config` for an actual input (its layout and address decide vector alignment)
    and destination (``out``, default a new aligned tensor)."""
    return conv_config(x.shape[1], weight.shape[0], x.dtype, x_aligned=nhwc16_aligned(x),
                       y_aligned=out is None or nhwc16_aligned(out))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 (and fp64) dots in full IEEE precision; 16-bit dots take the default (tensor cores).

    "upcast" (bf16 under the interpreter only): Triton's interpreter stores bf16 as uint16 and
    its tl.dot multiplies those integers, so bf16 tiles are widened to fp32 first. That is
    numerically the tensor-core bf16 dot: bf16 products are exact in fp32, accumulated in fp32.
    """
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    if dtype == torch.bfloat16 and utils.interpreting():
        return "upcast"
    return "tf32"


def check_activation(activation: Optional[str]) -> bool:
    if activation is None:
        return False
    if activation == "leaky_relu":
        return True
    raise ValueError(f"unknown activation {activation!r}; expected None or 'leaky_relu'")


def same_padding(kh: int, kw: int) -> Tuple[int, int]:
    """TF 'same' (top, left) padding for stride 1; the remainder goes bottom / right."""
    return (kh - 1) // 2, (kw - 1) // 2


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_pixels(pid_m, B, H, W, POOL: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(b, oy, ox, valid)`` int64 vectors of the ``BLOCK_M`` output pixels of tile ``pid_m``.

    Row-major over ``(b, y, x)``; with ``POOL`` over ``(b, quad_y, quad_x, sub)`` so that
    the four pixels of every 2x2 quad are consecutive rows of the tile.
    """
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    if POOL:
        qw = (W + 1) // 2
        qh = (H + 1) // 2
        q = m // 4
        sub = m % 4
        qx = q % qw
        t = q // qw
        qy = t % qh
        b = t // qh
        oy = 2 * qy + sub // 2
        ox = 2 * qx + sub % 2
    else:
        ox = m % W
        t = m // W
        oy = t % H
        b = t // H
    return b, oy, ox, (b < B) & (oy < H) & (ox < W)


@triton.jit
def _nearest_source(pos, scale, size):
    """torch's ``nearest-exact`` source index: ``min(floor((pos + 0.5) * scale), size - 1)``."""
    src = tl.floor((pos.to(tl.float32) + 0.5) * scale).to(tl.int64)
    return tl.maximum(tl.minimum(src, size - 1), 0)


@triton.jit
def _leaky_grad(g_ptr, y_ptr, goff, yoff, mask, ACT: tl.constexpr, ACC: tl.constexpr):
    """grad_output times the activation derivative, as ACC: 1 where y > 0 else 0.2.

    The derivative comes from the sign of the saved *output*: LeakyReLU with a
    positive slope preserves signs, and y == 0 <=> pre-activation == 0, where
    torch also takes the 0.2 branch.
    """
    g = tl.load(g_ptr + goff, mask=mask, other=0.0).to(ACC)
    if ACT:
        # (compared in ACC: the interpreter keeps bf16 as raw uint16 bits)
        yv = tl.load(y_ptr + yoff, mask=mask, other=0.0).to(ACC)
        g = tl.where(yv > 0, g, g * 0.2)
    return g


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """``acc + a @ b`` (see :func:`dot_precision` for the precision modes)."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv2d_fwd_kernel(
    x_ptr,                             # *T  input [B, CIN, IH, IW] (level 0's when NUM_LEVELS > 0)
    w_ptr,                             # *T  weight [COUT, CIN, KH, KW] (strides; packed N-major)
    bias_ptr,                          # *B  bias [COUT] (read only if HAS_BIAS)
    y_ptr,                             # *T  output [B, COUT, H, W] (level 0's when NUM_LEVELS > 0)
    pool_ptr,                          # *T  pooled output [B, COUT, H//2, W//2] (only if POOL)
    desc_ptr,                          # *i64 level descriptors [NUM_LEVELS, DESC_FIELDS]
    B, CIN, COUT, H, W,                # batch, channels, output (= conv input grid) size
    IH, IW,                            # stored input size (!= H, W only with UPSAMPLE)
    scale_h, scale_w,                  # fp32 IH / H, IW / W for the nearest-exact map (UPSAMPLE)
    s_xb, s_xc, s_xh, s_xw,            # input strides
    s_wo, s_wi, s_wh, s_ww,            # weight strides
    s_yb, s_yc, s_yh, s_yw,            # output strides
    s_pb, s_pc, s_ph, s_pw,            # pooled output strides
    KH: tl.constexpr, KW: tl.constexpr,          # kernel size
    PAD_T: tl.constexpr, PAD_L: tl.constexpr,    # TF 'same' top / left padding
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,   # epilogue: + bias, LeakyReLU(0.2)
    UPSAMPLE: tl.constexpr,            # input is read through a nearest-exact resize to (H, W)
    POOL: tl.constexpr,                # also write the 2x2 average pool of the output
    NUM_LEVELS: tl.constexpr,          # 0: one tensor from the arguments; else descriptor table
    LEVELS_X_NHWC16: tl.constexpr,     # every level's input NHWC, 16-aligned address / strides
    LEVELS_Y_NHWC16: tl.constexpr,     # the same for every level's output
    LEVELS_Y_C1: tl.constexpr,         # every level's output has channel stride 1 (NHWC slices)
    DTYPE: tl.constexpr,               # element type of x / y (descriptor pointer casts)
    DOT_PRECISION: tl.constexpr,       # "ieee" (fp32/fp64), "tf32" (16-bit: ignored), "upcast"
    ACC: tl.constexpr,                 # accumulator dtype
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(M tiles [summed over levels], cdiv(COUT, BLOCK_N))``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    if NUM_LEVELS > 0:
        # Level of this tile = number of later levels whose first tile is <= pid_m. The level's
        # sizes, addresses and strides then come from its descriptor row (fresh names: the
        # scalar arguments of the same meaning are placeholders in this mode).
        lvl = pid_m * 0
        for l in tl.static_range(1, NUM_LEVELS):
            lvl += (pid_m >= tl.load(desc_ptr + l * DESC_FIELDS)).to(tl.int64)
        row = desc_ptr + lvl * DESC_FIELDS
        pid_m -= tl.load(row)
        nb = tl.load(row + 1)
        hh = tl.load(row + 2)
        ww = tl.load(row + 3)
        src_h = hh
        src_w = ww
        if LEVELS_X_NHWC16:
            # The host checked every level's input: NHWC (channel stride 1), 16-byte aligned
            # address, other strides multiples of 16. Values read from memory carry no such
            # facts, so they are restated; without them every A-tile element needs its own
            # address and predicate (no vector loads, register spills).
            xp = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(DTYPE)), 16)
            sxb = tl.multiple_of(tl.load(row + 5), 16)
            sxc = 1
            sxh = tl.multiple_of(tl.load(row + 7), 16)
            sxw = tl.multiple_of(tl.load(row + 8), 16)
        else:
            xp = tl.load(row + 4).to(tl.pointer_type(DTYPE))
            sxb = tl.load(row + 5)
            sxc = tl.load(row + 6)
            sxh = tl.load(row + 7)
            sxw = tl.load(row + 8)
        if LEVELS_Y_NHWC16:  # the same facts for the outputs (the epilogue's stores)
            yp = tl.multiple_of(tl.load(row + 9).to(tl.pointer_type(DTYPE)), 16)
            syb = tl.multiple_of(tl.load(row + 10), 16)
            syc = 1
            syh = tl.multiple_of(tl.load(row + 12), 16)
            syw = tl.multiple_of(tl.load(row + 13), 16)
        elif LEVELS_Y_C1:
            # NHWC channel slices of wider buffers (out=: FILM's level buffers), not 16-aligned:
            # a unit channel stride still gives one address per tile row instead of one per
            # element (a runtime stride made the 128x64 epilogue spill registers on sm_90).
            yp = tl.load(row + 9).to(tl.pointer_type(DTYPE))
            syb = tl.load(row + 10)
            syc = 1
            syh = tl.load(row + 12)
            syw = tl.load(row + 13)
        else:
            yp = tl.load(row + 9).to(tl.pointer_type(DTYPE))
            syb = tl.load(row + 10)
            syc = tl.load(row + 11)
            syh = tl.load(row + 12)
            syw = tl.load(row + 13)
    else:
        nb = B
        hh = H
        ww = W
        src_h = IH
        src_w = IW
        xp = x_ptr
        sxb = s_xb
        sxc = s_xc
        sxh = s_xh
        sxw = s_xw
        yp = y_ptr
        syb = s_yb
        syc = s_yc
        syh = s_yh
        syw = s_yw

    b, oy, ox, mvalid = _tile_pixels(pid_m, nb, hh, ww, POOL, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = n < COUT
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    xrow = b * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # One flat K loop over (tap, Cin chunk) rather than unrolled per-tap loops: a single
    # software-pipelined loop keeps one set of tile pointers / stages live (the unrolled form
    # spilled registers on sm_90).
    n_k = tl.cdiv(CIN, BLOCK_K)
    for kk in range(0, KH * KW * n_k):
        tap = kk // n_k
        ck = (kk - tap * n_k) * BLOCK_K + rk
        ty = tap // KW
        tx = tap - ty * KW
        iy = oy + (ty - PAD_T)
        ix = ox + (tx - PAD_L)
        valid = mvalid & (iy >= 0) & (iy < hh) & (ix >= 0) & (ix < ww)  # zero padding
        if UPSAMPLE:
            iy = _nearest_source(iy, scale_h, src_h)
            ix = _nearest_source(ix, scale_w, src_w)
        kmask = ck < CIN
        a = tl.load(xp + (xrow + iy * sxh + ix * sxw)[:, None] + (ck * sxc)[None, :],
                    mask=valid[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + ty * s_wh + tx * s_ww + (ck * s_wi)[:, None] + (n * s_wo)[None, :],
                     mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma(a, wt, acc, DOT_PRECISION, ACC)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(ACC)[None, :]
    if ACT:
        acc = tl.where(acc > 0, acc, acc * 0.2)
    out = acc.to(DTYPE)
    yofs = b * syb + oy * syh + ox * syw
    tl.store(yp + yofs[:, None] + (n * syc)[None, :], out,
             mask=mvalid[:, None] & nmask[None, :])
    if POOL:
        # Rows 4q..4q+3 of the tile are quad q: pool the *rounded* outputs, so the pooled
        # tensor equals avg_pool2x2(y) up to fp32 summation order.
        quads = tl.reshape(out.to(ACC), (BLOCK_M // 4, 4, BLOCK_N))
        pooled = tl.sum(quads, axis=1) * 0.25
        q = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4).to(tl.int64)
        qw = (ww + 1) // 2
        qh = (hh + 1) // 2
        qx = q % qw
        t = q // qw
        qy = t % qh
        qb = t // qh
        pvalid = (qb < nb) & (qy < hh // 2) & (qx < ww // 2)  # 'valid' pooling drops odd edges
        pofs = qb * s_pb + qy * s_ph + qx * s_pw
        tl.store(pool_ptr + pofs[:, None] + (n * s_pc)[None, :], pooled.to(DTYPE),
                 mask=pvalid[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: grad_input
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv2d_bwd_input_kernel(
    gy_ptr,                            # *T  grad of the output [B, COUT, H, W]
    y_ptr,                             # *T  saved output (activation derivative; only if ACT)
    w_ptr,                             # *T  weight [COUT, CIN, KH, KW] (strides; packed N-major)
    gx_ptr,                            # *T  grad of the input [B, CIN, IH, IW] (fully written)
    B, CIN, COUT, H, W,                # H, W: output grid (= conv-input grid)
    IH, IW,                            # stored input size (coarse size with UPSAMPLE)
    scale_h, scale_w,                  # fp32 IH / H, IW / W (nearest-exact map, UPSAMPLE)
    inv_h, inv_w,                      # H / IH, W / IW: start of each coarse pixel's fine window
    s_gb, s_gc, s_gh, s_gw,            # grad-output strides
    s_yb, s_yc, s_yh, s_yw,            # saved-output strides
    s_wo, s_wi, s_wh, s_ww,            # weight strides
    s_xb, s_xc, s_xh, s_xw,            # grad-input strides
    KH: tl.constexpr, KW: tl.constexpr, PAD_T: tl.constexpr, PAD_L: tl.constexpr,
    ACT: tl.constexpr, UPSAMPLE: tl.constexpr,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr,  # fine rows / cols per coarse pixel (UPSAMPLE)
    DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(B*IH*IW, BLOCK_M), cdiv(CIN, BLOCK_N))``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    b, cy, cx, mvalid = _tile_pixels(pid_m, B, IH, IW, False, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cimask = ci < CIN
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if UPSAMPLE:
        # Adjoint of the nearest resize: coarse (cy, cx) collects the gradient of every fine
        # pixel that copied it. Fine rows reading cy form a run starting near cy * H/IH - 0.5;
        # the estimate is corrected by one row if needed and membership re-checked exactly.
        fy0 = (-tl.floor(0.5 - cy.to(tl.float32) * inv_h)).to(tl.int64)  # ceil(cy*inv - 0.5)
        fy0 = tl.where((fy0 >= 1) & (_nearest_source(fy0 - 1, scale_h, IH) == cy), fy0 - 1, fy0)
        fx0 = (-tl.floor(0.5 - cx.to(tl.float32) * inv_w)).to(tl.int64)
        fx0 = tl.where((fx0 >= 1) & (_nearest_source(fx0 - 1, scale_w, IW) == cx), fx0 - 1, fx0)
    # One flat K loop over (fine-window position, tap, Cout chunk): a single pipelined loop
    # (see the forward kernel). The gradient of conv-input pixel (fy, fx) gathers
    # g'[oy, ox] * w[co, ci, ty, tx] from output pixels (fy + PAD_T - ty, fx + PAD_L - tx):
    # flipped taps, transposed weights; the asymmetric 2x2 padding is the same formula.
    n_k = tl.cdiv(COUT, BLOCK_K)
    per_win = KH * KW * n_k
    for kk in range(0, WIN_H * WIN_W * per_win):
        win = kk // per_win
        inner = kk - win * per_win
        tap = inner // n_k
        co = (inner - tap * n_k) * BLOCK_K + rk
        ty = tap // KW
        tx = tap - ty * KW
        if UPSAMPLE:
            wy = win // WIN_W
            fy = fy0 + wy
            fx = fx0 + (win - wy * WIN_W)
            ok = (mvalid & (fy >= 0) & (fy < H) & (_nearest_source(fy, scale_h, IH) == cy)
                  & (fx >= 0) & (fx < W) & (_nearest_source(fx, scale_w, IW) == cx))
        else:
            fy = cy
            fx = cx
            ok = mvalid
        oy = fy + (PAD_T - ty)
        ox = fx + (PAD_L - tx)
        valid = ok & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
        comask = co < COUT
        m2 = valid[:, None] & comask[None, :]
        g = _leaky_grad(gy_ptr, y_ptr,
                        (b * s_gb + oy * s_gh + ox * s_gw)[:, None] + (co * s_gc)[None, :],
                        (b * s_yb + oy * s_yh + ox * s_yw)[:, None] + (co * s_yc)[None, :],
                        m2, ACT, ACC)
        wt = tl.load(w_ptr + ty * s_wh + tx * s_ww + (co * s_wo)[:, None] + (ci * s_wi)[None, :],
                     mask=comask[:, None] & cimask[None, :], other=0.0)
        acc = _mma(g.to(DTYPE), wt, acc, DOT_PRECISION, ACC)
    xofs = b * s_xb + cy * s_xh + cx * s_xw
    tl.store(gx_ptr + xofs[:, None] + (ci * s_xc)[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=mvalid[:, None] & cimask[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: grad_weight, grad_bias
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv2d_bwd_weight_kernel(
    x_ptr,                             # *T  input [B, CIN, IH, IW]
    gy_ptr,                            # *T  grad of the output [B, COUT, H, W]
    y_ptr,                             # *T  saved output (only if ACT)
    gw_ptr,                            # *f32 partial grad_weight [SPLIT, COUT, CIN, KH, KW], contiguous
    gb_ptr,                            # *f32 partial grad_bias [SPLIT, COUT] (only if HAS_BIAS)
    CIN, COUT, H, W, M,                # M = B * H * W output pixels
    IH, IW, scale_h, scale_w,          # stored input size, nearest-exact map (UPSAMPLE)
    s_xb, s_xc, s_xh, s_xw,            # input strides
    s_gb, s_gc, s_gh, s_gw,            # grad-output strides
    s_yb, s_yc, s_yh, s_yw,            # saved-output strides
    PIX_PER_SPLIT,                     # pixels per split-K slice (multiple of BLOCK_P)
    KH: tl.constexpr, KW: tl.constexpr, PAD_T: tl.constexpr, PAD_L: tl.constexpr,
    ACT: tl.constexpr, UPSAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid ``(KH*KW * cdiv(COUT, BLOCK_CO) * cdiv(CIN, BLOCK_CI), SPLIT)``.

    ``gw[s, co, ci, ty, tx] = sum_{pixels of slice s} g'[p, co] * x[p shifted by the tap, ci]``.
    """
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_ci = tl.cdiv(CIN, BLOCK_CI)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    tap = pid // (n_co * n_ci)
    rest = pid % (n_co * n_ci)
    co = (rest // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO).to(tl.int64)
    ci = (rest % n_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI).to(tl.int64)
    comask = co < COUT
    cimask = ci < CIN
    ty = tap // KW
    tx = tap % KW
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC)
    bacc = tl.zeros((BLOCK_CO,), dtype=ACC)
    p_begin = split * PIX_PER_SPLIT
    p_end = tl.minimum(p_begin + PIX_PER_SPLIT, M)
    for p0 in range(p_begin, p_end, BLOCK_P):
        m = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ox = m % W
        t = m // W
        oy = t % H
        b = t // H
        pvalid = m < p_end
        g = _leaky_grad(gy_ptr, y_ptr,
                        (b * s_gb + oy * s_gh + ox * s_gw)[:, None] + (co * s_gc)[None, :],
                        (b * s_yb + oy * s_yh + ox * s_yw)[:, None] + (co * s_yc)[None, :],
                        pvalid[:, None] & comask[None, :], ACT, ACC)
        if HAS_BIAS:
            bacc += tl.sum(g, axis=0)
        iy = oy + ty - PAD_T
        ix = ox + tx - PAD_L
        valid = pvalid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        if UPSAMPLE:
            iy = _nearest_source(iy, scale_h, IH)
            ix = _nearest_source(ix, scale_w, IW)
        xv = tl.load(x_ptr + (b * s_xb + iy * s_xh + ix * s_xw)[:, None] + (ci * s_xc)[None, :],
                     mask=valid[:, None] & cimask[None, :], other=0.0)
        acc = _mma(tl.trans(g.to(DTYPE)), xv, acc, DOT_PRECISION, ACC)
    # partial [split, co, ci, ty, tx] of a contiguous [SPLIT, COUT, CIN, KH, KW] buffer
    gofs = ((split * COUT + co[:, None]) * CIN + ci[None, :]) * (KH * KW) + tap
    tl.store(gw_ptr + gofs, acc.to(gw_ptr.dtype.element_ty), mask=comask[:, None] & cimask[None, :])
    if HAS_BIAS:
        # every (tap, ci-block) program summed the same g': only the first one stores it
        first = (tap == 0) & (rest % n_ci == 0)
        limit = tl.where(first, COUT, 0)  # (an int bound: scalar-bool masks are fragile)
        tl.store(gb_ptr + split * COUT + co, bacc.to(gb_ptr.dtype.element_ty), mask=co < limit)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    utils.check_supported("x", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"triton conv2d: weight dtype {weight.dtype} != input dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"triton conv2d: bias dtype {bias.dtype} != input dtype {x.dtype}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("triton conv2d: x, weight and bias must be on the same device")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [Cout, {x.shape[1]}, kh, kw], got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")


# weight -> {n_axis: (key, packed)}: identity-keyed (entries die with their weight), and the
# key (address, version, layout) catches in-place updates (load_state_dict, optimiser steps).
_PACKED = WeakTensorKeyDictionary()


def _packed_weight(weight: torch.Tensor, n_axis: int) -> torch.Tensor:
    """``weight`` re-laid out so the GEMM's N axis is contiguous, viewed back as ``[Cout, Cin, kh, kw]``.

    The B tile of a tap is ``[BLOCK_K, BLOCK_N]``: forward N = Cout (``n_axis=0``), grad-input
    N = Cin (``n_axis=1``). OIHW weights would make every B-tile row a stride-(kh*kw) gather;
    packed as ``[kh, kw, K, N]`` the rows are contiguous and coalesce. The kernels take
    strides, so the packed tensor is passed as a permuted view with the original index order.

    Under ``torch.inference_mode()`` (how film_fast runs inference) the packed copy (one
    copy kernel) is cached per weight tensor and rebuilt when the weight changes (its address
    or version counter: in-place updates such as ``load_state_dict`` or optimiser steps), so
    inference packs each weight once instead of on every call (56 launches per FILM
    forward). Writes through ``.data`` bypass the version counter: after such a write, call
    :func:`clear_packed_weights`. Not cached: outside inference mode (training and
    ``no_grad`` evaluation repack per call; gradcheck perturbs weights through ``.data``;
    inside an autograd Function's forward the grad mode no longer tells inference from
    training), inference-mode tensors (no version counter: e.g. a bf16 model's per-call fp32
    head weight), or while a CUDA graph is being captured (the capture then re-packs from
    the live weight on every replay).
    """
    k_axis = 1 - n_axis
    order = [0] * 4
    for dst, src in enumerate((2, 3, k_axis, n_axis)):
        order[src] = dst
    cacheable = (torch.is_inference_mode_enabled() and not weight.is_inference()
                 and not (weight.is_cuda and torch.cuda.is_current_stream_capturing()))
    key = None
    if cacheable:
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape),
               weight.stride())
        entry = _PACKED.get(weight, {}).get(n_axis)
        if entry is not None and entry[0] == key:
            return entry[1]
    packed = weight.detach().permute(2, 3, k_axis, n_axis).contiguous()  # [kh, kw, K, N]
    packed = packed.permute(*order)  # indexes like weight[co, ci, ty, tx]
    if cacheable:
        _PACKED.setdefault(weight, {})[n_axis] = (key, packed)
    return packed


def clear_packed_weights() -> None:
    """Drops every cached packed weight (see :func:`_packed_weight`)."""
    _PACKED.clear()


def conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: bool,
             config: ConvConfig, *, pool: bool = False,
             upsample_size: Optional[Sequence[int]] = None, out: Optional[torch.Tensor] = None):
    """Forward launcher: ``y`` (and ``pooled`` when ``pool``); ``upsample_size`` = virtual (H, W).

    ``out``: where to store ``y`` (any strides, e.g. a channel slice of a bigger buffer);
    default a new tensor in ``x``'s layout family.
    """
    b, cin, ih, iw = x.shape
    cout, _, kh, kw = weight.shape
    h, w = (int(upsample_size[0]), int(upsample_size[1])) if upsample_size is not None else (ih, iw)
    y = out if out is not None else utils.empty_4d((b, cout, h, w), x.dtype, x.device, x)
    pooled = utils.empty_4d((b, cout, h // 2, w // 2), x.dtype, x.device, x) if pool else None
    if y.numel() == 0:
        return (y, pooled) if pool else y
    if upsample_size is not None and (ih == 0 or iw == 0):
        raise ValueError(f"cannot resize an empty input {list(x.shape)} to {(h, w)}")
    block_m, block_n, block_k, warps = config.fwd
    pt, pl = same_padding(kh, kw)
    if pool:
        m_total = b * ((h + 1) // 2) * ((w + 1) // 2) * 4
    else:
        m_total = b * h * w
    scale_h, scale_w = (utils.fp32_ratio(ih, h), utils.fp32_ratio(iw, w)) if upsample_size else (1.0, 1.0)
    p = pooled if pool else y
    wt = _packed_weight(weight, n_axis=0)
    _conv2d_fwd_kernel[(utils.cdiv(m_total, block_m), utils.cdiv(cout, block_n))](
        x, wt, bias if bias is not None else weight, y, p, y,
        b, cin, cout, h, w, ih, iw, scale_h, scale_w,
        *utils.strides(x), *utils.strides(wt), *utils.strides(y), *utils.strides(p),
        KH=kh, KW=kw, PAD_T=pt, PAD_L=pl, HAS_BIAS=bias is not None, ACT=act,
        UPSAMPLE=upsample_size is not None, POOL=pool, NUM_LEVELS=0, LEVELS_X_NHWC16=False,
        LEVELS_Y_NHWC16=False, LEVELS_Y_C1=False,
        DTYPE=utils.TL_DTYPE[x.dtype], DOT_PRECISION=dot_precision(x.dtype),
        ACC=utils.acc_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=config.num_stages)
    return (y, pooled) if pool else y


def _level_table(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], block_m: int):
    """int64 ``[levels, DESC_FIELDS]``: first tile, B, H, W, x address, x strides (4), y address,
    y strides (4), 2 pad fields. Returns ``(table, total tiles)``."""
    rows, start = [], 0
    for x, y in zip(xs, ys):
        b, _, h, w = x.shape
        rows.append([start, b, h, w, x.data_ptr(), *utils.strides(x), y.data_ptr(),
                     *utils.strides(y), 0, 0])
        assert len(rows[-1]) == DESC_FIELDS.value
        start += utils.cdiv(b * h * w, block_m)
    device = xs[0].device
    # The table is fully determined by its rows (addresses included), and a model's buffers
    # come back at the same addresses from the caching allocator frame after frame: reuse the
    # device copy instead of a small host->device transfer per call. Not while a CUDA graph is
    # captured: a table allocated from the graph's private pool must not outlive it, and its
    # copy must come from host memory that outlives the graph (_CaptureArenas).
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (str(device), tuple(tuple(r) for r in rows))
    if capturing:
        return _CAPTURE_ARENAS.upload(rows, device), start
    if device.type == "cuda":
        _CAPTURE_ARENAS.reserve(device)  # (for a capture that may follow this eager call)
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=torch.int64)  # a few hundred bytes
        if device.type == "cuda":  # pinned + non_blocking: stream-ordered, no host sync
            table = table.pin_memory().to(device, non_blocking=True)
        else:  # (meta: a dry run's stand-in for the GPU path, audited by transfer.HostSyncs)
            table = table.to(device, non_blocking=device.type == "meta")
        if len(_TABLES) >= 256:
            _TABLES.pop(next(iter(_TABLES)))  # oldest first
        _TABLES[key] = table
    return table, start


class _CaptureArenas:
    """Pinned host memory for the descriptor tables of captured CUDA graphs.

    A graph captured with a host->device copy re-reads the host buffer at every replay, so
    that buffer must stay alive and unchanged as long as the graph, and the copy must come
    from pinned memory (a blocking or pageable copy is not capturable). Allocating pinned
    memory inside a capture is not reliably allowed either (it queries CUDA events), so each
    device gets an arena allocated outside any capture, by the eager calls that precede one
    (``film_fast.cuda_graphs`` warms up before it captures), and captured tables take
    slices of it that are never reused. A capture of the published model at one shape takes
    ~2,000 of its 65,536 entries; a fresh arena replaces one that is half used.
    """

    ENTRIES = 1 << 16

    def __init__(self) -> None:
        self._arenas: dict = {}  # device -> [current arena, next free entry]
        self._retired: list = []  # full arenas: captured graphs may still read them

    def reserve(self, device: torch.device) -> None:
        """Outside a capture: make sure ``device`` has an arena at most half used."""
        slot = self._arenas.get(str(device))
        if slot is None or slot[1] > self.ENTRIES // 2:
            if slot is not None:
                self._retired.append(slot[0])
            self._arenas[str(device)] = [self._new_arena(), 0]

    def _new_arena(self) -> torch.Tensor:
        return torch.empty(self.ENTRIES, dtype=torch.int64, pin_memory=True)

    def upload(self, rows, device: torch.device) -> torch.Tensor:
        """Inside a capture: the table as a device tensor, copied from a fresh arena slice."""
        slot = self._arenas.get(str(device))
        n = len(rows) * len(rows[0])
        if slot is None or slot[1] + n > self.ENTRIES:
            raise RuntimeError(
                "film_fast: a CUDA graph capture needs the Triton conv descriptor arena, which "
                "is set up by an eager call on the same device first; run the model once "
                "outside the capture (film_fast.cuda_graphs.CUDAGraphFILM does)")
        host = slot[0][slot[1]:slot[1] + n]
        slot[1] += n
        host.copy_(torch.tensor(rows, dtype=torch.int64).view(-1))
        table = torch.empty(len(rows), len(rows[0]), dtype=torch.int64, device=device)
        table.view(-1).copy_(host, non_blocking=True)
        return table


# (device, rows) -> device copy of a conv2d_levels descriptor table (read-only in the kernel)
_TABLES: dict = {}
_CAPTURE_ARENAS = _CaptureArenas()


def conv_fwd_levels(xs: Sequence[torch.Tensor], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], act: bool, config: ConvConfig,
                    outs: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """One launch over every level: the tiles of all levels form one grid axis.

    ``outs``: per-level destinations of any strides (the descriptor table carries each
    level's output address and strides), e.g. channel slices of level buffers; default new
    tensors in each input's layout family.
    """
    cout, cin, kh, kw = weight.shape
    if outs is not None:
        ys = list(outs)
    else:
        ys = [utils.empty_4d((x.shape[0], cout, x.shape[2], x.shape[3]), x.dtype, x.device, x)
              for x in xs]
    live = [(x, y) for x, y in zip(xs, ys) if y.numel() > 0]
    if not live:
        return ys
    lx = [x for x, _ in live]
    ly = [y for _, y in live]
    block_m, block_n, block_k, warps = config.fwd
    table, tiles = _level_table(lx, ly, block_m)
    pt, pl = same_padding(kh, kw)
    x0, y0 = lx[0], ly[0]
    wt = _packed_weight(weight, n_axis=0)  # packed once for every level
    nhwc16_x = all(nhwc16_aligned(t) for t in lx)
    nhwc16_y = all(nhwc16_aligned(t) for t in ly)
    _conv2d_fwd_kernel[(tiles, utils.cdiv(cout, block_n))](
        x0, wt, bias if bias is not None else weight, y0, y0, table,
        0, cin, cout, 0, 0, 0, 0, 1.0, 1.0,
        *utils.strides(x0), *utils.strides(wt), *utils.strides(y0), *utils.strides(y0),
        KH=kh, KW=kw, PAD_T=pt, PAD_L=pl, HAS_BIAS=bias is not None, ACT=act,
        UPSAMPLE=False, POOL=False, NUM_LEVELS=len(lx), LEVELS_X_NHWC16=nhwc16_x,
        LEVELS_Y_NHWC16=nhwc16_y,
        LEVELS_Y_C1=not nhwc16_y and all(y.stride(1) == 1 for y in ly),
        DTYPE=utils.TL_DTYPE[x0.dtype], DOT_PRECISION=dot_precision(x0.dtype),
        ACC=utils.acc_dtype(x0.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=config.num_stages)
    return ys


def conv_bwd(x: torch.Tensor, weight: torch.Tensor, y: Optional[torch.Tensor],
             grad_y: torch.Tensor, need_x: bool, need_w: bool, need_b: bool, act: bool,
             config: ConvConfig, *, upsample_size: Optional[Sequence[int]] = None):
    """Backward launcher: ``(grad_x or None, grad_w fp32 or None, grad_b fp32 or None)``.

    ``y`` is the saved (post-activation) output, needed only when ``act``.
    Weight / bias gradients stay fp32 so multi-level callers can sum them before
    the final cast.
    """
    b, cin, ih, iw = x.shape
    cout, _, kh, kw = weight.shape
    h, w = grad_y.shape[-2:]
    pt, pl = same_padding(kh, kw)
    ups = upsample_size is not None
    scale_h, scale_w = (utils.fp32_ratio(ih, h), utils.fp32_ratio(iw, w)) if ups else (1.0, 1.0)
    dtype = utils.TL_DTYPE[x.dtype]
    acc = utils.acc_dtype(x.dtype)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    prec = dot_precision(x.dtype)
    ysrc = y if act else grad_y  # dummy pointer when there is no activation
    grad_x = grad_w = grad_b = None
    empty = grad_y.numel() == 0 or x.numel() == 0
    if need_x:
        grad_x = utils.empty_4d(x.shape, x.dtype, x.device, x)
        if empty:
            grad_x.zero_()
        else:
            block_m, block_n, block_k, warps = config.bwd_input
            wt = _packed_weight(weight, n_axis=1)
            _conv2d_bwd_input_kernel[(utils.cdiv(b * ih * iw, block_m), utils.cdiv(cin, block_n))](
                grad_y, ysrc, wt, grad_x, b, cin, cout, h, w, ih, iw, scale_h, scale_w,
                h / ih, w / iw,
                *utils.strides(grad_y), *utils.strides(ysrc), *utils.strides(wt),
                *utils.strides(grad_x),
                KH=kh, KW=kw, PAD_T=pt, PAD_L=pl, ACT=act, UPSAMPLE=ups,
                WIN_H=utils.window(h, ih) if ups else 1, WIN_W=utils.window(w, iw) if ups else 1,
                DTYPE=dtype, DOT_PRECISION=prec, ACC=acc,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, num_stages=config.num_stages)
    if need_w or need_b:
        if empty:
            grad_w = torch.zeros(weight.shape, dtype=acc_torch, device=x.device) if need_w else None
            grad_b = torch.zeros((cout,), dtype=acc_torch, device=x.device) if need_b else None
            return grad_x, grad_w, grad_b
        block_co, block_ci, block_p, warps = config.bwd_weight
        tiles = kh * kw * utils.cdiv(cout, block_co) * utils.cdiv(cin, block_ci)
        m_total = b * h * w
        # Split-K over pixels until the grid fills the GPU about 4 times over.
        chunks = utils.cdiv(m_total, block_p)
        split = max(1, min(chunks, utils.cdiv(4 * utils.num_sms(x.device), tiles)))
        per_split = utils.cdiv(chunks, split) * block_p
        split = utils.cdiv(m_total, per_split)
        gw_part = utils.empty((split, cout, cin, kh, kw), acc_torch, x.device)
        gb_part = utils.empty((split, cout), acc_torch, x.device)
        _conv2d_bwd_weight_kernel[(tiles, split)](
            x, grad_y, ysrc, gw_part, gb_part, cin, cout, h, w, m_total, ih, iw, scale_h, scale_w,
            *utils.strides(x), *utils.strides(grad_y), *utils.strides(ysrc), per_split,
            KH=kh, KW=kw, PAD_T=pt, PAD_L=pl, ACT=act, UPSAMPLE=ups, HAS_BIAS=need_b,
            DTYPE=dtype, DOT_PRECISION=prec, ACC=acc,
            BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p,
            num_warps=warps, num_stages=config.num_stages)
        # Summing the split-K partials in a fixed order keeps the result deterministic.
        grad_w = gw_part.sum(0) if need_w else None
        grad_b = gb_part.sum(0) if need_b else None
    return grad_x, grad_w, grad_b


class TritonConv2dFunction(torch.autograd.Function):
    """Autograd wrapper: forward :func:`conv_fwd`, backward :func:`conv_bwd`."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        act = check_activation(activation)
        config = config_for(x, weight)
        y = conv_fwd(x, weight, bias, act, config)
        ctx.save_for_backward(x, weight, y if act else None)
        ctx.act = act
        ctx.config = config  # backward launches with the tiles chosen here
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b):
            return None, None, None, None
        gx, gw, gb = conv_bwd(x, weight, y, grad_y, need_x, need_w, need_b, ctx.act, ctx.config)
        return (gx, gw.to(weight.dtype) if gw is not None else None,
                gb.to(weight.dtype) if gb is not None else None, None)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None) -> torch.Tensor:
    """``film_fast.ops.conv2d`` for the triton backend."""
    _check_conv_args(x, weight, bias)
    check_activation(activation)
    return TritonConv2dFunction.apply(x, weight, bias, activation)
