"""Training triplets: real footage, Vimeo-90K, triplet folders and synthetic motion.

Every source yields *triplets* ``(x0, y, x1)``: the two input frames and the
ground-truth middle frame at t = 0.5, each a float32 ``[3, H, W]`` tensor, RGB in
[0, 1]. :class:`TripletSampler` turns sources into fixed-size training batches.

Determinism (what makes ``film-fast train --resume`` exact): sample ``i`` of step
``s`` is a pure function of ``(seed, s, i)`` -- each draws its own NumPy
generator from ``SeedSequence([seed, s, i])``, picks a source, an item, a crop
and the augmentations from it. No state lives between steps, so a resumed run
sees the same batches an uninterrupted run would, without saving RNG state.

Sources:

* :class:`VideoTriplets` -- a folder of video files (decoded with PyAV) and/or
  folders of frames; triplets ``(f[i], f[i+s], f[i+2s])`` for each stride ``s``
  (stride 2 at 25 fps is roughly DAVIS-sized motion), never across a scene cut.
  Frames are decoded once and kept as uint8 (a 1280x720 clip of 132 frames is
  365 MB).
* :class:`VimeoTriplets` -- ``sequences/<a>/<b>/im1..3.png`` listed in
  ``tri_trainlist.txt`` / ``tri_testlist.txt``; images are read per sample.
* :class:`FolderTriplets` -- any folder of triplet folders, with the naming rules
  of :func:`film_fast.evaluation.discover_triplets`.
* :class:`SyntheticMotion` -- layered scenes cut from real images moving by up to
  ``max_motion`` pixels, see :mod:`film_fast.training.synthetic`.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..imageio import read_image

Triplet = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".y4m")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# A triplet whose outer frames score above this (film_fast.stream.scene_change_score) spans a
# cut: the middle frame is not an interpolation of its neighbours. 0.125 is the CLI's default.
CUT_THRESHOLD = 0.125


class DataError(ValueError):
    """A training or evaluation data source is missing, empty or malformed."""


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in training step ``step`` (see module docstring)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(index)]))


# ---- decoding ----------------------------------------------------------------------------------
def decode_video(path: str, max_frames: Optional[int] = None) -> List[torch.Tensor]:
    """All frames of ``path`` as ``[H, W, 3]`` uint8 tensors (RGB), in presentation order."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is in the test/video extras
        raise DataError(f"{path}: decoding video needs PyAV: pip install av") from e
    frames: List[torch.Tensor] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: cannot decode video ({e})") from None
    if not frames:
        raise DataError(f"{path}: contains no video frames")
    return frames


def read_frame_folder(folder: str) -> List[torch.Tensor]:
    """The images of ``folder`` in natural sort order, as ``[H, W, 3]`` uint8 tensors."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)),
                   key=_natural_key)
    frames = []
    for name in names:
        img = read_image(os.path.join(folder, name))  # [3, H, W] float in [0, 1]
        frames.append((img.permute(1, 2, 0) * 255.0).round_().to(torch.uint8))
    return frames


def to_float(frame: torch.Tensor) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float32 in [0, 1]."""
    return frame.permute(2, 0, 1).float().div_(255.0)


# ---- sources -----------------------------------------------------------------------------------
class TripletSource:
    """A list of triplets; ``get(index)`` returns full-size ``(x0, y, x1)``."""

    name = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int, rng: np.random.Generator) -> Triplet:
        raise NotImplementedError


