"""Exponential moving average (EMA) of the weights during training (``ema_decay``).

The averaged weights are what ``model.safetensors`` exports when ``ema_decay > 0``;
checkpoints hold both the raw weights (``model.*``, what the optimizer continues on
``--resume``) and the average (``ema.*``, what ``film_fast.load`` reads from such a
checkpoint, so a checkpoint and the export of the same step give the same frames).

The decay at step ``s`` is ``min(ema_decay, (1 + s) / (10 + s))``: a function of the
step alone, so a resumed run averages exactly like an uninterrupted one, and the
first steps (decay 0.1, 0.18, ...) do not drag a fine-tune toward its start.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
from torch import nn


class WeightAverage:
    """EMA of ``model``'s floating-point parameters, kept as float32 ``{name: tensor}``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
            if p.is_floating_point()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``shadow = d * shadow + (1 - d) * param`` with ``d = decay_at(step)``."""
        params = dict(model.named_parameters())
        names = list(self.shadow)
        current = [params[n].detach().float() for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - self.decay_at(step))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights (first: {missing[0]})")
        for name, t in self.shadow.items():
            t.copy_(state[name])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily puts the averaged weights into ``model`` (validation, export)."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, t in self.shadow.items():
                params[n].copy_(t)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)
