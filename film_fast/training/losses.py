"""FILM training losses: L1, VGG-19 perceptual, Gram-matrix style, scheduled weights.

The maths follows the official implementation (google-research/frame-interpolation,
``losses/losses.py`` and ``losses/vgg19_loss.py``); every image is ``[B, 3, H, W]``
RGB in [0, 1] here (the official code is NHWC, which changes nothing below).

What the official code does
===========================

* **L1** -- ``mean(|pred - y|)`` over every element (batch, pixels, channels).
* **VGG-19 trunk** -- the MatConvNet ``imagenet-vgg-verydeep-19.mat`` weights, run
  on ``image * 255 - [123.68, 116.779, 103.939]`` (RGB order; the mean is a constant
  in the code, it is *not* read from the file). Every conv is 3x3, stride 1, SAME
  padding, bias, then ReLU. Pooling is **average** pooling 2x2 / stride 2 / SAME
  (VGG itself was trained with max-pooling; the official loss swaps it, as Gatys
  et al. do for style). The net is built up to ``conv5_2``; the loss reads the
  post-ReLU outputs of ``conv1_2, conv2_2, conv3_2, conv4_2, conv5_2``
  (MatConvNet layer indices 2, 7, 12, 21, 30 -- the same indices as torchvision's
  ``vgg19().features``).
* **Perceptual ("vgg") loss** -- ``sum_l w_l * mean(|phi_l(y) - phi_l(pred)|) / 255``,
  the mean over all elements of the layer's ``[B, H_l, W_l, C_l]`` map, with
  ``w = [1/2.6, 1/4.8, 1/3.7, 1/5.6, 10/1.5]`` (Chen & Koltun, CRN).
* **Style loss** -- per layer ``F = phi_l / 255`` reshaped to ``[B, H_l*W_l, C_l]``,
  Gram ``G = F^T F / (H_l*W_l)`` (``[B, C_l, C_l]``), then
  ``sum_l w_l * mean((G_l(y) - G_l(pred))^2)`` (mean over ``B*C_l*C_l``), same
  five layers and the same default weights ``w``. No final ``/255``.
* **Weights** -- each term's weight is a ``PiecewiseConstantDecay`` of the step
  and the total is ``sum_k loss_k * weight_k(step)``. ``step`` is
  ``optimizer.iterations`` *before* the update (0 at the first step).
  The three published configs are :data:`OFFICIAL_SCHEDULES`.

Deliberate differences
======================

* Weight sources: besides the ``.mat`` file, a torchvision ``vgg19`` state dict
  (``.pth``/``.pt``) or a ``.safetensors`` with torchvision key names is accepted
  (see :func:`load_vgg19`). torchvision's weights are a different network trained
  on ``(x - mean) / std`` input, so by default they get that normalization, and the
  losses divide the features by that input scale (``1 / mean(std)`` ~= 4.42) where
  the official divides by 255 -- the same "back to intensity units" the ``/255``
  performs. Losses with torchvision weights are therefore close to, not equal to,
  the official values; for parity use the ``.mat`` weights (or a file converted
  from it with :func:`save_vgg19`), whose normalization is exactly the official.
* When both perceptual and style terms are active the VGG features are computed
  once and shared; the target's features are computed without autograd unless the
  target itself requires a gradient. A term whose weight is 0 at ``step`` is not
  computed at all.
* The optional per-pixel ``mask`` argument of the official losses is not ported
  (the official training never passes one).
"""
from __future__ import annotations

import bisect
import copy
import math
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import FilmFastError


class VGGWeightsError(FilmFastError, ValueError):
    """A VGG-19 weight file cannot be read or does not hold VGG-19 conv weights."""


