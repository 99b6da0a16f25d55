"""The fusion decoder's up step (nearest 2x upsample + 2x2 'same' conv) at coarse resolution.

Nearest-exact upsampling by exactly 2 repeats every coarse pixel ``x[y, x]`` into the fine
pixels ``(2y + a, 2x + b)``, ``a, b in {0, 1}``. A 2x2 'same' conv (zero row/column past the
bottom/right) at fine pixel ``(2y + a, 2x + b)`` reads fine rows ``2y + a, 2y + a + 1`` and
columns ``2x + b, 2x + b + 1``, i.e. coarse rows ``y`` (twice) when ``a = 0`` or ``y, y + 1``
when ``a = 1``, and likewise for columns. So each output phase ``(a, b)`` is a small conv of
the *coarse* input with taps summed from the 2x2 weight ``K[dy][dx]``::

    (0, 0): 1x1  K00 + K01 + K10 + K11
    (0, 1): 1x2  [K00 + K10, K01 + K11]            at columns x, x + 1
    (1, 0): 2x1  [K00 + K01; K10 + K11]            at rows y, y + 1
    (1, 1): 2x2  K                                  at rows y, y + 1 and columns x, x + 1

with zero padding past the coarse bottom/right exactly where the fine conv had it. The four
phases cost 1 + 2 + 2 + 4 = 9 coarse taps per coarse pixel against 16 for the fine conv
(7/16 of the FLOPs saved, 83 -> 47 GFLOP for the published model at 512x512), and the
upsampled tensor (4x the coarse input: 254 MB at 512x512) is never made. Each phase's result
is stored straight into its interleaved pixels of the destination (one strided copy per
phase, together the size of the output). Equal to the reference up to the rounding of the
tap sums (fp32: 1e-6 relative).

CPU, float32, inference only (``eligible``); the kernel backends have their own fused
versions (``kernels/``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .eager import plain_eager
from .weight_cache import DerivedWeights

_PHASES = DerivedWeights()  # the four phase kernels per weight

# (phase (a, b), padding of a symmetric conv, offset of the wanted rows/columns in its output)
_LAYOUT = (((0, 0), (0, 0), (0, 0)), ((0, 1), (0, 1), (0, 1)),
           ((1, 0), (1, 0), (1, 0)), ((1, 1), (1, 1), (1, 1)))


def eligible(x: torch.Tensor, size: Sequence[int], weight: torch.Tensor,
             bias: Optional[torch.Tensor]) -> bool:
    """CPU fp32 inference at exactly twice the input size, outside tracing."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if tuple(int(s) for s in size) != (2 * x.shape[2], 2 * x.shape[3]):
        return False
    if tuple(weight.shape[-2:]) != (2, 2):
        return False
    if not plain_eager(x, weight, bias):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return True


def phase_weights(weight: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The four phase kernels ``[Cout, Cin, kh, kw]`` (1x1, 1x2, 2x1, 2x2) of a 2x2 weight,
    cached per weight tensor and version (sums of up to 2.0 M-element slices per call
    otherwise)."""
    return _PHASES.get(weight, None, _phase_kernels)


def _phase_kernels(k: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    rows = k[:, :, 0:1, :] + k[:, :, 1:2, :]  # [Cout, Cin, 1, 2]: summed over dy
    cols = k[:, :, :, 0:1] + k[:, :, :, 1:2]  # [Cout, Cin, 2, 1]: summed over dx
    one = rows[:, :, :, 0:1] + rows[:, :, :, 1:2]
    return tuple(t.contiguous() for t in (one, rows, cols, k))


def _conv(x: torch.Tensor, kernel: torch.Tensor, bias: Optional[torch.Tensor],
          padding: Tuple[int, int], offset: Tuple[int, int]) -> torch.Tensor:
    """``[B, Cout, h, w]`` (a view): the conv read at ``offset`` of a symmetrically padded conv,
    i.e. taps at rows/columns ``(y, y + 1)`` with zeros past the bottom/right."""
    h, w = x.shape[-2:]
    y = F.conv2d(x, kernel, bias, padding=padding)
    return y[..., offset[0]:offset[0] + h, offset[1]:offset[1] + w]


def upsample_conv2x2_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          out: torch.Tensor) -> torch.Tensor:
    """Writes ``conv2x2_same(nearest_2x(x))`` into ``out [B, Cout, 2h, 2w]`` (any strides);
    returns ``out``."""
    h, w = x.shape[-2:]
    # out[b, c, 2y + a, 2x + p] as [B, C, h, 2 (a), w, 2 (p)]: one view per phase
    split = out.unflatten(2, (h, 2)).unflatten(4, (w, 2))
    for kernel, ((a, p), padding, offset) in zip(phase_weights(weight), _LAYOUT):
        split[:, :, :, a, :, p].copy_(_conv(x, kernel, bias, padding, offset))
    return out
