"""Interpolation quality on frame triplets, measured the way the official FILM eval does.

The official ``eval/eval_cli.py`` decodes each frame with
``tf.io.decode_image(..., dtype=tf.float32)`` (RGB in [0, 1]), calls the model
once per triplet with batch 1 and ``time = 0.5``, clips the prediction to
[0, 1] (``tf.clip_by_value``, evaluation only) and averages, over the data set,
the per-image ``tf.image.psnr(pred, gt, max_val=1.0)`` and
``tf.image.ssim(pred, gt, max_val=1.0)``. :func:`psnr` and :func:`ssim`
reproduce those two TF functions in torch. They compute in float64: TF's float32
``E[x^2] - E[x]^2`` loses up to ~1e-4 of SSIM in flat regions to cancellation,
a rounding error rather than part of the definition, and float64 gives the same
formula's exact value on every device.

Next to every model score we compute the frame-averaging baseline,
``(frame0 + frame2) / 2`` against the ground truth, with the same code: a model
that does not beat it clearly is not interpolating motion.

Data sets (:func:`discover_triplets`), in the layouts of the official
``datasets/create_*_tfrecord.py`` scripts:

* ``vimeo``: Vimeo-90K triplets, ``sequences/<id>/im1.png, im2.png, im3.png``
  listed by ``tri_testlist.txt`` (``vimeo_triplet.zip``), or the test zip's
  ``input/<id>/im1|im3.png`` + ``target/<id>/im2.png``, or any tree of
  ``im1/im2/im3`` folders.
* ``middlebury``: Middlebury "Other" with ground truth,
  ``other-data/<name>/frame10.png, frame11.png`` and
  ``other-gt-interp/<name>/frame10i11.png``.
* ``ucf101``: the DVF / Super SloMo ``ucf101_interp_ours/<n>/frame_00.png,
  frame_01_gt.png, frame_02.png``.
* ``xiph``: frames of the Xiph clips (SoftSplat's selection), one folder of
  ``<clip>-NNN.png`` files or one folder per clip; the first 100 frames of each
  clip, ground truth at 0-based odd indices 1, 3, ..., 97 (``range(1, 99, 2)``).
  ``xiph-2k`` downsizes every frame by 2 (gamma-2.2 linear light, area average,
  back to 8 bits), ``xiph-4k`` keeps the centre half (crop ``H//4`` and ``W//4``
  from each side), exactly like ``create_xiph_tfrecord.py`` with
  ``scale_factor=2`` / ``center_crop_factor=2``; ``xiph`` means ``xiph-2k`` (the
  script's default).
* ``folder``: any tree whose leaf folders hold one triplet each (see
  :data:`TRIPLET_NAMINGS`, else exactly three images in natural order).

One difference to the official run: the official SavedModel is called on the
frames as they are, while :class:`~film_fast.model.FILM` pads sizes that are
not multiples of its pyramid (Middlebury, Xiph) and crops the result back.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .imageio import read_image

LAYOUTS = ("auto", "vimeo", "middlebury", "ucf101", "xiph", "xiph-2k", "xiph-4k", "folder")
LAYOUT_LABELS = {"vimeo": "Vimeo-90K", "middlebury": "Middlebury-Other", "ucf101": "UCF101",
                 "xiph-2k": "Xiph-2K", "xiph-4k": "Xiph-4K", "folder": "folder"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Ground-truth namings recognised in a triplet folder, as (first, ground truth, last) stems:
# Middlebury / DAVIS-style, DVF's UCF101, Vimeo-90K, and plain frame0..2.
TRIPLET_NAMINGS = (("frame10", "frame10i11", "frame11"),
                   ("frame_00", "frame_01_gt", "frame_02"),
                   ("im1", "im2", "im3"),
                   ("frame0", "frame1", "frame2"))

# tf.image.ssim's defaults, which the official losses.ssim_loss uses.
SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# create_xiph_tfrecord.py: 100 frames per clip, ground truth at range(1, 100 - 1, 2).
XIPH_FRAMES_PER_CLIP = 100
_XIPH_GAMMA = 2.2

Progress = Optional[Callable[[int, int, "EvalRow"], None]]


# ---- metrics ----------------------------------------------------------------------------------
def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    for name, x in (("pred", pred), ("gt", gt)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in shape: {list(pred.shape)} vs {list(gt.shape)}")


def psnr(pred: torch.Tensor, gt: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """``tf.image.psnr``: per image ``20 log10(max_val) - 10 log10(mean((pred - gt)^2))``.

    Args:
        pred, gt: ``[B, C, H, W]`` float, values in [0, max_val].
    Returns:
        ``[B]`` float64; ``inf`` where the images are identical (TF's ``log(0)``).
    """
    _check_pair(pred, gt)
    # Like TF, one mean over H, W and C together (in float64, see the module docstring).
    diff = pred.to(torch.float64) - gt.to(torch.float64)
    mse = diff.square().mean(dim=(1, 2, 3))
    return 20.0 * math.log10(max_val) - 10.0 * torch.log10(mse)


def _gaussian_1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``[size]`` float64 normalised Gaussian; its outer product is TF's ``_fspecial_gauss``."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-0.5 * coords.square() / (sigma * sigma))
    return g / g.sum()


def ssim(pred: torch.Tensor, gt: torch.Tensor, max_val: float = 1.0, *,
         filter_size: int = SSIM_FILTER_SIZE, filter_sigma: float = SSIM_FILTER_SIGMA,
         k1: float = SSIM_K1, k2: float = SSIM_K2) -> torch.Tensor:
    """``tf.image.ssim``: Gaussian-window SSIM, mean over pixels and then channels.

    A ``filter_size`` x ``filter_size`` Gaussian (sigma ``filter_sigma``) with
    ``'VALID'`` borders, the biased covariance estimate (TF's compensation 1.0)
    and ``c1 = (k1 max_val)^2``, ``c2 = (k2 max_val)^2``; float64 statistics.

    Args:
        pred, gt: ``[B, C, H, W]`` float, H and W at least ``filter_size``.
    Returns:
        ``[B]`` float64.
    Raises:
        ValueError: images smaller than the filter (TF fails an assertion there).
    """
    _check_pair(pred, gt)
    height, width = pred.shape[-2:]
    if height < filter_size or width < filter_size:
        raise ValueError(f"SSIM needs images of at least {filter_size}x{filter_size} pixels, "
                         f"got {width}x{height}")
    x = pred.to(torch.float64)
    y = gt.to(torch.float64)
    channels = x.shape[1]
    # TF convolves with the 2-D kernel g g^T; two 1-D passes give the same sums with 2/11 of
    # the work. All four local means go through one grouped convolution.
    stack = torch.cat([x, y, x * y, x.square() + y.square()], dim=1)
    g = _gaussian_1d(filter_size, filter_sigma, x.device)
    groups = stack.shape[1]
    rows = g.view(1, 1, -1, 1).expand(groups, 1, -1, 1).contiguous()
    cols = g.view(1, 1, 1, -1).expand(groups, 1, 1, -1).contiguous()
    stack = F.conv2d(F.conv2d(stack, rows, groups=groups), cols, groups=groups)
    mean0, mean1, mean01, mean_sq = torch.split(stack, channels, dim=1)
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    # The same expressions, in the same order, as TF's _ssim_helper.
    num0 = mean0 * mean1 * 2.0
    den0 = mean0.square() + mean1.square()
    luminance = (num0 + c1) / (den0 + c1)
    num1 = mean01 * 2.0
    cs = (num1 - num0 + c2) / (mean_sq - den0 + c2)
    per_channel = (luminance * cs).mean(dim=(2, 3))
    return per_channel.mean(dim=1)


# ---- Xiph preprocessing (datasets/util.py of the official code) -----------------------------
def _local_mean_weights(old: int, new: int) -> np.ndarray:
    """``[new, old]`` float32 area weights of skimage's ``resize_local_mean`` (grid mode)."""
    old_breaks = np.linspace(0, old, num=old + 1, dtype=np.float32)
    new_breaks = np.linspace(0, old, num=new + 1, dtype=np.float32)
    upper = np.minimum(new_breaks[1:, None], old_breaks[None, 1:])
    lower = np.maximum(new_breaks[:-1, None], old_breaks[None, :-1])
    weights = np.maximum(upper - lower, 0)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


def xiph_preprocess(image: torch.Tensor, variant: str) -> torch.Tensor:
    """The official Xiph-2K / Xiph-4K frame from a decoded 4K Xiph frame.

    ``xiph-4k``: centre crop, ``H//4`` rows and ``W//4`` columns off each side.
    ``xiph-2k``: ``[0, 1]`` -> ``x^2.2`` -> area resize to ``(H//2, W//2)`` ->
    ``x^(1/2.2)`` -> ``uint8(clip(x * 255 + 0.5))`` -> ``/ 255``, in float32 NumPy
    like the official ``_resample_image`` (so the 8-bit values match).

    Args:
        image: ``[3, H, W]`` float32 in [0, 1] (as :func:`read_image` returns it).
        variant: ``"xiph-2k"`` or ``"xiph-4k"``.
    Returns:
        ``[3, H', W']`` float32 in [0, 1].
    """
    height, width = image.shape[-2:]
    if variant == "xiph-4k":
        top, left = height // 4, width // 4
        # Slicing to H - top rather than -top: right for top == 0 too (tiny test frames).
        return image[:, top:height - top, left:width - left].contiguous()
    if variant != "xiph-2k":
        raise ValueError(f"unknown Xiph variant {variant!r}; use xiph-2k or xiph-4k")
    array = image.permute(1, 2, 0).numpy().astype(np.float32)
    array = np.power(np.clip(array, 0, 1), _XIPH_GAMMA)
    # resize_local_mean contracts axis 0 (rows) first, then axis 1, each with float32 weights.
    for axis, (old, new) in enumerate(((height, height // 2), (width, width // 2))):
        product = np.tensordot(array, _local_mean_weights(old, new), [[axis], [-1]])
        array = np.moveaxis(product, -1, axis)
    array = np.power(np.clip(array, 0, 1), 1.0 / _XIPH_GAMMA)
    pixels = np.clip(array * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    out = pixels.astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()


def _preprocessed_size(width: int, height: int, variant: Optional[str]) -> Tuple[int, int]:
    if variant == "xiph-4k":
        return width - 2 * (width // 4), height - 2 * (height // 4)
    if variant == "xiph-2k":
        return width // 2, height // 2
    return width, height


# ---- triplets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Triplet:
    """One evaluation example: two input frames and the ground-truth frame between them.

    Attributes:
        name: identifies the example within its data set (``"00001/0389"``,
            ``"Beanbags"``, ...).
        frame0, frame1_gt, frame2: image paths; the model sees frame0 and frame2
            at t = 0.5 and is scored against frame1_gt.
        preprocess: ``None``, or ``"xiph-2k"`` / ``"xiph-4k"`` (see :func:`xiph_preprocess`),
            applied to all three frames after decoding.
    """

    name: str
    frame0: str
    frame1_gt: str
    frame2: str
    preprocess: Optional[str] = None

    @property
    def paths(self) -> Tuple[str, str, str]:
        return self.frame0, self.frame1_gt, self.frame2


def _natural_key(name: str):
    """``frame2`` before ``frame10``: digit runs compare as numbers, the rest case-folded."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.casefold())
            for part in re.split(r"(\d+)", name) if part]


def _listdir(folder: str) -> List[str]:
    try:
        names = os.listdir(folder)
    except PermissionError:
        raise InputError(f"{folder}: permission denied") from None
    except NotADirectoryError:
        raise InputError(f"{folder}: is not a folder") from None
    except FileNotFoundError:
        raise InputError(f"{folder}: no such folder") from None
    return sorted((n for n in names if not n.startswith(".")), key=_natural_key)


def _images_in(folder: str) -> List[str]:
    """Image file names (not paths) directly in ``folder``, in natural order."""
    return [n for n in _listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(os.path.join(folder, n))]


def _subfolders(folder: str) -> List[str]:
    return [n for n in _listdir(folder) if os.path.isdir(os.path.join(folder, n))]


def _require_file(path: str) -> str:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file" if not os.path.exists(path)
                         else f"{path}: is not a file")
    return path


def _triplet_in_folder(folder: str, name: str) -> Triplet:
    """The triplet of one folder: a known naming, else exactly three images in natural order."""
    images = _images_in(folder)
    by_stem: Dict[str, str] = {}
    for image in images:
        by_stem.setdefault(os.path.splitext(image)[0].casefold(), image)
    for naming in TRIPLET_NAMINGS:
        if all(stem in by_stem for stem in naming):
            first, gt, last = (os.path.join(folder, by_stem[stem]) for stem in naming)
            return Triplet(name, first, gt, last)
    if len(images) == 3:
        first, gt, last = (os.path.join(folder, n) for n in images)
        return Triplet(name, first, gt, last)
    known = ", ".join("/".join(n) for n in TRIPLET_NAMINGS)
    listed = ", ".join(images[:6]) + (", ..." if len(images) > 6 else "")
    raise InputError(f"{folder}: holds {len(images)} image(s) ({listed}), not a triplet: expected "
                     f"exactly 3 images (first, ground truth, last in natural order) or one of "
                     f"the namings {known}")


def _folder_triplets(root: str) -> List[Triplet]:
    """Every folder under ``root`` that holds images is one triplet; others are descended."""
    triplets: List[Triplet] = []

    def visit(folder: str, rel: str) -> None:
        if _images_in(folder):
            name = rel or os.path.basename(os.path.normpath(os.path.abspath(folder)))
            triplets.append(_triplet_in_folder(folder, name))
            return
        for sub in _subfolders(folder):
            visit(os.path.join(folder, sub), f"{rel}/{sub}" if rel else sub)

    visit(root, "")
    return triplets


def _read_list(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip().strip("/") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the triplet list ({' '.join(str(e).split())})") \
            from None


def _vimeo_triplets(root: str) -> List[Triplet]:
    listing = os.path.join(root, "tri_testlist.txt")
    ids = _read_list(listing) if os.path.isfile(listing) else None
    sequences = os.path.join(root, "sequences")
    target = os.path.join(root, "target")
    if os.path.isdir(sequences):  # vimeo_triplet.zip
        if ids is None:
            return _im123_tree(sequences)
        return [Triplet(i, *(_require_file(os.path.join(sequences, i, f"im{k}.png"))
                             for k in (1, 2, 3))) for i in ids]
    if os.path.isdir(target):  # vimeo_interp_test.zip: inputs in input/, ground truth in target/
        if ids is None:
            ids = [t.name for t in _im123_tree(target, need=("im2",))]
        out = []
        for i in ids:
            gt = _require_file(os.path.join(target, i, "im2.png"))
            ends = []
            for k in (1, 3):
                candidate = os.path.join(root, "input", i, f"im{k}.png")
                ends.append(candidate if os.path.isfile(candidate)
                            else _require_file(os.path.join(target, i, f"im{k}.png")))
            out.append(Triplet(i, ends[0], gt, ends[1]))
        return out
    if ids is not None:
        raise InputError(f"{root}: has tri_testlist.txt but neither a sequences/ nor a target/ "
                         "folder")
    return _im123_tree(root)


def _im123_tree(root: str, need: Sequence[str] = ("im1", "im2", "im3")) -> List[Triplet]:
    """Folders under ``root`` holding ``im1/im2/im3.png`` (or just ``need``), named by rel path."""
    out: List[Triplet] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=_natural_key)
        if all(f"{n}.png" in filenames for n in need):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            name = rel if rel != "." else os.path.basename(os.path.abspath(root))
            out.append(Triplet(name, *(os.path.join(dirpath, f"im{k}.png") for k in (1, 2, 3))))
    out.sort(key=lambda t: _natural_key(t.name))
    return out


def _middlebury_triplets(root: str) -> List[Triplet]:
    data = os.path.join(root, "other-data")
    gt = os.path.join(root, "other-gt-interp")
    for folder in (data, gt):
        if not os.path.isdir(folder):
            raise InputError(f"{root}: not Middlebury-Other: {folder} is missing (expected "
                             "other-data/<name>/frame10.png, frame11.png and "
                             "other-gt-interp/<name>/frame10i11.png)")
    return [Triplet(name, _require_file(os.path.join(data, name, "frame10.png")),
                    _require_file(os.path.join(gt, name, "frame10i11.png")),
                    _require_file(os.path.join(data, name, "frame11.png")))
            for name in _subfolders(data)]


def _ucf101_triplets(root: str) -> List[Triplet]:
    inner = os.path.join(root, "ucf101_interp_ours")
    base = inner if os.path.isdir(inner) else root
    return [Triplet(name, *(_require_file(os.path.join(base, name, f)) for f in
                            ("frame_00.png", "frame_01_gt.png", "frame_02.png")))
            for name in _subfolders(base)]


def _clip_of(filename: str) -> str:
    """``BoxingPractice-042.png`` -> ``BoxingPractice``: the stem less its trailing number."""
    stem = os.path.splitext(filename)[0]
    return re.sub(r"[-_. ]*\d+$", "", stem) or stem


def _xiph_triplets(root: str, variant: str) -> List[Triplet]:
    clips: List[Tuple[str, str, List[str]]] = []  # (clip name, folder, frame file names)
    loose = _images_in(root)
    if loose:  # one folder of <clip>-NNN frames, grouped by clip
        groups: Dict[str, List[str]] = {}
        for image in loose:
            groups.setdefault(_clip_of(image), []).append(image)
        clips += [(clip, root, frames) for clip, frames in groups.items()]
    else:  # one folder per clip
        clips += [(sub, os.path.join(root, sub), _images_in(os.path.join(root, sub)))
                  for sub in _subfolders(root)]
    out: List[Triplet] = []
    for clip, folder, frames in clips:
        frames = frames[:XIPH_FRAMES_PER_CLIP]
        for index in range(1, len(frames) - 1, 2):
            stem = os.path.splitext(frames[index])[0]
            name = stem if folder == root else f"{clip}/{stem}"
            out.append(Triplet(name, *(os.path.join(folder, frames[index + k]) for k in (-1, 0, 1)),
                               preprocess=variant))
    return out


def detect_layout(root: str) -> str:
    """The layout of a data set folder (one of :data:`LAYOUTS` except ``auto``/``xiph-*``).

    Middlebury if ``other-data/`` and ``other-gt-interp/`` exist; Vimeo-90K if
    ``tri_testlist.txt``, ``sequences/`` or ``input/`` + ``target/`` exist;
    UCF101 if ``ucf101_interp_ours/`` exists or every subfolder holds
    ``frame_00.png, frame_01_gt.png, frame_02.png``; Xiph if the folder itself
    holds more than three images, none of them a known triplet naming (a folder of
    clip frames); else ``folder``.
    """
    _check_root(root)
    has = lambda name: os.path.isdir(os.path.join(root, name))  # noqa: E731
    if has("other-data") and has("other-gt-interp"):
        return "middlebury"
    if (os.path.isfile(os.path.join(root, "tri_testlist.txt")) or has("sequences")
            or (has("input") and has("target"))):
        return "vimeo"
    if has("ucf101_interp_ours"):
        return "ucf101"
    subs = _subfolders(root)
    if subs and all(all(os.path.isfile(os.path.join(root, s, f)) for f in
                        ("frame_00.png", "frame_01_gt.png", "frame_02.png")) for s in subs):
        return "ucf101"
    images = _images_in(root)
    stems = {os.path.splitext(n)[0].casefold() for n in images}
    if len(images) > 3 and not any(all(s in stems for s in naming) for naming in TRIPLET_NAMINGS):
        return "xiph"
    return "folder"


def _check_root(root: str) -> None:
    if not os.path.exists(root):
        raise InputError(f"{root}: no such folder")
    if not os.path.isdir(root):
        raise InputError(f"{root}: is not a folder (give a data set folder)")


def discover_triplets(root: str, layout: str = "auto") -> List[Triplet]:
    """The evaluation triplets of a data set folder.

    Args:
        root: the data set folder (see the module docstring for each layout).
        layout: one of :data:`LAYOUTS`; ``"auto"`` uses :func:`detect_layout`.
            ``"xiph"`` is ``"xiph-2k"``.
    Returns:
        Triplets in a deterministic order (list file order, else natural order).
    Raises:
        InputError: the folder is missing, a listed or expected file is missing
            (named), a folder is not a triplet (named), or nothing was found.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    _check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "xiph":
        layout = "xiph-2k"
    if layout == "vimeo":
        triplets = _vimeo_triplets(root)
    elif layout == "middlebury":
        triplets = _middlebury_triplets(root)
    elif layout == "ucf101":
        triplets = _ucf101_triplets(root)
    elif layout in ("xiph-2k", "xiph-4k"):
        triplets = _xiph_triplets(root, layout)
    else:
        triplets = _folder_triplets(root)
    if not triplets:
        raise InputError(f"{root}: no {LAYOUT_LABELS[layout]} triplets found (layout {layout}); "
                         f"expected {_LAYOUT_HINTS[layout]}")
    return triplets


_LAYOUT_HINTS = {
    "vimeo": "tri_testlist.txt with sequences/<id>/im1.png, im2.png, im3.png, or "
             "input/<id>/ + target/<id>/, or folders holding im1.png, im2.png, im3.png",
    "middlebury": "other-data/<name>/frame10.png, frame11.png and "
                  "other-gt-interp/<name>/frame10i11.png",
    "ucf101": "<n>/frame_00.png, frame_01_gt.png, frame_02.png (or ucf101_interp_ours/<n>/...)",
    "xiph-2k": "at least 3 frames per clip (<clip>-NNN.png files, or one folder per clip)",
    "xiph-4k": "at least 3 frames per clip (<clip>-NNN.png files, or one folder per clip)",
    "folder": "subfolders holding 3 images each (first, ground truth, last)",
}


def check_triplet(triplet: Triplet, min_size: int = SSIM_FILTER_SIZE) -> Tuple[int, int]:
    """Cheap header check: all three files are images of one size, large enough for SSIM.

    Returns:
        ``(width, height)`` as evaluated (after any Xiph preprocessing).
    Raises:
        InputError: naming the file that is missing, unreadable or of another size.
    """
    from PIL import Image
    sizes = []
    for path in triplet.paths:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except Exception:
            read_image(path)  # raises the InputError that names the file and the problem
            raise
    _check_sizes(triplet, sizes, min_size)
    return _preprocessed_size(*sizes[0], triplet.preprocess)


def _check_sizes(triplet: Triplet, sizes: Sequence[Tuple[int, int]], min_size: int) -> None:
    (w0, h0) = sizes[0]
    for path, (w, h) in zip(triplet.paths[1:], sizes[1:]):
        if (w, h) != (w0, h0):
            raise InputError(f"{path}: is {w}x{h}, but {triplet.frame0} is {w0}x{h0} (the three "
                             f"frames of triplet {triplet.name} must have one size)")
    w, h = _preprocessed_size(w0, h0, triplet.preprocess)
    if w < min_size or h < min_size:
        raise InputError(f"{triplet.frame1_gt}: is {w}x{h}; SSIM needs at least "
                         f"{min_size}x{min_size} pixels")


def load_triplet(triplet: Triplet) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decodes a triplet: ``(frame0, frame1_gt, frame2)``, each ``[1, 3, H, W]`` float32 in [0, 1].

    Raises:
        InputError: a file is unreadable, or the sizes differ (the message names the file).
    """
    frames = [read_image(p) for p in triplet.paths]
    _check_sizes(triplet, [(f.shape[2], f.shape[1]) for f in frames], SSIM_FILTER_SIZE)
    if triplet.preprocess:
        frames = [xiph_preprocess(f, triplet.preprocess) for f in frames]
    return tuple(f[None] for f in frames)  # type: ignore[return-value]


# ---- evaluation -------------------------------------------------------------------------------
@dataclass
class EvalRow:
    """Scores of one triplet: the model's and the frame-averaging baseline's; model seconds."""

    name: str
    psnr: float
    ssim: float
    avg_psnr: float
    avg_ssim: float
    seconds: float


def _mean(values: Sequence[float]) -> float:
    # Like the official np.mean: one identical pair (PSNR inf) makes the mean inf.
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


@dataclass
class EvalResult:
    """Per-triplet rows and their means (``psnr``, ``ssim``, ``avg_psnr``, ``avg_ssim``)."""

    rows: List[EvalRow] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def psnr(self) -> float:
        return _mean([r.psnr for r in self.rows])

    @property
    def ssim(self) -> float:
        return _mean([r.ssim for r in self.rows])

    @property
    def avg_psnr(self) -> float:
        return _mean([r.avg_psnr for r in self.rows])

    @property
    def avg_ssim(self) -> float:
        return _mean([r.avg_ssim for r in self.rows])

    @property
    def gain_db(self) -> float:
        """Model PSNR minus frame-averaging PSNR (nan when both are inf)."""
        return self.psnr - self.avg_psnr

    @property
    def seconds(self) -> float:
        return float(sum(r.seconds for r in self.rows))

    def to_dict(self, items: bool = True) -> dict:
        out = dict(n=self.n, psnr=self.psnr, ssim=self.ssim, avg_psnr=self.avg_psnr,
                   avg_ssim=self.avg_ssim, gain_db=self.gain_db, seconds=self.seconds)
        if items:
            out["items"] = [asdict(r) for r in self.rows]
        return out


def _model_device_dtype(model: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(iter(model.parameters()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def evaluate(model: torch.nn.Module, triplets: Sequence[Triplet], *,
             device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
             progress: Progress = None) -> EvalResult:
    """Scores ``model`` on ``triplets`` the official way, next to the frame-averaging baseline.

    Per triplet: ``pred = clip(model(frame0, frame2, t=0.5), 0, 1)`` with batch 1;
    PSNR and SSIM of ``pred`` and of ``(frame0 + frame2) / 2`` against the
    ground truth (float64 statistics). Any frame size works (the model pads itself).

    Args:
        model: called as ``model(x0, x1, dt)`` with ``x: [1, 3, H, W]`` and
            ``dt: [1, 1]``; it is not moved or switched to eval mode.
        triplets: from :func:`discover_triplets`.
        device, dtype: where and in what dtype the frames are fed to the model
            (default: those of the model's parameters).
        progress: ``progress(done, total, row)`` after each triplet.
    Returns:
        :class:`EvalResult`.
    Raises:
        InputError: an unreadable frame or mismatched sizes (naming the file).
    """
    param_device, param_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else param_device
    dtype = dtype if dtype is not None else param_dtype
    result = EvalResult()
    total = len(triplets)
    dt = torch.full((1, 1), 0.5, dtype=torch.float32, device=device)
    for index, triplet in enumerate(triplets):
        x0, gt, x2 = (f.to(device) for f in load_triplet(triplet))
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            raw = model(x0.to(dtype), x2.to(dtype), dt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            # Clipping only at evaluation, like eval_cli.py (tf.clip_by_value keeps NaNs, so
            # does clamp).
            pred = raw.to(torch.float32).clamp(0.0, 1.0)
            del raw
            # The baseline in float32 like the frames; scored one at a time to halve the peak
            # memory of the float64 SSIM statistics on 2K frames.
            average = (x0 + x2) * 0.5
            scores = [(psnr(x, gt).item(), ssim(x, gt).item()) for x in (pred, average)]
        (p_model, s_model), (p_avg, s_avg) = scores
        row = EvalRow(triplet.name, p_model, s_model, p_avg, s_avg, seconds)
        result.rows.append(row)
        if progress is not None:
            progress(index + 1, total, row)
    return result