# ---------------------------------------------------------------------------------------------
# Loss-weight schedules
# ---------------------------------------------------------------------------------------------
class PiecewiseConstant:
    """``tf.keras.optimizers.schedules.PiecewiseConstantDecay`` as a plain callable.

    ``values[0]`` for ``step <= boundaries[0]``, ``values[i]`` for
    ``boundaries[i-1] < step <= boundaries[i]``, ``values[-1]`` for
    ``step > boundaries[-1]`` -- a boundary step still gets the *earlier* value
    (TF's example: boundaries [100000, 110000] give 1.0 "for the first 100001 steps").

    Args:
        boundaries: strictly increasing step numbers, ``n`` of them.
        values: ``n + 1`` floats.
    """

    def __init__(self, boundaries: Sequence[float], values: Sequence[float]):
        boundaries = [b for b in boundaries]
        values = [float(v) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"PiecewiseConstant: {len(boundaries)} boundaries need "
                             f"{len(boundaries) + 1} values, got {len(values)}")
        if any(b1 <= b0 for b0, b1 in zip(boundaries, boundaries[1:])):
            raise ValueError(f"PiecewiseConstant: boundaries must increase strictly, got {boundaries}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"PiecewiseConstant: values must be finite, got {values}")
        self.boundaries = boundaries
        self.values = values

    def __call__(self, step: Union[int, float]) -> float:
        # bisect_left counts the boundaries strictly below `step`: exactly the value index.
        return self.values[bisect.bisect_left(self.boundaries, step)]

    @property
    def ever_nonzero(self) -> bool:
        """Whether some step gets a non-zero weight (then the term's network is needed)."""
        return any(v != 0.0 for v in self.values)

    @classmethod
    def constant(cls, value: float) -> "PiecewiseConstant":
        """What the official ``loss_weights = [w]`` expands to: boundaries [0], values [w, w]."""
        return cls([0], [value, value])

    def to_dict(self) -> Dict[str, list]:
        return {"boundaries": list(self.boundaries), "values": list(self.values)}

    def __repr__(self) -> str:
        return f"PiecewiseConstant(boundaries={self.boundaries}, values={self.values})"


OFFICIAL_BOUNDARY = 1_500_000

# training_losses.* of training/config/film_net-{L1,VGG,Style}.gin. The L1 config gives
# `loss_weights = [1.0]`, which the official code expands to boundaries [0], values [1, 1].
OFFICIAL_SCHEDULES: Dict[str, Dict[str, Dict[str, list]]] = {
    "L1": {
        "l1": {"boundaries": [0], "values": [1.0, 1.0]},
    },
    "VGG": {
        "l1": {"boundaries": [0], "values": [1.0, 1.0]},
        "vgg": {"boundaries": [OFFICIAL_BOUNDARY], "values": [1.0, 0.25]},
    },
    "Style": {
        "l1": {"boundaries": [0], "values": [1.0, 1.0]},
        "vgg": {"boundaries": [OFFICIAL_BOUNDARY], "values": [1.0, 0.25]},
        "style": {"boundaries": [OFFICIAL_BOUNDARY], "values": [0.0, 40.0]},
    },
}


def official_schedule(name: str, boundary: Optional[int] = None) -> Dict[str, Dict[str, list]]:
    """A copy of ``OFFICIAL_SCHEDULES[name]`` with the 1.5M-step boundary moved to ``boundary``.

    Shorter runs keep the official shape (L1+VGG first, then VGG down-weighted and
    style switched on) at a step that fits them. ``l1``'s boundary ``[0]`` is not
    moved: it is the constant-weight encoding, not a phase change.
    """
    if name not in OFFICIAL_SCHEDULES:
        raise ValueError(f"unknown official schedule {name!r}; choose one of {sorted(OFFICIAL_SCHEDULES)}")
    schedule = copy.deepcopy(OFFICIAL_SCHEDULES[name])
    if boundary is not None:
        for term in schedule.values():
            term["boundaries"] = [boundary if b == OFFICIAL_BOUNDARY else b for b in term["boundaries"]]
    return schedule


# ---------------------------------------------------------------------------------------------
# VGG-19 trunk
# ---------------------------------------------------------------------------------------------
# (official layer name, torchvision `features` index, in channels, out channels) of the convs
# up to conv5_2; MatConvNet's `layers` cell uses the same indices (a ReLU after each conv and a
# pool after each block occupy the indices in between).
VGG19_CONVS: Tuple[Tuple[str, int, int, int], ...] = (
    ("conv1_1", 0, 3, 64), ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128), ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256), ("conv3_2", 12, 256, 256),
    ("conv3_3", 14, 256, 256), ("conv3_4", 16, 256, 256),
    ("conv4_1", 19, 256, 512), ("conv4_2", 21, 512, 512),
    ("conv4_3", 23, 512, 512), ("conv4_4", 25, 512, 512),
    ("conv5_1", 28, 512, 512), ("conv5_2", 30, 512, 512),
)
VGG19_POOLS: Tuple[Tuple[str, int], ...] = (("pool1", 4), ("pool2", 9), ("pool3", 18), ("pool4", 27))

