"""Public functional entry points of FILM's hot paths.

Every op takes NCHW tensors and a ``backend`` keyword (``None`` = the
``FILM_FAST_BACKEND`` environment variable, default ``"auto"``; or ``"torch"``,
``"triton"``, ``"cupy"``). The ``torch`` backend is the readable reference in
:mod:`film_fast.ops.reference`; kernel backends register themselves with
:func:`film_fast.ops.dispatch.register` and are tested against it.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) every op routes through
the custom ops registered in :mod:`film_fast.ops.library` (``torch.ops.film_fast.*``),
which Dynamo records as single graph nodes with fake (meta) implementations and
autograd formulas; eager calls take the direct path below.

``out=`` (``warp``, ``upsample_flow_warp``, ``conv2d_levels``, ``avg_pool2x2``,
``upsample_conv2x2``): the result is written into a given destination of any strides,
usually a channel slice of one of the model's concat buffers (:mod:`film_fast.buffers`),
through the ``<op>_into`` implementation of the backend. Kernel backends store straight
into it (no temporary, no copy launch); the torch backend, whose PyTorch calls have no
strided ``out=``, computes and copies. ``conv2d_levels``, ``avg_pool2x2`` and
``upsample_conv2x2`` then return tensors *equal* to what was written: ``out`` itself when the
backend wrote in place, else the backend's own (dense) result, which is cheaper to read
than a strided slice. Autograd works either way (the destination's buffer gets the right
gradient); with gradients recorded a backend may compute and copy instead.

Example::

    >>> import torch, film_fast.ops as ops
    >>> img = torch.rand(1, 3, 8, 8); flow = torch.zeros(1, 2, 8, 8)
    >>> torch.equal(ops.warp(img, flow, backend="torch"), img)
    True
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import library, reference, torch_fast
from .dispatch import (BACKENDS, BackendUnavailable, available_backends, normalize_backend,
                       register, resolve)

OPS = ("warp", "warp_into", "upsample_flow", "conv2d", "avg_pool2x2", "avg_pool2x2_into",
       "upsample_conv2x2", "upsample_conv2x2_into", "upsample_flow_warp", "conv2d_levels",
       "conv2d_levels_into", "conv2d_pool")

__all__ = list(OPS) + ["BACKENDS", "library",
           "BackendUnavailable", "available_backends", "normalize_backend", "register", "resolve"]

for _name in OPS:
    register(_name, "torch")(getattr(torch_fast, _name, None) or getattr(reference, _name))


def _check_float(name: str, t: torch.Tensor, ndim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def _check_out(name: str, out: torch.Tensor, shape, like: torch.Tensor) -> None:
    """``out=`` destinations of the ``*_into`` ops: the result's shape on its device, any
    strides (typically a channel slice of a channels_last concat buffer) and any floating
    dtype (the result is converted; kernel backends store in place when it is the result's
    own dtype, else compute and copy: e.g. bf16 autocast results into fp32 buffers)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    shape = [int(s) for s in shape]
    if list(out.shape) != shape:
        raise ValueError(f"{name} must be {shape}, got {list(out.shape)}")
    if out.device != like.device or not out.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor on {like.device}, got {out.dtype} on "
                        f"{out.device}")


def warp(image: torch.Tensor, flow: torch.Tensor, out: Optional[torch.Tensor] = None, *,
         backend: Optional[str] = None) -> torch.Tensor:
    """Backward bilinear warp with border clamping (FILM's convention).

    ``out[b, :, y, x] = bilinear(image[b], x + dx, y + dy)`` with ``(dx, dy) =
    flow[b, :, y, x]``; sample positions are clamped into the image. Sample
    coordinates are computed in float32 whatever the data dtype.

    Args:
        image: ``[B, C, H, W]`` float (fp32/fp16/bf16).
        flow: ``[B, 2, H, W]`` ``(dx, dy)`` in pixels; any float dtype.
        out: optional ``[B, C, H, W]`` destination of any strides (e.g. a channel slice of
            a concat buffer); the result is written there and returned.
        backend: see module docstring.
    Returns:
        ``[B, C, H, W]`` in ``image.dtype`` (``out`` when given).
    """
    _check_float("image", image)
    _check_float("flow", flow)
    b, _, h, w = image.shape
    if tuple(flow.shape) != (b, 2, h, w):
        raise ValueError(f"flow must be [B, 2, H, W] = {[b, 2, h, w]} for image "
                         f"{list(image.shape)}, got {list(flow.shape)}")
    if out is not None and tuple(out.shape) != tuple(image.shape):
        raise ValueError(f"out must be {list(image.shape)}, got {list(out.shape)}")
    if torch.compiler.is_compiling():
        return library.warp(image, flow, out, backend)
    if out is not None and not (torch.is_grad_enabled() and (image.requires_grad or flow.requires_grad)):
        # Inference: the backend writes the destination itself (no temporary, no extra copy).
        _, into = resolve("warp_into", backend, image.device)
        return into(image, flow, out)
    _, impl = resolve("warp", backend, image.device)
    result = impl(image, flow)
    if out is None:
        return result
    out.copy_(result)
    return out


