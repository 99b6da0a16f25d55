"""Channel-concatenation buffers: FILM's concats written in place, once.

FILM concatenates on channels everywhere (cascaded features, flow-predictor
inputs, fusion inputs). Instead of ``torch.cat`` (a fresh tensor per concat,
and a second copy when the result is concatenated again), the graph allocates
one buffer per level and has every producer write its channel range of it.

Buffers are channels_last, and their channel count may be padded up to a
multiple of ``align`` with zero channels: oneDNN's AMX bf16 convolution is 3.4x
faster at 2448 input channels than at FILM's 2442 (83.6 vs 280 ms for the
2442->512 3x3 fusion conv at 32x32, measured on this 2-core Xeon). The conv
consuming such a buffer gets its weight zero-extended to match
(:meth:`film_fast.layers.Conv.forward`), which leaves the result unchanged.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

# ---- FILM's two buffer layouts --------------------------------------------------------------
# Convolutions store their outputs into these buffers in place, and a 16-bit store is fast only
# when every output row starts 16 bytes in (Triton's big tensor-core tiles spill registers
# otherwise, see film_fast.kernels.triton.conv2d.conv_config). So the channels that
# convolutions write come first and the 3 image channels come after them: with channels
# padded to multiples of 16 in 16-bit, every written slice starts at a multiple of 16.
#
# level buffer i (an encoded frame):  [features (C_i) | image (3) | zero pad]
#   (the features are the cascade S_i[0] | S_{i-1}[1] | ...: slices at 0, 64, 192, 448 for
#   the published model)
# fusion buffer i:                    [net (F_i) | w0 (C_i + 3) | w1 (C_i + 3) | flows (4) | pad]
#   w0 / w1: the level buffers of frames 0 / 1 warped (features, then image); flows: t *
#   backward_flow, (1 - t) * forward_flow; net: the decoder's up-conv output (none at the
#   coarsest level). The official graph concatenates [image 0 | features 0 | image 1 |
#   features 1 | flows | net]; the convs reading these buffers get their weights' input
#   channels rearranged to match (fusion_input_blocks, Conv.input_blocks).


def image_channels(feature_channels: int) -> slice:
    """Where a level buffer holds the image: right after its ``C_i`` feature channels."""
    return slice(feature_channels, feature_channels + 3)


class FusionLayout(NamedTuple):
    """Channel offsets of one fusion buffer (see the layout above)."""

    net: int          # width of the up-conv output at the front (0 at the coarsest level)
    level: int        # C_i + 3: one warped level buffer
    features: int     # C_i

    @property
    def w0(self) -> slice:
        return slice(self.net, self.net + self.level)

    @property
    def w1(self) -> slice:
        return slice(self.net + self.level, self.net + 2 * self.level)

    @property
    def flows(self) -> slice:
        start = self.net + 2 * self.level
        return slice(start, start + 4)

    @property
    def channels(self) -> int:
        return self.net + 2 * self.level + 4

    def image(self, frame: int) -> slice:
        """The warped image of ``frame`` (0 or 1)."""
        start = (self.w0 if frame == 0 else self.w1).start + self.features
        return slice(start, start + 3)


def fusion_input_blocks(layout: FusionLayout) -> Tuple[Tuple[int, int], ...]:
    """The buffer's channels as ranges of the official fusion input channels ``[image 0 |
    features 0 | image 1 | features 1 | flows | net]`` (what :attr:`Conv.input_blocks` takes)."""
    c, lv = layout.features, layout.level
    blocks: List[Tuple[int, int]] = []
    if layout.net:
        blocks.append((2 * lv + 4, 2 * lv + 4 + layout.net))
    blocks += [(3, lv), (0, 3), (lv + 3, 2 * lv), (lv, lv + 3), (2 * lv, 2 * lv + 4)]
    assert sum(b - a for a, b in blocks) == layout.channels and c == lv - 3
    return tuple(blocks)


#: True makes CPU tensors take the GPU's channel alignment: for tools that run the GPU graph
#: on CPU tensors (``benchmarks/memory_check.py --device cpu``, ``tests/test_memory_plan.py``).
GPU_ALIGNMENT_ON_CPU = False


def channel_align(device: torch.device, dtype: torch.dtype) -> int:
    """Channel multiple that buffers feeding convolutions are padded to."""
    if dtype in (torch.bfloat16, torch.float16):
        return 16  # AMX-BF16 on CPU, tensor-core K tiles on GPU
    if torch.device(device).type != "cpu" or GPU_ALIGNMENT_ON_CPU:
        # fp32 on GPUs (and in meta-device dry runs of them): rows that are multiples of 16
        # channels let Triton's convs use their big tiles; 55% of the published model's fp32
        # conv FLOPs stored into or read from unaligned rows otherwise (dry-run count).
        return 16
    return 1  # fp32 on CPU: no measurable gain (2442 vs 2448: 336 ms both)


def aligned(channels: int, align: int) -> int:
    return -(-channels // align) * align


def new_buffer(batch: int, channels: int, height: int, width: int, *, align: int,
               dtype: torch.dtype, device: torch.device, zero_padding: bool = True) -> torch.Tensor:
    """``[batch, aligned(channels), H, W]`` channels_last; only the padding channels are zeroed
    (not even those with ``zero_padding=False``: for buffers no conv reads whole)."""
    total = aligned(channels, align)
    buf = torch.empty(batch, total, height, width, dtype=dtype, device=device,
                      memory_format=torch.channels_last)
    if total > channels and zero_padding:
        buf[:, channels:].zero_()
    return buf
