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
    """Centred zero padding ``(left, right, top, bottom)`` to the next multiple, as the official wrapper.

    The official code pads ``pad // 2`` before and the rest after on each axis.
    """
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """Pads ``[B, C, H, W]`` with zeros, centred, so that H and W are multiples of ``multiple``."""
    pads = padding_for(x.shape[-2], x.shape[-1], multiple)
    if any(pads):
        x = F.pad(x, pads)
    return x, pads


def crop_padding(x: torch.Tensor, pads: Tuple[int, int, int, int]) -> torch.Tensor:
    """Undoes :func:`pad_to_multiple` on a full-resolution ``[B, C, H, W]`` tensor."""
    left, right, top, bottom = pads
    if not any(pads):
        return x
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
