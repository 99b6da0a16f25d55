"""CuPy avg_pool2x2: 2x2 / stride-2 'valid' average pooling and its gradient (``avg_pool2x2.cu``).

One thread per output element (forward) / input element (backward, a gather: no atomics),
threads ordered like the tensor's memory (NCHW or NHWC).
"""
from __future__ import annotations

from typing import Optional

import torch

from film_fast.ops import reference

from . import _runtime as rt

SOURCE = "avg_pool2x2.cu"
KERNELS = ("film_avg_pool2x2_forward", "film_avg_pool2x2_backward")


def _kernel(name: str, dtype: torch.dtype, device: int):
    assert name in KERNELS, name
    return rt.get_kernel(SOURCE, name, dtype, device)


def avg_pool2x2_forward(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, H // 2, W // 2]`` in ``x``'s dtype and layout, or stored
    into ``out`` (any strides) when given."""
    b, c, h, w = x.shape
    if out is None:
        out = torch.empty((b, c, h // 2, w // 2), dtype=x.dtype, device=x.device,
                          memory_format=rt.memory_format(x))
    if out.numel() == 0:
        return out
    dev = rt.device_index(x)
    rt.launch(_kernel("film_avg_pool2x2_forward", x.dtype, dev), (rt.blocks_for(out.numel()),),
              (rt.BLOCK,), (x, *rt.strides(x), out, *rt.strides(out), b, c, h, w,
                            rt.is_channels_last(out)), dev)
    return out


def avg_pool2x2_backward(grad_out: torch.Tensor, x_shape, dtype: torch.dtype,
                         memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``d loss / d x`` of shape ``x_shape`` in ``dtype`` / ``memory_format``."""
    b, c, h, w = (int(s) for s in x_shape)
    grad_x = torch.empty((b, c, h, w), dtype=dtype, device=grad_out.device,
                         memory_format=memory_format)
    if grad_x.numel() == 0:
        return grad_x
    grad_out = grad_out.to(dtype)
    dev = rt.device_index(grad_x)
    rt.launch(_kernel("film_avg_pool2x2_backward", dtype, dev), (rt.blocks_for(grad_x.numel()),),
              (rt.BLOCK,), (grad_out, *rt.strides(grad_out), grad_x, *rt.strides(grad_x),
                            b, c, h, w, rt.is_channels_last(grad_x)), dev)
    return grad_x


class CupyAvgPool2x2Function(torch.autograd.Function):
    """Autograd wrapper: ``apply(x) -> avg_pool2x2(x)``; only x's metadata is saved."""

    @staticmethod
    def forward(ctx, x):
        ctx.x_shape, ctx.x_dtype, ctx.x_format = tuple(x.shape), x.dtype, rt.memory_format(x)
        return avg_pool2x2_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None
        return avg_pool2x2_backward(grad_out, ctx.x_shape, ctx.x_dtype, ctx.x_format)


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.avg_pool2x2`` on the CuPy backend (float64 uses the reference)."""
    if not rt.supported(x):
        return reference.avg_pool2x2(x)
    return CupyAvgPool2x2Function.apply(x)


def avg_pool2x2_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.avg_pool2x2(x, out=out)`` on the CuPy backend: the kernel stores into
    ``out`` (returned). With gradients recorded (or float64, or ``out`` of another dtype) it
    computes, copies, and returns the computed tensor."""
    if (not rt.supported(x) or out.dtype != x.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or out.requires_grad))):
        y = avg_pool2x2(x)
        out.copy_(y)
        return y
    return avg_pool2x2_forward(x, out)
