"""The one parameterised layer FILM needs: a stride-1 'same' conv routed through ``film_fast.ops``."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


class Conv(nn.Module):
    """Stride-1 TF-'same' conv with bias and optional LeakyReLU(0.2).

    Parameters are ``weight [out, in, k, k]`` (OIHW) and ``bias [out]``; the
    computation is delegated to :func:`film_fast.ops.conv2d` with the owning
    model's backend (set through :meth:`film_fast.FILM.set_backend`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 activation: Optional[str] = "leaky_relu") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.backend: Optional[str] = None
        self._padded_key: Optional[tuple] = None
        self._padded: Optional[torch.Tensor] = None
        self._cast_key: Optional[tuple] = None
        self._cast: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # The order of the input channels in the buffer this conv reads, as consecutive
        # ranges of the weight's (official) input channels; None = the weight's own order.
        # Set by the fusion decoder, whose buffers put the up-conv's output first (see
        # film_fast.fusion); the parameter itself always keeps the official order.
        self.input_blocks: Optional[Tuple[Tuple[int, int], ...]] = None
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as torch.nn.Conv2d (kaiming-uniform with a=sqrt(5)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.in_channels * self.kernel_size * self.kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def _arranged(self, w: torch.Tensor, extra: int) -> torch.Tensor:
        if self.input_blocks is not None:
            w = torch.cat([w[:, a:b] for a, b in self.input_blocks], dim=1)
        return F.pad(w, (0, 0, 0, 0, 0, extra)) if extra else w

    def weight_for(self, channels: int) -> torch.Tensor:
        """The weight for a buffer of ``channels`` input channels: its input channels in the
        buffer's order (:attr:`input_blocks`), zero-extended for channel-aligned buffers.

        Extra input channels get zero weights, so the result does not depend on them.
        The arranged copy is cached for inference and rebuilt when the weight changes.
        """
        w = self.weight
        extra = channels - w.shape[1]
        if extra == 0 and self.input_blocks is None:
            return w
        if extra < 0:
            raise ValueError(f"conv expects {w.shape[1]} input channels, got {channels}")
        if ((torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling()
                or w.is_inference()):
            # (compiled graphs arrange in the graph: the cache key reads data_ptr, untraceable;
            # an inference tensor has no version counter to key on)
            return self._arranged(w, extra)
        key = (channels, w.dtype, w.device, w.data_ptr(), w._version)
        if self._padded_key != key:
            # (a normal tensor even when built in inference mode: it has a version counter, so
            # kernel backends may cache what they derive from it, e.g. Triton's packed weights)
            with torch.inference_mode(False), torch.no_grad():
                self._padded = self._arranged(w.detach(), extra).contiguous()
            self._padded_key = key
        return self._padded

    def params_as(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` in ``dtype`` (the flow heads run in fp32 in every model dtype).

        For inference the converted copies are cached and rebuilt when a parameter changes,
        instead of two conversions per call.
        """
        w, b = self.weight, self.bias
        if w.dtype == dtype and b.dtype == dtype:
            return w, b
        if ((torch.is_grad_enabled() and (w.requires_grad or b.requires_grad))
                or torch.compiler.is_compiling() or w.is_inference() or b.is_inference()):
            return w.to(dtype), b.to(dtype)
        key = (dtype, w.device, w.data_ptr(), w._version, b.data_ptr(), b._version)
        if self._cast_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cast = (w.detach().to(dtype), b.detach().to(dtype))
            self._cast_key = key
        return self._cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Cin (+zero padding channels), H, W] -> [B, Cout, H, W]``."""
        return ops.conv2d(x, self.weight_for(x.shape[1]), self.bias, self.activation,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"activation={self.activation}")
