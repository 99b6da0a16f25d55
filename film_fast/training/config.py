"""``film-fast train`` configuration: a JSON (or, on Python >= 3.11, TOML) file.

Every key has a default; unknown keys are errors (a typo must not silently train
something else). Paths in ``data`` are relative to the config file's folder.

Example (``configs/film_fast_default.json`` trains the built-in model)::

    {
      "model": {"filters": 16, "flow_filters": [16, 32, 64, 64]},
      "data": {
        "crop_size": 128, "batch_size": 8,
        "train": [{"kind": "video", "paths": ["../data/train"], "strides": [1, 2], "weight": 0.5},
                  {"kind": "synthetic", "textures": ["../data/train"], "weight": 0.5}],
        "augmentations": ["random_image_rot90", "random_flip", "random_rotate", "random_reverse"]
      },
      "loss": "L1",
      "optimizer": {"learning_rate": 1e-3, "decay_steps": 2000, "decay_rate": 0.464158},
      "num_steps": 8000, "precision": "bf16"
    }

``loss`` is ``"L1" | "VGG" | "Style"`` (the official schedules, see
:data:`film_fast.training.losses.OFFICIAL_SCHEDULES`) or an explicit
``{"l1": {"boundaries": [...], "values": [...]}, "l2": ..., "vgg": ..., "style": ...}``
(``l2``, the mean squared error, is not in the official configs); VGG and Style need
``vgg_path``.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict

from ..options import Options


class ConfigError(ValueError):
    """The training config is malformed; the message names the key."""


DEFAULTS: Dict[str, Any] = {
    "model": {},                      # film_net Options; {} = the published config
    "init": None,                     # weights to start from (any checkpoint film_fast.load reads)
    "model_init": "default",          # default | average_fusion | fusion_passthrough | widen (training/init.py)
    "data": {
        "crop_size": 256,             # official: 256
        "batch_size": 8,              # official: 8
        "train": [],
        "val": [],
        "augmentations": ["random_image_rot90", "random_flip", "random_rotate", "random_reverse"],
        "rotate_max_degrees": 45.0,   # official: +-45 degrees, with probability 1/2
        "min_scale": 0.5,             # for the optional "random_scale"
    },
    "loss": "L1",
    "vgg_path": None,
    "optimizer": {
        "learning_rate": 1e-4,        # official: 1e-4
        "decay_steps": 750000,        # official: 750k
        "decay_rate": 0.464158,       # official: 0.464158 (= 0.1 ** (1/3))
        "staircase": True,            # official: True
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "grad_clip": None,            # max global grad norm, None = off
    },
    "ema_decay": 0.0,                 # EMA of the weights, exported when > 0 (e.g. 0.999); not official
    "num_steps": 3000000,             # official: 3M
    "seed": 0,
    "precision": "auto",              # auto | fp32 | bf16 | fp16 (fp16: CUDA only, loss-scaled)
    "backend": "auto",
    "data_workers": "auto",           # batch-making processes: auto = 0 on CPU, min(8, cores - 2)
                                      # on GPUs; never changes the batches (film_fast/training/batches.py)
    "log_every": 50,
    "checkpoint_every": 1000,
    "keep_checkpoints": 3,
    "eval_every": 0,                  # 0 = only at the end (when val sources are given)
    "export_dtype": "fp32",           # dtype of the exported model.safetensors
}

SOURCE_KEYS = {
    "video": {"kind", "paths", "strides", "frame_range", "weight", "cut_threshold"},
    "synthetic": {"kind", "textures", "max_motion", "max_layers", "weight", "frame_range"},
    "vimeo": {"kind", "root", "split", "weight"},
    "triplets": {"kind", "root", "layout", "weight"},
}


def _merge(base: Dict[str, Any], override: Dict[str, Any], where: str) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {sorted(base)})")
        if isinstance(base[key], dict) and base[key] and key != "model":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table/object, got {value!r}")
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _check_sources(sources, where: str) -> None:
    if not isinstance(sources, list):
        raise ConfigError(f"{where}: expected a list of sources, got {sources!r}")
    for k, src in enumerate(sources):
        here = f"{where}[{k}]"
        if not isinstance(src, dict) or "kind" not in src:
            raise ConfigError(f"{here}: each source needs a 'kind' ({sorted(SOURCE_KEYS)})")
        kind = src["kind"]
        if kind not in SOURCE_KEYS:
            raise ConfigError(f"{here}.kind: unknown {kind!r}; choose from {sorted(SOURCE_KEYS)}")
        extra = set(src) - SOURCE_KEYS[kind]
        if extra:
            raise ConfigError(f"{here}: unknown keys {sorted(extra)} for kind {kind!r}")
        needed = {"video": "paths", "synthetic": "textures", "vimeo": "root", "triplets": "root"}[kind]
        if needed not in src:
            raise ConfigError(f"{here}: kind {kind!r} needs {needed!r}")


def validate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Checks types and ranges; returns ``cfg``. Raises ConfigError naming the key."""
    try:
        Options.from_dict(dict(Options().to_dict(), **cfg["model"]))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    data = cfg["data"]
    for key in ("crop_size", "batch_size"):
        if not isinstance(data[key], int) or data[key] < 1:
            raise ConfigError(f"data.{key}: must be a positive integer, got {data[key]!r}")
    _check_sources(data["train"], "data.train")
    if not data["train"]:
        raise ConfigError("data.train: give at least one source")
    _check_sources(data["val"], "data.val")
    for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}: must be a positive integer, got {cfg[key]!r}")
    if cfg["checkpoint_every"] % cfg["log_every"]:
        # Checkpoints fall on log boundaries so a resumed run writes the same log rows.
        raise ConfigError(f"checkpoint_every ({cfg['checkpoint_every']}) must be a multiple of "
                          f"log_every ({cfg['log_every']})")
    ema = cfg["ema_decay"]
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
        raise ConfigError(f"ema_decay: must be a number in [0, 1) (0 = off), got {ema!r}")
    workers = cfg["data_workers"]
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"data_workers: must be 'auto' or an integer >= 0, got {workers!r}")
    if not isinstance(cfg["eval_every"], int) or cfg["eval_every"] < 0:
        raise ConfigError(f"eval_every: must be an integer >= 0, got {cfg['eval_every']!r}")
    from .init import INITS, NEEDS_INIT
    if cfg["model_init"] not in INITS:
        raise ConfigError(f"model_init: must be one of {list(INITS)}, got {cfg['model_init']!r}")
    if cfg["model_init"] in NEEDS_INIT and not cfg["init"]:
        raise ConfigError(f"model_init {cfg['model_init']!r} works on trained weights: set "
                          "'init' to the checkpoint to start from")
    if cfg["precision"] not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision: must be auto, fp32, bf16 or fp16, got {cfg['precision']!r}")
    if cfg["export_dtype"] not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"export_dtype: must be fp32, fp16 or bf16, got {cfg['export_dtype']!r}")
    opt = cfg["optimizer"]
    for key in ("learning_rate", "decay_rate"):
        if not isinstance(opt[key], (int, float)) or opt[key] <= 0:
            raise ConfigError(f"optimizer.{key}: must be a positive number, got {opt[key]!r}")
    if not isinstance(opt["decay_steps"], int) or opt["decay_steps"] < 1:
        raise ConfigError(f"optimizer.decay_steps: must be a positive integer, got {opt['decay_steps']!r}")
    if isinstance(cfg["loss"], str) and cfg["loss"] not in ("L1", "VGG", "Style"):
        raise ConfigError(f"loss: must be 'L1', 'VGG', 'Style' or a table of schedules, got {cfg['loss']!r}")
    return cfg


