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
shared flow predictor work at every coarse level). Channel counts come from
:meth:`film_fast.options.Options.feature_channels`.

Parameter names: ``stages.{j}.convs.{n}.{weight,bias}``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import ops
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

    def subtree(self, image: torch.Tensor, depth: int) -> List[torch.Tensor]:
        """Runs ``depth`` stages on ``image [B, 3, H, W]``; stage j output is ``[B, k<<j, H>>j, W>>j]``."""
        outputs = []
        x = image
        for j in range(depth):
            if j > 0:
                x = ops.avg_pool2x2(x, backend=self.backend)
            x = self.stages[j](x)
            outputs.append(x)
        return outputs

    def forward(self, image_pyramid: List[torch.Tensor]) -> List[torch.Tensor]:
        """Image pyramid (finest first, ``[B, 3, H>>i, W>>i]``) -> feature pyramid of the same depth."""
        levels = len(image_pyramid)
        sub = self.options.sub_levels
        trees = [self.subtree(image_pyramid[i], min(sub, levels - i)) for i in range(levels)]
        features = []
        for i in range(levels):
            parts = [trees[i - j][j] for j in range(min(i + 1, sub))]
            features.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return features
