"""Convolution FLOP counts of the FILM graph, for throughput reporting (``film-fast bench``).

Counts ``2 * Cin * Cout * kh * kw * H_l * W_l`` (a multiply and an add per
weight per output pixel; bias, activations, pooling, warping and resizing are
not counted) for every convolution the graph runs, at the padded size the model
actually computes on (H and W rounded up to ``Options.size_multiple``).

For the published config this is about 279 GFLOP per frame at 256x256 and
4x that at 512x512.
"""
from __future__ import annotations

from .options import Options


def _conv(cin: int, cout: int, k: int, h: int, w: int) -> int:
    return 2 * cin * cout * k * k * h * w


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def feature_extractor_flops(options: Options, height: int, width: int) -> int:
    """One frame's cascaded feature pyramid (a sub-tree per image-pyramid level)."""
    total = 0
    levels = options.pyramid_levels
    for i in range(levels):
        cin = 3
        for j in range(min(options.sub_levels, levels - i)):
            # Stage j of the sub-tree started at level i runs at level i + j.
            h, w = height >> (i + j), width >> (i + j)
            cout = options.filters << j
            total += _conv(cin, cout, 3, h, w) + _conv(cout, cout, 3, h, w)
            cin = cout
    return total


def flow_estimator_flops(options: Options, height: int, width: int) -> int:
    """One direction of the residual flow pyramid (a predictor at every level)."""
    total = 0
    for i in range(options.pyramid_levels):
        h, w = height >> i, width >> i
        p = options.predictor_for_level(i)
        cin = 2 * options.feature_channels(i)
        filters = options.flow_filters[p]
        for _ in range(options.flow_convs[p]):
            total += _conv(cin, filters, 3, h, w)
            cin = filters
        total += _conv(filters, filters // 2, 1, h, w) + _conv(filters // 2, 2, 1, h, w)
    return total


def fusion_flops(options: Options, height: int, width: int) -> int:
    """The fusion decoder: per level a 2x2 conv after upsampling, two 3x3 convs; a 1x1 output."""
    total = 0
    n = options.fusion_pyramid_levels
    for i in range(n - 2, -1, -1):
        h, w = height >> i, width >> i
        coarse = options.fusion_input_channels(n - 1) if i == n - 2 else options.fusion_filters(i + 1)
        filters = options.fusion_filters(i)
        total += _conv(coarse, filters, 2, h, w)
        total += _conv(options.fusion_input_channels(i) + filters, filters, 3, h, w)
        total += _conv(filters, filters, 3, h, w)
    total += _conv(options.fusion_filters(0), 3, 1, height, width)
    return total


def conv_flops(options: Options, height: int, width: int) -> int:
    """Convolution FLOPs of one ``FILM`` forward at batch 1 and input size ``height x width``.

    Both frames go through the feature extractor, flow is estimated in both
    directions, and the fusion decoder runs once.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h = _padded(height, options.size_multiple)
    w = _padded(width, options.size_multiple)
    return (2 * feature_extractor_flops(options, h, w) + 2 * flow_estimator_flops(options, h, w)
            + fusion_flops(options, h, w))
