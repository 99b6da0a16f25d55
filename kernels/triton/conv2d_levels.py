"""One conv's weights over several pyramid levels in a single launch (``film_fast.ops.conv2d_levels``).

FILM shares the sub-tree extractor and the coarse flow predictor across
pyramid levels; launching one conv per level wastes launches and leaves the
GPU idle on the small coarse levels. Here the M tiles (``BLOCK_M`` output
pixels) of every level are laid end to end on one grid axis; each program
finds its level in a small int64 descriptor table (first tile, B, H, W,
input/output addresses and strides: see ``conv2d._level_table``) and then runs
the ordinary implicit-GEMM tile of ``conv2d._conv2d_fwd_kernel``.

Levels may differ in batch, size and layout; they must share dtype and device.
Backward runs per level through the conv2d backward kernels (the weight and
bias gradients of all levels are summed in fp32, then cast once).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .conv2d import (_check_conv_args, check_activation, conv_bwd, conv_config, conv_fwd_levels,
                     nhwc16_aligned)


class TritonConv2dLevelsFunction(torch.autograd.Function):
    """``apply(weight, bias, activation, *xs) -> tuple(ys)``."""

    @staticmethod
    def forward(ctx, weight, bias, activation, *xs):
        ctx.set_materialize_grads(False)  # levels whose output is unused get no zero gradient
        act = check_activation(activation)
        config = conv_config(weight.shape[1], weight.shape[0], xs[0].dtype,
                             x_aligned=all(nhwc16_aligned(x) for x in xs))
        ys = conv_fwd_levels(xs, weight, bias, act, config)
        ctx.act = act
        ctx.config = config  # the backward launches with the same tiles
        ctx.num_levels = len(xs)
        ctx.save_for_backward(weight, *xs, *(ys if act else ()))
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        weight = saved[0]
        n = ctx.num_levels
        xs = saved[1:1 + n]
        ys = saved[1 + n:] if ctx.act else (None,) * n
        need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_xs = ctx.needs_input_grad[3:]
        gw_total = gb_total = None
        grad_xs = []
        for x, y, g, need_x in zip(xs, ys, grads, need_xs):
            if g is None:
                grad_xs.append(None)
                continue
            gx, gw, gb = conv_bwd(x, weight, y, g, need_x, need_w, need_b, ctx.act, ctx.config)
            grad_xs.append(gx)
            if gw is not None:
                gw_total = gw if gw_total is None else gw_total + gw
            if gb is not None:
                gb_total = gb if gb_total is None else gb_total + gb
        gw_out = gw_total.to(weight.dtype) if gw_total is not None else None
        gb_out = gb_total.to(weight.dtype) if gb_total is not None else None
        return (gw_out, gb_out, None, *grad_xs)


def conv2d_levels(xs: Sequence[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, activation: Optional[str] = None) -> List:
    """``film_fast.ops.conv2d_levels`` for the triton backend."""
    xs = list(xs)
    if not xs:
        return []
    for x in xs:
        _check_conv_args(x, weight, bias)
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise TypeError("triton conv2d_levels: every level must share dtype and device")
    check_activation(activation)
    return list(TritonConv2dLevelsFunction.apply(weight, bias, activation, *xs))
