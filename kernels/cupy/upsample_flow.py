"""CuPy upsample_flow: ``resize_bilinear(2 * flow, size) (+ residual)`` (``upsample_flow.cu``).

Forward: one thread per fine pixel, both flow channels. Backward: ``grad_residual`` is the
incoming gradient itself; ``grad_flow`` is a deterministic gather (one thread per coarse
pixel sums the fine pixels that read it, float32 accumulation).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from film_fast.ops import reference

from . import _runtime as rt

SOURCE = "upsample_flow.cu"
KERNELS = ("film_upsample_flow_forward", "film_upsample_flow_backward")


def _kernel(name: str, dtype: torch.dtype, device: int):
    assert name in KERNELS, name
    return rt.get_kernel(SOURCE, name, dtype, device)


def upsample_flow_forward(flow: torch.Tensor, size: Sequence[int],
                          residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, 2, h, w]`` -> ``[B, 2, H, W]`` in ``flow.dtype`` (residual must share it)."""
    b, _, h, w = flow.shape
    H, W = int(size[0]), int(size[1])
    out = torch.empty((b, 2, H, W), dtype=flow.dtype, device=flow.device,
                      memory_format=rt.memory_format(flow))
    if out.numel() == 0:
        return out
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize an empty flow {list(flow.shape)} to {[H, W]}")
    dev = rt.device_index(flow)
    res_strides = rt.strides(residual) if residual is not None else (0, 0, 0, 0)
    rt.launch(_kernel("film_upsample_flow_forward", flow.dtype, dev), (rt.blocks_for(b * H * W),),
              (rt.BLOCK,),
              (flow, *rt.strides(flow), residual, *res_strides, int(residual is not None),
               out, *rt.strides(out), b, h, w, H, W), dev)
    return out


def upsample_flow_backward(grad: torch.Tensor, flow_shape: Sequence[int],
                           dtype: torch.dtype) -> torch.Tensor:
    """``d loss / d flow`` (``[B, 2, h, w]``, ``dtype``) from ``grad`` = ``d loss / d out``
    (``[B, 2, H, W]``, any supported dtype and strides)."""
    b, _, h, w = (int(s) for s in flow_shape)
    H, W = grad.shape[-2:]
    grad_flow = torch.empty((b, 2, h, w), dtype=dtype, device=grad.device)
    if grad_flow.numel() == 0:
        return grad_flow
    if grad.numel() == 0:
        return grad_flow.zero_()
    dev = rt.device_index(grad)
    rt.launch(_kernel("film_upsample_flow_backward", dtype, dev), (rt.blocks_for(b * h * w),),
              (rt.BLOCK,),
              (grad, rt.kind(grad.dtype), *rt.strides(grad), grad_flow, *rt.strides(grad_flow),
               b, h, w, H, W), dev)
    return grad_flow


class CupyUpsampleFlowFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(flow, H, W, residual) -> out``."""

    @staticmethod
    def forward(ctx, flow, height, width, residual):
        ctx.flow_shape = tuple(flow.shape)
        ctx.flow_dtype = flow.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return upsample_flow_forward(flow, (height, width), residual)

    @staticmethod
    def backward(ctx, grad):
        grad_flow = grad_residual = None
        if ctx.needs_input_grad[0]:
            grad_flow = upsample_flow_backward(grad, ctx.flow_shape, ctx.flow_dtype)
        if ctx.needs_input_grad[3]:
            grad_residual = grad.to(ctx.residual_dtype)
        return grad_flow, None, None, grad_residual


def upsample_flow(flow: torch.Tensor, size: Sequence[int],
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``film_fast.ops.upsample_flow`` on the CuPy backend (float64 uses the reference)."""
    if not rt.supported(flow, residual):
        return reference.upsample_flow(flow, size, residual)
    if residual is not None:
        if residual.device != flow.device:
            raise ValueError(f"residual is on {residual.device}, flow on {flow.device}")
        if residual.dtype != flow.dtype:  # the reference's result type: promote both
            dtype = torch.promote_types(flow.dtype, residual.dtype)
            flow, residual = flow.to(dtype), residual.to(dtype)
    return CupyUpsampleFlowFunction.apply(flow, int(size[0]), int(size[1]), residual)
