"""``film-fast train``: train any film_net config from a config file (see :mod:`.config`)."""
from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub, prog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a FILM model from a config file (resumable)",
        description="Trains a film_net model as the config file says (data sources, loss "
                    "schedule, AdamW with the official learning-rate decay, precision) and "
                    "writes OUT/checkpoints/step_*.safetensors, OUT/metrics.csv, TensorBoard "
                    "events and OUT/model.safetensors (loadable with film_fast.load / --model). "
                    "configs/film_fast_default.json reproduces the built-in model.")
    p.add_argument("--config", required=True, metavar="FILE", help="JSON (or TOML) config")
    p.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (exactly: the same "
                        "weights as an uninterrupted run)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="stop at step N instead of the config's num_steps (the learning-rate "
                        "schedule is unchanged)")
    p.add_argument("--export", default=None, metavar="FILE",
                   help="also write the final weights to FILE (.safetensors)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import Trainer
    cfg = load_config(args.config)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    trainer = Trainer(cfg, out, device=args.device, resume=args.resume, progress=not args.quiet,
                      num_threads=args.threads)
    if not args.quiet:
        print(f"film-fast train: {out}: {trainer.options.to_json()}, precision {trainer.precision}, "
              f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters, "
              f"starting at step {trainer.step}", file=sys.stderr)
    try:
        row = trainer.run(args.steps)
    except KeyboardInterrupt:
        return 130
    if args.export:
        trainer.export(args.export)
    if not args.quiet:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
        print(f"film-fast train: done at step {trainer.step}: {shown}; weights in "
              f"{os.path.join(out, 'model.safetensors')}")
    return 0
