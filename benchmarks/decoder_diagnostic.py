"""Is the fusion decoder the weak part of a model? Scores its output against its own warps.

For each triplet (any folder ``film-fast eval`` reads), one ``debug_forward`` at t = 0.5
gives the model's output and its two warped inputs ``x0_warped``, ``x1_warped``
(``[1, 3, H, W]``). It prints the mean PSNR (official protocol: RGB in [0, 1], clipped) of:

- ``average``: frame averaging ``(x0 + x1) / 2``, the baseline ``film-fast eval`` prints;
- ``model``: the model's output;
- ``w0``, ``w1``: each warped input alone;
- ``warp_avg``: ``(x0_warped + x1_warped) / 2``, what the flows alone give;
- ``best_warp``: per pixel, the warp closer to the ground truth (an oracle: the ceiling of a
  decoder that only chooses between the warps, occlusions handled perfectly).

If ``model`` is below ``warp_avg``, the decoder loses information the flows already have.
The built-in model after its stage 3 scored 25.49 (model) against 25.57 dB (warp_avg) on the 30
DAVIS triplets, and that is why its stage 4 starts with ``model_init: fusion_passthrough``
(README, "The built-in model").

    python benchmarks/decoder_diagnostic.py DATASET_ROOT [...] [--model PATH] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import film_fast  # noqa: E402
from film_fast.evaluation import discover_triplets, load_triplet, psnr  # noqa: E402

COLUMNS = ("average", "model", "w0", "w1", "warp_avg", "best_warp")


@torch.no_grad()
def scores(model, x0: torch.Tensor, gt: torch.Tensor, x1: torch.Tensor) -> list:
    """PSNRs of one triplet, in the order of ``COLUMNS``."""
    out = model.debug_forward(x0, x1, 0.5)
    w0, w1 = out["x0_warped"].float(), out["x1_warped"].float()
    closer0 = ((w0 - gt) ** 2).sum(1, keepdim=True) <= ((w1 - gt) ** 2).sum(1, keepdim=True)
    images = [(x0 + x1) / 2, out["image"][0].float(), w0, w1, (w0 + w1) / 2,
              torch.where(closer0, w0, w1)]
    return [float(psnr(im.clamp(0, 1), gt)) for im in images]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+", help="data set folders (any layout film-fast eval reads)")
    parser.add_argument("--model", default=None, help="weights (default: the built-in model)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--per-item", action="store_true", help="print every triplet")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = film_fast.load(args.model, device="cpu").eval()
    print("data set".ljust(28) + "".join(c.rjust(10) for c in COLUMNS))
    for root in args.roots:
        rows = []
        for triplet in discover_triplets(root):
            x0, gt, x1 = load_triplet(triplet)
            rows.append(scores(model, x0, gt, x1))
            if args.per_item:
                print(f"  {triplet.name[:26]:26}" + "".join(f"{v:10.2f}" for v in rows[-1]))
        mean = np.mean(rows, axis=0)
        name = f"{os.path.basename(os.path.normpath(root))} ({len(rows)})"
        print(f"{name[:28]:28}" + "".join(f"{v:10.2f}" for v in mean), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
