"""Readable pure-PyTorch reference implementations of FILM's hot paths.

These functions are the specification every kernel backend is tested against,
the CPU execution path, and the benchmark baseline. They follow the operator
conventions of the official TF2 model (see FILM-SEMANTICS.md):

* tensors are NCHW: ``image [B, C, H, W]``, ``flow [B, 2, H, W]`` holding
  ``(dx, dy)`` in pixels of that tensor's resolution;
* bilinear resizes use half-pixel centres (TF2 ``tf.image.resize`` ==
  ``interpolate(mode="bilinear", align_corners=False)``);
* nearest resizes use half-pixel centres (``mode="nearest-exact"``);
* 'same' padding of an even (2x2) kernel pads one row at the bottom and one
  column at the right only;
* every named activation is LeakyReLU with slope 0.2.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .eager import untraced

LEAKY_SLOPE = 0.2


_GRIDS: dict = {}


def _make_grid(height: int, width: int, dtype: torch.dtype, device: torch.device):
    xs = (2 * torch.arange(width, dtype=torch.float64, device=device) + 1) / width - 1
    ys = (2 * torch.arange(height, dtype=torch.float64, device=device) + 1) / height - 1
    base = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)
    # 2 / (W, H) by a tensor division (== Python's 2.0 / W in float64) rather than
    # torch.tensor([2.0 / W, ...]), which would bake the size into a traced graph.
    f64 = dict(dtype=torch.float64, device=device)
    sizes = torch.stack([torch.full((), width, **f64), torch.full((), height, **f64)])
    scale = torch.full((2,), 2.0, **f64).div(sizes)
    return base.unsqueeze(0).to(dtype), scale.to(dtype)


def _pixel_grid(height: int, width: int, dtype: torch.dtype, device: torch.device):
    """``(base [1, H, W, 2], scale [2])``: normalised pixel centres and the pixel->grid factor.

    Cached per size: FILM warps the same few pyramid sizes every frame, and rebuilding
    the grid costs ~8 small ops per warp. Not while tracing (``torch.compile``, fake
    tensors): the grid is then part of the graph and the cache holds real tensors only.
    """
    if not untraced():  # (see film_fast.ops.eager.untraced)
        return _make_grid(height, width, dtype, device)
    key = (height, width, dtype, str(device))
    cached = _GRIDS.get(key)
    if cached is None:
        with torch.inference_mode(False), torch.no_grad():
            base, scale = _make_grid(height, width, torch.float64, torch.device("cpu"))
            cached = (base.to(device=device, dtype=dtype), scale.to(device=device, dtype=dtype))
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        _GRIDS[key] = cached
    return cached


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward bilinear warp with border clamping.

    ``out[b, :, y, x] = bilinear(image[b], x + flow[b, 0, y, x], y + flow[b, 1, y, x])``
    where sample positions outside the image are clamped to its border (a
    sample left of column 0 reads column 0).

    Sample coordinates are always built in float32 whatever ``image.dtype``: an
    fp16 grid at 1920 px width is quantised to 1 ulp = 0.5..1 px, which is what
    makes the port's fp16 model sample up to 0.47 px off. For the same reason
    the sampling itself runs in float32 (CPU grid_sample in fp16/bf16 returns
    garbage); the result is cast back to ``image.dtype``.

    Args:
        image: ``[B, C, H, W]`` any float dtype.
        flow: ``[B, 2, H, W]`` ``(dx, dy)`` in pixels.
    Returns:
        ``[B, C, H, W]`` in ``image.dtype``.
    """
    grid, sample_dtype = _warp_grid(image, flow)
    return _sample(image, grid, sample_dtype).to(image.dtype)


