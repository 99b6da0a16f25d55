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

``out=`` (:func:`conv2d_levels_into`): every level's output is stored straight
into its destination (the descriptor table holds any output address and
strides), e.g. a channel slice of the feature extractor's level buffer, in the
same single launch. Under autograd the launch stays single and in place: autograd
cannot let one Function write into several views (CopySlices hands the wrapped
Function one gradient), so :class:`TritonConv2dLevelsIntoFunction` runs the launch
and returns one placeholder ("token") per level, and a per-level
:class:`AdoptIntoFunction` marks that level's ``out`` dirty and passes its gradient
back to the token, so the backward is the unchanged multi-level one.
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
        gw, gb, grad_xs = _levels_backward(ctx, weight, xs, ys, grads, ctx.needs_input_grad[3:])
        return (gw, gb, None, *grad_xs)


def _levels_backward(ctx, weight, xs, ys, grads, need_xs):
    """``(grad_weight, grad_bias, [grad_x per level])``: per-level conv backward, the weight and
    bias gradients summed in fp32 and cast once."""
    need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
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
    return gw_out, gb_out, grad_xs


def _into_config(xs, weight, outs):
    """Tiles for a launch storing into ``outs`` (misaligned destinations take smaller forward
    tiles: see :func:`conv_config`)."""
    return conv_config(weight.shape[1], weight.shape[0], xs[0].dtype,
                       x_aligned=all(nhwc16_aligned(x) for x in xs),
                       y_aligned=all(nhwc16_aligned(o) for o in outs))


class TritonConv2dLevelsIntoFunction(torch.autograd.Function):
    """``apply(weight, bias, activation, outs, *xs) -> tuple(tokens)``: the one launch, storing
    level ``l`` into ``outs[l]`` (a plain list: autograd does not see these writes).

    Token ``l`` is a zero-stride ``[B_l, Cout, H_l, W_l]`` placeholder (no memory) through
    which :class:`AdoptIntoFunction` returns the gradient of ``outs[l]``; the backward is
    :class:`TritonConv2dLevelsFunction`'s. The outputs the activation derivative needs are
    kept as detached views of ``outs`` (saving them would trip autograd's version check as
    soon as another channel range of the same buffer is written): ``outs`` must not be
    overwritten before the backward (FILM writes every feature slice once).
    """

    @staticmethod
    def forward(ctx, weight, bias, activation, outs, *xs):
        ctx.set_materialize_grads(False)  # levels whose output is unused get no zero gradient
        act = check_activation(activation)
        config = _into_config(xs, weight, outs)
        conv_fwd_levels(xs, weight, bias, act, config, outs=outs)
        ctx.act = act
        ctx.config = config
        ctx.num_levels = len(xs)
        ctx.ys = [o.detach() for o in outs] if act else [None] * len(xs)
        ctx.save_for_backward(weight, *xs)
        return tuple(weight.new_empty(()).expand(o.shape) for o in outs)  # never read

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        weight, xs = saved[0], saved[1:]
        gw, gb, grad_xs = _levels_backward(ctx, weight, xs, ctx.ys, grads, ctx.needs_input_grad[4:])
        return (gw, gb, None, None, *grad_xs)


class AdoptIntoFunction(torch.autograd.Function):
    """``apply(out, token) -> out``: ``out`` was already written (by the launch that produced
    ``token``); marks it dirty and routes its gradient to ``token``.

    ``out`` comes first (CopySlices maps a Function's first input onto the view's base) and
    its own gradient is a zero tensor, not None: None would drop the gradient of the rest of
    the base buffer (see ``upsample_flow_warp.TritonWarpIntoFunction``).
    """

    @staticmethod
    def forward(ctx, out, token):
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        need_out, need_token = ctx.needs_input_grad[:2]
        return (torch.zeros_like(grad) if need_out else None, grad if need_token else None)


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


def conv2d_levels_into(xs: Sequence[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor], activation: Optional[str],
                       out: Sequence[torch.Tensor]) -> List:
    """``film_fast.ops.conv2d_levels(..., out=out)`` for the triton backend: one launch storing
    level ``l`` into ``out[l]`` (any strides); returns ``out`` (as autograd sees it). When an
    ``out`` has another dtype than the inputs it computes and copies (the copy converts)."""
    xs, out = list(xs), list(out)
    if not xs:
        return []
    if any(o.dtype != x.dtype for x, o in zip(xs, out)):  # (e.g. autocast): convert by copying
        ys = conv2d_levels(xs, weight, bias, activation)
        for o, y in zip(out, ys):
            o.copy_(y)
        return ys
    for x, o in zip(xs, out):
        _check_conv_args(x, weight, bias)
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise TypeError("triton conv2d_levels: every level must share dtype and device")
        if o.device != x.device:
            raise ValueError(f"out must be on {x.device}, got {o.device}")
    act = check_activation(activation)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (weight, bias, *xs, *out))):
        conv_fwd_levels(xs, weight, bias, act, _into_config(xs, weight, out), outs=out)
        return out
    tokens = TritonConv2dLevelsIntoFunction.apply(weight, bias, activation, out, *xs)
    return [AdoptIntoFunction.apply(o, t) for o, t in zip(out, tokens)]