def upsample_flow(flow: torch.Tensor, size: Sequence[int], residual: Optional[torch.Tensor] = None,
                  *, backend: Optional[str] = None) -> torch.Tensor:
    """``resize_bilinear(2 * flow, size) (+ residual)``: one coarse-to-fine flow step.

    Args:
        flow: ``[B, 2, h, w]`` coarse flow in coarse-level pixels.
        size: ``(H, W)`` of the finer level.
        residual: optional ``[B, 2, H, W]``.
    Returns:
        ``[B, 2, H, W]`` in fine-level pixels.
    """
    _check_float("flow", flow)
    if flow.shape[1] != 2:
        raise ValueError(f"flow must be [B, 2, h, w], got {list(flow.shape)}")
    if residual is not None:
        _check_float("residual", residual)
        expected = [flow.shape[0], 2, int(size[0]), int(size[1])]
        if list(residual.shape) != expected:
            raise ValueError(f"residual must be {expected}, got {list(residual.shape)}")
    if torch.compiler.is_compiling():
        return library.upsample_flow(flow, size, residual, backend)
    _, impl = resolve("upsample_flow", backend, flow.device)
    return impl(flow, size, residual)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """Stride-1 TF-'same' convolution + bias + optional ``"leaky_relu"`` (slope 0.2).

    Args:
        x: ``[B, Cin, H, W]``.
        weight: ``[Cout, Cin, kh, kw]``; even kernels pad bottom/right only.
        bias: ``[Cout]`` or None.
    Returns:
        ``[B, Cout, H, W]``.
    """
    _check_float("x", x)
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [Cout, {x.shape[1]}, kh, kw] for x {list(x.shape)}, "
                         f"got {list(weight.shape)}")
    if torch.compiler.is_compiling():
        return library.conv2d(x, weight, bias, activation, backend)
    _, impl = resolve("conv2d", backend, x.device)
    return impl(x, weight, bias, activation)


