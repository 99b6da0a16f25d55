"""Fused flow-estimator step: ``up = resize_bilinear(2 flow)``, ``warped = warp(features, up)``.

Layouts: ``flow [B, 2, h, w]``, ``features [B, C, H, W]``, outputs ``up [B, 2,
H, W]`` (flow dtype) and ``warped [B, C, H, W]`` (features dtype), any strides;
``out`` may be a channel slice of a larger buffer (e.g. ``buf[:, Ca:]`` of the
flow predictor's input), which is written in place with its own strides.

One kernel (``_upsample_flow_warp_fwd_kernel``): a program owns ``BLOCK_P``
fine pixels of one batch element, interpolates the two flow channels from the
coarse level (same code as ``upsample_flow``), stores ``up``, and warps every
feature channel with it in ``BLOCK_C`` chunks (same code as ``warp``). The
warp reads the flow *as stored* (rounded to the flow dtype, then widened to
fp32 coordinates), so the fused op equals ``warp(features, upsample_flow(flow))``
exactly, in every dtype. The upsampled flow never makes a round trip through
memory before the warp uses it.

Backward reuses the unfused kernels: ``warp_bwd`` gives grad_features and the
gradient w.r.t. ``up`` (kept in fp32), to which ``up``'s own gradient is added,
and ``upsample_flow_bwd`` carries the sum to the coarse flow.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import utils
from .upsample_flow import _upsampled_flow_at, resize_scales, upsample_flow_bwd
from .warp import _border_sample_1d, _warp_channels, launch_config, warp_bwd


@triton.jit
def _upsample_flow_warp_fwd_kernel(
    flow_ptr,                          # *F   coarse flow [B, 2, h, w]
    feat_ptr,                          # *T   features [B, C, H, W]
    up_ptr,                            # *F   upsampled flow [B, 2, H, W] (fully written)
    out_ptr,                           # *T   warped features [B, C, H, W] (any strides)
    C, h, w, H, W,
    scale_h, scale_w,                  # fp32 h / H, w / W (ATen's rounding)
    s_fb, s_fc, s_fh, s_fw,            # coarse flow strides
    s_ib, s_ic, s_ih, s_iw,            # feature strides
    s_ub, s_uc, s_uh, s_uw,            # up strides
    s_ob, s_oc, s_oh, s_ow,            # out strides
    COORD: tl.constexpr,               # coordinate dtype (fp32; fp64 for fp64 flows)
    ACC_UP: tl.constexpr,              # flow interpolation dtype
    ACC: tl.constexpr,                 # feature accumulation dtype
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(cdiv(H*W, BLOCK_P), B)``."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    y = p // W
    x = p % W
    pmask = y < H
    u, v = _upsampled_flow_at(flow_ptr, b, y, x, pmask, h, w, scale_h, scale_w,
                              s_fb, s_fc, s_fh, s_fw, ACC_UP)
    u = u.to(up_ptr.dtype.element_ty)
    v = v.to(up_ptr.dtype.element_ty)
    uofs = b * s_ub + y * s_uh + x * s_uw
    tl.store(up_ptr + uofs, u, mask=pmask)
    tl.store(up_ptr + uofs + s_uc, v, mask=pmask)
    x0, x1, tx, _mx = _border_sample_1d(x.to(COORD) + u.to(COORD), W)
    y0, y1, ty, _my = _border_sample_1d(y.to(COORD) + v.to(COORD), H)
    out_pix = b * s_ob + y * s_oh + x * s_ow
    _warp_channels(feat_ptr, out_ptr, b, C, x0, x1, y0, y1, tx, ty, pmask, out_pix,
                   s_ib, s_ic, s_ih, s_iw, s_oc, ACC, BLOCK_C)


def upsample_flow_warp_fwd(flow: torch.Tensor, features: torch.Tensor,
                           out: Optional[torch.Tensor] = None, config=None):
    """Launches the fused kernel; returns ``(up, warped)`` (``warped is out`` when given)."""
    b, c, H, W = features.shape
    h, w = flow.shape[-2:]
    up = utils.empty_4d((b, 2, H, W), flow.dtype, flow.device, features)
    if out is None:
        out = utils.empty_4d(features.shape, features.dtype, features.device, features)
    if up.numel() == 0:  # no pixels (or no batch): nothing to write
        return up, out
    block_p, block_c, warps = config or launch_config(c)
    scale_h, scale_w = resize_scales((h, w), (H, W))
    _upsample_flow_warp_fwd_kernel[(utils.cdiv(H * W, block_p), b)](
        flow, features, up, out, c, h, w, H, W, scale_h, scale_w,
        *utils.strides(flow), *utils.strides(features), *utils.strides(up), *utils.strides(out),
        COORD=utils.coord_dtype(flow.dtype), ACC_UP=utils.acc_dtype(flow.dtype),
        ACC=utils.acc_dtype(features.dtype, flow.dtype),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return up, out


class TritonUpsampleFlowWarpFunction(torch.autograd.Function):
    """Autograd node of the fused kernel, as seen from ``flow``: returns ``up``.

    The fused kernel also writes the warped features into ``out_holder[0]``
    (allocated here when it is None); autograd does not see that tensor here:
    :class:`TritonWarpIntoFunction` adopts it next. The split exists because
    autograd cannot let one Function both return two tensors and write into a
    view (``out`` is usually a channel slice of a bigger buffer).
    """

    @staticmethod
    def forward(ctx, flow, features, out_holder):
        config = launch_config(features.shape[1])
        up, out_holder[0] = upsample_flow_warp_fwd(flow, features, out_holder[0], config)
        ctx.coarse = tuple(flow.shape[-2:])
        ctx.flow_dtype = flow.dtype
        return up

    @staticmethod
    def backward(ctx, grad_up):
        grad_flow = None
        if ctx.needs_input_grad[0]:
            grad_flow = upsample_flow_bwd(grad_up, ctx.coarse, ctx.flow_dtype)
        return grad_flow, None, None


class TritonWarpIntoFunction(torch.autograd.Function):
    """``warped = warp(features, up)``, already computed by the fused kernel into ``out``.

    Forward only adopts ``out`` (marked dirty: it was overwritten in place);
    backward is the warp's: grad_features and the gradient w.r.t. ``up``, which
    autograd adds to ``up``'s own gradient before :class:`TritonUpsampleFlowWarpFunction`
    carries it to the coarse flow.
    """

    @staticmethod
    def forward(ctx, out, up, features):
        # ``out`` comes first: for an in-place write into a view, autograd's CopySlices maps the
        # Function's first input onto the view's base (the convention of torch's in-place ops).
        ctx.mark_dirty(out)
        ctx.save_for_backward(features, up)
        ctx.config = launch_config(features.shape[1])  # the tiling the fused forward used
        return out

    @staticmethod
    def backward(ctx, grad_warped):
        features, up = ctx.saved_tensors
        need_out, need_up, need_features = ctx.needs_input_grad[:3]
        # out's old content does not reach the result, so its gradient is zero, but it must be a
        # zero *tensor*, not None: when ``out`` is a view (``buf[:, Ca:]``), autograd wraps this
        # node in CopySlices, which routes input 0's gradient to the whole base buffer: it copies
        # it into the view's region of the base's gradient and passes the rest through. A None
        # here makes CopySlices drop the base's gradient entirely, i.e. the gradient of every
        # *other* channel of the buffer (the flow predictor's ``a`` features, written by
        # copy_ before this op) silently vanished.
        grad_out = torch.zeros_like(grad_warped) if need_out else None
        if not (need_up or need_features):
            return grad_out, None, None
        grad_features, grad_up = warp_bwd(features, up, grad_warped, need_features, need_up,
                                          config=ctx.config)
        return grad_out, grad_up, grad_features


def upsample_flow_warp(flow: torch.Tensor, features: torch.Tensor,
                       out: Optional[torch.Tensor] = None):
    """``film_fast.ops.upsample_flow_warp`` for the triton backend: ``(up, warped)``."""
    utils.check_supported("flow", flow)
    utils.check_supported("features", features)
    if out is not None:
        if out.dtype != features.dtype or out.device != features.device:
            raise TypeError(f"out must be {features.dtype} on {features.device}, got {out.dtype} "
                            f"on {out.device}")
    if not (torch.is_grad_enabled() and (flow.requires_grad or features.requires_grad)):
        return upsample_flow_warp_fwd(flow, features, out)  # inference: no autograd bookkeeping
    holder = [out]
    up = TritonUpsampleFlowWarpFunction.apply(flow, features, holder)
    warped = TritonWarpIntoFunction.apply(holder[0], up, features)
    return up, warped