# Name -> index of the module whose output *is* that official tensor: a conv's output in the
# official dict is already ReLU'd, so it lives at the ReLU after the conv (index + 1).
LAYER_OUTPUT_INDEX: Dict[str, int] = {**{n: i + 1 for n, i, _, _ in VGG19_CONVS}, **dict(VGG19_POOLS)}

# The five layers both official losses read, and their default weights (CRN, Chen & Koltun).
LOSS_LAYERS: Tuple[str, ...] = ("conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2")
LOSS_LAYER_WEIGHTS: Tuple[float, ...] = (1.0 / 2.6, 1.0 / 4.8, 1.0 / 3.7, 1.0 / 5.6, 10.0 / 1.5)

# Input normalizations: the net sees `x * scale - offset` (per channel, x in [0, 1]);
# `value_scale` is what the losses divide features by to undo the input scaling.
OFFICIAL_MEAN_255 = (123.68, 116.779, 103.939)
_TV_MEAN = (0.485, 0.456, 0.406)
_TV_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS: Dict[str, dict] = {
    # vgg19_loss._build_vgg19: `image * 255 - imagenet_mean`, features / 255 in the losses.
    "official": {"scale": (255.0, 255.0, 255.0), "offset": OFFICIAL_MEAN_255, "value_scale": 255.0},
    # torchvision.models.vgg19 weights: (x - mean) / std == x * (1/std) - mean/std.
    "torchvision": {"scale": tuple(1.0 / s for s in _TV_STD),
                    "offset": tuple(m / s for m, s in zip(_TV_MEAN, _TV_STD)),
                    "value_scale": 1.0 / (sum(_TV_STD) / 3.0)},
}


