"""Coarse-to-fine flow step ``resize_bilinear(2 * flow, size) (+ residual)`` in Triton.

Layouts: ``flow [B, 2, h, w]``, ``residual`` / output ``[B, 2, H, W]``, any
strides. Resize convention = ``F.interpolate(mode="bilinear",
align_corners=False)``: source ``s = scale * (dst + 0.5) - 0.5`` with
``scale = h / H`` rounded to fp32 as ATen does, negative ``s`` clamped to 0,
right/bottom tap clamped to the last row/column.

Forward (``_upsample_flow_fwd_kernel``): one program per ``BLOCK`` fine pixels
of one batch element; both flow channels are produced from the same four
coarse taps; ``2 *`` is applied after the interpolation (exact: a power-of-two
scale commutes with rounding) and the residual is added in fp32 before the
single rounding to the output dtype.

Backward (``_upsample_flow_bwd_kernel``): the adjoint of the resize as a
*gather* (deterministic, no atomics): each coarse pixel visits a window of fine
rows x columns that can reference it and re-evaluates the forward tap rule
exactly, so it picks up precisely the weights the forward used (including the
clamped borders where both taps are the same pixel). The residual's gradient
is the output gradient itself.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import utils

BLOCK = 128      # fine pixels per program (2 channels each: the op is tiny and memory bound)
NUM_WARPS = 4


@triton.jit
def _linear_source_1d(dst, scale, size):
    """Half-pixel bilinear taps of output index ``dst`` (int64 tensor) into an axis of ``size``.

    Returns ``(i0, i1, l0, l1)``: int64 taps and their fp32 weights, as ATen's
    ``area_pixel_compute_source_index`` + ``guard_index_and_lambda``.
    """
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int64), size - 1)  # truncation == floor since src >= 0
    i1 = tl.minimum(i0 + 1, size - 1)
    l1 = src - i0.to(tl.float32)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def _upsampled_flow_at(flow_ptr, b, y, x, pmask, h, w, scale_h, scale_w,
                       s_fb, s_fc, s_fh, s_fw, ACC: tl.constexpr):
    """``resize_bilinear(2 * flow)`` at fine pixels ``(y, x)`` ([BLOCK] int64): returns ``(u, v)`` in ACC."""
    y0, y1, ly0, ly1 = _linear_source_1d(y, scale_h, h)
    x0, x1, lx0, lx1 = _linear_source_1d(x, scale_w, w)
    base = b * s_fb
    o00 = base + y0 * s_fh + x0 * s_fw
    o01 = base + y0 * s_fh + x1 * s_fw
    o10 = base + y1 * s_fh + x0 * s_fw
    o11 = base + y1 * s_fh + x1 * s_fw
    ly0 = ly0.to(ACC)
    ly1 = ly1.to(ACC)
    lx0 = lx0.to(ACC)
    lx1 = lx1.to(ACC)
    u = (ly0 * (lx0 * tl.load(flow_ptr + o00, mask=pmask, other=0.0).to(ACC)
                + lx1 * tl.load(flow_ptr + o01, mask=pmask, other=0.0).to(ACC))
         + ly1 * (lx0 * tl.load(flow_ptr + o10, mask=pmask, other=0.0).to(ACC)
                  + lx1 * tl.load(flow_ptr + o11, mask=pmask, other=0.0).to(ACC)))
    v = (ly0 * (lx0 * tl.load(flow_ptr + o00 + s_fc, mask=pmask, other=0.0).to(ACC)
                + lx1 * tl.load(flow_ptr + o01 + s_fc, mask=pmask, other=0.0).to(ACC))
         + ly1 * (lx0 * tl.load(flow_ptr + o10 + s_fc, mask=pmask, other=0.0).to(ACC)
                  + lx1 * tl.load(flow_ptr + o11 + s_fc, mask=pmask, other=0.0).to(ACC)))
    return 2.0 * u, 2.0 * v


@triton.jit
def _upsample_flow_fwd_kernel(
    flow_ptr,                          # *F   coarse flow [B, 2, h, w]
    res_ptr,                           # *R   residual [B, 2, H, W] (unused unless HAS_RES)
    out_ptr,                           # *O   output [B, 2, H, W]
    h, w, H, W,                        # coarse and fine sizes
    scale_h, scale_w,                  # fp32 h / H, w / W (ATen's rounding)
    s_fb, s_fc, s_fh, s_fw,            # flow strides
    s_rb, s_rc, s_rh, s_rw,            # residual strides
    s_ob, s_oc, s_oh, s_ow,            # output strides
    HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(cdiv(H*W, BLOCK), B)``."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    y = p // W
    x = p % W
    pmask = y < H
    u, v = _upsampled_flow_at(flow_ptr, b, y, x, pmask, h, w, scale_h, scale_w,
                              s_fb, s_fc, s_fh, s_fw, ACC)
    if HAS_RES:
        rofs = b * s_rb + y * s_rh + x * s_rw
        u += tl.load(res_ptr + rofs, mask=pmask, other=0.0).to(ACC)
        v += tl.load(res_ptr + rofs + s_rc, mask=pmask, other=0.0).to(ACC)
    oofs = b * s_ob + y * s_oh + x * s_ow
    tl.store(out_ptr + oofs, u.to(out_ptr.dtype.element_ty), mask=pmask)
    tl.store(out_ptr + oofs + s_oc, v.to(out_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _tap_weight_1d(fine, coarse, scale, size, fine_size):
    """Weight with which fine index ``fine`` reads coarse index ``coarse`` (0 when it does not)."""
    i0, i1, l0, l1 = _linear_source_1d(fine, scale, size)
    wgt = tl.where(i0 == coarse, l0, 0.0) + tl.where(i1 == coarse, l1, 0.0)
    return tl.where((fine >= 0) & (fine < fine_size), wgt, 0.0)


@triton.jit
def _upsample_flow_bwd_kernel(
    gout_ptr,                          # *G   grad of the output [B, 2, H, W]
    gflow_ptr,                         # *F   grad of the coarse flow [B, 2, h, w] (fully written)
    h, w, H, W,
    scale_h, scale_w,                  # fp32 h / H, w / W (same values as the forward)
    inv_h, inv_w,                      # H / h, W / w: only place the search windows
    s_gb, s_gc, s_gh, s_gw,            # grad-output strides
    s_db, s_dc, s_dh, s_dw,            # grad-flow strides
    ACC: tl.constexpr,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr,  # fine rows / columns searched per coarse pixel
    BLOCK: tl.constexpr,
):
    """Grid ``(cdiv(h*w, BLOCK), B)``: ``gflow[cy, cx] = 2 sum_{Y,X} wy(Y, cy) wx(X, cx) g[Y, X]``."""
    b = tl.program_id(1).to(tl.int64)
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cy = q // w
    cx = q % w
    qmask = cy < h
    # Fine Y reads cy iff its base tap is cy - 1 or cy, i.e. scale*(Y+0.5)-0.5 in [cy-1, cy+1):
    # a window of 2*H/h rows starting near (cy-0.5)*H/h - 0.5; one row of slack on each side
    # absorbs rounding, and the exact tap rule decides membership.
    y_start = tl.floor((cy.to(tl.float32) - 0.5) * inv_h - 0.5).to(tl.int64) - 1
    x_start = tl.floor((cx.to(tl.float32) - 0.5) * inv_w - 0.5).to(tl.int64) - 1
    gbase = b * s_gb
    acc_u = tl.zeros((BLOCK,), dtype=ACC)
    acc_v = tl.zeros((BLOCK,), dtype=ACC)
    for i in tl.static_range(WIN_H):
        fy = y_start + i
        wy = _tap_weight_1d(fy, cy, scale_h, h, H).to(ACC)
        for j in tl.static_range(WIN_W):
            fx = x_start + j
            wx = _tap_weight_1d(fx, cx, scale_w, w, W).to(ACC)
            wgt = wy * wx
            m = qmask & (wgt != 0.0)
            gofs = gbase + fy * s_gh + fx * s_gw
            acc_u += wgt * tl.load(gout_ptr + gofs, mask=m, other=0.0).to(ACC)
            acc_v += wgt * tl.load(gout_ptr + gofs + s_gc, mask=m, other=0.0).to(ACC)
    dofs = b * s_db + cy * s_dh + cx * s_dw
    tl.store(gflow_ptr + dofs, (2.0 * acc_u).to(gflow_ptr.dtype.element_ty), mask=qmask)
    tl.store(gflow_ptr + dofs + s_dc, (2.0 * acc_v).to(gflow_ptr.dtype.element_ty), mask=qmask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def resize_scales(coarse: Tuple[int, int], fine: Tuple[int, int]) -> Tuple[float, float]:
    """ATen's fp32 ``(h / H, w / W)``."""
    return utils.fp32_ratio(coarse[0], fine[0]), utils.fp32_ratio(coarse[1], fine[1])


