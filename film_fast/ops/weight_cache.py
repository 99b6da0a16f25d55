"""Tensors derived from a weight (Winograd's ``G g G^T``, the up-conv's phase kernels), cached.

Deriving them costs real time per call (transforming the 2442x512 fusion kernel takes ~0.1 s),
while a model's weights rarely change. An entry is keyed by the weight tensor (its ``id``) and a
tag, and it is recomputed when the weight changes in place (its version counter or data pointer
moves: ``load_state_dict``, an optimizer step). It is dropped when the weight dies, so that
swapping models does not leak (the published model's Winograd kernels take ~0.5 GB).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Hashable, Tuple

import torch


class DerivedWeights:
    """``get(weight, tag, compute)``: ``compute(weight.detach())``, cached per (weight, tag)."""

    def __init__(self) -> None:
        # (id(weight), tag) -> (weakref to the weight, (version, data_ptr), derived value)
        self._entries: Dict[Tuple[int, Hashable], tuple] = {}

    def __contains__(self, key: Tuple[int, Hashable]) -> bool:
        return key in self._entries

    def get(self, weight: torch.Tensor, tag: Hashable, compute: Callable[[torch.Tensor], object]):
        if weight.is_inference():
            # No version counter to key on (e.g. a weight a compiled graph rearranged inside
            # inference_mode, see Conv.weight_for): derived per call, not cached.
            with torch.no_grad():
                return compute(weight.detach())
        key = (id(weight), tag)
        version = (weight._version, weight.data_ptr())
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == version:
            return hit[2]
        # Real tensors even when called under inference_mode (they outlive it) or autograd.
        with torch.inference_mode(False), torch.no_grad():
            value = compute(weight.detach())
        if key not in self._entries:
            weakref.finalize(weight, self._entries.pop, key, None)
        self._entries[key] = (weakref.ref(weight), version, value)
        return value
