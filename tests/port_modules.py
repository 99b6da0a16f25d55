"""A module tree with the PyTorch port's attribute names, to build TorchScript/state-dict fixtures.

It reproduces only the port's *names* (``extract.extract_sublevels.convs.j.n.0``,
``predict_flow._predictors.r._convs.n.0`` in reversed level order,
``predict_flow._predictor``, ``fuse.convs.r.m.0`` coarse to fine,
``fuse.output_conv``) and its int attributes, so that ``torch.jit.script`` writes
an archive laid out like film_net_fp32.pt; its forward is a stub.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch
from torch import nn


class _Seq(nn.Sequential):
    def __init__(self, weight_shape: Tuple[int, ...]) -> None:
        out_c, in_c, kh, kw = weight_shape
        super().__init__(nn.Conv2d(in_c, out_c, (kh, kw)))


class _ConvList(nn.Module):
    def __init__(self, shapes) -> None:
        super().__init__()
        self._convs = nn.ModuleList([_Seq(s) for s in shapes])


class _Extract(nn.Module):
    def __init__(self, stages) -> None:
        super().__init__()
        self.extract_sublevels = nn.Module()
        self.extract_sublevels.convs = nn.ModuleList(
            nn.ModuleList([_Seq(s) for s in stage]) for stage in stages)


class _Flow(nn.Module):
    def __init__(self, special, shared) -> None:
        super().__init__()
        self._predictor = _ConvList(shared)
        self._predictors = nn.ModuleList([_ConvList(p) for p in special])


class _Fuse(nn.Module):
    def __init__(self, levels, output) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.ModuleList([_Seq(s) for s in lvl]) for lvl in levels)
        self.output_conv = nn.Conv2d(output[1], output[0], 1)


class PortLikeInterpolator(nn.Module):
    """Built from a port state dict's shapes; ``load_state_dict`` then fills it by name."""

    def __init__(self, state: Dict[str, torch.Tensor], pyramid_levels: int,
                 fusion_pyramid_levels: int) -> None:
        super().__init__()
        self.pyramid_levels = pyramid_levels
        self.fusion_pyramid_levels = fusion_pyramid_levels

        def shapes(prefix: str, depth: int):
            def index(k: str):
                return [int(p) for p in re.findall(r"\d+", k[len(prefix):])][:depth]

            keys = sorted((k for k in state if k.startswith(prefix) and k.endswith(".weight")),
                          key=index)
            grouped: Dict[int, list] = {}
            for k in keys:
                idx = index(k)
                grouped.setdefault(idx[0], []).append(tuple(state[k].shape))
            return [grouped[i] for i in sorted(grouped)]

        self.extract = _Extract(shapes("extract.extract_sublevels.convs.", 2))
        special = shapes("predict_flow._predictors.", 2)
        shared = [tuple(state[k].shape) for k in sorted(
            (k for k in state if k.startswith("predict_flow._predictor._convs.") and k.endswith("weight")),
            key=lambda k: int(k.split(".")[3]))]
        self.predict_flow = _Flow(special, shared)
        self.fuse = _Fuse(shapes("fuse.convs.", 2), tuple(state["fuse.output_conv.weight"].shape[:2]))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, batch_dt: torch.Tensor) -> torch.Tensor:
        return x0 * batch_dt[..., None, None] + x1 * (1 - batch_dt[..., None, None])