class VideoTriplets(TripletSource):
    """Triplets cut from real footage: video files and folders of frames under ``paths``.

    Args:
        paths: video files, frame folders, or folders containing either (one level deep).
        strides: frame distances ``s``: triplets are ``(f[i], f[i+s], f[i+2s])``.
        frame_range: ``(start, stop)`` fractions of each clip to use, e.g. ``(0, 0.9)`` for
            training and ``(0.9, 1)`` for a held-out validation split of the same clips.
        cut_threshold: skip triplets whose outer frames score above it (a scene cut).
    """

    name = "video"

    def __init__(self, paths: Sequence[str], strides: Sequence[int] = (1, 2),
                 frame_range: Tuple[float, float] = (0.0, 1.0),
                 cut_threshold: float = CUT_THRESHOLD) -> None:
        from ..stream import scene_change_score
        if not strides or any(int(s) < 1 for s in strides):
            raise DataError(f"video strides must be positive integers, got {list(strides)}")
        lo, hi = frame_range
        if not 0.0 <= lo < hi <= 1.0:
            raise DataError(f"video frame_range must satisfy 0 <= start < stop <= 1, got {frame_range}")
        self.clips: List[Tuple[str, List[torch.Tensor]]] = []
        for clip_path in self._clip_paths(paths):
            frames = (read_frame_folder(clip_path) if os.path.isdir(clip_path)
                      else decode_video(clip_path))
            n = len(frames)
            frames = frames[int(math.floor(lo * n)):int(math.floor(hi * n))]
            if len(frames) >= 3:
                self.clips.append((clip_path, frames))
        if not self.clips:
            raise DataError(f"no clip with at least 3 frames under {list(paths)}")
        self.items: List[Tuple[int, int, int]] = []  # (clip, first frame, stride)
        self.skipped_cuts = 0
        for c, (_, frames) in enumerate(self.clips):
            for s in strides:
                s = int(s)
                for i in range(len(frames) - 2 * s):
                    # Scene cuts: a coarse luma/histogram score between the outer frames.
                    if scene_change_score(frames[i].numpy(), frames[i + 2 * s].numpy()) > cut_threshold:
                        self.skipped_cuts += 1
                        continue
                    self.items.append((c, i, s))
        if not self.items:
            raise DataError(f"no usable triplet under {list(paths)} (strides {list(strides)})")

    @staticmethod
    def _clip_paths(paths: Sequence[str]) -> List[str]:
        found: List[str] = []
        for path in paths:
            if not os.path.exists(path):
                raise DataError(f"{path}: no such file or folder")
            if os.path.isfile(path):
                found.append(path)
                continue
            entries = sorted(os.listdir(path), key=_natural_key)
            if any(e.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
                found.append(path)  # a folder of frames
                continue
            for e in entries:
                full = os.path.join(path, e)
                if os.path.isfile(full) and e.lower().endswith(VIDEO_EXTENSIONS):
                    found.append(full)
                elif os.path.isdir(full) and any(
                        n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(full)):
                    found.append(full)
        if not found:
            raise DataError(f"no videos or frame folders under {list(paths)}")
        return found

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: np.random.Generator) -> Triplet:
        c, i, s = self.items[index]
        frames = self.clips[c][1]
        return to_float(frames[i]), to_float(frames[i + s]), to_float(frames[i + 2 * s])

    def all_frames(self) -> List[torch.Tensor]:
        """Every decoded frame (uint8 ``[H, W, 3]``): texture material for synthetic scenes."""
        return [f for _, frames in self.clips for f in frames]


