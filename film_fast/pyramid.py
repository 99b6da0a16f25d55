"""Pyramid helpers: image pyramids, flow synthesis, size alignment.

Pyramids are Python lists, finest level first; level ``i`` has ``H >> i`` rows.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import ops


def build_image_pyramid(image: torch.Tensor, levels: int, backend: Optional[str] = None,
                        out: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """``[image, pool(image), pool(pool(image)), ...]`` with ``levels`` entries (2x2 average pooling).

    ``out``: optional ``levels - 1`` destinations for the pooled levels (e.g. the image
    channels of each level buffer), written by the pooling itself; the returned levels are
    then tensors equal to them (see :func:`film_fast.ops.avg_pool2x2`).
    """
    pyramid = [image]
    for i in range(levels - 1):
        image = ops.avg_pool2x2(image, out=None if out is None else out[i], backend=backend)
        pyramid.append(image)
    return pyramid


def synthesize_flow_pyramid(residuals: Sequence[torch.Tensor], keep: int,
                            backend: Optional[str] = None) -> List[torch.Tensor]:
    """Turns a residual flow pyramid into flows: ``flow_i = residual_i + resize(2 flow_{i+1})``.

    Only the ``keep`` finest levels are returned (the fusion decoder's levels);
    coarser levels are still accumulated since finer flows depend on them.
    """
    flow = residuals[-1]
    out = [flow]
    for residual in reversed(residuals[:-1]):
        flow = ops.upsample_flow(flow, residual.shape[-2:], residual, backend=backend)
        out.append(flow)
    out.reverse()
    return out[:keep]


def padding_for(height: int, width: int, multiple: int) -> Tuple[int, int, int, int]:
    """Centred padding ``(left, right, top, bottom)`` to the next multiple, as the official wrapper.

    The official code pads ``pad // 2`` before and the rest after on each axis.
    """
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def pad_to_multiple(x: torch.Tensor, multiple: int,
                    mode: str = "zeros") -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """Pads ``[B, C, H, W]``, centred, so that H and W are multiples of ``multiple``.

    ``mode``: ``"zeros"`` (the official wrapper's) or ``"replicate"`` (edge pixels repeated;
    any pad width, unlike reflection, so a 1-pixel-wide input still pads).
    """
    pads = padding_for(x.shape[-2], x.shape[-1], multiple)
    if any(pads):
        if mode == "zeros":
            x = F.pad(x, pads)
        elif mode == "replicate":
            x = F.pad(x, pads, mode="replicate")
        else:
            raise ValueError(f"unknown padding mode {mode!r}; use 'zeros' or 'replicate'")
    return x, pads


def fill_padding(x: torch.Tensor, pads: Tuple[int, int, int, int], mode: str) -> None:
    """Fills the border of ``x [B, C, H, W]`` around its inner ``pads``-cropped region in place,
    as :func:`pad_to_multiple` would have: zeros, or the inner region's edge pixels repeated
    (left and right columns over the inner rows first, then whole top and bottom rows, so
    the corners take the corner pixels, as ``F.pad(mode="replicate")``)."""
    left, right, top, bottom = pads
    if not any(pads):
        return
    height, width = x.shape[-2] - top - bottom, x.shape[-1] - left - right
    if mode == "zeros":
        x[..., :top, :].zero_()
        x[..., top + height:, :].zero_()
        x[..., top:top + height, :left].zero_()
        x[..., top:top + height, left + width:].zero_()
        return
    if mode != "replicate":
        raise ValueError(f"unknown padding mode {mode!r}; use 'zeros' or 'replicate'")
    rows = x[..., top:top + height, :]
    if left:
        rows[..., :left].copy_(rows[..., left:left + 1].expand_as(rows[..., :left]))
    if right:
        rows[..., left + width:].copy_(
            rows[..., left + width - 1:left + width].expand_as(rows[..., left + width:]))
    if top:
        x[..., :top, :].copy_(x[..., top:top + 1, :].expand_as(x[..., :top, :]))
    if bottom:
        x[..., top + height:, :].copy_(
            x[..., top + height - 1:top + height, :].expand_as(x[..., top + height:, :]))


def crop_padding(x: torch.Tensor, pads: Tuple[int, int, int, int]) -> torch.Tensor:
    """Undoes :func:`pad_to_multiple` on a full-resolution ``[B, C, H, W]`` tensor."""
    left, right, top, bottom = pads
    if not any(pads):
        return x
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