class VGG19Features(nn.Module):
    """The frozen VGG-19 conv trunk of the official losses (avg-pooled, up to ``last_layer``).

    ``self.features`` is an ``nn.Sequential`` laid out like torchvision's
    ``vgg19().features`` (same indices, so ``features.N.weight`` names match), except
    that pools are ``AvgPool2d(2, 2, ceil_mode=True)`` -- for odd sizes this equals
    TF's SAME average pooling (the window hanging off the bottom/right edge averages
    only the pixels it covers). Parameters never require grad and the module stays in
    eval mode (it has no train-time behaviour anyway).

    Args:
        normalization: ``"official"`` (``x * 255 - [123.68, 116.779, 103.939]``) or
            ``"torchvision"`` (``(x - mean) / std``); see the module docstring.
        last_layer: deepest official layer name to build (default ``conv5_2``, the
            deepest one the losses read).
        pool: ``"avg"`` (official) or ``"max"`` (the original VGG).

    Weights are PyTorch's default init; use :func:`load_vgg19` for real ones.
    """

    def __init__(self, normalization: str = "official", last_layer: str = "conv5_2", pool: str = "avg"):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}")
        if last_layer not in LAYER_OUTPUT_INDEX:
            raise ValueError(f"unknown VGG-19 layer {last_layer!r}; known: {sorted(LAYER_OUTPUT_INDEX)}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.normalization = normalization
        self.pool = pool
        self.last_layer = last_layer
        norm = NORMALIZATIONS[normalization]
        self.value_scale = float(norm["value_scale"])
        self.register_buffer("scale", torch.tensor(norm["scale"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("offset", torch.tensor(norm["offset"], dtype=torch.float32).view(1, 3, 1, 1))

        convs = {i: (cin, cout) for _, i, cin, cout in VGG19_CONVS}
        pools = {i for _, i in VGG19_POOLS}
        layers: List[nn.Module] = []
        for i in range(LAYER_OUTPUT_INDEX[last_layer] + 1):
            if i in convs:
                layers.append(nn.Conv2d(convs[i][0], convs[i][1], 3, padding=1))
            elif i in pools:
                layers.append(nn.AvgPool2d(2, 2, ceil_mode=True) if pool == "avg"
                              else nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":
        # A parent's .train() must not flip the frozen feature net (kept for clarity; VGG has
        # no dropout/BN in the trunk, so modes would compute the same).
        return super().train(False)

    def conv_names(self) -> List[Tuple[str, int]]:
        """``[(official name, features index)]`` of the convs this trunk holds."""
        return [(n, i) for n, i, _, _ in VGG19_CONVS if i < len(self.features)]

    def forward(self, x: torch.Tensor, layers: Sequence[str] = LOSS_LAYERS) -> Dict[str, torch.Tensor]:
        """Runs the trunk; returns ``{name: [B, C_l, H_l, W_l]}`` for ``layers``.

        Args:
            x: ``[B, 3, H, W]`` RGB in [0, 1], any float dtype (cast to the weights'
               dtype; under ``torch.autocast`` the convs run in the autocast dtype).
            layers: official names (post-ReLU for convs); the trunk stops at the deepest.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19Features expects [B, 3, H, W] RGB, got {tuple(x.shape)}")
        wanted = {}
        for name in layers:
            idx = LAYER_OUTPUT_INDEX.get(name)
            if idx is None or idx >= len(self.features):
                raise ValueError(f"layer {name!r} is not in this trunk (built up to {self.last_layer})")
            wanted[idx] = name
        h = x.to(self.scale.dtype) * self.scale - self.offset
        out: Dict[str, torch.Tensor] = {}
        last = max(wanted)
        for i, module in enumerate(self.features):
            h = module(h)
            if i in wanted:
                out[wanted[i]] = h
            if i == last:
                break
        return {name: out[name] for name in layers}


# ---------------------------------------------------------------------------------------------
# Loading weights
# ---------------------------------------------------------------------------------------------
def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"MATLAB"):
        return "mat"
    if len(head) >= 9 and head[8:9] == b"{":
        # safetensors: u64 little-endian header length, then the JSON header.
        return "safetensors"
    return "torch"


def _expected_shapes() -> Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    return {i: ((cout, cin, 3, 3), (cout,)) for _, i, cin, cout in VGG19_CONVS}


def _fill(vgg: VGG19Features, tensors: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
          names: Dict[int, Tuple[str, str]], path: str) -> None:
    """Copies ``{index: (weight [cout,cin,3,3], bias [cout])}`` into ``vgg``, checking shapes."""
    shapes = _expected_shapes()
    for _, idx in vgg.conv_names():
        w, b = tensors[idx]
        w_name, b_name = names[idx]
        for t, name, want in ((w, w_name, shapes[idx][0]), (b, b_name, shapes[idx][1])):
            if not torch.is_tensor(t) or not t.is_floating_point():
                raise VGGWeightsError(f"{path}: tensor {name!r} is not a floating-point tensor "
                                      f"({type(t).__name__}{'' if not torch.is_tensor(t) else ' ' + str(t.dtype)})")
            if tuple(t.shape) != want:
                raise VGGWeightsError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {want} "
                                      "(is this a plain VGG-19, not VGG-16 or vgg19_bn?)")
        conv = vgg.features[idx]
        with torch.no_grad():
            conv.weight.copy_(w.to(torch.float32))
            conv.bias.copy_(b.to(torch.float32))


def _state_dict_tensors(sd: Mapping[str, object], path: str, n_convs: int):
    """Finds the torchvision-named conv tensors in a state dict (``features.N.*`` or ``N.*``)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    prefixes = [p for p in ("features.", "", "module.features.")
                if f"{p}0.weight" in sd]
    if not prefixes:
        sample = ", ".join(repr(k) for k in list(sd)[:6])
        raise VGGWeightsError(f"{path}: tensor 'features.0.weight' not found -- expected a torchvision "
                              f"vgg19 state dict (keys 'features.N.weight'/'features.N.bias'); "
                              f"the file has {len(sd)} entries, e.g. {sample}")
    prefix = prefixes[0]
    tensors, names = {}, {}
    for _, idx, _, _ in VGG19_CONVS[:n_convs]:
        w_name, b_name = f"{prefix}{idx}.weight", f"{prefix}{idx}.bias"
        for name in (w_name, b_name):
            if name not in sd:
                raise VGGWeightsError(f"{path}: tensor {name!r} is missing (a torchvision vgg19 state dict "
                                      "has conv weights at features.0, 2, 5, 7, 10, ..., 30)")
        tensors[idx] = (sd[w_name], sd[b_name])
        names[idx] = (w_name, b_name)
    return tensors, names


def _mat_field(rec, name: str):
    names = rec.dtype.names or ()
    return rec[name] if name in names else None


def _mat_string(value) -> Optional[str]:
    try:
        arr = np.asarray(value).reshape(-1)
        return str(arr[0]) if arr.size else None
    except Exception:  # a malformed name only costs us the name check
        return None


def _read_mat(path: str, n_convs: int):
    """Reads conv weights of a MatConvNet simplenn VGG-19 ``.mat`` (as the official code does).

    MatConvNet keeps ``layers`` as a cell of structs; a conv's ``weights`` field is a
    1x2 cell ``{filters [kh, kw, cin, cout], biases [cout x 1]}`` -- the official code
    reads it positionally (``layers[i][0][0][2][0][0]`` / ``[0][1]``) and feeds the
    filters to ``tf.nn.conv2d`` as HWIO, i.e. as a cross-correlation like PyTorch's.
    """
    try:
        import scipy.io
    except ImportError as e:
        raise ImportError(f"{path}: reading MatConvNet .mat weights needs scipy "
                          "(`pip install scipy`); or use a torchvision .pth / .safetensors file") from e
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as e:  # scipy raises this for v7.3 (HDF5) files
        raise VGGWeightsError(f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; "
                              "the MatConvNet imagenet-vgg-verydeep-19.mat is v5") from e
    except Exception as e:
        raise VGGWeightsError(f"{path}: cannot read as a .mat file: {e}") from e
    if "layers" not in mat:
        raise VGGWeightsError(f"{path}: no 'layers' variable (not a MatConvNet simplenn model); "
                              f"variables: {sorted(k for k in mat if not k.startswith('__'))}")
    layers = np.asarray(mat["layers"]).reshape(-1)
    tensors, names = {}, {}
    for conv_name, idx, _, _ in VGG19_CONVS[:n_convs]:
        w_name, b_name = f"layers{{{idx + 1}}}.weights{{1}}", f"layers{{{idx + 1}}}.weights{{2}}"
        if idx >= len(layers):
            raise VGGWeightsError(f"{path}: 'layers' has {len(layers)} entries; {conv_name} is entry {idx + 1}")
        rec = np.asarray(layers[idx]).reshape(-1)[0]
        layer_name = _mat_string(_mat_field(rec, "name"))
        if layer_name is not None and layer_name != conv_name:
            raise VGGWeightsError(f"{path}: layer {idx + 1} is {layer_name!r}, expected {conv_name!r} "
                                  "(not the VGG-19 'verydeep-19' layout)")
        weights = _mat_field(rec, "weights")
        if weights is not None:
            cell = np.asarray(weights).reshape(-1)
            if cell.size != 2:
                raise VGGWeightsError(f"{path}: tensor {w_name!r}: 'weights' cell has {cell.size} entries, expected 2")
            filt, bias = cell[0], cell[1]
        elif _mat_field(rec, "filters") is not None:  # pre-beta MatConvNet field names
            filt, bias = _mat_field(rec, "filters"), _mat_field(rec, "biases")
            w_name, b_name = f"layers{{{idx + 1}}}.filters", f"layers{{{idx + 1}}}.biases"
        else:
            raise VGGWeightsError(f"{path}: layer {idx + 1} ({conv_name}) has no 'weights' field")
        filt = np.asarray(filt)
        if filt.ndim != 4:
            raise VGGWeightsError(f"{path}: tensor {w_name!r} has shape {filt.shape}, expected [3, 3, cin, cout]")
        # [kh, kw, cin, cout] -> [cout, cin, kh, kw]; contiguous copy so torch owns the memory.
        w = torch.from_numpy(np.ascontiguousarray(filt.transpose(3, 2, 0, 1)).astype(np.float32, copy=False))
        b = torch.from_numpy(np.asarray(bias, dtype=np.float32).reshape(-1).copy())
        tensors[idx] = (w, b)
        names[idx] = (w_name, b_name)
    _check_mat_mean(mat, path)
    return tensors, names


def _check_mat_mean(mat, path: str) -> None:
    """Warns when the file's ``normalization.averageImage`` is not the mean the official code hard-codes."""
    try:
        norm = mat.get("normalization")
        if norm is None and "meta" in mat:
            norm = _mat_field(np.asarray(mat["meta"]).reshape(-1)[0], "normalization")
        if norm is None:
            return
        avg = _mat_field(np.asarray(norm).reshape(-1)[0], "averageImage")
        if avg is None:
            return
        avg = np.asarray(avg, dtype=np.float64)
        if avg.size % 3 or avg.size == 0:
            return
        # Either a 3-vector or an H x W x 3 image: its per-channel mean is what matters.
        mean = avg.reshape(-1, 3).mean(axis=0) if avg.shape[-1] == 3 else avg.reshape(3, -1).mean(axis=1)
    except Exception:
        return
    if np.max(np.abs(mean - np.asarray(OFFICIAL_MEAN_255))) > 0.5:
        warnings.warn(f"{path}: the file's averageImage {np.round(mean, 3).tolist()} differs from the "
                      f"mean the official loss subtracts {list(OFFICIAL_MEAN_255)}; using the official mean")


def load_vgg19(path: str, normalization: str = "auto", last_layer: str = "conv5_2",
               pool: str = "avg") -> VGG19Features:
    """Loads VGG-19 conv weights into a frozen :class:`VGG19Features`. Never downloads.

    The format is detected from the content:

    * MatConvNet ``imagenet-vgg-verydeep-19.mat`` (the official file; needs scipy).
      Filters ``[kh, kw, cin, cout]`` are transposed to ``[cout, cin, kh, kw]``.
    * torchvision ``vgg19`` state dict (``torch.load(weights_only=True)``), keys
      ``features.N.weight`` / ``features.N.bias`` (also bare ``N.weight``).
    * ``.safetensors`` with the torchvision key names (e.g. from :func:`save_vgg19`).

    Args:
        path: the weight file.
        normalization: ``"auto"`` -- ``"official"`` for ``.mat``, the file's metadata
            for a :func:`save_vgg19` safetensors, else ``"torchvision"`` -- or an
            explicit ``"official"`` / ``"torchvision"``.
        last_layer, pool: see :class:`VGG19Features`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VGGWeightsError (a ValueError): unreadable file, missing tensor, wrong shape;
            the message names the file and the tensor.
        ImportError: a ``.mat`` file without scipy installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG-19 weights not found: {path}")
    if normalization not in ("auto", *NORMALIZATIONS):
        raise ValueError(f"normalization must be 'auto' or one of {sorted(NORMALIZATIONS)}, got {normalization!r}")
    if last_layer not in LAYER_OUTPUT_INDEX:
        raise ValueError(f"unknown VGG-19 layer {last_layer!r}; known: {sorted(LAYER_OUTPUT_INDEX)}")
    kind = _sniff(path)
    # Only the convs up to last_layer are read (and required) from the file.
    n_convs = sum(1 for _, i, _, _ in VGG19_CONVS if i < LAYER_OUTPUT_INDEX[last_layer])
    file_norm = None
    if kind == "mat":
        tensors, names = _read_mat(path, n_convs)
        file_norm = "official"
    elif kind == "safetensors":
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise VGGWeightsError(f"{path}: cannot read as safetensors: {e}") from e
        file_norm = meta.get("normalization") if meta.get("normalization") in NORMALIZATIONS else None
        tensors, names = _state_dict_tensors(sd, path, n_convs)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VGGWeightsError(f"{path}: cannot read as a torch state dict "
                                  f"(torch.load weights_only=True): {e}") from e
        if not isinstance(sd, Mapping):
            raise VGGWeightsError(f"{path}: expected a state dict (a mapping of tensors), got {type(sd).__name__}")
        tensors, names = _state_dict_tensors(sd, path, n_convs)
    if normalization == "auto":
        normalization = file_norm or "torchvision"
    vgg = VGG19Features(normalization=normalization, last_layer=last_layer, pool=pool)
    _fill(vgg, tensors, names, path)
    return vgg


def save_vgg19(vgg: VGG19Features, path: str) -> None:
    """Writes ``vgg``'s conv weights as ``.safetensors`` (torchvision names) plus its normalization.

    Converting the 548 MB official ``.mat`` once makes later loads fast and scipy-free,
    and :func:`load_vgg19` reads the normalization back from the metadata.
    """
    from safetensors.torch import save_file
    tensors = {}
    for _, idx in vgg.conv_names():
        conv = vgg.features[idx]
        tensors[f"features.{idx}.weight"] = conv.weight.detach().to("cpu", torch.float32).contiguous()
        tensors[f"features.{idx}.bias"] = conv.bias.detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, os.fspath(path), metadata={"format": "film_fast.vgg19",
                                                  "normalization": vgg.normalization})


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official ``l1_loss``: ``mean(|pred - target|)`` over all elements, in fp32. Returns a scalar."""
    return (pred.float() - target.float()).abs().mean()


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((pred - target)^2)`` over all elements, in fp32. Returns a scalar.

    Not in the official configs. PSNR is ``-10 log10`` of exactly this mean. Where the
    motion is ambiguous, L1's optimum is a per-pixel median and L2's a mean (a blend); on
    the built-in model a 500-step L2 fine-tune at lr 5e-5 still lowered PSNR (README model
    card), so the built-in recipe stays L1.
    """
    diff = pred.float() - target.float()
    return (diff * diff).mean()


def _no_autocast(t: torch.Tensor):
    # Loss reductions and Gram matmuls run in fp32 even under the caller's autocast: Gram
    # entries are sums over H*W products, which bf16's 8-bit mantissa would visibly round.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _features_pair(vgg: VGG19Features, pred: torch.Tensor, target: torch.Tensor,
                   layers: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    feats_pred = vgg(pred, layers)
    if target.requires_grad:
        feats_target = vgg(target, layers)
    else:
        # The target is data: no activations need keeping for backward.
        with torch.no_grad():
            feats_target = vgg(target, layers)
    return feats_pred, feats_target


class _LayerWeightedLoss(nn.Module):
    """A loss over VGG layers with one weight per layer (the official layers and weights by default)."""

    def __init__(self, vgg: VGG19Features, weights: Optional[Sequence[float]] = None,
                 layers: Sequence[str] = LOSS_LAYERS):
        super().__init__()
        self.vgg = vgg
        self.layers = tuple(layers)
        self.weights = tuple(float(w) for w in (weights if weights is not None else LOSS_LAYER_WEIGHTS))
        if len(self.weights) != len(self.layers):
            raise ValueError(f"{len(self.layers)} layers need {len(self.layers)} weights, got {len(self.weights)}")



class PerceptualLoss(_LayerWeightedLoss):
    """Official ``vgg_loss``: ``sum_l w_l * mean(|phi_l(target) - phi_l(pred)|) / value_scale``.

    ``phi_l`` are post-ReLU VGG-19 features of :data:`LOSS_LAYERS`; ``value_scale`` is
    255 with the official normalization (the official ``final_loss /= 255``).

    Args:
        vgg: the shared :class:`VGG19Features`.
        weights: per-layer weights (default :data:`LOSS_LAYER_WEIGHTS`).
        layers: layer names (default :data:`LOSS_LAYERS`).
    """

    def from_features(self, feats_pred: Mapping[str, torch.Tensor],
                      feats_target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss from precomputed ``{layer: [B, C, H, W]}`` features; fp32 scalar."""
        with _no_autocast(next(iter(feats_pred.values()))):
            total = None
            for name, w in zip(self.layers, self.weights):
                term = (feats_target[name].float() - feats_pred[name].float()).abs().mean() * w
                total = term if total is None else total + term
            return total / self.vgg.value_scale

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target``: ``[B, 3, H, W]`` RGB in [0, 1]. Returns an fp32 scalar."""
        return self.from_features(*_features_pair(self.vgg, pred, target, self.layers))


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, C]`` Gram matrix ``F F^T / (H*W)`` (official normalization), fp32."""
    b, c, h, w = features.shape
    flat = features.float().reshape(b, c, h * w)
    with _no_autocast(features):
        return torch.bmm(flat, flat.transpose(1, 2)) / float(h * w)


class StyleLoss(_LayerWeightedLoss):
    """Official ``style_loss``: ``sum_l w_l * mean((G(phi_l(target)/s) - G(phi_l(pred)/s))^2)``.

    ``G`` is :func:`gram_matrix`, ``s`` the trunk's ``value_scale`` (255 officially,
    applied to the features *before* the Gram), the mean over ``B * C_l * C_l``.
    Same layers and default weights as :class:`PerceptualLoss`.
    """

    def from_features(self, feats_pred: Mapping[str, torch.Tensor],
                      feats_target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss from precomputed ``{layer: [B, C, H, W]}`` features; fp32 scalar."""
        s = self.vgg.value_scale
        with _no_autocast(next(iter(feats_pred.values()))):
            total = None
            for name, w in zip(self.layers, self.weights):
                g_t = gram_matrix(feats_target[name].float() / s)
                g_p = gram_matrix(feats_pred[name].float() / s)
                term = (g_t - g_p).square().mean() * w
                total = term if total is None else total + term
            return total

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target``: ``[B, 3, H, W]`` RGB in [0, 1]. Returns an fp32 scalar."""
        return self.from_features(*_features_pair(self.vgg, pred, target, self.layers))


TERMS = ("l1", "l2", "vgg", "style")


def _schedule(name: str, spec) -> PiecewiseConstant:
    if isinstance(spec, PiecewiseConstant):
        return spec
    if isinstance(spec, (int, float)):
        return PiecewiseConstant.constant(float(spec))
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"boundaries", "values"}
        if unknown or "values" not in spec:
            raise ValueError(f"loss {name!r}: expected {{'boundaries': [...], 'values': [...]}}, got {dict(spec)}")
        return PiecewiseConstant(spec.get("boundaries", []), spec["values"])
    raise ValueError(f"loss {name!r}: weight must be a number, a PiecewiseConstant or "
                     f"{{'boundaries', 'values'}}, got {type(spec).__name__}")


class TrainingLoss(nn.Module):
    """The official training objective ``sum_k loss_k(pred, y) * weight_k(step)``.

    Args:
        config: ``{term: schedule}`` with terms from ``l1``, ``l2``, ``vgg``, ``style``; a
            schedule is ``{"boundaries": [...], "values": [...]}``, a
            :class:`PiecewiseConstant`, or a number (constant weight). See
            :data:`OFFICIAL_SCHEDULES` / :func:`official_schedule`.
        vgg_path: VGG-19 weights for :func:`load_vgg19`; required only when ``vgg`` or
            ``style`` has a non-zero weight at some step.
        vgg: an already built :class:`VGG19Features` instead of ``vgg_path``.
        vgg_normalization: passed to :func:`load_vgg19`.

    The VGG trunk is a (frozen) submodule so ``.to(device)`` moves it; checkpoint the
    FILM model, not this module, or the VGG weights ride along.
    """

    def __init__(self, config: Mapping[str, object], vgg_path: Optional[str] = None,
                 vgg: Optional[VGG19Features] = None, vgg_normalization: str = "auto"):
        super().__init__()
        unknown = set(config) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)}; known: {list(TERMS)}")
        if not config:
            raise ValueError("the loss config names no term")
        self.schedules: Dict[str, PiecewiseConstant] = {k: _schedule(k, config[k]) for k in TERMS if k in config}
        needs_vgg = [k for k in ("vgg", "style") if k in self.schedules and self.schedules[k].ever_nonzero]
        self.vgg: Optional[VGG19Features] = None
        self.perceptual: Optional[PerceptualLoss] = None
        self.style: Optional[StyleLoss] = None
        if needs_vgg:
            if vgg is None:
                if vgg_path is None:
                    raise ValueError(f"loss term(s) {needs_vgg} need VGG-19 weights: pass vgg_path "
                                     "(MatConvNet imagenet-vgg-verydeep-19.mat, torchvision vgg19 .pth, "
                                     "or .safetensors)")
                vgg = load_vgg19(vgg_path, normalization=vgg_normalization)
            self.vgg = vgg
            if "vgg" in needs_vgg:
                self.perceptual = PerceptualLoss(vgg)
            if "style" in needs_vgg:
                self.style = StyleLoss(vgg)

    def weights(self, step: int) -> Dict[str, float]:
        """``{term: weight at step}`` (for logging)."""
        return {k: s(step) for k, s in self.schedules.items()}

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms that were computed.

        Args:
            pred: ``[B, 3, H, W]`` prediction, RGB in [0, 1], any float dtype.
            target: ``[B, 3, H, W]`` ground truth, same range.
            step: optimizer steps taken so far (the official ``optimizer.iterations``).

        Returns:
            ``(total, {term: value})``: ``total`` an fp32 scalar attached to ``pred``'s
            graph; values detached fp32 scalars, only for terms with a non-zero weight
            at ``step`` (a zero-weight term is skipped, VGG included).
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        w = self.weights(step)
        active = [k for k in self.schedules if w[k] != 0.0]
        terms: Dict[str, torch.Tensor] = {}
        if "l1" in active:
            terms["l1"] = l1_loss(pred, target)
        if "l2" in active:
            terms["l2"] = l2_loss(pred, target)
        vgg_terms = [k for k in ("vgg", "style") if k in active]
        if vgg_terms:
            # One trunk pass serves both terms.
            fp, ft = _features_pair(self.vgg, pred, target, LOSS_LAYERS)
            if "vgg" in vgg_terms:
                terms["vgg"] = self.perceptual.from_features(fp, ft)
            if "style" in vgg_terms:
                terms["style"] = self.style.from_features(fp, ft)
        if terms:
            total = sum(terms[k] * w[k] for k in terms)
        else:
            # Still attached to pred so a caller's backward() works (and gives zero grads).
            total = pred.float().sum() * 0.0
        return total, {k: v.detach() for k, v in terms.items()}
