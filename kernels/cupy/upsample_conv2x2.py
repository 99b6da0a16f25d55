"""CuPy upsample_conv2x2: nearest-exact resize + 2x2 'same' conv as one direct kernel.

Forward (``upsample_conv2x2.cu``): each output pixel's four taps resolve to at most 2x2
source pixels of the coarse input, so the upsampled tensor (4x the input) is never written.
Weights are repacked per call into a small float32 ``[Cin, 4, Cout_pad]`` table; the kernel
accumulates in float32 for every storage dtype.

Backward runs through torch: the upsampled input is materialised once, the conv's gradients
come from ``torch.ops.aten.convolution_backward`` (cuDNN) and the resize's adjoint from
``aten._upsample_nearest_exact2d_backward`` (a deterministic gather).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from film_fast.ops import reference

from . import _runtime as rt

SOURCE = "upsample_conv2x2.cu"
KERNELS = ("film_upsample_conv2x2_forward",)
OC_TILE = 8  # output channels per thread; must match upsample_conv2x2.cu
CONV_BLOCK = 128


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, 2, 2]`` -> float32 ``[Cin, 4, Cout_pad]`` (taps 00, 01, 10, 11; zero pad)."""
    cout, cin = weight.shape[:2]
    cout_pad = -(-cout // OC_TILE) * OC_TILE
    packed = torch.zeros((cin, 4, cout_pad), dtype=torch.float32, device=weight.device)
    packed[:, :, :cout] = weight.detach().to(torch.float32).permute(1, 2, 3, 0).reshape(cin, 4, cout)
    return packed


def upsample_conv2x2_forward(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                             bias: Optional[torch.Tensor],
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, Cin, h, w]`` -> ``[B, Cout, H, W]`` in ``x``'s dtype and layout, or stored into
    ``out`` (any strides) when given."""
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    H, W = int(size[0]), int(size[1])
    if tuple(weight.shape) != (cout, cin, 2, 2):
        raise ValueError(f"weight must be [Cout, {cin}, 2, 2], got {list(weight.shape)}")
    if out is None:
        out = torch.empty((b, cout, H, W), dtype=x.dtype, device=x.device,
                          memory_format=rt.memory_format(x))
    if out.numel() == 0:
        return out
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize an empty input {list(x.shape)} to {[H, W]}")
    packed = pack_weight(weight)
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    dev = rt.device_index(x)
    rt.launch(rt.get_kernel(SOURCE, KERNELS[0], x.dtype, dev),
              (rt.blocks_for(b * H * W, CONV_BLOCK), -(-cout // OC_TILE)), (CONV_BLOCK,),
              (x, *rt.strides(x), packed, bias32, int(bias32 is not None),
               out, *rt.strides(out), b, cin, cout, packed.shape[2], h, w, H, W), dev)
    return out


class CupyUpsampleConv2x2Function(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, H, W, weight, bias_or_None) -> out``."""

    @staticmethod
    def forward(ctx, x, height, width, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.size = (height, width)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return upsample_conv2x2_forward(x, (height, width), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        need_b = ctx.needs_input_grad[4] and ctx.bias_dtype is not None
        grad = grad.to(x.dtype)
        height, width = ctx.size
        grad_x = grad_w = grad_b = None
        if need_b:
            grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        if need_x or need_w:
            up = F.interpolate(x, size=(height, width), mode="nearest-exact")
            up = F.pad(up, (0, 1, 0, 1))  # TF 'same' for 2x2: one zero row/column bottom/right
            grad_up, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, up, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need_x, need_w, False])
            if need_x:
                grad_x = torch.ops.aten._upsample_nearest_exact2d_backward(
                    grad_up[:, :, :height, :width], [height, width], list(x.shape), None, None)
        return grad_x, None, None, grad_w, grad_b


def upsample_conv2x2(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``film_fast.ops.upsample_conv2x2`` on the CuPy backend (float64 uses the reference)."""
    if not rt.supported(x, weight, bias):
        return reference.upsample_conv2x2(x, size, weight, bias)
    return CupyUpsampleConv2x2Function.apply(x, int(size[0]), int(size[1]), weight, bias)


def upsample_conv2x2_into(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                          bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.upsample_conv2x2(..., out=out)`` on the CuPy backend: the kernel stores
    into ``out`` (returned). With gradients recorded (or float64, or ``out`` of another dtype)
    it computes, copies, and returns the computed tensor."""
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (x, weight, bias, out))
    if recording or not rt.supported(x, weight, bias) or out.dtype != x.dtype:
        y = upsample_conv2x2(x, size, weight, bias)
        out.copy_(y)
        return y
    return upsample_conv2x2_forward(x, size, weight, bias, out)
