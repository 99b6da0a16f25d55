"""The ``torch`` backend's fast paths: PyTorch/oneDNN calls equal to the reference up to rounding.

:mod:`film_fast.ops.reference` states each op plainly; the functions here
compute the same thing with fewer passes over memory where PyTorch offers a
way, and fall back to the reference everywhere else:

* conv + bias + LeakyReLU as one oneDNN primitive on CPU
  (``mkldnn._convolution_pointwise``, the op inductor uses for the same
  fusion): saves the separate activation pass (3% of a 512x512 frame) and runs
  the conv in its NHWC-blocked form. Only without autograd (it has no
  backward) and for fp32/bf16 (oneDNN's CPU dtypes).
* a 2x2 TF-'same' conv (pad bottom/right) as a symmetric ``padding=1`` conv
  read from offset (1, 1): identical sums, no padded copy of the input.
* ``upsample_flow`` with a residual as ``residual + 2 * resize(flow)`` in one
  ``add(alpha=2)`` after the resize instead of doubling the flow first: scaling by 2
  is exact and commutes with the (linear) resize and its rounding, so the result is
  bitwise the reference's with one pass fewer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import reference

_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) \
    if hasattr(torch.ops, "mkldnn") else None


def _onednn_fusable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if _POINTWISE is None or x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
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