class VimeoTriplets(TripletSource):
    """Vimeo-90K triplets: ``<root>/sequences/<a>/<b>/im1.png, im2.png (ground truth), im3.png``."""

    name = "vimeo"

    def __init__(self, root: str, split: str = "train") -> None:
        lists = {"train": "tri_trainlist.txt", "test": "tri_testlist.txt"}
        if split not in lists:
            raise DataError(f"Vimeo-90K split must be 'train' or 'test', got {split!r}")
        listing = os.path.join(root, lists[split])
        if not os.path.isfile(listing):
            raise DataError(f"{listing}: missing (expected the Vimeo-90K triplet dataset layout)")
        with open(listing, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        self.folders = [os.path.join(root, "sequences", n) for n in names]
        if not self.folders:
            raise DataError(f"{listing}: lists no sequences")
        first = self.folders[0]
        for k in (1, 2, 3):
            if not os.path.isfile(os.path.join(first, f"im{k}.png")):
                raise DataError(f"{os.path.join(first, f'im{k}.png')}: missing")

    def __len__(self) -> int:
        return len(self.folders)

    def get(self, index: int, rng: np.random.Generator) -> Triplet:
        folder = self.folders[index]
        return tuple(read_image(os.path.join(folder, f"im{k}.png")) for k in (1, 2, 3))  # type: ignore


class FolderTriplets(TripletSource):
    """Any folder of triplet folders (DAVIS/Middlebury, UCF101, Vimeo or 3-image naming)."""

    name = "triplets"

    def __init__(self, root: str, layout: str = "auto") -> None:
        from ..evaluation import discover_triplets
        self.triplets = discover_triplets(root, layout=layout)

    def __len__(self) -> int:
        return len(self.triplets)

    def get(self, index: int, rng: np.random.Generator) -> Triplet:
        t = self.triplets[index]
        return read_image(t.frame0), read_image(t.frame1), read_image(t.frame2)


class SyntheticMotion(TripletSource):
    """Layered scenes with known linear motion, cut from ``textures`` (see synthetic.py).

    Its items are virtual (``size`` of them per epoch); every sample is rendered anew
    from the per-sample generator at the crop size, so the sampler does not crop it.
    """

    name = "synthetic"
    prerendered = True

    def __init__(self, textures: Sequence[torch.Tensor], size: int, max_motion: float = 64.0,
                 max_layers: int = 4, length: int = 100000) -> None:
        from .synthetic import SceneGenerator
        if not textures:
            raise DataError("synthetic motion needs texture images (give real frames)")
        self.generator = SceneGenerator(textures, max_motion=max_motion, max_layers=max_layers)
        self.size = int(size)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def get(self, index: int, rng: np.random.Generator) -> Triplet:
        return self.generator.render(rng, self.size)


# ---- cropping and augmentation -----------------------------------------------------------------
class Augment:
    """The official augmentations, each optional, applied identically to the three frames.

    * ``random_image_rot90``: rotate by k * 90 degrees, k uniform in 0..3;
    * ``random_flip``: left-right flip with probability 1/2;
    * ``random_rotate``: with probability 1/2 rotate by an angle uniform in
      ``[-max_degrees, max_degrees]`` (official: 45); unlike the official code, which
      fills the corners with zeros, the crop is taken from a region large enough to
      contain the rotated square, so no black corners reach the loss;
    * ``random_reverse``: swap x0 and x1 with probability 1/2 (the middle is unchanged);
    * ``random_scale`` (not official): downscale the source region by a factor uniform
      in ``[min_scale, 1]`` before cropping, which varies the motion size.
    """

    NAMES = ("random_image_rot90", "random_flip", "random_rotate", "random_reverse", "random_scale")

    def __init__(self, names: Sequence[str], max_degrees: float = 45.0, min_scale: float = 0.5) -> None:
        for n in names:
            if n not in self.NAMES:
                raise DataError(f"unknown augmentation {n!r}; choose from {list(self.NAMES)}")
        if not 0.0 < min_scale <= 1.0:
            raise DataError(f"min_scale must be in (0, 1], got {min_scale}")
        self.names = set(names)
        self.max_degrees = float(max_degrees)
        self.min_scale = float(min_scale)

    def crop(self, triplet: Triplet, size: int, rng: np.random.Generator) -> torch.Tensor:
        """A ``[3 frames, 3, size, size]`` crop with scale and rotation applied."""
        stack = torch.stack(triplet)  # [3, 3, H, W]
        h, w = stack.shape[-2:]
        scale = rng.uniform(self.min_scale, 1.0) if "random_scale" in self.names else 1.0
        angle = 0.0
        if "random_rotate" in self.names and rng.integers(0, 2):
            angle = math.radians(rng.uniform(-self.max_degrees, self.max_degrees))
        # Side of the axis-aligned source square that holds the rotated crop, at source scale.
        cover = abs(math.cos(angle)) + abs(math.sin(angle))
        side = size * cover / scale
        if side > min(h, w):  # small frame: shrink less (or enlarge) so the region fits
            scale = scale * side / min(h, w)
            side = min(h, w)
        region = max(1, int(math.ceil(side)))
        region = min(region, h, w)
        top = int(rng.integers(0, h - region + 1))
        left = int(rng.integers(0, w - region + 1))
        patch = stack[..., top:top + region, left:left + region]
        if angle == 0.0 and region == size:
            return patch.contiguous()
        target = max(size, int(math.ceil(region * scale)))
        if target != region:
            patch = F.interpolate(patch, size=(target, target), mode="bilinear",
                                  align_corners=False, antialias=target < region)
        if angle != 0.0:
            # Rotate about the centre and take the central size x size window in one resample.
            cos, sin = math.cos(angle), math.sin(angle)
            k = size / target
            theta = torch.tensor([[cos * k, -sin * k, 0.0], [sin * k, cos * k, 0.0]],
                                 dtype=patch.dtype).expand(patch.shape[0], 2, 3)
            grid = F.affine_grid(theta, [patch.shape[0], 3, size, size], align_corners=False)
            return F.grid_sample(patch, grid, mode="bilinear", padding_mode="border",
                                 align_corners=False)
        off = (target - size) // 2
        return patch[..., off:off + size, off:off + size].contiguous()

    def apply(self, stack: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Flips, rot90 and reversal of a ``[3 frames, 3, S, S]`` stack (exact, no resampling)."""
        if "random_image_rot90" in self.names:
            k = int(rng.integers(0, 4))
            if k:
                stack = torch.rot90(stack, k, dims=(-2, -1))
        if "random_flip" in self.names and rng.integers(0, 2):
            stack = torch.flip(stack, dims=(-1,))
        if "random_reverse" in self.names and rng.integers(0, 2):
            stack = stack[[2, 1, 0]]
        return stack.contiguous()


class TripletSampler:
    """Deterministic batches ``(x0, y, x1)`` of ``[B, 3, S, S]`` from weighted sources.

    ``batch(step)`` depends only on ``(seed, step)``: sample ``i`` draws a source with
    probability proportional to its weight, an item uniformly, then crop and augmentations.
    """

    def __init__(self, sources: Sequence[Tuple[TripletSource, float]], crop_size: int,
                 batch_size: int, augment: Augment, seed: int) -> None:
        if not sources:
            raise DataError("training needs at least one data source")
        weights = np.array([float(w) for _, w in sources])
        if (weights < 0).any() or weights.sum() <= 0:
            raise DataError(f"source weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.sources = [s for s, _ in sources]
        self.probs = weights / weights.sum()
        self.crop_size = int(crop_size)
        self.batch_size = int(batch_size)
        self.augment = augment
        self.seed = int(seed)

    def sample(self, step: int, index: int) -> torch.Tensor:
        rng = sample_rng(self.seed, step, index)
        source = self.sources[int(rng.choice(len(self.sources), p=self.probs))]
        triplet = source.get(int(rng.integers(0, len(source))), rng)
        if getattr(source, "prerendered", False):
            stack = torch.stack(triplet)
        else:
            stack = self.augment.crop(triplet, self.crop_size, rng)
        return self.augment.apply(stack, rng)

    def batch(self, step: int) -> Triplet:
        stacks = torch.stack([self.sample(step, i) for i in range(self.batch_size)])  # [B, 3, 3, S, S]
        return stacks[:, 0].contiguous(), stacks[:, 1].contiguous(), stacks[:, 2].contiguous()


def describe_sources(sources: Sequence[Tuple[TripletSource, float]]) -> Dict[str, int]:
    return {f"{s.name}[{k}]": len(s) for k, (s, _) in enumerate(sources)}
