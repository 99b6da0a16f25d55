"""Nearest (half-pixel) resize + 2x2 'same' conv without the resized tensor (``film_fast.ops.upsample_conv2x2``).

The fusion decoder's up step: ``conv2x2_same(resize_nearest_exact(x, size))``.
The implicit-GEMM loader of ``conv2d._conv2d_fwd_kernel`` (``UPSAMPLE=True``)
walks the conv taps in the *virtual* resized image of size ``(H, W)`` (padding
bottom/right, zeros outside it) and maps each tap position to its source pixel
with torch's nearest-exact rule ``min(floor((i + 0.5) * in / out), in - 1)``
(the scale rounded to fp32 as ATen does), so only the small coarse tensor is
read. Any kernel size works; FILM uses 2x2, no activation.

Backward: ``_conv2d_bwd_input_kernel`` with ``UPSAMPLE`` computes the coarse
input's gradient directly: for each coarse pixel it sums the conv-input
gradient over the run of fine pixels that copied it (the adjoint of the
resize), never materialising the fine gradient; the weight-gradient kernel
reads the input through the same nearest map.

``out=`` (:func:`upsample_conv2x2_into`): the kernel stores straight into the
destination (the ``net`` channels of a fusion level buffer), also under autograd,
where :class:`TritonUpsampleConv2x2IntoFunction` marks it dirty.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .conv2d import _check_conv_args, config_for, conv_bwd, conv_fwd


class TritonUpsampleConv2x2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, weight, bias):
        config = config_for(x, weight)
        y = conv_fwd(x, weight, bias, False, config, upsample_size=size)
        ctx.save_for_backward(x, weight)
        ctx.size = size
        ctx.config = config  # backward reuses the tiles
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        if not (need_x or need_w or need_b):
            return None, None, None, None
        gx, gw, gb = conv_bwd(x, weight, None, grad_y, need_x, need_w, need_b, False, ctx.config,
                              upsample_size=ctx.size)
        return (gx, None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(weight.dtype) if gb is not None else None)


def upsample_conv2x2(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``film_fast.ops.upsample_conv2x2`` for the triton backend."""
    _check_conv_args(x, weight, bias)
    size = (int(size[0]), int(size[1]))
    return TritonUpsampleConv2x2Function.apply(x, size, weight, bias)


class TritonUpsampleConv2x2IntoFunction(torch.autograd.Function):
    """``upsample_conv2x2`` stored into ``out`` in place: ``apply(out, x, size, weight, bias)``.

    ``out`` comes first: for an in-place write into a view, autograd's CopySlices maps the
    Function's first input onto the view's base. Its gradient is a zero *tensor* (the old
    content does not reach the result), never None: None would make CopySlices drop the
    gradient of the whole base buffer, i.e. of every other channel of the fusion level
    (see ``upsample_flow_warp.TritonWarpIntoFunction``).
    """

    @staticmethod
    def forward(ctx, out, x, size, weight, bias):
        config = _into_config(x, weight, out)
        conv_fwd(x, weight, bias, False, config, upsample_size=size, out=out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, weight)
        ctx.size = size
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_out, need_x, _, need_w, need_b = ctx.needs_input_grad[:5]
        grad_out = torch.zeros_like(grad_y) if need_out else None
        if not (need_x or need_w or need_b):
            return grad_out, None, None, None, None
        gx, gw, gb = conv_bwd(x, weight, None, grad_y, need_x, need_w, need_b, False, ctx.config,
                              upsample_size=ctx.size)
        return (grad_out, gx, None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(weight.dtype) if gb is not None else None)


def upsample_conv2x2_into(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                          bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.upsample_conv2x2(..., out=out)`` for the triton backend: one launch
    storing into ``out`` (any strides); returns ``out`` (computes and copies when ``out`` has
    another dtype)."""
    _check_conv_args(x, weight, bias)
    size = (int(size[0]), int(size[1]))
    if out.dtype != x.dtype:  # (e.g. autocast): convert by copying
        y = upsample_conv2x2(x, size, weight, bias)
        out.copy_(y)
        return y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, out)):
        return TritonUpsampleConv2x2IntoFunction.apply(out, x, size, weight, bias)
    conv_fwd(x, weight, bias, False, _into_config(x, weight, out), upsample_size=size, out=out)
    return out


def _into_config(x, weight, out):
    """Tiles for a launch storing into ``out``. A misaligned destination keeps the big tiles
    for fp16/bf16 (sm_90: 165 registers, no spill) but not for fp32 (255 + 40 bytes of stack),
    which takes the misaligned tiles (see ``conv2d.conv_config``)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return config_for(x, weight)
    return config_for(x, weight, out)
