"""CuPy warp: backward bilinear warp with border clamping (``warp.cu``).

Forward: one thread per output pixel computes its fp32 sample position and four taps once
and loops over a group of channels (``grid.y`` splits channels on small images).

Backward:
  * ``grad_image`` -- atomic scatter into a float32 buffer (then cast), or, when
    :func:`torch.are_deterministic_algorithms_enabled` or ``FILM_FAST_DETERMINISTIC=1``,
    a deterministic gather: output pixels are stable-sorted by top-left tap (torch.sort)
    and every image pixel sums its runs in a fixed order.
  * ``grad_flow`` -- one thread per pixel reduces over channels itself (deterministic),
    zero where the sample position is clamped (grid_sample ``border`` convention).
"""
from __future__ import annotations

import torch

from film_fast.ops import reference

from . import _runtime as rt

SOURCE = "warp.cu"
KERNELS = ("film_warp_forward", "film_warp_backward_image_atomic", "film_warp_backward_flow",
           "film_warp_tap_keys", "film_warp_backward_image_gather")


def _kernel(name: str, dtype: torch.dtype, device: int):
    assert name in KERNELS, name
    return rt.get_kernel(SOURCE, name, dtype, device)


def _check_devices(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"CuPy warp needs all tensors on one device, got {sorted(map(str, devices))}")


def warp_forward(image: torch.Tensor, flow: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """``out = warp(image, flow)``.

    Args:
        image: ``[B, C, H, W]`` float32/float16/bfloat16, any strides.
        flow: ``[B, 2, H, W]`` any of those dtypes, any strides.
        out: optional ``[B, C, H, W]`` destination in ``image.dtype`` (any strides, e.g. a
            channel slice of a larger buffer); allocated like ``image`` when None.
    """
    b, c, h, w = image.shape
    if out is None:
        out = torch.empty_like(image)
    if out.numel() == 0:
        return out
    dev = rt.device_index(image)
    groups, per_group = rt.channel_groups(b * h * w, c)
    rt.launch(_kernel("film_warp_forward", image.dtype, dev),
              (rt.blocks_for(b * h * w), groups), (rt.BLOCK,),
              (image, *rt.strides(image), flow, rt.kind(flow.dtype), *rt.strides(flow),
               out, *rt.strides(out), b, c, h, w, per_group), dev)
    return out


def warp_backward_image(grad_out: torch.Tensor, flow: torch.Tensor, image: torch.Tensor,
                        deterministic: bool = None) -> torch.Tensor:
    """``d loss / d image`` (shape, dtype and layout of ``image``) given ``d loss / d out``."""
    if deterministic is None:
        deterministic = rt.deterministic()
    b, c, h, w = image.shape
    dev = rt.device_index(image)
    fmt = rt.memory_format(image)
    if image.numel() == 0:
        return torch.zeros_like(image, memory_format=fmt)
    groups, per_group = rt.channel_groups(b * h * w, c)
    pixels = b * h * w
    if not deterministic:
        acc = torch.empty(image.shape, dtype=torch.float32, device=image.device,
                          memory_format=fmt).zero_()
        rt.launch(_kernel("film_warp_backward_image_atomic", grad_out.dtype, dev),
                  (rt.blocks_for(pixels), groups), (rt.BLOCK,),
                  (grad_out, *rt.strides(grad_out), flow, rt.kind(flow.dtype), *rt.strides(flow),
                   acc, *rt.strides(acc), b, c, h, w, per_group), dev)
        return acc if image.dtype == torch.float32 else acc.to(image.dtype)
    keys = torch.empty(pixels, dtype=torch.int64, device=image.device)
    fractions = torch.empty(pixels, 2, dtype=torch.float32, device=image.device)
    rt.launch(_kernel("film_warp_tap_keys", grad_out.dtype, dev), (rt.blocks_for(pixels),),
              (rt.BLOCK,), (flow, rt.kind(flow.dtype), *rt.strides(flow), keys, fractions, b, h, w),
              dev)
    sorted_keys, order = torch.sort(keys, stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(pixels + 1, device=image.device))
    grad_image = torch.empty(image.shape, dtype=grad_out.dtype, device=image.device,
                             memory_format=fmt)
    rt.launch(_kernel("film_warp_backward_image_gather", grad_out.dtype, dev),
              (rt.blocks_for(pixels), groups), (rt.BLOCK,),
              (grad_out, *rt.strides(grad_out), order, starts, fractions,
               grad_image, *rt.strides(grad_image), b, c, h, w, per_group), dev)
    return grad_image if grad_image.dtype == image.dtype else grad_image.to(image.dtype)


def warp_backward_flow(grad_out: torch.Tensor, image: torch.Tensor, flow: torch.Tensor,
                       dtype: torch.dtype = None) -> torch.Tensor:
    """``d loss / d flow`` as a contiguous ``[B, 2, H, W]`` tensor of ``dtype`` (default the
    flow's dtype; ``torch.float32`` keeps full precision for further accumulation)."""
    b, c, h, w = image.shape
    grad_flow = torch.empty(flow.shape, dtype=dtype or flow.dtype, device=flow.device)
    if grad_flow.numel() == 0:
        return grad_flow
    if c == 0:
        return grad_flow.zero_()
    dev = rt.device_index(image)
    rt.launch(_kernel("film_warp_backward_flow", image.dtype, dev), (rt.blocks_for(b * h * w),),
              (rt.BLOCK,),
              (grad_out, *rt.strides(grad_out), image, *rt.strides(image),
               flow, rt.kind(flow.dtype), *rt.strides(flow),
               grad_flow, rt.kind(grad_flow.dtype), *rt.strides(grad_flow), b, c, h, w), dev)
    return grad_flow


class CupyWarpFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(image, flow) -> warped``."""

    @staticmethod
    def forward(ctx, image, flow):
        ctx.save_for_backward(image, flow)
        return warp_forward(image, flow)

    @staticmethod
    def backward(ctx, grad_out):
        image, flow = ctx.saved_tensors
        # The kernels read grad_out with its storage dtype = the image dtype.
        grad_out = grad_out.to(image.dtype)
        grad_image = grad_flow = None
        if ctx.needs_input_grad[0]:
            grad_image = warp_backward_image(grad_out, flow, image)
        if ctx.needs_input_grad[1]:
            grad_flow = warp_backward_flow(grad_out, image, flow)
        return grad_image, grad_flow


def warp_into(image: torch.Tensor, flow: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.warp(..., out=out)`` without autograd: the kernel writes ``out`` directly."""
    if not rt.supported(image, flow) or out.dtype != image.dtype:
        return out.copy_(reference.warp(image, flow))
    _check_devices(image, flow)
    return warp_forward(image, flow, out=out)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``film_fast.ops.warp`` on the CuPy backend (float64 inputs use the reference)."""
    if not rt.supported(image, flow):
        return reference.warp(image, flow)
    _check_devices(image, flow)
    return CupyWarpFunction.apply(image, flow)
