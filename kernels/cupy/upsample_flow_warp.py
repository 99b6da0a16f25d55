"""CuPy upsample_flow_warp: upsample a coarse flow and warp the finer level in one kernel.

Forward (``upsample_flow_warp.cu``): one thread per fine pixel and channel group produces
both ``up`` and ``warped``; ``warped`` goes straight into ``out`` when given (any strides,
e.g. ``buf[:, Ca:]`` of the flow predictor's input buffer, NCHW or NHWC), so no concat.

Backward reuses the warp and upsample_flow kernels: ``grad_features`` is warp's image
gradient (atomic or deterministic) with the saved ``up``; ``grad_flow`` is upsample_flow's
gather of ``grad_up + d warped / d up`` (summed in float32).
"""
from __future__ import annotations

from typing import Optional

import torch

from film_fast.ops import reference

from . import _runtime as rt
from .upsample_flow import upsample_flow_backward
from .warp import warp_backward_flow, warp_backward_image

SOURCE = "upsample_flow_warp.cu"
KERNELS = ("film_upsample_flow_warp_forward",)


def upsample_flow_warp_forward(flow: torch.Tensor, features: torch.Tensor,
                               out: Optional[torch.Tensor] = None):
    """Returns ``(up [B, 2, H, W] in flow.dtype, warped [B, C, H, W] in features.dtype)``;
    ``warped is out`` when ``out`` (same dtype as ``features``) is given."""
    b, c, H, W = features.shape
    _, _, h, w = flow.shape
    up = torch.empty((b, 2, H, W), dtype=flow.dtype, device=flow.device,
                     memory_format=rt.memory_format(features))
    if out is None:
        out = torch.empty_like(features)
    if up.numel() == 0:
        return up, out
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize an empty flow {list(flow.shape)} to {[H, W]}")
    dev = rt.device_index(features)
    groups, per_group = rt.channel_groups(b * H * W, c)
    rt.launch(rt.get_kernel(SOURCE, KERNELS[0], features.dtype, dev),
              (rt.blocks_for(b * H * W), groups), (rt.BLOCK,),
              (flow, rt.kind(flow.dtype), *rt.strides(flow), up, *rt.strides(up),
               features, *rt.strides(features), out, *rt.strides(out),
               b, c, h, w, H, W, per_group), dev)
    return up, out


class CupyUpsampleFlowWarpFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(flow, features) -> (up, warped)``."""

    @staticmethod
    def forward(ctx, flow, features):
        ctx.set_materialize_grads(False)
        up, warped = upsample_flow_warp_forward(flow, features)
        ctx.save_for_backward(features, up)
        ctx.flow_shape = tuple(flow.shape)
        ctx.flow_dtype = flow.dtype
        return up, warped

    @staticmethod
    def backward(ctx, grad_up, grad_warped):
        features, up = ctx.saved_tensors
        grad_flow = grad_features = None
        if grad_warped is not None:
            grad_warped = grad_warped.to(features.dtype)
            if ctx.needs_input_grad[1]:
                grad_features = warp_backward_image(grad_warped, up, features)
        if ctx.needs_input_grad[0] and (grad_up is not None or grad_warped is not None):
            grad = None
            if grad_warped is not None:
                grad = warp_backward_flow(grad_warped, features, up, dtype=torch.float32)
            if grad_up is not None:
                grad = grad_up if grad is None else grad.add_(grad_up)
            grad_flow = upsample_flow_backward(grad, ctx.flow_shape, ctx.flow_dtype)
        return grad_flow, grad_features


def upsample_flow_warp(flow: torch.Tensor, features: torch.Tensor,
                       out: Optional[torch.Tensor] = None):
    """``film_fast.ops.upsample_flow_warp`` on the CuPy backend.

    Inference (no input requires grad, or grad mode off) writes ``warped`` straight into
    ``out``. When autograd must record the op, the kernel writes a fresh tensor that is
    then copied into ``out`` (autograd cannot record a multi-output Function writing into a
    view in place). float64 tensors use the reference.
    """
    if not rt.supported(flow, features):
        return reference.upsample_flow_warp(flow, features, out)
    devices = {flow.device, features.device} | ({out.device} if out is not None else set())
    if len(devices) != 1:
        raise ValueError(f"upsample_flow_warp needs one device, got {sorted(map(str, devices))}")
    if out is None:
        return CupyUpsampleFlowWarpFunction.apply(flow, features)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (flow, features, out))
    if recording or out.dtype != features.dtype:
        up, warped = CupyUpsampleFlowWarpFunction.apply(flow, features)
        out.copy_(warped)
        return up, out
    up, _ = upsample_flow_warp_forward(flow, features, out)
    # The kernel wrote through a raw pointer: tell autograd's version counter, as an in-place
    # torch op would, so a stale saved copy of the buffer can never be used silently.
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(out)
    return up, out
