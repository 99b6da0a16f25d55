"""U-Net-style fusion decoder (film_net ``fusion``).

Input: per level ``i < fusion_pyramid_levels``, ``concat(warped_0, warped_1,
backward_flow, forward_flow)`` with ``2 * (3 + feature_channels(i)) + 4``
channels. Starting from the coarsest level, for ``i = F-2 .. 0``::

    net = conv2x2_same(resize_nearest(net, size_i))        # no activation
    net = concat(level_i, net)
    net = lrelu(conv3x3(net)); net = lrelu(conv3x3(net))

with width ``options.fusion_filters(i)`` (film_net: ``filters << min(i,
specialized_levels)``; ``Options.fusion_widths`` may override the finest levels); finally a
1x1 conv to RGB (no activation, no clamp).

Execution: each level is one channels_last buffer ``[net | level_i | zero pad]``, where
``level_i`` is ``[features 0 | image 0 | features 1 | image 1 | flows]`` (see
:mod:`film_fast.buffers`: what convolutions store into comes first, 16-byte aligned); the
up step (:func:`film_fast.ops.upsample_conv2x2`, which never materialises the upsampled
tensor in kernel backends) stores its ``net`` channels in place (``out=``), so the decoder
needs no concat at all. The convs reading a buffer (each level's first 3x3 conv, and the
up-conv reading the coarsest buffer) take their weights' input channels in that order
(:attr:`film_fast.layers.Conv.input_blocks`); the parameters keep the official order
``[image 0 | features 0 | image 1 | features 1 | flows | net]``.

Parameter names: ``levels.{i}.up`` (2x2), ``levels.{i}.convs.{0,1}`` (3x3),
``output`` (1x1); ``i`` = pyramid level, finest first.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import ops
from .buffers import FusionLayout, channel_align, fusion_input_blocks, new_buffer
from .layers import Conv
from .options import Options


class FusionLevel(nn.Module):
    def __init__(self, coarse_channels: int, skip_channels: int, filters: int) -> None:
        super().__init__()
        self.up = Conv(coarse_channels, filters, 2, activation=None)
        self.convs = nn.ModuleList([Conv(skip_channels + filters, filters, 3),
                                    Conv(filters, filters, 3)])


class Fusion(nn.Module):
    def __init__(self, options: Options) -> None:
        super().__init__()
        self.options = options
        self.backend: Optional[str] = None
        n = options.fusion_pyramid_levels
        levels = []
        for i in range(n - 1):
            coarse = (options.fusion_input_channels(n - 1) if i == n - 2
                      else options.fusion_filters(i + 1))
            levels.append(FusionLevel(coarse, options.fusion_input_channels(i),
                                      options.fusion_filters(i)))
        self.levels = nn.ModuleList(levels)
        self.output = Conv(options.fusion_filters(0), 3, 1, activation=None)
        for i, level in enumerate(levels):
            level.convs[0].input_blocks = fusion_input_blocks(self.layout(i))
        if levels:
            levels[-1].up.input_blocks = fusion_input_blocks(self.layout(n - 1))

    def layout(self, level: int) -> FusionLayout:
        """The channel layout of fusion buffer ``level`` (:mod:`film_fast.buffers`)."""
        opts = self.options
        net = 0 if level == opts.fusion_pyramid_levels - 1 else opts.fusion_filters(level)
        c = opts.feature_channels(level)
        return FusionLayout(net=net, level=c + 3, features=c)

    def decode(self, buffers: List[torch.Tensor]) -> torch.Tensor:
        """Decodes fusion buffers ``[B, >= layout(i).channels, H, W]`` (:meth:`layout`).

        Buffer ``i < F-1`` receives ``net`` in its first ``fusion_filters(i)`` channels and
        holds the level input after them; channels past ``layout(i).channels`` must be
        zero. The coarsest buffer holds only its level input (plus zero padding).
        Returns ``[B, 3, H, W]`` in the buffers' dtype.
        """
        opts = self.options
        net = buffers[-1]
        for i in range(len(buffers) - 2, -1, -1):
            level = self.levels[i]
            buf = buffers[i]
            width = opts.fusion_filters(i)
            ops.upsample_conv2x2(net, buf.shape[-2:], level.up.weight_for(net.shape[1]),
                                 level.up.bias, out=buf[:, :width], backend=self.backend)
            net = buf
            for conv in level.convs:
                net = conv(net)
        return self.output(net)

    def forward(self, pyramid: List[torch.Tensor]) -> torch.Tensor:
        """Aligned pyramid in the official order (finest first, ``[B, K_i, H, W]`` with
        ``K_i = options.fusion_input_channels(i)``: image 0, features 0, image 1, features 1,
        flows) -> image ``[B, 3, H, W]``."""
        first = pyramid[0]
        align = channel_align(first.device, first.dtype)
        buffers = []
        for i, p in enumerate(pyramid):
            layout = self.layout(i)
            buf = new_buffer(p.shape[0], layout.channels, p.shape[2], p.shape[3], align=align,
                             dtype=p.dtype, device=p.device)
            offset = layout.net
            for a, b in fusion_input_blocks(layout)[1 if layout.net else 0:]:
                buf[:, offset:offset + b - a].copy_(p[:, a:b])
                offset += b - a
            buffers.append(buf)
        return self.decode(buffers)