def avg_pool2x2(x: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """2x2/stride-2 'valid' average pooling: ``[B, C, H, W] -> [B, C, H//2, W//2]``.

    Args:
        out: optional ``[B, C, H//2, W//2]`` destination (on ``x``'s device, any strides),
            e.g. the image channels of the next pyramid level's buffer.
    Returns:
        the pooled tensor; with ``out``, a tensor equal to it (see the module docstring).
    """
    _check_float("x", x)
    if out is not None:
        b, c, h, w = x.shape
        _check_out("out", out, (b, c, h // 2, w // 2), x)
    if torch.compiler.is_compiling():
        return library.avg_pool2x2(x, out, backend)
    if out is not None:
        _, into = resolve("avg_pool2x2_into", backend, x.device)
        return into(x, out)
    _, impl = resolve("avg_pool2x2", backend, x.device)
    return impl(x)


def upsample_conv2x2(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Nearest (half-pixel) resize of ``x`` to ``size`` followed by a 2x2 'same' conv.

    Args:
        x: ``[B, Cin, h, w]``; size: ``(H, W)``; weight: ``[Cout, Cin, 2, 2]``.
        out: optional ``[B, Cout, H, W]`` destination (on ``x``'s device, any strides), e.g.
            the ``net`` channels of a fusion level buffer.
    Returns:
        ``[B, Cout, H, W]``, no activation; with ``out``, a tensor equal to it (see the
        module docstring).
    """
    _check_float("x", x)
    if out is not None:
        _check_out("out", out, (x.shape[0], weight.shape[0], size[0], size[1]), x)
    if torch.compiler.is_compiling():
        return library.upsample_conv2x2(x, size, weight, bias, out, backend)
    if out is not None:
        _, into = resolve("upsample_conv2x2_into", backend, x.device)
        return into(x, size, weight, bias, out)
    _, impl = resolve("upsample_conv2x2", backend, x.device)
    return impl(x, size, weight, bias)


def upsample_flow_warp(flow: torch.Tensor, features: torch.Tensor, out: Optional[torch.Tensor] = None,
                       *, backend: Optional[str] = None):
    """Fused flow-estimator step: ``up = resize_bilinear(2 flow)``, ``warped = warp(features, up)``.

    Args:
        flow: ``[B, 2, h, w]`` coarse flow (coarse pixels).
        features: ``[B, C, H, W]`` finer-level features to warp.
        out: optional ``[B, C, H, W]`` destination (e.g. ``buf[:, Ca:]`` of the predictor's
            input buffer) so the warped features need no separate concat.
    Returns:
        ``(up [B, 2, H, W] in features' pixels, warped [B, C, H, W])``.
    """
    _check_float("flow", flow)
    _check_float("features", features)
    if flow.shape[0] != features.shape[0] or flow.shape[1] != 2:
        raise ValueError(f"flow must be [B, 2, h, w] with B = {features.shape[0]}, got "
                         f"{list(flow.shape)}")
    if out is not None and tuple(out.shape) != tuple(features.shape):
        raise ValueError(f"out must have the features' shape {list(features.shape)}, got "
                         f"{list(out.shape)}")
    if torch.compiler.is_compiling():
        return library.upsample_flow_warp(flow, features, out, backend)
    _, impl = resolve("upsample_flow_warp", backend, features.device)
    return impl(flow, features, out)


def conv2d_levels(xs, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, *, out=None,
                  backend: Optional[str] = None) -> list:
    """One conv's weights applied to several pyramid levels (one launch in kernel backends).

    Args:
        xs: list of ``[B_l, Cin, H_l, W_l]`` tensors.
        out: optional list of ``[B_l, Cout, H_l, W_l]`` destinations, one per level (on the
            inputs' device, any strides), e.g. channel slices of the feature
            extractor's level buffers: kernel backends write every level there in the
            same single launch.
    Returns:
        list of ``[B_l, Cout, H_l, W_l]``; with ``out``, tensors equal to it (see the module
        docstring).
    """
    xs = list(xs)
    if out is not None:
        out = list(out)
        if len(out) != len(xs):
            raise ValueError(f"out must have one tensor per level ({len(xs)}), got {len(out)}")
    if not xs:
        return []
    for i, x in enumerate(xs):
        _check_float(f"xs[{i}]", x)
        if x.shape[1] != weight.shape[1]:
            raise ValueError(f"xs[{i}] has {x.shape[1]} channels, weight expects {weight.shape[1]}")
        if out is not None:
            _check_out(f"out[{i}]", out[i], (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]),
                       x)
    if torch.compiler.is_compiling():
        return library.conv2d_levels(xs, weight, bias, activation, out, backend)
    if out is not None:
        _, into = resolve("conv2d_levels_into", backend, xs[0].device)
        return list(into(xs, weight, bias, activation, out))
    _, impl = resolve("conv2d_levels", backend, xs[0].device)
    return impl(xs, weight, bias, activation)


def conv2d_pool(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = None, *, backend: Optional[str] = None):
    """Conv (+bias, +activation) and its 2x2 average pool in one pass: ``(y, pool(y))``."""
    _check_float("x", x)
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [Cout, {x.shape[1]}, kh, kw] for x {list(x.shape)}, "
                         f"got {list(weight.shape)}")
    if torch.compiler.is_compiling():
        return library.conv2d_pool(x, weight, bias, activation, backend)
    _, impl = resolve("conv2d_pool", backend, x.device)
    return impl(x, weight, bias, activation)
