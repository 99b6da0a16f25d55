"""The FILM frame interpolator (film_net), a thin graph over :mod:`film_fast.ops`.

``FILM(x0, x1, batch_dt)`` takes two frames ``[B, 3, H, W]`` in [0, 1] and the
time ``t`` of the wanted in-between frame per sample, and returns the frame
``[B, 3, H, W]`` (not clamped, like the official model and the port).

Graph (see the stage modules for details):

1. image pyramids of both frames (2x2 average pooling);
2. cascaded feature pyramids (:mod:`film_fast.feature_extractor`);
3. residual flow pyramids x0->x1 and x1->x0 (:mod:`film_fast.flow_estimator`),
   synthesised into flows for the ``fusion_pyramid_levels`` finest levels;
4. ``backward_flow = t * flow(x1 vs x0)``, ``forward_flow = (1 - t) * flow(x0 vs x1)``;
5. warp ``concat(image_0, features_0)`` by the backward flow and frame 1's by
   the forward flow, per level;
6. fuse ``concat(warped_0, warped_1, backward_flow, forward_flow)``
   (:mod:`film_fast.fusion`).

Both frames go through the feature extractor as one batch of ``2B``, and both
flow directions are estimated as one batch; the results are the same as running
them separately, with half the launches. Every channel concat of the graph is a
buffer written in place by its producers (:mod:`film_fast.buffers`). Flows are
float32 whatever the model dtype.

Sizes: H and W need not be multiples of ``2^(pyramid_levels-1)``; other sizes
are padded, centred, and cropped back: with zeros, exactly like the official
wrapper, or by repeating the edge pixels (``Options.padding``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import cpu_memory, ops
from .feature_extractor import FeatureExtractor
from .flow_estimator import PyramidFlowEstimator
from .fusion import Fusion
from .options import Options
from .transfer import to_device_async
from .buffers import channel_align, image_channels, new_buffer
from .pyramid import (build_image_pyramid, crop_padding, fill_padding, pad_to_multiple,
                      padding_for, synthesize_flow_pyramid)

TimeLike = Union[torch.Tensor, float, int]


# Test-time flip ensemble (FILM.ensemble = N): variant v of a frame is the frame flipped over
# these dims, the model runs on every variant, and each output is flipped back (every flip is
# its own inverse) before the N are averaged. Identity, horizontal, vertical, both: the order of
# the measured gains (built-in model, DAVIS / UCF101 over frame averaging: 1 +4.25 / +3.06,
# 2 +4.42 / +3.25, 3 +4.50 / +3.36, 4 +4.53 / +3.37 dB).
FLIPS: Tuple[Tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def with_variants(frames: torch.Tensor, variants: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N * variants, C, H, W]``: each frame followed by its flipped variants
    (frame-major, so that slicing rows by frame keeps a frame's variants together)."""
    if variants == 1:
        return frames
    return torch.stack([frames.flip(dims) if dims else frames for dims in FLIPS[:variants]],
                       dim=1).flatten(0, 1)


def merge_variants(images: torch.Tensor, variants: int) -> torch.Tensor:
    """``[N * variants, C, H, W]`` outputs of :func:`with_variants` inputs -> their ``[N, C, H, W]``
    mean, each variant flipped back first."""
    if variants == 1:
        return images
    rows = images.unflatten(0, (-1, variants))
    return torch.stack([rows[:, v].flip(dims) if dims else rows[:, v]
                        for v, dims in enumerate(FLIPS[:variants])]).mean(dim=0)


def check_ensemble(variants) -> int:
    """``variants`` if it is a valid :attr:`FILM.ensemble` (an int, 1 to 4), else ValueError."""
    if not isinstance(variants, int) or isinstance(variants, bool) or \
            not 1 <= variants <= len(FLIPS):
        raise ValueError(f"ensemble must be an int from 1 (off) to {len(FLIPS)}, got {variants!r}")
    return variants


@dataclass
class FrameFeatures:
    """Encoded frames (:meth:`FILM.encode`): per-level ``[N * variants, C_i + 3 (+ pad), H>>i,
    W>>i]`` buffers (cascaded features, then the padded image, then unused channels up to
    the dtype's channel alignment; channels_last: see :mod:`film_fast.buffers`), the padding,
    the original size, and how many flip variants each frame has (rows ``[frame 0 variants;
    frame 1 ...]``; 1 unless the model's ``ensemble`` was set when encoding)."""

    levels: List[torch.Tensor]
    pads: Tuple[int, int, int, int]
    size: Tuple[int, int]
    variants: int = 1

    @property
    def frames(self) -> int:
        return self.levels[0].shape[0] // self.variants

    def rows(self, start: int, stop: int) -> "FrameFeatures":
        """Frames ``start:stop`` (with all their variants)."""
        k = self.variants
        return FrameFeatures([lv[start * k:stop * k] for lv in self.levels], self.pads, self.size, k)


