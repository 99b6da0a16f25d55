"""Backward bilinear warp with border clamping (``film_fast.ops.warp``) in Triton.

``out[b, c, y, x] = bilinear(image[b, c], x + flow[b, 0, y, x], y + flow[b, 1, y, x])``
with the sample position clamped into ``[0, W-1] x [0, H-1]``.

Layouts: ``image [B, C, H, W]``, ``flow [B, 2, H, W]``, any strides (NCHW,
NHWC / channels_last, channel slices); strides are kernel arguments so no
input is copied. The output follows the image's layout.

Tiling: one program owns ``BLOCK_P`` output pixels of one batch element and
loops over the channels in ``BLOCK_C`` chunks, so the flow is read and the
sample coordinates / weights are computed once per pixel and reused for every
channel. A ``[BLOCK_P, BLOCK_C]`` tile is contiguous along C in NHWC and along
P in NCHW; Triton's stride-1 specialisation vectorises whichever it is.

Numerics: coordinates in fp32 (fp64 for fp64 flows, like the reference),
accumulation in fp32 (fp64 for fp64 data), one rounding to the output dtype.

Gradient conventions (identical to ``grid_sample(padding_mode="border")``):

* the derivative of the clamped coordinate is 0 unless the unclamped
  coordinate lies strictly inside ``(0, W-1)`` (resp. ``(0, H-1)``): at or
  beyond a border the sample does not move when the flow moves;
* at an exactly integer interior position the base cell is ``floor`` (the
  right-hand difference), as grid_sample does.

Backward kernels:

* ``_warp_bwd_kernel``: per output pixel, grad_flow (a reduction over the
  channels inside the program, no atomics) and, optionally, grad_image by
  ``atomic_add`` scatter of the four bilinear weights into an fp32 buffer.
* deterministic grad_image (``torch.use_deterministic_algorithms(True)`` or
  ``FILM_FAST_DETERMINISTIC=1``): ``_warp_cells_kernel`` writes each output
  pixel's base cell ``y0 * W + x0``; a stable sort groups output pixels by
  cell (torch.sort on the device, deterministic); ``_warp_bwd_gather_kernel``
  then lets every source pixel gather, in a fixed order, the contributions of
  the output pixels whose cell touches it (its own cell and the three cells
  up/left of it). No atomics, bitwise reproducible; the cost grows with the
  number of samples that land in one cell (a flow that clamps a whole image
  onto a corner serialises on that corner), which is why it is not the default.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import utils

# Tiles (checked against sm_90 register / spill reports from an offline AOT compile): 64 pixels
# x 32 channels when C is a multiple of 16 (rows 16-byte aligned: vector loads), else x 16 (every
# element then needs its own 64-bit address; 128-pixel or 32-channel tiles spilled), 8 warps.
BLOCK_P = 64      # output pixels per program
BLOCK_C = 32      # channel chunk for aligned channel counts
BLOCK_C_UNALIGNED = 16
BLOCK_Q = 32      # source pixels per program in the deterministic gather
GATHER_MAX_C = 64   # the gather walks each cell's sample list once per channel chunk: few, wide chunks


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _border_sample_1d(pos, size):
    """Clamped bilinear sampling along one axis.

    Args:
        pos: unclamped sample coordinate (COORD dtype tensor).
        size: image extent along the axis (scalar int).
    Returns:
        ``(i0, i1, t, moving)``: int64 indices of the two taps (``i1 = i0 + 1``
        whenever ``size >= 2``), the weight ``t`` of ``i1`` (``1 - t`` goes to
        ``i0``) and whether the clamped coordinate moves with ``pos`` (the
        derivative mask: strictly inside ``(0, size-1)``).
    """
    hi = (size - 1) + tl.zeros_like(pos)  # (works when Triton specialises size == 1 to a constexpr)
    moving = (pos > 0) & (pos < hi)
    c = tl.minimum(tl.maximum(pos, 0.0), hi)
    # Integer clamps keep every address inside the image even for NaN / inf flows. The base cell
    # stops at size-2 so that c = size-1 is represented as (size-2, t=1): every sample then has a
    # right/bottom neighbour, which the deterministic gather relies on.
    i0 = tl.floor(c).to(tl.int64)
    i0 = tl.maximum(tl.minimum(i0, size - 2), 0)
    i1 = tl.minimum(i0 + 1, size - 1)
    t = c - i0.to(pos.dtype)
    return i0, i1, t, moving


@triton.jit
def _warp_channels(img_ptr, out_ptr, b, C, x0, x1, y0, y1, tx, ty, pmask, out_pix,
                   s_ib, s_ic, s_ih, s_iw, s_oc,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Writes the bilinear samples of every channel for one pixel block.

    ``x0, x1, y0, y1`` (int64), ``tx, ty`` (weights) and ``pmask`` are
    ``[BLOCK_P]`` vectors; ``out_pix`` is the output offset of each pixel
    without the channel term. Loops over C in ``BLOCK_C`` chunks.
    """
    base = b * s_ib
    o00 = base + y0 * s_ih + x0 * s_iw
    o01 = base + y0 * s_ih + x1 * s_iw
    o10 = base + y1 * s_ih + x0 * s_iw
    o11 = base + y1 * s_ih + x1 * s_iw
    txa = tx.to(ACC)
    tya = ty.to(ACC)
    w00 = ((1.0 - tya) * (1.0 - txa))[:, None]
    w01 = ((1.0 - tya) * txa)[:, None]
    w10 = (tya * (1.0 - txa))[:, None]
    w11 = (tya * txa)[:, None]
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        m = pmask[:, None] & (cs < C)[None, :]
        cofs = (cs * s_ic)[None, :]
        v00 = tl.load(img_ptr + o00[:, None] + cofs, mask=m, other=0.0).to(ACC)
        v01 = tl.load(img_ptr + o01[:, None] + cofs, mask=m, other=0.0).to(ACC)
        v10 = tl.load(img_ptr + o10[:, None] + cofs, mask=m, other=0.0).to(ACC)
        v11 = tl.load(img_ptr + o11[:, None] + cofs, mask=m, other=0.0).to(ACC)
        val = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
        tl.store(out_ptr + out_pix[:, None] + (cs * s_oc)[None, :],
                 val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pixel_block(H, W, BLOCK: tl.constexpr):
    """``(p, y, x, mask)`` (int64) for this program's block of ``BLOCK`` pixels of an H x W image."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    y = p // W
    return p, y, p % W, y < H  # (y < H rather than p < H * W: no int32 product)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _warp_fwd_kernel(
    img_ptr,                           # *T   image [B, C, H, W], strides s_i*
    flow_ptr,                          # *F   flow [B, 2, H, W] (dx, dy), strides s_f*
    out_ptr,                           # *T   output [B, C, H, W], strides s_o*
    C, H, W,                           # channels and spatial size
    s_ib, s_ic, s_ih, s_iw,            # image strides (elements)
    s_fb, s_fc, s_fh, s_fw,            # flow strides
    s_ob, s_oc, s_oh, s_ow,            # output strides
    COORD: tl.constexpr,               # coordinate dtype (fp32; fp64 for fp64 flows)
    ACC: tl.constexpr,                 # accumulation dtype (fp32; fp64 for fp64 images)
    BLOCK_P: tl.constexpr,             # pixels per program
    BLOCK_C: tl.constexpr,             # channel chunk
):
    """Grid ``(cdiv(H*W, BLOCK_P), B)``."""
    b = tl.program_id(1).to(tl.int64)
    p, y, x, pmask = _pixel_block(H, W, BLOCK_P)
    fofs = b * s_fb + y * s_fh + x * s_fw
    dx = tl.load(flow_ptr + fofs, mask=pmask, other=0.0).to(COORD)
    dy = tl.load(flow_ptr + fofs + s_fc, mask=pmask, other=0.0).to(COORD)
    x0, x1, tx, _mx = _border_sample_1d(x.to(COORD) + dx, W)
    y0, y1, ty, _my = _border_sample_1d(y.to(COORD) + dy, H)
    out_pix = b * s_ob + y * s_oh + x * s_ow
    _warp_channels(img_ptr, out_ptr, b, C, x0, x1, y0, y1, tx, ty, pmask, out_pix,
                   s_ib, s_ic, s_ih, s_iw, s_oc, ACC, BLOCK_C)


@triton.jit
def _warp_bwd_kernel(
    img_ptr,                           # *T   image [B, C, H, W] (read only for grad_flow)
    flow_ptr,                          # *F   flow [B, 2, H, W]
    gout_ptr,                          # *T   grad of the output [B, C, H, W]
    gimg_ptr,                          # *ACC grad_image accumulator [B, C, H, W], zero-filled (atomics)
    gflow_ptr,                         # *G   grad_flow [B, 2, H, W] (fully written)
    C, H, W,
    s_ib, s_ic, s_ih, s_iw,            # image strides
    s_fb, s_fc, s_fh, s_fw,            # flow strides
    s_gb, s_gc, s_gh, s_gw,            # grad-output strides
    s_ab, s_ac, s_ah, s_aw,            # grad_image accumulator strides
    s_db, s_dc, s_dh, s_dw,            # grad_flow strides
    COORD: tl.constexpr, ACC: tl.constexpr,
    GRAD_IMAGE: tl.constexpr,          # scatter grad_image with atomics
    GRAD_FLOW: tl.constexpr,           # write grad_flow
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(cdiv(H*W, BLOCK_P), B)``; same pixel/channel tiling as the forward."""
    b = tl.program_id(1).to(tl.int64)
    p, y, x, pmask = _pixel_block(H, W, BLOCK_P)
    fofs = b * s_fb + y * s_fh + x * s_fw
    dx = tl.load(flow_ptr + fofs, mask=pmask, other=0.0).to(COORD)
    dy = tl.load(flow_ptr + fofs + s_fc, mask=pmask, other=0.0).to(COORD)
    x0, x1, tx, movx = _border_sample_1d(x.to(COORD) + dx, W)
    y0, y1, ty, movy = _border_sample_1d(y.to(COORD) + dy, H)
    txa = tx.to(ACC)
    tya = ty.to(ACC)
    gout_pix = b * s_gb + y * s_gh + x * s_gw
    gx = tl.zeros((BLOCK_P,), dtype=ACC)
    gy = tl.zeros((BLOCK_P,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        m = pmask[:, None] & (cs < C)[None, :]
        g = tl.load(gout_ptr + gout_pix[:, None] + (cs * s_gc)[None, :], mask=m, other=0.0).to(ACC)
        if GRAD_IMAGE:
            # fp32 atomics: the summation order over colliding samples is scheduler-dependent
            # (the deterministic variant is _warp_bwd_gather_kernel).
            abase = b * s_ab
            acofs = (cs * s_ac)[None, :]
            tl.atomic_add(gimg_ptr + (abase + y0 * s_ah + x0 * s_aw)[:, None] + acofs,
                          g * ((1.0 - tya) * (1.0 - txa))[:, None], mask=m)
            tl.atomic_add(gimg_ptr + (abase + y0 * s_ah + x1 * s_aw)[:, None] + acofs,
                          g * ((1.0 - tya) * txa)[:, None], mask=m)
            tl.atomic_add(gimg_ptr + (abase + y1 * s_ah + x0 * s_aw)[:, None] + acofs,
                          g * (tya * (1.0 - txa))[:, None], mask=m)
            tl.atomic_add(gimg_ptr + (abase + y1 * s_ah + x1 * s_aw)[:, None] + acofs,
                          g * (tya * txa)[:, None], mask=m)
        if GRAD_FLOW:
            ibase = b * s_ib
            icofs = (cs * s_ic)[None, :]
            v00 = tl.load(img_ptr + (ibase + y0 * s_ih + x0 * s_iw)[:, None] + icofs, mask=m,
                          other=0.0).to(ACC)
            v01 = tl.load(img_ptr + (ibase + y0 * s_ih + x1 * s_iw)[:, None] + icofs, mask=m,
                          other=0.0).to(ACC)
            v10 = tl.load(img_ptr + (ibase + y1 * s_ih + x0 * s_iw)[:, None] + icofs, mask=m,
                          other=0.0).to(ACC)
            v11 = tl.load(img_ptr + (ibase + y1 * s_ih + x1 * s_iw)[:, None] + icofs, mask=m,
                          other=0.0).to(ACC)
            # d out / d x = (1-ty)(v01 - v00) + ty (v11 - v10); d out / d y likewise.
            dodx = (1.0 - tya)[:, None] * (v01 - v00) + tya[:, None] * (v11 - v10)
            dody = (1.0 - txa)[:, None] * (v10 - v00) + txa[:, None] * (v11 - v01)
            gx += tl.sum(g * dodx, axis=1)
            gy += tl.sum(g * dody, axis=1)
    if GRAD_FLOW:
        gx = tl.where(movx, gx, 0.0)
        gy = tl.where(movy, gy, 0.0)
        dofs = b * s_db + y * s_dh + x * s_dw
        tl.store(gflow_ptr + dofs, gx.to(gflow_ptr.dtype.element_ty), mask=pmask)
        tl.store(gflow_ptr + dofs + s_dc, gy.to(gflow_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _warp_cells_kernel(
    flow_ptr,                          # *F   flow [B, 2, H, W]
    cell_ptr,                          # *i32 base cell y0 * W + x0 of every output pixel, [B, H*W]
    H, W,
    s_fb, s_fc, s_fh, s_fw,            # flow strides
    COORD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid ``(cdiv(H*W, BLOCK_P), B)``: the sort keys of the deterministic grad_image."""
    b = tl.program_id(1).to(tl.int64)
    p, y, x, pmask = _pixel_block(H, W, BLOCK_P)
    fofs = b * s_fb + y * s_fh + x * s_fw
    dx = tl.load(flow_ptr + fofs, mask=pmask, other=0.0).to(COORD)
    dy = tl.load(flow_ptr + fofs + s_fc, mask=pmask, other=0.0).to(COORD)
    x0, _x1, _tx, _mx = _border_sample_1d(x.to(COORD) + dx, W)
    y0, _y1, _ty, _my = _border_sample_1d(y.to(COORD) + dy, H)
    tl.store(cell_ptr + b * H * W + p, (y0 * W + x0).to(tl.int32), mask=pmask)


@triton.jit
def _gather_cell(acc, flow_ptr, gout_ptr, order_ptr, start_ptr, b, cell, valid, cs, cmask,
                 H, W, s_fb, s_fc, s_fh, s_fw, s_gb, s_gc, s_gh, s_gw,
                 CORNER_X: tl.constexpr, CORNER_Y: tl.constexpr,
                 COORD: tl.constexpr, ACC: tl.constexpr):
    """Adds, in sorted order, every output pixel of base cell ``cell`` weighted by its corner weight.

    ``CORNER_X/Y`` say which corner of that cell the gathering pixel is (1 = right/bottom).
    ``cell`` and ``valid`` are ``[BLOCK_Q]``; ``cs`` the channel chunk.
    """
    row = b * (H * W + 1)
    lo = tl.load(start_ptr + row + cell, mask=valid, other=0)
    hi = tl.load(start_ptr + row + cell + 1, mask=valid, other=0)
    n = hi - lo
    for k in range(0, tl.max(n, axis=0)):
        live = valid & (k < n)
        p = tl.load(order_ptr + b * H * W + lo + k, mask=live, other=0)
        py = p // W
        px = p % W
        fofs = b * s_fb + py * s_fh + px * s_fw
        dx = tl.load(flow_ptr + fofs, mask=live, other=0.0).to(COORD)
        dy = tl.load(flow_ptr + fofs + s_fc, mask=live, other=0.0).to(COORD)
        _x0, _x1, tx, _mx = _border_sample_1d(px.to(COORD) + dx, W)
        _y0, _y1, ty, _my = _border_sample_1d(py.to(COORD) + dy, H)
        txa = tx.to(ACC)
        tya = ty.to(ACC)
        if CORNER_X:
            wx = txa
        else:
            wx = 1.0 - txa
        if CORNER_Y:
            wy = tya
        else:
            wy = 1.0 - tya
        g = tl.load(gout_ptr + (b * s_gb + py * s_gh + px * s_gw)[:, None] + (cs * s_gc)[None, :],
                    mask=live[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += (wy * wx)[:, None] * g
    return acc


@triton.jit
def _warp_bwd_gather_kernel(
    flow_ptr,                          # *F   flow [B, 2, H, W]
    gout_ptr,                          # *T   grad of the output [B, C, H, W]
    order_ptr,                         # *i64 [B, H*W] output pixels sorted (stably) by base cell
    start_ptr,                         # *i64 [B, H*W + 1] first sorted position of every cell
    gimg_ptr,                          # *T   grad_image [B, C, H, W] (fully written)
    C, H, W,
    s_fb, s_fc, s_fh, s_fw,            # flow strides
    s_gb, s_gc, s_gh, s_gw,            # grad-output strides
    s_ob, s_oc, s_oh, s_ow,            # grad_image strides
    COORD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(cdiv(H*W, BLOCK_Q), B)``: deterministic grad_image by gathering.

    Source pixel ``q = (yq, xq)`` is corner (0,0) of cell (yq, xq), corner (1,0)
    [right] of cell (yq, xq-1), corner (0,1) [bottom] of cell (yq-1, xq) and
    corner (1,1) of cell (yq-1, xq-1). The four cells are visited in that
    order and each cell's samples in sorted order: a fixed summation order.
    """
    b = tl.program_id(1).to(tl.int64)
    q, yq, xq, qmask = _pixel_block(H, W, BLOCK_Q)
    has_left = qmask & (xq >= 1)
    has_up = qmask & (yq >= 1)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cs < C
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
        acc = _gather_cell(acc, flow_ptr, gout_ptr, order_ptr, start_ptr, b, q, qmask, cs, cmask,
                           H, W, s_fb, s_fc, s_fh, s_fw, s_gb, s_gc, s_gh, s_gw, 0, 0, COORD, ACC)
        acc = _gather_cell(acc, flow_ptr, gout_ptr, order_ptr, start_ptr, b, q - 1, has_left, cs,
                           cmask, H, W, s_fb, s_fc, s_fh, s_fw, s_gb, s_gc, s_gh, s_gw, 1, 0,
                           COORD, ACC)
        acc = _gather_cell(acc, flow_ptr, gout_ptr, order_ptr, start_ptr, b, q - W, has_up, cs,
                           cmask, H, W, s_fb, s_fc, s_fh, s_fw, s_gb, s_gc, s_gh, s_gw, 0, 1,
                           COORD, ACC)
        acc = _gather_cell(acc, flow_ptr, gout_ptr, order_ptr, start_ptr, b, q - W - 1,
                           has_up & has_left, cs, cmask, H, W, s_fb, s_fc, s_fh, s_fw,
                           s_gb, s_gc, s_gh, s_gw, 1, 1, COORD, ACC)
        tl.store(gimg_ptr + (b * s_ob + yq * s_oh + xq * s_ow)[:, None] + (cs * s_oc)[None, :],
                 acc.to(gimg_ptr.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def launch_config(channels: int) -> Tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_C, num_warps)`` for a warp over ``channels`` channels."""
    block_c = utils.clamp_pow2(channels, 4, BLOCK_C if channels % 16 == 0 else BLOCK_C_UNALIGNED)
    return BLOCK_P, block_c, 8 if block_c >= 16 else 4


def warp_fwd(image: torch.Tensor, flow: torch.Tensor, out: Optional[torch.Tensor] = None,
             config: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Forward warp; writes ``out`` (any strides) when given, else a new tensor in the image's layout."""
    b, c, h, w = image.shape
    if out is None:
        out = utils.empty_4d(image.shape, image.dtype, image.device, image)
    if image.numel() == 0:
        return out
    block_p, block_c, warps = config or launch_config(c)
    grid = (utils.cdiv(h * w, block_p), b)
    _warp_fwd_kernel[grid](
        image, flow, out, c, h, w,
        *utils.strides(image), *utils.strides(flow), *utils.strides(out),
        COORD=utils.coord_dtype(flow.dtype), ACC=utils.acc_dtype(image.dtype, flow.dtype),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return out


def warp_bwd(image: torch.Tensor, flow: torch.Tensor, grad_out: torch.Tensor,
             need_image: bool, need_flow: bool, deterministic: Optional[bool] = None,
             config: Optional[Tuple[int, int, int]] = None,
             flow_grad_dtype: Optional[torch.dtype] = None):
    """Gradients of :func:`warp_fwd`: ``(grad_image or None, grad_flow or None)``.

    ``flow_grad_dtype`` (default ``flow.dtype``) lets fused callers keep the flow
    gradient in fp32. ``deterministic`` defaults to :func:`utils.deterministic_requested`.
    """
    b, c, h, w = image.shape
    if deterministic is None:
        deterministic = utils.deterministic_requested()
    block_p, block_c, warps = config or launch_config(c)
    grid = (utils.cdiv(h * w, block_p), b)
    coord = utils.coord_dtype(flow.dtype)
    acc = utils.acc_dtype(image.dtype, flow.dtype)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    grad_image = grad_flow = None
    if need_flow:
        grad_flow = utils.empty_4d(flow.shape, flow_grad_dtype or flow.dtype, flow.device, flow)
    atomic_image = need_image and not deterministic
    if atomic_image:
        # Atomics need a zeroed fp32 (fp64) buffer; it is the result itself for fp32 images.
        grad_acc = utils.empty_4d(image.shape, acc_torch, image.device, image).zero_()
    if image.numel() == 0:
        return (torch.zeros_like(image) if need_image else None,
                torch.zeros_like(flow) if need_flow else None)
    if atomic_image or need_flow:
        dummy = grad_out
        gacc = grad_acc if atomic_image else dummy
        gfl = grad_flow if need_flow else dummy
        _warp_bwd_kernel[grid](
            image, flow, grad_out, gacc, gfl, c, h, w,
            *utils.strides(image), *utils.strides(flow), *utils.strides(grad_out),
            *utils.strides(gacc), *utils.strides(gfl),
            COORD=coord, ACC=acc, GRAD_IMAGE=atomic_image, GRAD_FLOW=need_flow,
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    if atomic_image:
        grad_image = grad_acc if grad_acc.dtype == image.dtype else grad_acc.to(image.dtype)
    elif need_image:
        grad_image = _grad_image_deterministic(image, flow, grad_out, block_p, warps)
    return grad_image, grad_flow


def _grad_image_deterministic(image, flow, grad_out, block_p, warps):
    """grad_image without atomics: sort output pixels by base cell, then gather (see module doc).

    Cells are int32 keys ``y0 * W + x0`` (images below 2^31 pixels).
    """
    b, c, h, w = image.shape
    coord = utils.coord_dtype(flow.dtype)
    cells = torch.empty((b, h * w), dtype=torch.int32, device=image.device)
    _warp_cells_kernel[(utils.cdiv(h * w, block_p), b)](
        flow, cells, h, w, *utils.strides(flow), COORD=coord, BLOCK_P=block_p, num_warps=warps)
    # Stable sort: equal cells keep pixel order, so the gather order is fully determined.
    sorted_cells, order = torch.sort(cells, dim=1, stable=True)
    bounds = torch.arange(h * w + 1, dtype=torch.int32, device=image.device).expand(b, h * w + 1)
    starts = torch.searchsorted(sorted_cells, bounds.contiguous())
    grad_image = utils.empty_4d(image.shape, image.dtype, image.device, image)
    _warp_bwd_gather_kernel[(utils.cdiv(h * w, BLOCK_Q), b)](
        flow, grad_out, order, starts, grad_image, c, h, w,
        *utils.strides(flow), *utils.strides(grad_out), *utils.strides(grad_image),
        COORD=coord, ACC=utils.acc_dtype(image.dtype, flow.dtype),
        BLOCK_Q=BLOCK_Q, BLOCK_C=utils.clamp_pow2(c, 4, GATHER_MAX_C), num_warps=warps)
    return grad_image


class TritonWarpFunction(torch.autograd.Function):
    """Autograd wrapper: forward :func:`warp_fwd`, backward :func:`warp_bwd`."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        config = launch_config(image.shape[1])
        out = warp_fwd(image, flow, config=config)
        ctx.save_for_backward(image, flow)
        ctx.config = config  # same tiling in backward
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        image, flow = ctx.saved_tensors
        need_image, need_flow = ctx.needs_input_grad[:2]
        if not (need_image or need_flow):
            return None, None
        return warp_bwd(image, flow, grad_out, need_image, need_flow, config=ctx.config)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.warp`` for the triton backend (same signature as the reference)."""
    utils.check_supported("image", image)
    utils.check_supported("flow", flow)
    return TritonWarpFunction.apply(image, flow)
