"""Residual pyramid flow estimator (film_net ``pyramid_flow_estimator``).

Coarse to fine: ``v = predictor(a[-1], b[-1])``; then for each finer level
``i``: ``v = resize_bilinear(2 v)``, ``warped = warp(b[i], v)``,
``residual_i = predictor_i(a[i], warped)``, ``v = residual_i + v``. Levels
``i < specialized_levels`` have their own predictor; all coarser levels share
one (the FILM trick that lets coarse levels learn from fine-level motion).

A predictor is ``flow_convs`` 3x3 convs (LeakyReLU) on ``concat(a, b)``, a 1x1
conv to ``flow_filters // 2`` (LeakyReLU) and a 1x1 conv to 2 channels (the
flow head, no activation).

Precision: flows are float32 whatever the model dtype. The head runs in fp32
on the hidden features and the coarse-to-fine accumulation stays fp32: in bf16
a 100 px flow would be quantised to 0.5 px steps.

Execution: each level's predictor input is one buffer ``[a | warped b]``; the
fused :func:`film_fast.ops.upsample_flow_warp` writes the warped half in place.
:meth:`PyramidFlowEstimator.siamese` estimates both directions of a frame pair
as one batch without materialising the swapped feature pyramid.

Parameter names: ``predictors.{i}.convs.{n}`` (i = level, finest first) and
``shared.convs.{n}``; ``n`` runs over the 3x3 convs, then the 1x1 hidden, then the head.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn

from . import ops
from .buffers import new_buffer
from .layers import Conv
from .options import Options


class FlowPredictor(nn.Module):
    """``[a | b]`` buffer ``[N, Ca + Cb, H, W]`` -> flow ``[N, 2, H, W]`` (float32)."""

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

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = conv(x)
        head = self.convs[-1]
        # fp32 head: a no-op for fp32 models; 2 output channels, so the cast is cheap (and the
        # fp32 copies of the head's parameters are cached for inference).
        weight, bias = head.params_as(torch.float32)
        return ops.conv2d(x.float(), weight, bias, None, backend=head.backend)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.predict(torch.cat([a, b], dim=1))


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

    def _estimate(self, write_a: Callable[[int, torch.Tensor], None],
                  features_b: List[torch.Tensor]) -> List[torch.Tensor]:
        """Shared coarse-to-fine loop; ``write_a(i, out)`` fills level i's ``a`` channels."""
        levels = len(features_b)
        residuals: List[torch.Tensor] = []
        v: Optional[torch.Tensor] = None
        for i in range(levels - 1, -1, -1):
            fb = features_b[i]
            n, c, h, w = fb.shape
            buf = new_buffer(n, 2 * c, h, w, align=1, dtype=fb.dtype, device=fb.device)
            write_a(i, buf[:, :c])
            if v is None:
                buf[:, c:2 * c].copy_(fb)
            else:
                v, _ = ops.upsample_flow_warp(v, fb, out=buf[:, c:2 * c], backend=self.backend)
            residual = self.predictor(i).predict(buf)
            residuals.append(residual)
            v = residual if v is None else residual + v
        residuals.reverse()
        return residuals

    def forward(self, features_a: List[torch.Tensor],
                features_b: List[torch.Tensor]) -> List[torch.Tensor]:
        """Residual flow pyramid from ``a`` to ``b``, finest first, each ``[N, 2, H>>i, W>>i]`` fp32.

        The coarsest entry is the flow itself (a residual against zero).
        """
        return self._estimate(lambda i, out: out.copy_(features_a[i]), features_b)

    def siamese(self, features: List[torch.Tensor], batch: int) -> List[torch.Tensor]:
        """Both directions of ``B`` frame pairs, with ``features[i] = [f0; f1]`` (``2B`` rows).

        Returns residual pyramids in rows ``[x1 -> x0 ; x0 -> x1]``: row ``r`` uses
        ``b = features[r]`` and ``a`` = the other frame of its pair, so the warped
        half of each predictor buffer is written by the fused op directly, and only
        the ``a`` half is copied with its rows swapped (one gather per level).
        """
        def write_swapped(i: int, out: torch.Tensor) -> None:
            f = features[i]
            index = swap_halves_index(f.shape[0], f.device)  # (its own inverse)
            # out[r] = f[(r + B) % 2B]: the row swap as one gather (one launch). index_select
            # with out= (no autograd; Dynamo refuses a strided out=) is also the faster one on
            # CPU (5.4 vs 7.1 ms for two copies, 10.1 ms for index_copy_: level 0, 256x256).
            if torch.is_grad_enabled() or torch.compiler.is_compiling():
                out.index_copy_(0, index, f)
            else:
                torch.index_select(f, 0, index, out=out)

        return self._estimate(write_swapped, features)


_SWAP_INDICES: dict = {}


def swap_halves_index(rows: int, device: torch.device) -> torch.Tensor:
    """int64 ``[(r + rows // 2) % rows for r in range(rows)]`` (its own inverse), cached per
    (rows, device) outside autograd and inference mode so that any later call may use it; built
    in the graph while tracing (``torch.compile``)."""
    half = rows // 2
    if torch.compiler.is_compiling():
        return torch.remainder(torch.arange(rows, device=device) + half, rows)
    key = (rows, str(device))
    index = _SWAP_INDICES.get(key)
    if index is None:
        with torch.inference_mode(False), torch.no_grad():
            index = torch.remainder(torch.arange(rows) + half, rows).to(device)
        if len(_SWAP_INDICES) > 64:
            _SWAP_INDICES.clear()
        _SWAP_INDICES[key] = index
    return index
