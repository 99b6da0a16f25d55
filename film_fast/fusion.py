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

Execution: each level is one channels_last buffer ``[level_i | net | zero pad]``
(see :mod:`film_fast.buffers`); the up step (:func:`film_fast.ops.upsample_conv2x2`,
which never materialises the upsampled tensor in kernel backends) stores its
``net`` channels in place (``out=``), so the decoder needs no concat at all.

Parameter names: ``levels.{i}.up`` (2x2), ``levels.{i}.convs.{0,1}`` (3x3),
``output`` (1x1); ``i`` = pyramid level, finest first.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import ops
from .buffers import channel_align, concat_into
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

    def decode(self, buffers: List[torch.Tensor]) -> torch.Tensor:
        """Decodes level buffers ``[B, >= fusion_input_channels(i) + fusion_filters(i), H, W]``.

        Buffer ``i < F-1`` holds the level input in channels ``[:K_i]`` (``K_i =
        options.fusion_input_channels(i)``) and receives ``net`` in
        ``[K_i : K_i + fusion_filters(i)]``; remaining channels must be zero. The
        coarsest buffer holds only its level input (plus zero padding).
        Returns ``[B, 3, H, W]`` in the buffers' dtype.
        """
        opts = self.options
        net = buffers[-1]
        for i in range(len(buffers) - 2, -1, -1):
            level = self.levels[i]
            buf = buffers[i]
            k = opts.fusion_input_channels(i)
            width = opts.fusion_filters(i)
            ops.upsample_conv2x2(net, buf.shape[-2:], level.up.weight_for(net.shape[1]),
                                 level.up.bias, out=buf[:, k:k + width], backend=self.backend)
            net = buf
            for conv in level.convs:
                net = conv(net)
        return self.output(net)

    def forward(self, pyramid: List[torch.Tensor]) -> torch.Tensor:
        """Aligned pyramid (finest first, ``[B, K_i, H, W]``) -> image ``[B, 3, H, W]``."""
        align = channel_align(pyramid[0].device, pyramid[0].dtype)
        last = len(pyramid) - 1
        buffers = [concat_into([p], align=align,
                               extra=0 if i == last else self.options.fusion_filters(i))
                   for i, p in enumerate(pyramid)]
        return self.decode(buffers)