def _warp_grid(image: torch.Tensor, flow: torch.Tensor):
    _, _, height, width = image.shape
    coord_dtype = torch.promote_types(flow.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    sample_dtype = torch.promote_types(image.dtype, coord_dtype)
    base, scale = _pixel_grid(height, width, coord_dtype, flow.device)
    # grid_sample(align_corners=False) reads pixel (g + 1) * W / 2 - 0.5 at normalised g, so pixel
    # x + dx is g = (2x + 1) / W - 1 + dx * 2 / W: the cached base plus the scaled flow.
    grid = torch.addcmul(base, flow.to(coord_dtype).permute(0, 2, 3, 1), scale)
    return grid.to(sample_dtype), sample_dtype


def _sample(image: torch.Tensor, grid: torch.Tensor, sample_dtype: torch.dtype) -> torch.Tensor:
    return F.grid_sample(image.to(sample_dtype), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def warp_into(image: torch.Tensor, flow: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`warp` written into ``out`` (any strides and dtype): the sampled fp32 result is
    converted inside the copy, one pass fewer than ``out.copy_(warp(image, flow))`` in bf16."""
    grid, sample_dtype = _warp_grid(image, flow)
    out.copy_(_sample(image, grid, sample_dtype))
    return out


def upsample_flow(flow: torch.Tensor, size: Sequence[int],
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Coarse-to-fine flow step: ``resize_bilinear(2 * flow, size) (+ residual)``.

    The flow is doubled before the resize (as the official code does) because
    displacements are measured in pixels of the finer level.

    Args:
        flow: ``[B, 2, h, w]`` flow at the coarser level.
        size: ``(H, W)`` of the finer level (normally ``(2h, 2w)``).
        residual: optional ``[B, 2, H, W]`` added after the resize.
    Returns:
        ``[B, 2, H, W]``.
    """
    out = F.interpolate(2 * flow, size=tuple(int(s) for s in size), mode="bilinear",
                        align_corners=False)
    if residual is not None:
        out = residual + out
    return out


def _same_pad(kernel_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """TF 'same' padding (left, right, top, bottom) for stride 1: extra goes right/bottom."""
    kh, kw = kernel_size
    return ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           activation: Optional[str] = None) -> torch.Tensor:
    """Stride-1 'same' convolution, bias, optional LeakyReLU(0.2).

    Args:
        x: ``[B, Cin, H, W]``.
        weight: ``[Cout, Cin, kh, kw]`` (OIHW).
        bias: ``[Cout]`` or None.
        activation: ``None`` or ``"leaky_relu"``.
    Returns:
        ``[B, Cout, H, W]``.
    """
    kh, kw = weight.shape[-2:]
    if kh % 2 and kw % 2:
        y = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2))
    else:
        y = F.conv2d(F.pad(x, _same_pad((kh, kw))), weight, bias)
    if activation == "leaky_relu":
        y = F.leaky_relu(y, LEAKY_SLOPE)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}; expected None or 'leaky_relu'")
    return y


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, stride 2, 'valid': ``[B, C, H, W] -> [B, C, H//2, W//2]``."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def avg_pool2x2_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`avg_pool2x2` written into ``out`` (any strides). Returns the dense result (equal
    to ``out``; PyTorch's pooling has no strided ``out=``, so this computes and copies)."""
    y = avg_pool2x2(x)
    out.copy_(y)
    return y


def upsample_conv2x2(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The fusion decoder's up step: nearest resize to ``size``, then a 2x2 'same' conv.

    Args:
        x: ``[B, Cin, h, w]`` coarse decoder state.
        size: ``(H, W)`` of the finer level.
        weight: ``[Cout, Cin, 2, 2]``.
        bias: ``[Cout]`` or None.
    Returns:
        ``[B, Cout, H, W]``, no activation.
    """
    up = F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest-exact")
    return conv2d(up, weight, bias, activation=None)


def upsample_conv2x2_into(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                          bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """:func:`upsample_conv2x2` written into ``out`` (any strides); returns the dense result."""
    y = upsample_conv2x2(x, size, weight, bias)
    out.copy_(y)
    return y


# ---- fused compositions (kernel backends implement each in one pass) ----------------------
def upsample_flow_warp(flow: torch.Tensor, features: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One coarse-to-fine step of the flow estimator: upsample the flow, warp the next level.

    ``up = resize_bilinear(2 * flow, features.shape[-2:])``;
    ``warped = warp(features, up)``.

    Args:
        flow: ``[B, 2, h, w]`` coarse flow.
        features: ``[B, C, H, W]`` the finer level's features of the frame to warp.
        out: optional ``[B, C, H, W]`` destination for ``warped`` (typically a channel
            slice of the buffer the flow predictor reads, so no concat is needed).
    Returns:
        ``(up [B, 2, H, W], warped [B, C, H, W])``; ``warped is out`` when given.
    """
    up = upsample_flow(flow, features.shape[-2:])
    warped = warp(features, up)
    if out is not None:
        out.copy_(warped)
        warped = out
    return up, warped


def conv2d_levels(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: Optional[str] = None) -> list:
    """The same conv applied to several pyramid levels (FILM shares sub-tree and predictor weights).

    Args:
        xs: list of ``[B_l, Cin, H_l, W_l]``.
    Returns:
        list of ``[B_l, Cout, H_l, W_l]``.
    """
    return [conv2d(x, weight, bias, activation) for x in xs]


def conv2d_levels_into(xs: Sequence[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor], activation: Optional[str],
                       out: Sequence[torch.Tensor]) -> list:
    """:func:`conv2d_levels` written into ``out[l]`` (any strides, e.g. channel slices of level
    buffers). Returns the dense per-level results (equal to ``out``)."""
    ys = conv2d_levels(xs, weight, bias, activation)
    for o, y in zip(out, ys):
        o.copy_(y)
    return ys


def conv2d_pool(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                activation: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Conv (+bias, +activation) and its 2x2 average pool (the next sub-tree stage's input).

    Returns:
        ``(y [B, Cout, H, W], avg_pool2x2(y) [B, Cout, H//2, W//2])``.
    """
    y = conv2d(x, weight, bias, activation)
    return y, avg_pool2x2(y)