def load_config(path: str) -> Dict[str, Any]:
    """Reads, merges with :data:`DEFAULTS`, validates; data paths become absolute."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.lower().endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                raise ConfigError(f"{path}: TOML configs need Python >= 3.11; use JSON") from None
            user = tomllib.loads(raw.decode("utf-8"))
        else:
            user = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: the top level must be an object/table")
    cfg = validate(_merge(DEFAULTS, user, os.path.basename(path)))
    base = os.path.dirname(os.path.abspath(path))
    for split in ("train", "val"):
        for src in cfg["data"][split]:
            for key in ("paths", "textures"):
                if key in src:
                    src[key] = [os.path.normpath(os.path.join(base, p)) for p in src[key]]
            if "root" in src:
                src["root"] = os.path.normpath(os.path.join(base, src["root"]))
    for key in ("vgg_path", "init"):
        if cfg[key]:
            cfg[key] = os.path.normpath(os.path.join(base, cfg[key]))
    return cfg


def from_dict(user: Dict[str, Any]) -> Dict[str, Any]:
    """A validated config from a dict (paths used as given); for the Python API and tests."""
    return validate(_merge(DEFAULTS, user, "config"))


def model_options(cfg: Dict[str, Any]) -> Options:
    return Options.from_dict(dict(Options().to_dict(), **cfg["model"]))
