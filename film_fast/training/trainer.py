"""The training loop behind ``film-fast train``: AdamW, the official learning-rate decay,
mixed precision, safetensors checkpoints with exact resume, CSV + TensorBoard logs.

Run folder layout (``--out DIR``)::

    DIR/config.json                    the resolved config (resume refuses a different one)
    DIR/checkpoints/step_00001000.safetensors   model + AdamW state, step and config in metadata
    DIR/metrics.csv                    one row per ``log_every`` steps (and per evaluation)
    DIR/events.out.tfevents.*          the same scalars for TensorBoard
    DIR/model.safetensors              the final weights, loadable by ``film_fast.load``

Exact resume: a batch depends only on ``(seed, step)`` (see :mod:`.data`), the
checkpoint holds the weights and every AdamW moment bit for bit, and checkpoints
fall on log boundaries; so ``--resume`` after an interruption ends with the same
weights and the same ``metrics.csv`` rows (timing columns aside) as a run that
was never stopped. ``tests/test_training.py`` checks this bitwise.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..cpu_features import native_bf16, warn_if_slow
from ..model import FILM
from . import config as config_lib
from .batches import batch_stream, resolve_workers
from .data import (Augment, FolderTriplets, SyntheticMotion, Triplet, TripletSampler,
                   TripletSource, VideoTriplets, VimeoTriplets, sample_rng)

CHECKPOINT_RE = re.compile(r"^step_(\d{8})\.safetensors$")
CSV_FIELDS = ["step", "lr", "loss", "l1", "l2", "l1_warped", "vgg", "style", "train_psnr", "val_psnr",
              "val_ema_psnr", "val_avg_psnr", "samples_per_s", "elapsed_s"]
META_KEY = "film_fast.training"
# The sample stream of validation crops: a "step" no training run reaches (2**32 - 1).
VALIDATION_STREAM = 2 ** 32 - 1


class TrainingError(RuntimeError):
    """Training cannot start or resume; the message says why."""


# ---- schedule ----------------------------------------------------------------------------------
def learning_rate(opt_cfg: Dict[str, Any], step: int) -> float:
    """The official ``ExponentialDecay``: ``lr * rate ** (step / decay_steps)``, floored when
    ``staircase``; optionally a linear warm-up over the first ``warmup_steps`` (not official)."""
    exponent = step / opt_cfg["decay_steps"]
    if opt_cfg["staircase"]:
        exponent = math.floor(exponent)
    lr = opt_cfg["learning_rate"] * opt_cfg["decay_rate"] ** exponent
    warm = opt_cfg.get("warmup_steps") or 0
    if warm and step < warm:
        lr *= (step + 1) / warm
    return lr


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that have it (else fp16), bf16 on CPUs with AVX-512/AMX bf16, else fp32."""
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise TrainingError("precision fp16 needs a CUDA device (CPU fp16 convs run at "
                                "~0.4 GFLOP/s); use bf16 or fp32 on CPU")
        if name == "bf16":
            warn_if_slow(device, torch.bfloat16, "training precision bf16")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16() else "fp32"


# ---- data --------------------------------------------------------------------------------------
def build_sources(specs: Sequence[Dict[str, Any]], crop_size: int,
                  cache: Optional[Dict[Tuple, VideoTriplets]] = None) -> List[Tuple[TripletSource, float]]:
    """Instantiates the ``data.train`` / ``data.val`` source list of a config."""
    cache = {} if cache is None else cache
    out: List[Tuple[TripletSource, float]] = []

    def video(paths, strides=(1, 2), frame_range=(0.0, 1.0), **kw):
        key = (tuple(paths), tuple(strides), tuple(frame_range), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = VideoTriplets(paths, strides=strides, frame_range=tuple(frame_range), **kw)
        return cache[key]

    for spec in specs:
        kind, weight = spec["kind"], float(spec.get("weight", 1.0))
        if kind == "video":
            kw = {k: v for k, v in spec.items() if k in ("strides", "frame_range", "cut_threshold")}
            src: TripletSource = video(spec["paths"], **kw)
        elif kind == "synthetic":
            textures = video(spec["textures"], strides=(1,),
                             frame_range=tuple(spec.get("frame_range", (0.0, 1.0)))).all_frames()
            src = SyntheticMotion(textures, crop_size, max_motion=float(spec.get("max_motion", 64.0)),
                                  max_layers=int(spec.get("max_layers", 4)))
        elif kind == "vimeo":
            src = VimeoTriplets(spec["root"], split=spec.get("split", "train"))
        else:
            src = FolderTriplets(spec["root"], layout=spec.get("layout", "auto"))
        out.append((src, weight))
    return out


# ---- checkpoints -------------------------------------------------------------------------------
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], str]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, json.dumps(sd["param_groups"])


