"""Residual pyramid flow estimator (film_net ``pyramid_flow_estimator``).

Coarse to fine: ``v = predictor(a[-1], b[-1])``; then for each finer level
``i``: ``v = resize_bilinear(2 v)``, ``warped = warp(b[i], v)``,
``residual_i = predictor_i(a[i], warped)``, ``v = residual_i + v``. Levels
``i < specialized_levels`` have their own predictor; all coarser levels share
one (the FILM trick that lets coarse levels learn from fine-level motion).

A predictor is ``flow_convs`` 3x3 convs (LeakyReLU) on ``concat(a, b)``, a 1x1
conv to ``flow_filters // 2`` (LeakyReLU) and a 1x1 conv to 2 channels (the
flow head, no activation).

Parameter names: ``predictors.{i}.convs.{n}`` (i = level, finest first) and
``shared.convs.{n}``; ``n`` runs over the 3x3 convs, then the 1x1 hidden, then the head.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import ops
from .layers import Conv
from .options import Options


class FlowPredictor(nn.Module):
    """``(a [B, Ca, H, W], b [B, Cb, H, W]) -> flow [B, 2, H, W]`` with ``Ca + Cb = in_channels``."""

    def __init__(self, in_channels: int, num_convs: int, num_filters: int) -> None:
        super().__init__()
        convs = []
        channels = in_channels
        for _ in range(num_convs):
            convs.append(Conv(channels, num_filters, 3))
            channels = num_filters
        convs.append(Conv(channels, num_filters // 2, 1))
        convs.append(Conv(num_filters // 2, 2, 1, activation=None))
        self.convs = nn.ModuleList(convs)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a, b], dim=1)
        for conv in self.convs:
            x = conv(x)
        return x


class PyramidFlowEstimator(nn.Module):
    def __init__(self, options: Options) -> None:
        super().__init__()
        self.options = options
        self.backend: Optional[str] = None
        s = options.specialized_levels
        self.predictors = nn.ModuleList(
            FlowPredictor(2 * options.feature_channels(i), options.flow_convs[i],
                          options.flow_filters[i]) for i in range(s))
        self.shared = FlowPredictor(2 * options.feature_channels(s), options.flow_convs[s],
                                    options.flow_filters[s])

    def predictor(self, level: int) -> FlowPredictor:
        return self.predictors[level] if level < len(self.predictors) else self.shared

    def forward(self, features_a: List[torch.Tensor],
                features_b: List[torch.Tensor]) -> List[torch.Tensor]:
        """Residual flow pyramid from ``a`` to ``b``, finest first, each ``[B, 2, H>>i, W>>i]``.

        The coarsest entry is the flow itself (a residual against zero).
        """
        levels = len(features_a)
        v = self.predictor(levels - 1)(features_a[-1], features_b[-1])
        residuals = [v]
        for i in range(levels - 2, -1, -1):
            v = ops.upsample_flow(v, features_a[i].shape[-2:], backend=self.backend)
            warped = ops.warp(features_b[i], v, backend=self.backend)
            residual = self.predictor(i)(features_a[i], warped)
            residuals.append(residual)
            v = residual + v
        residuals.reverse()
        return residuals
