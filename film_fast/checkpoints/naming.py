"""Weight names: film_fast's canonical names and the maps from the official TF and port names.

Canonical names (the keys of ``FILM.state_dict()``), ``i`` = pyramid level, finest first::

    extract.stages.{j}.convs.{n}.{weight,bias}        sub-tree stage j, conv n (3x3)
    predict_flow.predictors.{i}.convs.{n}.{weight,bias} specialized flow predictor of level i
    predict_flow.shared.convs.{n}.{weight,bias}        shared flow predictor
    fuse.levels.{i}.up.{weight,bias}                   decoder 2x2 conv at level i
    fuse.levels.{i}.convs.{0,1}.{weight,bias}          decoder 3x3 convs at level i
    fuse.output.{weight,bias}                          final 1x1 conv

Weights are OIHW. Every map works by name (never by position in a list) and
the architecture is inferred from the shapes under those names.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..errors import CheckpointError
from ..options import PUBLISHED, Options


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not fit a FILM model; the message names the first offending tensor."""


def _to_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.from_numpy(np.ascontiguousarray(value))


# ---- official TF2 names -------------------------------------------------------------------
_OFFICIAL_FEAT = re.compile(r"feat_net/sub_extractor/cfeat_conv_(\d+)/(kernel|bias)(?::0)?$")
_OFFICIAL_FLOW = re.compile(r"predict_flow/flow_predictor_(\d+|shared)/conv_(\d+)/(kernel|bias)(?::0)?$")
_OFFICIAL_FUSION = re.compile(r"fusion/conv2d(?:_(\d+))?/(kernel|bias)(?::0)?$")


def from_official(variables: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Maps official TF variable names (HWIO kernels) to canonical names (OIHW).

    The fusion convs carry Keras auto-generated names ``conv2d``, ``conv2d_1``, ...
    in creation order (level 0's 2x2, 3x3, 3x3, then level 1's, ..., the 1x1
    output conv last); the numbering may start above 0, so convs are ordered by
    their number, never by its value.
    """
    out: Dict[str, torch.Tensor] = {}
    fusion: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, value in variables.items():
        t = _to_tensor(value)
        m = _OFFICIAL_FEAT.search(name)
        if m:
            idx, kind = int(m.group(1)), m.group(2)
            out[f"extract.stages.{idx // 2}.convs.{idx % 2}.{_param(kind)}"] = _oihw(t, kind)
            continue
        m = _OFFICIAL_FLOW.search(name)
        if m:
            which, n, kind = m.group(1), int(m.group(2)), m.group(3)
            prefix = "predict_flow.shared" if which == "shared" else f"predict_flow.predictors.{int(which)}"
            out[f"{prefix}.convs.{n}.{_param(kind)}"] = _oihw(t, kind)
            continue
        m = _OFFICIAL_FUSION.search(name)
        if m:
            number = int(m.group(1)) if m.group(1) is not None else 0
            fusion.setdefault(number, {})[_param(m.group(2))] = _oihw(t, m.group(2))
            continue
        raise CheckpointMismatchError(f"unexpected variable {name!r}: not part of a film_net model")
    ordered = [fusion[k] for k in sorted(fusion)]
    if ordered:
        if len(ordered) % 3 != 1:
            raise CheckpointMismatchError(
                f"found {len(ordered)} fusion convs; film_net has 3 per decoder level plus the "
                "output conv")
        for pos, params in enumerate(ordered[:-1]):
            level, slot = divmod(pos, 3)
            target = "up" if slot == 0 else f"convs.{slot - 1}"
            for kind, t in params.items():
                out[f"fuse.levels.{level}.{target}.{kind}"] = t
        for kind, t in ordered[-1].items():
            out[f"fuse.output.{kind}"] = t
    return out


def _param(kind: str) -> str:
    return "weight" if kind == "kernel" else "bias"


def _oihw(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.permute(3, 2, 0, 1).contiguous() if kind == "kernel" else t


# ---- PyTorch port names -------------------------------------------------------------------
_PORT_FEAT = re.compile(r"extract\.extract_sublevels\.convs\.(\d+)\.(\d+)\.0\.(weight|bias)$")
_PORT_SPECIAL = re.compile(r"predict_flow\._predictors\.(\d+)\._convs\.(\d+)\.0\.(weight|bias)$")
_PORT_SHARED = re.compile(r"predict_flow\._predictor\._convs\.(\d+)\.0\.(weight|bias)$")
_PORT_FUSE = re.compile(r"fuse\.convs\.(\d+)\.(\d+)\.0\.(weight|bias)$")
_PORT_OUT = re.compile(r"fuse\.output_conv\.(weight|bias)$")


def is_port_state(state: Mapping[str, object]) -> bool:
    return any(_PORT_FEAT.search(k) or _PORT_SHARED.search(k) for k in state)


def from_port(state: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Maps the PyTorch port's state-dict keys to canonical names.

    The port stores its specialized predictors in reversed level order
    (``_predictors.0`` is the coarsest specialized level) and its fusion
    ``convs`` coarse to fine; both are re-indexed here from the number of
    entries found under those names.
    """
    special = {int(m.group(1)) for k in state if (m := _PORT_SPECIAL.search(k))}
    fuse = {int(m.group(1)) for k in state if (m := _PORT_FUSE.search(k))}
    n_special = max(special) + 1 if special else 0
    n_fuse = max(fuse) + 1 if fuse else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        t = _to_tensor(value)
        if m := _PORT_FEAT.search(key):
            out[f"extract.stages.{m.group(1)}.convs.{m.group(2)}.{m.group(3)}"] = t
        elif m := _PORT_SPECIAL.search(key):
            level = n_special - 1 - int(m.group(1))
            out[f"predict_flow.predictors.{level}.convs.{m.group(2)}.{m.group(3)}"] = t
        elif m := _PORT_SHARED.search(key):
            out[f"predict_flow.shared.convs.{m.group(1)}.{m.group(2)}"] = t
        elif m := _PORT_FUSE.search(key):
            level = n_fuse - 1 - int(m.group(1))
            slot = int(m.group(2))
            target = "up" if slot == 0 else f"convs.{slot - 1}"
            out[f"fuse.levels.{level}.{target}.{m.group(3)}"] = t
        elif m := _PORT_OUT.search(key):
            out[f"fuse.output.{m.group(1)}"] = t
        else:
            raise CheckpointMismatchError(f"unexpected key {key!r}: not part of the FILM port's model")
    return out


# ---- architecture inference ---------------------------------------------------------------
def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    if found and found != set(range(max(found) + 1)):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise CheckpointMismatchError(f"checkpoint has a gap in {pattern!r}: index {missing[0]} missing")
    return len(found)


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"checkpoint lacks tensor {key!r}")
    return state[key]


