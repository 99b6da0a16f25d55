"""FILM architecture options, equal to the official ``film_net`` ``Options``.

The defaults are the published film_net configuration (the L1, VGG and Style
checkpoints all share it): 7 pyramid levels, 5 fusion levels, 3 specialized flow
levels, 4-deep feature sub-trees, base width 64.

Channel bookkeeping (all derived from the options, never from tables):

========================  ==============================================
quantity                  value
========================  ==============================================
sub-tree stage j width    ``filters << j``
feature channels, level i ``sum(filters << j for j < min(i + 1, sub_levels))``
flow predictor i input    ``2 * feature_channels(i)`` (a and warped b)
fusion width, level i     ``fusion_widths[i]`` if given, else
                          ``filters << min(i, specialized_levels)``
fusion input, level i     ``2 * (3 + feature_channels(i)) + 4``
========================  ==============================================

``padding`` is the one option that is not architecture: it decides what the
model sees around inputs whose size is not a multiple of ``size_multiple``.

For the published config the feature channels are 64, 192, 448, 960, 960, ...
and the fusion 3x3 inputs 202, 522, 1162, 2442 at levels 0..3 (see
FILM-SEMANTICS.md).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Tuple


# Input padding modes (Options.padding); the first is the default.
PADDINGS = ("zeros", "replicate")


@dataclasses.dataclass(frozen=True)
class Options:
    """The film_net hyper-parameters.

    Attributes:
        pyramid_levels: levels of the image/feature pyramid and of flow estimation.
        fusion_pyramid_levels: finest levels fed to the fusion decoder.
        specialized_levels: finest flow levels with their own predictor weights.
        sub_levels: depth of each cascaded feature sub-tree.
        flow_convs: 3x3 convs per predictor; one entry per specialized level,
            then one for the shared predictor.
        flow_filters: filters per predictor, same indexing as ``flow_convs``.
        filters: base feature count ``k``.
        fusion_widths: decoder widths of the finest fusion levels, overriding
            ``filters << min(i, specialized_levels)`` for levels ``0 .. len - 1``
            (at most ``fusion_pyramid_levels - 1`` entries; the coarsest fusion level
            has no convs). Empty (the film_net default) = no override. ``(32,)``
            doubles the built-in model's full-resolution decoder (16 channels).
        padding: how inputs whose H or W is not a multiple of ``size_multiple`` are
            padded (centred) before the pyramid and cropped after: ``"zeros"`` (the
            official wrapper's, and what the published weights are matched against) or
            ``"replicate"`` (edge pixels repeated). Not an architecture change: the
            weights are the same, only the border the coarse levels see differs. A model
            trained on unpadded crops never saw black borders; the built-in model gains
            0.36 dB on DAVIS with ``"replicate"`` (see the README's model card).
    """

    pyramid_levels: int = 7
    fusion_pyramid_levels: int = 5
    specialized_levels: int = 3
    sub_levels: int = 4
    flow_convs: Tuple[int, ...] = (3, 3, 3, 3)
    flow_filters: Tuple[int, ...] = (32, 64, 128, 256)
    filters: int = 64
    fusion_widths: Tuple[int, ...] = ()
    padding: str = "zeros"

    def __post_init__(self) -> None:
        object.__setattr__(self, "flow_convs", tuple(int(v) for v in self.flow_convs))
        object.__setattr__(self, "flow_filters", tuple(int(v) for v in self.flow_filters))
        object.__setattr__(self, "fusion_widths", tuple(int(v) for v in self.fusion_widths))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent option."""
        for name in ("pyramid_levels", "fusion_pyramid_levels", "specialized_levels",
                     "sub_levels", "filters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Options.{name} must be a positive int, got {value!r}")
        if self.fusion_pyramid_levels > self.pyramid_levels:
            raise ValueError(
                f"Options.fusion_pyramid_levels ({self.fusion_pyramid_levels}) must be <= "
                f"pyramid_levels ({self.pyramid_levels})")
        if self.fusion_pyramid_levels < 2:
            raise ValueError("Options.fusion_pyramid_levels must be >= 2 (the decoder needs a "
                             f"coarse and a fine level), got {self.fusion_pyramid_levels}")
        if self.specialized_levels > self.pyramid_levels:
            raise ValueError(
                f"Options.specialized_levels ({self.specialized_levels}) must be <= "
                f"pyramid_levels ({self.pyramid_levels})")
        expected = self.specialized_levels + 1
        for name in ("flow_convs", "flow_filters"):
            seq = getattr(self, name)
            if len(seq) != expected:
                raise ValueError(
                    f"Options.{name} needs specialized_levels + 1 = {expected} entries "
                    f"(one per specialized level, then the shared predictor), got {list(seq)}")
            if any(v < 1 for v in seq):
                raise ValueError(f"Options.{name} entries must be positive, got {list(seq)}")
        if any(f < 2 for f in self.flow_filters):
            raise ValueError(f"Options.flow_filters entries must be >= 2, got {list(self.flow_filters)}")
        if len(self.fusion_widths) > self.fusion_pyramid_levels - 1:
            raise ValueError(
                f"Options.fusion_widths has {len(self.fusion_widths)} entries; at most "
                f"fusion_pyramid_levels - 1 = {self.fusion_pyramid_levels - 1} levels have convs")
        if self.padding not in PADDINGS:
            raise ValueError(f"Options.padding must be one of {', '.join(PADDINGS)}, got "
                             f"{self.padding!r}")
        if any(w < 1 for w in self.fusion_widths):
            raise ValueError(f"Options.fusion_widths entries must be positive, got "
                             f"{list(self.fusion_widths)}")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Input H and W must be multiples of this (64 for the published model)."""
        return 1 << (self.pyramid_levels - 1)

    def feature_channels(self, level: int) -> int:
        """Channels of the cascaded feature pyramid at ``level`` (0 = finest)."""
        depth = min(level + 1, self.sub_levels)
        return sum(self.filters << j for j in range(depth))

    def fusion_filters(self, level: int) -> int:
        """Decoder width at fusion ``level``."""
        if level < len(self.fusion_widths):
            return self.fusion_widths[level]
        return self.filters << min(level, self.specialized_levels)

    def fusion_input_channels(self, level: int) -> int:
        """Channels of concat(warped_0, warped_1, backward_flow, forward_flow) at ``level``."""
        return 2 * (3 + self.feature_channels(level)) + 4

    def predictor_for_level(self, level: int) -> int:
        """Index of the flow predictor used at ``level``; ``specialized_levels`` = shared."""
        return level if level < self.specialized_levels else self.specialized_levels

    # ---- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flow_convs"] = list(self.flow_convs)
        d["flow_filters"] = list(self.flow_filters)
        # Written only when set, so every film_net config serialises as it always has.
        widths = d.pop("fusion_widths")
        if widths:
            d["fusion_widths"] = list(widths)
        if d["padding"] == "zeros":
            del d["padding"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Options":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown FILM option(s): {', '.join(unknown)}")
        return cls(**d)


PUBLISHED = Options()