def upsample_flow_fwd(flow: torch.Tensor, size: Sequence[int],
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    b, _, h, w = flow.shape
    H, W = int(size[0]), int(size[1])
    out_dtype = flow.dtype if residual is None else torch.promote_types(flow.dtype, residual.dtype)
    out = utils.empty_4d((b, 2, H, W), out_dtype, flow.device,
                         residual if residual is not None else flow)
    if out.numel() == 0:
        return out
    if flow.numel() == 0:
        raise ValueError(f"cannot resize an empty flow {list(flow.shape)} to {(H, W)}")
    scale_h, scale_w = resize_scales((h, w), (H, W))
    res = residual if residual is not None else out  # dummy pointer when there is no residual
    _upsample_flow_fwd_kernel[(utils.cdiv(H * W, BLOCK), b)](
        flow, res, out, h, w, H, W, scale_h, scale_w,
        *utils.strides(flow), *utils.strides(res), *utils.strides(out),
        HAS_RES=residual is not None,
        ACC=utils.acc_dtype(flow.dtype, res.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def upsample_flow_bwd(grad_out: torch.Tensor, coarse: Tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """Gradient w.r.t. the coarse flow ``[B, 2, h, w]`` (``dtype``) of :func:`upsample_flow_fwd`."""
    b, _, H, W = grad_out.shape
    h, w = int(coarse[0]), int(coarse[1])
    grad = utils.empty_4d((b, 2, h, w), dtype, grad_out.device, grad_out)
    if grad.numel() == 0:
        return grad
    if grad_out.numel() == 0:
        return grad.zero_()
    scale_h, scale_w = resize_scales((h, w), (H, W))
    _upsample_flow_bwd_kernel[(utils.cdiv(h * w, BLOCK), b)](
        grad_out, grad, h, w, H, W, scale_h, scale_w, H / h, W / w,
        *utils.strides(grad_out), *utils.strides(grad),
        ACC=utils.acc_dtype(grad_out.dtype, dtype),
        WIN_H=math.ceil(2 * H / h) + 3, WIN_W=math.ceil(2 * W / w) + 3,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad


class TritonUpsampleFlowFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`upsample_flow_fwd` / :func:`upsample_flow_bwd`."""

    @staticmethod
    def forward(ctx, flow, size, residual):
        ctx.coarse = tuple(flow.shape[-2:])
        ctx.flow_dtype = flow.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        return upsample_flow_fwd(flow, size, residual)

    @staticmethod
    def backward(ctx, grad_out):
        need_flow, _, need_res = ctx.needs_input_grad[:3]
        grad_flow = upsample_flow_bwd(grad_out, ctx.coarse, ctx.flow_dtype) if need_flow else None
        grad_res = grad_out.to(ctx.res_dtype) if need_res else None  # d(out)/d(residual) = I
        return grad_flow, None, grad_res


def upsample_flow(flow: torch.Tensor, size: Sequence[int],
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``film_fast.ops.upsample_flow`` for the triton backend."""
    utils.check_supported("flow", flow)
    if residual is not None:
        utils.check_supported("residual", residual)
    return TritonUpsampleFlowFunction.apply(flow, tuple(int(s) for s in size), residual)