def infer_options(state: Mapping[str, torch.Tensor], pyramid_levels: Optional[int] = None) -> Options:
    """Infers :class:`Options` from canonical tensor shapes.

    Everything but ``pyramid_levels`` is determined by the weights. The number
    of pyramid levels does not change any weight shape, so it comes from
    ``pyramid_levels`` when given, else it is the published 7 when every other
    option matches the published config; otherwise this raises.
    """
    sub_levels = _count(state, r"extract\.stages\.(\d+)\.convs\.0\.weight$")
    if sub_levels == 0:
        raise CheckpointMismatchError("checkpoint has no feature-extractor weights "
                                      "('extract.stages.0.convs.0.weight' missing)")
    filters = int(_need(state, "extract.stages.0.convs.0.weight").shape[0])
    specialized = _count(state, r"predict_flow\.predictors\.(\d+)\.convs\.0\.weight$")
    flow_convs, flow_filters = [], []
    for prefix in [f"predict_flow.predictors.{i}" for i in range(specialized)] + ["predict_flow.shared"]:
        n = _count(state, re.escape(prefix) + r"\.convs\.(\d+)\.weight$")
        if n < 3:
            raise CheckpointMismatchError(f"checkpoint has {n} convs under {prefix!r}; a flow "
                                          "predictor has at least one 3x3 conv and two 1x1 convs")
        flow_convs.append(n - 2)
        flow_filters.append(int(_need(state, f"{prefix}.convs.0.weight").shape[0]))
    fusion_levels = _count(state, r"fuse\.levels\.(\d+)\.up\.weight$") + 1
    # Decoder widths: the film_net rule (filters << min(i, specialized)) unless the weights
    # say otherwise; then every level up to the last differing one is listed explicitly.
    widths = [int(_need(state, f"fuse.levels.{i}.up.weight").shape[0])
              for i in range(fusion_levels - 1)]
    differs = [i for i, w in enumerate(widths) if w != filters << min(i, specialized)]
    fusion_widths = tuple(widths[:differs[-1] + 1]) if differs else ()
    guess = dict(fusion_pyramid_levels=fusion_levels, specialized_levels=specialized,
                 sub_levels=sub_levels, flow_convs=tuple(flow_convs),
                 flow_filters=tuple(flow_filters), filters=filters)
    if fusion_widths:
        guess["fusion_widths"] = fusion_widths
    if pyramid_levels is None:
        published = PUBLISHED.to_dict()
        published.pop("pyramid_levels")
        comparable = dict(guess, flow_convs=list(flow_convs), flow_filters=list(flow_filters))
        if comparable != published:
            raise CheckpointMismatchError(
                "the number of pyramid levels is not stored in these weights and they are not the "
                f"published film_net config ({guess}); pass pyramid_levels=N (or options=...)")
        pyramid_levels = PUBLISHED.pyramid_levels
    try:
        return Options(pyramid_levels=int(pyramid_levels), **guess)
    except ValueError as e:
        raise CheckpointMismatchError(f"inferred an invalid config: {e}") from None


