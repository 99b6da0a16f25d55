"""Cascaded multi-scale feature extractor (film_net ``feature_extractor``).

One sub-tree extractor with shared weights runs on every image-pyramid level.
At image level ``i`` it runs ``min(sub_levels, pyramid_levels - i)`` stages;
stage ``j`` is two 3x3 convs with ``filters << j`` outputs (LeakyReLU 0.2),
followed by 2x2 average pooling before stage ``j + 1``. Feature level ``i``
concatenates the stage-``j`` output of the sub-tree started at level ``i - j``
for ``j = 0 .. min(i, sub_levels - 1)``, the sub-tree of level ``i`` first::

    level 0: S0[0]
    level 1: S1[0] | S0[1]
    level 2: S2[0] | S1[1] | S0[2]
    level 3: S3[0] | S2[1] | S1[2] | S0[3]     (sub_levels = 4)
    level 4: S4[0] | S3[1] | S2[2] | S1[3]

so coarse levels see features computed from finer images (what lets the
shared flow predictor work at every coarse level). Stages that would only
feed levels beyond the pyramid are never run.

Execution is stage-major: stage ``j`` runs on every level that needs it through
one :func:`film_fast.ops.conv2d_levels` call per conv (the weights are shared),
and the stage's last conv stores each level's output straight into its level
buffer (``out=`` channel slices; kernel backends write them in the same single
launch, no copies); the next stage pools those slices. A level buffer holds
``[features | image (3) | zero pad]`` channels (features first, so that every slice a conv
stores into starts 16-byte aligned: see :mod:`film_fast.buffers`), which is exactly the
source the fusion stage warps, so neither stage needs another concat.
:meth:`FeatureExtractor.fill` takes buffers whose image channels are already written (the
model pools its image pyramid straight into them).

Parameter names: ``stages.{j}.convs.{n}.{weight,bias}``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import ops
from .buffers import channel_align, image_channels, new_buffer
from .layers import Conv
from .options import Options


class SubTreeStage(nn.Module):
    """Two 3x3 convs with LeakyReLU: ``[B, Cin, H, W] -> [B, Cout, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([Conv(in_channels, out_channels, 3),
                                    Conv(out_channels, out_channels, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x


class FeatureExtractor(nn.Module):
    def __init__(self, options: Options, in_channels: int = 3) -> None:
        super().__init__()
        self.options = options
        self.backend: Optional[str] = None
        stages = []
        channels = in_channels
        for j in range(options.sub_levels):
            stages.append(SubTreeStage(channels, options.filters << j))
            channels = options.filters << j
        self.stages = nn.ModuleList(stages)

    def new_buffers(self, batch: int, height: int, width: int, *, dtype: torch.dtype,
                    device: torch.device, levels: Optional[int] = None) -> List[torch.Tensor]:
        """Uninitialised level buffers ``[batch, C_i + 3 (+ pad), height >> i, width >> i]``
        (channels_last; channels padded to :func:`film_fast.buffers.channel_align`).

        The padding channels only align the rows (every reader takes ``[:C_i]`` or
        ``[:C_i + 3]``), so they are not even zeroed: no launch per level for them.
        """
        opts = self.options
        levels = opts.pyramid_levels if levels is None else levels
        align = channel_align(device, dtype)
        return [new_buffer(batch, opts.feature_channels(i) + 3, height >> i, width >> i,
                           align=align, dtype=dtype, device=device, zero_padding=False)
                for i in range(levels)]

    def level_buffers(self, image_pyramid: List[torch.Tensor]) -> List[torch.Tensor]:
        """Image pyramid ``[N, 3, H>>i, W>>i]`` -> per level ``[N, C_i + 3 (+ pad), H>>i, W>>i]``.

        Channels ``[:C_i]`` hold the cascaded features (C_i = ``options.feature_channels(i)``),
        ``[C_i:C_i + 3]`` the image (:func:`film_fast.buffers.image_channels`).
        """
        opts = self.options
        first = image_pyramid[0]
        buffers = self.new_buffers(first.shape[0], first.shape[2], first.shape[3],
                                   dtype=first.dtype, device=first.device,
                                   levels=len(image_pyramid))
        for i, (buf, image) in enumerate(zip(buffers, image_pyramid)):
            buf[:, image_channels(opts.feature_channels(i))].copy_(image)
        return self.fill(buffers, image_pyramid)

    def fill(self, buffers: List[torch.Tensor], images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Writes the cascaded features into ``buffers[i][:, :C_i]``; returns ``buffers``.

        ``images[i]`` is the level-``i`` image (equal to the buffer's image channels, which
        must already hold it; it may be that very slice).
        """
        opts = self.options
        levels = len(images)
        offsets = [0] * levels  # next free channel of each level buffer
        inputs = list(images)  # stage-j input of the sub-tree started at level i
        for j in range(min(opts.sub_levels, levels)):
            active = range(levels - j)  # sub-trees i with i + j < levels
            stage = self.stages[j]
            x = [inputs[i] for i in active]
            for conv in stage.convs[:-1]:
                x = ops.conv2d_levels(x, conv.weight, conv.bias, conv.activation,
                                      backend=self.backend)
            last = stage.convs[-1]
            width = last.out_channels
            # the output of sub-tree i belongs to feature level k = i + j: stored in place
            dests = [buffers[i + j][:, offsets[i + j]:offsets[i + j] + width] for i in active]
            x = ops.conv2d_levels(x, last.weight, last.bias, last.activation, out=dests,
                                  backend=self.backend)
            for i in active:
                offsets[i + j] += width
            if j + 1 < opts.sub_levels:
                inputs = [ops.avg_pool2x2(out, backend=self.backend) for out in x[:levels - j - 1]]
        return buffers

    def forward(self, image_pyramid: List[torch.Tensor]) -> List[torch.Tensor]:
        """Image pyramid (finest first) -> feature pyramid ``[N, C_i, H>>i, W>>i]`` (views)."""
        return [buf[:, :self.options.feature_channels(i)]
                for i, buf in enumerate(self.level_buffers(image_pyramid))]
