"""2x2 / stride-2 'valid' average pooling (``film_fast.ops.avg_pool2x2``) in Triton.

``[B, C, H, W] -> [B, C, H // 2, W // 2]``; an odd last row / column is dropped.
Any input strides; the output follows the input's layout (NCHW or NHWC).

Forward: a program owns ``BLOCK_P`` output pixels of one batch element and
loops over channel chunks; the four taps are summed in torch's CPU order
``((x00 + x01) + x10) + x11`` in fp32 and scaled by 1/4 (exact).

Backward: a gather over *input* pixels (no atomics, deterministic): every
input pixel reads its one pooled gradient / 4, or writes 0 on the dropped odd
row / column. With ``base`` it adds a second gradient (``conv2d_pool`` sums
the conv output's own gradient and the pooled one in this pass).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import utils

BLOCK_P = 64     # pixels per program
BLOCK_C = 32     # channel chunk
NUM_WARPS = 4


@triton.jit
def _avg_pool2x2_fwd_kernel(
    x_ptr,                             # *T  input [B, C, H, W]
    y_ptr,                             # *T  output [B, C, H//2, W//2]
    C, HO, WO,                         # channels, output size
    s_xb, s_xc, s_xh, s_xw,            # input strides
    s_yb, s_yc, s_yh, s_yw,            # output strides
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(cdiv(HO*WO, BLOCK_P), B)``."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    oy = p // WO
    ox = p % WO
    pmask = oy < HO
    x00 = b * s_xb + (2 * oy) * s_xh + (2 * ox) * s_xw
    ypix = b * s_yb + oy * s_yh + ox * s_yw
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        m = pmask[:, None] & (cs < C)[None, :]
        ptr = x_ptr + x00[:, None] + (cs * s_xc)[None, :]
        acc = tl.load(ptr, mask=m, other=0.0).to(ACC)
        acc += tl.load(ptr + s_xw, mask=m, other=0.0).to(ACC)
        acc += tl.load(ptr + s_xh, mask=m, other=0.0).to(ACC)
        acc += tl.load(ptr + s_xh + s_xw, mask=m, other=0.0).to(ACC)
        tl.store(y_ptr + ypix[:, None] + (cs * s_yc)[None, :],
                 (acc * 0.25).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _avg_pool2x2_bwd_kernel(
    gy_ptr,                            # *G  grad of the pooled output [B, C, H//2, W//2]
    base_ptr,                          # *T  gradient to add [B, C, H, W] (only if HAS_BASE)
    gx_ptr,                            # *T  grad of the input [B, C, H, W] (fully written)
    C, H, W, HO, WO,
    s_gb, s_gc, s_gh, s_gw,            # pooled-grad strides
    s_bb, s_bc, s_bh, s_bw,            # base strides
    s_xb, s_xc, s_xh, s_xw,            # input-grad strides
    HAS_BASE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(cdiv(H*W, BLOCK_P), B)``: ``gx[y, x] = base[y, x] + gy[y//2, x//2] / 4`` (0 if dropped)."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    y = p // W
    x = p % W
    pmask = y < H
    inside = pmask & (y // 2 < HO) & (x // 2 < WO)
    gpix = b * s_gb + (y // 2) * s_gh + (x // 2) * s_gw
    xpix = b * s_xb + y * s_xh + x * s_xw
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cm = (cs < C)[None, :]
        g = tl.load(gy_ptr + gpix[:, None] + (cs * s_gc)[None, :], mask=inside[:, None] & cm,
                    other=0.0).to(ACC) * 0.25
        if HAS_BASE:
            g += tl.load(base_ptr + (b * s_bb + y * s_bh + x * s_bw)[:, None] + (cs * s_bc)[None, :],
                         mask=pmask[:, None] & cm, other=0.0).to(ACC)
        tl.store(gx_ptr + xpix[:, None] + (cs * s_xc)[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cm)


def avg_pool2x2_fwd(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launches the forward kernel into ``out`` (any strides) or a new tensor in ``x``'s layout."""
    b, c, h, w = x.shape
    y = out if out is not None else utils.empty_4d((b, c, h // 2, w // 2), x.dtype, x.device, x)
    if y.numel() == 0:
        return y
    _avg_pool2x2_fwd_kernel[(utils.cdiv((h // 2) * (w // 2), BLOCK_P), b)](
        x, y, c, h // 2, w // 2, *utils.strides(x), *utils.strides(y),
        ACC=utils.acc_dtype(x.dtype), BLOCK_P=BLOCK_P, BLOCK_C=utils.clamp_pow2(c, 4, BLOCK_C),
        num_warps=NUM_WARPS)
    return y


def avg_pool2x2_bwd(grad_y: Optional[torch.Tensor], shape, dtype: torch.dtype,
                    device: torch.device, layout, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient w.r.t. the input (``shape``, ``dtype``; ``layout`` a tensor or memory format to
    follow), plus ``base`` (a gradient of the same shape) when given."""
    b, c, h, w = (int(s) for s in shape)
    gx = utils.empty_4d((b, c, h, w), dtype, device, layout)
    if gx.numel() == 0:
        return gx
    if grad_y is None or grad_y.numel() == 0:
        return gx.copy_(base) if base is not None else gx.zero_()
    _avg_pool2x2_bwd_kernel[(utils.cdiv(h * w, BLOCK_P), b)](
        grad_y, base if base is not None else gx, gx, c, h, w, h // 2, w // 2,
        *utils.strides(grad_y), *utils.strides(base if base is not None else gx),
        *utils.strides(gx), HAS_BASE=base is not None, ACC=utils.acc_dtype(dtype),
        BLOCK_P=BLOCK_P, BLOCK_C=utils.clamp_pow2(c, 4, BLOCK_C), num_warps=NUM_WARPS)
    return gx


class TritonAvgPool2x2Function(torch.autograd.Function):
    """Autograd wrapper; the backward needs only the input's shape, dtype and layout."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = tuple(x.shape)
        ctx.dtype = x.dtype
        ctx.device = x.device
        ctx.memory_format = utils.memory_format_of(x)
        return avg_pool2x2_fwd(x)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None
        return avg_pool2x2_bwd(grad_y, ctx.shape, ctx.dtype, ctx.device, ctx.memory_format)


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.avg_pool2x2`` for the triton backend."""
    utils.check_supported("x", x)
    return TritonAvgPool2x2Function.apply(x)


def avg_pool2x2_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.avg_pool2x2(x, out=out)`` for the triton backend.

    Without autograd the kernel stores straight into ``out`` (one launch) and ``out`` is
    returned. With gradients recorded it pools into a new tensor, copies it into ``out`` and
    returns the new tensor: the model's image pyramid feeds it to convolutions, which save
    their input for backward, and a saved *view* of a level buffer would fail autograd's
    version check once the buffer's other channels are written. (Also when ``out`` has
    another dtype: the copy converts.)
    """
    utils.check_supported("x", x)
    if out.dtype != x.dtype or (torch.is_grad_enabled() and (x.requires_grad or out.requires_grad)):
        y = TritonAvgPool2x2Function.apply(x)
        out.copy_(y)
        return y
    return avg_pool2x2_fwd(x, out)
