"""The one parameterised layer FILM needs: a stride-1 'same' conv routed through ``film_fast.ops``."""
from __future__ import annotations

import math
from typing import Optional

import torch
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
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as torch.nn.Conv2d (kaiming-uniform with a=sqrt(5)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.in_channels * self.kernel_size * self.kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"activation={self.activation}")