def _pair_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b])``, as a view where ``b``'s rows directly follow ``a``'s in one
    storage: two frames of one encoded batch, e.g. the streaming engine without feature
    reuse, which encodes each call's end frames together. That saves a copy of every level
    of both frames: the 4K fp16 engine without reuse needs 15.42 instead of 21.06 GiB (dry
    run). The decoder only reads them."""
    if (not torch.compiler.is_compiling() and a.dim() == 4 and b.dim() == 4
            and a.shape[1:] == b.shape[1:] and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device
            and a.untyped_storage() is b.untyped_storage()
            and b.storage_offset() == a.storage_offset() + a.shape[0] * a.stride(0)):
        return a.as_strided((a.shape[0] + b.shape[0],) + tuple(a.shape[1:]), a.stride(),
                            a.storage_offset())
    return torch.cat([a, b], dim=0)


class FILM(nn.Module):
    """film_net with the official graph and the port's call signature.

    Args:
        options: architecture (default: the published film_net config).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cupy"`` or None
            (``FILM_FAST_BACKEND``, default auto) for every hot-path op.

    Attributes:
        source: where the weights came from (file and format), for ``info``.
        ensemble: test-time flip ensemble, 1 (off, default) to 4: every frame pair also runs
            horizontally flipped (2), vertically flipped (3) and both (4), and the outputs are
            flipped back and averaged. N times the work for a better frame; see
            :meth:`set_ensemble`.
    """

    def __init__(self, options: Optional[Options] = None, *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.options = options if options is not None else Options()
        # Normal tensors even when built inside torch.inference_mode: inference tensors have no
        # version counter, so the caches of arranged and transformed weights could not see an
        # update and would have to rebuild them on every call.
        with torch.inference_mode(False):
            self.extract = FeatureExtractor(self.options)
            self.predict_flow = PyramidFlowEstimator(self.options)
            self.fuse = Fusion(self.options)
        self.source = "random initialisation"
        self.backend = "auto"
        self.memory_format = torch.channels_last
        self.ensemble = 1
        self.set_backend(backend)

    # ---- configuration ----------------------------------------------------------------
    def set_backend(self, backend: Optional[str]) -> "FILM":
        """Routes every op of this model through ``backend``; returns self."""
        name = ops.normalize_backend(backend)
        self.backend = name
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                module.backend = name
        return self

    def set_ensemble(self, variants: int) -> "FILM":
        """Runs every interpolation on ``variants`` (1-4) flipped copies of the pair and averages
        the flipped-back outputs (:data:`FLIPS`); returns self.

        1 is the plain model. Costs ``variants`` times the time and activation memory; the
        built-in model gains 0.17-0.19 dB with 2 and 0.27-0.31 dB with 4 on DAVIS / UCF101.
        :meth:`debug_forward` always runs the plain model (its intermediates are per pass).
        """
        self.ensemble = check_ensemble(variants)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- inputs -------------------------------------------------------------------------
    def _check_inputs(self, x0: torch.Tensor, x1: torch.Tensor, batch_dt: TimeLike) -> torch.Tensor:
        for name, x in (("x0", x0), ("x1", x1)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W], got {type(x).__name__}")
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"{name} must be [B, 3, H, W] (RGB, NCHW), got shape {list(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor with values in [0, 1], got {x.dtype}")
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {list(x0.shape)} and "
                             f"{list(x1.shape)}")
        return self._check_time(batch_dt, x0.shape[0])

    def _check_time(self, batch_dt: TimeLike, batch: int) -> torch.Tensor:
        """``[B, 1]``, ``[B]`` or scalar time -> float32 ``[B]`` on the model's device.

        Without a host sync on a GPU: a number becomes a device-side fill, a CPU tensor an
        asynchronous copy (a plain ``.to("cuda")`` would wait for the stream to drain, and
        the streaming engine calls this once per forward)."""
        if not isinstance(batch_dt, torch.Tensor):
            value, device = float(batch_dt), self.device
            if device.type == "cpu":  # (a broadcast scalar: no kernel at all)
                return torch.tensor(value, dtype=torch.float32).expand(batch)
            return torch.full((batch,), value, dtype=torch.float32, device=device)
        dt = batch_dt.detach() if not batch_dt.requires_grad else batch_dt
        if dt.dim() == 0:
            dt = dt.expand(batch)
        elif dt.dim() == 2 and dt.shape[1] == 1 and dt.shape[0] == batch:
            dt = dt[:, 0]
        elif not (dt.dim() == 1 and dt.shape[0] == batch):
            raise ValueError(f"batch_dt must be [B, 1], [B] or a scalar with B = {batch}, got shape "
                             f"{list(batch_dt.shape)}")
        return to_device_async(dt, self.device, torch.float32)

    # ---- graph ----------------------------------------------------------------------------
    def _dense_on_cpu(self, device: torch.device) -> bool:
        """True when the ops run on the CPU through the torch backend. There a launch costs
        next to nothing while strided reads and writes of channel slices stream slower than
        dense tensors (oneDNN reorders a strided conv input; a 5-D strided product into a
        buffer slice runs 3-8x slower than a dense one plus copies), so the graph keeps its
        dense intermediates and copies them into the buffers. Everywhere else (GPUs, and
        the Triton interpreter that stands in for them in tests) the buffers are written
        in place, with as few launches as possible."""
        return device.type == "cpu" and ops.library.backend_for("warp", self.backend,
                                                                device) == "torch"

    def encode(self, frames: torch.Tensor) -> FrameFeatures:
        """Pads ``frames [N, 3, H, W]`` and computes their image + feature pyramids.

        The result depends on each frame alone, so a video can encode every frame
        once and pair it with both neighbours (:meth:`interpolate_encoded`); that
        skips the feature extractor, 26% of a published-model frame's FLOPs.
        """
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
            shape = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames must be [N, 3, H, W], got {shape}")
        return self._encode([frames], self.ensemble)

    def _encode(self, parts: List[torch.Tensor], variants: int = 1) -> FrameFeatures:
        """:meth:`encode` of the frames ``torch.cat(parts)`` (same H and W), without the concat,
        each frame followed by ``variants - 1`` flipped copies (:func:`with_variants`).

        The level buffers are allocated first and, without autograd, every image goes
        straight into its image channels: the frames are converted (device, dtype), padded
        and concatenated by their copies into level 0's image channels, and each pooled
        pyramid level is stored into its level's image channels by the pooling itself
        (``out=``).
        """
        opts = self.options
        dtype, device = self.dtype, self.device
        if device.type == "cpu" and not torch.compiler.is_compiling():
            cpu_memory.ensure()  # reuse freed pages across frames (see film_fast.cpu_memory)
        parts = [with_variants(p, variants) for p in parts]
        height, width = parts[0].shape[-2:]
        pads = padding_for(height, width, opts.size_multiple)
        left, right, top, bottom = pads
        n = sum(p.shape[0] for p in parts)
        # NHWC throughout (new_buffer): on CPU oneDNN's NHWC 3x3 conv runs ~1.4x faster than
        # NCHW (181 vs 126 GFLOP/s) and its accumulation order is TF's (realflow fixture: 1.6e-5
        # vs 3.5e-5 max flow error against the official model); on GPUs it is the tensor-core
        # layout.
        buffers = self.extract.new_buffers(n, height + top + bottom, width + left + right,
                                           dtype=dtype, device=device)
        slots = [buf[:, image_channels(opts.feature_channels(i))]  # [features | image | pad]
                 for i, buf in enumerate(buffers)]
        if torch.is_grad_enabled() or self._dense_on_cpu(device):
            # With autograd the first convs save their input (the images) for backward, and a
            # saved view of a level buffer would fail autograd's version check once features
            # are written into the buffer's other channels: the images stay tensors of their
            # own here, copied into the buffers (also on CPU: see _dense_on_cpu).
            x = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            x, _ = pad_to_multiple(x.to(device=device, dtype=dtype), opts.size_multiple,
                                   opts.padding)
            x = x.contiguous(memory_format=self.memory_format)
            images = build_image_pyramid(x, opts.pyramid_levels, self.backend)
            for slot, im in zip(slots, images):
                slot.copy_(im)
        else:
            image = slots[0]
            inner = image[..., top:top + height, left:left + width]
            row = 0
            for part in parts:  # one copy per part: conversion and concat in one pass
                inner[row:row + part.shape[0]].copy_(part)
                row += part.shape[0]
            fill_padding(image, pads, opts.padding)  # centred, as pad_to_multiple
            images = build_image_pyramid(image, opts.pyramid_levels, self.backend,
                                         out=slots[1:])
        return FrameFeatures(self.extract.fill(buffers, images), pads, (height, width), variants)

    def interpolate_encoded(self, f0: FrameFeatures, f1: FrameFeatures,
                            batch_dt: TimeLike = 0.5) -> torch.Tensor:
        """The frame at ``batch_dt`` between two encoded batches (same N and size): ``[N, 3, H, W]``."""
        self.check_encoded_pair(f0, f1)
        dt = self._check_time(batch_dt, f0.frames)
        levels = [_pair_rows(a, b) for a, b in zip(f0.levels, f1.levels)]
        return self.decode_pairs(levels, f0.pads, f0.frames, f0.variants, dt)

    @staticmethod
    def check_encoded_pair(f0: FrameFeatures, f1: FrameFeatures) -> None:
        """Raises ValueError unless two encoded batches can be interpolated together."""
        if f0.variants != f1.variants:
            raise ValueError(f"encoded frames differ in flip variants: {f0.variants} vs "
                             f"{f1.variants} (encode both with the same ensemble)")
        if f0.size != f1.size or f0.levels[0].shape != f1.levels[0].shape:
            raise ValueError(f"encoded frames differ in size or count: {f0.size} x {f0.frames} "
                             f"vs {f1.size} x {f1.frames}")

    def decode_pairs(self, levels: List[torch.Tensor], pads, frames: int, variants: int,
                     dt: torch.Tensor) -> torch.Tensor:
        """:meth:`interpolate_encoded` from joint level buffers ``[2 N k, ...]`` (rows: the
        ``N`` first frames' ``k`` variants each, then the second frames') and a float32 device
        ``dt [N]``: ``[N, 3, H, W]``. The part a CUDA graph replays
        (:class:`film_fast.cuda_graphs.CUDAGraphEncoded`)."""
        k = variants
        if k == 1:
            return self._decode(levels, pads, frames, dt, debug=False)["image"]
        image = self._decode(levels, pads, frames * k, dt.repeat_interleave(k),
                             debug=False)["image"]
        return merge_variants(image, k)

    def _run(self, x0: torch.Tensor, x1: torch.Tensor, dt: torch.Tensor,
             debug: bool) -> Dict[str, object]:
        # Both frames through the extractor as one batch: [2B, 3 + C_i] level buffers (with an
        # ensemble of k flips: [2Bk, ...], each frame's variants together).
        k = 1 if debug else self.ensemble
        enc = self._encode([x0, x1], k)
        if k == 1:
            return self._decode(enc.levels, enc.pads, x0.shape[0], dt, debug)
        out = self._decode(enc.levels, enc.pads, x0.shape[0] * k, dt.repeat_interleave(k), debug)
        out["image"] = merge_variants(out["image"], k)
        return out

    def _decode(self, levels: List[torch.Tensor], pads, batch: int, dt: torch.Tensor,
                debug: bool) -> Dict[str, object]:
        """Flow estimation, warping and fusion from level buffers with rows [frame 0; frame 1]."""
        opts = self.options
        dtype = self.dtype
        x = levels[0]
        features = [buf[:, :opts.feature_channels(i)] for i, buf in enumerate(levels)]

        # Residuals in rows [x1 -> x0 (backward); x0 -> x1 (forward)], float32.
        residuals = self.predict_flow.siamese(features, batch)
        flows = synthesize_flow_pyramid(residuals, opts.fusion_pyramid_levels, self.backend)

        # Fusion level buffers [net | w0 | w1 | t * backward_flow | (1 - t) * forward_flow | pad]
        # (film_fast.buffers): frame 0 is warped by the backward flow (it reads x0 at the
        # in-between time), frame 1 by the forward flow; every piece is written in place.
        align = channel_align(x.device, dtype)
        scale = torch.cat([dt, 1.0 - dt])
        # [B, 2 (backward; forward), 1, 1, 1]: per-row scale of the [B, 2, 2, H, W] flow view
        scale_pairs = scale.view(2, batch, 1, 1, 1).transpose(0, 1)
        # fp32 models (and no autograd, where out= is not differentiable) compute the scaled
        # flows straight into the buffer, and the warps read them there: one launch per level.
        # (Dynamo refuses a strided out=; compiled graphs fuse the product and copy anyway.)
        dense = self._dense_on_cpu(x.device)
        in_place = (dtype == torch.float32 and not torch.is_grad_enabled()
                    and not torch.compiler.is_compiling() and not dense)
        fusion_levels = opts.fusion_pyramid_levels
        buffers = []
        for i in range(fusion_levels):
            layout = self.fuse.layout(i)
            c = layout.level
            src = levels[i][:, :c]  # [features | image], without the level buffer's padding
            _, _, h, w = src.shape
            buf = new_buffer(batch, layout.channels, h, w, align=align, dtype=dtype,
                             device=x.device)
            fl = layout.flows.start
            # [t * backward_flow | (1 - t) * forward_flow] as [B, 2 (which), 2 (dx, dy), H, W]
            flow_pairs = buf[:, fl:fl + 4].unflatten(1, (2, 2))
            flow_rows = flows[i].unflatten(0, (2, batch)).transpose(0, 1)  # [B, 2, 2, H, W] view
            if in_place:
                torch.mul(flow_rows, scale_pairs, out=flow_pairs)
                backward_flow, forward_flow = buf[:, fl:fl + 2], buf[:, fl + 2:fl + 4]
            else:  # the warps sample with the fp32 flows, the buffer holds them in the model dtype
                flow_t = flows[i] * scale.view(2 * batch, 1, 1, 1)  # [2B, 2, H, W] fp32
                backward_flow, forward_flow = flow_t[:batch], flow_t[batch:]
                if dense:  # two plain copies stream fastest on CPU
                    buf[:, fl:fl + 2].copy_(backward_flow)
                    buf[:, fl + 2:fl + 4].copy_(forward_flow)
                else:
                    flow_pairs.copy_(flow_t.unflatten(0, (2, batch)).transpose(0, 1))
            ops.warp(src[:batch], backward_flow, out=buf[:, layout.w0], backend=self.backend)
            ops.warp(src[batch:], forward_flow, out=buf[:, layout.w1], backend=self.backend)
            buffers.append(buf)
        image = crop_padding(self.fuse.decode(buffers), pads)
        if not debug:
            return {"image": image}
        layout0 = self.fuse.layout(0)
        return {
            "image": [image],
            "forward_residual_flow_pyramid": [r[batch:] for r in residuals],
            "backward_residual_flow_pyramid": [r[:batch] for r in residuals],
            "forward_flow_pyramid": [f[batch:] for f in flows],
            "backward_flow_pyramid": [f[:batch] for f in flows],
            "x0_warped": crop_padding(buffers[0][:, layout0.image(0)], pads),
            "x1_warped": crop_padding(buffers[0][:, layout0.image(1)], pads),
        }

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, batch_dt: TimeLike = 0.5) -> torch.Tensor:
        """Interpolates the frame at time ``batch_dt`` between ``x0`` (t=0) and ``x1`` (t=1).

        Args:
            x0, x1: ``[B, 3, H, W]`` RGB in [0, 1], any H and W.
            batch_dt: ``[B, 1]`` (the port's layout), ``[B]`` or a scalar. Published
                models are trained for t = 0.5 only (use recursion for other times).
        Returns:
            ``[B, 3, H, W]`` in the model's dtype, not clamped.
        """
        dt = self._check_inputs(x0, x1, batch_dt)
        return self._run(x0, x1, dt, debug=False)["image"]

    def debug_forward(self, x0: torch.Tensor, x1: torch.Tensor,
                      batch_dt: TimeLike = 0.5) -> Dict[str, List[torch.Tensor]]:
        """Like :meth:`forward` but returns the port's dict of intermediates.

        Keys: ``image`` (a one-element list), ``forward_residual_flow_pyramid``,
        ``backward_residual_flow_pyramid`` (``pyramid_levels`` entries each),
        ``forward_flow_pyramid``, ``backward_flow_pyramid`` (``fusion_pyramid_levels``
        entries, before time scaling), all finest first, ``[B, 2, H>>i, W>>i]`` at the
        padded size; plus ``x0_warped`` and ``x1_warped`` (``[B, 3, H, W]`` warped input
        images, as the official model returns them).
        """
        dt = self._check_inputs(x0, x1, batch_dt)
        return self._run(x0, x1, dt, debug=True)
