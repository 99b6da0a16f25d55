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
    p.add_argument("--max-time", type=float, default=None, metavar="MINUTES",
                   help="stop at the first log step after MINUTES of training, with a checkpoint "
                        "there and the weights exported; --resume continues it exactly")
    p.add_argument("--workers", default=None, metavar="N",
                   help="processes that prepare batches ahead ('auto': 0 on CPU, min(8, cores "
                        "- 2) on GPUs; default: the config's data_workers). The batches are the "
                        "same for any N")
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
    if args.workers is not None:
        from .config import validate
        cfg["data_workers"] = args.workers if args.workers == "auto" else _int_arg("--workers",
                                                                                   args.workers)
        validate(cfg)
    if args.max_time is not None and not args.max_time > 0:
        raise ValueError(f"--max-time must be a positive number of minutes, got {args.max_time}")
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
        row = trainer.run(args.steps, max_seconds=None if args.max_time is None
                          else 60.0 * args.max_time)
    except KeyboardInterrupt:
        return 130
    if args.export:
        trainer.export(args.export)
    if not args.quiet:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
        done = "stopped (time limit)" if trainer.stopped_early else "done"
        print(f"film-fast train: {done} at step {trainer.step}: {shown}; weights in "
              f"{os.path.join(out, 'model.safetensors')}")
    return 0


def _int_arg(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} must be 'auto' or an integer >= 0, got {text!r}") from None
