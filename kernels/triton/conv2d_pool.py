"""Conv (+bias, +LeakyReLU) with a fused 2x2 average-pool epilogue (``film_fast.ops.conv2d_pool``).

Returns ``(y, avg_pool2x2(y))``: the sub-tree extractor's stage output and the
next stage's input, from one kernel.

How the pool is fused: the forward kernel (``conv2d._conv2d_fwd_kernel`` with
``POOL=True``) enumerates output pixels in 2x2 quads (``m = 4 * quad + sub``),
and ``BLOCK_M`` is a multiple of 4, so every tile holds whole quads. After the
epilogue the tile is rounded to the output dtype, reshaped to ``[BLOCK_M/4, 4,
BLOCK_N]`` and summed over the quad axis in registers: no atomics, no second
read of ``y``. Pooling is 'valid': quads that hang over an odd last row or
column are computed for ``y`` but not stored in the pooled output.

Backward: the pooled gradient is spread back (``/4``, zero on dropped edges)
and added to ``y``'s own gradient in one pass (``avg_pool2x2_bwd`` with a
``base``), then the conv backward kernels run as for ``conv2d``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .avg_pool2x2 import avg_pool2x2_bwd
from .conv2d import _check_conv_args, check_activation, config_for, conv_bwd, conv_fwd


class TritonConv2dPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        ctx.set_materialize_grads(False)  # either output may be unused
        act = check_activation(activation)
        config = config_for(x, weight)
        y, pooled = conv_fwd(x, weight, bias, act, config, pool=True)
        ctx.save_for_backward(x, weight, y)
        ctx.act = act
        ctx.config = config  # backward reuses the tiles
        return y, pooled

    @staticmethod
    def backward(ctx, grad_y, grad_pooled):
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b) or (grad_y is None and grad_pooled is None):
            return None, None, None, None
        if grad_pooled is not None:
            grad_y = avg_pool2x2_bwd(grad_pooled, y.shape, y.dtype, y.device, y, base=grad_y)
        gx, gw, gb = conv_bwd(x, weight, y, grad_y, need_x, need_w, need_b, ctx.act, ctx.config)
        return (gx, gw.to(weight.dtype) if gw is not None else None,
                gb.to(weight.dtype) if gb is not None else None, None)


def conv2d_pool(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = None):
    """``film_fast.ops.conv2d_pool`` for the triton backend: ``(y, pooled)``."""
    _check_conv_args(x, weight, bias)
    check_activation(activation)
    return TritonConv2dPoolFunction.apply(x, weight, bias, activation)