def check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                source: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming the first missing, extra or mis-shaped tensor."""
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointMismatchError(f"{source}: missing tensor {key!r} (expected shape "
                                          f"{list(ref.shape)})")
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointMismatchError(f"{source}: tensor {key!r} has shape {list(got.shape)}, "
                                          f"the model needs {list(ref.shape)}")
        if not got.is_floating_point():
            raise CheckpointMismatchError(f"{source}: tensor {key!r} has dtype {got.dtype}, "
                                          "expected a floating dtype")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointMismatchError(f"{source}: unexpected tensor {extra[0]!r} "
                                      f"({len(extra)} unexpected in all)")


# ---- exports (inverse maps) ---------------------------------------------------------------
_CANON_FEAT = re.compile(r"extract\.stages\.(\d+)\.convs\.(\d+)\.(weight|bias)$")
_CANON_FLOW = re.compile(r"predict_flow\.(?:predictors\.(\d+)|(shared))\.convs\.(\d+)\.(weight|bias)$")
_CANON_FUSE = re.compile(r"fuse\.levels\.(\d+)\.(up|convs\.0|convs\.1)\.(weight|bias)$")
_CANON_OUT = re.compile(r"fuse\.output\.(weight|bias)$")
_SLOTS = {"up": 0, "convs.0": 1, "convs.1": 2}


def _levels(state: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    special = {int(m.group(1)) for k in state if (m := _CANON_FLOW.match(k)) and m.group(1)}
    fuse = {int(m.group(1)) for k in state if (m := _CANON_FUSE.match(k))}
    return (max(special) + 1 if special else 0), (max(fuse) + 1 if fuse else 0)


def to_port(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Canonical names -> the PyTorch port's state-dict keys (for tools that expect them)."""
    n_special, n_fuse = _levels(state)
    out = {}
    for key, t in state.items():
        if m := _CANON_FEAT.match(key):
            out[f"extract.extract_sublevels.convs.{m.group(1)}.{m.group(2)}.0.{m.group(3)}"] = t
        elif m := _CANON_FLOW.match(key):
            if m.group(2):
                out[f"predict_flow._predictor._convs.{m.group(3)}.0.{m.group(4)}"] = t
            else:
                r = n_special - 1 - int(m.group(1))
                out[f"predict_flow._predictors.{r}._convs.{m.group(3)}.0.{m.group(4)}"] = t
        elif m := _CANON_FUSE.match(key):
            r = n_fuse - 1 - int(m.group(1))
            out[f"fuse.convs.{r}.{_SLOTS[m.group(2)]}.0.{m.group(3)}"] = t
        elif m := _CANON_OUT.match(key):
            out[f"fuse.output_conv.{m.group(1)}"] = t
        else:
            raise CheckpointMismatchError(f"unexpected canonical key {key!r}")
    return out


def to_official(state: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Canonical names -> official TF variable names with HWIO kernels (numpy), in Keras creation order."""
    _, n_fuse = _levels(state)
    out = {}
    for key, t in state.items():
        a = t.detach().cpu().numpy()
        kind = "kernel" if key.endswith("weight") else "bias"
        if kind == "kernel":
            a = np.ascontiguousarray(a.transpose(2, 3, 1, 0))
        if m := _CANON_FEAT.match(key):
            name = f"feat_net/sub_extractor/cfeat_conv_{2 * int(m.group(1)) + int(m.group(2))}"
        elif m := _CANON_FLOW.match(key):
            which = "shared" if m.group(2) else m.group(1)
            name = f"predict_flow/flow_predictor_{which}/conv_{m.group(3)}"
        elif m := _CANON_FUSE.match(key):
            number = 3 * int(m.group(1)) + _SLOTS[m.group(2)]
            name = "fusion/conv2d" + (f"_{number}" if number else "")
        elif _CANON_OUT.match(key):
            name = f"fusion/conv2d_{3 * n_fuse}"
        else:
            raise CheckpointMismatchError(f"unexpected canonical key {key!r}")
        out[f"{name}/{kind}"] = a
    return out
