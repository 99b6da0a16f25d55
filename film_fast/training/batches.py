"""Training batches prepared in worker processes, in step order.

:meth:`TripletSampler.batch` is a pure function of ``(seed, step)``, so worker
processes can prepare the batches of later steps while the model trains on the
current one, and the run stays bit-identical to one without workers (and to a
resumed one): the workers change when a batch is made, never what it holds.

Why: cropping, augmenting (rotations resample three frames) and rendering
synthetic scenes cost ~12 ms per 192 px sample on one core of the 2-core CPU
(0.07 s for a batch of 6 against a 3.2 s CPU step: 2%, no gain from a worker
there), but a GPU step of the built-in model takes milliseconds, so a GPU run
without workers would wait on the sampler most of the time.
"""
from __future__ import annotations

import os
from typing import Iterator, Tuple, Union

import torch

from .data import Triplet, TripletSampler


def resolve_workers(setting: Union[int, str], device: torch.device) -> int:
    """``data_workers`` -> a process count: ``"auto"`` is 0 on CPU (the step itself uses
    every core) and ``min(8, cores - 2)`` (at least 1) on GPUs."""
    if setting == "auto":
        if device.type == "cpu":
            return 0
        return max(1, min(8, (os.cpu_count() or 2) - 2))
    return int(setting)


class _StepBatches(torch.utils.data.Dataset):
    """Item ``k`` is the batch of step ``start + k``."""

    def __init__(self, sampler: TripletSampler, start: int, end: int) -> None:
        self.sampler, self.start, self.end = sampler, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, k: int) -> Triplet:
        return self.sampler.batch(self.start + k)


def batch_stream(sampler: TripletSampler, start: int, end: int, workers: int,
                 pin_memory: bool = False) -> Iterator[Tuple[int, Triplet]]:
    """``(step, (x0, y, x1))`` for ``step`` in ``[start, end)``, each ``[B, 3, S, S]`` float32.

    ``workers == 0`` makes each batch in this process when it is needed. Otherwise
    ``workers`` processes (forked where the platform allows, so decoded clips are
    shared, not copied) keep up to ``4 * workers`` batches ready, in step order.
    """
    if workers <= 0:
        for step in range(start, end):
            yield step, sampler.batch(step)
        return
    import multiprocessing
    ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(
        _StepBatches(sampler, start, end), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=4, pin_memory=pin_memory, multiprocessing_context=ctx)
    for step, batch in enumerate(loader, start):
        yield step, batch
