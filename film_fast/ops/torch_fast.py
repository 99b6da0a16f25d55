"""The ``torch`` backend's fast paths: PyTorch/oneDNN calls equal to the reference up to rounding.

:mod:`film_fast.ops.reference` states each op plainly; the functions here
compute the same thing with fewer passes over memory where PyTorch offers a
way, and fall back to the reference everywhere else:

* conv + bias + LeakyReLU as one oneDNN primitive on CPU
  (``mkldnn._convolution_pointwise``, the op inductor uses for the same
  fusion): saves the separate activation pass (3% of a 512x512 frame) and runs
  the conv in its NHWC-blocked form. Only without autograd (it has no
  backward) and for fp32/bf16 (oneDNN's CPU dtypes).
* 3x3 convs with 64+ channels on both sides (128+ without the C transforms; the shape rule
  is :func:`film_fast.ops.winograd.tile_size`) in fp32 as Winograd F(4x4, 3x3) or F(2x2, 3x3)
  (:mod:`film_fast.ops.winograd`): 4x or 2.25x fewer multiplies, 1.2-3.4x faster than
  oneDNN's direct conv, without autograd.
* a 2x2 TF-'same' conv (pad bottom/right) as a symmetric ``padding=1`` conv
  read from offset (1, 1): identical sums, no padded copy of the input.
* the warp (and the flow estimator's upsample + warp) as one weighted row gather on CPU
  (:mod:`film_fast.ops.gather_warp`) instead of ``grid_sample``, without autograd.
* the fusion decoder's nearest 2x upsample + 2x2 conv as four small convs of the coarse
  input, one per output phase (:mod:`film_fast.ops.phase_upconv`): 9/16 of the FLOPs and no
  upsampled tensor (fp32 inference, ``out=``).
* ``upsample_flow`` with a residual as ``residual + 2 * resize(flow)`` in one
  ``add(alpha=2)`` after the resize instead of doubling the flow first: scaling by 2
  is exact and commutes with the (linear) resize and its rounding, so the result is
  bitwise the reference's with one pass fewer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..cpu_features import native_bf16
from . import gather_warp, phase_upconv, reference, winograd

_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) \
    if hasattr(torch.ops, "mkldnn") else None


def _onednn_fusable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if _POINTWISE is None or x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if x.dtype == torch.bfloat16 and not native_bf16():
        return False  # the fused op raises on CPUs without AVX512-BF16/AMX (e.g. AMD Zen 3)
    if bias is not None and bias.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return True


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           activation: Optional[str] = None) -> torch.Tensor:
    """Same contract as :func:`film_fast.ops.reference.conv2d`."""
    if activation not in (None, "leaky_relu"):
        return reference.conv2d(x, weight, bias, activation)
    kh, kw = weight.shape[-2:]
    odd = kh % 2 == 1 and kw % 2 == 1
    if (kh, kw) == (3, 3) and winograd.eligible(x, weight, bias):
        return winograd.conv3x3(x, weight, bias, activation)
    if odd and _onednn_fusable(x, weight, bias):
        attr, scalars = ("leaky_relu", [reference.LEAKY_SLOPE]) if activation else ("none", [])
        return _POINTWISE(x, weight, bias, [kh // 2, kw // 2], [1, 1], [1, 1], 1, attr, scalars, "")
    if (kh, kw) == (2, 2):
        # out[y, x] = sum_{dy,dx<2} x[y+dy, x+dx] (zero past the bottom/right) is the (y+1, x+1)
        # output of a padding=1 conv: no padded copy of a tensor of up to 1930 channels.
        y = F.conv2d(x, weight, bias, padding=1)[..., 1:, 1:]
        return F.leaky_relu(y, reference.LEAKY_SLOPE) if activation else y
    return reference.conv2d(x, weight, bias, activation)


def conv2d_levels(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: Optional[str] = None) -> list:
    return [conv2d(x, weight, bias, activation) for x in xs]


def conv2d_levels_into(xs: Sequence[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor], activation: Optional[str],
                       out: Sequence[torch.Tensor]) -> list:
    """oneDNN writes its own (dense) output: computed, then copied into ``out``; returns the
    dense results, which the next ops read faster than strided buffer slices."""
    ys = conv2d_levels(xs, weight, bias, activation)
    for o, y in zip(out, ys):
        o.copy_(y)
    return ys


def conv2d_pool(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                activation: Optional[str] = None):
    y = conv2d(x, weight, bias, activation)
    return y, reference.avg_pool2x2(y)


def upsample_conv2x2(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    up = F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest-exact")
    return conv2d(up, weight, bias, None)


def upsample_conv2x2_into(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                          bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """CPU fp32 inference: the four output phases at coarse resolution, stored straight into
    ``out`` (:mod:`film_fast.ops.phase_upconv`); otherwise computed, then copied."""
    if phase_upconv.eligible(x, size, weight, bias):
        return phase_upconv.upsample_conv2x2_into(x, weight, bias, out)
    y = upsample_conv2x2(x, size, weight, bias)
    out.copy_(y)
    return y


def upsample_flow(flow: torch.Tensor, size: Sequence[int],
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract (and bits) as :func:`film_fast.ops.reference.upsample_flow`."""
    if residual is None:
        return reference.upsample_flow(flow, size)
    up = F.interpolate(flow, size=tuple(int(s) for s in size), mode="bilinear",
                       align_corners=False)
    return torch.add(residual, up, alpha=2)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`film_fast.ops.reference.warp` (NCHW contiguous result)."""
    if gather_warp.eligible(image, flow):
        return gather_warp.warp(image, flow)
    return reference.warp(image, flow)


def warp_into(image: torch.Tensor, flow: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`film_fast.ops.reference.warp_into`."""
    if gather_warp.eligible(image, flow):
        return gather_warp.warp(image, flow, out=out)
    return reference.warp_into(image, flow, out)


def upsample_flow_warp(flow: torch.Tensor, features: torch.Tensor,
                       out: Optional[torch.Tensor] = None):
    """Same contract as :func:`film_fast.ops.reference.upsample_flow_warp`."""
    if not gather_warp.eligible(features, flow):
        return reference.upsample_flow_warp(flow, features, out)
    up = upsample_flow(flow, features.shape[-2:])
    return up, gather_warp.warp(features, up, out=out)