def save_checkpoint(path: str, model: FILM, optimizer, step: int, cfg: Dict[str, Any],
                    extra: Dict[str, Any], ema: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Model + optimizer (+ EMA) tensors, ``step``/config/options in the metadata; atomic."""
    from ..checkpoints import write_safetensors_atomically
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, groups = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors.update({f"ema.{k}": v for k, v in (ema or {}).items()})
    meta = {META_KEY: json.dumps({"step": step, "config": cfg, "param_groups": json.loads(groups),
                                  **extra}),
            "film_fast.options": model.options.to_json()}
    write_safetensors_atomically(tensors, path, meta)


def load_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(model_state, optimizer_tensors, metadata)`` of a training checkpoint; ``metadata["ema"]``
    holds the EMA weights (``{}`` for runs without ``ema_decay``)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise TrainingError(f"{path}: unreadable training checkpoint ({e})") from None
    if not isinstance(meta, dict):
        raise TrainingError(f"{path}: not a film_fast training checkpoint (no {META_KEY} metadata)")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    meta["ema"] = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    return model_state, opt, meta


def _restore_optimizer(optimizer, tensors: Dict[str, torch.Tensor], groups) -> None:
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(folder: str) -> List[Tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


# ---- logging -----------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.csv`` plus TensorBoard events; on resume, rows after the resumed step are dropped."""

    def __init__(self, out_dir: str, resume_step: Optional[int], tensorboard: bool = True) -> None:
        self.path = os.path.join(out_dir, "metrics.csv")
        rows: List[Dict[str, str]] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.events = None
        if tensorboard:
            try:
                from .tensorboard import EventWriter
                self.events = EventWriter(out_dir)
            except ImportError:  # pragma: no cover - the writer ships with the package
                self.events = None

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(
                {k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                 for k in CSV_FIELDS})
        if self.events is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.events.add_scalar(k, float(v), int(row["step"]))
            self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


class StepProgress:
    """``train: step 1200/8000 (15%), 1.9 steps/s, loss 0.0241, ETA 59:40`` on stderr."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.start_step, self.total, self.enabled = start, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, loss: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        rate = (step - self.start_step) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        m, s = divmod(int(eta), 60)
        h, m = divmod(m, 60)
        eta_s = f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
        text = (f"film-fast train: step {step}/{self.total} ({100 * step / self.total:.0f}%), "
                f"{rate:.2f} steps/s, loss {loss:.4f}, ETA {eta_s}")
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


# ---- evaluation during training ---------------------------------------------------------------
def psnr_batch(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR (max 1) of the clipped prediction."""
    mse = (pred.float().clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1)
    return float((10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def validate(model: FILM, sources, crop_size: int, seed: int, samples: int, device, autocast) -> Tuple[float, float]:
    """PSNR of the model and of frame averaging on ``samples`` fixed centre crops of the
    validation sources (the same crops every time)."""
    model.eval()
    total, total_avg = 0.0, 0.0
    aug = Augment([])
    srcs = [s for s, _ in sources]
    with torch.no_grad():
        for i in range(samples):
            rng = sample_rng(seed, VALIDATION_STREAM, i)
            src = srcs[i % len(srcs)]
            trip = src.get(int(rng.integers(0, len(src))), rng)
            stack = torch.stack(trip) if getattr(src, "prerendered", False) else aug.crop(trip, crop_size, rng)
            x0, y, x1 = (t[None].to(device) for t in stack)
            with autocast():
                pred = model(x0, x1, torch.full((1, 1), 0.5, device=device))
            total += psnr_batch(pred, y)
            total_avg += psnr_batch((x0 + x1) / 2, y)
    model.train()
    return total / samples, total_avg / samples


# ---- the loop ----------------------------------------------------------------------------------
class Trainer:
    """Builds everything from a validated config and runs (or resumes) a run in ``out_dir``."""

    def __init__(self, cfg: Dict[str, Any], out_dir: str, *, device=None, resume: bool = False,
                 progress: bool = True, num_threads: Optional[int] = None) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.progress = progress
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.precision = resolve_precision(cfg["precision"], self.device)
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.resume = resume
        existing = list_checkpoints(self.ckpt_dir)
        cfg_path = os.path.join(out_dir, "config.json")
        if existing and not resume:
            raise TrainingError(f"{out_dir} already holds checkpoints (last: step {existing[-1][0]}); "
                                "pass --resume to continue it, or choose another --out")
        if resume and os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                saved = json.load(f)
            if _comparable(saved) != _comparable(cfg):
                diff = sorted(k for k in set(saved) | set(cfg) if saved.get(k) != cfg.get(k))
                raise TrainingError(f"--resume: the config differs from the one {out_dir} was "
                                    f"started with (keys {diff}); only num_steps, log/eval/"
                                    "checkpoint frequencies may change")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        tmp = cfg_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        os.replace(tmp, cfg_path)

        torch.manual_seed(cfg["seed"])  # the initial weights
        self.options = config_lib.model_options(cfg)
        self.model = FILM(self.options, backend=cfg["backend"]).to(self.device)
        from .init import TRANSFORMS, apply as apply_init
        model_init = cfg.get("model_init", "default")
        if model_init not in TRANSFORMS:
            apply_init(self.model, model_init)
        if cfg.get("init"):
            # Fine-tuning: start from existing weights (published, port, or our own); the
            # architecture must be the config's.
            from ..checkpoints import read_checkpoint
            if model_init == "widen":  # a narrower model of the same family (init.embed_narrower)
                from .init import embed_narrower
                ckpt = read_checkpoint(cfg["init"])
                # Only the decoder widths may differ: they are the one widened part that sits
                # last in its channel layout (wider `filters` would interleave old and new).
                # (padding is not architecture: the config's wins, like any init's.)
                mine = dict(self.options.to_dict(), fusion_widths=None, padding=None)
                theirs = dict(ckpt.options.to_dict(), fusion_widths=None, padding=None)
                if mine != theirs:
                    diff = sorted(k for k in mine if mine[k] != theirs.get(k))
                    raise TrainingError(f"model_init 'widen': {cfg['init']} differs from the "
                                        f"config's model in {diff}; only fusion_widths may differ")
                try:
                    embed_narrower(self.model, ckpt.state, source=cfg["init"])
                except ValueError as e:
                    raise TrainingError(f"model_init 'widen': {e}") from None
            else:
                ckpt = read_checkpoint(cfg["init"], options=self.options)
                self.model.load_state_dict({k: v.float() for k, v in ckpt.state.items()})
        if model_init in TRANSFORMS:  # edits of the loaded weights (checked: init is set)
            apply_init(self.model, model_init)
        self.model.train()
        opt = cfg["optimizer"]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt["learning_rate"],
                                           betas=tuple(opt["betas"]), eps=opt["eps"],
                                           weight_decay=opt["weight_decay"])
        from .losses import OFFICIAL_SCHEDULES, PiecewiseConstant, TrainingLoss
        schedules = dict(OFFICIAL_SCHEDULES[cfg["loss"]] if isinstance(cfg["loss"], str) else cfg["loss"])
        # The official l1_warped loss (losses.py, in no published gin config): L1 of each warped
        # input image against the target, which trains the flow estimator directly.
        warped = schedules.pop("l1_warped", None)
        self.warped_weight = (PiecewiseConstant(warped["boundaries"], warped["values"])
                              if warped else None)
        self.loss = TrainingLoss(schedules, vgg_path=cfg["vgg_path"]).to(self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = 0
        self.elapsed_before = 0.0
        self.stopped_early = False
        from .ema import WeightAverage
        self.ema = WeightAverage(self.model, cfg["ema_decay"]) if cfg["ema_decay"] else None
        if resume and existing:
            self._resume(existing[-1][1])
        data = cfg["data"]
        cache: Dict = {}
        self.sampler = TripletSampler(
            build_sources(data["train"], data["crop_size"], cache), data["crop_size"],
            data["batch_size"], Augment(data["augmentations"], data["rotate_max_degrees"],
                                        data["min_scale"]), cfg["seed"])
        self.val_sources = build_sources(data["val"], data["crop_size"], cache) if data["val"] else []

    def _resume(self, path: str) -> None:
        state, opt_tensors, meta = load_checkpoint(path)
        if _comparable(meta["config"]) != _comparable(self.cfg):
            raise TrainingError(f"--resume: {path} was written with a different config")
        self.model.load_state_dict(state)
        _restore_optimizer(self.optimizer, opt_tensors, meta["param_groups"])
        if self.ema is not None:
            if not meta["ema"]:
                raise TrainingError(f"--resume: {path} holds no EMA weights")
            self.ema.load_state_dict(meta["ema"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))

    def autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, step: int, batch: Optional[Triplet] = None) -> Dict[str, float]:
        """One optimizer step on the batch of ``step`` (``batch``, when it was made elsewhere:
        it must be ``self.sampler.batch(step)``); returns the logged scalars."""
        if batch is None:
            batch = self.sampler.batch(step)
        x0, y, x1 = (t.to(self.device, non_blocking=True) for t in batch)
        lr = learning_rate(self.cfg["optimizer"], step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dt = torch.full((x0.shape[0], 1), 0.5, device=self.device)
        w_warped = self.warped_weight(step) if self.warped_weight is not None else 0.0
        with self.autocast():
            if w_warped:
                out = self.model.debug_forward(x0, x1, dt)
                pred = out["image"][0]
            else:
                pred = self.model(x0, x1, dt)
        total, parts = self.loss(pred.float(), y, step)
        if w_warped:
            l1w = ((out["x0_warped"].float() - y).abs().mean()
                   + (out["x1_warped"].float() - y).abs().mean())
            total = total + w_warped * l1w
            parts = dict(parts, l1_warped=l1w.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        clip = self.cfg["optimizer"]["grad_clip"]
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        out = {"loss": float(total.detach()), "lr": lr, "train_psnr": psnr_batch(pred.detach(), y)}
        out.update({k: float(v) for k, v in parts.items()})
        if not math.isfinite(out["loss"]):
            raise TrainingError(f"step {step}: the loss is {out['loss']} (diverged); lower "
                                "optimizer.learning_rate or set optimizer.grad_clip")
        return out

    def checkpoint(self, elapsed: float) -> str:
        path = os.path.join(self.ckpt_dir, f"step_{self.step:08d}.safetensors")
        extra = {"elapsed_s": elapsed, "precision": self.precision}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        save_checkpoint(path, self.model, self.optimizer, self.step, self.cfg, extra,
                        ema=None if self.ema is None else self.ema.state_dict())
        for _, old in list_checkpoints(self.ckpt_dir)[:-self.cfg["keep_checkpoints"]]:
            os.remove(old)
        return path

    def export(self, path: Optional[str] = None) -> str:
        """Writes the weights (their EMA when ``ema_decay > 0``) as a film_fast ``.safetensors``
        (``export_dtype``), loadable by load()."""
        from ..checkpoints import save_safetensors
        from ..api import resolve_dtype
        path = path or os.path.join(self.out_dir, "model.safetensors")
        dtype = resolve_dtype(self.cfg["export_dtype"])
        clone = FILM(self.options)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            state.update(self.ema.state_dict())
        clone.load_state_dict(state)
        clone.to(dtype)
        clone.source = f"film-fast train, step {self.step}"
        save_safetensors(clone, path)
        return path

    def run(self, num_steps: Optional[int] = None,
            max_seconds: Optional[float] = None) -> Dict[str, Any]:
        """Trains up to ``num_steps`` (default: the config's); returns the last logged row.

        ``max_seconds``: stop at the first log boundary (``step % log_every == 0``) reached
        after that much wall time in this call, with a checkpoint there and the weights
        exported, so ``--resume`` continues the same run exactly (a time budget, e.g. a
        lent GPU's). ``self.stopped_early`` tells whether it stopped before ``num_steps``.
        """
        end = int(num_steps or self.cfg["num_steps"])
        log = MetricsLog(self.out_dir, self.step if self.resume else None)
        bar = StepProgress(self.step, end, self.progress)
        every, ckpt_every, eval_every = (self.cfg["log_every"], self.cfg["checkpoint_every"],
                                         self.cfg["eval_every"])
        acc: Dict[str, float] = {}
        count = 0
        t_start = time.perf_counter()
        deadline = None if max_seconds is None else t_start + float(max_seconds)
        t_interval = t_start
        row: Dict[str, Any] = {}
        self.stopped_early = False
        workers = resolve_workers(self.cfg["data_workers"], self.device)
        batches = batch_stream(self.sampler, self.step, end, workers,
                               pin_memory=self.device.type == "cuda")
        try:
            for step, batch in batches:
                assert step == self.step, (step, self.step)
                scalars = self.train_step(self.step, batch)
                self.step += 1
                for k, v in scalars.items():
                    acc[k] = acc.get(k, 0.0) + v
                count += 1
                bar.update(self.step, scalars["loss"])
                elapsed = self.elapsed_before + time.perf_counter() - t_start
                if self.step % every == 0 or self.step == end:
                    now = time.perf_counter()
                    row = {k: v / count for k, v in acc.items()}
                    row.update(step=self.step, lr=scalars["lr"], elapsed_s=elapsed,
                               samples_per_s=count * self.cfg["data"]["batch_size"] / max(now - t_interval, 1e-9))
                    if self.val_sources and ((eval_every and self.step % eval_every == 0) or self.step == end):
                        args = (self.val_sources, self.cfg["data"]["crop_size"],
                                self.cfg["seed"], 32, self.device, self.autocast)
                        row["val_psnr"], row["val_avg_psnr"] = validate(self.model, *args)
                        if self.ema is not None:
                            with self.ema.applied(self.model):
                                row["val_ema_psnr"], _ = validate(self.model, *args)
                    log.write(row)
                    acc, count, t_interval = {}, 0, time.perf_counter()
                out_of_time = (deadline is not None and self.step % every == 0
                               and time.perf_counter() >= deadline and self.step < end)
                if self.step % ckpt_every == 0 or self.step == end or out_of_time:
                    self.checkpoint(elapsed)
                if out_of_time:
                    self.stopped_early = True
                    break
        except KeyboardInterrupt:
            bar.finish()
            log.close()
            print(f"film-fast train: interrupted at step {self.step}; the last checkpoint is kept, "
                  "continue with --resume", file=sys.stderr)
            raise
        finally:
            batches.close()  # stops the workers
        bar.update(self.step, row.get("loss", float("nan")), force=True)
        bar.finish()
        log.close()
        self.export()
        return row


def _comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The config without the keys a resumed run may change; keys added to DEFAULTS after a run
    started count as their default (so older runs stay resumable)."""
    cfg = dict({k: v for k, v in config_lib.DEFAULTS.items() if k not in cfg}, **cfg)
    return {k: v for k, v in cfg.items()
            if k not in ("num_steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints",
                         "data_workers")}
